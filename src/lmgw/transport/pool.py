"""Pooled keep-alive HTTP/1.1 client on trio streams (the upstream side of the gateway).

Why our own: httpx under trio costs ~1,140 us CPU per request here, this ~30 us (DESIGN.md §3).
Per origin the pool keeps a LIFO stack of idle connections: checkout is O(1), the warmest socket
is reused first, and cold ones age out. A response owns its connection until :meth:`release`:
a complete keep-alive response returns it to the pool, anything else (cancellation, a half-read
body, an error) closes the socket, which is also how an abandoned request is aborted upstream.
"""

from __future__ import annotations

import contextlib
import errno
import math
import select
import ssl
import time
from dataclasses import dataclass
from typing import Any

import trio

from ..http.h1parse import ResponseParts, parse_response
from ..http.types import Headers
from ..netio import RawStream, connect_tcp
from .h1client import ResponseReader, UpstreamProtocolError, build_request_head

_NO_SCOPE = contextlib.nullcontext()
_JOIN_MAX = 256 << 10
"""Bodies up to this size are sent joined to the request head (one write)."""
#: the pool's clock for idle ages: the monotonic clock trio's own is built on, without the
#: run-context lookups (called twice per request)
_now = time.perf_counter
#: readable (EOF or stray bytes), peer hung up, or error: an idle connection not to reuse
_POLL_CLOSED = select.POLLIN | select.POLLRDHUP | select.POLLHUP | select.POLLERR


#: connect failures that are the gateway host's: out of descriptors (process, system), of
#: buffers or memory, of ephemeral ports
LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)


def _local_failure(exc: OSError) -> bool:
    """Whether a failed connect failed on the gateway's host (:data:`LOCAL_ERRNOS`): the
    error itself, or every attempt behind trio's "all attempts to connect ... failed"."""
    if exc.errno is not None:
        return exc.errno in LOCAL_ERRNOS
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        _, rest = cause.split(lambda e: isinstance(e, OSError) and e.errno in LOCAL_ERRNOS)
        return rest is None
    return isinstance(cause, OSError) and cause.errno in LOCAL_ERRNOS


def request_message(
    origin: Origin, method: str, path: str, headers: Headers, body: bytes | None
) -> tuple[bytes, bytes | None]:
    """The head and body of a request to ``origin`` (a data-parallel rank's pinned)."""
    fixed = origin.fixed
    if fixed:  # a rank's origin: pinned (a client's own rank header does not follow)
        headers = [h for h in headers if h[0] not in _FIXED_NAMES]
        if body and path.endswith("/generate"):
            body = pin_to_rank(body, origin.rank)  # type: ignore[arg-type]
    head = build_request_head(
        method, path, origin.host_header, headers, None if body is None else len(body), fixed
    )
    return head, body


