"""The chunked-body decoder: the Cython extension against its pure-Python twin and against
httptools, and the upstream reader that uses it.

- valid bodies (random chunk sizes, extensions, trailers) decode to their payload however the
  bytes are split, in both implementations and in httptools;
- any bytes at all give both implementations the same outputs, the same end state and the same
  first error;
- ``count_events`` is ``bytes.count(b"\\n\\n")``;
- :class:`ResponseReader` answers the same with the decoder and with httptools alone (heads
  split anywhere, interim responses, trailers, bytes after the end, reuse after reset).
"""

from __future__ import annotations

from dataclasses import dataclass

import httptools
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lmgw._fast import chunked_py as twin
from lmgw.transport import h1client
from lmgw.transport.h1client import ResponseReader, UpstreamProtocolError

try:
    from lmgw._fast import chunked as fast
except ImportError:  # not built: the twin is still checked against httptools
    fast = None

IMPLS = [pytest.param(twin, id="python")] + ([pytest.param(fast, id="cython")] if fast else [])
needs_fast = pytest.mark.skipif(fast is None, reason="extension not built (make build)")
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, start = [], 0
    for p in points:
        out.append(data[start:p])
        start = p
    out.append(data[start:])
    return out


@dataclass
class Body:
    pieces: list[bytes]
    exts: list[bytes]
    trailers: list[bytes]
    upper: bool
    last_ext: bytes

    def payload(self) -> bytes:
        return b"".join(self.pieces)

    def wire(self) -> bytes:
        out = []
        for piece, ext in zip(self.pieces, self.exts, strict=True):
            size = b"%X" % len(piece) if self.upper else b"%x" % len(piece)
            out.append(size + ext + b"\r\n" + piece + b"\r\n")
        out.append(b"0" + self.last_ext + b"\r\n")
        out += [t + b"\r\n" for t in self.trailers]
        out.append(b"\r\n")
        return b"".join(out)


EXT = st.sampled_from([b"", b";a=1", b';name="q v"', b";x;y=z"])
TRAILER = st.sampled_from([b"X-Checksum: abc", b"Server-Timing: total;dur=1", b"x:"])
# SSE-looking payloads as well as arbitrary bytes (CR, LF and hex digits included)
PIECE = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.builds(lambda s: b"data: " + s.encode() + b"\n\n", st.text(max_size=80)),
)


@st.composite
def bodies(draw: st.DrawFn) -> Body:
    pieces = draw(st.lists(PIECE, max_size=12))
    return Body(
        pieces=pieces,
        exts=[draw(EXT) for _ in pieces],
        trailers=draw(st.lists(TRAILER, max_size=3)),
        upper=draw(st.booleans()),
        last_ext=draw(EXT),
    )


def decode(impl, chunks: list[bytes]):
    dec = impl.ChunkedDecoder()
    outs = []
    for chunk in chunks:
        try:
            outs.append(dec.feed(chunk))
        except impl.ChunkedError as exc:
            outs.append(("error", str(exc)))
            break
    return outs, dec.done, dec.extra, dec.chunks


def httptools_payload(wire: bytes) -> bytes:
    class Sink:
        def __init__(self) -> None:
            self.body: list[bytes] = []
            self.done = False

        def on_body(self, b: bytes) -> None:
            self.body.append(b)

        def on_message_complete(self) -> None:
            self.done = True

    sink = Sink()
    p = httptools.HttpResponseParser(sink)
    p.feed_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + wire)
    assert sink.done
    return b"".join(sink.body)


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(body=bodies(), cuts=st.lists(st.integers(min_value=0), max_size=20))
@example(body=Body([b"0\r\n"], [b""], [], False, b""), cuts=[1, 2, 3, 4, 5, 6])
def test_valid_bodies_decode_to_their_payload(impl, body: Body, cuts: list[int]) -> None:
    wire = body.wire()
    for chunks in ([wire], split_at(wire, cuts), [wire[i : i + 1] for i in range(len(wire))]):
        outs, done, extra, count = decode(impl, chunks)
        assert b"".join(outs) == body.payload()
        assert done and not extra and count == len(body.pieces)
    assert httptools_payload(wire) == body.payload()


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(body=bodies(), junk=st.binary(min_size=1, max_size=50), cut=st.integers(min_value=0))
def test_bytes_after_the_end_are_flagged_not_decoded(
    impl, body: Body, junk: bytes, cut: int
) -> None:
    wire = body.wire()
    for chunks in (
        [wire + junk],
        [wire, junk],
        split_at(wire + junk, [len(wire) + cut % len(junk)]),
    ):
        outs, done, extra, _ = decode(impl, chunks)
        assert b"".join(outs) == body.payload() and done and extra


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(body=bodies(), cut=st.integers(min_value=0))
def test_a_truncated_body_is_not_done(impl, body: Body, cut: int) -> None:
    wire = body.wire()
    outs, done, _, _ = decode(impl, [wire[: cut % len(wire)]])
    assert not done and body.payload().startswith(b"".join(outs))


