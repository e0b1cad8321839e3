"""The sans-IO request parser (:class:`lmgw.http.h1.H1Connection`), h11-style.

Every well-formed message goes through :func:`triple`: fed whole, fed one byte at a time (no
event may appear before the last byte), and followed by a pipelined request (which must come
out next, untouched). Limits and malformed input must give exactly one :class:`ProtocolError`
with the right status, after which the connection accepts nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lmgw.http.h1 import BODY, HEAD, IDLE, H1Connection, ProtocolError
from lmgw.http.types import Request, UpgradeRequest

Event = Request | ProtocolError
NEXT = b"GET /next?n=1 HTTP/1.1\r\nhost: x\r\n\r\n"


def drain(conn: H1Connection) -> list[Event]:
    out: list[Event] = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def feed(data: bytes, *, step: int = 0, **limits: int) -> list[Event]:
    """All events from ``data`` fed whole (step 0) or ``step`` bytes at a time."""
    conn = H1Connection(**limits)
    if not step:
        conn.receive_data(data)
        return drain(conn)
    out: list[Event] = []
    for i in range(0, len(data), step):
        conn.receive_data(data[i : i + step])
        out += drain(conn)
    return out


def summary(req: Request) -> tuple:
    return (
        req.method,
        req.path,
        req.query,
        req.headers,
        req.body,
        req.keep_alive,
        req.http10,
    )


def triple(data: bytes, check: Callable[[Request], None], **limits: int) -> Request:
    """h11's ``tr()``: whole buffer, byte by byte, and with a pipelined request behind it."""
    # 1. whole
    events = feed(data, **limits)
    assert len(events) == 1 and isinstance(events[0], Request), events
    req = events[0]
    check(req)
    # 2. one byte at a time: nothing until the last byte
    conn = H1Connection(**limits)
    for i in range(len(data) - 1):
        conn.receive_data(data[i : i + 1])
        assert conn.next_event() is None, f"event after {i + 1} of {len(data)} bytes"
    conn.receive_data(data[-1:])
    events = drain(conn)
    assert len(events) == 1 and isinstance(events[0], Request)
    assert summary(events[0]) == summary(req)
    assert conn.state == IDLE
    # 3. trailing bytes: a complete pipelined request comes out next, a partial one waits
    if req.keep_alive:
        events = feed(data + NEXT, **limits)
        assert [type(e) for e in events] == [Request, Request], events
        assert summary(events[0]) == summary(req)
        assert (events[1].method, events[1].path, events[1].query) == ("GET", "/next", "n=1")
        assert events[1].headers == [(b"host", b"x")]
        conn = H1Connection(**limits)
        conn.receive_data(data + NEXT[:-3])
        events = drain(conn)
        assert len(events) == 1 and summary(events[0]) == summary(req)
        assert conn.state == HEAD
        conn.receive_data(NEXT[-3:])
        [nxt] = drain(conn)
        assert nxt.path == "/next"
    return req


def one_error(data: bytes, status: int, *, step: int = 0, **limits: int) -> ProtocolError:
    events = feed(data, step=step, **limits)
    assert len(events) == 1 and isinstance(events[0], ProtocolError), events
    assert events[0].status == status, events[0].message
    return events[0]


# -- well-formed requests -------------------------------------------------------------------


def test_get() -> None:
    def check(r: Request) -> None:
        assert summary(r) == ("GET", "/v1/models", "", [(b"host", b"gw")], b"", True, False)
        assert r.header(b"host") == b"gw"
        assert r.header(b"missing") is None

    req = triple(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n", check)
    assert "GET /v1/models" in repr(req)


def test_post_content_length() -> None:
    body = b'{"model": "m", "prompt": "hi"}'
    data = b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)

    def check(r: Request) -> None:
        assert r.method == "POST" and r.path == "/v1/completions"
        assert r.body == body
        assert r.header(b"content-length") == b"%d" % len(body)

    triple(data, check)


def test_post_zero_length_body() -> None:
    triple(
        b"POST /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        lambda r: (r.body == b"") or pytest.fail("body"),
    )


def test_body_with_crlf_inside_is_kept_verbatim() -> None:
    body = b"a\r\n\r\nGET / HTTP/1.1\r\n\r\n"
    data = b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    triple(data, lambda r: (r.body == body) or pytest.fail("body"))


