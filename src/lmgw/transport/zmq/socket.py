"""A pyzmq socket driven by trio, without missed wake-ups and with one task on the fd.

Why this is not a thin ``await wait_readable(fd)`` wrapper (DESIGN.md §3, ZeroMQ):

* ``ZMQ_FD`` is edge-triggered and shared by both directions: it fires when the socket's state
  *may* have changed. Only ``zmq.EVENTS`` tells what is possible now, and reading it (or any
  send or recv) may consume the edge. So a recv in one task can swallow the edge another task
  waits for, and that task sleeps forever. Here every successful send/recv, and every read of
  ``EVENTS``, re-checks what the waiting tasks want and wakes them if it is now possible
  (a *kick*: the fd waiter's private cancel scope is cancelled, it re-reads ``EVENTS``).
* trio lets only one task wait on an fd (``BusyResourceError`` otherwise). Here exactly one
  task at a time waits on ``ZMQ_FD``; any other task that has to wait parks in a
  ``ParkingLot`` and is unparked whenever the fd waiter wakes (it then re-checks ``EVENTS``
  itself, and one of the woken tasks becomes the next fd waiter).
* A send never blocks forever: a full queue (HWM reached, or no connected peer with
  ``IMMEDIATE``) is waited out for at most the send timeout and then raised as
  :class:`SendBlocked`, naming the HWM. ``ROUTER_MANDATORY`` turns a send to an unknown peer
  into :class:`PeerUnreachable` instead of a silent drop.
* A ROUTER never waits for POLLOUT: with ``ROUTER_MANDATORY`` it reports POLLOUT when *any*
  peer has room, so a send to the one full peer would retry at once, forever, without a
  checkpoint (the loop froze, and the send timeout could never fire). EAGAIN on a ROUTER
  means "this peer is full": it is retried after a sleep that doubles from 1 ms to 25 ms.
  Any other socket that finds no room right after POLLOUT said there was backs off the same
  way, so no path is a busy loop.
* Fast paths (the op succeeds at once) do not touch the scheduler; every ``checkpoint_every``
  of them yields once (shielded: data already sent or received is never lost to a cancel), so a
  busy socket cannot starve the loop.

Resource handling: :meth:`ZmqSocket.close` is synchronous (usable in a cancelled scope), tells
trio the fd is closing (a waiting task gets ``ClosedResourceError``) and closes with
``LINGER=0`` by default, so an unreachable peer never delays shutdown; a graceful path (a
last ``Exit``) passes ``linger=ms``, and ZeroMQ flushes in the background. ``with
ZmqSocket.open(...)`` closes on every exit path.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from typing import Any

import trio
import zmq
from trio.lowlevel import ParkingLot, cancel_shielded_checkpoint, notify_closing, wait_readable

__all__ = [
    "DEFAULT_HWM",
    "PeerUnreachable",
    "ReceiveTimeout",
    "SendBlocked",
    "ZmqSocket",
    "ZmqTransportError",
]

DEFAULT_HWM = 1000
"""Messages queued per peer and direction before sends fail (ZeroMQ's own default)."""
CHECKPOINT_EVERY = 16
MIN_BACKOFF_S = 0.001
"""First retry of a send that found a full peer where POLLOUT cannot tell (ROUTER)."""
MAX_BACKOFF_S = 0.025
"""The retry interval doubles up to this: a full peer costs ~40 wake-ups a second at most."""
# plain ints: pyzmq's enum flags cost ~1 us per `&` on the hot path
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_DEFAULT: Any = object()


class ZmqTransportError(Exception):
    """Base of the transport errors of this module."""


class SendBlocked(ZmqTransportError):
    """The send queue stayed full (HWM reached, or no connected peer) past the timeout."""


class PeerUnreachable(ZmqTransportError):
    """ROUTER_MANDATORY: the addressed peer is not connected."""


class ReceiveTimeout(ZmqTransportError):
    """Nothing arrived within the receive timeout."""


class ZmqSocket:
    """A pyzmq socket for trio. Any number of tasks may send and receive concurrently."""

    __slots__ = (
        "_closed",
        "_fast",
        "_fd",
        "_fd_busy",
        "_is_router",
        "_kick_scope",
        "_lot",
        "_want_in",
        "_want_out",
        "checkpoint_every",
        "kicks",
        "received",
        "send_timeout",
        "sends_blocked",
        "sent",
        "socket",
    )

    def __init__(
        self,
        sock: zmq.Socket,
        *,
        send_timeout: float | None = 5.0,
        checkpoint_every: int = CHECKPOINT_EVERY,
    ) -> None:
        self.socket = sock
        self.send_timeout = send_timeout
        self.checkpoint_every = checkpoint_every
        self._fd: int = sock.getsockopt(zmq.FD)
        self._is_router = sock.type == zmq.ROUTER
        self._closed = False
        self._fast = 0
        self._fd_busy = False  # a task is inside wait_readable(fd)
        self._kick_scope: trio.CancelScope | None = None
        self._lot = ParkingLot()
        self._want_in = 0  # tasks waiting for POLLIN (on the fd or parked)
        self._want_out = 0
        self.sent = 0
        self.received = 0
        self.sends_blocked = 0  # sends that met a full queue (EAGAIN)
        self.kicks = 0  # wake-ups of the fd waiter after another task consumed the edge

    @classmethod
    def open(
        cls,
        ctx: zmq.Context | None,
        socket_type: int,
        *,
        hwm: int = DEFAULT_HWM,
        immediate: bool = False,
        identity: bytes | None = None,
        max_msg_size: int = -1,
        options: Mapping[int, int | bytes] | None = None,
        send_timeout: float | None = 5.0,
    ) -> ZmqSocket:
        """Create a configured socket: HWMs, ``LINGER=0``, ``ROUTER_MANDATORY`` on ROUTER,
        ``IMMEDIATE`` if asked (queue only to completed connections: no silent late delivery
        to a peer that is not there), an optional identity and message size limit."""
        sock = (ctx or zmq.Context.instance()).socket(socket_type)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, hwm)
            sock.setsockopt(zmq.RCVHWM, hwm)
            if max_msg_size >= 0:
                sock.setsockopt(zmq.MAXMSGSIZE, max_msg_size)
            if socket_type == zmq.ROUTER:
                sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if immediate:
                sock.setsockopt(zmq.IMMEDIATE, 1)
            if identity is not None:
                sock.setsockopt(zmq.IDENTITY, identity)
            for opt, value in (options or {}).items():
                sock.setsockopt(opt, value)
        except BaseException:
            sock.close(linger=0)
            raise
        return cls(sock, send_timeout=send_timeout)

    # -- endpoints ------------------------------------------------------------------------------
    def bind(self, endpoint: str) -> str:
        """Bind and return the resolved endpoint (``tcp://127.0.0.1:*`` -> the real port)."""
        self.socket.bind(endpoint)
        return self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def connect(self, endpoint: str) -> None:
        self.socket.connect(endpoint)

    # -- sending --------------------------------------------------------------------------------
    def try_send_multipart(self, frames: Sequence[Any], *, copy: bool = False) -> bool:
        """Send now if the queue has room; False if it is full. Never waits (usable from a
        cancelled scope, e.g. to send an abort). Raises PeerUnreachable, ClosedResourceError."""
        if self._closed:
            raise trio.ClosedResourceError("the zmq socket was closed")
        try:
            self.socket.send_multipart(frames, _NOBLOCK, copy=copy)
        except zmq.Again:
            self.sends_blocked += 1
            if self._want_in or self._want_out:
                self._recheck()  # the failed call may have consumed an edge someone waits for
            return False
        except zmq.ZMQError as exc:
            raise self._translate(exc) from None
        self.sent += 1
        if self._want_in or self._want_out:
            self._recheck()
        return True

    async def send_multipart(
        self, frames: Sequence[Any], *, copy: bool = False, timeout: float | None = _DEFAULT
    ) -> None:
        """Send one multipart message (atomic: all frames or none).

        Waits at most ``timeout`` seconds (default: the socket's ``send_timeout``; 0: do not
        wait) for room in the queue, then raises SendBlocked. Raises PeerUnreachable on a
        ROUTER for a peer that is not connected, ``trio.ClosedResourceError`` once closed.
        """
        if self.try_send_multipart(frames, copy=copy):
            await self._maybe_yield()
            return
        if timeout is _DEFAULT:
            timeout = self.send_timeout
        if timeout is not None and timeout <= 0:
            raise self._blocked(0.0)
        delay = MIN_BACKOFF_S
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            while True:
                if not self._is_router:  # POLLOUT is per socket there, so it can be trusted
                    await self._wait(_POLLOUT)
                    if self.try_send_multipart(frames, copy=copy):
                        return
                # A ROUTER's POLLOUT speaks for *some* peer, not this one; elsewhere POLLOUT
                # just proved wrong. Either way, waiting for it again would spin: back off.
                await trio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
                if self.try_send_multipart(frames, copy=copy):
                    return
        raise self._blocked(timeout)

    def _blocked(self, timeout: float | None) -> SendBlocked:
        hwm = self.socket.getsockopt(zmq.SNDHWM)
        return SendBlocked(
            f"send queue full for {timeout:g}s (SNDHWM={hwm}): the peer is not reading, "
            "or none is connected"
        )

    # -- receiving ------------------------------------------------------------------------------
    async def recv_multipart(self, *, copy: bool = True, timeout: float | None = None) -> list:
        """Receive one multipart message (bytes, or zmq Frames with ``copy=False``).

        Raises ReceiveTimeout after ``timeout`` seconds (None: wait as long as it takes),
        ``trio.ClosedResourceError`` once closed.
        """
        frames = self._try_recv(copy)
        if frames is not None:
            await self._maybe_yield()
            return frames
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            while True:
                await self._wait(_POLLIN)
                frames = self._try_recv(copy)
                if frames is not None:
                    return frames
        raise ReceiveTimeout(f"nothing received within {timeout:g}s")

    def try_recv_multipart(self, *, copy: bool = True) -> list | None:
        """Receive one message if one is queued, else None. Never waits and never yields, so
        a caller holds nothing received across a checkpoint unless it chooses to."""
        return self._try_recv(copy)

    async def wait_recv_ready(self, *, checked: bool = False) -> None:
        """Return once a message is queued (``try_recv_multipart`` then gets it, unless another
        task takes it first). For a reader loop that has just found the queue empty: it saves
        the second failed receive that ``recv_multipart`` would start with (every libzmq call
        costs syscalls). Raises ``trio.ClosedResourceError`` once closed.

        ``checked``: the caller's ``try_recv_multipart`` has just returned None, with no
        checkpoint since. That failed receive processed ZeroMQ's pending commands (and the
        fd's edge with them), so EVENTS is not read again before waiting, and this returns at
        the fd's first wake-up without reading it either: the retried receive reads the
        commands itself, and if it finds nothing the caller comes back here. Two libzmq
        calls fewer per message on an idle socket (~1.2 µs each: a mailbox poll and a fork
        check)."""
        await self._wait(_POLLIN, checked=checked)

    def recv_pending(self) -> bool:
        """Whether a message is queued now. Reading EVENTS processes ZeroMQ's pending
        commands, as a failed receive does, so a caller told False may go on with
        ``wait_recv_ready(checked=True)``; cheaper than that failed receive, whose ``zmq.Again``
        costs an exception (a reader that has just dispatched a batch asks this instead)."""
        if self._closed:
            raise trio.ClosedResourceError("the zmq socket was closed")
        return bool(self._recheck() & _POLLIN)

    def _try_recv(self, copy: bool) -> list | None:
        if self._closed:
            raise trio.ClosedResourceError("the zmq socket was closed")
        try:
            frames = self.socket.recv_multipart(_NOBLOCK, copy=copy)
        except zmq.Again:
            if self._want_in or self._want_out:
                self._recheck()  # the failed call may have consumed an edge someone waits for
            return None
        except zmq.ZMQError as exc:
            raise self._translate(exc) from None
        self.received += 1
        if self._want_in or self._want_out:
            self._recheck()
        return frames

    # -- the one fd waiter ------------------------------------------------------------------
    def _recheck(self) -> int:
        """Read EVENTS (which may consume the fd's edge) and kick the fd waiter if something a
        waiting task wants is possible now. Call after anything that may have eaten an edge."""
        events = self.socket.get(_EVENTS)
        if (
            (self._want_in and events & _POLLIN) or (self._want_out and events & _POLLOUT)
        ) and self._kick_scope is not None:
            self.kicks += 1
            self._kick_scope.cancel()
        return events

    async def _wait(self, mask: int, *, checked: bool = False) -> None:
        """Return once EVENTS has ``mask``; the caller then retries its op. ``checked``: the
        caller's op has just failed (see :meth:`wait_recv_ready`): wait without reading
        EVENTS, and return after one wake-up."""
        if mask == _POLLIN:
            self._want_in += 1
        else:
            self._want_out += 1
        try:
            if checked:
                await self._wait_fd()
                return
            while True:
                if self._recheck() & mask:
                    return
                await self._wait_fd()
        finally:
            if mask == _POLLIN:
                self._want_in -= 1
            else:
                self._want_out -= 1

    async def _wait_fd(self) -> None:
        """One wake-up: of the fd, when no other task waits on it; else of the task that does
        (it unparks everyone whenever it wakes, and everyone re-checks)."""
        if self._closed:
            raise trio.ClosedResourceError("the zmq socket was closed")
        if self._fd_busy:
            await self._lot.park()
            return
        self._fd_busy = True
        try:
            with trio.CancelScope() as scope:
                self._kick_scope = scope
                await wait_readable(self._fd)
        except OSError as exc:  # EBADF: the fd was closed under us
            if self._closed:
                raise trio.ClosedResourceError("the zmq socket was closed") from None
            raise exc
        finally:
            self._kick_scope = None
            self._fd_busy = False
            self._lot.unpark_all()  # everyone re-checks; one becomes the next waiter

    async def _maybe_yield(self) -> None:
        fast = self._fast + 1
        if fast >= self.checkpoint_every:
            self._fast = 0
            await cancel_shielded_checkpoint()
        else:
            self._fast = fast

    # -- lifetime -------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, linger: int = 0) -> None:
        """Close now (synchronous, idempotent). Waiting tasks get ``trio.ClosedResourceError``.

        ``linger`` (ms): how long ZeroMQ may go on delivering what is queued, in its own
        threads (this call never waits). 0, the default, drops it: shutdown is never held up
        by a peer that is gone. A graceful path (a final ``Exit``) passes a short linger.
        """
        if self._closed:
            return
        self._closed = True
        notify_closing(self._fd)
        self._lot.unpark_all()
        self.socket.close(linger=max(0, linger))

    def __enter__(self) -> ZmqSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _translate(self, exc: zmq.ZMQError) -> Exception:
        if exc.errno == errno.EHOSTUNREACH:
            return PeerUnreachable("no connected peer with that identity (ROUTER_MANDATORY)")
        if self._closed or exc.errno in (zmq.ENOTSOCK, zmq.ETERM):
            return trio.ClosedResourceError("the zmq socket was closed")
        return exc

    def statistics(self) -> dict[str, int]:
        """Counters for metrics and tests."""
        return {
            "sent": self.sent,
            "received": self.received,
            "sends_blocked": self.sends_blocked,
            "kicks": self.kicks,
            "parked": len(self._lot),
        }

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ZmqSocket {self.socket.type} {state} sent={self.sent} recv={self.received}>"