def mutated(wire: bytes, edits: list[tuple[int, int]]) -> bytes:
    data = bytearray(wire)
    for pos, byte in edits:
        if data:
            data[pos % len(data)] = byte
    return bytes(data)


@needs_fast
@SETTINGS
@given(
    data=st.one_of(
        st.binary(max_size=400),
        st.builds(
            mutated,
            bodies().map(Body.wire),
            st.lists(st.tuples(st.integers(0), st.sampled_from(b"\r\n;:0aFgG \t\x00")), max_size=4),
        ),
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
@example(data=b"f" * 16 + b"\r\n", cuts=[])  # size overflow
@example(data=b"1\nx\r\n0\r\n\r\n", cuts=[])  # bare LF
@example(data=b"1;" + b"e" * 5000 + b"\r\nx\r\n", cuts=[])  # size line too long
@example(data=b"0\r\n" + b"t" * 20000 + b"\r\n\r\n", cuts=[3])  # trailers too long
def test_twins_agree_on_any_bytes(data: bytes, cuts: list[int]) -> None:
    for chunks in ([data], split_at(data, cuts)):
        assert decode(fast, chunks) == decode(twin, chunks)


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(data=st.binary(max_size=300) | st.text("\n\r a", max_size=60).map(str.encode))
@example(data=b"\n\n\n")
@example(data=b"\n\n\n\n\n")
def test_count_events_is_bytes_count(impl, data: bytes) -> None:
    assert impl.count_events(data) == data.count(b"\n\n")


# -- the reader: decoder and httptools alone give the same answers ---------------------------


@st.composite
def chunked_responses(draw: st.DrawFn) -> tuple[bytes, bytes]:
    body = draw(bodies())
    status = draw(st.sampled_from([200, 400, 500]))
    te = draw(st.sampled_from([b"chunked", b"Chunked", b"gzip, chunked"]))
    conn = draw(st.sampled_from([b"", b"Connection: close\r\n", b"Connection: keep-alive\r\n"]))
    interim = draw(st.sampled_from([b"", b"HTTP/1.1 100 Continue\r\n\r\n"]))
    head = b"HTTP/1.1 %d X\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: %s\r\n%s\r\n"
    return interim + head % (status, te, conn) + body.wire(), body.payload()


HEAD_FIELDS = {b"content-type", b"transfer-encoding", b"connection"}


def read(chunks: list[bytes], *, fast_path: bool, reuse: bytes | None = None) -> tuple:
    saved = h1client._FAST_CHUNKED
    h1client._FAST_CHUNKED = fast_path
    try:
        r = ResponseReader()
        got = []
        try:
            for chunk in chunks:
                r.feed(chunk)
                got.append(r.take_body())
        except UpstreamProtocolError as exc:
            return ("error", str(exc))
        # httptools appends trailer fields to the header list after the body (callers have
        # read the head long before); the decoder skips them: compare the head's fields
        head = [(k, v) for k, v in r.headers if k in HEAD_FIELDS]
        answer = (r.status, head, b"".join(got), r.complete, r.keep_alive)
        if reuse is not None and r.complete and r.keep_alive:
            r.reset()
            r.feed(reuse)
            answer += (r.status, r.take_body(), r.complete)
        return answer
    finally:
        h1client._FAST_CHUNKED = saved


@needs_fast
@SETTINGS
@given(
    resp=chunked_responses(),
    junk=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n", b"xyz"]),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_reader_answers_as_httptools_alone(
    resp: tuple[bytes, bytes], junk: bytes, cuts: list[int]
) -> None:
    wire, payload = resp
    data = wire + junk
    ref = read([data], fast_path=False)
    assert ref[2] == payload
    for chunks in ([data], split_at(data, cuts), [data[i : i + 1] for i in range(len(data))]):
        assert read(chunks, fast_path=True) == ref


@needs_fast
@SETTINGS
@given(
    first=chunked_responses(), second=chunked_responses(), cuts=st.lists(st.integers(0), max_size=6)
)
def test_reader_is_reusable_after_a_decoded_body(
    first: tuple[bytes, bytes], second: tuple[bytes, bytes], cuts: list[int]
) -> None:
    """After a body the decoder read, httptools had stopped mid-message: reset gives a fresh
    parser, so the next response on the connection parses whole."""
    chunks = split_at(first[0], cuts)
    got = read(chunks, fast_path=True, reuse=second[0])
    assert got == read(chunks, fast_path=False, reuse=second[0])
    if len(got) > 5:
        assert got[5:] == (got[5], second[1], True)


@needs_fast
@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nab\r\n0\r\n\r\n",
        b"2\r\nabX\r\n0\r\n\r\n",
        b"2\nab\r\n0\r\n\r\n",
        b"1" * 20 + b"\r\n",
        b"2 \r\nab\r\n0\r\n\r\n",
    ],
)
def test_bad_framing_is_an_upstream_protocol_error_both_ways(body: bytes) -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    for fast_path in (True, False):
        got = read([data], fast_path=fast_path)
        assert got[0] == "error" and "invalid response from worker" in got[1]
