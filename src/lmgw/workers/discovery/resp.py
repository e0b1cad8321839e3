"""A minimal Redis client for trio: a sans-IO RESP2 codec and one connection on trio sockets.

redis-py's ``redis.asyncio`` needs an asyncio loop (under trio it fails with "no running event
loop"), and discovery needs only a handful of commands (AUTH, SELECT, SCAN, MGET, SET, DEL,
PING), so this is the small part of a client that is needed: :func:`encode_command` and
:class:`RespParser` know the wire format and do no I/O; :class:`RedisConnection` owns one TCP
stream and runs one command at a time, each under ``timeout_s``.

Replies decode to Python values: simple strings to ``str``, bulk strings to ``bytes`` (``None``
for nil), integers to ``int``, arrays to ``list`` (``None`` for a nil array) and error replies to
:class:`RespErrorReply` values, which :meth:`RedisConnection.command` raises as
:class:`RedisReplyError`. The parser bounds what a server may make it buffer.
"""

from __future__ import annotations

import re
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
    "parse_redis_url",
]

DEFAULT_PORT = 6379
MAX_BULK_BYTES = 64 << 20
"""Largest bulk string accepted: worker entries are ~200 bytes; this only stops a runaway."""
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


def _arg(value: bytes | str | int | float) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"cannot send {type(value).__name__} to Redis")
    return str(value).encode()


def encode_command(*args: bytes | str | int | float) -> bytes:
    """One command as a RESP array of bulk strings (what every Redis command takes)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _arg(arg)
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


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

    def feed(self, data: bytes) -> None:
        self._buf += data

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
            elif not 0 <= n <= self.max_bulk_bytes:
                raise RespProtocolError(f"bulk string length {n} out of range")
            else:
                if len(buf) < after + n + 2:
                    return NEED_DATA
                if buf[after + n : after + n + 2] != b"\r\n":
                    raise RespProtocolError("bulk string not terminated by CRLF")
                value = bytes(buf[after : after + n])
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

    async def command(self, *args: bytes | str | int | float) -> Any:
        """Send one command and return its reply; an error reply raises RedisReplyError."""
        if self._busy:  # an interrupted command's reply would be read as this one's
            await self.aclose()
        if self.closed:
            raise RedisConnectionError("connection closed")
        reply: Any = NEED_DATA
        with trio.move_on_after(self.timeout_s):
            try:
                self._busy = True
                await self._stream.send_all(encode_command(*args))
                reply = self._parser.next()
                while reply is NEED_DATA:
                    data = await self._stream.receive_some(65536)
                    if not data:
                        raise RedisConnectionError(f"{self.address} closed the connection")
                    self._parser.feed(data)
                    reply = self._parser.next()
                self._busy = False
            except (OSError, trio.BrokenResourceError) as e:
                await self.aclose()
                raise RedisConnectionError(f"{self.address}: {e}") from None
            except RedisConnectionError:
                await self.aclose()
                raise
        if reply is NEED_DATA:
            await self.aclose()
            raise RedisConnectionError(f"{self.address}: no reply within {self.timeout_s:g} s")
        if isinstance(reply, RespErrorReply):
            raise RedisReplyError(reply.message)
        return reply

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            await trio.aclose_forcefully(self._stream)
