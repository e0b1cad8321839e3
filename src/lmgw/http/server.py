"""The data-plane HTTP/1.1 server: trio sockets around the sans-IO :class:`H1Connection`.

Per connection there are two tasks with one owner (the connection's nursery): a *reader* that
feeds the parser, enforces the head/body/idle timeouts and notices a client that goes away, and a
*responder loop* that runs handlers one request at a time, so pipelined requests are answered in
order. When the reader sees EOF or a reset while a handler runs, it cancels that handler's scope:
that is how a disconnect reaches the upstream request (which then closes its worker connection).

Why not hypercorn for this path: its trio worker costs ~530 us CPU per request here, this ~30 us
(DESIGN.md §3). hypercorn still serves the same handlers through :mod:`lmgw.http.asgi`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import trio

from ..errors import error_body
from .h1 import BODY, HEAD, IDLE, H1Connection, ProtocolError
from .types import Handler, Headers, Request

log = logging.getLogger("lmgw.http")

_REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
    301: "Moved Permanently", 302: "Found", 304: "Not Modified", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 409: "Conflict", 413: "Content Too Large", 415: "Unsupported Media Type",
    422: "Unprocessable Content", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    499: "Client Closed Request", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}  # fmt: skip
_STATUS_LINES = {s: b"HTTP/1.1 %d %s\r\n" % (s, r.encode()) for s, r in _REASONS.items()}

_date_cache = [0, b""]


def _date_header() -> bytes:
    """``date: ...`` line, formatted at most once per second (formatting costs more than I/O)."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0] = now
        _date_cache[1] = b"date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode() + b"\r\n"
    return _date_cache[1]


