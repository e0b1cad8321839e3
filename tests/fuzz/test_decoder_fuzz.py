"""Raw-byte fuzzing of the decoders that read bytes from the other side of a link: the SSE
readers (the relay's event cutter, the SDK's stream decoder, the stream-migration journal
parser), the native ZeroMQ message decoder and the tensor-frame decoder (the Cython build and
its pure-Python twin). The only allowed outcomes are a result or the decoder's own error type;
never another exception. ``LMGW_FUZZ_EXAMPLES`` scales every target (``make fuzz``)."""

from __future__ import annotations

import itertools

import msgspec
from fuzz_support import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmgw._fast import tensorframe_py
from lmgw.api.limits import json_depth
from lmgw.pipeline import migration
from lmgw.protocol.messages import (
    FRAMING_VERSION,
    MAGIC,
    FailureCode,
    ProtocolError,
    decode_frames,
)
from lmgw.sdk.types import SSEDecoder
from lmgw.transport import tensors
from lmgw.transport.sse import split_complete

SETTINGS = settings(
    max_examples=examples(150),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def cuts_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# -- SSE ----------------------------------------------------------------------------------------

sse_like = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from(
            [b"data: ", b"\n\n", b"\r\n\r\n", b"\n", b"data: [DONE]\n\n", b": comment\n",
             b"event: x\n", b'data: {"choices": []}\n\n', b'data: {"error": {"code": 500}}\n\n',
             b'data: {"choices": [{"index": 0, "delta": {"content": "\xff"}}]}\n\n',
             b'data: {"choices": [{"index": "x"}]}\n\n', b"data: " + b"[" * 2000 + b"\n\n"]
        ),
    ),
    max_size=12,
).map(b"".join)  # fmt: skip


@SETTINGS
@given(sse_like)
def test_split_complete_cuts_after_the_last_boundary(data: bytes) -> None:
    cut = split_complete(data)
    assert 0 <= cut <= len(data)
    if cut:
        assert data[:cut].endswith((b"\n\n", b"\n\r\n"))
    rest = data[cut:]
    assert b"\n\n" not in rest and b"\n\r\n" not in rest


@SETTINGS
@given(sse_like, st.lists(st.integers(0, 2000), max_size=8))
def test_sdk_stream_decoder_never_raises(data: bytes, cuts: list[int]) -> None:
    decoder = SSEDecoder()
    for chunk in cuts_of(data, cuts):
        for event in decoder.feed(chunk):
            assert event is not None
    decoder.feed_eof()
    if decoder.error is not None:
        assert 400 <= decoder.error.status <= 599


@SETTINGS
@given(
    sse_like, st.lists(st.integers(0, 2000), max_size=6), st.sampled_from(["chat", "completions"])
)
def test_migration_journal_parser_never_raises(data: bytes, cuts: list[int], endpoint: str) -> None:
    progress = migration.progress_of(cuts_of(data, cuts), endpoint)
    assert progress.tokens >= 0


# -- the native protocol -------------------------------------------------------------------------

msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=15,
)


def expect_message_or_protocol_error(frames: list, envelope: int = 0) -> None:
    try:
        decode_frames(frames, envelope)
    except ProtocolError as exc:
        assert isinstance(exc.code, FailureCode)


@SETTINGS
@given(st.lists(st.binary(max_size=96), max_size=4), st.integers(0, 2))
def test_zmq_decoder_on_arbitrary_frames(frames: list[bytes], envelope: int) -> None:
    expect_message_or_protocol_error(frames, envelope)


@SETTINGS
@given(
    st.integers(0, 60),
    st.lists(msgpack_values, max_size=12),
    st.lists(st.binary(max_size=16), max_size=3),
)
def test_zmq_decoder_on_well_framed_wrong_shapes(
    tag: int, items: list, payload: list[bytes]
) -> None:
    header = MAGIC + bytes([FRAMING_VERSION]) + msgspec.msgpack.encode([tag, *items])
    expect_message_or_protocol_error([header, *payload])
    expect_message_or_protocol_error([b"env", b"", header, *payload], envelope=2)


