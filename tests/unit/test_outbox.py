"""The sans-IO outbox behind the ``batch`` capability (``lmgw.protocol.outbox``).

Properties (hypothesis): whatever is queued, draining the outbox with peek/commit gives every
message exactly once and in order; a ZeroMQ message holds at most ``max_batch`` messages and
at most ``max_batch_bytes`` of them unless it is one message alone; a message with payload
frames always travels alone, with its frames, in its place; without ``batching`` every
message is its own ZeroMQ message; the byte count always matches what is queued.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.protocol import (
    Abort,
    Batch,
    Delta,
    Finish,
    Generate,
    PrefillDone,
    TensorRef,
    decode_frames,
    encode_frames,
)
from lmgw.protocol.outbox import Outbox

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def queued(draw: st.DrawFn) -> list[tuple[object, list[bytes]]]:
    """Messages as a worker and a gateway queue them: small deltas, long texts, payloads."""
    out: list[tuple[object, list[bytes]]] = []
    for i in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(["delta", "delta", "finish", "abort", "big", "payload"]))
        rid = f"r{draw(st.integers(0, 5))}"
        if kind == "delta":
            out.append((Delta(rid, i, draw(st.text(max_size=12)), [i]), []))
        elif kind == "finish":
            out.append((Finish(rid, i, "stop"), []))
        elif kind == "abort":
            out.append((Abort(rid, "gone"), []))
        elif kind == "big":
            out.append((Delta(rid, i, "x" * draw(st.integers(100, 3000))), []))
        else:
            frame = bytes(draw(st.integers(1, 64)))
            out.append((PrefillDone(rid, tensors=[TensorRef(0, b"h")]), [frame]))
    return out


def drain(box: Outbox, envelope: int) -> list[list]:
    sent = []
    while box:
        frames = box.peek()
        assert box.peek() is frames  # stable until committed (a retry resends the same)
        metas = box.metas()
        assert box.commit() == len(metas) >= 1
        sent.append(frames)
    assert box.nbytes == 0 and box.commit() == 0
    return sent


@SETTINGS
@given(
    queued(),
    st.integers(1, 12),
    st.integers(1, 4000),
    st.booleans(),
    st.sampled_from([(), (b"peer",)]),
)
def test_drained_in_order_within_bounds(
    msgs: list, max_batch: int, max_bytes: int, batching: bool, envelope: tuple
) -> None:
    box = Outbox(
        batching=batching, envelope=envelope, max_batch=max_batch, max_batch_bytes=max_bytes
    )
    for i, (msg, payload) in enumerate(msgs):
        box.add(msg, payload, meta=i)
    assert len(box) == len(msgs) and box.nbytes > 0
    got: list[tuple[object, list[bytes]]] = []
    for frames in drain(box, len(envelope)):
        incoming = decode_frames(frames, envelope=len(envelope))
        assert [bytes(f) for f in incoming.envelope] == list(envelope)
        if type(incoming.msg) is Batch:
            assert batching
            items = incoming.msg.messages
            assert 2 <= len(items) <= max_batch
            head = 4 + 2 + (1 if len(items) < 16 else 3)  # MAGIC+version, [27, [len...
            assert len(frames[-1]) - head <= max_bytes  # the spliced items fit the byte bound
            assert incoming.payload == []
            got.extend((m, []) for m in items)
        else:
            got.append((incoming.msg, [bytes(f) for f in incoming.payload]))
    assert got == msgs


def test_messages_with_frames_travel_alone_in_their_place() -> None:
    box = Outbox()
    done = PrefillDone("p", tensors=[TensorRef(0, b"h")])
    box.add(Delta("a", 0, "x"), meta="a0")
    box.add(Finish("a", 1, "stop"), meta="a1")
    box.add(done, [b"tensor"], meta="p")
    box.add(Abort("b"), meta="b")
    assert box.metas() == ["a0", "a1"]
    first = box.peek()
    assert decode_frames(first).msg == Batch([Delta("a", 0, "x"), Finish("a", 1, "stop")])
    box.commit()
    assert box.metas() == ["p"] and box.peek() == [*encode_frames(done), b"tensor"]
    box.commit()
    assert decode_frames(box.peek()).msg == Abort("b")  # a lone message is not a batch
    assert box.clear() == ["b"] and not box


def test_a_message_larger_than_the_byte_bound_still_goes_alone() -> None:
    box = Outbox(max_batch_bytes=100)
    box.add(Delta("a", 0, "y" * 10))
    box.add(Delta("a", 1, "z" * 1000))
    box.add(Delta("a", 2, "w"))
    sizes = [type(decode_frames(f).msg).__name__ for f in drain(box, 0)]
    assert sizes == ["Delta", "Delta", "Delta"]  # 10 + 1000 > 100: no batch at all here


def test_clear_returns_the_metas_and_a_peeked_message_is_forgotten() -> None:
    box = Outbox()
    box.add(Generate("g", "m", prompt="p"), meta="route-g")
    box.add(Abort("x"), meta="abort")
    box.peek()
    assert box.clear() == ["route-g", "abort"]
    assert box.commit() == 0  # what was peeked is gone: committing it drops nothing new
    box.add(Abort("y"))
    assert decode_frames(box.peek()).msg == Abort("y")


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        Outbox(max_batch=0)
    with pytest.raises(ValueError):
        Outbox(max_batch=1 << 20)
