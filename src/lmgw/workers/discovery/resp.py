"""A minimal Redis client for trio: a sans-IO RESP2 codec and one connection on trio sockets.

redis-py's ``redis.asyncio`` needs an asyncio loop (under trio it fails with "no running event
loop"), and discovery and the cache pool's Redis tier need only a handful of commands (AUTH,
SELECT, SCAN, GET, MGET, SET, DEL, EXISTS, PING), so this is the small part of a client that is
needed: :func:`encode_command` and :class:`RespParser` know the wire format and do no I/O;
:class:`RedisConnection` owns one TCP stream and runs one command, or one pipeline of commands
(:meth:`RedisConnection.pipeline`: every command sent in one write, the replies read in order),
at a time, each under ``timeout_s``.

Arguments and bulk strings are binary-safe: ``bytes``, ``bytearray`` and ``memoryview``
arguments go out as they are, and big ones are written from their own buffer rather than copied
into the command (:func:`encode_command_parts`).

Replies decode to Python values: simple strings to ``str``, bulk strings to ``bytes`` (``None``
for nil), integers to ``int``, arrays to ``list`` (``None`` for a nil array) and error replies to
:class:`RespErrorReply` values, which :meth:`RedisConnection.command` raises as
:class:`RedisReplyError`. The parser bounds what a server may make it buffer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import trio

__all__ = [
    "NEED_DATA",
    "RedisAddress",
    "RedisConnection",
    "RedisConnectionError",
    "RedisError",
    "RedisReplyError",
    "RespErrorReply",
    "RespParser",
    "RespProtocolError",
    "encode_command",
    "encode_command_parts",
    "parse_redis_url",
]

DEFAULT_PORT = 6379
MAX_BULK_BYTES = 64 << 20
"""Largest bulk string accepted by default: worker entries are ~200 bytes and the cache pool
chunks values far below this; it only stops a runaway."""
BIG_ARG_BYTES = 64 << 10
"""Arguments at least this big are sent from their own buffer (no copy into the command)."""
MAX_READ_BYTES = 4 << 20
"""Most bytes read at once while a big bulk string is arriving (64 KiB otherwise)."""
MAX_ARRAY_ITEMS = 1 << 20
MAX_DEPTH = 8
"""SCAN replies nest two deep; anything much deeper is not a reply to our commands."""
MAX_LINE_BYTES = 64 << 10
_INT = re.compile(rb"-?[0-9]+")


class RedisError(Exception):
    """Any failure talking to Redis."""


class RedisConnectionError(RedisError):
    """Could not connect, the connection broke or timed out, or the reply was malformed."""


class RespProtocolError(RedisConnectionError):
    """The bytes from the server are not RESP2 (the connection cannot be used any more)."""


class RedisReplyError(RedisError):
    """The server answered a command with an error reply (``-ERR ...``, ``-WRONGPASS ...``)."""


class RespErrorReply(NamedTuple):
    """An error reply as a value (the parser returns it; the connection raises it)."""

    message: str


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Any = _NeedData()
"""Returned by :meth:`RespParser.next` until a whole reply has been fed."""


Arg = bytes | bytearray | memoryview | str | int | float


def _arg(value: Arg) -> bytes | bytearray | memoryview:
    if isinstance(value, bytes | bytearray):
        return value
    if isinstance(value, memoryview):
        return value if value.format == "B" and value.ndim == 1 else value.cast("B")
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"cannot send {type(value).__name__} to Redis")
    return str(value).encode()


def encode_command(*args: Arg) -> bytes:
    """One command as a RESP array of bulk strings (what every Redis command takes)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _arg(arg)
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


def encode_command_parts(args: Sequence[Arg], out: list[Any]) -> None:
    """Append one command to ``out`` as buffers to write in order: small pieces joined, each
    argument of at least :data:`BIG_ARG_BYTES` as its own buffer (a view, not a copy)."""
    small = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _arg(arg)
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if n >= BIG_ARG_BYTES:
            small.append(b"$%d\r\n" % n)
            out.append(b"".join(small))
            out.append(data)
            small = [b"\r\n"]
        else:
            small += (b"$%d\r\n" % n, data, b"\r\n")
    out.append(b"".join(small))


