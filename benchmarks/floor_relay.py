"""The smallest HTTP/1.1 relay trio can run: the CPU floor that `floor.py` compares lmgw with.

Why: "what does lmgw add on top of what trio and the kernel cost anyway?" needs a relay with
nothing in it. This one has one task per client connection and its own upstream connection
(client connections are spread round robin over the upstreams), the same lean socket calls as
`lmgw.netio.RawStream` (try the syscall, park in ``wait_readable`` on EAGAIN), and framing by
``Content-Length`` only: no parser, no routing, no headers touched, no pool, no metrics, no
limits, no error handling beyond closing. Not a product; a yardstick.

    python benchmarks/floor_relay.py PORT UPSTREAM_PORT [UPSTREAM_PORT...]
"""

from __future__ import annotations

import itertools
import socket
import sys
from collections.abc import Awaitable, Callable

import trio
from trio.lowlevel import wait_readable


async def receive(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(65536)
        except BlockingIOError:
            await wait_readable(sock)


def _message_end(buf: bytes) -> int:
    """The length of the first whole message in ``buf`` (head + Content-Length body), or 0."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return 0
    head = buf[:head_end].lower()
    at = head.find(b"content-length:")
    length = 0
    if at >= 0:
        eol = head.find(b"\r\n", at)
        length = int(head[at + 15 : eol if eol > 0 else len(head)])
    end = head_end + 4 + length
    return end if len(buf) >= end else 0


async def _message(
    sock: socket.socket, buf: bytes, relay: socket.socket | None = None
) -> tuple[bytes, bytes]:
    """One whole message from ``sock``; with ``relay``, a chunked answer (a stream) is passed
    to it read by read instead, as a relay must (each event is a wake-up, a read and a write),
    and ``b""`` is returned for it."""
    while True:
        head_end = buf.find(b"\r\n\r\n")
        if relay is not None and head_end >= 0 and b"chunked" in buf[:head_end].lower():
            relay.sendall(buf)
            while not buf.endswith(b"0\r\n\r\n"):
                buf = await receive(sock)
                if not buf:
                    raise EOFError
                relay.sendall(buf)
            return b"", b""
        if end := _message_end(buf):
            return buf[:end], buf[end:]
        data = await receive(sock)
        if not data:
            raise EOFError
        buf += data


def _nonblocking(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def _serve(client: socket.socket, upstream_port: int) -> None:
    _nonblocking(client)
    upstream = _nonblocking(socket.create_connection(("127.0.0.1", upstream_port)))
    cbuf = ubuf = b""
    try:
        while True:
            request, cbuf = await _message(client, cbuf)
            upstream.sendall(request)
            response, ubuf = await _message(upstream, ubuf, client)
            if response:
                client.sendall(response)
    except (EOFError, OSError):
        pass
    finally:
        client.close()
        upstream.close()


async def accept_loop(port: int, serve: Callable[[socket.socket], Awaitable[None]]) -> None:
    """Accept on 127.0.0.1:``port`` for good, one task per client connection running
    ``serve`` (shared with floor_featured.py)."""
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)
    async with trio.open_nursery() as nursery:
        while True:
            await wait_readable(listener)
            try:
                client, _ = listener.accept()
            except BlockingIOError:
                continue
            nursery.start_soon(serve, client)


async def main(port: int, upstreams: list[int]) -> None:
    turn = itertools.cycle(upstreams)
    await accept_loop(port, lambda client: _serve(client, next(turn)))


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), [int(p) for p in sys.argv[2:]])
