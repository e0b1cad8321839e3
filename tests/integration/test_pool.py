"""The upstream keep-alive pool against a tiny in-test worker that speaks raw bytes.

Each test scripts the worker's side byte by byte (keep-alive, closing idle sockets, stalling,
dying mid-body, chunked and close-delimited bodies) and asserts what the pool returns, what it
raises, what the worker observed (requests, EOFs) and ``pool.statistics()``.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio

from lmgw.transport.pool import ConnectionPool, Origin, UpstreamError

HOST = "127.0.0.1"


@dataclass
class Seen:
    conn: int
    method: str
    target: str
    headers: dict[bytes, bytes]
    body: bytes


Behave = Callable[[trio.SocketStream, Seen], Awaitable[bool]]


@dataclass
class Worker:
    """A scripted upstream: ``behave`` answers each request and says whether to keep going."""

    behave: Behave
    conns: int = 0
    requests: list[Seen] = field(default_factory=list)
    eofs: list[int] = field(default_factory=list)  # connections the client closed
    eof_at: list[float] = field(default_factory=list)
    closed_by_us: list[int] = field(default_factory=list)
    eof_event: trio.Event = field(default_factory=trio.Event)
    closed_event: trio.Event = field(default_factory=trio.Event)
    port: int = 0
    _origin: Origin | None = None

    async def serve(self, stream: trio.SocketStream) -> None:
        self.conns += 1
        cid = self.conns
        buf = bytearray()
        try:
            while True:
                req = await read_request(stream, buf, cid)
                if req is None:
                    self.eofs.append(cid)
                    self.eof_at.append(trio.current_time())
                    self.eof_event.set()
                    return
                self.requests.append(req)
                if not await self.behave(stream, req):
                    self.closed_by_us.append(cid)
                    return
        except trio.BrokenResourceError:
            self.eofs.append(cid)  # a reset is the client going away too
            self.eof_at.append(trio.current_time())
            self.eof_event.set()
        finally:
            await stream.aclose()
            self.closed_event.set()

    @property
    def origin(self) -> Origin:
        """One Origin per worker, as the registry keeps it (the idle stack lives on it)."""
        if self._origin is None:
            self._origin = Origin(HOST, self.port)
        return self._origin


async def read_request(stream: trio.SocketStream, buf: bytearray, cid: int) -> Seen | None:
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    method, target, version = lines[0].split(b" ")
    assert version == b"HTTP/1.1"
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get(b"content-length", b"0"))
    while len(rest) < length:
        data = await stream.receive_some(65536)
        if not data:
            return None
        rest += data
    buf[:] = rest[length:]
    return Seen(cid, method.decode(), target.decode(), headers, rest[:length])


async def start_worker(nursery: trio.Nursery, behave: Behave) -> Worker:
    w = Worker(behave)
    listeners = await nursery.start(partial(trio.serve_tcp, w.serve, 0, host=HOST))
    w.port = listeners[0].socket.getsockname()[1]
    return w


def ok(body: bytes = b"ok", extra: bytes = b"") -> Behave:
    async def behave(stream: trio.SocketStream, req: Seen) -> bool:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n%s\r\n%s"
            % (len(body), extra, body)
        )
        return True

    return behave


async def wait_for(pred: Callable[[], bool], timeout: float = 2.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.005)


async def get(pool: ConnectionPool, w: Worker, path: str = "/x", **kw: float) -> bytes:
    resp = await pool.request(w.origin, "GET", path, [], **kw)
    try:
        assert resp.status == 200
        return await resp.read_all()
    finally:
        resp.release()


# -- keep-alive -----------------------------------------------------------------------------


async def test_keep_alive_reuses_the_connection(nursery: trio.Nursery) -> None:
    w = await start_worker(nursery, ok(b"hello"))
    pool = ConnectionPool()
    resp = await pool.request(
        w.origin, "POST", "/v1/completions", [(b"x-request-id", b"r1")], b'{"a": 1}'
    )
    assert (resp.status, resp.content_type, resp.header(b"content-length")) == (
        200,
        b"text/plain",
        b"5",
    )
    assert await resp.read_all() == b"hello"
    assert resp.complete
    resp.release()
    assert pool.statistics().idle == 1
    assert await get(pool, w) == b"hello"
    stats = pool.statistics()
    assert (stats.connects, stats.reuses, stats.idle, stats.closed) == (1, 1, 1, 0)
    assert w.conns == 1
    first = w.requests[0]
    assert (first.method, first.target, first.body) == ("POST", "/v1/completions", b'{"a": 1}')
    assert first.headers[b"host"] == b"%s:%d" % (HOST.encode(), w.port)
    assert first.headers[b"x-request-id"] == b"r1"
    assert first.headers[b"content-length"] == b"8"
    assert b"content-length" not in w.requests[1].headers  # GET without a body


async def test_whole_answer_comes_back_as_its_parts(nursery: trio.Nursery) -> None:
    """``whole=True``: a small answer in one read is (status, headers, content type,
    keep-alive, body), its connection back in the pool; anything else a Response as ever."""
    w = await start_worker(nursery, ok(b"hello"))
    pool = ConnectionPool()
    for _ in range(2):
        parts = await pool.request(w.origin, "POST", "/v1/x", [], b"{}", whole=True)
        assert isinstance(parts, tuple)
        status, headers, ctype, keep_alive, body = parts
        assert (status, ctype, keep_alive, body) == (200, b"text/plain", True, b"hello")
        assert (b"content-length", b"5") in headers
    stats = pool.statistics()
    assert (stats.connects, stats.reuses, stats.idle) == (1, 1, 1)

    closing = await start_worker(nursery, ok(b"bye", b"connection: close\r\n"))
    parts = await pool.request(closing.origin, "POST", "/v1/x", [], b"{}", whole=True)
    assert isinstance(parts, tuple) and parts[3] is False
    await wait_for(lambda: closing.eofs == [1])  # not pooled: the pool closed it

    async def failing(stream: trio.SocketStream, req: Seen) -> bool:
        await stream.send_all(b"HTTP/1.1 503 Busy\r\ncontent-length: 4\r\n\r\nbusy")
        return True

    bad = await start_worker(nursery, failing)
    resp = await pool.request(bad.origin, "POST", "/v1/x", [], b"{}", whole=True)
    assert not isinstance(resp, tuple)  # an error answer: the general reader and Response
    try:
        assert (resp.status, await resp.read_all()) == (503, b"busy")
    finally:
        resp.release()


async def test_idle_socket_closed_by_the_worker_is_retried_on_a_fresh_one(
    nursery: trio.Nursery,
) -> None:
    async def once(stream: trio.SocketStream, req: Seen) -> bool:
        await ok(b"r%d" % len(w.requests))(stream, req)
        return False  # keep-alive framing, but the worker closes the idle socket right after

    w = await start_worker(nursery, once)
    pool = ConnectionPool()
    assert await get(pool, w) == b"r1"
    assert pool.statistics().idle == 1
    await wait_for(lambda: len(w.closed_by_us) == 1)
    await trio.sleep(0.01)
    assert await get(pool, w) == b"r2"  # transparently on a new connection
    stats = pool.statistics()
    assert (stats.connects, stats.stale_retries) == (2, 1)
    assert [r.conn for r in w.requests] == [1, 2]


async def test_many_stale_idle_sockets_do_not_fail_a_request(nursery: trio.Nursery) -> None:
    """After a worker restart every pooled socket is dead: one request must still succeed."""

    async def slow_once(stream: trio.SocketStream, req: Seen) -> bool:
        await trio.sleep(0.03)
        await ok()(stream, req)
        return False

    w = await start_worker(nursery, slow_once)
    pool = ConnectionPool()
    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(get, pool, w)
    assert pool.statistics().idle == 5
    await wait_for(lambda: len(w.closed_by_us) == 5)
    await trio.sleep(0.01)
    assert await get(pool, w) == b"ok"
    assert pool.statistics().stale_retries >= 1


async def test_connection_close_responses_are_not_pooled(nursery: trio.Nursery) -> None:
    w = await start_worker(nursery, ok(b"bye", b"connection: close\r\n"))
    pool = ConnectionPool()
    assert await get(pool, w) == b"bye"
    stats = pool.statistics()
    assert (stats.idle, stats.closed) == (0, 1)
    await wait_for(lambda: w.eofs == [1])  # the pool closed it: the worker saw EOF
    assert await get(pool, w) == b"bye"
    stats = pool.statistics()
    assert (stats.connects, stats.reuses) == (2, 0)


async def test_http10_response_without_keep_alive_is_not_pooled(nursery: trio.Nursery) -> None:
    async def old(stream: trio.SocketStream, req: Seen) -> bool:
        await stream.send_all(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")
        return True

    w = await start_worker(nursery, old)
    pool = ConnectionPool()
    assert await get(pool, w) == b"ok"
    assert pool.statistics().idle == 0


# -- failures -------------------------------------------------------------------------------


async def test_connection_refused_is_retryable_502() -> None:
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    pool = ConnectionPool(connect_timeout_s=2)
    with pytest.raises(UpstreamError) as ei:
        await pool.request(Origin(HOST, port), "GET", "/", [])
    assert (ei.value.retryable, ei.value.status) == (True, 502)
    assert pool.statistics().connects == 0


async def test_no_response_head_in_time_is_504_and_closes(nursery: trio.Nursery) -> None:
    async def stall(stream: trio.SocketStream, req: Seen) -> bool:
        await trio.sleep_forever()
        return True

    w = await start_worker(nursery, stall)
    pool = ConnectionPool()
    t0 = trio.current_time()
    with pytest.raises(UpstreamError) as ei:
        await pool.request(w.origin, "GET", "/", [], response_timeout_s=0.2)
    assert ei.value.status == 504
    assert not ei.value.retryable  # the worker has the request: not safe to resend
    assert 0.15 <= trio.current_time() - t0 < 1.0
    assert pool.statistics().closed == 1 and pool.statistics().idle == 0


async def test_timeout_closes_the_socket_the_worker_sees_eof(nursery: trio.Nursery) -> None:
    async def stall_then_watch(stream: trio.SocketStream, req: Seen) -> bool:
        return True  # never answers; the loop's next read sees the EOF

    w = await start_worker(nursery, stall_then_watch)
    pool = ConnectionPool()
    with pytest.raises(UpstreamError):
        await pool.request(w.origin, "GET", "/", [], response_timeout_s=0.1)
    with trio.fail_after(1):
        await w.eof_event.wait()


async def test_worker_closing_mid_body_raises_on_read(nursery: trio.Nursery) -> None:
    async def die(stream: trio.SocketStream, req: Seen) -> bool:
        if req.target == "/chunked":
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nwo"
            )
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        return False

    w = await start_worker(nursery, die)
    pool = ConnectionPool()
    for path, first in (("/cl", b"0123456789"), ("/chunked", b"hello")):
        resp = await pool.request(w.origin, "GET", path, [])
        assert resp.status == 200
        got = b""
        with pytest.raises(UpstreamError) as ei:
            while True:
                chunk = await resp.read_chunk()
                assert chunk, "a truncated body must not end quietly"
                got += chunk
        assert got.startswith(first)
        assert not ei.value.retryable
        resp.release()
    assert pool.statistics().idle == 0


async def test_fresh_connection_dropped_before_the_head_is_not_retried(
    nursery: trio.Nursery,
) -> None:
    async def vanish(stream: trio.SocketStream, req: Seen) -> bool:
        return False  # read the request, then close without a word

    w = await start_worker(nursery, vanish)
    pool = ConnectionPool()
    with pytest.raises(UpstreamError) as ei:
        await pool.request(w.origin, "POST", "/", [], b"{}")
    assert not ei.value.retryable  # it may have run: resending could run it twice
    assert ei.value.status == 502
    assert pool.statistics().connects == 1 and len(w.requests) == 1


async def test_garbage_response_is_upstream_error(nursery: trio.Nursery) -> None:
    async def garbage(stream: trio.SocketStream, req: Seen) -> bool:
        await stream.send_all(b"SSH-2.0-OpenSSH_9.0\r\n\r\n")
        return True

    w = await start_worker(nursery, garbage)
    pool = ConnectionPool()
    with pytest.raises(UpstreamError) as ei:
        await pool.request(w.origin, "GET", "/", [])
    assert ei.value.status == 502
    with trio.fail_after(1):
        await w.eof_event.wait()
    assert pool.statistics().idle == 0


# -- bodies ---------------------------------------------------------------------------------


async def test_read_until_close_body(nursery: trio.Nursery) -> None:
    async def close_delimited(stream: trio.SocketStream, req: Seen) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart1-")
        await trio.sleep(0.01)
        await stream.send_all(b"part2")
        return False

    w = await start_worker(nursery, close_delimited)
    pool = ConnectionPool()
    assert await get(pool, w) == b"part1-part2"
    assert pool.statistics().idle == 0


async def test_chunked_response_streams_and_is_pooled(nursery: trio.Nursery) -> None:
    events = [b"data: %d\n\n" % i for i in range(4)]

    async def sse(stream: trio.SocketStream, req: Seen) -> bool:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for e in events:
            await trio.sleep(0.01)
            await stream.send_all(b"%x\r\n%s\r\n" % (len(e), e))
        await stream.send_all(b"0\r\n\r\n")
        return True

    w = await start_worker(nursery, sse)
    pool = ConnectionPool()
    resp = await pool.request(w.origin, "POST", "/v1/chat/completions", [], b"{}")
    assert resp.content_type == b"text/event-stream"
    got = []
    while chunk := await resp.read_chunk():
        got.append(chunk)
    assert b"".join(got) == b"".join(events)
    assert len(got) >= 2  # relayed as they came, not buffered to the end
    resp.release()
    assert pool.statistics().idle == 1
    resp2 = await pool.request(w.origin, "POST", "/v1/chat/completions", [], b"{}")
    assert await resp2.read_all() == b"".join(events)
    resp2.release()
    assert pool.statistics().reuses == 1 and w.conns == 1


async def test_interim_100_continue_is_skipped(nursery: trio.Nursery) -> None:
    async def interim(stream: trio.SocketStream, req: Seen) -> bool:
        await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        await trio.sleep(0.01)
        await stream.send_all(b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone")
        return True

    w = await start_worker(nursery, interim)
    pool = ConnectionPool()
    resp = await pool.request(w.origin, "POST", "/", [], b"x")
    assert resp.status == 201
    assert await resp.read_all() == b"done"
    resp.release()


async def test_bytes_after_the_response_prevent_reuse(nursery: trio.Nursery) -> None:
    async def chatty(stream: trio.SocketStream, req: Seen) -> bool:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            b"HTTP/1.1 200 OK\r\nx-stray: 1\r\ncontent-length: 5\r\n\r\nstray"
        )
        return True

    w = await start_worker(nursery, chatty)
    pool = ConnectionPool()
    resp = await pool.request(w.origin, "GET", "/", [])
    assert await resp.read_all() == b"ok"
    assert resp.header(b"x-stray") is None
    resp.release()
    assert pool.statistics().idle == 0
    assert await get(pool, w) == b"ok"
    assert pool.statistics().connects == 2


async def test_read_all_limit(nursery: trio.Nursery) -> None:
    w = await start_worker(nursery, ok(b"x" * 1000))
    pool = ConnectionPool()
    resp = await pool.request(w.origin, "GET", "/", [])
    with pytest.raises(UpstreamError) as ei:
        await resp.read_all(limit=100)
    assert "100" in ei.value.message
    resp.release()
    assert await get(pool, w) == b"x" * 1000  # the pool is none the worse for it


# -- aborts ---------------------------------------------------------------------------------


async def test_release_of_a_half_read_response_closes_the_socket(nursery: trio.Nursery) -> None:
    async def endless(stream: trio.SocketStream, req: Seen) -> bool:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n"
        )
        return True  # then wait: the next read shows whether the client went away

    w = await start_worker(nursery, endless)
    pool = ConnectionPool()
    resp = await pool.request(w.origin, "GET", "/", [])
    assert await resp.read_chunk() == b"first"
    released_at = trio.current_time()
    resp.release()
    with trio.fail_after(1):
        await w.eof_event.wait()  # this is how an abandoned request is aborted upstream
    assert w.eof_at[0] - released_at < 0.1
    stats = pool.statistics()
    assert (stats.idle, stats.closed) == (0, 1)
    resp.release()  # idempotent
    assert await resp.read_chunk() == b""


async def test_cancelled_while_waiting_for_the_head_closes_the_socket(
    nursery: trio.Nursery,
) -> None:
    async def think(stream: trio.SocketStream, req: Seen) -> bool:
        return True

    w = await start_worker(nursery, think)
    pool = ConnectionPool()
    with trio.move_on_after(0.1) as cs:
        await pool.request(w.origin, "GET", "/", [])
    assert cs.cancelled_caught
    with trio.fail_after(1):
        await w.eof_event.wait()
    stats = pool.statistics()
    assert (stats.idle, stats.closed) == (0, 1)


async def test_cancelled_while_reading_the_body_then_release_closes(
    nursery: trio.Nursery,
) -> None:
    async def slow_body(stream: trio.SocketStream, req: Seen) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
        return True

    w = await start_worker(nursery, slow_body)
    pool = ConnectionPool()
    resp = await pool.request(w.origin, "GET", "/", [])
    try:
        with trio.move_on_after(0.1):
            await resp.read_all()
    finally:
        resp.release()
    with trio.fail_after(1):
        await w.eof_event.wait()
    assert pool.statistics().idle == 0


# -- idle management ------------------------------------------------------------------------


async def test_idle_timeout_ages_out_pooled_connections(nursery: trio.Nursery) -> None:
    w = await start_worker(nursery, ok())
    pool = ConnectionPool(idle_timeout_s=0.05)
    assert await get(pool, w) == b"ok"
    await trio.sleep(0.08)
    assert await get(pool, w) == b"ok"  # the aged one is closed, not reused
    stats = pool.statistics()
    assert (stats.connects, stats.reuses, stats.closed) == (2, 0, 1)
    await wait_for(lambda: w.eofs == [1])
    # sweep() does the same for sockets nobody asks for
    await trio.sleep(0.08)
    pool.sweep()
    stats = pool.statistics()
    assert (stats.idle, stats.closed) == (0, 2)
    await wait_for(lambda: w.eofs == [1, 2])


async def test_fresh_idle_connections_survive_a_sweep(nursery: trio.Nursery) -> None:
    w = await start_worker(nursery, ok())
    pool = ConnectionPool(idle_timeout_s=10)
    await get(pool, w)
    pool.sweep()
    assert pool.statistics().idle == 1


async def test_max_idle_per_origin_caps_the_idle_stack(nursery: trio.Nursery) -> None:
    async def slow(stream: trio.SocketStream, req: Seen) -> bool:
        await trio.sleep(0.03)
        return await ok()(stream, req)

    w = await start_worker(nursery, slow)
    pool = ConnectionPool(max_idle_per_origin=2)
    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(get, pool, w)
    stats = pool.statistics()
    assert (stats.connects, stats.idle, stats.closed) == (5, 2, 3)
    await wait_for(lambda: len(w.eofs) == 3)


async def test_idle_stack_is_lifo(nursery: trio.Nursery) -> None:
    async def slow(stream: trio.SocketStream, req: Seen) -> bool:
        await trio.sleep(0.02 if req.target == "/a" else 0.04)
        return await ok()(stream, req)

    w = await start_worker(nursery, slow)
    pool = ConnectionPool()
    async with trio.open_nursery() as n:
        n.start_soon(get, pool, w, "/a")  # released first
        n.start_soon(get, pool, w, "/b")  # released last: the warmest
    await get(pool, w, "/c")
    conn_of = {r.target: r.conn for r in w.requests}
    assert conn_of["/c"] == conn_of["/b"]


async def test_close_and_forget(nursery: trio.Nursery) -> None:
    w = await start_worker(nursery, ok())
    pool = ConnectionPool()
    await get(pool, w)
    origin = w.origin
    resp = await pool.request(origin, "GET", "/", [])
    await resp.read_all()
    resp.release()
    pool.forget(origin)
    assert origin.idle == []
    await wait_for(lambda: w.eofs == [1])
    resp = await pool.request(origin, "GET", "/", [])  # a new connection
    await resp.read_all()
    pool.close()
    resp.release()  # released after close: closed, not pooled
    assert pool.statistics().idle == 0
    await wait_for(lambda: w.eofs == [1, 2])
    stats = pool.statistics()
    assert (stats.connects, stats.reuses, stats.closed) == (2, 1, 2)


# -- origins --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port", "scheme", "host_header"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1", 8000, "http", b"127.0.0.1:8000"),
        ("http://worker-1:9000/v1", "worker-1", 9000, "http", b"worker-1:9000"),
        ("http://worker", "worker", 80, "http", b"worker:80"),
        ("https://worker", "worker", 443, "https", b"worker:443"),
        ("http://[::1]:8000/", "::1", 8000, "http", b"[::1]:8000"),
        ("http://[fe80::1]", "fe80::1", 80, "http", b"[fe80::1]:80"),
    ],
)
def test_origin_from_url(url: str, host: str, port: int, scheme: str, host_header: bytes) -> None:
    o = Origin.from_url(url)
    assert (o.host, o.port, o.scheme, o.host_header) == (host, port, scheme, host_header)
    assert f"{port}" in repr(o)


@pytest.mark.parametrize("url", ["ftp://x:1", "x:1", "tcp://h:1"])
def test_origin_rejects_other_schemes(url: str) -> None:
    with pytest.raises(ValueError):
        Origin.from_url(url)
