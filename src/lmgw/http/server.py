"""The data-plane HTTP/1.1 server: trio sockets around the sans-IO :class:`H1Connection`.

See :class:`HTTPServer` for the concurrency design (one task per connection; disconnect watchers
and timeouts handled off the per-request path).

Why not hypercorn for this path: its trio worker costs ~530 us CPU per request here, this ~25 us
(DESIGN.md §3). hypercorn still serves the same handlers through :mod:`lmgw.http.asgi`.
"""

from __future__ import annotations

import errno
import heapq
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from trio.lowlevel import ParkingLot

from ..errors import error_body
from ..fdlimit import client_connections_allowed
from ..memtrim import LARGE_ANSWER_BYTES, HeapTrimmer
from ..netio import RawStream, peer_of
from .h1 import BODY, HEAD, IDLE, H1Connection, ProtocolError
from .h1parse import RequestParts, parse_request
from .types import AbortResponse, Handler, Headers, Request, TimeoutHandler, UpgradeRequest

log = logging.getLogger("lmgw.http")

_REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 202: "Accepted",
    204: "No Content",
    301: "Moved Permanently", 302: "Found", 304: "Not Modified", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 409: "Conflict", 413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content", 426: "Upgrade Required", 429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}  # fmt: skip
_STATUS_LINES = {s: b"HTTP/1.1 %d %s\r\n" % (s, r.encode()) for s, r in _REASONS.items()}

_date_cache = [0, b""]
#: the clock of connection phases and the watchdog (trio's SystemClock is this plus an offset,
#: reached through run-context lookups that cost more than the call; several per request)
_now = time.perf_counter


def _date_header() -> bytes:
    """``date: ...`` line, formatted at most once per second (formatting costs more than I/O)."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0] = now
        _date_cache[1] = (
            b"date: "
            + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
            + b"\r\n"
        )
    return _date_cache[1]


def build_head(status: int, headers: Headers, framing: bytes, keep_alive: bool) -> bytes:
    """Status line + headers + framing header (content-length / chunked) + blank line."""
    line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d %s\r\n" % (
        status,
        _REASONS.get(status, "Status").encode(),
    )
    parts = [line, _date_header()]
    for k, v in headers:
        parts.append(k + b": " + v + b"\r\n")
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(framing)
    return b"".join(parts)


def _request(parts: RequestParts, client: str) -> Request:
    """The :class:`Request` of a message :func:`parse_request` took (as H1Connection would
    build it: an HTTP/1.1 request, no upgrade)."""
    method, target, headers, body, keep_alive, _ = parts
    q = target.find(b"?")
    if q >= 0:
        path, query = target[:q].decode("latin-1"), target[q + 1 :].decode("latin-1")
    else:
        path, query = target.decode("latin-1"), ""
    return Request(method, path, query, headers, body, keep_alive, client, False)


_CHUNKED = b"transfer-encoding: chunked\r\n\r\n"
#: lingering close after an error answer: stop discarding input after this much silence
_LINGER_IDLE_S = 0.2


REFUSE_SLACK = 16
"""Connections over ``max_connections`` accepted at once only to be answered 503 and closed."""


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Connection limits; see docs/configuration.md (``limits.*``) for the reasons behind each."""

    max_header_bytes: int = 65536
    max_body_bytes: int = 32 << 20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 4096
    backlog: int = 1024
    #: a request running longer than this gets a disconnect watcher (see module docstring)
    watch_after_s: float = 0.02
    #: how often the watchdog arms watchers (and, every ~10 ticks, enforces timeouts)
    watchdog_interval_s: float = 0.02
    #: whole-request deadline (0: none). Enforced by the watchdog, not by a cancel scope per
    #: request: a trio CancelScope costs ~4-6 us to enter and leave, a fifth of a request here.
    request_timeout_s: float = 0.0
    #: a response write waiting this long for the client to read drops the connection (0: never)
    write_timeout_s: float = 60.0
    #: open connections per client address (0: no cap); over it: 429 and close
    max_connections_per_client: int = 0
    #: request bodies held at once, by their Content-Length (0: no cap); see _reserve_body
    max_buffered_body_bytes: int = 0