class UpstreamError(Exception):
    """The worker could not be reached or broke the exchange.

    ``retryable`` is True when the worker cannot have started on the request (connect failure,
    refused, a reused keep-alive socket found dead before any response byte), so trying another
    worker is safe. ``status`` is what the client should see if we give up: 502, or 504 on timeouts.
    ``sent``: the request was written to the worker, which may have acted on it before failing
    (a decode worker may have pulled a hand-off's KV, which the prefill worker then frees) even
    when another worker may take the request (``retryable``: the worker is gone).
    ``local``: the gateway itself could not open the connection (its open-files limit, its
    ephemeral ports, memory): 503, not the worker's fault, so nobody ejects the worker for it
    and no other worker is tried (it would meet the same limit).
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        status: int = 502,
        sent: bool = True,
        local: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.sent = sent
        self.local = local

    @property
    def kind(self) -> str:
        """``lmgw_upstream_errors_total``'s ``kind``: ``local`` (the gateway's own limit),
        ``timeout`` or ``transport``."""
        if self.local:
            return "local"
        return "timeout" if self.status == 504 else "transport"


#: header names an origin may fix (``Origin.fixed``): never sent twice
_FIXED_NAMES = frozenset({b"x-data-parallel-rank"})


def pin_to_rank(body: bytes, rank: int) -> bytes:
    """A native ``/generate`` body pinned to data-parallel ``rank``: SGLang's ``/generate``
    reads no ``X-data-parallel-rank`` header, only the body's ``routed_dp_rank`` (and, in
    older releases, ``data_parallel_rank``), so both go in, last (a client's own do not
    win). Bytes that are not a JSON object are left as they are (the worker answers 400)."""
    end = body.rstrip()
    if not end.endswith(b"}") or not body.lstrip().startswith(b"{"):
        return body
    inner = end[:-1].rstrip()
    sep = b"" if inner.endswith(b"{") else b","
    return b'%s%s"routed_dp_rank":%d,"data_parallel_rank":%d}' % (inner, sep, rank, rank)


class Origin:
    """A worker address with its idle-connection stack. Hashable by identity; one per worker."""

    __slots__ = (
        "fixed", "host", "host_header", "idle", "port", "rank", "scheme", "slot", "waiting",
    )  # fmt: skip

    def __init__(self, host: str, port: int, scheme: str = "http", rank: int | None = None) -> None:
        self.host = host
        self.port = port
        self.scheme = scheme
        # an IPv6 literal needs its brackets back in the Host header (RFC 9110 7.2)
        self.host_header = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()
        #: a data-parallel rank of one server is an origin of its own: every request to it is
        #: pinned to the rank (:func:`pin_to_rank`); None: the whole server
        self.rank = rank
        #: header lines every request to this origin carries (CRLF-terminated)
        self.fixed = b"" if rank is None else b"x-data-parallel-rank: %d\r\n" % rank
        self.idle: list[_Conn] = []
        #: connections whose request waits for its answer's head (see ConnectionPool.abort)
        self.waiting: set[_Conn] = set()
        #: the compiled lane's slot for this origin (lmgw.api.lane): -1 none yet, -2 never
        #: (TLS, a host name that did not resolve, a removed worker), -3 resolving
        self.slot = -1

    @classmethod
    def from_url(cls, url: str, rank: int | None = None) -> Origin:
        scheme, _, rest = url.partition("://")
        hostport = rest.split("/", 1)[0]
        if hostport.startswith("["):
            host, _, port = hostport[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = hostport.partition(":")
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme in worker URL {url!r}")
        return cls(host, int(port) if port else (443 if scheme == "https" else 80), scheme, rank)

    def __repr__(self) -> str:
        return f"<Origin {self.host}:{self.port} idle={len(self.idle)}>"


class _Conn:
    __slots__ = ("aborted", "idle_since", "poller", "reader", "requests", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.aborted = False  #: closed by ConnectionPool.abort: the request may go elsewhere
        self.reader = ResponseReader()
        self.idle_since = 0.0
        self.requests = 0
        self.poller: select.poll | None = None

    def peer_closed(self) -> bool:
        """Whether the worker closed this idle connection (or sent stray bytes on it).

        Checked on every reuse, so that resending is never needed: a request is retried on a
        fresh connection only when it could not be sent, never when it may have reached the
        worker (a POST must not run twice). A zero-timeout poll on a per-connection poll
        object: ~0.3 us, against ~1.2 us plus an exception for a MSG_PEEK recv.
        """
        stream = self.stream
        if not isinstance(stream, RawStream):
            return False  # TLS: rely on the idle timeout
        poller = self.poller
        if poller is None:
            poller = self.poller = select.poll()
            poller.register(stream.socket, _POLL_CLOSED)
        return bool(poller.poll(0))

    def close(self) -> None:
        # synchronous: safe inside a cancelled scope; trio is notified before the fd goes
        stream = self.stream
        if isinstance(stream, RawStream):
            stream.close()
        else:  # TLS: close the TCP socket under the SSL stream
            stream.transport_stream.socket.close()


@dataclass(slots=True)
class PoolStats:
    connects: int = 0
    reuses: int = 0
    stale_retries: int = 0
    closed: int = 0
    idle: int = 0


class ConnectionPool:
    """Keep-alive connections to many origins.

    Args:
        connect_timeout_s: per connection attempt.
        idle_timeout_s: an idle connection older than this is closed instead of reused; keep it
            below the worker's keep-alive (vLLM/uvicorn: 5 s unless VLLM_HTTP_TIMEOUT_KEEP_ALIVE).
        max_idle_per_origin: extra idle connections beyond this are closed on release.
        ssl_context: for https:// origins (None: the system's trust store and hostname checks).
    """

    def __init__(
        self,
        connect_timeout_s: float = 5.0,
        idle_timeout_s: float = 55.0,
        max_idle_per_origin: int = 256,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ):
        self.ssl_context = ssl_context
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_idle_per_origin = max_idle_per_origin
        self.stats = PoolStats()
        self._origins: set[Origin] = set()
        self._closed = False
        #: the compiled lane's loop (lmgw.http.lane) while one serves: it keeps upstream
        #: connections of its own, aborted and forgotten with the pool's
        self.relay: Any = None

    def statistics(self) -> PoolStats:
        self.stats.idle = sum(len(o.idle) for o in self._origins)
        return self.stats

    async def _connect(self, origin: Origin) -> _Conn:
        try:
            with trio.fail_after(self.connect_timeout_s):
                if origin.scheme == "https":
                    stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                        origin.host, origin.port, ssl_context=self.ssl_context
                    )
                else:
                    stream = await connect_tcp(origin.host, origin.port)
        except trio.TooSlowError:
            raise UpstreamError(
                f"connect to {origin.host}:{origin.port} timed out",
                retryable=True,
                status=504,
                sent=False,
            ) from None
        except OSError as exc:
            if _local_failure(exc):
                raise UpstreamError(
                    f"the gateway cannot open a connection to {origin.host}:{origin.port}:"
                    f" {exc.strerror or exc} (a limit of the gateway's host, not the worker)",
                    status=503,
                    sent=False,
                    local=True,
                ) from None
            raise UpstreamError(
                f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}",
                retryable=True,
                sent=False,
            ) from None
        self.stats.connects += 1
        self._origins.add(origin)
        return _Conn(stream)

    async def _reachable(self, origin: Origin) -> bool:
        """Whether ``origin`` accepts a connection now (kept in the pool if it does)."""
        try:
            conn = await self._connect(origin)
        except UpstreamError:
            return False
        self._release(origin, conn, True)
        return True

    def _checkout(self, origin: Origin) -> _Conn | None:
        idle = origin.idle
        if not idle:
            return None
        horizon = _now() - self.idle_timeout_s
        while idle:
            conn = idle.pop()
            if conn.idle_since > horizon:
                # One non-blocking peek per reuse (~1 us on bare metal, 3-5 us in this VM):
                # skipping it for recently used sockets was measured, and it turned a worker
                # that closes idle sockets early into failed requests.
                if conn.peer_closed():
                    self.stats.stale_retries += 1
                    self._discard(conn)
                    continue
                self.stats.reuses += 1
                return conn
            self._discard(conn)
        return None

    def _discard(self, conn: _Conn) -> None:
        """Close a connection for good; every close the pool makes is counted here."""
        conn.close()
        self.stats.closed += 1

    def _release(self, origin: Origin, conn: _Conn, reusable: bool) -> None:
        if reusable and not self._closed and len(origin.idle) < self.max_idle_per_origin:
            conn.idle_since = _now()
            origin.idle.append(conn)
        else:
            self._discard(conn)

    async def request(
        self,
        origin: Origin,
        method: str,
        path: str,
        headers: Headers,
        body: bytes | None = None,
        *,
        response_timeout_s: float = math.inf,
        whole: bool = False,
    ) -> Response | ResponseParts:
        """Send a request; return once the response head has arrived.

        ``whole``: a whole answer below 400 with a ``Content-Length`` body that arrives in one
        read comes back as its parts (status, headers, content type, keep-alive, body; the
        connection is back in the pool), without a reader or a :class:`Response`: the common
        non-streamed answer, for the express lane (lmgw.pipeline.express).

        Raises :class:`UpstreamError` on connect/transport failures and on a response head that
        does not arrive within ``response_timeout_s`` (status 504).
        """
        head, body = request_message(origin, method, path, headers, body)
        # one write for the usual small body; a large one goes after the head as it is,
        # instead of copying it (a 32 MiB upload would take twice its size for a moment)
        payload, rest = head, None
        if body:
            if len(body) > _JOIN_MAX:
                rest = body
            else:
                payload = head + body
        for attempt in range(2):
            # After a stale socket, go straight to a fresh connection: the sockets below it in
            # the stack have been idle even longer (after a worker restart all of them are
            # dead, and retrying among them failed requests that a new connection would serve)
            conn = self._checkout(origin) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin)
            sent = got_bytes = False
            waiting = origin.waiting
            waiting.add(conn)
            try:
                with (
                    trio.move_on_after(response_timeout_s)
                    if response_timeout_s != math.inf
                    else _NO_SCOPE as scope
                ):
                    stream = conn.stream
                    await stream.send_all(payload)
                    if rest is not None:
                        await stream.send_all(rest)
                    sent = True
                    if type(stream) is RawStream:  # nothing can be there yet: wait first
                        data = await stream.receive_reply(65536)
                    else:
                        data = await stream.receive_some(65536)
                    if whole and data:
                        parts = parse_response(data)
                        if parts is not None and parts[0] < 400:
                            waiting.discard(conn)
                            conn.requests += 1
                            self._release(origin, conn, parts[3])
                            return parts
                    reader = conn.reader
                    reader.reset()
                    while True:
                        if not data:
                            raise trio.BrokenResourceError("worker closed the connection")
                        got_bytes = True
                        reader.feed(data)
                        if reader.headers_complete:
                            break
                        data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                waiting.discard(conn)
                self._discard(conn)
                if conn.aborted:
                    raise UpstreamError(
                        f"worker {origin.host}:{origin.port} was taken out of rotation while"
                        " the request waited for its answer",
                        retryable=True,
                        sent=sent,
                    ) from None
                if reused and not sent:
                    self.stats.stale_retries += 1
                    continue  # the worker had closed that idle socket; it never got the request
                # Once sent, the worker may have started on it: not ours to repeat, unless the
                # worker is gone altogether (a pooled socket to a dead process looks the same
                # as one the worker closed after reading): then another worker may take it.
                gone = reused and not got_bytes and not await self._reachable(origin)
                raise UpstreamError(
                    f"worker {origin.host}:{origin.port} dropped the connection:"
                    f" {str(exc) or exc.__cause__}"  # (TLS failures: the cause says why)
                    + (" (and no longer accepts connections)" if gone else ""),
                    retryable=not sent or gone,
                    sent=sent,
                ) from None
            except UpstreamProtocolError as exc:
                waiting.discard(conn)
                self._discard(conn)
                raise UpstreamError(str(exc)) from None
            except BaseException:  # cancelled: closing is what aborts the request upstream
                waiting.discard(conn)
                self._discard(conn)
                raise
            waiting.discard(conn)
            if scope is not None and scope.cancelled_caught:
                self._discard(conn)
                raise UpstreamError(
                    f"worker {origin.host}:{origin.port} sent no response"
                    f" within {response_timeout_s:g} s",
                    status=504,
                )
            conn.requests += 1
            return Response(self, origin, conn)
        raise UpstreamError(
            f"worker {origin.host}:{origin.port} keeps closing connections",
            retryable=True,
            sent=False,
        )

    def sweep(self) -> None:
        """Close idle connections past their lifetime (call periodically)."""
        horizon = _now() - self.idle_timeout_s
        for origin in self._origins:
            keep = [c for c in origin.idle if c.idle_since > horizon]
            for c in origin.idle:
                if c.idle_since <= horizon:
                    self._discard(c)
            origin.idle[:] = keep

    def abort(self, origin: Origin) -> int:
        """Close the connections whose requests still wait for ``origin``'s answer (a worker
        just ejected or removed): they fail at once as retryable instead of waiting for the
        response timeout. Streams already answering are not touched. Returns how many."""
        conns = list(origin.waiting)
        for conn in conns:
            conn.aborted = True
            conn.close()
        relay = self.relay
        lane = relay.abort_origin(origin.slot) if relay is not None and origin.slot >= 0 else 0
        return len(conns) + lane

    def forget(self, origin: Origin) -> None:
        """Close and drop every idle connection to ``origin`` (worker removed or failing)."""
        for c in origin.idle:
            self._discard(c)
        origin.idle.clear()
        self._origins.discard(origin)
        if self.relay is not None and origin.slot >= 0:
            self.relay.forget_origin(origin.slot)
        origin.slot = -2  # (a worker added again gets an origin of its own)

    def close(self) -> None:
        self._closed = True
        for origin in self._origins:
            for c in origin.idle:
                self._discard(c)
            origin.idle.clear()


class Response:
    """A response whose head has arrived. Read the body, then :meth:`release` (in a finally)."""

    __slots__ = ("_conn", "_origin", "_pool", "_short", "headers", "status")

    def __init__(self, pool: ConnectionPool, origin: Origin, conn: _Conn) -> None:
        self._pool = pool
        self._origin = origin
        self._conn = conn
        r = conn.reader
        self.status = r.status
        self.headers = r.headers
        self._short = False

    @property
    def content_type(self) -> bytes:
        return self._conn.reader.content_type if self._conn is not None else b""

    @property
    def complete(self) -> bool:
        return self._conn is None or self._conn.reader.complete

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def read_chunk(self) -> bytes:
        """Body bytes as they arrive (possibly several events at once); b"" at the end."""
        conn = self._conn
        if conn is None:
            return b""
        r = conn.reader
        while True:
            if r.body:
                return r.take_body()
            if r.complete:
                self.release()
                return b""
            stream = conn.stream
            try:
                # After a short read the socket was empty: a paced stream (a token every few
                # ms) finds it empty again, so wait first instead of failing a receive (EAGAIN)
                # per token. After a full read, more is likely queued: read at once.
                if self._short and type(stream) is RawStream:
                    data = await stream.receive_reply(65536)
                else:
                    data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.release()
                raise UpstreamError(f"worker connection failed mid-response: {exc}") from None
            self._short = len(data) < 65536
            self._feed(r, data)

    def _feed(self, r: ResponseReader, data: bytes) -> None:
        """Body bytes (b"": the worker closed) into the reader; an UpstreamError (the
        connection given up) when the response cannot be complete or does not parse."""
        if not data:
            r.feed_eof()
            if not r.complete:
                self.release()
                raise UpstreamError("worker closed the connection mid-response")
            return
        try:
            r.feed(data)
        except UpstreamProtocolError as exc:
            self.release()
            raise UpstreamError(str(exc)) from None

    async def wait_body(self) -> None:
        """Wait until body bytes (or the body's end) arrived, without taking them: the next
        :meth:`read_chunk` returns them. A hedged stream's race is won by the first answer
        with a token in it, not by the first head (vLLM sends its head before any token)."""
        conn = self._conn
        if conn is None:
            return
        r = conn.reader
        while not r.body and not r.complete:
            stream = conn.stream
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.release()
                raise UpstreamError(f"worker connection failed mid-response: {exc}") from None
            self._feed(r, data)

    def take_complete_body(self) -> bytes | None:
        """The whole body if it already arrived with the head (then the connection goes back
        to the pool), else None: the common case for small JSON answers, without awaits."""
        conn = self._conn
        if conn is None or not conn.reader.complete:
            return None
        body = conn.reader.take_body()
        self.release()
        return body

    async def read_all(self, limit: int = 64 << 20) -> bytes:
        parts = []
        size = 0
        while chunk := await self.read_chunk():
            size += len(chunk)
            if size > limit:
                self.release()
                raise UpstreamError(f"worker response exceeds {limit} bytes")
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Return the connection (complete keep-alive response) or close it (anything else)."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        r = conn.reader
        self._pool._release(self._origin, conn, r.complete and r.keep_alive and not r.body)
