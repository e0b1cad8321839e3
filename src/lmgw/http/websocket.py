"""WebSockets (RFC 6455) for the gateway's own pages: the handshake, and a small trio
``WebSocket`` on wsproto's sans-IO frame protocol.

The native server hands a connection over when a request asks for ``Upgrade: websocket``
(:class:`lmgw.http.h1.UpgradeRequest`); the hypercorn path gets WebSockets from ASGI. Both
reach the application as ``await app.upgrade(request, upgrade)``, where ``upgrade`` is a
:class:`WebSocketUpgrade`: the handler either ``accept()``\\ s (and gets a :class:`WebSocket`)
or ``reject()``\\ s with a plain HTTP answer. Nothing here is on the path of ordinary requests:
the parser only looks at ``Upgrade`` when llhttp says the request asks for one.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio
from wsproto.connection import CloseReason, Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Message, Ping, TextMessage
from wsproto.utilities import RemoteProtocolError, generate_accept_token

from .types import Headers, Request

#: the largest message a client may send us (the dashboard's clients send nothing but pings)
MAX_MESSAGE_BYTES = 64 << 10


def handshake_problem(req: Request) -> str | None:
    """Why ``req`` is not a valid WebSocket opening handshake (RFC 6455 4.2.1), or None."""
    if req.method != "GET":
        return "a WebSocket handshake must be a GET"
    if b"websocket" not in (req.header(b"upgrade") or b"").lower():
        return "expected Upgrade: websocket"
    if req.header(b"sec-websocket-version") != b"13":
        return "only WebSocket version 13 is supported"
    key = req.header(b"sec-websocket-key")
    if not key or len(key.strip()) != 24:
        return "missing or malformed Sec-WebSocket-Key"
    return None


def same_origin(req: Request) -> bool:
    """Whether a browser's ``Origin`` names the host it connects to (no Origin: not a
    browser, allowed). Stops another site's page from opening a socket with our cookie."""
    origin = req.header(b"origin")
    if origin is None:
        return True
    host = req.header(b"host") or b""
    _, _, rest = origin.partition(b"://")
    return rest.rstrip(b"/").lower() == host.lower()


