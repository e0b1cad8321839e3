"""The load loop of `lmgw bench`: closed loop (N sessions at a time) or open loop (Poisson
arrivals), over a small trio-native HTTP/1.1 client, recording every request.

Why our own client: the generator must not be the bottleneck. This one is the gateway's own
upstream pieces (``netio.RawStream`` sockets, the httptools ``ResponseReader``) with SSE cut at
event boundaries and each event decoded into a struct that holds only what the bench needs
(the token text's presence, ``usage``, ``error``): a few microseconds per event, tens per
request. Its ceiling is measured by ``benchmarks/loadgen.py`` (docs/bench.md).

A request is timed from just before its bytes are written: ``start``, the arrival of each event
that carries generated text (``token_times``; the first is the TTFT), and ``end`` (the answer
complete). Events that arrive in one read share its timestamp. Token counts come from ``usage``
(the bench asks for it with ``stream_options.include_usage``); without it, the count of events
with text stands in.

Connections are kept alive and reused (a LIFO stack of idle ones). A reused socket the server
closed while idle (seen before sending, or failing before any answer byte) is replaced by a new
one once, as HTTP clients do; every other failure is recorded as an error of its type.

Timeouts (``--timeout``) cost no cancel scope per request (trio's cost ~10 us each, a tenth of a
request here): a watchdog task closes the sockets of exchanges past their deadline every
``timeout / 10`` (at most 1 s), and the failed exchange is recorded as a timeout.
"""

from __future__ import annotations

import math
import socket
import ssl
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec
import trio

from ..errors import DECODE_ERRORS, parse_error_body
from ..http.types import Headers
from ..netio import RawStream
from ..transport.h1client import ResponseReader, UpstreamProtocolError, build_request_head
from .workloads import BenchRequest, Session, Workload, poisson_gaps, rng_for

_now = time.perf_counter

# error types (errors_by_type keys); HTTP statuses are "http_<status>"
CONNECT = "connect"
DISCONNECTED = "disconnected"
TIMEOUT = "timeout"
PROTOCOL = "protocol"
STREAM_ERROR = "stream_error"
INCOMPLETE = "incomplete"


class TargetError(ValueError):
    """A --url that is not an http(s) base URL."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go: ``scheme://host:port`` plus a path prefix (a trailing ``/v1``, or a
    whole endpoint path, is dropped: the workloads' paths start with ``/v1``), and the headers
    every request carries."""

    scheme: str
    host: str
    port: int
    prefix: str
    headers: Headers
    host_header: bytes

    @classmethod
    def from_url(
        cls, url: str, *, api_key: str | None = None, headers: list[tuple[str, str]] = ()
    ) -> Target:
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TargetError(f"--url {url!r} is not an http(s)://HOST[:PORT][/PREFIX] URL")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise TargetError(f"--url {url!r}: {exc}") from None
        prefix = parts.path.rstrip("/")
        for tail in ("/v1/chat/completions", "/v1/completions", "/v1"):
            if prefix.endswith(tail):  # the workloads' paths start with /v1
                prefix = prefix[: -len(tail)]
                break
        host = parts.hostname
        host_header = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()
        hdrs: Headers = [(b"content-type", b"application/json")]
        if api_key:
            hdrs.append((b"authorization", b"Bearer " + api_key.encode()))
        for k, v in headers:
            hdrs.append((k.strip().lower().encode(), v.strip().encode()))
        return cls(parts.scheme, host, port, prefix, hdrs, host_header)

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"


@dataclass(slots=True)
class LoadPlan:
    """How the load is applied. Exactly one of ``concurrency`` (closed loop) and ``rate``
    (open loop, sessions per second) is set; at least one of ``duration_s`` and ``requests``."""

    concurrency: int | None = None
    rate: float | None = None
    duration_s: float | None = None
    requests: int | None = None
    timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of --concurrency and --rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"--rate must be a positive number, got {self.rate}")
        if self.duration_s is None and self.requests is None:
            raise ValueError("give --duration or --requests")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"--duration must be positive, got {self.duration_s}")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"--requests must be at least 1, got {self.requests}")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout must be positive, got {self.timeout_s}")

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency is not None else "open"


