"""Fuzzing the two sans-IO HTTP/1.1 parsers: the server's request side and the pool's response side.

The promises checked, as h11's ``fuzz/afl-server.py`` does:

* garbage in gives Request events and at most one ProtocolError (last), never another exception,
  and nothing after the error;
* where a byte stream is cut into reads never changes what comes out (valid pipelined streams
  give exactly the requests that were serialized);
* the response reader gives the same status, headers and body for any split, and garbage gives
  :class:`UpstreamProtocolError` and nothing else.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lmgw.http.h1 import IDLE, H1Connection, ProtocolError
from lmgw.http.types import Request
from lmgw.transport.h1client import ResponseReader, UpstreamProtocolError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers --------------------------------------------------------------------------------


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length, sorted, deduplicated)."""
    if not data:
        return [data]
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [data]


def run_server(chunks: list[bytes], **limits: int) -> tuple[list[tuple], int | None]:
    """Feed chunks; return (request summaries, error status or None), checking the invariants."""
    conn = H1Connection(**limits)
    reqs: list[tuple] = []
    error: int | None = None
    for chunk in chunks:
        conn.receive_data(chunk)
        while (ev := conn.next_event()) is not None:
            assert error is None, "an event after the ProtocolError"
            if isinstance(ev, ProtocolError):
                assert ev.status in (400, 413, 431), ev.status
                assert isinstance(ev.message, str) and ev.message
                error = ev.status
                assert conn.failed
            else:
                assert isinstance(ev, Request)
                reqs.append(
                    (ev.method, ev.path, ev.query, ev.headers, ev.body, ev.keep_alive, ev.http10)
                )
    if error is not None:  # nothing is accepted after an error
        conn.receive_data(b"GET / HTTP/1.1\r\n\r\n")
        assert conn.next_event() is None
    return reqs, error


# -- request generation ---------------------------------------------------------------------

TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)
VALUE = st.binary(max_size=24).map(
    lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E)  # visible ASCII, no OWS at the ends
)
PATH = st.text("abcdefghijklmnopqrstuvwxyz0123456789-._~/%", max_size=20).map(lambda s: "/" + s)
QUERY = st.text("abcdefghijklmnopqrstuvwxyz0123456789=&%+?/", max_size=20)


@dataclass
class Req:
    method: str
    path: str
    query: str | None
    headers: list[tuple[bytes, bytes]]
    body: bytes
    framing: str  # "none" | "cl" | "chunked"
    chunk_sizes: list[int]
    extensions: bool
    trailers: list[tuple[bytes, bytes]]
    http10: bool
    connection: bytes | None

    @property
    def keep_alive(self) -> bool:
        if self.http10:
            return self.connection == b"keep-alive"
        return self.connection != b"close"

    def wire(self) -> bytes:
        target = self.path + ("" if self.query is None else "?" + self.query)
        version = b"1.0" if self.http10 else b"1.1"
        lines = [b"%s %s HTTP/%s\r\n" % (self.method.encode(), target.encode(), version)]
        for k, v in self.wire_headers():
            lines.append(k + b": " + v + b"\r\n")
        lines.append(b"\r\n")
        if self.framing == "cl":
            lines.append(self.body)
        elif self.framing == "chunked":
            rest = self.body
            for size in self.chunk_sizes:
                piece, rest = rest[:size], rest[size:]
                if not piece:
                    continue
                ext = b";x=y" if self.extensions else b""
                lines.append(b"%X%s\r\n%s\r\n" % (len(piece), ext, piece))
            if rest:
                lines.append(b"%x\r\n%s\r\n" % (len(rest), rest))
            lines.append(b"0\r\n")
            for k, v in self.trailers:
                lines.append(k + b": " + v + b"\r\n")
            lines.append(b"\r\n")
        return b"".join(lines)

    def wire_headers(self) -> list[tuple[bytes, bytes]]:
        hs = list(self.headers)
        if self.framing == "cl":
            hs.append((b"Content-Length", b"%d" % len(self.body)))
        elif self.framing == "chunked":
            hs.append((b"Transfer-Encoding", b"chunked"))
        if self.connection is not None:
            hs.append((b"Connection", self.connection))
        return hs

    def expected(self) -> tuple:
        headers = [(k.lower(), v) for k, v in self.wire_headers()]
        body = self.body if self.framing != "none" else b""
        return (
            self.method,
            self.path,
            self.query or "",
            headers,
            body,
            self.keep_alive,
            self.http10,
        )


