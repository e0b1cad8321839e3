"""Regression: a disconnect watcher that starts after its connection closed must not poison
trio's fd table (waiting on fd -1 once makes every later wait on fd -1 a BusyResourceError)."""

import trio

from lmgw.http.server import HTTPServer, _Conn
from lmgw.netio import RawStream


async def test_watchers_on_closed_sockets_exit_quietly() -> None:
    for _ in range(3):  # the second one used to raise BusyResourceError
        a, b = trio.socket.socketpair()
        raw = RawStream.from_trio(trio.SocketStream(a))
        conn = _Conn(raw, "test")
        raw.close()
        done = trio.Event()
        with trio.fail_after(1):
            await HTTPServer._watch(conn, trio.CancelScope(), done)
        assert done.is_set()
        b.close()


async def test_receive_reply_on_a_closed_stream_raises_closed() -> None:
    a, b = trio.socket.socketpair()
    raw = RawStream.from_trio(trio.SocketStream(a))
    raw.close()
    for _ in range(2):
        try:
            await raw.receive_reply()
        except trio.ClosedResourceError:
            pass
        else:
            raise AssertionError("expected ClosedResourceError")
    b.close()
