"""A small WebSocket client for tests (wsproto over a trio TCP stream), and a Chrome DevTools
Protocol client on top of it, for the headless Chromium test of the dashboard."""

from __future__ import annotations

import itertools
import json
from typing import Any
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)


class Rejected(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"WebSocket handshake rejected: {status} {body[:200]!r}")
        self.status = status
        self.body = body


class WSClient:
    """``async with WSClient.connect(url) as ws``: ``await ws.receive()`` -> str | None."""

    def __init__(self, stream: trio.SocketStream, conn: WSConnection) -> None:
        self.stream = stream
        self.conn = conn
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._parts: list[str] = []
        self._pending: list[Any] = []

    @classmethod
    async def connect(
        cls, url: str, headers: dict[str, str] | None = None, *, timeout: float = 10
    ) -> WSClient:
        parts = urlsplit(url)
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(parts.hostname, parts.port)
            conn = WSConnection(ConnectionType.CLIENT)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
            await stream.send_all(
                conn.send(Request(host=parts.netloc, target=target, extra_headers=extra))
            )
            status, body = 0, b""
            client = cls(stream, conn)
            while True:
                data = await stream.receive_some(65536)
                conn.receive_data(data or None)
                for event in conn.events():
                    if isinstance(event, AcceptConnection):
                        return client
                    if isinstance(event, RejectConnection):
                        status = event.status_code
                        if not event.has_body:
                            await stream.aclose()
                            raise Rejected(status, b"")
                    elif isinstance(event, RejectData):
                        body += event.data
                        if event.body_finished:
                            await stream.aclose()
                            raise Rejected(status, body)
                    else:
                        client._pending.append(event)
                if not data:
                    await stream.aclose()
                    raise Rejected(status, body)

    async def __aenter__(self) -> WSClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def send(self, text: str) -> None:
        await self.stream.send_all(self.conn.send(TextMessage(data=text)))

    async def receive(self) -> str | None:
        """The next text message; None once closed."""
        while True:
            events, self._pending = self._pending, []
            events.extend(self.conn.events())
            for event in events:
                if isinstance(event, Ping):
                    await self.stream.send_all(self.conn.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self.close_code, self.close_reason = event.code, event.reason
                    try:
                        await self.stream.send_all(self.conn.send(event.response()))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    return None
                elif isinstance(event, Message):
                    self._parts.append(event.data)
                    if event.message_finished:
                        text, self._parts = "".join(self._parts), []
                        return text
            try:
                data = await self.stream.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return None
            self.conn.receive_data(data)

    async def aclose(self) -> None:
        try:
            await self.stream.send_all(self.conn.send(CloseConnection(code=1000)))
        except Exception:
            pass
        await self.stream.aclose()


class CDP:
    """Chrome DevTools Protocol over a page target's WebSocket: ``await cdp.call(method,
    **params)`` -> result (events are skipped)."""

    def __init__(self, ws: WSClient) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        await self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            text = await self.ws.receive()
            if text is None:
                raise ConnectionError(f"DevTools closed during {method}")
            msg = json.loads(text)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")