def build_head(status: int, headers: Headers, framing: bytes, keep_alive: bool) -> bytes:
    """Status line + headers + framing header (content-length / chunked) + blank line."""
    line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, "Status").encode())
    parts = [line, _date_header()]
    for k, v in headers:
        parts.append(k + b": " + v + b"\r\n")
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(framing)
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Connection limits; see docs/configuration.md (``limits.*``) for the reasons behind each."""

    max_header_bytes: int = 65536
    max_body_bytes: int = 32 << 20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 75.0
    max_pipelined_requests: int = 32
    max_connections: int = 4096
    backlog: int = 1024


class _Responder:
    """The :class:`~lmgw.http.types.Responder` for one request on an HTTP/1.1 connection."""

    __slots__ = ("_head", "_head_only", "_http10", "_stream", "finished", "keep_alive", "started")

    def __init__(self, stream: trio.SocketStream, keep_alive: bool, head_only: bool, http10: bool):
        self._stream = stream
        self.keep_alive = keep_alive
        self._head_only = head_only
        self._http10 = http10
        self._head: bytes | None = None
        self.started = False
        self.finished = False

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        head = build_head(status, headers, b"content-length: %d\r\n\r\n" % len(body), self.keep_alive)
        await self._stream.send_all(head if self._head_only else head + body)
        self.finished = True

    async def start(self, status: int, headers: Headers) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        if self._http10:  # no chunked encoding in HTTP/1.0: the body ends when we close
            self.keep_alive = False
            self._head = build_head(status, headers, b"\r\n", False)
        else:
            self._head = build_head(status, headers, b"transfer-encoding: chunked\r\n\r\n", self.keep_alive)

    async def send(self, data: bytes) -> None:
        if not data or self._head_only:
            return
        frame = data if self._http10 else b"%x\r\n%b\r\n" % (len(data), data)
        head = self._head
        if head is not None:
            self._head = None
            frame = head + frame
        await self._stream.send_all(frame)

    async def end(self) -> None:
        tail = b"" if (self._http10 or self._head_only) else b"0\r\n\r\n"
        head = self._head
        if head is not None:
            self._head = None
            tail = head + tail
        if tail:
            await self._stream.send_all(tail)
        self.finished = True


class _ConnState:
    __slots__ = ("busy", "nursery", "scope")

    def __init__(self) -> None:
        self.busy = False
        self.scope: trio.CancelScope | None = None
        self.nursery: trio.Nursery | None = None


class HTTPServer:
    """Serves ``handler`` on one or more listeners until cancelled or drained.

    Resource handling: every connection runs in this server's nursery and is closed when its
    tasks end. ``drain()`` stops accepting and closes idle keep-alive connections; requests in
    flight finish (their responses carry ``connection: close``) until the caller cancels.
    """

    def __init__(self, handler: Handler, limits: ServerLimits | None = None) -> None:
        self.handler = handler
        self.limits = limits or ServerLimits()
        self.draining = False
        self._conns: set[_ConnState] = set()
        self._listeners: list[trio.SocketListener] = []
        self._idle_event = trio.Event()

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    @property
    def busy_connections(self) -> int:
        return sum(1 for c in self._conns if c.busy)

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report the bound port through ``task_status``, and serve until cancelled."""
        self._listeners = await trio.open_tcp_listeners(port, host=host, backlog=self.limits.backlog)
        bound = self._listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                for listener in self._listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                task_status.started(bound)
        finally:
            for listener in self._listeners:
                listener.socket.close()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while not self.draining:
            try:
                stream = await listener.accept()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            except OSError as exc:  # EMFILE and friends: back off, as trio.serve_listeners does
                log.error("accept failed: %s; retrying in 100 ms", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._connection, stream)

    async def drain(self) -> None:
        """Stop accepting; close idle connections now and busy ones after their response."""
        self.draining = True
        for listener in self._listeners:
            await listener.aclose()
        for st in list(self._conns):
            if not st.busy and st.nursery is not None:
                st.nursery.cancel_scope.cancel()

    async def wait_idle(self) -> None:
        """Return when no connection is open (used by graceful shutdown)."""
        while self._conns:
            self._idle_event = trio.Event()
            await self._idle_event.wait()

    # -- one connection ----------------------------------------------------------------------
    async def _connection(self, stream: trio.SocketStream) -> None:
        lim = self.limits
        st = _ConnState()
        try:
            try:
                peer = stream.socket.getpeername()
                client = f"{peer[0]}:{peer[1]}"
            except OSError:
                client = ""
            if len(self._conns) >= lim.max_connections:
                body = error_body(503, "too many connections")
                head = build_head(503, [(b"content-type", b"application/json")], b"content-length: %d\r\n\r\n" % len(body), False)
                with trio.move_on_after(1):
                    await stream.send_all(head + body)
                return
            self._conns.add(st)
            conn = H1Connection(lim.max_header_bytes, lim.max_body_bytes, client)
            send, recv = trio.open_memory_channel[Request | ProtocolError](lim.max_pipelined_requests)
            async with trio.open_nursery() as nursery:
                st.nursery = nursery
                nursery.start_soon(self._reader, stream, conn, send, st)
                await self._respond_loop(stream, recv, st)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._conns.discard(st)
            if not self._conns:
                self._idle_event.set()
            stream.socket.close()

    async def _reader(
        self,
        stream: trio.SocketStream,
        conn: H1Connection,
        send: trio.MemorySendChannel[Request | ProtocolError],
        st: _ConnState,
    ) -> None:
        lim = self.limits
        phase_state = IDLE
        phase_deadline = math.inf
        with send:
            while True:
                state = conn.state
                if state == IDLE:
                    deadline = math.inf if st.busy else trio.current_time() + lim.keepalive_timeout_s
                else:
                    if state != phase_state:
                        phase_state = state
                        timeout = lim.header_timeout_s if state == HEAD else lim.body_timeout_s
                        phase_deadline = trio.current_time() + timeout
                    deadline = phase_deadline
                try:
                    with trio.move_on_at(deadline) as cs:
                        data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if cs.cancelled_caught:
                    if conn.state == IDLE:
                        if st.busy or not send.statistics().current_buffer_used == 0:
                            continue
                        if st.nursery is not None:  # idle keep-alive expired: just close
                            st.nursery.cancel_scope.cancel()
                        return
                    what = "request head" if conn.state == HEAD else "request body"
                    await send.send(ProtocolError(408, f"timed out receiving the {what}"))
                    return
                if not data:  # EOF or reset: the client is gone
                    if st.scope is not None:
                        st.scope.cancel()
                    return
                conn.receive_data(data)
                if conn.state != phase_state and conn.state == IDLE:
                    phase_state = IDLE
                while (ev := conn.next_event()) is not None:
                    await send.send(ev)
                    if isinstance(ev, ProtocolError) or not ev.keep_alive:
                        return
                if conn.expect_continue and not st.busy and send.statistics().current_buffer_used == 0:
                    conn.continue_sent()
                    await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def _respond_loop(
        self,
        stream: trio.SocketStream,
        recv: trio.MemoryReceiveChannel[Request | ProtocolError],
        st: _ConnState,
    ) -> None:
        handler = self.handler
        async for ev in recv:
            if isinstance(ev, ProtocolError):
                body = error_body(ev.status, ev.message)
                head = build_head(ev.status, [(b"content-type", b"application/json")], b"content-length: %d\r\n\r\n" % len(body), False)
                with trio.move_on_after(1):
                    await stream.send_all(head + body)
                return
            responder = _Responder(stream, ev.keep_alive and not self.draining, ev.method == "HEAD", ev.http10)
            st.busy = True
            gone = False
            with trio.CancelScope() as scope:
                st.scope = scope
                try:
                    await handler(ev, responder)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    gone = True
                except Exception:
                    log.exception("handler failed on %s %s", ev.method, ev.path)
                    if responder.started:
                        return  # a half-sent response: closing is the only honest signal
                    await responder.send_full(
                        500, [(b"content-type", b"application/json")], error_body(500, "internal gateway error")
                    )
            st.scope = None
            st.busy = False
            if gone or scope.cancelled_caught:
                return
            if not responder.finished:
                if responder.started:
                    return
                log.error("handler returned without responding to %s %s", ev.method, ev.path)
                await responder.send_full(
                    500, [(b"content-type", b"application/json")], error_body(500, "no response produced")
                )
            if not responder.keep_alive or self.draining:
                return


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    **limits: float,
) -> None:
    """Serve ``handler`` on host:port (0 picks a free port, reported through ``task_status``)."""
    server = HTTPServer(handler, ServerLimits(**limits))  # type: ignore[arg-type]
    await server.serve(host, port, task_status=task_status)
