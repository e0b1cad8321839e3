"""The same handlers as an ASGI application, served by hypercorn[trio] for TLS and HTTP/2.

The native server is the fast data plane; this adapter exists for what hypercorn does well
(``lmgw serve --server hypercorn``). A client disconnect (``http.disconnect``) cancels the
handler exactly as the native server does, so cancellation reaches the workers either way.
"""

from __future__ import annotations

from typing import Any

import trio

from ..errors import error_body
from ..memtrim import LARGE_ANSWER_BYTES, HeapTrimmer
from .types import Handler, Headers, Request, TimeoutHandler

Scope = dict[str, Any]


class _ASGIResponder:
    """Responder over ASGI ``send``. ``finishing`` turns True just before the last body message:
    hypercorn answers that message by closing the stream, which delivers ``http.disconnect`` to
    the receiver, and that one must not be taken for the client going away."""

    __slots__ = ("_head", "_send", "client_gone", "finished", "finishing", "started", "trimmer")

    def __init__(self, send, trimmer: HeapTrimmer | None = None) -> None:
        self._send = send
        self.trimmer = trimmer
        self._head: dict | None = None
        self.started = False
        self.finishing = False
        self.finished = False
        self.client_gone = False

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", b"%d" % len(body))],
            }
        )
        self.finishing = True
        await self._send({"type": "http.response.body", "body": body, "more_body": False})
        if self.trimmer is not None and len(body) > LARGE_ANSWER_BYTES:
            self.trimmer.released(len(body))
        self.finished = True

    async def start(self, status: int, headers: Headers) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self._head = {"type": "http.response.start", "status": status, "headers": list(headers)}

    async def send(self, data: bytes) -> None:
        if not data:
            return
        if self._head is not None:
            head, self._head = self._head, None
            await self._send(head)
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes = b"") -> None:
        if self._head is not None:
            head, self._head = self._head, None
            await self._send(head)
        self.finishing = True
        await self._send({"type": "http.response.body", "body": data, "more_body": False})
        self.finished = True


class ASGIAdapter:
    """Wraps a :data:`~lmgw.http.types.Handler` as an ASGI 3 application."""

    def __init__(
        self,
        handler: Handler,
        max_body_bytes: int = 32 << 20,
        request_timeout_s: float = 0.0,
        on_timeout: TimeoutHandler | None = None,
        trimmer: HeapTrimmer | None = None,
    ) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        #: told of every request body let go and every large whole answer (lmgw.memtrim)
        self.trimmer = trimmer if trimmer is not None and trimmer.enabled else None
        #: whole-request deadline (0: none); answered by ``on_timeout`` like the native server
        self.request_timeout_s = request_timeout_s
        self.on_timeout = on_timeout

    async def __call__(self, scope: Scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind == "websocket":
            await self._websocket(scope, receive, send)
            return
        if kind != "http":
            return
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if len(body) > self.max_body_bytes:
                payload = error_body(413, f"request body exceeds {self.max_body_bytes} bytes")
                await _ASGIResponder(send).send_full(
                    413, [(b"content-type", b"application/json")], payload
                )
                return
            if not msg.get("more_body", False):
                break
        client = scope.get("client") or ("", 0)
        req = Request(
            scope["method"],
            scope["path"],
            scope.get("query_string", b"").decode("latin-1"),
            [(k.lower(), v) for k, v in scope["headers"]],
            bytes(body),
            True,
            f"{client[0]}:{client[1]}",
        )
        responder = _ASGIResponder(send, self.trimmer)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope, responder)
                if self.request_timeout_s:
                    nursery.start_soon(self._deadline, req, nursery.cancel_scope)
                try:
                    await self.handler(req, responder)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            if self.trimmer is not None:
                self.trimmer.released(len(req.body))
        if responder.client_gone:
            return  # nobody to answer
        if req.deadline_exceeded and self.on_timeout is not None and not responder.finished:
            await self.on_timeout(req, responder)
        if not responder.started:
            await responder.send_full(
                500,
                [(b"content-type", b"application/json")],
                error_body(500, "no response produced"),
            )
        elif not responder.finished:
            await responder.end()

    async def _websocket(self, scope: Scope, receive, send) -> None:
        """A WebSocket request goes to the handler's ``upgrade`` hook, as on the native
        server (the dashboard's feed); without one it is refused."""
        from .websocket import ASGIUpgrade

        hook = getattr(self.handler, "upgrade", None)
        upgrade = ASGIUpgrade(scope, receive, send)
        if hook is None:
            await upgrade.reject(400, [], b"")
            return
        client = scope.get("client") or ("", 0)
        headers = [(k.lower(), v) for k, v in scope["headers"]]
        if not any(k == b"upgrade" for k, _ in headers):  # HTTP/2 extended CONNECT has none
            headers.append((b"upgrade", b"websocket"))
        req = Request(
            "GET",
            scope["path"],
            scope.get("query_string", b"").decode("latin-1"),
            headers,
            b"",
            False,
            f"{client[0]}:{client[1]}",
        )
        await hook(req, upgrade)

    async def _deadline(self, req: Request, scope: trio.CancelScope) -> None:
        await trio.sleep(self.request_timeout_s)
        req.deadline_exceeded = True
        scope.cancel()

    @staticmethod
    async def _watch_disconnect(
        receive, scope: trio.CancelScope, responder: _ASGIResponder
    ) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                if not responder.finishing:  # else: hypercorn closing the finished stream
                    responder.client_gone = True
                    scope.cancel()
                return


async def serve_hypercorn(
    handler: Handler,
    cfg,
    stop: trio.Event | None = None,
    trimmer: HeapTrimmer | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` with hypercorn[trio] per the gateway config; reports the bound port.

    Setting ``stop`` shuts hypercorn down gracefully (it stops accepting and waits up to
    ``server.graceful_shutdown_s`` for requests in flight); then this returns. ``trimmer``
    gives the heap back after bursts of large bodies, as on the native server."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    hc = Config()
    hc.bind = [f"{cfg.server.host}:{cfg.server.port}"]
    hc.keep_alive_timeout = cfg.limits.keepalive_timeout_s
    hc.h11_max_incomplete_size = cfg.limits.max_header_bytes
    hc.backlog = cfg.server.backlog
    hc.graceful_timeout = cfg.server.graceful_shutdown_s
    hc.accesslog = None
    hc.errorlog = None
    if cfg.server.certfile:
        hc.certfile = cfg.server.certfile
        hc.keyfile = cfg.server.keyfile
    app = ASGIAdapter(
        handler,
        cfg.limits.max_body_bytes,
        cfg.limits.request_timeout_s,
        getattr(handler, "on_timeout", None),
        trimmer,
    )
    trigger = stop.wait if stop is not None else None
    async with trio.open_nursery() as nursery:
        if app.trimmer is not None:
            nursery.start_soon(app.trimmer.run)

        async def _serve(*, task_status: trio.TaskStatus[Any]) -> None:
            try:
                await serve(app, hc, shutdown_trigger=trigger, task_status=task_status)
            finally:
                nursery.cancel_scope.cancel()  # hypercorn is done: so is the trimmer

        binds = await nursery.start(_serve)
        port = int(binds[0].rsplit(":", 1)[1])
        task_status.started(port)