class RespParser:
    """Incremental RESP2 reply parser: ``feed`` bytes as they arrive, ``next`` until NEED_DATA.

    Arrays are assembled on an explicit stack, so a large reply that arrives in many pieces is
    parsed once, not re-parsed from its start on every piece.
    """

    def __init__(
        self,
        *,
        max_bulk_bytes: int = MAX_BULK_BYTES,
        max_array_items: int = MAX_ARRAY_ITEMS,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        self.max_bulk_bytes = max_bulk_bytes
        self.max_array_items = max_array_items
        self.max_depth = max_depth
        self._buf = bytearray()
        self._pos = 0
        self._stack: list[tuple[list[Any], int]] = []  # (items so far, items expected)
        self._want = 0  # bytes still missing from the bulk string being received
        self._sink: Sequence[memoryview] | None = None
        self._sink_at = 0

    def sink(self, slots: Sequence[memoryview] | None) -> None:
        """Copy the next bulk strings straight into ``slots`` (one slot per bulk string or nil,
        in order): a bulk string whose length is its slot's is copied there and parsed as its
        length (an int) instead of as bytes, which saves the caller a copy when it assembles
        chunks of one value. A length that differs parses as bytes as usual. None: stop."""
        self._sink = slots
        self._sink_at = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def wanted(self) -> int:
        """Bytes the bulk string now arriving still lacks (0 when none is known): a reader can
        ask for that much at once instead of 64 KiB at a time."""
        return max(0, self._want - (len(self._buf) - self._pos))

    def next(self) -> Any:
        """The next complete reply, or NEED_DATA. Raises RespProtocolError on bad input."""
        while True:
            value = self._element()
            if value is NEED_DATA:
                self._compact()
                return NEED_DATA
            if isinstance(value, _ArrayStart):
                if len(self._stack) >= self.max_depth:
                    raise RespProtocolError(f"replies nested deeper than {self.max_depth}")
                self._stack.append(([], value.n))
                continue
            while self._stack:
                items, expected = self._stack[-1]
                items.append(value)
                if len(items) < expected:
                    break
                self._stack.pop()
                value = items
            else:
                return value

    def _compact(self) -> None:
        if self._pos and (self._pos == len(self._buf) or self._pos > 1 << 16):
            del self._buf[: self._pos]
            self._pos = 0

    def _int(self, line: bytes) -> int:
        if not _INT.fullmatch(line):
            raise RespProtocolError(f"expected an integer, got {bytes(line)[:40]!r}")
        return int(line)

    def _element(self) -> Any:
        """One scalar, an _ArrayStart for a non-empty array, or NEED_DATA (nothing consumed)."""
        buf, pos = self._buf, self._pos
        end = buf.find(b"\r\n", pos)
        if end < 0:
            if len(buf) - pos > MAX_LINE_BYTES:
                raise RespProtocolError("reply line too long")
            return NEED_DATA
        kind, line = buf[pos], bytes(buf[pos + 1 : end])
        after = end + 2
        if kind == 0x2B:  # + simple string
            value: Any = line.decode("utf-8", "replace")
        elif kind == 0x2D:  # - error
            value = RespErrorReply(line.decode("utf-8", "replace"))
        elif kind == 0x3A:  # : integer
            value = self._int(line)
        elif kind == 0x24:  # $ bulk string
            n = self._int(line)
            if n == -1:
                value = None
                self._sink_at += 1
            elif not 0 <= n <= self.max_bulk_bytes:
                raise RespProtocolError(f"bulk string length {n} out of range")
            else:
                if len(buf) < after + n + 2:
                    self._want = after + n + 2 - pos
                    return NEED_DATA
                self._want = 0
                if buf[after + n : after + n + 2] != b"\r\n":
                    raise RespProtocolError("bulk string not terminated by CRLF")
                sink, at = self._sink, self._sink_at
                with memoryview(buf) as view:  # one copy, not a slice and then a copy
                    if sink is not None and at < len(sink) and sink[at].nbytes == n:
                        sink[at][:] = view[after : after + n]
                        value = n
                    else:
                        value = bytes(view[after : after + n])
                self._sink_at = at + 1
                after += n + 2
        elif kind == 0x2A:  # * array
            n = self._int(line)
            if n == -1:
                value = None
            elif not 0 <= n <= self.max_array_items:
                raise RespProtocolError(f"array length {n} out of range")
            else:
                value = _ArrayStart(n) if n else []
        else:
            raise RespProtocolError(f"unknown reply type {bytes([kind])!r}")
        self._pos = after
        return value


class _ArrayStart(NamedTuple):
    n: int


class RedisAddress(NamedTuple):
    """Where a Redis server is and how to log in (from a ``redis://`` URL)."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:  # for logs: never the password
        return f"redis://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]`` (user and password percent-encoded).

    Raises ValueError with a message that never contains the password.
    """
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a redis:// URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme == "rediss":
        raise ValueError("TLS (rediss://) is not supported; use redis:// on a trusted network")
    if scheme != "redis":
        raise ValueError("expected redis://[[user]:password@]host[:port][/db]")
    if not parts.hostname:
        raise ValueError("no host in the redis:// URL")
    if port == 0:
        raise ValueError("port 0 in the redis:// URL")
    if parts.query or parts.fragment:
        raise ValueError("no query or fragment allowed in the redis:// URL")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database must be a number, got {path!r}")
    host = parts.hostname
    return RedisAddress(
        host=host,
        port=port if port is not None else DEFAULT_PORT,
        db=int(path) if path else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


class RedisConnection:
    """One connection to Redis, logged in and on the right database.

    Owned by one task (trio raises BusyResourceError if two use it at once). Every failure is a
    :class:`RedisError`; after a :class:`RedisConnectionError` the connection is closed.
    """

    def __init__(self, stream: trio.abc.Stream, address: RedisAddress, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._stream = stream
        self._parser = RespParser()
        self._busy = False  # a command was sent and its reply not read (e.g. it was cancelled)
        self.closed = False

    @classmethod
    async def open(cls, address: RedisAddress, timeout_s: float) -> RedisConnection:
        """Connect, AUTH when the address has a password, SELECT a database other than 0."""
        with trio.move_on_after(timeout_s) as scope:
            try:
                stream = await trio.open_tcp_stream(address.host, address.port)
            except OSError as e:
                raise RedisConnectionError(f"cannot connect to {address}: {e}") from None
        if scope.cancelled_caught:
            raise RedisConnectionError(f"cannot connect to {address}: timed out")
        conn = cls(stream, address, timeout_s)
        try:
            if address.password is not None:
                user = (address.username,) if address.username else ()
                await conn.command("AUTH", *user, address.password)
            if address.db:
                await conn.command("SELECT", address.db)
        except BaseException:
            await conn.aclose()
            raise
        return conn

    async def command(self, *args: Arg) -> Any:
        """Send one command and return its reply; an error reply raises RedisReplyError."""
        (reply,) = await self._exchange((args,))
        if isinstance(reply, RespErrorReply):
            raise RedisReplyError(reply.message)
        return reply

    async def pipeline(
        self, commands: Sequence[Sequence[Arg]], sink: Sequence[memoryview] | None = None
    ) -> list[Any]:
        """Send every command in one go and return their replies in order, error replies as
        :class:`RespErrorReply` values (one failed command does not hide the others' replies).
        Redis runs the commands of one connection in order, so a reader on another connection
        sees the effects of earlier commands before those of later ones. ``sink``: the replies'
        bulk strings are copied into these buffers (:meth:`RespParser.sink`)."""
        if not commands:
            return []
        return await self._exchange(commands, sink)

    async def _exchange(
        self, commands: Sequence[Sequence[Arg]], sink: Sequence[memoryview] | None = None
    ) -> list[Any]:
        if self._busy:  # an interrupted command's reply would be read as this one's
            await self.aclose()
        if self.closed:
            raise RedisConnectionError("connection closed")
        out: list[Any] = []
        for args in commands:
            encode_command_parts(args, out)
        replies: list[Any] = []
        parser = self._parser
        parser.sink(sink)
        done = False
        with trio.move_on_after(self.timeout_s):
            try:
                self._busy = True
                await self._send(out)
                while len(replies) < len(commands):
                    reply = parser.next()
                    if reply is NEED_DATA:
                        want = min(MAX_READ_BYTES, max(65536, parser.wanted()))
                        data = await self._stream.receive_some(want)
                        if not data:
                            raise RedisConnectionError(f"{self.address} closed the connection")
                        parser.feed(data)
                        continue
                    replies.append(reply)
                self._busy = False
                done = True
                parser.sink(None)
            except (OSError, trio.BrokenResourceError) as e:
                await self.aclose()
                raise RedisConnectionError(f"{self.address}: {e}") from None
            except RedisConnectionError:
                await self.aclose()
                raise
        if not done:
            await self.aclose()
            raise RedisConnectionError(f"{self.address}: no reply within {self.timeout_s:g} s")
        return replies

    async def _send(self, parts: list[Any]) -> None:
        """Write the buffers in order: small neighbours joined, big ones from their own memory."""
        pending: list[Any] = []
        size = 0
        for part in parts:
            n = part.nbytes if isinstance(part, memoryview) else len(part)
            if n >= BIG_ARG_BYTES:
                if pending:
                    await self._stream.send_all(b"".join(pending))
                    pending, size = [], 0
                await self._stream.send_all(part)
            else:
                pending.append(part)
                size += n
                if size >= BIG_ARG_BYTES:
                    await self._stream.send_all(b"".join(pending))
                    pending, size = [], 0
        if pending:
            await self._stream.send_all(b"".join(pending))

    def close_now(self) -> None:
        """Close without waiting (from sync code, or a ``finally`` under cancellation)."""
        if not self.closed:
            self.closed = True
            sock = getattr(self._stream, "socket", None)
            if sock is not None:
                sock.close()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            await trio.aclose_forcefully(self._stream)