@st.composite
def requests(draw: st.DrawFn, *, last: bool = True) -> Req:
    http10 = draw(st.booleans()) if last else False
    framing = draw(st.sampled_from(["none", "cl"] if http10 else ["none", "cl", "chunked"]))
    conn_choices: list[bytes | None] = [None, b"keep-alive"] + ([b"close"] if last else [])
    if http10 and not last:
        conn_choices = [b"keep-alive"]
    names = draw(st.lists(TOKEN, max_size=6))
    return Req(
        method=draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])),
        path=draw(PATH),
        query=draw(st.none() | QUERY),
        headers=[(b"X-" + n.encode(), draw(VALUE)) for n in names],
        body=draw(st.binary(max_size=300)) if framing != "none" else b"",
        framing=framing,
        chunk_sizes=draw(st.lists(st.integers(1, 64), max_size=8)),
        extensions=draw(st.booleans()),
        trailers=[(b"X-T-" + n.encode(), draw(VALUE)) for n in draw(st.lists(TOKEN, max_size=2))],
        http10=http10,
        connection=draw(st.sampled_from(conn_choices)),
    )


@st.composite
def pipelines(draw: st.DrawFn) -> list[Req]:
    """1-5 requests; only the last may end the connection (llhttp rejects data after close)."""
    first = draw(st.lists(requests(last=False), max_size=4))
    return [*first, draw(requests(last=True))]


# -- the server-side parser -----------------------------------------------------------------


@SETTINGS
@given(reqs=pipelines(), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_valid_pipelines_parse_the_same_however_they_are_split(
    reqs: list[Req], cuts: list[int]
) -> None:
    stream = b"".join(r.wire() for r in reqs)
    expected = [r.expected() for r in reqs]
    assert run_server([stream]) == (expected, None)
    assert run_server(split_at(stream, cuts)) == (expected, None)


@SETTINGS
@given(reqs=pipelines())
def test_valid_pipelines_byte_by_byte(reqs: list[Req]) -> None:
    stream = b"".join(r.wire() for r in reqs)
    got = run_server([stream[i : i + 1] for i in range(len(stream))])
    assert got == ([r.expected() for r in reqs], None)


@SETTINGS
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(min_value=0), max_size=20))
@example(data=b"GET / HTTP/1.1\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n", cuts=[3])
@example(data=b"GET /\r\n\r\n", cuts=[])
@example(data=b"\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n", cuts=[1, 2])
def test_garbage_gives_requests_or_one_protocol_error(data: bytes, cuts: list[int]) -> None:
    whole = run_server([data])
    split = run_server(split_at(data, cuts))
    assert split == whole


