"""A lean trio byte stream over a non-blocking stdlib socket, for the hot paths.

Why: ``trio.SocketStream.send_all`` / ``receive_some`` wrap every call in a conflict detector,
an error-translation context manager, a socket-method wrapper and a scheduler checkpoint. On a
proxy that makes four socket calls per request, that machinery cost more than the syscalls.
:class:`RawStream` tries the syscall first and only parks the task in
``trio.lowlevel.wait_readable`` / ``wait_writable`` when the kernel says EAGAIN, the way trio
does internally, minus the layers. Errors are translated to the same trio exceptions
(``BrokenResourceError``, ``ClosedResourceError``) so callers do not change.

Fairness: a call that succeeds at once does not yield to the scheduler, so every
``CHECKPOINT_EVERY`` fast calls we yield explicitly; a busy relay can never starve the loop.
"""

from __future__ import annotations

import errno
import socket
import time

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint,
    notify_closing,
    wait_readable,
    wait_writable,
)

CHECKPOINT_EVERY = 16
_BROKEN = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class RawStream:
    """A connected TCP socket. One task may send and one may receive at a time."""

    __slots__ = ("_fast", "closed", "socket", "stalled_since")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock
        self.closed = False
        self._fast = 0
        #: perf_counter time since which a send has been waiting for the peer to read (0.0:
        #: none is): the HTTP server's watchdog drops clients that stop reading
        #: (limits.write_timeout_s). Set only on the slow path, after an EAGAIN.
        self.stalled_since = 0.0

    @classmethod
    def from_trio(cls, stream: trio.SocketStream) -> RawStream:
        """Take over the socket of a trio stream (e.g. one returned by a trio listener)."""
        tsock = stream.socket
        sock = socket.socket(tsock.family, tsock.type, tsock.proto, fileno=tsock.detach())
        return cls(sock)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Bytes from the peer; b"" at EOF. Raises BrokenResourceError on a reset."""
        sock = self.socket
        try:
            data = sock.recv(max_bytes)
        except BlockingIOError:
            return await self.receive_reply(max_bytes)
        except _BROKEN as exc:
            raise trio.BrokenResourceError(str(exc)) from None
        except OSError as exc:
            raise self._translate(exc) from None
        # inline, not a helper coroutine: this runs for every read
        fast = self._fast + 1
        if fast >= CHECKPOINT_EVERY:
            self._fast = 0
            await cancel_shielded_checkpoint()  # yield, but never lose data read already
        else:
            self._fast = fast
        return data

    async def receive_reply(self, max_bytes: int = 65536) -> bytes:
        """Like :meth:`receive_some`, but waits for readability first: for a read that right
        after our own send cannot have data yet (saves a failing recv and its exception)."""
        if self.closed:  # never wait on a closed fd: trio would register fd -1 for good
            raise trio.ClosedResourceError("the socket was closed")
        sock = self.socket
        while True:
            await wait_readable(sock)  # a real yield to the scheduler: no checkpoint due
            try:
                return sock.recv(max_bytes)
            except BlockingIOError:
                continue  # spurious wake-up
            except _BROKEN as exc:
                raise trio.BrokenResourceError(str(exc)) from None
            except OSError as exc:
                raise self._translate(exc) from None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sock = self.socket
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except _BROKEN as exc:
            raise trio.BrokenResourceError(str(exc)) from None
        except OSError as exc:
            raise self._translate(exc) from None
        if sent == len(data):
            fast = self._fast + 1
            if fast >= CHECKPOINT_EVERY:
                self._fast = 0
                await cancel_shielded_checkpoint()
            else:
                self._fast = fast
            return
        view = memoryview(data)[sent:]
        try:
            with view:
                while view:
                    self.stalled_since = time.perf_counter()
                    await wait_writable(sock)
                    try:
                        sent = sock.send(view)
                    except BlockingIOError:
                        continue
                    except _BROKEN as exc:
                        raise trio.BrokenResourceError(str(exc)) from None
                    except OSError as exc:
                        raise self._translate(exc) from None
                    view = view[sent:]
        finally:
            self.stalled_since = 0.0

    def _translate(self, exc: OSError) -> Exception:
        if self.closed or exc.errno == errno.EBADF:
            return trio.ClosedResourceError("the socket was closed")
        return trio.BrokenResourceError(str(exc))

    def close(self) -> None:
        """Close now (synchronous, so it works inside a cancelled scope). Idempotent."""
        if not self.closed:
            self.closed = True
            notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await checkpoint()


async def connect_tcp(host: str, port: int) -> RawStream:
    """Open a TCP connection (numeric addresses skip the resolver thread)."""
    stream = await trio.open_tcp_stream(host, port)
    return RawStream.from_trio(stream)


def peer_of(stream: RawStream) -> str:
    """A connection's client as "host:port" ("" when the peer already left)."""
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return ""
    return f"{peer[0]}:{peer[1]}"