def test_chunked_body_with_extensions_and_trailers() -> None:
    data = (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"\r\n"
        b"5;name=value\r\nhello\r\n"
        b'1;a;b="q"\r\n \r\n'
        b"A\r\n0123456789\r\n"
        b"0\r\n"
        b"X-Checksum: abc\r\n"
        b"X-Other: 1\r\n"
        b"\r\n"
    )

    def check(r: Request) -> None:
        assert r.body == b"hello 0123456789"
        assert r.header(b"transfer-encoding") == b"chunked"
        # trailers are not request headers (they arrive after the head was judged)
        assert r.header(b"x-checksum") is None
        assert r.headers == [(b"transfer-encoding", b"chunked")]

    triple(data, check)


def test_chunked_body_without_trailers() -> None:
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    triple(data, lambda r: (r.body == b"abc") or pytest.fail("body"))


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        (b"/v1/models", "/v1/models", ""),
        (b"/search?q=a%20b&x=1", "/search", "q=a%20b&x=1"),
        (b"/p?", "/p", ""),
        (b"/p?a=1?b=2", "/p", "a=1?b=2"),
        (b"/", "/", ""),
        (b"*", "*", ""),
    ],
)
def test_query_strings(target: bytes, path: str, query: str) -> None:
    method = b"OPTIONS" if target == b"*" else b"GET"
    data = b"%s %s HTTP/1.1\r\n\r\n" % (method, target)
    triple(data, lambda r: ((r.path, r.query) == (path, query)) or pytest.fail(repr(r)))


def test_header_names_are_folded_values_are_not() -> None:
    data = (
        b"GET / HTTP/1.1\r\n"
        b"HOST: a\r\n"
        b"X-Request-ID: AbC-123\r\n"
        b"authorization: Bearer XyZ\r\n"
        b"X-Dup: 1\r\n"
        b"x-dup: 2\r\n"
        b"\r\n"
    )

    def check(r: Request) -> None:
        assert r.headers == [
            (b"host", b"a"),
            (b"x-request-id", b"AbC-123"),
            (b"authorization", b"Bearer XyZ"),
            (b"x-dup", b"1"),
            (b"x-dup", b"2"),
        ]
        assert r.header(b"x-dup") == b"1"  # first value wins

    triple(data, check)


def test_leading_whitespace_of_values_is_dropped() -> None:
    data = b"GET / HTTP/1.1\r\nA:   spaced\r\nB:\ttabbed\r\nC:\r\n\r\n"
    triple(
        data,
        lambda r: (
            (r.headers == [(b"a", b"spaced"), (b"b", b"tabbed"), (b"c", b"")])
            or pytest.fail(repr(r.headers))
        ),
    )


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive", "http10"),
    [
        (b"1.1", None, True, False),
        (b"1.1", b"close", False, False),
        (b"1.1", b"Close", False, False),
        (b"1.1", b"keep-alive", True, False),
        (b"1.1", b"Keep-Alive", True, False),
        (b"1.1", b"te, close", False, False),
        (b"1.0", None, False, True),
        (b"1.0", b"keep-alive", True, True),
        (b"1.0", b"Keep-Alive", True, True),
        (b"1.0", b"close", False, True),
    ],
)
def test_keep_alive_rules(
    version: bytes, connection: bytes | None, keep_alive: bool, http10: bool
) -> None:
    head = b"GET / HTTP/%s\r\nHost: h\r\n" % version
    if connection is not None:
        head += b"Connection: %s\r\n" % connection
    triple(
        head + b"\r\n",
        lambda r: ((r.keep_alive, r.http10) == (keep_alive, http10)) or pytest.fail(repr(r)),
    )


def test_client_address_is_attached() -> None:
    conn = H1Connection(client="10.0.0.1:5555")
    conn.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    [req] = drain(conn)
    assert req.client == "10.0.0.1:5555"


def test_pipelined_requests_come_out_in_order() -> None:
    reqs = [
        b"GET /a HTTP/1.1\r\n\r\n",
        b"POST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz",
        b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        b"DELETE /d?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n",
    ]
    stream = b"".join(reqs)
    for step in (0, 1, 2, 7, 64):
        events = feed(stream, step=step)
        assert [(e.method, e.path, e.body, e.keep_alive) for e in events] == [
            ("GET", "/a", b"", True),
            ("POST", "/b", b"xyz", True),
            ("POST", "/c", b"hi", True),
            ("DELETE", "/d", b"", False),
        ]


def test_state_tracks_head_and_body() -> None:
    conn = H1Connection()
    assert conn.state == IDLE
    conn.receive_data(b"POST / HT")
    assert conn.state == HEAD
    conn.receive_data(b"TP/1.1\r\nContent-Length: 4\r\n\r\nab")
    assert conn.state == BODY
    assert conn.next_event() is None
    conn.receive_data(b"cd")
    assert conn.state == IDLE
    [req] = drain(conn)
    assert req.body == b"abcd"


