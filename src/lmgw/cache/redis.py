"""The distributed tier: a real Redis (or a server speaking its protocol), through lmgw's own
trio-native RESP client (:mod:`lmgw.workers.discovery.resp`, pipelined, binary-safe).

Layout, for an entry ``key`` under ``prefix``::

    {prefix}:cache:{key}            head: b"LGC1", meta length, chunk count, version, the Meta,
                                    then the value itself when it is at most ``chunk_bytes``
    {prefix}:cache:{key}:{v}:{i}    chunk i of version v of a bigger value

The braces make ``{key}`` a hash tag, so a Redis-protocol cluster proxy keeps an entry's head
and chunks on one node. A put sends the chunks and then the head in one pipeline on one
connection; Redis runs them in order, so a reader that finds the head finds its chunks (unless
they expired or were overwritten, which reads as a miss). The head is written with ``SET ...
GET``, and the chunks of the version it replaced are deleted. Every key gets the entry's TTL
(``PX``); without one, entries stay until deleted or until Redis's own ``maxmemory-policy``
evicts them (use ``allkeys-lru`` on a Redis that serves as a cache). Needs Redis >= 6.2.

**Redis down.** A failed connection or a command past ``timeout_s`` marks the tier down: it is
logged once, ``lmgw_cache_pool_tier_up{tier="redis"}`` goes to 0, and from then on the tier answers
misses and drops puts at once, so the pool runs on its local tiers and requests keep flowing.
:meth:`run` (the pool runs it) pings Redis with a jittered, growing backoff and puts the tier
back when it answers (logged too); without it, an operation after the backoff tries again.
"""

from __future__ import annotations

import logging
import math
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np
import trio

from ..errors import DECODE_ERRORS
from ..workers.discovery.resp import (
    RedisAddress,
    RedisConnection,
    RedisConnectionError,
    RedisError,
    RespErrorReply,
    parse_redis_url,
)
from ..workers.discovery.sink import backoff_delay
from .tier import Evicted, Tier
from .values import Meta, Value, decode_meta, encode_meta, value_of

__all__ = ["DEFAULT_CHUNK_BYTES", "RedisTier"]

log = logging.getLogger("lmgw.cache")

DEFAULT_CHUNK_BYTES = 1 << 20
"""Values above this go in chunks: Redis is single-threaded, and one command moving 64 MiB
stalls every other client for tens of milliseconds."""
_HEAD = struct.Struct("<4sIIQI")  # magic, meta length, chunk count, version, chunk size
_MAGIC = b"LGC1"
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 30.0

T = TypeVar("T")


class _Chunked(NamedTuple):
    """A chunked value being read: where its reply goes, and the buffer its chunks fill."""

    index: int
    meta: Meta
    names: list[str]
    target: np.ndarray
    step: int


class _Down(Exception):
    """The tier is down (or just went down): the operation is skipped."""


def _px(meta: Meta, now: float) -> tuple[Any, ...]:
    if not meta.expires:
        return ()
    return ("PX", max(1, math.ceil((meta.expires - now) * 1000)))


