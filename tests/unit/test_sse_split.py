"""The SSE relay cuts at event boundaries: never half an event, never a lost byte."""

import itertools

from hypothesis import given
from hypothesis import strategies as st

from lmgw.transport.sse import split_complete

events = st.lists(
    st.builds(
        lambda body, crlf: b"data: " + body + (b"\r\n\r\n" if crlf else b"\n\n"),
        st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b),
        st.booleans(),
    ),
    max_size=8,
)


def relay(chunks: list[bytes]) -> list[bytes]:
    """What the relay writes for a sequence of reads (the loop in openai_http.relay_sse)."""
    out, pending = [], b""
    for chunk in chunks:
        data = pending + chunk
        cut = split_complete(data)
        if cut:
            out.append(data[:cut])
        pending = data[cut:]
    if pending:
        out.append(pending)
    return out


def test_examples() -> None:
    assert split_complete(b"") == 0
    assert split_complete(b"data: a") == 0
    assert split_complete(b"data: a\n\n") == 9
    assert split_complete(b"data: a\n\ndata: b") == 9
    assert split_complete(b"data: a\r\n\r\ndata: b\r\n\r\n") == 22
    assert split_complete(b"data: a\n\ndata: b\r\n\r\nxx") == 20


@given(events, st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_any_split_reassembles_and_writes_whole_events(evs: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(evs)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    writes = relay(chunks)
    assert b"".join(writes) == stream
    for w in writes:  # every write ends on an event boundary
        assert w.endswith(b"\n\n") or w.endswith(b"\r\n\r\n")
