"""Raw bytes at a live gateway's HTTP port, on both front-door servers: arbitrary bytes,
grammar-built requests (odd methods, targets, versions, framing headers, chunked bodies,
pipelines, bare LF line ends) and byte-level mutations of valid requests. Each example is one
connection: the bytes go out, the client half-closes, and the answer is read to EOF within
``FUZZ_DEADLINE_S``. Whatever comes back must be well-formed responses with no 5xx (or no
response at all for bytes that are not a request yet), and the gateway must still be healthy
afterwards."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from fuzz_support import MODEL, LiveGateway, examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
SETTINGS = settings(
    max_examples=examples(60), deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


@pytest.fixture(scope="module", params=["native", "hypercorn"])
def live(request: pytest.FixtureRequest) -> Iterator[LiveGateway]:
    # short idle limits: hypercorn keeps a half-closed idle connection until its keep-alive
    # timeout, so that bounds what a "no request at all" example waits for
    limits = {"header_timeout_s": 2.0, "body_timeout_s": 2.0, "keepalive_timeout_s": 0.5}
    with LiveGateway(request.param, keys=False, **limits) as gw:
        yield gw


H2_PREFACE = b"PRI * HTTP/2.0\r\n"


def check(live: LiveGateway, data: bytes) -> None:
    answer = live.exchange_raw(data)
    if not answer:
        return  # nothing complete to answer (e.g. the head or body was cut short)
    if data.startswith(H2_PREFACE) and answer[3:4] == b"\x04" and live.server == "hypercorn":
        return  # HTTP/2's preface: hypercorn speaks HTTP/2 (a SETTINGS frame), as it should
    assert answer.startswith(b"HTTP/1."), answer[:200]
    codes = [int(c) for c in STATUS.findall(answer)]
    assert codes, answer[:200]
    # 501: the RFC 9112 answer to a transfer coding the server does not implement (hypercorn)
    assert all(100 <= c < 500 or c == 501 for c in codes), (codes, data[:300], answer[:500])


methods = st.sampled_from(
    [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
     b"PRI", b"get", b"G\x00T", b""]
)  # fmt: skip
targets = st.one_of(
    st.sampled_from(
        [
            b"/v1/chat/completions",
            b"/v1/completions",
            b"/v1/models",
            b"/v1/models/sim-model",
            b"/v1/models/%2e%2e",
            b"/health",
            b"/metrics",
            b"/openapi.json",
            b"/tokenize",
            b"/detokenize",
            b"/generate",
            b"/admin/workers",
            b"/admin/workers/w0/drain",
            b"*",
            b"http://example.com/v1/models",
            b"/%00",
            b"/../../etc/passwd",
            b"/v1/chat/completions?x=1",
            b"//",
            b"",
        ]
    ),
    st.binary(max_size=40).filter(lambda b: b" " not in b and b"\n" not in b),
)
versions = st.sampled_from(
    [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.1x", b"http/1.1", b""]
)
numbers = st.one_of(
    st.integers(-5, 70000).map(lambda n: str(n).encode()),
    st.sampled_from([b"", b"0x10", b"1e3", b" 5", b"18446744073709551617", b"5, 5", b"+5"]),
)
header = st.one_of(
    st.tuples(st.just(b"content-length"), numbers),
    st.tuples(
        st.just(b"transfer-encoding"),
        st.sampled_from([b"chunked", b"gzip, chunked", b"chunked, gzip", b"identity", b"xchunked"]),
    ),
    st.tuples(st.just(b"connection"), st.sampled_from([b"close", b"keep-alive", b"upgrade", b""])),
    st.tuples(st.just(b"expect"), st.sampled_from([b"100-continue", b"200-ok"])),
    st.tuples(st.just(b"upgrade"), st.sampled_from([b"websocket", b"h2c"])),
    st.tuples(st.just(b"host"), st.sampled_from([b"a", b"", b"a:b:c", b"\xff"])),
    st.tuples(
        st.sampled_from([b"x-request-id", b"authorization", b"content-type"]),
        st.binary(max_size=30),
    ),
    st.tuples(st.binary(min_size=0, max_size=12), st.binary(max_size=20)),
)


def chunked(body: bytes, sizes: list[int], trailer: bytes) -> bytes:
    out, pos = b"", 0
    for n in sizes:
        piece = body[pos : pos + n]
        pos += n
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
    return out + b"0\r\n" + trailer + b"\r\n"


bodies = st.one_of(
    st.just(b""),
    st.just(CHAT),
    st.binary(max_size=200),
    st.builds(
        chunked,
        st.sampled_from([CHAT, b"{}", b"not json"]),
        st.lists(st.integers(0, 40), max_size=4),
        st.sampled_from([b"", b"x-t: 1\r\n", b"connection: close\r\n", b"bad trailer\r\n"]),
    ),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    line = b" ".join((draw(methods), draw(targets), draw(versions)))
    headers = draw(st.lists(header, max_size=6))
    body = draw(bodies)
    if draw(st.booleans()):  # a matching content-length, the common case
        headers.append((b"content-length", str(len(body)).encode()))
    head = line + eol + b"".join(k + b": " + v + eol for k, v in headers) + eol
    return head + body


@SETTINGS
@given(st.binary(max_size=512))
def test_arbitrary_bytes(live: LiveGateway, data: bytes) -> None:
    check(live, data)


@SETTINGS
@given(st.lists(requests(), min_size=1, max_size=3))
def test_grammar_built_requests_and_pipelines(live: LiveGateway, reqs: list[bytes]) -> None:
    check(live, b"".join(reqs))


VALID = [
    b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(CHAT), CHAT),
    b"POST /tokenize HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
    + chunked(b'{"prompt": "hi"}', [5, 20], b""),
]


@SETTINGS
@given(
    st.sampled_from(VALID),
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "insert", "delete"]),
            st.integers(0, 10**6),
            st.binary(min_size=1, max_size=4),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_mutated_valid_requests(live: LiveGateway, base: bytes, edits: list) -> None:
    data = bytearray(base)
    for kind, pos, junk in edits:
        at = pos % (len(data) + 1)
        if kind == "insert":
            data[at:at] = junk
        elif kind == "delete":
            del data[at : at + len(junk)]
        elif data:
            data[at % len(data)] ^= junk[0] or 1
    check(live, bytes(data))


def test_still_healthy_after_the_fuzzing(live: LiveGateway) -> None:
    live.assert_healthy()


def test_the_http2_preface(live: LiveGateway) -> None:
    """The grammar can build HTTP/2's connection preface: hypercorn answers it in HTTP/2,
    the native server (HTTP/1.1 only) with an HTTP/1 error."""
    answer = live.exchange_raw(H2_PREFACE + b"\r\nSM\r\n\r\n")
    if live.server == "hypercorn":
        assert answer[3:4] == b"\x04", answer[:100]  # a SETTINGS frame
    else:
        assert not answer or answer.startswith(b"HTTP/1."), answer[:100]
    check(live, H2_PREFACE + b"\r\nSM\r\n\r\n")
