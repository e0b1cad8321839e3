"""The compiled lane's event loop: plain requests relayed with one epoll set, pure Python.

Why: a trio task per connection pays trio's wait and wake-up path four times per proxied
request (client read, upstream write and read, client write), and that path alone is about
what vllm-router spends on a whole request (benchmarks/README.md, "floor.py"). This loop
takes every ready event of every lane connection in one ``epoll_wait`` and does the reads,
the framing and the writes itself; one trio task waits on the epoll fd
(:mod:`lmgw.http.lane`). The compiled twin (``relay.pyx``) is what runs; this one is its
reference in the tests and the fallback without a compiler.

The loop does no HTTP judgement of its own. It frames messages (:func:`request_frame`,
:func:`response_frame`) and asks Python at the points where the gateway decides:

* ``on_request(ident, data) -> plan | cont | None`` for each whole request: a plan
  ``(slot, payload, token, deadline, response_deadline)`` sends ``payload`` on a connection
  of ``slot``; anything else hands the client connection to Python (``on_demote``), ``None``
  with the request still unread, a continuation to finish this request first.
* ``on_answer(token, data) -> (answer, keep_alive) | plan | cont``: a whole 2xx/3xx answer
  with a Content-Length (the upstream connection is back in its slot already); a plan sends
  the request's next leg (a P/D request's decode leg after its prefill leg's answer).
* ``on_handoff(token, fd, data) -> cont``: any other answer, its connection and the bytes read.
* ``on_failure(token, kind, sent, reused, got) -> cont``: no answer (connect failed, dropped,
  timed out, aborted); ``sent`` whether the request left, ``got`` whether any answer byte came.
* ``on_timeout(token) -> answer | (answer, keep_alive)``: the request's deadline passed (the
  connection closes after a plain answer; a stream whose head went out ends, and may go on).
* ``on_abandon(token)``: the client left, or the lane closed, with the request in flight.
* ``on_demote(ident, fd, pending, cont)``: the client connection is Python's from now on.

Streamed answers (a plan with a sixth item, a :class:`Stream`): when the answer's head says
2xx and chunked, ``on_stream(token, head) -> (head, keep_alive) | None`` gives the client's
head (None: hand the answer over as ``on_handoff``); from then on each read of the worker's
body goes through :meth:`Stream.feed` (the chunked framing, whole SSE events only, their
count, the migration journal) and straight to the client, ``on_first(token)`` at the first
event, ``on_stream_end(token)`` after the last chunk (the upstream connection is back in its
slot). A stream that breaks (the worker closed or went silent for the stream's ``stall_s``,
the request's deadline, a bad chunk) is ``on_broken(token, kind, unsent) -> (tail, keep_alive)
| cont``: the bytes that end the client's stream, or a continuation that goes on with the
client connection (``unsent``: answer bytes the client has not taken yet, which it must send
first). While the client does not take what it is sent, the worker's connection is not read.
Burst pacing: when a read brings ``BURST_EVENTS`` or more events and the pass was busy (more
than one ready connection), the worker's connection is not read for ``BURST_WAIT_S``, so the
next read and write carry more events (what ``lmgw.transport.pacing`` does on trio); ``paused``
says how many wait, and ``run`` reads them again once their time has come (the caller wakes it
that soon).

Side legs (a plan with an eighth item, ``(slot, payload, response_deadline)``): a second
exchange of the same request, sent at the same time as its main leg on a connection of its
own, whose answer no client sees (an SGLang prefill leg, which runs alongside its decode leg).
The relay reads its whole answer (a Content-Length, chunked, or until the worker closes) and
calls ``on_side(token, kind, data)`` exactly once: ``kind`` 0 with the whole answer, or a
failure kind with what was read (CANCELLED: the request ended first, other than by its answer:
a failure, a hand-over, its deadline, a broken stream, the client gone, the lane closed; it is
cancelled before that end's callback). A side leg outlives the answer of its request (it goes
on by itself, its connection back to its slot after). While the request is in flight, an
``on_side`` that returns True ends it: ``on_failure`` (or ``on_broken`` mid-stream) with kind
SIDE.

Parked requests (a plan whose slot is ``PARK``): the request waits with no upstream leg (in
the gateway's admission queue) and its deadlines run; Python then calls one of
:meth:`Relay.resume` (a plan: the request goes on as if that plan had come first),
:meth:`Relay.reply` (a whole answer: the request ends) or :meth:`Relay.hand` (a continuation:
the connection is handed over with it). Each returns False when the request ended meanwhile
(its deadline, ``on_timeout``; the client gone, ``on_abandon``). A parked request's answer
may also come as a stream Python writes itself (a native worker's events): :meth:`Relay.push`
writes each part (the request is a stream from the first: its write timeout, its deadline and
the stall deadline each push gives apply; a break is ``on_broken``'s), :meth:`Relay.reply`
writes its last bytes, :meth:`Relay.broke` ends it as a broken stream.

SSE keep-alive comments (``beat_s`` > 0, and a plan whose seventh item is true: a streamed
request, on any of its legs): every ``beat_s`` until the stream's first event, ``on_beat(token)
-> bytes | None`` gives what to write, the client's head with the first comment while the
worker's head has not come (Python then gives an empty head in ``on_stream``); None stops them.

Connection states and timeouts follow the native server's (keep-alive, stalled writes) and the
pool's (connect timeout, idle upstream lifetime); a request's deadlines come with its plan. A
request that arrives in pieces is waited for ``partial_s``, then handed over (the server's
head and body timeouts take it from there), as is a body over ``lane_body`` (the server's
body budget applies to those). An idle upstream connection stays in the epoll set, so a
worker closing it is seen before it is reused; ``abort_origin`` shuts the waiting ones down,
and the next pass reports them ABORTED.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["Relay", "request_frame", "response_frame", "side_frame", "stream_head"]

# frame results
MORE = 0  #: the message is not whole yet
NOT_OURS = -1  #: a request the lane does not take (chunked, Expect, too large, malformed)
WHOLE = 1  #: a whole 2xx/3xx answer with a Content-Length
HANDOFF = 2  #: an answer the lane passes to Python with its connection
STREAM = 3  #: the head of a streamed (2xx, chunked) answer
BAD = 4  #: a side leg's answer that cannot be read (side_frame)

# failure kinds (on_failure)
CONNECT = 1  #: the connection could not be made
LOCAL = 2  #: the gateway is out of descriptors or memory
DROPPED = 3  #: the worker closed or reset the connection
TIMEOUT = 4  #: no answer within the response timeout
PROTOCOL = 5  #: the answer could not be held
ABORTED = 6  #: the gateway took the worker out of rotation meanwhile (abort_origin)
CONNECT_TIMEOUT = 7  #: the connection was not made within the connect timeout
DEADLINE = 8  #: the request's deadline passed mid-stream
SIDE = 9  #: the request's side leg failed, and Python ends the request for it (on_side)
CANCELLED = 10  #: a side leg whose request ended first (other than by its answer)

PARK = -4
"""A plan's slot that parks the request: no upstream leg until :meth:`Relay.resume`."""

