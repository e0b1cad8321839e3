"""The one-call HTTP/1.1 parser: the Cython extension against its pure-Python twin, and what
they accept against httptools (through :class:`H1Connection` and :class:`ResponseReader`).

- on any bytes and any limits, and on generated near-valid requests and responses (odd methods,
  targets, versions, header bytes, line ends, framing, trailing bytes, limits at the boundary),
  the two implementations give the same full answer, None included;
- whatever they accept, httptools accepts too and reads the same way: the same method, target,
  headers, body and keep-alive for a request; the same status, headers, content type,
  keep-alive and body for a response. (They never refuse: None sends bytes to httptools.)
- typical messages are accepted, and each kind of message left to httptools gives None.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lmgw._fast import h1parse_py as twin
from lmgw.http.h1 import H1Connection, ProtocolError
from lmgw.http.server import _request as server_request
from lmgw.http.types import Request
from lmgw.transport.h1client import ResponseReader, UpstreamProtocolError

try:
    from lmgw._fast import h1parse as fast
except ImportError:  # not built: the twin is still checked against httptools
    fast = None

IMPLS = [pytest.param(twin, id="python")] + ([pytest.param(fast, id="cython")] if fast else [])
needs_fast = pytest.mark.skipif(fast is None, reason="extension not built (make build)")
SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
BIG = 1 << 20

# -- typical messages -------------------------------------------------------------------------

WRK_GET = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
OPENAI_BODY = (
    b'{"messages":[{"role":"user","content":"Say hello in one short sentence."}],'
    b'"model":"bench-model","max_tokens":32,"stream":false}'
)
OPENAI_POST = (
    b"POST /v1/chat/completions HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8080\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\n"
    b"Accept: application/json\r\n"
    b"Content-Type: application/json\r\n"
    b"User-Agent: OpenAI/Python 1.54.0\r\n"
    b"X-Stainless-Lang: python\r\n"
    b"Authorization: Bearer sk-test-0123456789abcdef\r\n"
    b"Content-Length: %d\r\n"
    b"\r\n%b" % (len(OPENAI_BODY), OPENAI_BODY)
)
UVICORN_BODY = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"bench-model",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello there!"},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":3}}'
)
UVICORN_200 = (
    b"HTTP/1.1 200 OK\r\n"
    b"date: Tue, 14 Nov 2023 22:13:20 GMT\r\n"
    b"server: uvicorn\r\n"
    b"content-length: %d\r\n"
    b"content-type: application/json\r\n"
    b"x-request-id: 7f3c2a\r\n"
    b"\r\n%b" % (len(UVICORN_BODY), UVICORN_BODY)
)


# -- httptools' reading ---------------------------------------------------------------------


def check_request_as_httptools(data: bytes, max_head: int, max_body: int, got: tuple) -> None:
    """``got`` (an accepted request) is what H1Connection makes of ``data`` too, and the
    server's ``Request`` built from it (http/server.py ``_request``) equals H1Connection's."""
    method, target, headers, body, keep_alive, used = got
    assert used == len(data)
    conn = H1Connection(max_head, max_body, "10.0.0.1:5")
    conn.receive_data(data)
    ev = conn.next_event()
    assert not isinstance(ev, ProtocolError), (ev.status, ev.message)
    assert type(ev) is Request
    built = server_request(got, "10.0.0.1:5")
    assert {k: getattr(built, k) for k in Request.__slots__} == {
        k: getattr(ev, k) for k in Request.__slots__
    }
    path, _, query = target.partition(b"?")
    assert (ev.method, ev.path, ev.query) == (
        method,
        path.decode("latin-1"),
        query.decode("latin-1"),
    )
    assert ev.headers == headers
    assert ev.body == body
    assert ev.keep_alive is keep_alive
    assert ev.http10 is False
    assert conn.next_event() is None


def check_response_as_httptools(data: bytes, got: tuple) -> None:
    """``got`` (an accepted response) is what ResponseReader makes of ``data`` too."""
    status, headers, content_type, keep_alive, body = got
    reader = ResponseReader()
    reader.feed(data)
    assert reader.complete
    assert reader.status == status
    assert reader.headers == headers
    assert reader.content_type == content_type
    assert reader.keep_alive is keep_alive
    assert reader.take_body() == body


# -- generated messages ----------------------------------------------------------------------
#
# Each message is valid but for at most one part (the method, the target, a header, the
# framing, ...), picked at random, or odd all over: valid ones exercise the agreement with
# httptools, one odd part is where the boundary of what is accepted lies.

#: bytes that matter to the grammar: CTLs, DEL, obs-text, separators, CR and LF
ODD = b'\x00\x01\x08\x0b\x1f\x7f\x80\xa0\xff\r\n \t"(),/:;<=>?@[\\]{}|#^`'
ODD_BYTES = st.sampled_from(list(ODD))
REQUEST_PARTS = ["method", "target", "version", "eol", "headers", "framing", "trailing", "limits"]
RESPONSE_PARTS = ["version", "status", "reason", "eol", "headers", "framing", "trailing", "interim"]


def byte_strings(
    allowed: bytes, max_size: int, odd: bool = False, min_size: int = 0
) -> st.SearchStrategy[bytes]:
    """Bytes from ``allowed``; with ``odd``, the odd one in between."""
    normal = st.sampled_from(list(allowed))
    each = st.one_of(normal, normal, normal, ODD_BYTES) if odd else normal
    return st.lists(each, min_size=min_size, max_size=max_size).map(bytes)


COMMON_NAMES = [b"Host", b"Content-Type", b"content-type", b"Accept", b"User-Agent", b"TE"]
COMMON_NAMES += [b"Connection", b"CONNECTION", b"Proxy-Connection", b"Keep-Alive", b"Trailer"]
VALID_NAMES = st.one_of(st.sampled_from(COMMON_NAMES), byte_strings(twin._TOKEN, 12, min_size=1))
ODD_NAMES = st.one_of(
    st.sampled_from([b"Transfer-Encoding", b"Upgrade", b"Expect", b"Content-Length", b""]),
    byte_strings(twin._TOKEN, 12, odd=True),
)
COMMON_VALUES = [b"close", b"keep-alive", b"Close", b"keep-alive, close", b"Upgrade", b"0"]
COMMON_VALUES += [b"chunked", b"application/json", b"a b", b"a\tb", b"\xe9t\xe9", b""]
VISIBLE = bytes(c for c in twin._VALUE if c not in b" \t")


@st.composite
def valid_values(draw: st.DrawFn) -> bytes:
    """Leading OWS (dropped), then value bytes that end in a visible one, or none at all."""
    value = draw(st.one_of(st.sampled_from(COMMON_VALUES), byte_strings(twin._VALUE, 24)))
    return (
        draw(st.sampled_from([b"", b"", b" ", b"\t", b"  "]))
        + value
        + draw(byte_strings(VISIBLE, 1, min_size=1 if value else 0))
    )


ODD_VALUES = st.one_of(
    st.sampled_from([b"x\x7f", b"x\x00y", b"a\rb", b"a\nb", b"a ", b"a\t", b" a \t", b"\x01"]),
    byte_strings(twin._VALUE, 24, odd=True),
)
ODD_SEPS = st.sampled_from([b" :", b"::", b"", b" "])
ODD_EOLS = st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r"])
VALID_TARGETS = st.one_of(
    st.sampled_from([b"/", b"/v1/chat/completions", b"/a?b=c&d", b"/?", b"/a?b?c"]),
    st.builds(lambda t: b"/" + t, byte_strings(twin._TARGET, 30)),
)
ODD_TARGETS = st.one_of(
    st.sampled_from([b"", b"*", b"http://a/b", b"a", b"/a b", b"/#x", b"/\xe9"]),
    st.builds(lambda t: b"/" + t, byte_strings(twin._TARGET, 30, odd=True)),
)
ODD_METHODS = st.sampled_from([b"PUT", b"HEAD", b"get", b"POSTX", b"GE", b"", b"POST\t"])
ODD_VERSIONS = st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1.12"])


@st.composite
def header_lines(draw: st.DrawFn, odd: bool, eol: bytes) -> bytes:
    """Header lines (with their line ends); with ``odd``, some odd line (or line end, or
    separator) among them."""
    lines = [
        name + b":" + value + eol
        for name, value in draw(st.lists(st.tuples(VALID_NAMES, valid_values()), max_size=5))
    ]
    if odd:
        line = draw(
            st.one_of(
                st.builds(lambda n, s, v: n + s + v, ODD_NAMES, st.just(b":"), valid_values()),
                st.builds(lambda n, s, v: n + s + v, VALID_NAMES, st.just(b":"), ODD_VALUES),
                st.builds(lambda n, s, v: n + s + v, VALID_NAMES, ODD_SEPS, valid_values()),
                st.sampled_from([b" folded", b"\tfolded"]),  # obs-fold
            )
        )
        end = draw(st.one_of(st.just(eol), ODD_EOLS))
        lines.insert(draw(st.integers(0, len(lines))), line + end)
    if draw(st.integers(0, 5)) == 0:  # many short headers: H1Connection's count passes head_end
        lines += [b"a:b" + eol] * draw(st.integers(10, 20))
    return b"".join(lines)


@st.composite
def framing(draw: st.DrawFn, body: bytes, odd: bool) -> bytes:
    """The Content-Length line for ``body`` (none for an empty one, sometimes); with ``odd``,
    a wrong, repeated or malformed one, or none."""
    n = len(body)
    name = draw(st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-LENGTH"]))
    value = draw(st.sampled_from([b"%d" % n, b"%d" % n, b"0%d" % n, b" %d" % n, b"\t%d" % n]))
    line = name + b":" + value + b"\r\n"
    if not odd:
        return draw(st.sampled_from([line, line, b""] if not n else [line]))
    odd_value = draw(
        st.sampled_from([b"%d" % (n + 1), b"%d" % (n - 1), b"%d " % n, b"+%d" % n, b"x", b""])
    )
    return draw(
        st.sampled_from(
            [name + b":" + odd_value + b"\r\n", b"", line + line, line + b"content-length: 7\r\n"]
        )
    )


BODIES = st.one_of(st.just(b""), st.binary(max_size=60))
ODD_TRAILING = st.sampled_from([b"GET / HTTP/1.1\r\n\r\n", b"x", b"\r\n"])
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)


@dataclass
class Message:
    data: bytes
    max_head: int
    max_body: int


def limits_for(draw: st.DrawFn, data: bytes, body: bytes, odd: bool) -> tuple[int, int]:
    """Limits at the boundary (head_end and a little over, the body's length) or over it;
    with ``odd``, anything."""
    head_end = data.find(b"\r\n\r\n")
    if odd:
        max_head = draw(st.one_of(st.integers(-3, 8).map(lambda d: head_end + d), INT64))
        return max_head, draw(st.one_of(st.integers(-2, 2).map(lambda d: len(body) + d), INT64))
    max_head = draw(
        st.one_of(
            st.just(65536),
            st.integers(0, 12).map(lambda d: head_end + d),
            st.integers(head_end, (1 << 63) - 1),
        )
    )
    return max_head, draw(st.sampled_from([BIG, len(body), len(body) + 1, (1 << 63) - 1]))


def odd_parts(draw: st.DrawFn, parts: list[str]) -> set[str]:
    """None (a valid message), one part or all."""
    pick = draw(st.sampled_from([None, None, "all", *parts]))
    return set(parts) if pick == "all" else {pick} if pick else set()


@st.composite
def requests(draw: st.DrawFn) -> Message:
    odd = odd_parts(draw, REQUEST_PARTS)
    body = draw(BODIES)
    method = draw(ODD_METHODS if "method" in odd else st.sampled_from([b"GET", b"POST"]))
    target = draw(ODD_TARGETS if "target" in odd else VALID_TARGETS)
    version = draw(ODD_VERSIONS if "version" in odd else st.just(b"HTTP/1.1"))
    eol = draw(ODD_EOLS) if "eol" in odd else b"\r\n"
    fields = [
        draw(header_lines("headers" in odd, eol)),
        draw(framing(body, "framing" in odd)),
        draw(header_lines(False, eol)),
    ]
    trailing = draw(ODD_TRAILING) if "trailing" in odd else b""
    data = method + b" " + target + b" " + version + eol + b"".join(fields) + eol + body + trailing
    return Message(data, *limits_for(draw, data, body, "limits" in odd))


ODD_STATUS = [b"204", b"304", b"100", b"101", b"103", b"199", b"2000", b"20", b"abc", b"099"]
ODD_REASONS = st.one_of(
    st.sampled_from([b"\rOK", b"\r", b"\tOK", b"OK", b" O\x7fK", b" \x00"]),
    byte_strings(twin._VALUE, 12, odd=True).map(lambda r: b" " + r),
)


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    odd = odd_parts(draw, RESPONSE_PARTS)
    body = draw(BODIES)
    version = draw(
        st.sampled_from([b"HTTP/1.0", b"HTTP/2", b"http/1.1"])
        if "version" in odd
        else st.just(b"HTTP/1.1")
    )
    code = draw(
        st.sampled_from(ODD_STATUS)
        if "status" in odd
        else st.sampled_from([b"200", b"201", b"404", b"500", b"999"])
    )
    reason = draw(
        ODD_REASONS
        if "reason" in odd
        else st.one_of(
            st.sampled_from([b" OK", b"", b" ", b" Not Found"]),
            byte_strings(twin._VALUE, 12).map(lambda r: b" " + r),
        )
    )
    eol = draw(ODD_EOLS) if "eol" in odd else b"\r\n"
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" if "interim" in odd else b""
    fields = [
        draw(header_lines("headers" in odd, eol)),
        draw(framing(body, "framing" in odd)),
        draw(header_lines(False, eol)),
    ]
    trailing = draw(ODD_TRAILING) if "trailing" in odd else b""
    head = interim + version + b" " + code + reason + eol
    return head + b"".join(fields) + eol + body + trailing


def mutated(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, byte in edits:
        if out:
            out[pos % len(out)] = byte
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0), ODD_BYTES), min_size=1, max_size=3)
PREFIXES = st.sampled_from([b"", b"GET /", b"POST /", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 2"])
ANY_BYTES = st.one_of(
    st.binary(max_size=300),
    st.builds(bytes.__add__, PREFIXES, st.binary(max_size=200)),
    st.builds(mutated, st.sampled_from([WRK_GET, OPENAI_POST, UVICORN_200]), EDITS),
)
ANY_LIMIT = st.one_of(st.integers(-10, 600), INT64)


# -- the twins agree -------------------------------------------------------------------------


@needs_fast
@SETTINGS
@given(data=ANY_BYTES, max_head=ANY_LIMIT, max_body=ANY_LIMIT)
@example(data=OPENAI_POST, max_head=OPENAI_POST.find(b"\r\n\r\n"), max_body=len(OPENAI_BODY))
def test_twins_agree_on_any_bytes(data: bytes, max_head: int, max_body: int) -> None:
    assert fast.parse_request(data, max_head, max_body) == twin.parse_request(
        data, max_head, max_body
    )
    assert fast.parse_response(data) == twin.parse_response(data)


@needs_fast
@SETTINGS
@given(msg=requests())
def test_twins_agree_on_requests(msg: Message) -> None:
    for data in (msg.data, msg.data.replace(b"\r\n", b"\n", 1)):
        got = fast.parse_request(data, msg.max_head, msg.max_body)
        assert got == twin.parse_request(data, msg.max_head, msg.max_body)


@needs_fast
@SETTINGS
@given(data=responses())
def test_twins_agree_on_responses(data: bytes) -> None:
    assert fast.parse_response(data) == twin.parse_response(data)


# -- what they accept, httptools reads the same way ----------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(msg=requests())
def test_accepted_requests_read_as_httptools_reads_them(impl, msg: Message) -> None:
    got = impl.parse_request(msg.data, msg.max_head, msg.max_body)
    if got is not None:
        check_request_as_httptools(msg.data, msg.max_head, msg.max_body, got)


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(data=responses())
def test_accepted_responses_read_as_httptools_reads_them(impl, data: bytes) -> None:
    got = impl.parse_response(data)
    if got is not None:
        check_response_as_httptools(data, got)


# -- examples --------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_typical_requests(impl) -> None:
    assert impl.parse_request(WRK_GET, 65536, BIG) == (
        "GET",
        b"/v1/models",
        [(b"host", b"127.0.0.1:8080")],
        b"",
        True,
        len(WRK_GET),
    )
    got = impl.parse_request(OPENAI_POST, 65536, BIG)
    assert got is not None
    method, target, headers, body, keep_alive, used = got
    assert (method, target, body, keep_alive, used) == (
        "POST",
        b"/v1/chat/completions",
        OPENAI_BODY,
        True,
        len(OPENAI_POST),
    )
    assert headers[-1] == (b"content-length", b"%d" % len(OPENAI_BODY))
    assert headers[-2] == (b"authorization", b"Bearer sk-test-0123456789abcdef")
    for data, result in ((WRK_GET, impl.parse_request(WRK_GET, 65536, BIG)), (OPENAI_POST, got)):
        check_request_as_httptools(data, 65536, BIG, result)
    # the limits are inclusive, as H1Connection's
    head_end = OPENAI_POST.find(b"\r\n\r\n")
    assert impl.parse_request(OPENAI_POST, head_end, len(OPENAI_BODY)) == got
    assert impl.parse_request(OPENAI_POST, head_end - 1, BIG) is None
    assert impl.parse_request(OPENAI_POST, 65536, len(OPENAI_BODY) - 1) is None
    close = OPENAI_POST.replace(b"keep-alive", b"Close")
    assert impl.parse_request(close, 65536, BIG)[4] is False


@pytest.mark.parametrize("impl", IMPLS)
def test_typical_response(impl) -> None:
    got = impl.parse_response(UVICORN_200)
    assert got == (
        200,
        [
            (b"date", b"Tue, 14 Nov 2023 22:13:20 GMT"),
            (b"server", b"uvicorn"),
            (b"content-length", b"%d" % len(UVICORN_BODY)),
            (b"content-type", b"application/json"),
            (b"x-request-id", b"7f3c2a"),
        ],
        b"application/json",
        True,
        UVICORN_BODY,
    )
    check_response_as_httptools(UVICORN_200, got)
    assert (
        impl.parse_response(UVICORN_200.replace(b"OK\r\n", b"OK\r\nConnection: close\r\n"))[3]
        is False
    )
    no_reason = b"HTTP/1.1 404\r\ncontent-length: 2\r\n\r\nno"
    assert impl.parse_response(no_reason) == (404, [(b"content-length", b"2")], b"", True, b"no")


POST = b"POST / HTTP/1.1\r\nHost: x\r\n%b\r\n%b"
NONE_REQUESTS = {
    "chunked body": POST % (b"Transfer-Encoding: chunked\r\n", b"1\r\nx\r\n0\r\n\r\n"),
    "upgrade": b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    "expect": POST % (b"Expect: 100-continue\r\nContent-Length: 1\r\n", b"x"),
    "HTTP/1.0": b"GET / HTTP/1.0\r\n\r\n",
    "other method": b"PUT / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    "absolute-form target": b"GET http://a/ HTTP/1.1\r\n\r\n",
    "head not complete": b"GET / HTTP/1.1\r\nHost: x\r\n",
    "body not complete": POST % (b"Content-Length: 5\r\n", b"abc"),
    "bytes after it": b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    "body past Content-Length": POST % (b"Content-Length: 1\r\n", b"ab"),
    "two Content-Lengths": POST % (b"Content-Length: 1\r\nContent-Length: 1\r\n", b"a"),
    "Content-Length not digits": POST % (b"Content-Length: +1\r\n", b"a"),
    "bare LF": b"GET / HTTP/1.1\nHost: x\n\n",
    "obs-fold": b"GET / HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n",
    "CTL in a value": b"GET / HTTP/1.1\r\nX-A: a\x01b\r\n\r\n",
    # llhttp keeps trailing whitespace in the value (the twin used to strip it)
    "trailing whitespace": b"GET / HTTP/1.1\r\nHost: x \r\n\r\n",
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("data", NONE_REQUESTS.values(), ids=NONE_REQUESTS.keys())
def test_requests_left_to_httptools(impl, data: bytes) -> None:
    assert impl.parse_request(data, 65536, BIG) is None


@pytest.mark.parametrize("impl", IMPLS)
def test_limits_left_to_httptools(impl) -> None:
    # over a limit: None, and H1Connection answers 431 / 413
    data = POST % (b"Content-Length: 3\r\n", b"abc")
    head_end = data.find(b"\r\n\r\n")
    assert impl.parse_request(data, head_end, 3) is not None
    assert impl.parse_request(data, head_end - 1, 3) is None
    assert impl.parse_request(data, head_end, 2) is None
    assert impl.parse_request(data, -1, 3) is None
    # many short headers: H1Connection's count (target, name + value + 4 each) passes max_head
    # where head_end does not; it answers 431 (the twin used to accept these)
    data = b"GET / HTTP/1.1\r\n" + b"a:b\r\n" * 20 + b"\r\n"
    head_end = data.find(b"\r\n\r\n")
    assert impl.parse_request(data, head_end, 0) is None
    conn = H1Connection(head_end, 0)
    conn.receive_data(data)
    assert getattr(conn.next_event(), "status", None) == 431
    counted = 1 + 20 * (1 + 1 + 4)
    assert counted > head_end
    assert impl.parse_request(data, counted - 1, 0) is None
    got = impl.parse_request(data, counted, 0)
    assert got is not None
    check_request_as_httptools(data, counted, 0, got)


@pytest.mark.parametrize("impl", IMPLS)
def test_trailing_whitespace_would_differ_from_httptools(impl) -> None:
    data = b"GET / HTTP/1.1\r\nHost: x \t\r\nX-A:  \r\n\r\n"
    assert impl.parse_request(data, 65536, BIG) is None
    conn = H1Connection()
    conn.receive_data(data)
    assert conn.next_event().headers == [(b"host", b"x \t"), (b"x-a", b"")]
    # only-whitespace values are empty in both
    data = b"GET / HTTP/1.1\r\nX-A:  \t\r\n\r\n"
    assert impl.parse_request(data, 65536, BIG)[2] == [(b"x-a", b"")]


OK = b"HTTP/1.1 200 OK\r\n%b\r\n%b"
NONE_RESPONSES = {
    "chunked body": OK % (b"Transfer-Encoding: chunked\r\n", b"1\r\nx\r\n0\r\n\r\n"),
    "no Content-Length": OK % (b"Content-Type: text/plain\r\n", b"until close"),
    "no headers": b"HTTP/1.1 200 OK\r\n\r\n",
    "interim": b"HTTP/1.1 100 Continue\r\n\r\n" + OK % (b"Content-Length: 0\r\n", b""),
    "switching protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    "204": b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\nabc",
    "304": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n\r\nabc",
    "HTTP/1.0": b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "body not complete": OK % (b"Content-Length: 5\r\n", b"abc"),
    "bytes after it": OK % (b"Content-Length: 1\r\n", b"ab"),
    "two Content-Lengths": OK % (b"Content-Length: 1\r\nContent-Length: 1\r\n", b"a"),
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "trailing whitespace": OK % (b"Content-Length: 0\r\nContent-Type: a/b \r\n", b""),
    # llhttp wants LF after the CR that ends the code (the twin used to accept this)
    "CR without LF after the code": b"HTTP/1.1 200\rOK\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("data", NONE_RESPONSES.values(), ids=NONE_RESPONSES.keys())
def test_responses_left_to_httptools(impl, data: bytes) -> None:
    assert impl.parse_response(data) is None


def test_httptools_refuses_a_status_line_with_a_lone_cr() -> None:
    with pytest.raises(UpstreamProtocolError, match="Expected LF after CR"):
        ResponseReader().feed(NONE_RESPONSES["CR without LF after the code"])


def one_byte_edits(data: bytes, upto: int):
    """``data`` with one byte replaced, inserted or deleted, at each of its first ``upto``."""
    for i in range(upto):
        for c in range(256):
            yield data[:i] + bytes([c]) + data[i + 1 :]
            yield data[:i] + bytes([c]) + data[i:]
        yield data[:i] + data[i + 1 :]


@pytest.mark.parametrize("data", [WRK_GET, UVICORN_200], ids=["request", "response"])
def test_every_one_byte_edit_of_a_head(data: bytes) -> None:
    """Exhaustive near the boundary of the grammar: the twins agree, and httptools agrees with
    whatever they accept."""
    impl = fast or twin
    for edited in one_byte_edits(data, data.find(b"\r\n\r\n") + 4):
        if data.startswith(b"GET"):
            max_head = edited.find(b"\r\n\r\n")  # at the boundary
            got = impl.parse_request(edited, max_head, 0)
            assert got == twin.parse_request(edited, max_head, 0)
            if got is not None:
                check_request_as_httptools(edited, max_head, 0, got)
        else:
            got = impl.parse_response(edited)
            assert got == twin.parse_response(edited)
            if got is not None:
                check_response_as_httptools(edited, got)