# -- Expect: 100-continue -------------------------------------------------------------------


def test_expect_continue_flag() -> None:
    conn = H1Connection()
    conn.receive_data(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-Continue\r\n\r\n")
    assert conn.next_event() is None
    assert conn.expect_continue
    conn.continue_sent()
    assert not conn.expect_continue
    conn.receive_data(b"hello")
    [req] = drain(conn)
    assert req.body == b"hello" and req.header(b"expect") == b"100-Continue"
    assert not conn.expect_continue


def test_expect_continue_flag_clears_when_the_body_arrives_anyway() -> None:
    conn = H1Connection()
    conn.receive_data(b"POST / HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert conn.expect_continue
    conn.receive_data(b"ok")  # the client gave up waiting for 100 and sent the body
    assert not conn.expect_continue
    assert drain(conn)[0].body == b"ok"
    conn.receive_data(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n")
    assert not conn.expect_continue  # not inherited by the next request


def test_no_expect_continue_without_the_header_or_without_a_body() -> None:
    conn = H1Connection()
    conn.receive_data(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
    assert not conn.expect_continue
    conn = H1Connection()
    conn.receive_data(b"POST / HTTP/1.1\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n")
    assert not conn.expect_continue
    assert len(drain(conn)) == 1


# -- limits ---------------------------------------------------------------------------------


def big_head(n_headers: int, value_len: int = 50) -> bytes:
    lines = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * value_len) for i in range(n_headers))
    return b"GET / HTTP/1.1\r\n" + lines + b"\r\n"


@pytest.mark.parametrize("step", [0, 1, 100])
def test_head_over_limit_is_431(step: int) -> None:
    err = one_error(big_head(40), 431, step=step, max_header_bytes=1024)
    assert "1024" in err.message


def test_head_within_limit_passes() -> None:
    data = big_head(10)
    assert len(data) < 1024
    triple(data, lambda r: (len(r.headers) == 10) or pytest.fail("headers"), max_header_bytes=1024)


@pytest.mark.parametrize("step", [0, 1, 333])
def test_one_endless_header_is_431_before_it_ends(step: int) -> None:
    """A single header value that never ends must not be buffered without bound."""
    data = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 5000
    one_error(data, 431, step=step, max_header_bytes=1024)


@pytest.mark.parametrize("step", [0, 1, 333])
def test_long_url_is_431(step: int) -> None:
    one_error(b"GET /" + b"u" * 5000, 431, step=step, max_header_bytes=1024)


def test_oversize_head_is_not_judged_by_a_previous_body() -> None:
    """Raw counting of an incomplete head must not include the pipelined body before it."""
    body = b"b" * 3000
    data = b"POST / HTTP/1.1\r\nContent-Length: 3000\r\n\r\n" + body + b"GET /next HT"
    conn = H1Connection(max_header_bytes=1024)
    conn.receive_data(data)
    [req] = drain(conn)
    assert req.body == body
    conn.receive_data(b"TP/1.1\r\n\r\n")
    [nxt] = drain(conn)
    assert nxt.path == "/next"


def test_content_length_over_limit_is_413_before_the_body() -> None:
    err = one_error(b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", 413, max_body_bytes=100)
    assert "100" in err.message


def test_content_length_at_limit_passes() -> None:
    data = b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"z" * 100
    triple(data, lambda r: (len(r.body) == 100) or pytest.fail("body"), max_body_bytes=100)


@pytest.mark.parametrize("step", [0, 1, 10])
def test_chunked_body_crossing_limit_is_413(step: int) -> None:
    chunks = b"".join(b"a\r\n0123456789\r\n" for _ in range(11))
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks  # no end yet
    one_error(data, 413, step=step, max_body_bytes=100)


def test_chunked_body_at_limit_passes() -> None:
    chunks = b"".join(b"a\r\n0123456789\r\n" for _ in range(10))
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    triple(data, lambda r: (len(r.body) == 100) or pytest.fail("body"), max_body_bytes=100)


# -- malformed input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"abc", b"-1", b"1.5", b"0x10", b"1 2", b"99999999999999999999999999", b"+5"],
)
def test_invalid_content_length_is_400(value: bytes) -> None:
    one_error(b"POST / HTTP/1.1\r\nContent-Length: %s\r\n\r\n" % value, 400)


@pytest.mark.parametrize(
    "data",
    [
        # request smuggling shapes
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        # malformed request lines and headers
        b"\x00\x01\x02garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET  HTTP/1.1\r\n\r\n",
        b"G ET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\n\r\n",
        b"GET / FTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\nA: b\n\n",
        b"\xff\xfe / HTTP/1.1\r\n\r\n",
    ],
)
def test_malformed_input_is_400(data: bytes) -> None:
    one_error(data, 400)
    one_error(data, 400, step=1)


@pytest.mark.parametrize("version", [b"0.9", b"2.0", b"1.2", b"3.0"])
def test_unsupported_http_versions_are_rejected(version: bytes) -> None:
    one_error(b"GET / HTTP/%s\r\n\r\n" % version, 400)


def test_http09_simple_request_is_rejected() -> None:
    one_error(b"GET /\r\n\r\n", 400)


@pytest.mark.parametrize(
    "data",
    [
        # WebSocket upgrades are handed to the application instead (test_observability_unit)
        b"POST /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    ],
)
def test_other_upgrade_requests_are_400_and_never_dispatched(data: bytes) -> None:
    for step in (0, 1):
        events = feed(data, step=step)
        assert [type(e) for e in events] == [ProtocolError], events
        assert events[0].status == 400


def test_websocket_upgrade_is_handed_over_whole_split_anywhere() -> None:
    data = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    for step in (0, 1):
        events = feed(data + b"\x88\x80", step=step)
        assert [type(e) for e in events] == [UpgradeRequest], events
        assert events[0].path == "/ws" and not events[0].keep_alive


def test_upgrade_header_without_connection_upgrade_is_an_ordinary_request() -> None:
    triple(
        b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
        lambda r: (r.header(b"upgrade") == b"websocket") or pytest.fail("upgrade"),
    )


def test_nothing_is_accepted_after_an_error() -> None:
    conn = H1Connection()
    conn.receive_data(b"GET / HTTP/1.1\r\n\r\nBROKEN\x00 / HTTP/1.1\r\n\r\n")
    events = drain(conn)
    assert [type(e) for e in events] == [Request, ProtocolError]
    assert conn.failed
    conn.receive_data(b"GET /after HTTP/1.1\r\n\r\n")
    assert conn.next_event() is None
    assert conn.state == IDLE
    assert not conn.expect_continue


def test_limit_error_stops_the_connection_too() -> None:
    conn = H1Connection(max_body_bytes=10)
    conn.receive_data(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n")
    [err] = drain(conn)
    assert err.status == 413 and conn.failed
    conn.receive_data(b"01234567890GET / HTTP/1.1\r\n\r\n")
    assert conn.next_event() is None


def test_protocol_error_is_an_exception_with_a_status() -> None:
    err = ProtocolError(431, "too big")
    assert isinstance(err, Exception)
    assert (err.status, err.message, str(err)) == (431, "too big", "too big")


def test_trailer_connection_close_ends_the_connection() -> None:
    data = (
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\nConnection: close\r\n\r\n"
    )
    [req] = feed(data)
    assert req.body == b"hi" and not req.keep_alive
    assert req.headers == [(b"transfer-encoding", b"chunked")]


def test_trailers_count_against_the_head_limit() -> None:
    trailers = b"".join(b"x-t%d: %s\r\n" % (i, b"v" * 50) for i in range(40))
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + trailers + b"\r\n"
    one_error(data, 431, max_header_bytes=1024)


@pytest.mark.parametrize("step", [1, 333])
def test_one_endless_trailer_is_431_before_it_ends(step: int) -> None:
    """httptools buffers a trailer line until it ends: that must be bounded too."""
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-T: "
    one_error(data + b"a" * 5000, 431, step=step, max_header_bytes=1024)


def test_long_chunk_extensions_are_bounded() -> None:
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2;" + b"e" * 5000
    one_error(data, 431, step=100, max_header_bytes=1024)


@pytest.mark.parametrize("step", [1, 2, 5])
def test_tiny_chunks_fed_slowly_are_not_mistaken_for_junk(step: int) -> None:
    chunks = b"".join(b"1;x=y\r\n%c\r\n" % c for c in b"abcdefghijklmnopqrstuvwxyz" * 4)
    data = (
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks
        + b"0\r\nX-A: 1\r\nX-B: 2\r\n\r\n"
    )
    [req] = feed(data, step=step, max_header_bytes=80)
    assert req.body == b"abcdefghijklmnopqrstuvwxyz" * 4