class RedisTier(Tier):
    """Entries in Redis at ``url`` (``redis://[[user]:password@]host[:port][/db]``).

    Args:
        prefix: key prefix; separate deployments can share one Redis.
        timeout_s: per command or pipeline (and per connect); past it the tier goes down.
        chunk_bytes: values above this are stored in chunks of this size.
        max_connections: connections open at once (each request holds one per operation).
    """

    name = "redis"
    shared = True

    def __init__(
        self,
        url: str | RedisAddress,
        *,
        prefix: str = "lmgw",
        timeout_s: float = 1.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_connections: int = 16,
    ) -> None:
        super().__init__()
        if chunk_bytes < 1 or max_connections < 1 or not timeout_s > 0:
            raise ValueError("chunk_bytes and max_connections must be >= 1, timeout_s > 0")
        self.address = parse_redis_url(url) if isinstance(url, str) else url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self.max_connections = max_connections
        self._idle: list[RedisConnection] = []
        self._open = 0  # connections checked out or idle
        self._lot = trio.lowlevel.ParkingLot()  # tasks waiting for a connection
        self._up = True
        self._supervised = False
        self._failures_in_row = 0
        self._retry_at = 0.0
        self._went_down: trio.Event | None = None
        self.skipped = 0  # operations skipped while down

    # -- keys -------------------------------------------------------------------------------
    def head_key(self, key: str) -> str:
        return f"{self.prefix}:cache:{{{key}}}"

    def _chunk_keys(self, head: str, version: int, n: int) -> list[str]:
        return [f"{head}:{version:x}:{i}" for i in range(n)]

    @property
    def up(self) -> bool:
        return self._up

    # -- connections ------------------------------------------------------------------------
    def available(self) -> bool:
        if self._up:
            return True
        # unsupervised: try again once the backoff has passed
        return not self._supervised and time.monotonic() >= self._retry_at

    async def _checkout(self) -> RedisConnection:
        while True:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
                self._open -= 1
            if self._open < self.max_connections:
                break
            await self._lot.park()
        self._open += 1
        try:
            return await RedisConnection.open(self.address, self.timeout_s)
        except BaseException:
            self._open -= 1
            self._lot.unpark()
            raise

    def _checkin(self, conn: RedisConnection, ok: bool) -> None:
        if ok and not conn.closed and self._up:
            self._idle.append(conn)
        else:
            self._open -= 1
            conn.close_now()  # interrupted mid-command: its reply would be read as another's
        self._lot.unpark()

    async def _call(self, fn: Callable[[RedisConnection], Awaitable[T]]) -> T:
        """Run ``fn`` on a connection; a connection failure marks the tier down (:class:`_Down`),
        an error reply is counted and raised as RedisError."""
        if not self.available():
            self.skipped += 1
            raise _Down
        ok = False
        conn: RedisConnection | None = None
        try:
            conn = await self._checkout()
            result = await fn(conn)
            ok = True
        except RedisConnectionError as exc:
            self._failed(exc)
            raise _Down from None
        except RedisError:
            self.stats.errors += 1
            ok = conn is not None and not conn.closed
            raise
        finally:
            if conn is not None:
                self._checkin(conn, ok)
        if not self._up:
            self._recovered()
        return result

    def _failed(self, exc: Exception) -> None:
        self.stats.errors += 1
        self._failures_in_row += 1
        delay = backoff_delay(self._failures_in_row, BACKOFF_BASE_S, BACKOFF_CAP_S)
        self._retry_at = time.monotonic() + delay
        if self._up:
            self._up = False
            self.stats.failures += 1
            log.warning(
                "cache: Redis tier %s is unreachable (%s); serving from the local tiers until it"
                " answers again",
                self.address, exc,
            )  # fmt: skip
            if self._went_down is not None:
                self._went_down.set()
        for conn in self._idle:
            conn.close_now()
        self._open -= len(self._idle)
        self._idle.clear()

    def _recovered(self) -> None:
        self._up = True
        self._failures_in_row = 0
        log.warning("cache: Redis tier %s answers again; using it", self.address)

    async def run(self) -> None:
        """Bring the tier back when Redis answers again (a PING on a fresh connection, with a
        growing, jittered pause between tries)."""
        self._supervised = True
        try:
            while True:
                if self._up:
                    self._went_down = trio.Event()
                    await self._went_down.wait()
                await trio.sleep(max(0.0, self._retry_at - time.monotonic()))
                try:
                    conn = await RedisConnection.open(self.address, self.timeout_s)
                    try:
                        await conn.command("PING")
                    finally:
                        await conn.aclose()
                except RedisError as exc:
                    self._failures_in_row += 1
                    delay = backoff_delay(self._failures_in_row, BACKOFF_BASE_S, BACKOFF_CAP_S)
                    self._retry_at = time.monotonic() + delay
                    log.debug("cache: Redis tier %s still down: %s", self.address, exc)
                    continue
                self._recovered()
        finally:
            self._supervised = False

    # -- entries ----------------------------------------------------------------------------
    def _parse_head(self, head: bytes) -> tuple[Meta, int, int, int, int] | None:
        """``(meta, chunk count, version, chunk size, offset of inline data)``; None for a value
        that is not a head of ours."""
        try:
            magic, meta_len, nchunks, version, step = _HEAD.unpack_from(head)
            if magic != _MAGIC:
                return None
            start = _HEAD.size
            meta = decode_meta(memoryview(head)[start : start + meta_len])
        except (struct.error, *DECODE_ERRORS):
            return None
        if nchunks and (step < 1 or -(-meta.size // step) != nchunks):
            return None
        return meta, nchunks, version, step, start + meta_len

    def _inline(self, meta: Meta, head: bytes, offset: int) -> Value | None:
        if len(head) - offset != meta.size:
            return None
        data: Any = memoryview(head)[offset:] if meta.kind else head[offset:]
        try:
            return value_of(meta, data)
        except ValueError:
            return None

    def _assemble(self, meta: Meta, target: np.ndarray, chunks: Any) -> Value | None:
        """The value whose chunks the parser copied into ``target`` (each reply is then the
        chunk's length); anything else (a nil: expired or replaced) is a miss."""
        if not isinstance(chunks, list) or any(type(c) is not int for c in chunks):
            return None
        try:
            return value_of(meta, target if meta.kind else target.tobytes())
        except ValueError:
            return None

    async def get(self, key: str, now: float) -> tuple[Meta, Value] | None:
        (got,) = await self.get_many((key,), now)
        return got

    async def get_many(self, keys: Sequence[str], now: float) -> list[tuple[Meta, Value] | None]:
        if not keys:
            return []
        heads = [self.head_key(k) for k in keys]

        async def fetch(conn: RedisConnection) -> list[tuple[Meta, Value] | None]:
            replies = await conn.pipeline([("GET", h) for h in heads])
            out: list[tuple[Meta, Value] | None] = [None] * len(keys)
            chunked: list[_Chunked] = []
            for i, reply in enumerate(replies):
                if not isinstance(reply, bytes):
                    continue
                parsed = self._parse_head(reply)
                if parsed is None:
                    continue
                meta, nchunks, version, step, offset = parsed
                if meta.expired(now):
                    continue
                self.stats.read_bytes += len(reply)
                if nchunks:
                    names = self._chunk_keys(heads[i], version, nchunks)
                    chunked.append(_Chunked(i, meta, names, np.empty(meta.size, np.uint8), step))
                    continue
                value = self._inline(meta, reply, offset)
                if value is not None:
                    out[i] = (meta, value)
            if chunked:
                slots: list[memoryview] = []  # the parser copies each chunk into its place
                for c in chunked:
                    view = memoryview(c.target)
                    slots += [view[j * c.step : (j + 1) * c.step] for j in range(len(c.names))]
                commands = [("MGET", *c.names) for c in chunked]
                replies = await conn.pipeline(commands, sink=slots)
                for c, chunks in zip(chunked, replies, strict=True):
                    value = self._assemble(c.meta, c.target, chunks)
                    if value is not None:
                        self.stats.read_bytes += c.meta.size
                        out[c.index] = (c.meta, value)
            return out

        try:
            return await self._call(fetch)
        except (_Down, RedisError):
            return [None] * len(keys)

    async def contains(self, key: str, now: float) -> bool:
        head = self.head_key(key)

        async def exists(conn: RedisConnection) -> bool:
            return bool(await conn.command("EXISTS", head))

        try:
            return await self._call(exists)
        except (_Down, RedisError):
            return False

    async def contains_many(self, keys: Sequence[str], now: float) -> list[bool]:
        if not keys:
            return []
        heads = [self.head_key(k) for k in keys]

        async def exists(conn: RedisConnection) -> list[bool]:
            replies = await conn.pipeline([("EXISTS", h) for h in heads])
            return [r == 1 for r in replies]

        try:
            return await self._call(exists)
        except (_Down, RedisError):
            return [False] * len(keys)

    async def put(
        self, key: str, meta: Meta, value: Value, payload: tuple[int, bytes, Any], collect: bool
    ) -> tuple[bool, list[Evicted]]:
        now = time.time()
        if meta.expired(now):
            return False, []
        head_key = self.head_key(key)
        meta_bytes = encode_meta(meta.unhit())
        ttl = _px(meta, now)
        view = memoryview(payload[2]).cast("B") if meta.size else memoryview(b"")
        commands: list[tuple[Any, ...]] = []
        version: int | None = None  # of the chunks written (None: inline)
        if meta.size > self.chunk_bytes:
            version = secrets.randbits(63)
            step = self.chunk_bytes
            nchunks = -(-meta.size // step)
            names = self._chunk_keys(head_key, version, nchunks)
            for i, name in enumerate(names):
                commands.append(("SET", name, view[i * step : (i + 1) * step], *ttl))
            head = _HEAD.pack(_MAGIC, len(meta_bytes), nchunks, version, step) + meta_bytes
        else:
            head = b"".join((_HEAD.pack(_MAGIC, len(meta_bytes), 0, 0, 0), meta_bytes, view))
        commands.append(("SET", head_key, head, *ttl, "GET"))

        async def store(conn: RedisConnection) -> bool:
            replies = await conn.pipeline(commands)
            failed = next((r for r in replies if isinstance(r, RespErrorReply)), None)
            if failed is not None:
                self.stats.errors += 1
                log.debug("cache: Redis refused a put of %r: %s", key, failed.message)
                return False
            old = replies[-1]
            if isinstance(old, bytes):
                parsed = self._parse_head(old)
                if parsed is not None and parsed[1] and parsed[2] != version:
                    stale = self._chunk_keys(head_key, parsed[2], parsed[1])
                    await conn.command("DEL", *stale)
            self.stats.written_bytes += meta.size
            return True

        try:
            return await self._call(store), []
        except (_Down, RedisError):
            return False, []

    async def delete(self, key: str) -> bool:
        head_key = self.head_key(key)

        async def remove(conn: RedisConnection) -> bool:
            old = await conn.command("GETDEL", head_key)
            if not isinstance(old, bytes):
                return False
            parsed = self._parse_head(old)
            if parsed is not None and parsed[1]:
                await conn.command("DEL", *self._chunk_keys(head_key, parsed[2], parsed[1]))
            return True

        try:
            return await self._call(remove)
        except (_Down, RedisError):
            return False

    def close(self) -> None:
        for conn in self._idle:
            conn.close_now()
        self._open -= len(self._idle)
        self._idle.clear()

    def statistics(self) -> dict[str, float]:
        out = super().statistics()
        out["connections"] = self._open
        out["skipped"] = self.skipped
        out["failures"] = self.stats.failures
        return out