#: a whole response body above this is written after its head instead of joined to it (a copy
#: of a large body costs more than the second write), and reported to the heap trimmer
_JOIN_MAX = LARGE_ANSWER_BYTES


class _Responder:
    """The :class:`~lmgw.http.types.Responder` for one request on an HTTP/1.1 connection."""

    __slots__ = (
        "_head",
        "_head_only",
        "_http10",
        "_stream",
        "broken",
        "finished",
        "keep_alive",
        "started",
    )

    #: the process's heap trimmer (lmgw.memtrim), told of every large whole body sent: set by
    #: a serving HTTPServer that has one (the heap is the process's, whichever server used it)
    trimmer: HeapTrimmer | None = None

    def __init__(self, stream: RawStream, keep_alive: bool, head_only: bool, http10: bool):
        self._stream = stream
        self.keep_alive = keep_alive
        self._head_only = head_only
        self._http10 = http10
        self._head: bytes | None = None
        self.started = False
        self.finished = False
        self.broken = False

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        framing = b"content-length: %d\r\n\r\n" % len(body)
        if self._http10 and self.keep_alive:  # a 1.0 client closes unless told otherwise
            framing = b"connection: keep-alive\r\n" + framing
        head = build_head(status, headers, framing, self.keep_alive)
        if self._head_only:
            await self._stream.send_all(head)
        elif len(body) <= _JOIN_MAX:
            await self._stream.send_all(head + body)
        else:  # a large body is not copied to join the head, and its memory is accounted
            await self._stream.send_all(head)
            await self._stream.send_all(body)
            trimmer = _Responder.trimmer
            if trimmer is not None:
                trimmer.released(len(body))
        self.finished = True

    async def start(self, status: int, headers: Headers) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        if self._http10:  # no chunked encoding in HTTP/1.0: the body ends when we close
            self.keep_alive = False
            self._head = build_head(status, headers, b"\r\n", False)
        else:
            self._head = build_head(status, headers, _CHUNKED, self.keep_alive)

    async def send(self, data: bytes) -> None:
        if not data or self._head_only:
            return
        frame = data if self._http10 else b"%x\r\n%b\r\n" % (len(data), data)
        await self._write(frame)

    async def _write(self, data: bytes) -> None:
        """Write ``data``, preceded by the held-back head if it is still unsent."""
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        if self.broken:
            raise trio.BrokenResourceError("an earlier write on this response was interrupted")
        try:
            await self._stream.send_all(data)
        except BaseException:
            # cancelled or failed mid-write: the client may hold a partial frame, so nothing
            # more may be written to this response (a deadline's error event included)
            self.broken = True
            raise

    async def flush(self) -> None:
        """Write the held-back head of a started stream now, before its first chunk (the
        simulators' ``stream_head = "arrival"``: what uvicorn does for vLLM)."""
        if self._head is not None:
            await self._write(b"")

    def refuse_keep_alive(self) -> None:
        """Close the connection after this response (drain). A head built by ``start()`` but
        not written yet is amended, so the client learns it from the response itself."""
        if not self.keep_alive:
            return
        self.keep_alive = False
        head = self._head
        if head is not None and head.endswith(_CHUNKED):
            self._head = head[: -len(_CHUNKED)] + b"connection: close\r\n" + _CHUNKED

    @property
    def head_sent(self) -> bool:
        """Whether any byte of the response has been written."""
        return self.started and self._head is None

    def unstart(self) -> None:
        """Forget a ``start()`` whose head was never written, so that an error can be sent."""
        self.started = False
        self._head = None

    async def end(self, data: bytes = b"") -> None:
        tail = b"" if (self._http10 or self._head_only) else b"0\r\n\r\n"
        if data and not self._head_only:
            tail = (data if self._http10 else b"%x\r\n%b\r\n" % (len(data), data)) + tail
        if tail or self._head is not None:
            await self._write(tail)
        self.finished = True


