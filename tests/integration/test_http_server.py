"""The native HTTP/1.1 server over real loopback sockets.

Clients are raw trio streams whose responses are parsed by h11 (an independent, strict HTTP/1.1
implementation, so framing mistakes fail loudly), plus the stdlib ``http.client`` in a thread for
interop. Every wait is bounded; timeouts under test are a few hundred milliseconds.
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import pytest
import trio

from lmgw.http.server import REFUSE_SLACK, HTTPServer, ServerLimits, serve_http
from lmgw.http.types import Request, Responder
from lmgw.memtrim import HeapTrimmer

HOST = "127.0.0.1"
JSON = [(b"content-type", b"application/json")]
FAST = {"watchdog_interval_s": 0.01, "watch_after_s": 0.01}


# -- the application under the server -------------------------------------------------------


@dataclass
class App:
    """Routes by path; records what tests need to assert on."""

    gate: trio.Event = field(default_factory=trio.Event)
    entered: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)
    finished_at: float = 0.0
    cancelled: bool = False
    seen: list[Request] = field(default_factory=list)

    async def __call__(self, req: Request, resp: Responder) -> None:
        self.seen.append(req)
        route = getattr(self, "r_" + req.path.strip("/").replace("-", "_"), None)
        if route is None:
            await resp.send_full(404, JSON, b'{"error": "no route"}')
            return
        await route(req, resp)

    async def r_echo(self, req: Request, resp: Responder) -> None:
        payload = b"%s %s?%s len=%d:%s" % (
            req.method.encode(),
            req.path.encode(),
            req.query.encode(),
            len(req.body),
            req.body,
        )
        await resp.send_full(200, [(b"content-type", b"text/plain")], payload)

    async def r_sleep(self, req: Request, resp: Responder) -> None:
        params = dict(p.split("=") for p in req.query.split("&"))
        await trio.sleep(int(params["ms"]) / 1000)
        await resp.send_full(200, [], params["id"].encode())

    async def r_stream(self, req: Request, resp: Responder) -> None:
        await resp.start(200, [(b"content-type", b"text/event-stream")])
        for i in range(int(req.query or "3")):
            await resp.send(b"data: %d\n\n" % i)
        await resp.end()

    async def r_gated_stream(self, req: Request, resp: Responder) -> None:
        """start(), then wait for the test before the first chunk."""
        await resp.start(200, [(b"content-type", b"text/event-stream")])
        self.entered.set()
        await self.gate.wait()
        await resp.send(b"hello")
        await resp.send(b"world")
        await resp.end()

    async def r_two_phase(self, req: Request, resp: Responder) -> None:
        """One chunk out (so the head is on the wire), then wait for the test."""
        await resp.start(200, [])
        await resp.send(b"one")
        self.entered.set()
        await self.gate.wait()
        await resp.send(b"two")
        await resp.end()

    async def r_gated_full(self, req: Request, resp: Responder) -> None:
        self.entered.set()
        await self.gate.wait()
        await resp.start(200, [])
        await resp.send(b"late")
        await resp.end()

    async def r_forever(self, req: Request, resp: Responder) -> None:
        """Stream one event, then wait forever (an upstream that is still thinking)."""
        try:
            if req.query != "silent":
                await resp.start(200, [(b"content-type", b"text/event-stream")])
                await resp.send(b"data: first\n\n")
            self.entered.set()
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled = True
            raise
        finally:
            self.finished_at = trio.current_time()
            self.finished.set()

    async def r_raise(self, req: Request, resp: Responder) -> None:
        raise RuntimeError("handler bug")

    async def r_raise_after_send(self, req: Request, resp: Responder) -> None:
        await resp.start(200, [])
        await resp.send(b"partial")
        raise RuntimeError("handler bug mid-stream")

    async def r_raise_after_start(self, req: Request, resp: Responder) -> None:
        await resp.start(200, [])
        raise RuntimeError("handler bug before the first chunk")

    async def r_silent(self, req: Request, resp: Responder) -> None:
        return None  # forgets to respond

    async def r_nodelay(self, req: Request, resp: Responder) -> None:
        self.entered.set()
        await self.gate.wait()
        await resp.send_full(200, [], b"ok")


async def start_server(
    nursery: trio.Nursery, handler: Callable[..., Awaitable[None]], **limits: float
) -> tuple[HTTPServer, int]:
    server = HTTPServer(handler, ServerLimits(**{**FAST, **limits}))
    port = await nursery.start(server.serve, HOST, 0)
    return server, port


# -- a strict client ------------------------------------------------------------------------


@dataclass
class Resp:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    informational: list[int]
    http_version: bytes

    def json(self) -> dict:
        return json.loads(self.body)


class Client:
    """Raw bytes out; h11 parses what comes back, one response per request in order."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.raw = bytearray()

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream(HOST, port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _recv(self) -> bytes:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        self.raw += data
        return data

    def _expect(self, method: str) -> None:
        c = self.h11
        if c.our_state is h11.DONE and c.their_state is h11.DONE:
            c.start_next_cycle()
        if c.our_state is h11.IDLE:
            c.send(h11.Request(method=method, target="/", headers=[("host", "t")]))
            c.send(h11.EndOfMessage())

    async def response(self, method: str = "GET", timeout: float = 3.0) -> Resp:
        self._expect(method)
        info: list[int] = []
        head: h11.Response | None = None
        body = bytearray()
        with trio.fail_after(timeout):
            while True:
                ev = self.h11.next_event()
                if ev is h11.NEED_DATA:
                    self.h11.receive_data(await self._recv())
                elif isinstance(ev, h11.InformationalResponse):
                    info.append(ev.status_code)
                elif isinstance(ev, h11.Response):
                    head = ev
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
                elif isinstance(ev, h11.ConnectionClosed):
                    raise EOFError("server closed the connection without a response")
        assert head is not None
        headers = {k: v for k, v in head.headers}
        return Resp(head.status_code, headers, bytes(body), info, head.http_version)

    async def informational(self, method: str = "POST", timeout: float = 2.0) -> int:
        """Wait for a 1xx response (and nothing else)."""
        self._expect(method)
        with trio.fail_after(timeout):
            while True:
                ev = self.h11.next_event()
                if ev is h11.NEED_DATA:
                    self.h11.receive_data(await self._recv())
                    continue
                assert isinstance(ev, h11.InformationalResponse), ev
                return ev.status_code

    async def closed(self, timeout: float = 3.0) -> bool:
        """True once the server has closed: EOF (or a reset) with nothing more sent."""
        rest, _ = self.h11.trailing_data
        assert not rest, f"unexpected bytes: {bytes(rest)!r}"
        with trio.fail_after(timeout):
            data = await self._recv()
        assert data == b"", f"expected EOF, got {data!r}"
        return True

    async def aclose(self) -> None:
        await self.stream.aclose()


def get(path: str, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nhost: t\r\n%s\r\n" % (path.encode(), extra)


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n%s\r\n%s" % (
        path.encode(),
        len(body),
        extra,
        body,
    )


def assert_openai_error(resp: Resp, status: int) -> dict:
    assert resp.status == status
    assert resp.headers[b"content-type"] == b"application/json"
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["param"] is None
    return err


# -- keep-alive and pipelining --------------------------------------------------------------


async def test_keep_alive_many_requests_on_one_connection(nursery: trio.Nursery) -> None:
    server, port = await start_server(nursery, App())
    c = await Client.open(port)
    for i in range(50):
        if i % 2:
            await c.send(post("/echo", b"body-%d" % i))
            expected = b"POST /echo? len=%d:body-%d" % (len(b"body-%d" % i), i)
        else:
            await c.send(get(f"/echo?i={i}"))
            expected = b"GET /echo?i=%d len=0:" % i
        r = await c.response()
        assert (r.status, r.body) == (200, expected)
        assert b"connection" not in r.headers
        assert r.headers[b"content-length"] == b"%d" % len(expected)
        assert b"date" in r.headers
    assert server.active_connections == 1
    await c.aclose()


async def test_stdlib_client_reuses_the_connection() -> None:
    async with trio.open_nursery() as nursery:
        _, port = await start_server(nursery, App())

        def talk() -> list[tuple[int, bytes]]:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            out = []
            sock = None
            for i in range(5):
                conn.request("POST", f"/echo?n={i}", body=b"x" * i)
                r = conn.getresponse()
                out.append((r.status, r.read()))
                if sock is None:
                    sock = conn.sock
                assert conn.sock is sock  # not reconnected: keep-alive held
            conn.close()
            return out

        got = await trio.to_thread.run_sync(talk)
        assert got == [(200, b"POST /echo?n=%d len=%d:%s" % (i, i, b"x" * i)) for i in range(5)]
        nursery.cancel_scope.cancel()


async def test_a_deadline_after_the_whole_answer_adds_nothing_to_it(
    nursery: trio.Nursery,
) -> None:
    """The handler answered whole, then went on working past the request's deadline: the
    deadline ends that work and the connection, and writes nothing after the answer (the
    deadline hook is not asked: an answer there would be bytes after a complete one)."""
    asked: list[bool] = []

    async def handler(req: Request, resp: Responder) -> None:
        await resp.send_full(200, [], b"whole")
        await trio.sleep(30)  # (a leg still drained after the client's answer)

    async def on_timeout(req: Request, resp: Responder) -> None:
        asked.append(True)
        await resp.send(b"AFTER")

    server = HTTPServer(handler, ServerLimits(**{**FAST, "request_timeout_s": 0.3}), on_timeout)
    port = await nursery.start(server.serve, HOST, 0)
    c = await Client.open(port)
    await c.send(get("/"))
    assert (await c.response()).body == b"whole"
    with trio.fail_after(5):
        rest = b""
        while chunk := await c.stream.receive_some(65536):
            rest += chunk
    assert rest == b"" and asked == []


async def test_pipelined_requests_are_answered_in_order(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App())
    c = await Client.open(port)
    # earlier handlers are slower than later ones: order must still be kept
    await c.send(b"".join(get(f"/sleep?ms={(10 - i) * 4}&id={i}") for i in range(10)))
    bodies = [(await c.response()).body for _ in range(10)]
    assert bodies == [b"%d" % i for i in range(10)]
    # mixed methods and bodies in one write, including a chunked one
    chunked = b"POST /echo HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    await c.send(post("/echo", b"one") + get("/echo?two") + chunked + get("/stream?2"))
    assert (await c.response()).body == b"POST /echo? len=3:one"
    assert (await c.response()).body == b"GET /echo?two len=0:"
    assert (await c.response()).body == b"POST /echo? len=3:abc"
    assert (await c.response()).body == b"data: 0\n\ndata: 1\n\n"
    await c.aclose()


async def test_requests_after_connection_close_are_not_answered(nursery: trio.Nursery) -> None:
    app = App()
    _, port = await start_server(nursery, app)
    c = await Client.open(port)
    await c.send(get("/echo?first", b"connection: close\r\n") + get("/echo?second"))
    r = await c.response()
    assert r.body == b"GET /echo?first len=0:" and r.headers[b"connection"] == b"close"
    assert await c.closed()
    assert [q.query for q in app.seen] == ["first"]


async def test_many_clients_at_once(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App())
    results: list[bytes] = []

    async def one(i: int) -> None:
        c = await Client.open(port)
        for j in range(3):
            await c.send(get(f"/sleep?ms=20&id={i}.{j}"))
            results.append((await c.response()).body)
        await c.aclose()

    t0 = trio.current_time()
    async with trio.open_nursery() as inner:
        for i in range(20):
            inner.start_soon(one, i)
    assert sorted(results) == sorted(b"%d.%d" % (i, j) for i in range(20) for j in range(3))
    assert trio.current_time() - t0 < 1.0  # concurrent: 20 x 3 x 20 ms serially would be 1.2 s


# -- request bodies -------------------------------------------------------------------------


async def test_chunked_upload(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App())
    c = await Client.open(port)
    await c.send(b"POST /echo?up HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
    pieces = [b"first ", b"second ", b"x" * 3000, b" last"]
    for p in pieces:
        await c.send(b"%x;ext=1\r\n%s\r\n" % (len(p), p))
        await trio.sleep(0.005)
    await c.send(b"0\r\nx-trailer: yes\r\n\r\n")
    r = await c.response()
    body = b"".join(pieces)
    assert r.body == b"POST /echo?up len=%d:%s" % (len(body), body)


async def test_expect_100_continue_before_the_body(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App())
    c = await Client.open(port)
    await c.send(
        b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
    )
    assert await c.informational() == 100  # before we send a single body byte
    assert bytes(c.raw) == b"HTTP/1.1 100 Continue\r\n\r\n"
    await c.send(b"hello")
    r = await c.response("POST")
    assert (r.status, r.body, r.informational) == (200, b"POST /echo? len=5:hello", [])
    # and again on the same connection
    await c.send(b"POST /echo HTTP/1.1\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")
    assert await c.informational() == 100
    await c.send(b"ok")
    assert (await c.response("POST")).body == b"POST /echo? len=2:ok"


async def test_expect_100_continue_behind_a_pipelined_request(nursery: trio.Nursery) -> None:
    """The 100 for a pipelined request comes after the earlier response, and it does come."""
    _, port = await start_server(nursery, App())
    c = await Client.open(port)
    await c.send(
        get("/sleep?ms=30&id=first")
        + b"POST /echo HTTP/1.1\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n"
    )
    assert (await c.response()).body == b"first"
    assert await c.informational() == 100
    await c.send(b"abc")
    assert (await c.response("POST")).body == b"POST /echo? len=3:abc"


async def test_expect_100_continue_is_not_sent_for_an_oversize_body(
    nursery: trio.Nursery,
) -> None:
    _, port = await start_server(nursery, App(), max_body_bytes=10)
    c = await Client.open(port)
    await c.send(b"POST /echo HTTP/1.1\r\ncontent-length: 11\r\nexpect: 100-continue\r\n\r\n")
    r = await c.response("POST")
    assert r.informational == []
    assert_openai_error(r, 413)


# -- protocol errors ------------------------------------------------------------------------


async def test_oversize_headers_get_431_json_and_close(nursery: trio.Nursery) -> None:
    app = App()
    _, port = await start_server(nursery, app, max_header_bytes=1024)
    c = await Client.open(port)
    await c.send(b"GET /echo HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 2000 + b"\r\n\r\n")
    r = await c.response()
    err = assert_openai_error(r, 431)
    assert err["type"] == "RequestHeaderFieldsTooLargeError"
    assert r.headers[b"connection"] == b"close"
    assert await c.closed()
    assert app.seen == []


async def test_oversize_headers_trickled_get_431(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App(), max_header_bytes=1024)
    c = await Client.open(port)
    await c.send(b"GET /echo HTTP/1.1\r\nx-big: ")
    with trio.fail_after(3):
        while not c.raw:
            await c.send(b"a" * 100)  # one header line that never ends
            with trio.move_on_after(0.01):
                await c._recv()
    c.h11.receive_data(bytes(c.raw))
    c.raw.clear()
    assert_openai_error(await c.response(), 431)


async def test_oversize_body_by_content_length_gets_413(nursery: trio.Nursery) -> None:
    app = App()
    _, port = await start_server(nursery, app, max_body_bytes=100)
    c = await Client.open(port)
    await c.send(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 1000\r\n\r\n")
    r = await c.response("POST")  # answered before the body was sent
    err = assert_openai_error(r, 413)
    assert err["type"] == "RequestEntityTooLargeError"
    assert r.headers[b"connection"] == b"close"
    assert await c.closed()
    assert app.seen == []


async def test_oversize_chunked_body_gets_413(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App(), max_body_bytes=100)
    c = await Client.open(port)
    await c.send(b"POST /echo HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n")
    await c.send(b"64\r\n" + b"a" * 100 + b"\r\n")
    await c.send(b"1\r\nb\r\n")
    assert_openai_error(await c.response("POST"), 413)
    assert await c.closed()


async def test_oversize_body_sent_anyway_still_gets_413() -> None:
    """A client that writes its whole body before reading (http.client) must still see the
    413: the server has to drain what it refuses instead of resetting the connection."""
    async with trio.open_nursery() as nursery:
        _, port = await start_server(nursery, App(), max_body_bytes=1000)

        def talk() -> tuple[int, bytes]:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            conn.request("POST", "/echo", body=b"z" * (4 << 20))
            r = conn.getresponse()
            return r.status, r.read()

        status, body = await trio.to_thread.run_sync(talk)
        assert status == 413
        assert json.loads(body)["error"]["code"] == 413
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\x00\x01 / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1 trailing\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    ],
)
async def test_malformed_requests_get_400_and_close(nursery: trio.Nursery, data: bytes) -> None:
    app = App()
    _, port = await start_server(nursery, app)
    c = await Client.open(port)
    await c.send(data)
    r = await c.response()
    assert_openai_error(r, 400)
    assert r.headers[b"connection"] == b"close"
    assert await c.closed()
    assert app.seen == []


async def test_error_after_good_requests_answers_those_first(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App())
    c = await Client.open(port)
    await c.send(get("/echo?a") + get("/echo?b") + b"NOT HTTP\r\n\r\n")
    assert (await c.response()).body == b"GET /echo?a len=0:"
    assert (await c.response()).body == b"GET /echo?b len=0:"
    assert_openai_error(await c.response(), 400)
    assert await c.closed()


# -- timeouts -------------------------------------------------------------------------------


async def test_slowloris_head_gets_408_and_close(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App(), header_timeout_s=0.3)
    c = await Client.open(port)

    async def trickle() -> None:
        try:
            await c.send(b"GET /echo HTTP/1.1\r\n")
            for i in range(100):
                await trio.sleep(0.05)
                await c.send(b"x-%d: y\r\n" % i)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    t0 = trio.current_time()
    async with trio.open_nursery() as inner:
        inner.start_soon(trickle)
        r = await c.response()
        elapsed = trio.current_time() - t0
        inner.cancel_scope.cancel()
    err = assert_openai_error(r, 408)
    assert "head" in err["message"]
    assert 0.25 <= elapsed < 1.5, elapsed
    assert r.headers[b"connection"] == b"close"


async def test_stalled_body_gets_408(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App(), body_timeout_s=0.3)
    c = await Client.open(port)
    await c.send(b"POST /echo HTTP/1.1\r\ncontent-length: 10\r\n\r\nab")
    t0 = trio.current_time()
    err = assert_openai_error(await c.response("POST"), 408)
    assert "body" in err["message"]
    assert 0.25 <= trio.current_time() - t0 < 1.5


async def test_idle_keep_alive_connection_is_closed(nursery: trio.Nursery) -> None:
    server, port = await start_server(nursery, App(), keepalive_timeout_s=0.3)
    c = await Client.open(port)
    await c.send(get("/echo"))
    assert (await c.response()).status == 200
    t0 = trio.current_time()
    assert await c.closed(timeout=2)
    assert 0.25 <= trio.current_time() - t0 < 1.5
    # a connection that never sends anything is closed the same way
    c2 = await Client.open(port)
    t0 = trio.current_time()
    assert await c2.closed(timeout=2)
    assert 0.25 <= trio.current_time() - t0 < 1.5
    with trio.fail_after(1):
        while server.active_connections:
            await trio.sleep(0.01)


async def test_slow_handler_is_not_a_timeout(nursery: trio.Nursery) -> None:
    _, port = await start_server(
        nursery, App(), keepalive_timeout_s=0.1, header_timeout_s=0.1, body_timeout_s=0.1
    )
    c = await Client.open(port)
    await c.send(get("/sleep?ms=400&id=slow"))
    assert (await c.response()).body == b"slow"


async def test_a_long_requests_connection_is_not_idle_when_it_ends(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request longer than keepalive_timeout_s: the connection's idle time starts at its
    answer's end. The watchdog's sweep may run while the request's disconnect watcher
    retires (widened here to 0.15 s): it once counted the idle time from the request's start
    there, and closed the connection under the client's next request (soak.py: one request
    in ~50,000 got no answer or a reset, after a request that outlived the soak's 5 s)."""
    watch = HTTPServer._watch

    async def slow_retirement(c: Any, scope: trio.CancelScope, done: trio.Event) -> None:
        retired = trio.Event()
        await watch(c, scope, retired)
        with trio.CancelScope(shield=True):
            await trio.sleep(0.15)
        done.set()

    monkeypatch.setattr(HTTPServer, "_watch", staticmethod(slow_retirement))
    _, port = await start_server(
        nursery, App(), keepalive_timeout_s=0.3, watchdog_interval_s=0.005, watch_after_s=0.02
    )
    c = await Client.open(port)
    for i in range(3):
        await c.send(get(f"/sleep?ms=500&id=long{i}"))
        assert (await c.response()).body == f"long{i}".encode()


async def test_the_watchdog_sleeps_while_nothing_runs(nursery: trio.Nursery) -> None:
    """No connection: the watchdog does not wake at all; idle keep-alive connections: only
    for the sweep of their timeouts (every ten intervals); a running request: every interval,
    from the moment it starts (its disconnect watcher is armed as before)."""
    interval = 0.02
    server, port = await start_server(
        nursery, App(), watchdog_interval_s=interval, keepalive_timeout_s=5.0
    )
    await trio.sleep(0.5)
    assert server.watchdog_wakeups <= 1
    c = await Client.open(port)  # an idle connection: sweeps only
    await c.send(get("/echo"))
    assert (await c.response()).status == 200
    before = server.watchdog_wakeups
    await trio.sleep(1.0)
    assert 2 <= server.watchdog_wakeups - before <= 8  # ~5 sweeps, not ~50 intervals
    before = server.watchdog_wakeups
    await c.send(get("/sleep?ms=400&id=slow"))  # a running request wakes it at once
    assert (await c.response()).body == b"slow"
    assert server.watchdog_wakeups - before >= 10


# -- disconnects and handler failures -------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "extra", "version"),
    [
        ("", b"", b"1.1"),  # mid-stream
        ("silent", b"", b"1.1"),  # before the first byte of the response
        ("", b"connection: close\r\n", b"1.1"),  # last request of the connection
        ("silent", b"", b"1.0"),
    ],
)
async def test_client_disconnect_cancels_the_handler_quickly(
    nursery: trio.Nursery, query: str, extra: bytes, version: bytes
) -> None:
    app = App()
    server, port = await start_server(nursery, app)
    c = await Client.open(port)
    await c.send(b"GET /forever?%s HTTP/%s\r\n%s\r\n" % (query.encode(), version, extra))
    with trio.fail_after(2):
        await app.entered.wait()
        if query != "silent":
            while b"data: first" not in c.raw:
                await c._recv()
    await trio.sleep(0.05)  # the handler is well into its wait
    closed_at = trio.current_time()
    await c.aclose()
    with trio.fail_after(2):
        await app.finished.wait()
    assert app.cancelled
    assert app.finished_at - closed_at < 0.1, app.finished_at - closed_at
    with trio.fail_after(1):
        while server.active_connections:
            await trio.sleep(0.01)


async def test_client_gone_before_the_handler_runs_cancels_it(nursery: trio.Nursery) -> None:
    app = App()
    _, port = await start_server(nursery, app)
    c = await Client.open(port)
    closed_at = trio.current_time()
    await c.send(get("/forever?silent"))
    await c.aclose()
    with trio.fail_after(2):
        await app.finished.wait()
    assert app.finished_at - closed_at < 0.1


async def test_handler_error_before_responding_is_500_and_server_lives(
    nursery: trio.Nursery,
) -> None:
    _, port = await start_server(nursery, App())
    other = await Client.open(port)
    c = await Client.open(port)
    await c.send(get("/raise"))
    r = await c.response()
    err = assert_openai_error(r, 500)
    assert "handler bug" not in err["message"]  # no internals leak to clients
    await c.send(get("/echo?after"))  # the same connection is still usable
    assert (await c.response()).body == b"GET /echo?after len=0:"
    await other.send(get("/echo?other"))
    assert (await other.response()).body == b"GET /echo?other len=0:"


async def test_handler_error_after_start_before_any_byte_is_500(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App())
    c = await Client.open(port)
    await c.send(get("/raise-after-start"))
    assert_openai_error(await c.response(), 500)


async def test_handler_error_mid_stream_truncates_and_closes(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App())
    c = await Client.open(port)
    await c.send(get("/raise-after-send"))
    with pytest.raises(h11.RemoteProtocolError):  # EOF inside a chunked body
        await c.response()
    assert b"transfer-encoding: chunked" in c.raw
    assert b"7\r\npartial\r\n" in c.raw
    assert not c.raw.endswith(b"0\r\n\r\n")
    c2 = await Client.open(port)
    await c2.send(get("/echo"))
    assert (await c2.response()).status == 200


async def test_handler_that_does_not_respond_gets_500(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App())
    c = await Client.open(port)
    await c.send(get("/silent") + get("/echo"))
    assert_openai_error(await c.response(), 500)
    assert (await c.response()).status == 200


# -- response shapes ------------------------------------------------------------------------


async def test_head_gets_no_body(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App())
    c = await Client.open(port)
    await c.send(get("/echo?x"))
    full = await c.response()
    await c.send(b"HEAD /echo?x HTTP/1.1\r\n\r\n")
    r = await c.response("HEAD")
    assert (r.status, r.body) == (200, b"")
    assert r.headers[b"content-length"] == b"%d" % len(b"HEAD /echo?x len=0:")
    assert len(full.body) == len(b"GET /echo?x len=0:")
    await c.send(b"HEAD /stream HTTP/1.1\r\n\r\n")
    r = await c.response("HEAD")
    assert (r.status, r.body) == (200, b"")
    # no stray body bytes: the next response parses cleanly
    await c.send(get("/echo?next"))
    assert (await c.response()).body == b"GET /echo?next len=0:"


async def test_http10_request_gets_a_response_and_close(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App())
    c = await Client.open(port)
    await c.send(b"GET /echo?old HTTP/1.0\r\n\r\n")
    r = await c.response()
    assert (r.status, r.body) == (200, b"GET /echo?old len=0:")
    assert r.headers[b"connection"] == b"close"
    assert await c.closed()


async def test_http10_stream_is_delimited_by_close(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App())
    c = await Client.open(port)
    await c.send(b"GET /stream?2 HTTP/1.0\r\n\r\n")
    r = await c.response()
    assert r.body == b"data: 0\n\ndata: 1\n\n"
    assert b"transfer-encoding" not in r.headers and b"content-length" not in r.headers
    assert r.headers[b"connection"] == b"close"


async def test_http10_keep_alive_is_confirmed(nursery: trio.Nursery) -> None:
    """An HTTP/1.0 client keeps the connection only if the response says keep-alive."""
    _, port = await start_server(nursery, App())
    c = await Client.open(port)
    for i in range(2):
        await c.send(b"GET /echo?%d HTTP/1.0\r\nconnection: keep-alive\r\n\r\n" % i)
        with trio.fail_after(2):
            while b"len=0:" not in c.raw:
                await c._recv()
        head = bytes(c.raw).lower()
        assert b"\r\nconnection: keep-alive\r\n" in head
        assert b"content-length: %d\r\n" % len(b"GET /echo?0 len=0:") in head
        c.raw.clear()


async def test_streamed_response_is_chunked_and_head_waits_for_first_chunk(
    nursery: trio.Nursery,
) -> None:
    app = App()
    _, port = await start_server(nursery, app)
    c = await Client.open(port)
    await c.send(get("/gated-stream"))
    with trio.fail_after(2):
        await app.entered.wait()
    with trio.move_on_after(0.05):
        await c._recv()
    assert c.raw == b"", "the head must be held back until the first chunk"
    app.gate.set()
    with trio.fail_after(2):
        while b"hello" not in c.raw:
            await c._recv()
    raw = bytes(c.raw)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\ntransfer-encoding: chunked" in head
    assert b"content-length" not in head
    assert rest.startswith(b"5\r\nhello\r\n")
    c.h11.receive_data(raw)
    c.raw.clear()
    r = await c.response()
    assert r.body == b"helloworld"
    assert r.headers[b"content-type"] == b"text/event-stream"


async def test_empty_stream_is_a_complete_chunked_response(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, App())
    c = await Client.open(port)
    await c.send(get("/stream?0") + get("/echo"))
    r = await c.response()
    assert (r.status, r.body, r.headers[b"transfer-encoding"]) == (200, b"", b"chunked")
    assert (await c.response()).status == 200


async def test_accepted_sockets_have_tcp_nodelay(nursery: trio.Nursery) -> None:
    app = App()
    server, port = await start_server(nursery, app)
    c = await Client.open(port)
    await c.send(get("/nodelay"))
    with trio.fail_after(2):
        await app.entered.wait()
    [conn] = server._conns
    sock = conn.stream.socket
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    app.gate.set()
    assert (await c.response()).body == b"ok"


# -- connection limits and draining ---------------------------------------------------------


async def test_connections_over_the_limit_get_503(nursery: trio.Nursery) -> None:
    server, port = await start_server(nursery, App(), max_connections=2)
    first = [await Client.open(port) for _ in range(2)]
    for c in first:
        await c.send(get("/echo"))
        assert (await c.response()).status == 200
    extra = await Client.open(port)
    await extra.send(get("/echo"))
    r = await extra.response()
    assert_openai_error(r, 503)
    assert r.headers[b"connection"] == b"close"
    assert await extra.closed()
    await first[0].aclose()
    with trio.fail_after(2):
        while server.active_connections > 1:
            await trio.sleep(0.01)
    again = await Client.open(port)
    await again.send(get("/echo"))
    assert (await again.response()).status == 200


async def test_a_burst_over_the_limit_is_not_accepted_past_the_slack(
    nursery: trio.Nursery,
) -> None:
    """Connections over ``max_connections`` get a 503, but past REFUSE_SLACK more the server
    stops accepting until one closes: a burst waits in the backlog instead of taking the
    descriptors the served connections need for their upstream ones."""
    server, port = await start_server(nursery, App(), max_connections=2)
    held = [await Client.open(port) for _ in range(2)]
    for c in held:
        await c.send(get("/echo"))
        assert (await c.response()).status == 200
    # connections that never send anything: refused ones wait up to 1 s for their 503 write
    burst = [await trio.open_tcp_stream(HOST, port) for _ in range(REFUSE_SLACK + 8)]
    with trio.fail_after(5):
        while server._open < 2 + REFUSE_SLACK:
            await trio.sleep(0.01)
    await trio.sleep(0.1)
    assert server._open == 2 + REFUSE_SLACK  # the rest stay in the kernel's backlog
    await held[0].aclose()  # a slot frees: accepting resumes, the backlog drains
    for s in burst:
        await s.aclose()
    with trio.fail_after(5):
        while server._open > 1:
            await trio.sleep(0.01)
    again = await Client.open(port)
    await again.send(get("/echo"))
    assert (await again.response()).status == 200


async def test_out_of_descriptors_closes_idle_keep_alives_to_accept(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accept() failing with EMFILE closes idle keep-alive connections (as nginx does) and
    retries soon, instead of waiting for clients to leave on their own."""
    server, port = await start_server(nursery, App())
    idle = [await Client.open(port) for _ in range(3)]
    for c in idle:
        await c.send(get("/echo"))
        assert (await c.response()).status == 200
    listener = server._listeners[0]
    real_accept = listener.accept
    fails = [1]

    async def accept() -> trio.SocketStream:
        if fails[0]:
            fails[0] -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return await real_accept()

    monkeypatch.setattr(listener, "accept", accept)
    late = await trio.open_tcp_stream(HOST, port)  # wakes the accept loop: it fails once
    with trio.fail_after(5):
        for c in idle:
            assert await c.closed()  # idle keep-alives went to make room
    await late.aclose()


def _post_head(path: str, length: int) -> bytes:
    return b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (
        path.encode(),
        length,
    )


async def test_bodies_over_the_budget_wait_unread_until_one_finishes(
    nursery: trio.Nursery,
) -> None:
    """limits.max_buffered_body_bytes: a body that does not fit beside those held waits,
    unread, for a held one to finish; then it is read and served. (The head and the first
    bytes come in one read, the rest later: the slow path that reserves.)"""
    app = App()
    server, port = await start_server(nursery, app, max_buffered_body_bytes=150_000)
    size = 100_000
    first = await Client.open(port)
    await first.send(_post_head("/nodelay", size) + b"x" * 1000)
    await first.send(b"x" * (size - 1000))
    with trio.fail_after(5):
        await app.entered.wait()  # held by a request in flight: its body stays reserved
    assert server.buffered_body_bytes == size
    second = await Client.open(port)
    await second.send(_post_head("/echo", size) + b"y" * 1000)
    await trio.sleep(0.2)
    assert server.buffered_body_bytes == size  # the second waits for room
    assert [r.path for r in app.seen] == ["/nodelay"]
    await second.send(b"y" * (size - 1000))  # (its socket buffers it; the server reads later)
    await trio.sleep(0.1)
    assert len(app.seen) == 1
    app.gate.set()  # the first finishes: its reservation goes, the second is read and served
    assert (await first.response()).status == 200
    with trio.fail_after(5):
        r = await second.response()
    assert r.status == 200 and r.body.endswith(b"y" * 10)
    with trio.fail_after(5):
        while server.buffered_body_bytes:
            await trio.sleep(0.01)


async def test_a_body_larger_than_the_budget_goes_alone_and_a_dropped_one_frees_it(
    nursery: trio.Nursery,
) -> None:
    server, port = await start_server(nursery, App(), max_buffered_body_bytes=10_000)
    big = 50_000
    gone = await Client.open(port)  # reserves, then leaves mid-upload
    await gone.send(_post_head("/echo", big) + b"z" * 1000)
    with trio.fail_after(5):
        while server.buffered_body_bytes != big:
            await trio.sleep(0.01)
    await gone.aclose()
    with trio.fail_after(5):
        while server.buffered_body_bytes:
            await trio.sleep(0.01)
    alone = await Client.open(port)  # larger than the whole budget: admitted when alone
    await alone.send(_post_head("/echo", big) + b"a" * 1000)
    await alone.send(b"a" * (big - 1000))
    with trio.fail_after(5):
        assert (await alone.response()).status == 200


async def test_an_idle_keep_alive_connection_holds_no_request_body(
    nursery: trio.Nursery,
) -> None:
    """After its answer, a keep-alive connection waiting for the next request keeps nothing
    of the last one: its body (up to max_body_bytes) would otherwise stay in memory for as
    long as the client keeps the connection open. Found with tracemalloc after a burst of
    30 MB uploads: one body per idle connection was still alive."""
    server, port = await start_server(nursery, App())
    c = await Client.open(port)
    await c.send(_post_head("/echo", 300_000) + b"q" * 300_000)
    r = await c.response()
    assert r.status == 200 and r.headers.get(b"connection") != b"close"
    with trio.fail_after(5):
        while any(conn.busy for conn in server._conns):
            await trio.sleep(0.01)
    (conn,) = server._conns
    assert conn.request is None and conn.responder is None
    await c.send(get("/echo"))  # and the connection still serves the next one
    assert (await c.response()).status == 200


async def test_drain_closes_idle_and_finishes_in_flight(nursery: trio.Nursery) -> None:
    app = App()
    server, port = await start_server(nursery, app)
    idle = await Client.open(port)
    await idle.send(get("/echo"))
    assert (await idle.response()).status == 200
    busy = await Client.open(port)
    await busy.send(get("/gated-full"))
    with trio.fail_after(2):
        await app.entered.wait()
    assert server.busy_connections == 1

    await server.drain()
    assert await idle.closed()
    with pytest.raises(OSError):
        await trio.open_tcp_stream(HOST, port)  # no longer accepting
    app.gate.set()
    r = await busy.response()
    assert (r.status, r.body) == (200, b"late")
    assert r.headers[b"connection"] == b"close"
    assert await busy.closed()
    with trio.fail_after(2):
        await server.wait_idle()
    assert server.active_connections == 0


async def test_drain_lets_a_started_stream_finish(nursery: trio.Nursery) -> None:
    app = App()
    server, port = await start_server(nursery, app)
    c = await Client.open(port)
    await c.send(get("/gated-stream"))
    with trio.fail_after(2):
        await app.entered.wait()
    await server.drain()  # start() was called, but its head is not written yet
    app.gate.set()
    r = await c.response()
    assert r.body == b"helloworld"
    assert r.headers[b"connection"] == b"close"
    assert await c.closed()
    with trio.fail_after(2):
        await server.wait_idle()


async def test_drain_after_the_head_was_sent_closes_after_the_response(
    nursery: trio.Nursery,
) -> None:
    app = App()
    server, port = await start_server(nursery, app)
    c = await Client.open(port)
    await c.send(get("/two-phase") + get("/echo?never"))
    with trio.fail_after(2):
        await app.entered.wait()
    await server.drain()
    app.gate.set()
    r = await c.response()
    assert (r.status, r.body) == (200, b"onetwo")  # complete, then the connection ends
    assert await c.closed()
    assert [q.path for q in app.seen] == ["/two-phase"]


async def test_serve_http_reports_its_port(nursery: trio.Nursery) -> None:
    port = await nursery.start(partial(serve_http, App(), HOST, 0, max_header_bytes=2048))
    c = await Client.open(port)
    await c.send(get("/echo?via=serve_http"))
    assert (await c.response()).body == b"GET /echo?via=serve_http len=0:"
    await c.send(b"GET / HTTP/1.1\r\nx: " + b"a" * 3000 + b"\r\n\r\n")
    assert (await c.response()).status == 431


async def test_watcher_spawned_for_a_connection_that_already_closed_is_harmless() -> None:
    """The watchdog can spawn a disconnect watcher in the same tick in which its connection
    ends (handler error, abort) and closes the socket; the watcher then starts on a closed fd.
    That must end quietly: an exception there would take the whole server down."""
    from lmgw.http.server import _Conn
    from lmgw.netio import RawStream

    a, b = socket.socketpair()
    b.close()
    stream = RawStream(a)
    c = _Conn(stream, "")
    scope = trio.CancelScope()
    scope.cancel()
    stream.close()
    done = trio.Event()
    await HTTPServer._watch(c, scope, done)
    assert done.is_set()


async def test_released_bodies_are_reported_to_the_heap_trimmer(nursery: trio.Nursery) -> None:
    """Bodies received over several reads are counted when let go, with no body budget too,
    and large whole answers when sent, so a burst of large uploads or answers ends with the
    heap given back (lmgw.memtrim)."""
    released: list[int] = []

    class Recorder(HeapTrimmer):
        def released(self, nbytes: int) -> None:
            released.append(nbytes)

    server = HTTPServer(
        App(), ServerLimits(**{**FAST, "max_buffered_body_bytes": 0}),
        trimmer=Recorder(1 << 20, trim=lambda pad: 1),
    )  # fmt: skip
    port = await nursery.start(server.serve, HOST, 0)
    size = 300_000
    client = await Client.open(port)
    await client.send(_post_head("/echo", size) + b"x" * 1000)
    await client.send(b"x" * (size - 1000))
    with trio.fail_after(5):
        r = await client.response()
        while len(released) < 2:
            await trio.sleep(0.01)
    assert r.status == 200 and r.body.endswith(b"len=%d:" % size + b"x" * size)
    # the request's body, and the answer's, written after its head (over 256 KiB)
    assert sorted(released) == [size, len(r.body)]
    assert server.buffered_body_bytes == 0