STREAM_HIGH = 1 << 18
#: bytes Python pushed (:meth:`Relay.push`) that a client has not taken yet, past which it is
#: taken for gone (the stream's source, unlike a worker's socket, cannot be made to wait)
PUSH_MAX = 8 << 20
"""Bytes of a stream the client has not taken, at most, before the worker is not read."""
BURST_EVENTS = 3
"""Events in one read of a stream that make it a burst (as lmgw.transport.pacing's)."""
BURST_WAIT_S = 0.002
"""How long a burst on a busy loop leaves the worker unread, so that more events go in each
read and write: at most this much later for an event that comes that soon after a burst (the
first event never waits). stream_relay.py's burst regime (c=32, no token delay), CPU per
event: no wait 7.10 µs, 0.5 ms (trio's pacing) 6.23, 1 ms 5.65, 2 ms 3.94 with 16% more
events per second; the paced regime does not change (one event per read)."""

PIPELINE_CAP = 1 << 20
RESPONSE_HEAD_CAP = 1 << 16
_CLIENT, _UPSTREAM = 1, 2
_C_IDLE, _C_WAIT, _C_WRITE, _C_STREAM = 0, 1, 2, 3
_U_CONNECT, _U_SEND, _U_WAIT, _U_IDLE, _U_STREAM = 0, 1, 2, 3, 4
_IN, _OUT, _ERR, _HUP, _RDHUP = (
    select.EPOLLIN,
    select.EPOLLOUT,
    select.EPOLLERR,
    select.EPOLLHUP,
    select.EPOLLRDHUP,
)
_AGAIN = (errno.EAGAIN, errno.EINTR)
_FAILED = object()
_log = logging.getLogger("lmgw.lane")


def _scan_head(head: bytes) -> tuple[int, bool, bool, bool, bool]:
    """The header lines after the first: Content-Length (-1: none), and whether it was odd
    (a duplicate, an empty or malformed one), whether the Connection header says close,
    whether there was any Transfer-Encoding, and whether an Expect or Upgrade header."""
    length = -1
    odd = close = chunked = special = False
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length":
            if length >= 0 or not value or len(value) > 18 or not value.isdigit():
                odd = True
            if value and len(value) <= 18 and value.isdigit():
                length = int(value)
            elif length < 0:
                length = 0
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"connection":
            close = close or b"close" in value.lower()
        elif name in (b"expect", b"upgrade"):
            special = True
    return length, odd, close, chunked, special


def request_frame(data: bytes, max_head: int, max_body: int) -> int:
    """The length of the first whole request in ``data``; MORE (0) when it is not whole yet,
    NOT_OURS (-1) when the lane leaves it to the server (no head end within ``max_head``, a
    chunked or Expect request, an upgrade, a body over ``max_body``, an odd length)."""
    end = data.find(b"\r\n\r\n", 0, max_head + 4)
    if end < 0:
        return MORE if len(data) < max_head + 4 else NOT_OURS
    length, odd, _, chunked, special = _scan_head(data[:end])
    if odd or chunked or special:
        return NOT_OURS
    length = max(length, 0)
    if length > max_body:
        return NOT_OURS
    if len(data) < end + 4 + length:
        return MORE
    return end + 4 + length