class _Conn:
    """Per-connection state shared by the connection task, its watcher and the watchdog."""

    __slots__ = (
        "busy",
        "client",
        "handed",
        "phase",
        "phase_since",
        "request",
        "reserved",
        "responder",
        "scope",
        "stream",
        "timeout_status",
        "watch_done",
        "watch_scope",
    )

    def __init__(self, stream: RawStream, client: str) -> None:
        self.stream = stream
        self.client = client
        self.busy = False
        #: given to the compiled lane (its socket is the lane's now)
        self.handed = False
        #: body bytes this connection's request holds of the server's budget
        self.reserved = 0
        #: IDLE / HEAD / BODY while reading; the time that phase (or the running request) began
        self.phase = IDLE
        self.phase_since = _now()
        #: the request in progress and its responder (drain turns off its keep-alive)
        self.request: Request | None = None
        self.responder: _Responder | None = None
        #: cancels the whole connection: client gone, timeout, drain
        self.scope: trio.CancelScope | None = None
        #: set by the watchdog when it cancels for a timeout: the status to answer with (or 0)
        self.timeout_status = 0
        self.watch_scope: trio.CancelScope | None = None
        self.watch_done: trio.Event | None = None


class HTTPServer:
    """Serves ``handler`` on one or more listeners until cancelled or drained.

    One task per connection reads, parses and runs handlers in order (so pipelined requests are
    answered in order), with no per-request tasks, channels or cancel scopes: those cost more
    than the parsing itself. Two things need a second party, and get one only when needed:

    * *Client disconnects.* A request still running after ``watch_after_s`` gets a watcher task
      that waits for the socket to turn readable; EOF or a reset cancels the connection's scope,
      which cancels the handler and so closes its upstream connection (the abort reaches the
      worker). Short requests never pay for this; writes to a gone client fail by themselves.
    * *Timeouts* (head, body, idle keep-alive): a watchdog task checks every connection a few
      times a second and cancels those past their deadline (answering 408 where a request head
      or body was in progress), instead of a cancel scope around every read.

    Resource handling: every connection runs in this server's nursery and its socket is closed
    when its task ends. ``drain()`` stops accepting and closes idle keep-alive connections;
    requests in flight finish (their responses carry ``connection: close``).
    """

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits | None = None,
        on_timeout: TimeoutHandler | None = None,
        trimmer: HeapTrimmer | None = None,
        lane: Any = None,
    ) -> None:
        """``lane``: the decisions of the compiled lane (an :class:`lmgw.api.lane.LaneApp`):
        plain requests are then relayed by :mod:`lmgw.http.lane` (``server.compiled_lane``)."""
        self.handler = handler
        #: told of every body let go, to give the heap back after a burst (lmgw.memtrim)
        self.trimmer = trimmer if trimmer is not None and trimmer.enabled else None
        self.on_timeout = on_timeout or _default_on_timeout
        #: ``await handler.upgrade(request, lmgw.http.websocket.StreamUpgrade)`` for requests
        #: asking for a WebSocket (the dashboard's feed); None: they get a 400
        self.on_upgrade = getattr(handler, "upgrade", None)
        self.limits = limits or ServerLimits()
        self.draining = False
        self._conns: set[_Conn] = set()
        #: connections handed to ``on_upgrade`` (closed by drain: they never finish alone)
        self._upgraded: set[_Conn] = set()
        self._busy: set[_Conn] = set()
        #: the watchdog's nap while no request runs: a request or a new connection cancels it
        self._nap: trio.CancelScope | None = None
        #: how many times the watchdog woke (idle, it sleeps until there is work)
        self.watchdog_wakeups = 0
        #: client address -> open connections (kept only with max_connections_per_client)
        self._per_client: dict[str, int] = {}
        self._listeners: list[trio.SocketListener] = []
        self._idle_event = trio.Event()
        #: ``limits.max_connections``, capped by the open-files limit when serving starts
        self.max_connections = self.limits.max_connections
        self._open = 0  # accepted sockets not yet closed (served, or being refused)
        self._accept_lot = ParkingLot()  # the accept loops, waiting for a socket to close
        self.buffered_body_bytes = 0  # reserved by requests receiving or holding a body
        self._body_lot = ParkingLot()  # requests waiting for their body's reservation
        self.lane_app = lane
        #: the running compiled lane (lmgw.http.lane.Lane), while serving with one
        self.lane: Any = None

    @property
    def active_connections(self) -> int:
        lane = self.lane
        return len(self._conns) + (lane.clients if lane is not None else 0)

    @property
    def busy_connections(self) -> int:
        return len(self._busy)

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report the bound port through ``task_status``, and serve until cancelled."""
        self.max_connections = client_connections_allowed(self.limits.max_connections)
        if self.max_connections < self.limits.max_connections:
            log.warning(
                "limits.max_connections is %d, but the open-files limit holds about %d client"
                " connections with an upstream connection each: capped there (raise the limit:"
                ' docs/operations.md, "Open files")',
                self.limits.max_connections,
                self.max_connections,
            )
        self._listeners = await trio.open_tcp_listeners(
            port, host=host, backlog=self.limits.backlog
        )
        bound = self._listeners[0].socket.getsockname()[1]
        if self.trimmer is not None:
            _Responder.trimmer = self.trimmer
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watchdog, nursery)
                if self.lane_app is not None:
                    from .lane import Lane

                    self.lane = Lane(self, self.lane_app)
                    nursery.start_soon(self.lane.run, nursery)
                if self.trimmer is not None:
                    nursery.start_soon(self.trimmer.run)
                for listener in self._listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                task_status.started(bound)
        finally:
            if _Responder.trimmer is self.trimmer:
                _Responder.trimmer = None
            for listener in self._listeners:
                listener.socket.close()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while not self.draining:
            # Past the cap, the connections over it are answered 503 and closed; past the cap
            # and REFUSE_SLACK more, accepting stops until one closes, so a burst cannot take
            # the descriptors the connections being served need for their upstream ones.
            while self._open >= self.max_connections + REFUSE_SLACK and not self.draining:
                await self._accept_lot.park()
            try:
                stream = await listener.accept()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            except OSError as exc:  # EMFILE and friends: back off, as trio.serve_listeners does
                freed = self._close_idle(16) if exc.errno in (errno.EMFILE, errno.ENFILE) else 0
                log.error(
                    "accept failed: %s; %sretrying in %s",
                    exc,
                    f"closed {freed} idle keep-alive connections, " if freed else "",
                    "10 ms" if freed else "100 ms",
                )
                await trio.sleep(0.01 if freed else 0.1)
                continue
            try:
                raw = RawStream.from_trio(stream)
            except OSError:  # the peer already left
                continue
            self._open += 1
            lane = self.lane
            if lane is not None and self.active_connections < self.max_connections:
                per = self.limits.max_connections_per_client
                if not per:
                    lane.take(raw)  # the lane's now (it may hand it back: adopt)
                    continue
                client = peer_of(raw)
                address = client.rpartition(":")[0]
                open_now = self._per_client.get(address, 0)
                if open_now < per:  # counted until it closes, wherever it is by then
                    self._per_client[address] = open_now + 1
                    lane.take(raw, client)
                    continue
            nursery.start_soon(self._connection, raw)  # (over a limit: its error answer)

    def _uncount(self, address: str) -> None:
        """A connection counted under ``address`` (max_connections_per_client) closed."""
        left = self._per_client.get(address, 0) - 1
        if left > 0:
            self._per_client[address] = left
        else:
            self._per_client.pop(address, None)

    def lane_closed(self, clients: list[str]) -> None:
        """Connections of the lane closed, by client ("host:port"): they were counted open,
        and with ``max_connections_per_client`` per address, when accepted."""
        self._open -= len(clients)
        if self.limits.max_connections_per_client:
            for client in clients:
                self._uncount(client.rpartition(":")[0] if client else "")
        if self._accept_lot:
            self._accept_lot.unpark_all()
        if not self._conns and (self.lane is None or not self.lane.clients):
            self._idle_event.set()

    async def adopt(
        self,
        fd: int,
        client: str,
        pending: bytes,
        cont: Any,
        back: Callable[[], bool] | None = None,
    ) -> None:
        """Serve a connection the compiled lane handed back: ``pending``, the bytes it read
        and did not take; ``cont``, a request of the lane's to finish first (an
        :class:`lmgw.api.lane.Continuation`) or None; ``back``: the lane takes it back once
        it is between requests (as after a continuation) if ``back()`` says so then."""
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        await self._connection(
            RawStream(sock), client=client, pending=pending, first=cont, back=back
        )

    async def _reserve_body(self, c: _Conn, length: int, budget: int) -> None:
        """Reserve a body's declared length before reading it; while the bodies already
        held leave no room, wait unread (the client's upload stalls in TCP, the body timeout
        still runs). A whole reservation up front, not byte by byte: half-received uploads
        could otherwise fill the budget together and wait on each other for good. A body
        larger than the budget goes when nothing else is held. Chunked bodies (no length)
        reserve nothing: each is bounded by ``max_body_bytes``."""
        if length <= 0:
            return
        while budget and self.buffered_body_bytes and self.buffered_body_bytes + length > budget:
            await self._body_lot.park()
        self.buffered_body_bytes += length
        c.reserved = length

    def _release_body(self, c: _Conn) -> None:
        self.buffered_body_bytes -= c.reserved
        if self.trimmer is not None:
            self.trimmer.released(c.reserved)
        c.reserved = 0
        if self._body_lot:
            self._body_lot.unpark_all()  # each re-checks: several small ones may fit now

    def _close_idle(self, n: int) -> int:
        """Close the ``n`` connections idle the longest (out of descriptors: nginx does the
        same). A client sees its idle connection closed, as after the keep-alive timeout."""
        idle = [
            c
            for c in self._conns
            if not c.busy and c.phase == IDLE and c.scope is not None and c not in self._upgraded
        ]
        for c in heapq.nsmallest(n, idle, key=lambda c: c.phase_since):
            c.scope.cancel()  # type: ignore[union-attr]
        return min(n, len(idle))

    async def drain(self) -> None:
        """Stop accepting; close idle connections now and busy ones after their response."""
        self.draining = True
        self._accept_lot.unpark_all()
        if self.lane is not None:
            self.lane.drain()
        for listener in self._listeners:
            await listener.aclose()
        for c in list(self._upgraded):
            if c.scope is not None:
                c.scope.cancel()
        for c in list(self._conns):
            if c.busy:
                if c.responder is not None:
                    c.responder.refuse_keep_alive()
            elif c.scope is not None:
                c.scope.cancel()

    async def wait_idle(self) -> None:
        """Return when no connection is open (used by graceful shutdown)."""
        while self._conns or (self.lane is not None and self.lane.clients):
            self._idle_event = trio.Event()
            await self._idle_event.wait()

    # -- supervision ------------------------------------------------------------------------
    async def _watchdog(self, nursery: trio.Nursery) -> None:
        """Every ``watchdog_interval_s`` while requests run: arm disconnect watchers, end
        requests past their deadline or stalled writes; every ten intervals: the timeouts of
        connections between requests. With no request running it naps until that sweep is
        due (with no connection at all, until one comes), and the next request or connection
        wakes it: an idle gateway otherwise woke 50 times a second, ~1% of a core here."""
        lim = self.limits
        sweep_every = 10 * lim.watchdog_interval_s
        next_sweep = trio.current_time() + sweep_every
        while True:
            if self._busy:
                await trio.sleep(lim.watchdog_interval_s)
            else:
                with trio.CancelScope(deadline=next_sweep if self._conns else math.inf) as nap:
                    self._nap = nap
                    await trio.sleep_forever()
                self._nap = None
            self.watchdog_wakeups += 1
            now = _now()
            arm_before = now - lim.watch_after_s
            deadline_before = now - lim.request_timeout_s if lim.request_timeout_s else -math.inf
            stalled_before = now - lim.write_timeout_s if lim.write_timeout_s else -math.inf
            for c in self._busy:
                stalled = c.stream.stalled_since
                if stalled and stalled <= stalled_before and c.scope is not None:
                    # the client stopped reading the answer: drop it (the handler's cancel
                    # closes the worker's connection too)
                    log.info(
                        "client %s stopped reading for %gs: closed", c.client, lim.write_timeout_s
                    )
                    c.scope.cancel()
                    continue
                if (
                    c.phase_since <= deadline_before
                    and c.scope is not None
                    and c.request is not None
                ):
                    c.request.deadline_exceeded = True
                    c.timeout_status = 504
                    stream = c.request.stream_scope
                    if stream is not None and c.responder is not None and c.responder.started:
                        stream.cancel()  # its stream ends; the connection goes on
                    else:
                        c.scope.cancel()  # a 504 that says the connection closes
                    continue
                if c.watch_done is None and c.phase_since <= arm_before:
                    c.watch_scope = trio.CancelScope()
                    c.watch_done = trio.Event()
                    nursery.start_soon(self._watch, c, c.watch_scope, c.watch_done)
            if trio.current_time() < next_sweep:
                continue
            next_sweep = trio.current_time() + sweep_every
            for c in self._conns:
                if c.busy or c.scope is None:
                    continue
                if c.phase == IDLE:
                    if now - c.phase_since > lim.keepalive_timeout_s:
                        c.scope.cancel()  # idle keep-alive expired: close quietly
                elif c.phase == HEAD:
                    if now - c.phase_since > lim.header_timeout_s:
                        c.timeout_status = 408
                        c.scope.cancel()
                elif now - c.phase_since > lim.body_timeout_s:
                    c.timeout_status = 408
                    c.scope.cancel()

    @staticmethod
    async def _watch(c: _Conn, scope: trio.CancelScope, done: trio.Event) -> None:
        """Wait until the client's socket is readable: EOF or reset means the client is gone."""
        try:
            with scope:
                sock = c.stream.socket
                while True:
                    # The connection may have closed its socket before this task first ran
                    # (spawned in the same tick). Never wait on a closed socket: trio would
                    # register fd -1, and every later wait on fd -1 raises BusyResourceError.
                    # No checkpoint between this check and the registration below.
                    if c.stream.closed or sock.fileno() < 0:
                        return
                    try:
                        await trio.lowlevel.wait_readable(sock)
                    except (OSError, ValueError, trio.ClosedResourceError, trio.BusyResourceError):
                        return
                    try:
                        peek = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue  # spurious wake-up
                    except OSError:
                        peek = b""
                    break
                if not peek and c.scope is not None:
                    c.scope.cancel()
                # else: a pipelined request is waiting; the connection task reads it later
        finally:
            done.set()

    # -- one connection ----------------------------------------------------------------------
    async def _connection(
        self,
        stream: RawStream,
        *,
        client: str | None = None,
        pending: bytes = b"",
        first: Any = None,
        back: Callable[[], bool] | None = None,
    ) -> None:
        """Serve one connection (``client`` given: one the lane handed back, already admitted,
        with ``pending``, ``first`` and ``back``: see :meth:`adopt`)."""
        lim = self.limits
        adopted = client is not None
        if client is None:
            client = peer_of(stream)
        c = _Conn(stream, client)
        counted: str | None = None  # the address this connection is counted under
        try:
            if not adopted and len(self._conns) >= self.max_connections:
                with trio.move_on_after(1):
                    await self._send_error(stream, ProtocolError(503, "too many connections"))
                return
            if lim.max_connections_per_client and adopted:  # counted when accepted
                counted = client.rpartition(":")[0]
            elif lim.max_connections_per_client:
                address = client.rpartition(":")[0]
                open_now = self._per_client.get(address, 0)
                if open_now >= lim.max_connections_per_client:
                    with trio.move_on_after(1):
                        await self._send_error(
                            stream,
                            ProtocolError(
                                429,
                                f"too many connections from this address (at most"
                                f" {lim.max_connections_per_client})",
                            ),
                        )
                    return
                self._per_client[address] = open_now + 1
                counted = address
            self._conns.add(c)
            if self._nap is not None:  # its head and idle timeouts need the sweeps
                self._nap.cancel()
            with trio.CancelScope() as c.scope:
                await self._serve_connection(c, pending, first, back)
            if c.timeout_status == 504 and c.request is not None and c.responder is not None:
                if not c.responder.started:  # the connection ends with this answer: say so
                    c.responder.keep_alive = False
                # (an answer already whole: the deadline ended only the handler's rest)
                if not c.responder.broken and not c.responder.finished:
                    with trio.move_on_after(1):
                        await self.on_timeout(c.request, c.responder)
            elif c.timeout_status:
                what = "request head" if c.phase == HEAD else "request body"
                with trio.move_on_after(1):
                    await self._send_error(
                        stream, ProtocolError(c.timeout_status, f"timed out receiving the {what}")
                    )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if counted is not None and not c.handed:  # (back in the lane: counted there)
                self._uncount(counted)
            c.scope = None
            c.request = c.responder = None  # whoever still holds ``c`` holds no body
            self._busy.discard(c)
            self._conns.discard(c)
            if c.watch_scope is not None:
                c.watch_scope.cancel()
            if not self._conns and (self.lane is None or not self.lane.clients):
                self._idle_event.set()
            if c.reserved:  # gone mid-upload
                self._release_body(c)
            if not c.handed:
                stream.close()
                self._open -= 1
                if self._accept_lot:
                    self._accept_lot.unpark()

    @staticmethod
    async def _send_error(stream: RawStream, err: ProtocolError) -> None:
        """Answer ``err`` and close gracefully (callers bound the whole in time).

        Lingering close, as nginx does: half-close, then discard what the client is still
        sending until it stops. Closing with unread input makes the kernel send a reset, which
        can destroy the answer before the client reads it (a 413 to a client that writes its
        whole body before reading, a 408 to one still trickling its head, a 503).
        """
        body = error_body(err.status, err.message)
        head = build_head(
            err.status,
            [(b"content-type", b"application/json")],
            b"content-length: %d\r\n\r\n" % len(body),
            False,
        )
        await stream.send_all(head + body)
        try:
            stream.socket.shutdown(socket.SHUT_WR)
        except OSError:
            return
        while True:
            with trio.move_on_after(_LINGER_IDLE_S) as quiet:
                data = await stream.receive_some(65536)
            if quiet.cancelled_caught or not data:
                return

    async def _serve_connection(
        self,
        c: _Conn,
        pending: bytes = b"",
        first: Any = None,
        back: Callable[[], bool] | None = None,
    ) -> None:
        promote = first is not None
        stream = c.stream
        lim = self.limits
        conn = H1Connection(lim.max_header_bytes, lim.max_body_bytes, c.client)
        max_head, max_body = lim.max_header_bytes, lim.max_body_bytes
        handler = self.handler
        busy = self._busy
        budget = lim.max_buffered_body_bytes
        reserve = bool(budget or self.trimmer)  # (the trimmer counts what was reserved)
        answered = False
        while True:
            run = handler
            midstream = None
            if first is not None:  # the lane's request, to finish here
                ev, run, started = first.request, first.run, first.t0
                if first.midstream:  # its stream began in the lane: the rest goes on here
                    midstream = first.unsent
                first = None
            else:
                ev = conn.next_event()
                started = 0.0
            if ev is None:
                if conn.expect_continue:
                    # the head asking for it is complete and every earlier pipelined request
                    # is answered: the 100 goes out in order, and before we wait for the body
                    conn.continue_sent()
                    await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                if pending:  # read by the lane before it handed the connection back
                    data, pending = pending, b""
                elif answered:
                    # The client reads our answer before it sends its next request: wait for
                    # it first instead of failing a receive (and raising EAGAIN) every time.
                    answered = False
                    data = await stream.receive_reply(65536)
                else:
                    data = await stream.receive_some(65536)
                if not data:
                    return
                # A whole simple request in one read (nearly all of them) in one call; the
                # rest, and any request that follows one split across reads, via httptools.
                # (conn is idle here: no event queued, no message begun.)
                parts = parse_request(data, max_head, max_body) if conn.state == IDLE else None
                if parts is None:
                    conn.receive_data(data)
                    state = conn.state
                    if state != c.phase:
                        c.phase = state
                        c.phase_since = _now()
                        if state == BODY and reserve and not c.reserved:
                            await self._reserve_body(c, conn.content_length, budget)
                    continue
                ev = _request(parts, c.client)
            if ev.__class__ is not Request:  # (one test for the two rare kinds of event)
                if isinstance(ev, ProtocolError):
                    with trio.move_on_after(1):
                        await self._send_error(stream, ev)
                elif isinstance(ev, UpgradeRequest):
                    await self._upgrade(c, ev)
                return
            responder = _Responder(
                stream, ev.keep_alive and not self.draining, ev.method == "HEAD", ev.http10
            )
            if midstream is not None:  # the head is out: chunks from here, after the unsent
                responder.started = True
            c.responder = responder
            c.request = ev
            c.busy = True
            c.phase_since = started or _now()  # (the lane's request: its deadline runs on)
            busy.add(c)
            if self._nap is not None:  # the watchdog naps: this request needs it awake
                self._nap.cancel()
            try:
                if midstream:
                    await stream.send_all(midstream)
                await run(ev, responder)
            except (trio.BrokenResourceError, trio.ClosedResourceError, AbortResponse):
                return
            except Exception:
                log.exception("handler failed on %s %s", ev.method, ev.path)
                if responder.head_sent:
                    return  # a half-sent response: closing is the only honest signal
                responder.unstart()  # nothing written yet: a clean 500 is still possible
                await responder.send_full(
                    500,
                    [(b"content-type", b"application/json")],
                    error_body(500, "internal gateway error"),
                )
            finally:
                # the idle timers run from the answer's end: the watchdog's sweep may come
                # before this loop's next turn (while the watcher retires, below), and a
                # request longer than keepalive_timeout_s must not look idle that long
                c.phase_since = _now()
                busy.discard(c)
                c.busy = False
                if c.reserved:
                    self._release_body(c)
            if c.watch_done is not None:  # a watcher is waiting on our socket: retire it first
                c.watch_scope.cancel()
                await c.watch_done.wait()
                c.watch_done = c.watch_scope = None
            if c.timeout_status == 504:  # its deadline ended its stream (request.stream_scope)
                c.timeout_status = 0
                if not responder.finished and not responder.broken:
                    with trio.move_on_after(1):  # the stream's end: an error event
                        await self.on_timeout(ev, responder)
                if not responder.finished or responder.broken:
                    return
            c.phase = conn.state
            c.phase_since = _now()
            if not responder.finished:
                if responder.head_sent:
                    return
                responder.unstart()
                log.error("handler returned without responding to %s %s", ev.method, ev.path)
                await responder.send_full(
                    500,
                    [(b"content-type", b"application/json")],
                    error_body(500, "no response produced"),
                )
            if not responder.keep_alive or self.draining:
                return
            # An idle keep-alive connection must not keep its last request alive: the body
            # (up to max_body_bytes) would stay in memory until the client's next request.
            c.request = c.responder = None
            ev = parts = responder = None  # type: ignore[assignment]
            answered = True
            lane = self.lane
            if (
                (promote or (back is not None and back()))
                and lane is not None
                and conn.state == IDLE
                and not conn.events
                and not pending
            ):  # between requests, nothing read ahead: back to the compiled lane
                # (only a connection the lane handed over mid-request or for a passing reason:
                # one whose requests it does not take stays here, instead of crossing over
                # and back each time)
                c.handed = True
                lane.take(stream, back=True)
                return

    async def _upgrade(self, c: _Conn, req: UpgradeRequest) -> None:
        """Hand the connection to the application's ``upgrade`` hook (a WebSocket). It is
        neither idle (no keep-alive timeout) nor a request in flight (no deadline, no
        disconnect watcher: the WebSocket reads its own socket); drain closes it."""
        from .websocket import StreamUpgrade

        responder = _Responder(c.stream, False, False, req.http10)
        if self.on_upgrade is None:
            await responder.send_full(
                400,
                [(b"content-type", b"application/json")],
                error_body(400, "protocol upgrades are not supported"),
            )
            return
        c.busy = True
        self._upgraded.add(c)
        try:
            await self.on_upgrade(req, StreamUpgrade(req, c.stream, responder, req.trailing))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("upgrade handler failed on %s", req.path)
        finally:
            self._upgraded.discard(c)
            c.busy = False


async def _default_on_timeout(request: Request, responder: _Responder) -> None:
    msg = "request exceeded the server's deadline"
    if not responder.head_sent:
        responder.unstart()
        await responder.send_full(
            504, [(b"content-type", b"application/json")], error_body(504, msg)
        )
    else:
        await responder.end()


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
