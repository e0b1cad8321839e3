"""lmgw.streams' event bookkeeping (sans-IO) against a plain model, under any cutting of the
pipeline's writes and any byte budget.

A model of the answer: the list of SSE blocks as written (data events and comments). Checked:
the blocks a reader gets from the start are exactly the written blocks, data events stamped
``id: n`` in order; a reader resuming after event ``k`` gets exactly the blocks after it (the
comments that came after ``k`` included); past the byte budget the oldest blocks go, never the
newest, and a reader asking for what went is told so (None), never handed a gap.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.streams import StreamEntry

SETTINGS = settings(max_examples=300, deadline=None)

payloads = st.text(alphabet='abc{}:" 0123', min_size=1, max_size=12).map(str.encode)
blocks = st.lists(
    st.one_of(
        payloads.map(lambda p: b"data: " + p + b"\n\n"),
        st.just(b": keep-alive\n\n"),
    ),
    max_size=25,
)


def stamped(written: list[bytes]) -> list[bytes]:
    out, n = [], 0
    for b in written:
        if b.startswith(b"data:"):
            out.append(b"id: %d\n" % n + b)
            n += 1
        else:
            out.append(b)
    return out


def feed(entry: StreamEntry, data: bytes, cuts: list[int], budget: int) -> None:
    last = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        entry.add(data[last:cut], budget)
        last = cut


@SETTINGS
@given(written=blocks, cuts=st.lists(st.integers(0, 2000), max_size=10))
def test_readers_get_the_blocks_as_written_with_ids(written: list[bytes], cuts: list[int]) -> None:
    e = StreamEntry("t", None)
    feed(e, b"".join(written), cuts, 1 << 30)
    want = stamped(written)
    assert e.blocks(e.position_after(-1)) == b"".join(want)
    n_data = sum(b.startswith(b"data:") for b in written)
    for k in range(n_data):
        # after event k: everything written after the k-th data block
        idx = [i for i, b in enumerate(written) if b.startswith(b"data:")][k]
        assert e.blocks(e.position_after(k)) == b"".join(want[idx + 1 :])
    assert e.blocks(e.next_pos) == b"" and e.next_seq == n_data


@SETTINGS
@given(
    written=blocks,
    cuts=st.lists(st.integers(0, 2000), max_size=10),
    budget=st.integers(1, 400),
)
def test_past_the_budget_the_oldest_go_and_readers_hear_of_gaps(
    written: list[bytes], cuts: list[int], budget: int
) -> None:
    e = StreamEntry("t", None)
    feed(e, b"".join(written), cuts, budget)
    want = stamped(written)
    held = e.blocks(e.first_pos)
    assert held is not None
    # what is held is a suffix of what was written: the newest blocks, whole
    kept = len(e.events)
    assert held == b"".join(want[len(want) - kept :])
    assert kept == len(want) or e.bytes <= budget or kept == 1
    # a position before what is held is a gap, reported, never skipped over
    if e.first_pos > 0:
        assert e.blocks(e.first_pos - 1) is None
        assert e.position_after(-1) is None or e.first_seq == 0
    for k in range(-1, e.next_seq):
        pos = e.position_after(k)
        if pos is None:
            assert k + 1 < e.first_seq  # events after k are no longer all held
        else:
            assert e.blocks(pos) is not None