class RequestRecord:
    """One request's outcome. Times are seconds since the run started."""

    __slots__ = (
        "completion_tokens",
        "end",
        "error",
        "error_detail",
        "prompt_tokens",
        "session",
        "start",
        "status",
        "token_times",
        "turn",
        "usage",
    )

    def __init__(self, session: int, turn: int, start: float) -> None:
        self.session = session
        self.turn = turn
        self.start = start
        self.end = start
        self.status = 0
        self.error: str | None = None
        self.error_detail: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.usage = False
        """Whether the server reported usage (else completion_tokens counts text events)."""
        self.token_times = array("d")

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        """Seconds to the first generated text (a non-streamed answer: to the whole answer)."""
        if self.error is not None:
            return None
        return (self.token_times[0] if self.token_times else self.end) - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first; None below two tokens or for an answer
        that was not streamed (no token times)."""
        ttft = self.ttft
        if ttft is None or self.completion_tokens < 2 or not self.token_times:
            return None
        return (self.e2e - ttft) / (self.completion_tokens - 1)

    def as_dict(self) -> dict[str, Any]:
        ttft = self.ttft
        return {
            "session": self.session,
            "turn": self.turn,
            "start": round(self.start, 6),
            "ttft": None if ttft is None else round(ttft, 6),
            "end": round(self.end, 6),
            "status": self.status,
            "error": self.error,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "chunks": len(self.token_times),
        }


@dataclass(slots=True)
class Counters:
    """Live totals for the progress display."""

    sent: int = 0
    completed: int = 0
    errors: int = 0
    output_tokens: int = 0
    in_flight: int = 0


@dataclass(slots=True)
class RunResult:
    records: list[RequestRecord]
    elapsed_s: float
    """From the start to the last answer (or to the stop, when interrupted)."""
    cpu_s: float
    """CPU time this process used during the run (the generator's own cost)."""
    started_at: float
    """Wall-clock time (epoch seconds) of the start."""
    lags: array = field(default_factory=lambda: array("d"))
    """Open loop: how late each arrival was sent after its scheduled time (seconds)."""
    interrupted: bool = False
    connections: int = 0
    """Connections opened."""


# -- the SSE and JSON views ----------------------------------------------------------------------

_EMPTY_RAW = msgspec.Raw()


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: msgspec.Raw = _EMPTY_RAW


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int | None = 0


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: msgspec.Raw = _EMPTY_RAW


class _Message(msgspec.Struct):
    content: str | None = None


class _FullChoice(msgspec.Struct):
    message: _Message | None = None
    text: str | None = None


class _Completion(msgspec.Struct):
    choices: list[_FullChoice] = []
    usage: _Usage | None = None


_chunk = msgspec.json.Decoder(_Chunk).decode
_completion = msgspec.json.Decoder(_Completion).decode
_NULL = b"null"


class _Failure(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


# -- connections ---------------------------------------------------------------------------------


class _Conn:
    __slots__ = ("raw", "reader", "stream", "timed_out")

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.raw = stream if isinstance(stream, RawStream) else None
        self.reader = ResponseReader()
        self.timed_out = False
        """Closed by the watchdog: the exchange's failure is a timeout."""

    def idle_ok(self) -> bool:
        """Whether an idle keep-alive socket is still usable (no EOF, no stray bytes)."""
        if self.raw is None:
            return True
        try:
            return not self.raw.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()
        else:
            try:
                self.stream.transport_stream.socket.close()
            except Exception:
                pass


async def open_connection(target: Target, ssl_context: ssl.SSLContext | None = None) -> _Conn:
    """A new connection to the target (TLS for https). Raises _Failure(CONNECT)."""
    t = target
    try:
        stream: Any = await trio.open_tcp_stream(t.host, t.port)
    except OSError as exc:
        raise _Failure(CONNECT, f"cannot connect to {t.host}:{t.port}: {exc}") from None
    if t.scheme == "https":
        ctx = ssl_context or ssl.create_default_context()
        tls = trio.SSLStream(stream, ctx, server_hostname=t.host, https_compatible=True)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            await stream.aclose()
            raise _Failure(CONNECT, f"TLS handshake with {t.host}:{t.port}: {exc}") from None
        return _Conn(tls)
    return _Conn(RawStream.from_trio(stream))


class LoadGenerator:
    """Runs one workload against one target under one plan; :meth:`run` returns the records."""

    def __init__(
        self,
        target: Target,
        workload: Workload,
        plan: LoadPlan,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.target = target
        self.workload = workload
        self.plan = plan
        self.counters = Counters()
        self.records: list[RequestRecord] = []
        self._ssl = ssl_context
        self._idle: list[_Conn] = []
        self._sessions = 0
        self._t0 = 0.0
        self._deadline = math.inf
        self._limit = plan.requests if plan.requests is not None else math.inf
        self._stopped = False
        self._connections = 0
        self._lags = array("d")
        self._heads: dict[tuple[str, int], bytes] = {}
        self._watched: dict[_Conn, float] = {}
        """Connections with an exchange in flight, and its deadline (for the watchdog)."""

    # -- the run ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Issue no more requests (those in flight finish)."""
        self._stopped = True

    @property
    def elapsed(self) -> float:
        return _now() - self._t0 if self._t0 else 0.0

    async def run(self, *, on_start: Callable[[], None] | None = None) -> RunResult:
        """Apply the load until the plan's duration or request count is reached and every
        request in flight has ended. Cancelling it abandons the requests in flight (they are
        not recorded) and raises as usual; use :meth:`result` for what was recorded."""
        cpu0 = time.process_time()
        self._cpu0 = cpu0
        self._wall0 = time.time()
        self._t0 = _now()
        if self.plan.duration_s is not None:
            self._deadline = self._t0 + self.plan.duration_s
        if on_start is not None:
            on_start()
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._watchdog)
                async with trio.open_nursery() as nursery:
                    if self.plan.concurrency is not None:
                        for _ in range(self.plan.concurrency):
                            nursery.start_soon(self._closed_worker)
                    else:
                        nursery.start_soon(self._open_loop, nursery)
                outer.cancel_scope.cancel()
        finally:
            for conn in self._idle:
                conn.close()
            self._idle.clear()
        return self.result()

    def result(self, interrupted: bool = False) -> RunResult:
        last = max((r.end for r in self.records), default=0.0)
        elapsed = self.elapsed if interrupted else max(last, 1e-9)
        return RunResult(
            records=self.records,
            elapsed_s=elapsed,
            cpu_s=time.process_time() - self._cpu0,
            started_at=self._wall0,
            lags=self._lags,
            interrupted=interrupted,
            connections=self._connections,
        )

    def _claim(self) -> bool:
        """A ticket for one more request, while the plan allows it."""
        if self._stopped or self.counters.sent >= self._limit or _now() >= self._deadline:
            return False
        self.counters.sent += 1
        return True

    async def _closed_worker(self) -> None:
        while self._claim():
            index = self._sessions
            self._sessions += 1
            await self._session(self.workload.session(index))

    async def _open_loop(self, nursery: trio.Nursery) -> None:
        gaps = poisson_gaps(self.plan.rate or 1.0, rng_for(self.plan.seed, "arrivals"))
        due = self._t0
        lags = self._lags
        while True:
            due += next(gaps)
            if due >= self._deadline or self.counters.sent >= self._limit:
                break
            session = self.workload.session(self._sessions)  # built while waiting for its time
            wait = due - _now()
            if wait > 0:
                await trio.sleep(wait)
            if not self._claim():
                break
            lags.append(max(0.0, _now() - due))
            self._sessions += 1
            nursery.start_soon(self._session, session)

    async def _session(self, session: Session) -> None:
        """One session, its first request's ticket already claimed."""
        request: BenchRequest | None = session.first()
        while request is not None:
            answer = await self._one(request)
            if answer is None:
                return
            request = session.next(answer)
            if request is None or not self._claim():
                return

    # -- one request -----------------------------------------------------------------------------

    async def _connect(self, deadline: float) -> _Conn:
        with trio.move_on_after(max(0.0, deadline - _now())):  # once per new connection
            conn = await open_connection(self.target, self._ssl)
            self._connections += 1
            return conn
        raise _Failure(TIMEOUT, f"no connection within {self.plan.timeout_s:g} s")

    def _payload(self, request: BenchRequest) -> bytes:
        key = (request.path, len(request.body))
        head = self._heads.get(key)
        if head is None:
            t = self.target
            head = build_request_head(
                "POST", t.prefix + request.path, t.host_header, t.headers, len(request.body)
            )
            if len(self._heads) < 4096:
                self._heads[key] = head
        return head + request.body

    async def _one(self, request: BenchRequest) -> str | None:
        """Send one request and record it; the answer's text when the session needs it (else
        ""), None when it failed."""
        counters = self.counters
        payload = self._payload(request)
        now = _now()
        rec = RequestRecord(request.session, request.turn, now - self._t0)
        deadline = now + self.plan.timeout_s
        counters.in_flight += 1
        text: list[str] | None = [] if request.needs_text else None
        conn = None
        try:
            while self._idle:
                conn = self._idle.pop()
                if conn.idle_ok():
                    break
                conn.close()
                conn = None
            if conn is not None:
                try:
                    await self._exchange(conn, payload, rec, request.stream, text, deadline)
                except _Failure as exc:
                    if exc.kind != DISCONNECTED or rec.status or conn.timed_out:
                        raise
                    conn.close()  # a stale keep-alive socket: once more, on a new one
                    conn = None
                    rec.start = _now() - self._t0
                    rec.token_times = array("d")
            if conn is None:
                conn = await self._connect(deadline)
                await self._exchange(conn, payload, rec, request.stream, text, deadline)
        except _Failure as exc:
            rec.error = exc.kind
            rec.error_detail = exc.detail
            if conn is not None:
                if conn.timed_out:
                    rec.error = TIMEOUT
                    rec.error_detail = f"no complete answer within {self.plan.timeout_s:g} s"
                conn.close()
        else:
            if conn.reader.keep_alive:
                self._idle.append(conn)
            else:
                conn.close()
        finally:
            counters.in_flight -= 1
        rec.end = _now() - self._t0
        self.records.append(rec)
        counters.completed += 1
        counters.output_tokens += rec.completion_tokens
        if rec.error is not None:
            counters.errors += 1
            return None
        return "".join(text) if text is not None else ""

    async def _watchdog(self) -> None:
        """Time requests out without a cancel scope each (~10 us apiece in trio): every
        ``period`` close the sockets of exchanges past their deadline; the exchange then fails
        and is recorded as a timeout."""
        period = min(1.0, max(0.01, self.plan.timeout_s / 10))
        watched = self._watched
        while True:
            await trio.sleep(period)
            now = _now()
            for conn, deadline in list(watched.items()):
                if now >= deadline:
                    conn.timed_out = True
                    conn.close()

    async def _exchange(
        self,
        conn: _Conn,
        payload: bytes,
        rec: RequestRecord,
        stream: bool,
        text: list[str] | None,
        deadline: float,
    ) -> None:
        self._watched[conn] = deadline
        try:
            await self._exchange_watched(conn, payload, rec, stream, text)
        finally:
            del self._watched[conn]

    async def _exchange_watched(
        self,
        conn: _Conn,
        payload: bytes,
        rec: RequestRecord,
        stream: bool,
        text: list[str] | None,
    ) -> None:
        reader = conn.reader
        reader.reset()
        sock = conn.stream
        t0 = self._t0
        try:
            await sock.send_all(payload)
            data = await (conn.raw.receive_reply() if conn.raw is not None else sock.receive_some())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Failure(DISCONNECTED, f"connection lost: {exc}") from None
        sse = False
        buf = b""
        done = False
        body: list[bytes] = []
        times = rec.token_times
        try:
            while True:
                now = _now() - t0
                if not data:
                    reader.feed_eof()
                    if not reader.complete:
                        raise _Failure(
                            DISCONNECTED,
                            "the server closed the connection before the answer was complete",
                        )
                else:
                    reader.feed(data)
                if reader.headers_complete:
                    if not rec.status:
                        rec.status = reader.status
                        sse = reader.status == 200 and reader.content_type.startswith(
                            b"text/event-stream"
                        )
                    chunk = reader.take_body()
                    if sse:
                        if chunk:
                            buf = buf + chunk if buf else chunk
                            if b"\r" in buf:
                                buf = buf.replace(b"\r\n", b"\n")
                            start = 0
                            while True:
                                end = buf.find(b"\n\n", start)
                                if end < 0:
                                    break
                                if self._event(buf[start:end], rec, now, times, text):
                                    done = True
                                start = end + 2
                            buf = buf[start:]
                    elif chunk:
                        body.append(chunk)
                if reader.complete:
                    break
                data = await sock.receive_some(65536)
        except UpstreamProtocolError as exc:
            raise _Failure(PROTOCOL, str(exc)) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Failure(DISCONNECTED, f"connection lost mid-answer: {exc}") from None
        if rec.status != 200:
            message, _, _ = parse_error_body(b"".join(body))
            raise _Failure(f"http_{rec.status}", message[:300])
        if sse:
            if rec.error is not None:  # an error event
                raise _Failure(rec.error, rec.error_detail or "")
            if not done:
                raise _Failure(INCOMPLETE, "the event stream ended without data: [DONE]")
            if not rec.usage:
                rec.completion_tokens = len(times)
            return
        self._full_body(b"".join(body), rec, stream, text)

    def _event(
        self,
        event: bytes,
        rec: RequestRecord,
        now: float,
        times: array,
        text: list[str] | None,
    ) -> bool:
        """Account one SSE event; True for ``[DONE]``."""
        if event.startswith(b"data: "):
            payload = event[6:]
            if b"\n" in payload:
                payload = _data_lines(event)
        else:
            payload = _data_lines(event)
            if not payload:
                return False  # a comment or an event without data
        if payload == b"[DONE]":
            return True
        try:
            chunk = _chunk(payload)
        except DECODE_ERRORS as exc:
            rec.error = PROTOCOL
            rec.error_detail = f"an event is not a JSON chunk: {exc}"
            return False
        if chunk.error and bytes(chunk.error) != _NULL:
            rec.error = STREAM_ERROR
            message, _, _ = parse_error_body(payload)
            rec.error_detail = message[:300]
            return False
        got = False
        for c in chunk.choices:
            d = c.delta
            if d is not None:
                if d.content or d.reasoning_content or d.reasoning:
                    got = True
                    if text is not None and d.content:
                        text.append(d.content)
                elif d.tool_calls and bytes(d.tool_calls) != _NULL:
                    got = True
            elif c.text:
                got = True
                if text is not None:
                    text.append(c.text)
        if got:
            times.append(now)
        u = chunk.usage
        if u is not None:
            rec.usage = True
            rec.prompt_tokens = u.prompt_tokens
            rec.completion_tokens = u.completion_tokens or 0
        return False

    @staticmethod
    def _full_body(body: bytes, rec: RequestRecord, stream: bool, text: list[str] | None) -> None:
        try:
            answer = _completion(body)
        except DECODE_ERRORS as exc:
            kind = "not an event stream" if stream else "not a JSON completion"
            raise _Failure(PROTOCOL, f"the answer is {kind}: {exc}") from None
        if answer.usage is not None:
            rec.usage = True
            rec.prompt_tokens = answer.usage.prompt_tokens
            rec.completion_tokens = answer.usage.completion_tokens or 0
        if text is not None:
            for c in answer.choices:
                if c.message is not None and c.message.content:
                    text.append(c.message.content)
                elif c.text:
                    text.append(c.text)


def _data_lines(event: bytes) -> bytes:
    """The data of a multi-line SSE event (``data:`` lines joined with newlines)."""
    out = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            out.append(line[6:] if line.startswith(b"data: ") else line[5:])
    return b"\n".join(out)


async def fetch_model(
    target: Target, *, timeout_s: float = 10.0, ssl_context: ssl.SSLContext | None = None
) -> str:
    """The first model the target lists on ``GET /v1/models`` (for a run without --model).
    Raises BenchFailure."""
    headers = [h for h in target.headers if h[0] != b"content-type"]
    head = build_request_head(
        "GET", target.prefix + "/v1/models", target.host_header, headers, None
    )
    with trio.move_on_after(timeout_s):
        conn = await open_connection(target, ssl_context)
        try:
            body = await _get(conn, head)
        finally:
            conn.close()
        status = conn.reader.status
        if status != 200:
            message, _, _ = parse_error_body(body)
            raise _Failure(f"http_{status}", f"GET /v1/models: {message}")
        try:
            data = msgspec.json.decode(body)
            return str(data["data"][0]["id"])
        except (msgspec.DecodeError, KeyError, IndexError, TypeError, RecursionError):
            raise _Failure(PROTOCOL, "GET /v1/models listed no model") from None
    raise _Failure(TIMEOUT, f"GET /v1/models: no answer within {timeout_s:g} s")


async def _get(conn: _Conn, head: bytes) -> bytes:
    reader = conn.reader
    chunks = []
    try:
        await conn.stream.send_all(head)
        while not reader.complete:
            data = await conn.stream.receive_some(65536)
            if not data:
                reader.feed_eof()
                if not reader.complete:
                    raise _Failure(DISCONNECTED, "GET /v1/models: the connection closed early")
                break
            reader.feed(data)
            chunks.append(reader.take_body())
    except (trio.BrokenResourceError, trio.ClosedResourceError, UpstreamProtocolError) as exc:
        raise _Failure(DISCONNECTED, f"GET /v1/models: {exc}") from None
    return b"".join(chunks)


BenchFailure = _Failure