class WebSocket(Protocol):
    """An accepted WebSocket, whichever server carries it."""

    async def send_text(self, text: str) -> None:
        """Send one text message."""

    async def receive(self) -> str | bytes | None:
        """The next message; None once the peer closed (or the connection broke)."""

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close (idempotent)."""


class WebSocketUpgrade(Protocol):
    """A request that asked to become a WebSocket."""

    def problem(self) -> str | None:
        """Why the handshake is invalid (answer 400 then), or None."""

    async def accept(self, headers: Headers | None = None) -> WebSocket:
        """Answer 101 and return the socket."""

    async def reject(self, status: int, headers: Headers, body: bytes) -> None:
        """Answer with a plain HTTP response instead (the connection then closes)."""


# -- the native server -----------------------------------------------------------------------


class StreamWebSocket:
    """A server-side WebSocket on a trio byte stream (the native server's connection).

    One task may receive while others send: sends are serialized by a lock, and the receiver
    answers pings and the closing handshake itself."""

    def __init__(self, stream: Any, trailing: bytes = b"") -> None:
        self._stream = stream
        self._ws = Connection(ConnectionType.SERVER, trailing_data=trailing)
        self._send_lock = trio.Lock()
        self._parts: list[Any] = []
        self._size = 0
        self.closed = False

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        async with self._send_lock:
            await self._stream.send_all(data)

    async def send_text(self, text: str) -> None:
        if self.closed or self._ws.state is not ConnectionState.OPEN:
            raise trio.ClosedResourceError("the WebSocket is closed")
        try:
            await self._write(self._ws.send(TextMessage(data=text)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.closed = True
            raise trio.ClosedResourceError("the WebSocket's connection broke") from None

    async def receive(self) -> str | bytes | None:
        ws = self._ws
        while True:
            for event in ws.events():
                result = await self._handle(event)
                if result is not None:
                    return result
                if self.closed:
                    return None
            if self.closed:
                return None
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                self.closed = True
                return None
            try:
                ws.receive_data(data)
            except RemoteProtocolError:
                await self.close(1002, "protocol error")
                return None

    async def _handle(self, event: Any) -> str | bytes | None:
        ws = self._ws
        if isinstance(event, Ping):
            await self._write(ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            if ws.state is ConnectionState.REMOTE_CLOSING:
                try:
                    await self._write(ws.send(event.response()))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            self.closed = True
        elif isinstance(event, Message):
            self._size += len(event.data)
            if self._size > MAX_MESSAGE_BYTES:
                await self.close(CloseReason.MESSAGE_TOO_BIG, "message too big")
                return None
            self._parts.append(event.data)
            if event.message_finished:
                parts, self._parts, self._size = self._parts, [], 0
                joiner = "" if isinstance(event, TextMessage) else b""
                return joiner.join(parts)  # type: ignore[attr-defined]
        return None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        if self._ws.state is ConnectionState.OPEN:
            try:
                with trio.move_on_after(1):
                    await self._write(self._ws.send(CloseConnection(code=code, reason=reason)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


class StreamUpgrade:
    """The native server's :class:`WebSocketUpgrade`: writes the 101 or the rejection on the
    connection it was handed (``responder`` is that connection's, with keep-alive off)."""

    def __init__(self, req: Request, stream: Any, responder: Any, trailing: bytes) -> None:
        self.req = req
        self._stream = stream
        self._responder = responder
        self._trailing = trailing
        self.accepted = False

    def problem(self) -> str | None:
        return handshake_problem(self.req)

    async def accept(self, headers: Headers | None = None) -> StreamWebSocket:
        key = (self.req.header(b"sec-websocket-key") or b"").strip()
        head = [
            b"HTTP/1.1 101 Switching Protocols\r\n",
            b"upgrade: websocket\r\n",
            b"connection: Upgrade\r\n",
            b"sec-websocket-accept: " + generate_accept_token(key) + b"\r\n",
        ]
        head.extend(k + b": " + v + b"\r\n" for k, v in headers or ())
        head.append(b"\r\n")
        await self._stream.send_all(b"".join(head))
        self.accepted = True
        return StreamWebSocket(self._stream, self._trailing)

    async def reject(self, status: int, headers: Headers, body: bytes) -> None:
        await self._responder.send_full(status, headers, body)


# -- ASGI (hypercorn) ------------------------------------------------------------------------


class ASGIWebSocket:
    """A WebSocket over ASGI ``receive``/``send`` (hypercorn)."""

    def __init__(self, receive: Any, send: Any) -> None:
        self._receive = receive
        self._send = send
        self._lock = trio.Lock()
        self.closed = False

    async def send_text(self, text: str) -> None:
        if self.closed:
            raise trio.ClosedResourceError("the WebSocket is closed")
        try:
            async with self._lock:
                await self._send({"type": "websocket.send", "text": text})
        except Exception:  # hypercorn raises its own errors for a gone client
            self.closed = True
            raise trio.ClosedResourceError("the WebSocket's connection broke") from None

    async def receive(self) -> str | bytes | None:
        if self.closed:
            return None
        msg = await self._receive()
        if msg["type"] == "websocket.receive":
            text = msg.get("text")
            return text if text is not None else msg.get("bytes") or b""
        self.closed = True
        return None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        try:
            async with self._lock:
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except Exception:
            pass


class ASGIUpgrade:
    """The hypercorn path's :class:`WebSocketUpgrade`. A rejection is sent as ASGI's denial
    response when the server offers that extension, else as a close before accepting
    (hypercorn then answers 403)."""

    def __init__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self._scope = scope
        self._receive = receive
        self._send = send

    def problem(self) -> str | None:
        return None  # hypercorn checked the handshake

    async def accept(self, headers: Headers | None = None) -> ASGIWebSocket:
        msg = await self._receive()
        if msg["type"] != "websocket.connect":
            raise trio.ClosedResourceError("the client left before the handshake ended")
        await self._send({"type": "websocket.accept", "headers": list(headers or ())})
        return ASGIWebSocket(self._receive, self._send)

    async def reject(self, status: int, headers: Headers, body: bytes) -> None:
        msg = await self._receive()
        if msg["type"] != "websocket.connect":
            return
        if "websocket.http.response" in self._scope.get("extensions", {}):
            await self._send(
                {"type": "websocket.http.response.start", "status": status, "headers": headers}
            )
            await self._send({"type": "websocket.http.response.body", "body": body})
        else:
            await self._send({"type": "websocket.close", "code": 1008})