def _response_head(data: bytes) -> tuple[int, int]:
    """(where an answer's head ends, its status): -1 while the head is not whole; status -1
    when the first line is not an HTTP/1.1 status line."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return -1, -1
    if end < 12 or not data.startswith(b"HTTP/1.1 ") or not data[9:12].isdigit():
        return end, -1
    return end, int(data[9:12])


def response_frame(data: bytes, cap: int) -> tuple[int, int, bool]:
    """(kind, length, keep-alive) of the answer at the start of ``data``: WHOLE with its
    length; MORE while its head, or the body of one the lane will take, is incomplete;
    HANDOFF for anything else (not 2xx/3xx, 204, 304, no or odd length, chunked, a body over
    ``cap``, a head over 64 KiB)."""
    end, status = _response_head(data)
    if end < 0:
        return (MORE if len(data) < RESPONSE_HEAD_CAP else HANDOFF), 0, False
    if status < 200 or status >= 400 or status in (204, 304):
        return HANDOFF, 0, False
    length, odd, close, chunked, _ = _scan_head(data[:end])
    if odd or chunked or length < 0 or length > cap:
        return HANDOFF, 0, False
    if len(data) < end + 4 + length:
        return MORE, 0, not close
    return WHOLE, end + 4 + length, not close


def stream_head(data: bytes) -> tuple[int, int, bool]:
    """(kind, head length, keep-alive) of a streamed request's answer: STREAM when its whole
    head says 2xx (not 204) and chunked, with no Content-Length; MORE while the head is not
    whole; HANDOFF otherwise (:func:`response_frame` judges it then)."""
    end, status = _response_head(data)
    if end < 0:
        return (MORE if len(data) < RESPONSE_HEAD_CAP else HANDOFF), 0, False
    if status < 200 or status >= 300 or status == 204:
        return HANDOFF, 0, False
    length, odd, close, chunked, _ = _scan_head(data[:end])
    if odd or not chunked or length >= 0:
        return HANDOFF, 0, False
    return STREAM, end + 4, not close


def _chunked_end(data: bytes, at: int) -> int:
    """Where a chunked body that starts at ``at`` ends (after its last chunk and trailers);
    MORE (0) while it is not whole, -1 when the framing is wrong."""
    n = len(data)
    while True:
        eol = data.find(b"\r\n", at)
        if eol < 0:
            return MORE if n - at < 1024 else -1
        line = data[at:eol]
        size_text = line.split(b";", 1)[0].strip(b" \t")
        if not size_text or len(size_text) > 15 or size_text.strip(b"0123456789abcdefABCDEF"):
            return -1
        size = int(size_text, 16)
        at = eol + 2
        if size == 0:
            break
        if n < at + size + 2:
            return MORE
        if data[at + size : at + size + 2] != b"\r\n":
            return -1
        at += size + 2
    while True:  # trailers, up to an empty line
        eol = data.find(b"\r\n", at)
        if eol < 0:
            return MORE if n - at < 8192 else -1
        if eol == at:
            return eol + 2
        at = eol + 2


def side_frame(data: bytes, cap: int, eof: bool) -> tuple[int, int, bool]:
    """(kind, length, keep-alive) of a side leg's answer at the start of ``data``: WHOLE
    with its length, whatever its status; MORE while it is not whole; BAD when it cannot be
    read (no status line, an odd length, bad chunks, over ``cap`` bytes or a 64 KiB head).
    The body: a Content-Length, chunked, none (1xx, 204, 304), or up to the worker's close
    (``eof``: the worker closed after ``data``)."""
    end, status = _response_head(data)
    if end < 0:
        return (MORE if len(data) < RESPONSE_HEAD_CAP else BAD), 0, False
    if status < 0:
        return BAD, 0, False
    length, odd, close, chunked, _ = _scan_head(data[:end])
    start = end + 4
    if odd or (chunked and length >= 0):
        return BAD, 0, False
    if status < 200 or status in (204, 304):
        return WHOLE, start, not close
    if chunked:
        stop = _chunked_end(data, start)
        if stop < 0 or stop - start > cap:
            return BAD, 0, False
        if stop == MORE:
            return (BAD if len(data) - start > cap else MORE), 0, False
        return WHOLE, stop, not close
    if length >= 0:
        if length > cap:
            return BAD, 0, False
        if len(data) < start + length:
            return MORE, 0, False
        return WHOLE, start + length, not close
    if len(data) - start > cap:
        return BAD, 0, False
    return (WHOLE, len(data), False) if eof else (MORE, 0, False)


class _Conn:
    __slots__ = (
        "aborted",
        "beat_at",
        "deadline",
        "gen",
        "ident",
        "keep",
        "kind",
        "mask",
        "owner",
        "peer",
        "rbuf",
        "resp_deadline",
        "reused",
        "side",
        "since",
        "slot",
        "sock",
        "state",
        "stream",
        "token",
        "wbuf",
        "woff",
    )

    def __init__(self, kind: int, sock: socket.socket, now: float) -> None:
        self.kind = kind
        self.sock = sock
        self.state = 0
        self.gen = 0
        self.peer = -1
        #: a client's side leg in flight (its fd), a side leg's client while its request is
        #: in flight (a side leg's ``token`` is its request's; a main leg's is None)
        self.side = -1
        self.owner = -1
        self.slot = -1
        self.reused = False
        self.aborted = False
        self.keep = True
        self.mask = 0
        self.rbuf = bytearray()
        self.wbuf = b""
        self.woff = 0
        self.since = now
        self.deadline = 0.0
        self.resp_deadline = 0.0
        #: the next SSE keep-alive comment of a stream waiting for its first event (0: none)
        self.beat_at = 0.0
        self.ident: Any = None
        self.token: Any = None
        self.stream: Any = None


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:  # a callback's bug must not take the loop down
        _log.exception("a callback of the compiled lane failed; its connection is closed")
        return _FAILED


class Relay:
    """The lane's connections and its loop (see the module docstring for the callbacks)."""

    def __init__(
        self,
        on_request: Callable[[Any, bytes], Any],
        on_answer: Callable[[Any, bytes], Any],
        on_handoff: Callable[[Any, int, bytes], Any],
        on_failure: Callable[[Any, int, bool, bool, bool], Any],
        on_timeout: Callable[[Any], Any],
        on_abandon: Callable[[Any], Any],
        on_demote: Callable[[Any, int, bytes, Any], Any],
        *,
        on_stream: Callable[[Any, bytes], Any] | None = None,
        on_first: Callable[[Any], Any] | None = None,
        on_stream_end: Callable[[Any], Any] | None = None,
        on_broken: Callable[[Any, int, bytes], Any] | None = None,
        on_beat: Callable[[Any], Any] | None = None,
        on_side: Callable[[Any, int, bytes], Any] | None = None,
        beat_s: float = 0.0,
        max_head: int = 65536,
        max_body: int = 32 << 20,
        answer_cap: int = 8 << 20,
        keepalive_s: float = 75.0,
        write_timeout_s: float = 60.0,
        upstream_idle_s: float = 55.0,
        partial_s: float = 1.0,
        lane_body: int = 1 << 20,
        connect_timeout_s: float = 5.0,
        max_idle: int = 256,
    ) -> None:
        self.on_request, self.on_answer, self.on_handoff = on_request, on_answer, on_handoff
        self.on_failure, self.on_timeout, self.on_abandon = on_failure, on_timeout, on_abandon
        self.on_demote = on_demote
        self.on_stream, self.on_first = on_stream, on_first
        self.on_stream_end, self.on_broken = on_stream_end, on_broken
        self.on_beat = on_beat
        self.on_side = on_side
        #: seconds between SSE keep-alive comments (limits.sse_keepalive_s; 0: none)
        self.beat_s = beat_s
        self.max_head, self.max_body, self.answer_cap = max_head, max_body, answer_cap
        self.keepalive_s, self.write_timeout_s = keepalive_s, write_timeout_s
        self.upstream_idle_s = upstream_idle_s
        self.partial_s = partial_s
        self.connect_timeout_s = connect_timeout_s
        #: idle upstream connections kept per slot (upstream.max_idle_per_worker)
        self.max_idle = max_idle
        self.lane_body = min(lane_body, max_body)
        self._ep: select.epoll | None = select.epoll()
        self._conns: dict[int, _Conn] = {}
        self._gens: dict[int, int] = {}
        self._slots: dict[int, tuple[int, bytes]] = {}
        self._idle: dict[int, list[int]] = {}
        self.clients = self.in_flight = self.upstreams = self.closed = 0
        self._closed_idents: list[Any] = []  # the idents of the client connections closed
        self.connects = self.reuses = self.served = self.demoted = self.stale = 0
        self.streamed = 0  # streamed answers relayed to their end
        self.sides = 0  # side legs in flight
        self._busy = False  # this pass has more than one ready connection
        self._paused: list[tuple[int, int, float]] = []  # (fd, gen, until): burst pacing
        self._parked: dict[Any, int] = {}  # token -> client fd: requests parked (PARK)

    def fileno(self) -> int:
        return self._ep.fileno() if self._ep is not None else -1

    # -- table ------------------------------------------------------------------------------
    def _register(self, fd: int, c: _Conn, mask: int) -> None:
        c.gen = self._gens.get(fd, 0) + 1
        self._gens[fd] = c.gen
        c.mask = mask
        self._conns[fd] = c
        self._ep.register(fd, mask)  # type: ignore[union-attr]

    def _mask(self, fd: int, c: _Conn, mask: int) -> None:
        if c.mask != mask:
            c.mask = mask
            self._ep.modify(fd, mask)  # type: ignore[union-attr]

    def _forget(self, fd: int, c: _Conn) -> None:
        try:
            self._ep.unregister(fd)  # type: ignore[union-attr]
        except (OSError, ValueError):
            pass
        self._conns.pop(fd, None)
        self._gens[fd] = c.gen + 1
        if c.kind == _CLIENT:
            self.clients -= 1
        else:
            self.upstreams -= 1
        c.kind = 0
        c.peer = c.side = c.owner = -1
        c.ident = c.token = None
        c.rbuf = bytearray()
        c.wbuf = b""

    # -- public API -------------------------------------------------------------------------
    def add_client(self, fd: int, ident: Any, now: float) -> None:
        if fd in self._conns:
            raise ValueError(f"fd {fd} is already in the lane")
        c = _Conn(_CLIENT, socket.socket(fileno=fd), now)
        c.ident = ident
        self.clients += 1
        self._register(fd, c, _IN | _RDHUP)

    def set_origin(self, slot: int, sockaddr: bytes) -> None:
        if slot < 0 or len(sockaddr) > 128:
            raise ValueError("bad slot or address")
        family = int.from_bytes(sockaddr[:2], sys.byteorder)
        self._slots[slot] = (family, sockaddr)
        self._idle.setdefault(slot, [])

    def forget_origin(self, slot: int) -> None:
        if slot in self._slots:
            idle = self._idle[slot]
            while idle:
                self._close_upstream(idle[-1])
            del self._slots[slot]

    def abort_origin(self, slot: int) -> int:
        n = 0
        for c in list(self._conns.values()):
            busy = c.peer >= 0 or c.token is not None  # (a side leg's token: its request's)
            if c.kind == _UPSTREAM and c.slot == slot and busy and c.state != _U_IDLE:
                c.aborted = True
                try:
                    c.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                n += 1
        return n

    def sweep(self, now: float) -> None:
        for fd, c in list(self._conns.items()):
            if self._conns.get(fd) is not c:
                continue
            if c.kind == _CLIENT:
                if c.state == _C_WAIT:
                    if c.deadline and now >= c.deadline:
                        self._deadline(fd, now)
                    elif c.resp_deadline and now >= c.resp_deadline:
                        self._fail(fd, TIMEOUT)
                    elif c.beat_at and now >= c.beat_at:
                        self._beat(fd, c, now)
                elif c.state == _C_IDLE:
                    if c.rbuf and c.deadline and now >= c.deadline:
                        self._demote(fd, None)  # a request in pieces: the server's timeouts
                    elif now - c.since > self.keepalive_s:
                        self._close_client(fd)
                elif c.state == _C_STREAM:
                    if c.wbuf and self.write_timeout_s and now - c.since > self.write_timeout_s:
                        self._gone(fd)  # the client stopped reading its stream
                    elif c.deadline and now >= c.deadline:
                        self._broken(fd, DEADLINE, now)
                    elif c.resp_deadline and now >= c.resp_deadline:
                        self._broken(fd, TIMEOUT, now)
                    elif c.beat_at and now >= c.beat_at:
                        self._beat(fd, c, now)
                elif self.write_timeout_s and now - c.since > self.write_timeout_s:
                    self._close_client(fd)
            elif c.state == _U_IDLE and now - c.since > self.upstream_idle_s:
                self._close_upstream(fd)
            elif c.token is not None:  # a side leg
                if c.state == _U_CONNECT and now - c.since > self.connect_timeout_s:
                    self._side_done(fd, CONNECT_TIMEOUT, now)
                elif c.resp_deadline and now >= c.resp_deadline:
                    self._side_done(fd, TIMEOUT, now)
            elif c.state == _U_CONNECT and c.peer >= 0 and now - c.since > self.connect_timeout_s:
                self._fail(c.peer, CONNECT_TIMEOUT)

    def drain(self) -> None:
        for fd, c in list(self._conns.items()):
            if c.kind == _CLIENT and self._conns.get(fd) is c:
                c.keep = False
                if c.state == _C_IDLE and not c.rbuf:
                    self._close_client(fd)

    def close(self) -> None:
        if self._ep is None:
            return
        for fd, c in list(self._conns.items()):
            if c.kind == _CLIENT and c.token is not None:
                self._cancel_side(c.side)
                _call(self.on_abandon, self._finish(fd))
        for fd, c in list(self._conns.items()):  # the side legs that outlived their request
            if c.kind == _UPSTREAM and c.token is not None:
                self._cancel_side(fd)
        for fd, c in list(self._conns.items()):
            if c.kind == _CLIENT:
                self._closed_idents.append(c.ident)
                self.closed += 1
            sock = c.sock
            self._forget(fd, c)
            sock.close()
        for idle in self._idle.values():
            idle.clear()
        self._ep.close()
        self._ep = None

    def take_closed(self) -> list[Any]:
        gone, self._closed_idents, self.closed = self._closed_idents, [], 0
        return gone

    def idle_upstreams(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def idle_in(self, slot: int) -> int:
        """Idle upstream connections of ``slot``."""
        return len(self._idle.get(slot, ()))

    # -- the loop ----------------------------------------------------------------------------
    @property
    def paused(self) -> int:
        """Streams left unread for a moment (burst pacing): run again within BURST_WAIT_S."""
        return len(self._paused)

    def _resume(self, now: float) -> None:
        """Read the paused streams whose wait is over again."""
        waiting = []
        for fd, gen, until in self._paused:
            u = self._conns.get(fd)
            if u is None or u.gen != gen or u.state != _U_STREAM:
                continue  # closed, or done, since
            if until > now:
                waiting.append((fd, gen, until))
                continue
            c = self._conns.get(u.peer)
            if c is None or len(c.wbuf) - c.woff <= STREAM_HIGH:  # (else the client's turn)
                self._mask(fd, u, _IN | _RDHUP)
        self._paused = waiting

    def run(self, now: float) -> int:
        if self._ep is None:
            return 0
        if self._paused:
            self._resume(now)
        events = self._ep.poll(0, 256)
        if not events:
            return 0
        self._busy = len(events) > 1
        batch = [(fd, ev, self._gens.get(fd, 0)) for fd, ev in events]
        for fd, _, gen in batch:  # idle upstream connections the worker closed: first
            c = self._conns.get(fd)
            if c is not None and c.kind == _UPSTREAM and c.state == _U_IDLE and c.gen == gen:
                self.stale += 1
                self._close_upstream(fd)
        for fd, ev, gen in batch:
            c = self._conns.get(fd)
            if c is None or c.gen != gen:
                continue
            if c.kind == _CLIENT:
                self._client_event(fd, c, ev, now)
            else:
                self._upstream_event(fd, c, ev, now)
        return len(events)

    # -- clients -----------------------------------------------------------------------------
    def _client_event(self, fd: int, c: _Conn, ev: int, now: float) -> None:
        if ev & _OUT and c.state == _C_WRITE:
            if self._flush(c) < 0:
                self._close_client(fd)
                return
            if not c.wbuf:
                self._written(fd, c, now)
            return
        if ev & _OUT and c.state == _C_STREAM and c.wbuf:
            if self._flush(c) < 0:
                self._gone(fd)
                return
            c.since = now
            if not c.wbuf:  # caught up: read the worker again
                self._mask(fd, c, _IN | _RDHUP)
                if c.peer >= 0:
                    self._mask(c.peer, self._conns[c.peer], _IN | _RDHUP)
        if not ev & (_IN | _RDHUP | _HUP | _ERR):
            return
        if c.state != _C_IDLE and len(c.rbuf) >= PIPELINE_CAP:
            self._mask(fd, c, _RDHUP | (_OUT if c.wbuf else 0))
            if ev & (_RDHUP | _HUP | _ERR):
                self._gone(fd)
            return
        data = _recv(c.sock)
        if data is None:
            return
        if not data:
            self._gone(fd)
            return
        c.rbuf += data
        if c.state == _C_IDLE:
            self._dispatch(fd, c, now)

    def _gone(self, fd: int) -> None:
        c = self._conns[fd]
        if (c.state == _C_WAIT or c.state == _C_STREAM) and c.token is not None:
            self._cancel_side(c.side)
            if c.peer >= 0:
                self._close_upstream(c.peer)
            _call(self.on_abandon, self._finish(fd))
        self._close_client(fd)

    def _close_client(self, fd: int) -> None:
        c = self._conns[fd]
        self._cancel_side(c.side)
        if c.peer >= 0:
            self._close_upstream(c.peer)
        self._closed_idents.append(c.ident)
        sock = c.sock
        self._forget(fd, c)
        sock.close()
        self.closed += 1

    def _dispatch(self, fd: int, c: _Conn, now: float) -> None:
        """Start the first whole request in the buffer (the client is idle), or hand the
        connection to Python."""
        if not c.rbuf:
            c.since = now
            return
        length = request_frame(bytes(c.rbuf), self.max_head, self.lane_body)
        if length == MORE:  # the rest is on its way: a while, then the server's
            if not c.deadline:
                c.deadline = now + self.partial_s
            return
        if length < 0:
            self._demote(fd, None)
            return
        data = bytes(c.rbuf[:length])
        res = _call(self.on_request, c.ident, data)
        if res is _FAILED:
            self._close_client(fd)
            return
        if type(res) is not tuple:
            if res is not None:  # the request is Python's now: it is not in the buffer
                del c.rbuf[:length]
            self._demote(fd, res)
            return
        del c.rbuf[:length]
        self._start(fd, c, res, now)

    def _demote(self, fd: int, cont: Any) -> None:
        c = self._conns[fd]
        pending = bytes(c.rbuf)
        ident = c.ident
        if c.peer >= 0:
            self._close_upstream(c.peer)
        sock = c.sock
        self._forget(fd, c)
        sock.detach()
        self.demoted += 1
        if _call(self.on_demote, ident, fd, pending, cont) is _FAILED:
            socket.close(fd)
            self._closed_idents.append(ident)
            self.closed += 1

    def _start(self, fd: int, c: _Conn, plan: tuple, now: float) -> None:
        slot, _, token, deadline, resp_deadline = plan[:5]
        c.stream = plan[5] if len(plan) > 5 else None
        if len(plan) > 6 and plan[6] and self.beat_s > 0:
            if not c.beat_at:  # (a next leg keeps the beat's rhythm)
                c.beat_at = now + self.beat_s
        else:
            c.beat_at = 0.0
        c.token = token
        c.deadline = deadline
        c.resp_deadline = resp_deadline
        c.state = _C_WAIT
        c.since = now
        self.in_flight += 1
        if slot == PARK:
            self._parked[token] = fd
            return
        self._launch(fd, c, plan, now)

    def _launch(self, fd: int, c: _Conn, plan: tuple, now: float) -> None:
        """The upstream leg of ``plan`` for the client ``fd`` in C_WAIT (and its side leg)."""
        slot, payload, token = plan[:3]
        side = plan[7] if len(plan) > 7 else None
        if side is not None and self._side_start(fd, side, token, now) < 0:
            return  # the side leg's failure ended the request
        ufd = self._checkout(slot, now)
        if ufd < 0:
            self._fail(fd, LOCAL if ufd == -2 else CONNECT)
            return
        u = self._conns[ufd]
        u.peer = fd
        c.peer = ufd
        u.since = now
        u.rbuf = bytearray()
        if u.state == _U_CONNECT:
            u.wbuf, u.woff = payload, 0
            return
        if self._send(ufd, u, payload) < 0:
            self._fail(fd, DROPPED)

    def _send(self, ufd: int, u: _Conn, payload: bytes) -> int:
        try:
            r = u.sock.send(payload, socket.MSG_NOSIGNAL)
        except OSError as exc:
            if exc.errno not in _AGAIN:
                return -1
            r = 0
        if r < len(payload):
            u.wbuf, u.woff = payload, r
            u.state = _U_SEND
            self._mask(ufd, u, _OUT | _IN | _RDHUP)
        else:
            u.state = _U_WAIT
            self._mask(ufd, u, _IN | _RDHUP)
        return 0

    def _flush(self, c: _Conn) -> int:
        while c.woff < len(c.wbuf):
            try:
                r = c.sock.send(memoryview(c.wbuf)[c.woff :], socket.MSG_NOSIGNAL)
            except OSError as exc:
                return 0 if exc.errno in _AGAIN else -1
            c.woff += r
        c.wbuf, c.woff = b"", 0
        return 0

    def _answer(self, fd: int, answer: bytes, keep: bool, now: float) -> None:
        c = self._conns[fd]
        if not keep:
            c.keep = False
        c.state = _C_WRITE
        c.since = now
        try:
            r = c.sock.send(answer, socket.MSG_NOSIGNAL)
        except OSError as exc:
            if exc.errno not in _AGAIN:
                self._close_client(fd)
                return
            r = 0
        if r < len(answer):
            c.wbuf, c.woff = answer, r
            self._mask(fd, c, _OUT | _RDHUP)
            return
        self._written(fd, c, now)

    def _written(self, fd: int, c: _Conn, now: float) -> None:
        if not c.keep:
            self._close_client(fd)
            return
        c.state = _C_IDLE
        c.since = now
        self._mask(fd, c, _IN | _RDHUP)
        if c.rbuf:
            self._dispatch(fd, c, now)

    def _held_fd(self, token: Any) -> int:
        """The client fd of the request ``token`` that has no upstream leg (parked, or a
        stream Python writes), or -1; it stays held."""
        fd = self._parked.get(token, -1)
        c = self._conns.get(fd)
        if c is None or c.token is not token or c.peer >= 0 or c.state not in (_C_WAIT, _C_STREAM):
            return -1
        return fd

    def push(self, token: Any, data: bytes, resp_deadline: float, now: float) -> bool:
        """Write ``data`` to the client of the held request ``token`` (parked, or pushed to
        before), after what it has not taken yet; from the first push the request is a
        stream (no more keep-alive comments) whose next part is due by ``resp_deadline`` (0:
        none). False when it ended meanwhile, or its client is gone or too far behind (then
        shut down: the loop abandons it)."""
        fd = self._held_fd(token)
        if fd < 0:
            return False
        c = self._conns[fd]
        if c.state == _C_WAIT:
            c.state = _C_STREAM
            c.since = now
        c.beat_at = 0.0
        c.resp_deadline = resp_deadline
        if c.wbuf:
            if len(c.wbuf) - c.woff > PUSH_MAX:
                c.sock.shutdown(socket.SHUT_RDWR)
                return False
            c.wbuf = bytes(memoryview(c.wbuf)[c.woff :]) + data
            c.woff = 0
            return True
        try:
            r = c.sock.send(data, socket.MSG_NOSIGNAL)
        except OSError as exc:
            if exc.errno not in _AGAIN:
                c.sock.shutdown(socket.SHUT_RDWR)
                return False
            r = 0
        if r < len(data):
            c.wbuf, c.woff = data, r
            c.since = now
            self._mask(fd, c, _IN | _RDHUP | _OUT)
        return True

    def broke(self, token: Any, kind: int, now: float) -> bool:
        """The stream Python writes for ``token`` broke (``kind``): ``on_broken`` says how it
        ends, as for a worker's stream. False when it is not such a stream (any more)."""
        fd = self._held_fd(token)
        if fd < 0 or self._conns[fd].state != _C_STREAM:
            return False
        self._broken(fd, kind, now)
        return True

    def _parked_fd(self, token: Any) -> int:
        """The client fd of the request ``token`` parked (unparked now), or -1."""
        fd = self._held_fd(token)
        if fd < 0 or self._conns[fd].state != _C_WAIT:
            return -1
        del self._parked[token]
        return fd

    def resume(self, token: Any, plan: tuple, now: float) -> bool:
        """The parked request ``token`` goes on with ``plan`` (its deadlines, stream and leg:
        as :meth:`_start`'s; a ``PARK`` plan parks it again with those deadlines); False when
        it ended meanwhile."""
        fd = self._parked_fd(token)
        if fd < 0:
            return False
        c = self._conns[fd]
        c.stream = plan[5] if len(plan) > 5 else None
        c.beat_at = now + self.beat_s if len(plan) > 6 and plan[6] and self.beat_s > 0 else 0.0
        c.deadline, c.resp_deadline = plan[3], plan[4]
        if plan[0] == PARK:  # parked again, for the rest of its wait (e.g. a native answer)
            self._parked[token] = fd
            return True
        self._launch(fd, c, plan, now)
        return True

    def reply(self, token: Any, answer: bytes, keep: bool, now: float) -> bool:
        """The held request ``token`` ends with ``answer`` (a stream's: its last bytes); False
        when it ended meanwhile."""
        fd = self._held_fd(token)
        if fd < 0:
            return False
        c = self._conns[fd]
        self._finish(fd)
        if not keep:
            c.keep = False
        self._stream_tail(fd, c, answer, now)
        return True

    def hand(self, token: Any, cont: Any) -> bool:
        """The parked request ``token``'s connection goes to Python with ``cont`` (as after a
        failure); False when it ended meanwhile."""
        fd = self._parked_fd(token)
        if fd < 0:
            return False
        self._finish(fd)
        self._conns[fd].state = _C_IDLE
        self._demote(fd, cont)
        return True

    def _finish(self, fd: int) -> Any:
        c = self._conns[fd]
        token, c.token = c.token, None
        if self._parked:
            self._parked.pop(token, None)
        c.stream = None
        c.peer = -1
        if c.side >= 0:  # the side leg goes on by itself
            self._conns[c.side].owner = -1
            c.side = -1
        c.deadline = c.resp_deadline = c.beat_at = 0.0
        self.in_flight -= 1
        return token

    def _fail(self, fd: int, kind: int) -> None:
        c = self._conns[fd]
        self._cancel_side(c.side)
        reused = got = False
        sent = kind not in (CONNECT, LOCAL, CONNECT_TIMEOUT)
        if c.peer >= 0:
            u = self._conns[c.peer]
            reused = u.reused
            got = bool(u.rbuf)
            if u.aborted and kind != SIDE:
                kind = ABORTED
            if sent:
                sent = u.state == _U_WAIT or (u.state == _U_SEND and u.woff > 0)
            self._close_upstream(c.peer)
        token = self._finish(fd)
        c.state = _C_IDLE
        cont = _call(self.on_failure, token, kind, sent, reused, got)
        if cont is _FAILED:
            self._close_client(fd)
            return
        self._demote(fd, cont)

    def _deadline(self, fd: int, now: float) -> None:
        c = self._conns[fd]
        self._cancel_side(c.side)
        if c.peer >= 0:
            self._close_upstream(c.peer)
        token = self._finish(fd)
        answer = _call(self.on_timeout, token)
        if type(answer) is tuple and len(answer) == 2 and type(answer[0]) is bytes:
            self._answer(fd, answer[0], answer[1], now)  # (a stream's end: it may go on)
            return
        if type(answer) is not bytes:
            self._close_client(fd)
            return
        self._answer(fd, answer, False, now)

    # -- upstreams ---------------------------------------------------------------------------
    def _checkout(self, slot: int, now: float) -> int:
        spec = self._slots.get(slot)
        if spec is None:
            return -1
        idle = self._idle[slot]
        while idle:
            fd = idle.pop()
            u = self._conns.get(fd)
            if u is not None and u.kind == _UPSTREAM and u.state == _U_IDLE:
                self.reuses += 1
                u.reused = True
                u.aborted = False
                u.state = _U_WAIT
                return fd
        family, sockaddr = spec
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError:
            return -2
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(_address(family, sockaddr))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            return -1
        u = _Conn(_UPSTREAM, sock, now)
        u.state = _U_CONNECT
        u.slot = slot
        self.upstreams += 1
        self.connects += 1
        self._register(sock.fileno(), u, _OUT | _IN | _RDHUP)
        return sock.fileno()

    def _close_upstream(self, fd: int) -> None:
        u = self._conns.get(fd)
        if u is None or u.kind != _UPSTREAM:
            return
        if u.state == _U_IDLE:
            idle = self._idle.get(u.slot)
            if idle is not None and fd in idle:
                idle.remove(fd)
        if u.peer >= 0:
            peer = self._conns.get(u.peer)
            if peer is not None:
                peer.peer = -1
        if u.owner >= 0:
            self._conns[u.owner].side = -1
        sock = u.sock
        self._forget(fd, u)
        sock.close()

    def _release(self, ufd: int, u: _Conn, now: float) -> None:
        if u.slot not in self._slots or len(self._idle[u.slot]) >= self.max_idle:
            self._close_upstream(ufd)
            return
        u.peer = -1
        u.state = _U_IDLE
        u.since = now
        u.rbuf = bytearray()
        self._idle[u.slot].append(ufd)
        self._mask(ufd, u, _IN | _RDHUP)

    def _ready(self, ufd: int, u: _Conn, ev: int) -> int:
        """An upstream connection's event up to its answer's read: the connect, then the
        request's bytes. 0 when the answer may be read now, -1 when there is nothing to do
        yet, else how the exchange failed."""
        if u.state == _U_CONNECT:
            if not ev & (_OUT | _ERR | _HUP):
                return -1
            err = u.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err or ev & (_ERR | _HUP):
                return CONNECT
            u.state = _U_SEND
            ev |= _OUT
        if u.state == _U_SEND and ev & _OUT:
            if self._flush(u) < 0:
                return DROPPED
            if u.wbuf:
                self._mask(ufd, u, _OUT | _IN | _RDHUP)
                return -1
            u.state = _U_WAIT
            self._mask(ufd, u, _IN | _RDHUP)
        return 0 if ev & (_IN | _RDHUP | _HUP | _ERR) else -1

    def _upstream_event(self, ufd: int, u: _Conn, ev: int, now: float) -> None:
        if u.token is not None:
            self._side_event(ufd, u, ev, now)
            return
        cfd = u.peer
        if cfd < 0:
            self._close_upstream(ufd)
            return
        kind = self._ready(ufd, u, ev)
        if kind:
            if kind > 0:
                self._fail(cfd, kind)
            return
        data = _recv(u.sock)
        if data is None:
            return
        if u.state == _U_STREAM:
            if not data:
                self._broken(cfd, DROPPED, now)
                return
            c = self._conns[cfd]
            if c.stream.stall_s:
                c.resp_deadline = now + c.stream.stall_s
            self._stream_out(cfd, c, ufd, u, b"", data, now)
            return
        if not data:
            self._fail(cfd, DROPPED)
            return
        u.rbuf += data
        if self._conns[cfd].stream is not None:
            kind, length, keep = stream_head(bytes(u.rbuf))
            if kind == MORE:
                return
            if kind == STREAM:
                self._stream_start(cfd, ufd, u, length, keep, now)
                return
        kind, length, keep = response_frame(bytes(u.rbuf), self.answer_cap)
        if kind == MORE:
            return
        if kind == HANDOFF:
            self._handoff(cfd, ufd)
            return
        whole = bytes(u.rbuf[:length])
        if keep and len(u.rbuf) == length:
            self._release(ufd, u, now)
        else:
            self._close_upstream(ufd)
        self.served += 1
        c = self._conns[cfd]
        beat_at = c.beat_at
        token = self._finish(cfd)
        res = _call(self.on_answer, token, whole)
        if type(res) is tuple and len(res) == 2 and type(res[0]) is bytes:
            self._answer(cfd, res[0], res[1], now)
        elif type(res) is tuple and len(res) >= 5:  # the request's next leg
            c.state = _C_IDLE
            c.beat_at = beat_at
            self._start(cfd, c, res, now)
        elif res is _FAILED:
            self._close_client(cfd)
        else:
            self._conns[cfd].state = _C_IDLE
            self._demote(cfd, res)

    # -- streamed answers ---------------------------------------------------------------------
    def _stream_start(
        self, cfd: int, ufd: int, u: _Conn, length: int, keep: bool, now: float
    ) -> None:
        c = self._conns[cfd]
        res = _call(self.on_stream, c.token, bytes(u.rbuf[:length]))
        if res is None:  # not an answer to stream here: Python's, as any other
            self._handoff(cfd, ufd)
            return
        if res is _FAILED:
            self._gone(cfd)
            return
        head, client_keep = res
        if not client_keep:
            c.keep = False
        s = c.stream
        s.keep = keep
        rest = bytes(u.rbuf[length:])
        u.rbuf = bytearray()
        u.state = _U_STREAM
        c.state = _C_STREAM
        c.resp_deadline = now + s.stall_s if s.stall_s else 0.0
        self._stream_out(cfd, c, ufd, u, head, rest, now)

    def _stream_out(
        self, cfd: int, c: _Conn, ufd: int, u: _Conn, head: bytes, data: bytes, now: float
    ) -> None:
        """Relay what ``data`` completes (after ``head``, the client's head, if not sent)."""
        s = c.stream
        started = s.started
        before = s.events
        try:
            out = s.feed(data) if data else b""
        except Exception:  # (ChunkedError: a worker's bad framing; or a tap's bug)
            _log.warning("a streamed answer could not be read; its stream ends", exc_info=True)
            if head and not self._stream_send(cfd, c, ufd, u, head, now):
                return
            self._broken(cfd, PROTOCOL, now)
            return
        if not started and s.started:
            c.beat_at = 0.0  # (keep-alive comments only until the first event)
            _call(self.on_first, c.token)
        if head:
            out = head + out
        if s.done:
            keep = s.keep and not s.decoder.extra
            token = self._finish(cfd)
            if keep:
                self._release(ufd, u, now)
            else:
                self._close_upstream(ufd)
            self.streamed += 1
            if _call(self.on_stream_end, token) is _FAILED:
                self._close_client(cfd)
                return
            self._stream_tail(cfd, c, out, now)
            return
        if not out or not self._stream_send(cfd, c, ufd, u, out, now):
            return
        if self._busy and s.events - before >= BURST_EVENTS and u.mask:
            self._mask(ufd, u, 0)  # a burst on a busy loop: let more pile up
            self._paused.append((ufd, u.gen, now + BURST_WAIT_S))

    def _stream_send(self, cfd: int, c: _Conn, ufd: int, u: _Conn, out: bytes, now: float) -> bool:
        """Write ``out`` to the client, after what it has not taken yet; past STREAM_HIGH
        untaken bytes, stop reading the worker. False when the client is gone."""
        if c.wbuf:
            c.wbuf = bytes(memoryview(c.wbuf)[c.woff :]) + out
            c.woff = 0
        else:
            try:
                r = c.sock.send(out, socket.MSG_NOSIGNAL)
            except OSError as exc:
                if exc.errno not in _AGAIN:
                    self._gone(cfd)
                    return False
                r = 0
            if r == len(out):
                return True
            c.wbuf, c.woff = out, r
            c.since = now
            self._mask(cfd, c, _IN | _RDHUP | _OUT)
        if len(c.wbuf) - c.woff > STREAM_HIGH:
            self._mask(ufd, u, 0)
        return True

    def _stream_tail(self, cfd: int, c: _Conn, out: bytes, now: float) -> None:
        """The last bytes of a stream; then the client connection goes on as after an answer."""
        if c.wbuf:
            c.wbuf = bytes(memoryview(c.wbuf)[c.woff :]) + out
            c.woff = 0
            c.state = _C_WRITE
            c.since = now
            self._mask(cfd, c, _OUT | _RDHUP)
            return
        self._answer(cfd, out, c.keep, now)

    def _beat(self, fd: int, c: _Conn, now: float) -> None:
        """An SSE keep-alive comment for a stream with no event yet: ``on_beat`` gives the
        bytes (the client's head too, the first time before the worker's); None ends them."""
        out = _call(self.on_beat, c.token)
        if type(out) is not bytes:
            c.beat_at = 0.0
            return
        c.beat_at = now + self.beat_s
        if c.state == _C_STREAM:
            if c.peer >= 0:
                self._stream_send(fd, c, c.peer, self._conns[c.peer], out, now)
            return
        # waiting for the worker's head: nothing else is written meanwhile, and a client that
        # cannot take a few bytes now took none of the many comments before (it is gone)
        try:
            r = c.sock.send(out, socket.MSG_NOSIGNAL)
        except OSError:
            r = -1
        if r != len(out):
            self._gone(fd)

    def _broken(self, cfd: int, kind: int, now: float) -> None:
        """The stream ends before its last chunk: Python says how (``on_broken``)."""
        c = self._conns[cfd]
        self._cancel_side(c.side)
        if c.peer >= 0:
            if self._conns[c.peer].aborted and kind != SIDE:
                kind = ABORTED
            self._close_upstream(c.peer)
        token = self._finish(cfd)
        unsent = bytes(memoryview(c.wbuf)[c.woff :]) if c.wbuf else b""
        res = _call(self.on_broken, token, kind, unsent)
        if type(res) is tuple:
            tail, keep = res
            if not keep:
                c.keep = False
            self._stream_tail(cfd, c, tail, now)
            return
        if res is _FAILED:
            self._close_client(cfd)
            return
        c.wbuf, c.woff = b"", 0  # the continuation sends them first
        c.state = _C_IDLE
        self._demote(cfd, res)

    def _handoff(self, cfd: int, ufd: int) -> None:
        u = self._conns[ufd]
        c = self._conns[cfd]
        self._cancel_side(c.side)
        data = bytes(u.rbuf)
        u.peer = c.peer = -1
        sock = u.sock
        self._forget(ufd, u)
        sock.detach()
        token = self._finish(cfd)
        c.state = _C_IDLE
        cont = _call(self.on_handoff, token, ufd, data)
        if cont is _FAILED:
            socket.close(ufd)
            self._close_client(cfd)
            return
        self._demote(cfd, cont)

    # -- side legs ----------------------------------------------------------------------------
    def _side_start(self, fd: int, side: tuple, token: Any, now: float) -> int:
        """Send the side leg of client ``fd``'s request; -1 when its failure at once ended
        the request (``on_side`` said so)."""
        slot, payload, resp_deadline = side
        ufd = self._checkout(slot, now)
        if ufd < 0:
            res = _call(self.on_side, token, LOCAL if ufd == -2 else CONNECT, b"")
            if res is True or res is _FAILED:
                self._fail(fd, SIDE)
                return -1
            return 0
        u = self._conns[ufd]
        u.token = token
        u.owner = fd
        self._conns[fd].side = ufd
        self.sides += 1
        u.since = now
        u.resp_deadline = resp_deadline
        u.rbuf = bytearray()
        if u.state == _U_CONNECT:
            u.wbuf, u.woff = payload, 0
            return 0
        if self._send(ufd, u, payload) < 0:
            self._side_done(ufd, DROPPED, now)
            return -1 if self._conns.get(fd) is None or self._conns[fd].token is not token else 0
        return 0

    def _side_event(self, ufd: int, u: _Conn, ev: int, now: float) -> None:
        kind = self._ready(ufd, u, ev)
        if kind:
            if kind > 0:
                self._side_done(ufd, kind, now)
            return
        data = _recv(u.sock)
        if data is None:
            return
        if not data:  # the worker closed: an answer without a length ends so
            kind, length, _ = side_frame(bytes(u.rbuf), self.answer_cap, True)
            if u.aborted or kind != WHOLE:
                self._side_done(ufd, ABORTED if u.aborted else DROPPED, now)
            else:
                self._side_done(ufd, 0, now, length)
            return
        u.rbuf += data
        kind, length, keep = side_frame(bytes(u.rbuf), self.answer_cap, False)
        if kind == MORE:
            return
        if kind == BAD:
            self._side_done(ufd, PROTOCOL, now)
            return
        self._side_done(ufd, 0, now, length, keep and len(u.rbuf) == length)

    def _side_done(
        self, ufd: int, kind: int, now: float, length: int = 0, keep: bool = False
    ) -> None:
        """The side leg on ``ufd`` is over (``kind`` 0: its answer is ``length`` bytes): its
        connection back to its slot or closed, then ``on_side``, which may end its request."""
        u = self._conns[ufd]
        token, owner = u.token, u.owner
        data = bytes(u.rbuf[:length]) if kind == 0 else bytes(u.rbuf)
        u.token = None
        self.sides -= 1
        if owner >= 0:
            self._conns[owner].side = -1
            u.owner = -1
        if kind == 0 and keep:
            self._release(ufd, u, now)
        else:
            self._close_upstream(ufd)
        if _call(self.on_side, token, kind, data) is not True or owner < 0:
            return
        c = self._conns.get(owner)
        if c is None or c.token is not token:
            return
        if c.state == _C_WAIT:
            self._fail(owner, SIDE)
        elif c.state == _C_STREAM:
            self._broken(owner, SIDE, now)

    def _cancel_side(self, ufd: int) -> None:
        """The side leg on ``ufd`` (none: -1) is cancelled (``on_side`` CANCELLED): its
        request ends other than by its answer, or the lane closes."""
        if ufd < 0:
            return
        u = self._conns[ufd]
        token = u.token
        if u.owner >= 0:
            self._conns[u.owner].side = -1
        u.token = None
        u.owner = -1
        self.sides -= 1
        self._close_upstream(ufd)
        _call(self.on_side, token, CANCELLED, b"")


def _recv(sock: socket.socket) -> bytes | None:
    """What one read brings: None when nothing is there yet, b"" at EOF or on an error."""
    try:
        return sock.recv(65536)
    except OSError as exc:
        return None if exc.errno in _AGAIN else b""


def _address(family: int, sockaddr: bytes) -> tuple[Any, ...]:
    """The Python address of a packed ``struct sockaddr_in`` / ``sockaddr_in6``."""
    port = int.from_bytes(sockaddr[2:4], "big")
    if family == socket.AF_INET:
        return socket.inet_ntop(family, sockaddr[4:8]), port
    return (
        socket.inet_ntop(family, sockaddr[8:24]),
        port,
        0,
        int.from_bytes(sockaddr[24:28], sys.byteorder),
    )


def pack_sockaddr(host: str, port: int) -> bytes | None:
    """``struct sockaddr_in`` / ``sockaddr_in6`` for a numeric ``host``; None for a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            packed = socket.inet_pton(family, host)
        except OSError:
            continue
        head = family.to_bytes(2, sys.byteorder) + port.to_bytes(2, "big")
        if family == socket.AF_INET:
            return head + packed + bytes(8)
        return head + bytes(4) + packed + bytes(4)
    return None