@SETTINGS
@given(
    data=st.binary(max_size=3000),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    max_header_bytes=st.integers(1, 200),
    max_body_bytes=st.integers(0, 200),
)
def test_garbage_under_tight_limits_never_raises(
    data: bytes, cuts: list[int], max_header_bytes: int, max_body_bytes: int
) -> None:
    limits = {"max_header_bytes": max_header_bytes, "max_body_bytes": max_body_bytes}
    run_server([data], **limits)
    run_server(split_at(data, cuts), **limits)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    stream = bytearray(b"".join(r.wire() for r in draw(pipelines())))
    for _ in range(draw(st.integers(1, 4))):
        if not stream:
            break
        pos = draw(st.integers(0, len(stream) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup"]))
        if op == "flip":
            stream[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            stream[pos:pos] = draw(
                st.sampled_from([b"\r\n", b"\n", b" ", b":", b"\x00", b"0\r\n", b"\t", b"\xff"])
            )
        elif op == "delete":
            del stream[pos : pos + draw(st.integers(1, 8))]
        else:
            stream[pos:pos] = stream[pos : pos + draw(st.integers(1, 40))]
    return bytes(stream)


@SETTINGS
@given(data=mutated(), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_mutated_requests_give_requests_or_one_protocol_error(data: bytes, cuts: list[int]) -> None:
    whole = run_server([data])
    assert run_server(split_at(data, cuts)) == whole
    run_server([data], max_header_bytes=64, max_body_bytes=16)


@SETTINGS
@given(reqs=pipelines())
def test_state_is_idle_between_requests(reqs: list[Req]) -> None:
    conn = H1Connection()
    for r in reqs:
        conn.receive_data(r.wire())
        assert conn.state == IDLE
        ev = conn.next_event()
        assert isinstance(ev, Request) and ev.body == r.expected()[4]


# -- the upstream response reader -----------------------------------------------------------


@dataclass
class Resp:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    framing: str  # "cl" | "chunked" | "close" | "empty"
    chunk_sizes: list[int]
    http10: bool
    connection: bytes | None

    def wire_headers(self) -> list[tuple[bytes, bytes]]:
        hs = list(self.headers)
        if self.framing == "cl":
            hs.append((b"Content-Length", b"%d" % len(self.body)))
        elif self.framing == "chunked":
            hs.append((b"Transfer-Encoding", b"chunked"))
        if self.connection is not None:
            hs.append((b"Connection", self.connection))
        return hs

    def wire(self) -> bytes:
        version = b"1.0" if self.http10 else b"1.1"
        out = [b"HTTP/%s %d Whatever Reason\r\n" % (version, self.status)]
        out += [k + b": " + v + b"\r\n" for k, v in self.wire_headers()]
        out.append(b"\r\n")
        if self.framing in ("cl", "close"):
            out.append(self.body)
        elif self.framing == "chunked":
            rest = self.body
            for size in self.chunk_sizes:
                piece, rest = rest[:size], rest[size:]
                if piece:
                    out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
            if rest:
                out.append(b"%x\r\n%s\r\n" % (len(rest), rest))
            out.append(b"0\r\n\r\n")
        return b"".join(out)

    @property
    def keep_alive(self) -> bool:
        if self.framing == "close":
            return False
        if self.http10:
            return self.connection == b"keep-alive"
        return self.connection != b"close"


@st.composite
def responses(draw: st.DrawFn) -> Resp:
    framing = draw(st.sampled_from(["cl", "chunked", "close", "empty"]))
    http10 = draw(st.booleans()) if framing in ("cl", "close") else False
    status = 204 if framing == "empty" else draw(st.sampled_from([200, 201, 400, 404, 500, 503]))
    names = draw(st.lists(TOKEN, max_size=5))
    return Resp(
        status=status,
        headers=[(b"X-" + n.encode(), draw(VALUE)) for n in names]
        + [(b"Content-Type", b"text/event-stream")],
        body=b"" if framing == "empty" else draw(st.binary(max_size=400)),
        framing=framing,
        chunk_sizes=draw(st.lists(st.integers(1, 64), max_size=8)),
        http10=http10,
        connection=draw(st.sampled_from([None, b"keep-alive", b"close"])),
    )


def read_response(chunks: list[bytes], eof: bool) -> tuple:
    r = ResponseReader()
    body = []
    for chunk in chunks:
        r.feed(chunk)
        body.append(r.take_body())
    if eof:
        r.feed_eof()
    body.append(r.take_body())
    return (r.status, r.headers, b"".join(body), r.complete, r.keep_alive, r.content_type)


@SETTINGS
@given(resp=responses(), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_response_reader_is_split_invariant(resp: Resp, cuts: list[int]) -> None:
    data = resp.wire()
    eof = resp.framing == "close"
    expected = (
        resp.status,
        [(k.lower(), v) for k, v in resp.wire_headers()],
        resp.body,
        True,
        resp.keep_alive,
        b"text/event-stream",
    )
    assert read_response([data], eof) == expected
    assert read_response(split_at(data, cuts), eof) == expected
    assert read_response([data[i : i + 1] for i in range(len(data))], eof) == expected


@SETTINGS
@given(resp=responses(), cut=st.integers(min_value=0))
def test_truncated_response_is_never_complete(resp: Resp, cut: int) -> None:
    data = resp.wire()
    if resp.framing == "close":
        return  # its end is the EOF itself
    cut %= len(data)  # strictly shorter
    r = ResponseReader()
    r.feed(data[:cut])
    r.feed_eof()
    assert not r.complete


@SETTINGS
@given(first=responses(), second=responses())
def test_response_reader_is_reusable_after_reset(first: Resp, second: Resp) -> None:
    if first.framing == "close" or not first.keep_alive:
        return  # the connection would not be reused
    r = ResponseReader()
    r.feed(first.wire())
    assert r.complete and r.take_body() == first.body
    r.reset()
    r.feed(second.wire())
    if second.framing == "close":
        r.feed_eof()
    assert (r.status, r.take_body(), r.complete) == (second.status, second.body, True)


@SETTINGS
@given(resp=responses(), junk=st.binary(min_size=1, max_size=200))
def test_bytes_after_a_complete_response_do_not_change_it(resp: Resp, junk: bytes) -> None:
    """A worker that sends more than one response's worth of bytes must not corrupt the first
    response (its headers or body), and its connection must not be reused."""
    if resp.framing == "close":
        return  # there, extra bytes are body
    data = resp.wire()
    expected = (resp.status, [(k.lower(), v) for k, v in resp.wire_headers()], resp.body)
    for chunks in ([data + junk], [data, junk], [data + junk[:1], junk[1:]]):
        r = ResponseReader()
        headers = None
        body = []
        for chunk in chunks:
            try:
                r.feed(chunk)
            except UpstreamProtocolError:
                break
            if headers is None and r.headers_complete:
                headers = r.headers
            body.append(r.take_body())
        assert r.complete
        assert (r.status, headers, b"".join(body)) == expected
        if junk.strip(b"\r\n"):  # llhttp skips blank lines between messages, nothing else
            assert not r.keep_alive


@SETTINGS
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(min_value=0), max_size=20))
@example(data=b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", cuts=[])
@example(data=b"HTTP/1.1 999999 OK\r\n\r\n", cuts=[])
def test_response_garbage_raises_only_upstream_protocol_error(data: bytes, cuts: list[int]) -> None:
    for chunks in ([data], split_at(data, cuts)):
        r = ResponseReader()
        try:
            for chunk in chunks:
                r.feed(chunk)
            r.feed_eof()
        except UpstreamProtocolError:
            pass
        r.take_body()


@SETTINGS
@given(resp=responses(), cuts=st.lists(st.integers(min_value=0), max_size=10))
@example(resp=Resp(200, [], b"ok", "cl", [], False, None), cuts=[25])
def test_interim_responses_are_skipped(resp: Resp, cuts: list[int]) -> None:
    """``100 Continue`` / ``103 Early Hints`` are not the answer: the final response is."""
    if resp.http10:
        return
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    data = interim + resp.wire()
    for chunks in ([data], split_at(data, cuts)):
        r = ResponseReader()
        seen_head = None
        for chunk in chunks:
            r.feed(chunk)
            if seen_head is None and r.headers_complete:
                seen_head = (r.status, list(r.headers))
        if resp.framing == "close":
            r.feed_eof()
        assert seen_head == (resp.status, [(k.lower(), v) for k, v in resp.wire_headers()])
        assert r.complete and r.take_body() == resp.body


def test_switching_protocols_is_a_protocol_error() -> None:
    r = ResponseReader()
    try:
        r.feed(b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nxx")
    except UpstreamProtocolError:
        pass
    else:
        raise AssertionError("a 101 answer to an HTTP request must not be accepted")
