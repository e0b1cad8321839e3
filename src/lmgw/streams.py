"""Resumable answers: a generation that outlives its client's connection, and a client that
picks the answer up again where it lost it (``streams.resumable``; docs/api.md, "Resumable
answers").

Why: an answer that takes minutes (long outputs, reasoning, agents) dies with the first flaky
connection, a mobile handover or a proxy's idle cut, and asking again pays the whole prefill
and decode once more. None of the routers this replaces keeps the answer (ANCHORS.md §5.4).

How it works: a generation request sent with ``X-Lmgw-Resumable: 1`` runs in the
:class:`StreamStore`'s nursery instead of its connection's task, against a
:class:`BufferResponder` that keeps what the pipeline writes. The connection's task only
*follows* that buffer: SSE events are relayed with an ``id:`` line each (their sequence number,
from 0), and the answer carries ``X-Lmgw-Stream-Id``, a random token. When the connection drops
the generation goes on; ``GET /v1/streams/{token}`` (with ``Last-Event-ID: n``, or
``?after=n``) answers the same status and headers and the events after ``n``, then follows live.
``DELETE /v1/streams/{token}`` ends it at once. A request that also sends ``Idempotency-Key``
and comes again (a client's retry: same API key, same key, same path and body) follows the
answer already generating or kept, from ``Last-Event-ID`` when it sends one, instead of
generating twice; the same key with another body is a 422. A generation nobody follows for
``grace_s`` is cancelled (its worker gets the usual abort); a finished answer is kept
``retain_s`` for late comers, within ``max_bytes`` per answer (older events are dropped;
resuming before them is a 410) and ``max_streams`` answers (past it, requests are served
without resumption). Only the API key that started an answer may resume it.

Coalescing (``streams.coalesce``) runs on the same machinery: an identical deterministic
request (same API key, path and body; ``temperature`` 0 or a ``seed``; one choice) that arrives
while another is generating follows that generation instead of sending the worker the same
work again (ANCHORS.md §5.7: agents repeating a call, evaluation harnesses, double submits). Its
followers see exactly what a lone request would (no ``id:`` lines; their own ``X-Request-Id``
when they sent one, else the generation's);
the generation ends when its last follower leaves, and is forgotten when it ends.

The event bookkeeping (:func:`split_events`, :class:`StreamEntry`) is sans-IO.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections import deque
from collections.abc import Awaitable, Callable

import msgspec
import trio

from .config import StreamsConfig
from .errors import DECODE_ERRORS, GatewayError, sse_error_event
from .http.types import Headers, Request, Responder, accepted_request_id
from .metrics import Counter, Gauge

log = logging.getLogger("lmgw.streams")

RESUMABLE_HEADER = b"x-lmgw-resumable"
IDEMPOTENCY_HEADER = b"idempotency-key"
STREAM_ID_HEADER = b"x-lmgw-stream-id"
PREFIX = "/v1/streams/"
_SEP = b"\n\n"
_TRUE = (b"1", b"true", b"yes")

Endpoint = Callable[[Request, Responder], Awaitable[None]]


def split_events(tail: bytes, data: bytes) -> tuple[list[bytes], bytes]:
    """SSE blocks completed by ``data`` after the unfinished ``tail`` of earlier writes: (each
    complete block with its blank line, the new unfinished tail)."""
    buf = tail + data if tail else data
    end = buf.rfind(_SEP)
    if end < 0:
        return [], buf
    parts = buf[:end].split(_SEP)
    return [p + _SEP for p in parts if p], buf[end + 2 :]


class StreamEntry:
    """One resumable answer: its head and its blocks. Every block has a position (a follower's
    cursor); data events also have a sequence number from 0 (their ``id:``, what a client
    resumes after); comments such as keep-alives carry the number of the event after them."""

    __slots__ = ("_lot", "_watch_lot", "body", "bytes", "cancel", "coalesce", "digest", "done",
                 "ended_at", "events", "first_pos", "first_seq", "followers", "headers",
                 "idempotency", "idle_since", "key", "next_pos", "next_seq", "resumable",
                 "status", "tail", "token")  # fmt: skip

    def __init__(self, token: str, key: str | None, resumable: bool = True) -> None:
        self.token = token
        self.key = key  #: the API key's name that started it (None: no keys)
        #: a resumable answer (``id:`` lines, a stream id); else one shared by coalescing
        self.resumable = resumable
        #: its key in StreamStore.inflight while coalescing requests may join it
        self.coalesce: bytes | None = None
        self.status: int | None = None
        self.headers: Headers = []
        self.body: bytes | None = None  #: a whole (not streamed) answer
        self.events: deque[tuple[int, bytes]] = deque()  # (seq, block as sent)
        self.first_pos = 0  #: the position of events[0]
        self.next_pos = 0
        self.first_seq = 0  #: the oldest data event still held
        self.next_seq = 0
        self.bytes = 0
        self.tail = b""
        self.done = False
        self.ended_at = math.inf
        self.followers = 0
        self.idle_since = 0.0
        self.cancel = trio.CancelScope()
        self._lot = trio.lowlevel.ParkingLot()  # followers wait here for news
        self._watch_lot = trio.lowlevel.ParkingLot()  # the watchdog: followers come and go
        #: (API key name, Idempotency-Key) when the request had one, and its body's digest
        self.idempotency: tuple[str | None, bytes] | None = None
        self.digest = b""

    def changed(self) -> None:
        """Wake everyone waiting (they look at the state again: nothing is lost between a
        look and a wait, as no await lies between them)."""
        self._lot.unpark_all()

    async def wait(self) -> None:
        await self._lot.park()

    def followers_changed(self) -> None:
        """Wake the watchdog (only when a follower comes or goes: not per event)."""
        self._watch_lot.unpark_all()

    async def wait_followers(self) -> None:
        await self._watch_lot.park()

    def add(self, data: bytes, max_bytes: int) -> None:
        """Keep the blocks ``data`` completes (data events numbered, with their ``id:`` line);
        past ``max_bytes``, drop the oldest."""
        blocks, self.tail = split_events(self.tail, data)
        ids = self.resumable
        for block in blocks:
            seq = self.next_seq
            if block.startswith(b"data:"):
                if ids:
                    block = b"id: %d\n" % seq + block
                self.next_seq += 1
            self.events.append((seq, block))
            self.next_pos += 1
            self.bytes += len(block)
        while self.bytes > max_bytes and len(self.events) > 1:
            _, block = self.events.popleft()
            self.first_pos += 1
            self.bytes -= len(block)
            self.first_seq = self.events[0][0]
        if blocks:
            self.changed()

    def position_after(self, seq: int) -> int | None:
        """The position of the first block after data event ``seq`` (None: dropped already)."""
        if seq + 1 < self.first_seq:
            return None
        pos = self.first_pos
        for s, _ in self.events:
            if s > seq:
                return pos
            pos += 1
        return pos

    def blocks(self, pos: int) -> bytes | None:
        """The held blocks from position ``pos`` on (None: some were dropped already)."""
        i = pos - self.first_pos
        if i < 0:
            return None
        k = len(self.events) - i  # from the right: a live follower wants the last few
        if k <= 0:
            return b""
        if k == 1:
            return self.events[-1][1]
        it = reversed(self.events)
        out = [next(it)[1] for _ in range(k)]
        out.reverse()
        return b"".join(out)


class BufferResponder:
    """The responder a resumable generation writes to: everything goes into its entry."""

    __slots__ = ("entry", "max_bytes", "started")

    def __init__(self, entry: StreamEntry, max_bytes: int) -> None:
        self.entry = entry
        self.max_bytes = max_bytes
        self.started = False

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        e = self.entry
        e.status, e.headers, e.body = status, list(headers), body
        self.started = True
        e.changed()

    async def start(self, status: int, headers: Headers) -> None:
        e = self.entry
        e.status, e.headers = status, list(headers)
        self.started = True
        e.changed()

    async def send(self, data: bytes) -> None:
        if data:
            self.entry.add(data, self.max_bytes)

    async def end(self, data: bytes = b"") -> None:
        await self.send(data)
        self.entry.done = True
        self.entry.changed()


class StreamStore:
    """The resumable answers of one gateway, and the nursery their generations run in."""

    def __init__(
        self,
        config: StreamsConfig,
        *,
        request_timeout_s: float = 0.0,
        on_timeout: Endpoint | None = None,
    ) -> None:
        self.config = config
        self.request_timeout_s = request_timeout_s
        self.on_timeout = on_timeout
        self.entries: dict[str, StreamEntry] = {}
        #: (API key name, Idempotency-Key) -> its answer, while the answer is held
        self.by_key: dict[tuple[str | None, bytes], StreamEntry] = {}
        self._nursery: trio.Nursery | None = None
        self._full = False
        self.active = Gauge(
            "lmgw_resumable_streams",
            "Resumable answers held: generating, or finished and kept for late readers.",
            ("state",),
            collect=self._collect,
        )
        self.resumes = Counter(
            "lmgw_stream_resumes_total",
            "GET /v1/streams/{id}: answers picked up again, by outcome.",
            ("outcome",),
        )
        #: streams.coalesce: generations that identical requests may join, by key
        self.inflight: dict[bytes, StreamEntry] = {}
        self.coalesced = Counter(
            "lmgw_coalesced_requests_total",
            "Requests that joined an identical deterministic one in flight (streams.coalesce)"
            " instead of generating again, by path.",
            ("path",),
        )

    def _collect(self) -> list[tuple[tuple[str, ...], float]]:
        running = sum(1 for e in self.entries.values() if not e.done)
        return [(("running",), running), (("finished",), len(self.entries) - running)]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the generations, and drop finished answers after ``retain_s``."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await trio.sleep(max(1.0, self.config.retain_s / 4))
                    self.evict(trio.current_time())
            finally:
                self._nursery = None

    def evict(self, now: float) -> None:
        retain = self.config.retain_s
        for token in [t for t, e in self.entries.items() if now - e.ended_at >= retain]:
            entry = self.entries.pop(token)
            if entry.idempotency is not None:
                self.by_key.pop(entry.idempotency, None)

    # -- the middleware ---------------------------------------------------------------------
    async def middleware(self, req: Request, responder: Responder, call_next: Endpoint) -> None:
        """Around the generation routes: a request that asks for resumption (and fits) runs
        here, so does a deterministic one when coalescing; any other goes on as usual."""
        if self._nursery is None:
            await call_next(req, responder)
            return
        if not (self.config.resumable and asks_resumable(req.headers)):
            ckey = coalesce_key(req) if self.config.coalesce else None
            if ckey is None:
                await call_next(req, responder)
            else:
                await self._coalesce(ckey, req, responder, call_next)
            return
        self.evict(trio.current_time())
        key_name = _key_name(req)
        idem = _header(req.headers, IDEMPOTENCY_HEADER)
        if idem is not None:  # a retry of a request this gateway holds: follow its answer
            ikey = (key_name, idem)
            digest = hashlib.blake2b(req.path.encode() + b"\0" + req.body, digest_size=16)
            known = self.by_key.get(ikey)
            if known is not None:
                if known.digest != digest.digest():
                    await send_error(responder, _key_reused(idem))
                    return
                self.resumes.inc(("idempotent",))
                await self.follow(known, _last_event(req), responder)
                return
        if len(self.entries) >= self.config.max_streams:
            if not self._full:  # once per spell of being full, not per request
                log.warning("resumable answers: %d held (streams.max_streams), serving new"
                            " requests without resumption", len(self.entries))  # fmt: skip
                self._full = True
            await call_next(req, responder)
            return
        self._full = False
        token = secrets.token_urlsafe(18)
        entry = self.entries[token] = StreamEntry(token, key_name)
        entry.idle_since = trio.current_time()
        if idem is not None:
            entry.idempotency, entry.digest = ikey, digest.digest()
            self.by_key[ikey] = entry
        # start_soon, not start: the generation must never run inside this connection's scope
        # (a client that leaves at once would cancel it there)
        self._nursery.start_soon(self._generate, entry, req, call_next)
        await self.follow(entry, -1, responder)

    async def _coalesce(
        self, ckey: bytes, req: Request, responder: Responder, call_next: Endpoint
    ) -> None:
        """Follow the identical generation in flight, or start the one later copies follow."""
        entry = self.inflight.get(ckey)
        if entry is not None and not entry.done:
            self.coalesced.inc((req.path,))
            sent = _header(req.headers, b"x-request-id")  # the follower's own, when it sent one
            rid = None if sent is None else accepted_request_id(sent)  # as the API echoes it
            await self.follow(entry, -1, responder, None if rid is None else rid.encode())
            return
        entry = StreamEntry("", _key_name(req), resumable=False)
        entry.coalesce = ckey
        entry.idle_since = trio.current_time()
        self.inflight[ckey] = entry
        self._nursery.start_soon(self._generate, entry, req, call_next)
        await self.follow(entry, -1, responder)

    async def _generate(
        self,
        entry: StreamEntry,
        req: Request,
        handler: Endpoint,
    ) -> None:
        buf = BufferResponder(entry, self.config.max_bytes)
        try:
            with entry.cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch, entry, nursery.cancel_scope)
                    await self._handle(req, buf, handler)
                    nursery.cancel_scope.cancel()
        except Exception:  # the handler answers its own errors; this is a bug: say so
            log.exception("resumable answer %s failed", entry.token)
            if not buf.started:
                await buf.send_full(*_error_parts(GatewayError(500, "internal error")))
        finally:
            if entry.status is None:  # cancelled before any answer: the client asked it so
                entry.status, entry.headers = 499, []
                entry.body = GatewayError(499, "the answer was cancelled").body()
            entry.done = True
            entry.ended_at = trio.current_time()
            if entry.coalesce is not None and self.inflight.get(entry.coalesce) is entry:
                del self.inflight[entry.coalesce]  # later copies generate anew
            entry.changed()

    async def _handle(self, req: Request, buf: BufferResponder, handler: Endpoint) -> None:
        """The generation, under the request deadline the server applies to other requests."""
        timeout = self.request_timeout_s
        if not timeout:
            await handler(req, buf)
            return
        with trio.move_on_after(timeout) as scope:
            await handler(req, buf)
        if scope.cancelled_caught and self.on_timeout is not None:
            req.deadline_exceeded = True
            await self.on_timeout(req, buf)

    async def _watch(self, entry: StreamEntry, scope: trio.CancelScope) -> None:
        """Cancel the generation once nobody has followed it for ``grace_s`` (a coalesced
        one at once: like any request whose client left)."""
        grace = self.config.grace_s if entry.resumable else 0.0
        while True:
            if entry.followers:
                await entry.wait_followers()
                continue
            left = entry.idle_since + grace - trio.current_time()
            if left <= 0:
                log.info("resumable answer %s: nobody read it for %gs, cancelled",
                         entry.token, grace)  # fmt: skip
                scope.cancel()
                return
            with trio.move_on_after(left):
                await entry.wait_followers()

    # -- following --------------------------------------------------------------------------
    async def follow(
        self,
        entry: StreamEntry,
        after: int,
        responder: Responder,
        request_id: bytes | None = None,
    ) -> None:
        """Answer ``responder`` from ``entry``: its head, the events after data event
        ``after``, then the live ones until the answer ends or this client leaves.
        ``request_id``: a coalesced follower's own, in place of the generation's."""
        entry.followers += 1
        entry.followers_changed()
        try:
            while entry.status is None:
                await entry.wait()
            if entry.resumable:
                headers = [*entry.headers, (STREAM_ID_HEADER, entry.token.encode())]
            elif request_id is not None:
                headers = [(k, request_id if k == b"x-request-id" else v) for k, v in entry.headers]
            else:
                headers = entry.headers
            if entry.body is not None:
                await responder.send_full(entry.status, headers, entry.body)
                return
            pos = entry.position_after(after)
            if pos is None:
                await send_error(responder, _gone(entry))
                return
            await responder.start(entry.status, headers)
            while True:
                chunk = entry.blocks(pos)
                if chunk is None:  # fell behind the buffer
                    await responder.send(sse_error_event(410, _gone(entry).message))
                    await responder.end()
                    return
                if chunk:
                    pos = entry.next_pos
                    await responder.send(chunk)
                    continue
                if entry.done:
                    await responder.end()
                    return
                await entry.wait()
        finally:
            entry.followers -= 1
            if not entry.followers:
                entry.idle_since = trio.current_time()
            entry.followers_changed()

    # -- GET / DELETE /v1/streams/{id} ------------------------------------------------------
    async def endpoint(self, req: Request, responder: Responder) -> None:
        token = req.path[len(PREFIX) :]
        entry = self.entries.get(token)
        if entry is None or entry.key != _key_name(req):  # another key's: as if unknown
            self.resumes.inc(("unknown",))
            await send_error(responder, GatewayError(404, f"no resumable answer {token!r}"))
            return
        if req.method == "DELETE":
            entry.cancel.cancel()
            await responder.send_full(
                200,
                [(b"content-type", b"application/json")],
                b'{"id":"%s","object":"stream","cancelled":true}' % token.encode(),
            )
            return
        if req.method not in ("GET", "HEAD"):
            await send_error(responder, GatewayError(405, "use GET or DELETE"))
            return
        try:
            after = _after(req)
        except ValueError:
            await send_error(
                responder,
                GatewayError(
                    400, "Last-Event-ID must be an event id (an integer)", param="last-event-id"
                ),
            )
            return
        self.resumes.inc(("resumed",))
        await self.follow(entry, after, responder)


class _Sampling(msgspec.Struct):
    """What makes a generation request deterministic (the rest of the body is not read)."""

    temperature: float | None = None
    seed: int | None = None
    n: int | None = None
    best_of: int | None = None
    use_beam_search: bool = False


_sampling = msgspec.json.Decoder(_Sampling).decode


def coalesce_key(req: Request) -> bytes | None:
    """The key under which identical requests share a generation (API key, path, body), or
    None for a request whose copies must not share one: sampled ones (two answers to the
    same prompt are meant to differ) and those asking for several choices."""
    try:
        s = _sampling(req.body)
    except DECODE_ERRORS:  # (invalid UTF-8 too)
        return None  # the handler answers its 400
    if s.temperature != 0 and s.seed is None:
        return None
    if (s.n or 1) != 1 or (s.best_of or 1) != 1 or s.use_beam_search:
        return None
    key = _key_name(req) or ""
    h = hashlib.blake2b(digest_size=16)
    h.update(key.encode() + b"\0" + req.path.encode() + b"\0")
    h.update(req.body)
    return h.digest()


def asks_resumable(headers: Headers) -> bool:
    """Whether a request asks for a resumable answer (``X-Lmgw-Resumable: 1``)."""
    for k, v in headers:
        if k == RESUMABLE_HEADER:
            return v.strip().lower() in _TRUE
    return False


def _key_name(req: Request) -> str | None:
    key = req.principal
    return None if key is None else getattr(key, "name", str(key))


def _header(headers: Headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _last_event(req: Request) -> int:
    """``Last-Event-ID`` of a retried request (-1 when absent or not a number)."""
    try:
        return _after(req)
    except ValueError:
        return -1


def _key_reused(idem: bytes) -> GatewayError:
    return GatewayError(
        422,
        f"Idempotency-Key {idem.decode('latin-1')!r} was used for another request (a"
        " different path or body); use a new key for a new request",
        param="idempotency-key",
    )


def _after(req: Request) -> int:
    """The last event the client has: ``Last-Event-ID``, else ``?after=``; -1 for none."""
    for k, v in req.headers:
        if k == b"last-event-id":
            return int(v.strip() or b"-1")
    for part in req.query.split("&"):
        name, _, value = part.partition("=")
        if name == "after":
            return int(value)
    return -1


def _gone(entry: StreamEntry) -> GatewayError:
    return GatewayError(
        410,
        f"events before {entry.first_seq} of this answer are no longer held (streams.max_bytes)",
    )


def _error_parts(exc: GatewayError) -> tuple[int, Headers, bytes]:
    return exc.status, [(b"content-type", b"application/json")], exc.body()


async def send_error(responder: Responder, exc: GatewayError) -> None:
    await responder.send_full(*_error_parts(exc))
