"""The compiled lane's per-stream state (lmgw.transport.sse_stream): whatever the worker's
chunk sizes and however its bytes are split across reads, the client gets exactly the events,
whole, one chunk per read, and the stream's end once."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.pipeline.migration import Journal, progress_of
from lmgw.transport.chunked import ChunkedDecoder, ChunkedError
from lmgw.transport.sse_stream import SseStream

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
    journal: list[bytes] = []
    s = SseStream(journal=journal)
    out = b""
    for data in reads(chunked(payload, sizes), cuts):
        got = s.feed(data)
        if not s.done:  # before the end: whole events only, one chunk per read at most
            body, parts, ended = client_payload(got)
            assert not ended and len(parts) <= 1
            assert all(p.endswith(b"\n\n") or p.endswith(b"\n\r\n") for p in parts)
        out += got
    assert s.done
    body, _, ended = client_payload(out)
    assert ended and body == payload
    assert s.events == payload.count(b"\n\n")
    assert b"".join(journal) == payload
    assert s.started == bool(payload)


def test_a_torn_last_event_goes_out_at_the_end() -> None:
    s = SseStream()
    out = s.feed(b"5\r\ndata:\r\n")
    assert out == b""
    out = s.feed(b"3\r\n 1\n\r\n0\r\n\r\n")
    assert out == b"8\r\ndata: 1\n\r\n0\r\n\r\n" and s.done


def test_bad_framing_raises() -> None:
    with pytest.raises(ChunkedError):
        SseStream().feed(b"zz\r\n")


def test_a_long_stream_folds_its_journal() -> None:
    class Small(Journal):
        fold_bytes = 256

    journal = Small("completions")
    s = SseStream(journal=journal)
    event = b'data: {"choices":[{"index":0,"text":"ab"}]}\n\n'
    for _ in range(40):
        s.feed(b"%x\r\n%b\r\n" % (len(event), event))
    assert journal.folded is not None  # folded as it grew: only a torn rest is held
    assert len(b"".join(journal)) < 256 + len(event)
    assert progress_of(journal, "completions").text == "ab" * 40


def test_a_tap_sees_and_may_rewrite_each_group() -> None:
    seen: list[bytes] = []

    def tap(data: bytes) -> bytes:
        seen.append(data)
        return data.upper()

    s = SseStream(tap=tap)
    out = s.feed(b"9\r\ndata: x\n\n\r\n0\r\n\r\n")
    assert seen == [b"data: x\n\n"]
    assert out == b"9\r\nDATA: X\n\n\r\n0\r\n\r\n"