@SETTINGS
@given(
    st.lists(st.tuples(st.integers(0, 60), st.lists(msgpack_values, max_size=8)), max_size=6),
    st.lists(msgpack_values, max_size=3),
    st.lists(st.binary(max_size=16), max_size=2),
)
def test_zmq_decoder_on_batches_of_wrong_shapes(
    items: list[tuple[int, list]], extra: list, payload: list[bytes]
) -> None:
    """A Batch (tag 27) of arbitrary tagged items, with arbitrary trailing fields and frames."""
    body = msgspec.msgpack.encode([27, [[tag, *fields] for tag, fields in items], *extra])
    header = MAGIC + bytes([FRAMING_VERSION]) + body
    expect_message_or_protocol_error([header, *payload])
    expect_message_or_protocol_error([b"env", header, *payload], envelope=1)


# -- tensor frames -------------------------------------------------------------------------------

IMPLS = [tensorframe_py.decode, tensors.decode]
CODES = list(tensorframe_py._CODE_TO_DTYPE)


@st.composite
def frame_headers(draw: st.DrawFn) -> bytes:
    """Headers that get past the magic often: a real prefix, then mutated fields."""
    ndim = draw(st.integers(0, 40))
    head = bytearray(tensorframe_py.MAGIC)
    head += bytes([draw(st.sampled_from([tensorframe_py.VERSION, 0, 255]))])
    head += draw(st.binary(min_size=3, max_size=3) | st.sampled_from(sorted(CODES)))
    head += bytes([ndim]) + draw(st.sampled_from([bytes(7), b"\x01" + bytes(6)]))
    head += draw(st.integers(-(2**63), 2**63 - 1)).to_bytes(8, "little", signed=True)
    for _ in range(ndim):
        head += draw(st.integers(-(2**63), 2**63 - 1)).to_bytes(8, "little", signed=True)
        head += draw(st.integers(-(2**63), 2**63 - 1)).to_bytes(8, "little", signed=True)
    cut = draw(st.integers(0, len(head)))
    return bytes(head[: cut if draw(st.booleans()) else len(head)])


@SETTINGS
@given(frame_headers() | st.binary(max_size=200), st.integers(0, 4096))
def test_tensor_frame_decoders_raise_only_their_error(header: bytes, size: int) -> None:
    buffer = bytes(size)
    outcomes = []
    for decode in IMPLS:
        try:
            array = decode(header, buffer)
        except tensorframe_py.TensorFrameError:
            outcomes.append("error")
        else:
            assert array.nbytes <= len(buffer) or array.size == 0
            outcomes.append((array.dtype.str, array.shape))
    assert outcomes[0] == outcomes[1]  # the Cython build and its twin agree


# -- the JSON depth bound (limits.max_json_depth) -------------------------------------------------

tricky = st.text(alphabet='[]{}"\\ab', max_size=6)
json_trees = st.recursive(
    st.one_of(st.none(), st.integers(), tricky),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky, inner, max_size=3),
    max_leaves=30,
)


def depth_of(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


@SETTINGS
@given(json_trees, st.integers(0, 20))
def test_json_depth_matches_the_decoded_value(value: object, wrap: int) -> None:
    """Strings full of brackets, quotes and backslashes do not fool it; a padding of nested
    arrays around it (the numpy path for long ones) adds exactly its depth."""
    body = msgspec.json.encode(value)
    assert json_depth(body) == depth_of(value)
    wrapped = b"[" * wrap + body + b"]" * wrap
    assert json_depth(wrapped) == depth_of(value) + wrap
    big = b"[" * 40000 + body + b"]" * 40000
    assert json_depth(big) == depth_of(value) + 40000
