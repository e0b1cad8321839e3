"""The compiled lane's per-stream state (lmgw._fast.ssestream and its pure-Python twin): whatever
the worker's chunk sizes and however its bytes are split across reads, the client gets exactly
the events, whole, one chunk per read, and the stream's end once; both twins give the same
bytes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw._fast import ssestream_py
from lmgw.pipeline.migration import Journal, progress_of
from lmgw.transport.chunked import ChunkedDecoder, ChunkedError
from lmgw.transport.sse import split_complete

try:
    from lmgw._fast import ssestream as ssestream_c
except ImportError:  # pragma: no cover - the extension is built by `make build`
    ssestream_c = None

IMPLS = [ssestream_py] + ([ssestream_c] if ssestream_c is not None else [])
needs_c = pytest.mark.skipif(ssestream_c is None, reason="the extension is not built")

_event = st.builds(
    lambda text, crlf: b"data: " + text + (b"\r\n\r\n" if crlf else b"\n\n"),
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ")),
    st.booleans(),
)


def chunked(payload: bytes, sizes: list[int]) -> bytes:
    """``payload`` in chunks of ``sizes`` (cycled), then the last chunk."""
    out, i, k = [], 0, 0
    while i < len(payload):
        n = max(1, sizes[k % len(sizes)]) if sizes else len(payload)
        out.append(b"%x\r\n%b\r\n" % (len(payload[i : i + n]), payload[i : i + n]))
        i += n
        k += 1
    return b"".join(out) + b"0\r\n\r\n"


def reads(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def client_payload(out: bytes) -> tuple[bytes, list[bytes], bool]:
    """What the client got: the payload, each chunk's payload, and whether it ended."""
    dec = ChunkedDecoder()
    parts = []
    rest = out
    while rest and not dec.done:  # chunk by chunk, to see each chunk's payload
        head, _, rest = rest.partition(b"\r\n")
        n = int(head, 16)
        if n == 0:
            dec.feed(head + b"\r\n" + rest)
            break
        parts.append(rest[:n])
        rest = rest[n + 2 :]
    return b"".join(parts), parts, dec.done


@settings(max_examples=300, deadline=None)
@given(st.lists(_event, max_size=12), st.lists(st.integers(1, 40), max_size=5),
       st.lists(st.integers(0, 10_000), max_size=8))  # fmt: skip
def test_any_framing_and_reads_give_the_same_events(
    events: list[bytes], sizes: list[int], cuts: list[int]
) -> None:
    payload = b"".join(events)
    outs = []
    for impl in IMPLS:
        journal: list[bytes] = []
        s = impl.SseStream(journal=journal)
        out = []
        for data in reads(chunked(payload, sizes), cuts):
            got = s.feed(data)
            if not s.done:  # before the end: whole events only, one chunk per read at most
                body, parts, ended = client_payload(got)
                assert not ended and len(parts) <= 1
                assert all(p.endswith(b"\n\n") or p.endswith(b"\n\r\n") for p in parts)
            out.append(got)
        assert s.done
        body, _, ended = client_payload(b"".join(out))
        assert ended and body == payload
        assert s.events == payload.count(b"\n\n")
        assert b"".join(journal) == payload
        assert s.started == bool(payload)
        outs.append(out)
    assert all(o == outs[0] for o in outs)  # the twins: the same bytes, read by read


@pytest.fixture(params=IMPLS, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def stream_cls(request: pytest.FixtureRequest) -> type:
    return request.param.SseStream


@needs_c
@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40).map(lambda b: b.replace(b"x", b"\n").replace(b"y", b"\r")))
def test_the_event_cut_matches_split_complete(data: bytes) -> None:
    """The compiled cut (through feed: one chunk of ``data``) ends where split_complete does."""
    s = ssestream_c.SseStream()
    out = s.feed(b"%x\r\n%b\r\n" % (len(data), data)) if data else b""
    cut = split_complete(data)
    body, _, _ = client_payload(out) if out else (b"", [], False)
    assert body == data[:cut] and s.pending == data[cut:]


def test_a_torn_last_event_goes_out_at_the_end(stream_cls: type) -> None:
    s = stream_cls()
    out = s.feed(b"5\r\ndata:\r\n")
    assert out == b""
    out = s.feed(b"3\r\n 1\n\r\n0\r\n\r\n")
    assert out == b"8\r\ndata: 1\n\r\n0\r\n\r\n" and s.done


def test_bad_framing_raises(stream_cls: type) -> None:
    with pytest.raises(ChunkedError):
        stream_cls().feed(b"zz\r\n")


def test_a_long_stream_folds_its_journal(stream_cls: type) -> None:
    class Small(Journal):
        fold_bytes = 256

    journal = Small("completions")
    s = stream_cls(journal=journal)
    event = b'data: {"choices":[{"index":0,"text":"ab"}]}\n\n'
    for _ in range(40):
        s.feed(b"%x\r\n%b\r\n" % (len(event), event))
    assert journal.folded is not None  # folded as it grew: only a torn rest is held
    assert len(b"".join(journal)) < 256 + len(event)
    assert progress_of(journal, "completions").text == "ab" * 40


def test_a_tap_sees_and_may_rewrite_each_group(stream_cls: type) -> None:
    seen: list[bytes] = []

    def tap(data: bytes) -> bytes:
        seen.append(data)
        return data.upper()

    s = stream_cls(tap=tap)
    out = s.feed(b"9\r\ndata: x\n\n\r\n0\r\n\r\n")
    assert seen == [b"data: x\n\n"]
    assert out == b"9\r\nDATA: X\n\n\r\n0\r\n\r\n"
