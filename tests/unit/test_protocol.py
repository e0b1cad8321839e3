"""The native protocol codec: every message round-trips; anything malformed is a ProtocolError.

Properties (hypothesis):

* any message of any type, with any envelope and payload frames, decodes to an equal message
  with the same envelope and payload;
* arbitrary frames, arbitrary bytes after a valid prefix, and every truncation / bit flip of a
  valid header give a message or ProtocolError, never another exception;
* registration picks the highest common version and the common capabilities, or refuses with
  UNSUPPORTED_VERSION;
* fields added later (``RegisterAck.control_endpoint``, ``tensors`` on PrefillDone/EncodeDone,
  ``TensorRef.shm``, ``Announce``) decode from what older peers send, and shared-memory
  handles are the transport's own wire shape;
* batches (capability ``batch``): any list of frame-less session messages spliced by
  ``batch_header`` is byte for byte msgspec's ``Batch`` and decodes to the same messages in
  order; malformed batches (empty, nested, too long, with payload frames, a dangling tensor
  reference, an Announce, garbage items, truncations) are ProtocolError.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmgw.protocol import (
    CAPABILITIES,
    FRAMING_VERSION,
    MAGIC,
    MAX_BATCH,
    PROTOCOL_VERSION,
    TO_GATEWAY,
    TO_REGISTRY,
    TO_WORKER,
    Abort,
    Announce,
    Batch,
    Delta,
    Drain,
    Encode,
    EncodeDone,
    Exit,
    Failure,
    FailureCode,
    Finish,
    Generate,
    Heartbeat,
    HeartbeatAck,
    MediaItem,
    Metrics,
    MetricsRequest,
    Prefill,
    PrefillDone,
    ProtocolError,
    Register,
    RegisterAck,
    SamplingParams,
    ShmHandle,
    TensorRef,
    Token,
    Usage,
    batch_header,
    decode_frames,
    decode_header,
    encode_frames,
    encode_header,
    encode_message,
    negotiate,
    request_id_of,
)
from lmgw.worker import decode_announce, encode_announce

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies -------------------------------------------------------------------------------

ids = st.text(min_size=1, max_size=40)
names = st.text(max_size=20)
counts = st.integers(0, 2**31)
floats = st.floats(allow_nan=False)
small_ints = st.lists(st.integers(-(2**63), 2**63 - 1), max_size=8)
json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | floats | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
kv_params = st.none() | st.dictionaries(st.text(max_size=8), json_like, max_size=4)
usage = st.builds(Usage, counts, counts, counts)
params = st.builds(
    SamplingParams,
    max_tokens=st.none() | counts,
    temperature=st.none() | floats,
    top_p=st.none() | floats,
    top_k=st.none() | st.integers(-1, 1000),
    seed=st.none() | st.integers(-(2**63), 2**63 - 1),
    stop=st.lists(st.text(max_size=5), max_size=3),
    stop_token_ids=small_ints,
    ignore_eos=st.booleans(),
    logprobs=st.none() | st.integers(0, 20),
    extra=kv_params,
    prompt_logprobs=st.none() | st.integers(0, 20),
)


shm_handles = st.builds(
    ShmHandle, st.text(min_size=1, max_size=30), counts, st.binary(max_size=24), counts
)


@st.composite
def tensors_and_media(draw: st.DrawFn) -> tuple[list[TensorRef], list[MediaItem], int]:
    """Tensor refs pointing into ``n`` payload frames, media pointing into the refs."""
    n = draw(st.integers(0, 3))
    refs = (
        draw(
            st.lists(
                st.builds(
                    TensorRef,
                    st.integers(0, max(n - 1, 0)),
                    st.binary(max_size=16),
                    st.none() | shm_handles,
                ),
                max_size=n,
            )
        )
        if n
        else []
    )
    media = draw(
        st.lists(
            st.builds(
                MediaItem,
                st.sampled_from(["image", "audio", "video"]),
                st.none() | names,
                st.none() | st.text(max_size=30),
                st.none() | st.integers(0, len(refs) - 1) if refs else st.none(),
            ),
            max_size=3,
        )
    )
    return refs, media, n


@st.composite
def messages(draw: st.DrawFn) -> tuple[object, int]:
    """(message, number of payload frames it needs)."""
    refs, media, n = draw(tensors_and_media())
    prompt = draw(
        st.one_of(
            st.tuples(st.text(max_size=30), st.none()),
            st.tuples(st.none(), small_ints),
            st.tuples(st.text(max_size=5), small_ints),
        )
    )
    stage = dict(
        model=draw(names),
        prompt=prompt[0],
        prompt_token_ids=prompt[1],
        params=draw(params),
        media=media,
        kv_transfer_params=draw(kv_params),
        timeout_s=draw(st.none() | floats),
        tensors=refs,
    )
    rid = draw(ids)
    choices = [
        lambda: Register(
            rid, draw(names), 1, draw(st.integers(1, 9)), draw(st.lists(names, max_size=4))
        ),
        lambda: Generate(rid, stream=draw(st.booleans()), **stage),
        lambda: Prefill(rid, **stage),
        lambda: Encode(rid, draw(names), media, draw(st.none() | floats), refs),
        lambda: Abort(rid, draw(names)),
        lambda: Heartbeat(rid),
        lambda: MetricsRequest(rid),
        lambda: RegisterAck(
            rid,
            draw(counts),
            draw(st.lists(names)),
            draw(names),
            draw(names),
            ["prefill"],
            ["m"],
            draw(counts),
            draw(st.none() | st.text(min_size=1, max_size=30)),
        ),
        lambda: delta_msg(rid, draw),
        lambda: Finish(
            rid,
            draw(counts),
            draw(names),
            draw(st.none() | st.text(max_size=5) | st.integers(-5, 5)),
            draw(usage),
            draw(kv_params),
            draw(st.none() | st.lists(st.none() | tokens(), max_size=3)),
        ),
        lambda: PrefillDone(rid, draw(kv_params), draw(usage), draw(small_ints), refs),
        lambda: EncodeDone(rid, draw(st.lists(names, max_size=3)), draw(kv_params), refs),
        lambda: HeartbeatAck(rid, draw(names), draw(counts), draw(counts), draw(st.booleans())),
        lambda: Metrics(rid, draw(st.dictionaries(names, floats, max_size=4))),
        lambda: Failure.of(rid, draw(st.sampled_from(list(FailureCode))), draw(names)),
        lambda: Drain(draw(names), draw(floats)),
        lambda: Exit(draw(names), draw(counts)),
        lambda: Announce(
            draw(names),
            draw(names),
            draw(st.text(min_size=1, max_size=30)),
            draw(st.none() | st.text(min_size=1, max_size=30)),
            draw(st.lists(names, max_size=2)),
            draw(st.lists(names, max_size=2)),
            1,
            draw(st.integers(1, 9)),
            draw(counts),
            draw(floats),
            draw(st.sampled_from(["up", "draining", "leaving"])),
        ),
    ]
    msg = draw(st.sampled_from(choices))()
    needs = n if getattr(msg, "tensors", None) else 0
    return msg, needs


@st.composite
def tokens(draw: st.DrawFn) -> Token:
    """A logprob entry: the token's alone (an older peer's), or with rank and alternatives."""
    tid, value = draw(st.integers(0, 2**31)), draw(floats)
    if draw(st.booleans()):
        return Token(tid, value)
    top = draw(st.lists(st.tuples(st.integers(0, 2**31), floats), max_size=4))
    rank = draw(st.none() | st.integers(1, 10**6))
    return Token(tid, value, rank, [t for t, _ in top], [v for _, v in top])


def delta_msg(rid: str, draw: st.DrawFn) -> Delta:
    logprobs = draw(st.none() | st.lists(tokens(), max_size=3))
    return Delta(rid, draw(counts), draw(st.text(max_size=20)), draw(small_ints), logprobs)


# -- round trips ------------------------------------------------------------------------------


@SETTINGS
@given(
    messages(),
    st.lists(st.binary(max_size=8), max_size=2),
    st.lists(st.binary(max_size=64), max_size=3),
)
def test_round_trip(
    msg_needs: tuple[object, int], envelope: list[bytes], extra: list[bytes]
) -> None:
    msg, needs = msg_needs
    payload = [bytes([i]) * 10 for i in range(needs)] + extra
    frames = encode_frames(msg, payload, envelope)
    assert len(frames) == len(envelope) + 1 + len(payload)
    # as received from zmq with copy=True: bytes; with copy=False: buffers (memoryview here)
    for received in (
        [bytes(f) for f in frames],
        [memoryview(bytes(f)) for f in frames],
    ):
        got = decode_frames(received, envelope=len(envelope))
        assert got.msg == msg
        assert type(got.msg) is type(msg)
        assert [bytes(f) for f in got.envelope] == envelope
        assert [bytes(f) for f in got.payload] == payload


def test_directions_partition_the_message_set() -> None:
    assert not (TO_WORKER & TO_GATEWAY) and not (TO_REGISTRY & (TO_WORKER | TO_GATEWAY))
    assert Generate in TO_WORKER and Abort in TO_WORKER and Register in TO_WORKER
    assert Finish in TO_GATEWAY and Failure in TO_GATEWAY and Exit in TO_GATEWAY
    assert {Announce} == TO_REGISTRY
    assert Batch not in TO_WORKER | TO_GATEWAY | TO_REGISTRY  # either direction, a wrapper


# -- batches ----------------------------------------------------------------------------------


def frameless(msg_needs: tuple[object, int]) -> bool:
    msg, needs = msg_needs
    return needs == 0 and not isinstance(msg, Announce)


BATCH_SETTINGS = settings(SETTINGS, max_examples=40)  # lists of messages: slower examples


@BATCH_SETTINGS
@given(st.lists(messages().filter(frameless), min_size=1, max_size=8))
def test_batch_splice_is_msgspecs_batch_and_round_trips(msgs: list) -> None:
    items = [m for m, _ in msgs]
    header = batch_header([encode_message(m) for m in items])
    got = decode_frames([header])
    if len(items) == 1:  # a lone message travels as itself
        assert header == bytes(encode_frames(items[0])[0])
        assert got.msg == items[0]
        return
    assert header == bytes(encode_header(Batch(items)))
    assert type(got.msg) is Batch and got.msg.messages == items
    assert [type(m) for m in got.msg.messages] == [type(m) for m in items]
    routed = decode_frames([b"peer", header], envelope=1)  # as a ROUTER reads it
    assert routed.envelope == [b"peer"] and routed.msg == got.msg


def test_batch_of_16_and_more_uses_a_longer_length() -> None:
    for n in (15, 16, 17, 300, MAX_BATCH):
        items = [Delta("r", i, "x") for i in range(n)]
        header = batch_header([encode_message(m) for m in items])
        assert header == bytes(encode_header(Batch(items)))
        assert decode_frames([header]).msg.messages == items


_PREFIX = MAGIC + bytes([FRAMING_VERSION])
_HB = msgspec.msgpack.decode(encode_message(Heartbeat("h")))


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ([27, []], "empty"),
        ([27, [[27, [_HB, _HB]], _HB]], "nested"),
        ([27, [_HB] * (MAX_BATCH + 1)], "too long"),
        ([27, _HB], "not a list"),
        ([27, [_HB, [26, "w", "i", "tcp://h:1"]]], "an Announce"),
        ([27, [_HB, [99, "x"]]], "unknown tag"),
        ([27, [_HB, [6, ""]]], "invalid item"),
        ([27, [_HB, "garbage"]], "garbage item"),
        ([27, [_HB, [2, "r", "m", "p", None, [], [], None, None, [[0, b"h"]]]]], "tensor frame"),
        ([27, [_HB, [4, "r", "m", [["image", None, None, 0]]]]], "media tensor"),
    ],
)
def test_malformed_batches_are_protocol_errors(body: list, why: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_frames([_PREFIX + msgspec.msgpack.encode(body)])
    assert info.value.code is FailureCode.PROTOCOL, why


def test_a_batch_carries_no_payload_frames_but_may_point_to_shared_memory() -> None:
    header = batch_header([encode_message(Heartbeat("a")), encode_message(Abort("b"))])
    with pytest.raises(ProtocolError, match="no payload frames"):
        decode_frames([header, b"a frame"])
    shm = TensorRef(0, b"h", ShmHandle("seg", 16, b"h"))
    items = [PrefillDone("p", tensors=[shm]), Finish("g", 0, "stop")]
    assert decode_frames([batch_header([encode_message(m) for m in items])]).msg.messages == items


@BATCH_SETTINGS
@given(st.lists(messages().filter(frameless), min_size=2, max_size=4), st.data())
def test_batch_truncations_and_bit_flips(msgs: list, data: st.DataObject) -> None:
    header = batch_header([encode_message(m) for m, _ in msgs])
    cut = data.draw(st.integers(0, len(header)))
    expect_message_or_protocol_error([header[:cut]])
    pos = data.draw(st.integers(0, len(header) - 1))
    flipped = bytearray(header)
    flipped[pos] ^= 1 << data.draw(st.integers(0, 7))
    expect_message_or_protocol_error([bytes(flipped)])


@BATCH_SETTINGS
@given(st.lists(st.lists(json_like, max_size=8), min_size=1, max_size=6), st.integers(0, 40))
def test_batches_of_wrong_shapes(items: list, tag: int) -> None:
    """Well-formed msgpack of the wrong shape behind every tag, inside a batch."""
    body = msgspec.msgpack.encode([27, [[tag, *item] for item in items]])
    expect_message_or_protocol_error([_PREFIX + body])


def test_request_ids_correlate() -> None:
    assert request_id_of(Abort("r-1")) == "r-1"
    assert request_id_of(Drain("bye")) is None


def test_header_starts_with_magic_and_framing_version() -> None:
    header = bytes(encode_frames(Heartbeat("h"))[0])
    assert header[: len(MAGIC)] == MAGIC
    assert header[len(MAGIC)] == FRAMING_VERSION


def test_failure_codes_and_retryability() -> None:
    f = Failure.of("r", FailureCode.OVERLOADED, "queue full")
    assert (f.failure_code, f.retryable) == (FailureCode.OVERLOADED, True)
    assert not Failure.of("r", FailureCode.BAD_REQUEST).retryable
    # a code from a newer peer is still a readable failure
    newer = decode_header(bytes(encode_frames(Failure("r", "gpu_on_fire"))[0]))
    assert newer.failure_code is FailureCode.ENGINE_ERROR


def test_newer_peer_trailing_fields_are_skipped() -> None:
    """Append-only evolution: an extra trailing field from a newer peer is ignored."""
    body = msgspec.msgpack.encode([21, "hb-1", "inst", 3, 1, False, "a future field"])
    ack = decode_header(MAGIC + bytes([FRAMING_VERSION]) + body)
    assert ack == HeartbeatAck("hb-1", "inst", 3, 1, False)


def test_fields_added_later_decode_from_older_peers() -> None:
    """What a peer built before these fields sends still decodes, to the defaults."""
    prefix = MAGIC + bytes([FRAMING_VERSION])
    old_ack = [16, "reg-1", 1, ["stream"], "w", "inst", ["decode"], ["m"], 64]
    ack = decode_header(prefix + msgspec.msgpack.encode(old_ack))
    assert isinstance(ack, RegisterAck) and ack.control_endpoint is None
    assert decode_header(prefix + msgspec.msgpack.encode([19, "p1"])) == PrefillDone("p1")
    assert decode_header(prefix + msgspec.msgpack.encode([20, "e1", ["h"]])).tensors == []
    params = msgspec.msgpack.decode(msgspec.msgpack.encode(SamplingParams()))
    old_ref = prefix + msgspec.msgpack.encode(
        [2, "r", "m", "p", None, params, [], None, None, [[0, b"h"]]]
    )
    assert decode_frames([old_ref, b"x"]).msg.tensors == [TensorRef(0, b"h", None)]
    # the announcement the worker library sent before Announce joined the union
    body = [26, "p-1", "i1", "tcp://10.0.0.5:7000", None, ["prefill"], ["m"], 1, 1, 256, 2.0]
    _, announce = decode_announce([b"peer", prefix + msgspec.msgpack.encode([*body, "up"])])
    expect = Announce("p-1", "i1", "tcp://10.0.0.5:7000", None, ["prefill"], ["m"], 1, 1, 256)
    assert announce == expect


# -- logprobs: Token, Finish and SamplingParams before and after the top_logprobs capability ----


class OldToken(msgspec.Struct, frozen=True, array_like=True):
    """``Token`` as builds before the ``top_logprobs`` capability define it."""

    token_id: int
    logprob: float


class OldMessage(msgspec.Struct, frozen=True, array_like=True, tag_field="t"):
    pass


class OldDelta(OldMessage, tag=17):
    request_id: str
    seq: int
    text: str = ""
    token_ids: list[int] = []
    logprobs: list[OldToken] | None = None


class OldFinish(OldMessage, tag=18):
    request_id: str
    seq: int
    finish_reason: str
    stop_reason: str | int | None = None
    usage: Usage = Usage()
    kv_transfer_params: dict | None = None


class OldSamplingParams(msgspec.Struct, frozen=True, array_like=True):
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_tokens: int | None = None
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    extra: dict | None = None


OLD_DECODER = msgspec.msgpack.Decoder(OldDelta | OldFinish)
PREFIX = MAGIC + bytes([FRAMING_VERSION])


def test_old_peers_read_new_logprobs_and_skip_the_alternatives() -> None:
    """A gateway built before ``top_logprobs`` decodes a new worker's Delta and Finish: the
    sampled tokens' values, the alternatives and prompt logprobs skipped (appended fields)."""
    new = Token(7, -0.25, 2, [3, 7, 9], [-0.1, -0.25, -3.0])
    delta = Delta("r", 0, "ab", [7, 8], [new, Token(8, -1.5, 1, [8], [-1.5])])
    got = OLD_DECODER.decode(encode_message(delta))
    assert got == OldDelta("r", 0, "ab", [7, 8], [OldToken(7, -0.25), OldToken(8, -1.5)])
    finish = Finish("r", 1, "stop", None, Usage(5, 2, 0), None, [None, new])
    assert OLD_DECODER.decode(encode_message(finish)) == OldFinish("r", 1, "stop", None,
                                                                   Usage(5, 2, 0))  # fmt: skip
    # and a worker built before reads a new gateway's sampling parameters
    params = SamplingParams(max_tokens=3, logprobs=5, extra={"x": 1}, prompt_logprobs=2)
    old = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=OldSamplingParams)
    assert old == OldSamplingParams(max_tokens=3, logprobs=5, extra={"x": 1})


def test_new_peers_read_old_logprobs_as_no_alternatives() -> None:
    """What an older worker sends decodes here with the new fields at their defaults (no
    rank, no alternatives, no prompt logprobs): byte for byte the old entries' shape."""
    old = OldDelta("r", 0, "ab", [7], [OldToken(7, -0.25)])
    got = decode_header(PREFIX + msgspec.msgpack.encode(old))
    assert got == Delta("r", 0, "ab", [7], [Token(7, -0.25)])
    assert got.logprobs[0].rank is None and got.logprobs[0].top_ids == []
    finish = decode_header(PREFIX + msgspec.msgpack.encode(OldFinish("r", 1, "length")))
    assert finish == Finish("r", 1, "length") and finish.prompt_logprobs is None
    old_params = msgspec.msgpack.encode(OldSamplingParams(logprobs=2))
    assert msgspec.msgpack.decode(old_params, type=SamplingParams).prompt_logprobs is None
    # an old peer's Token is the new one's first two fields, and nothing else
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(Token(1, -2.0)))[:2] == [1, -2.0]
    assert msgspec.msgpack.encode(OldToken(1, -2.0)) == msgspec.msgpack.encode([1, -2.0])


def test_token_alternatives_are_checked() -> None:
    """Ids and values of the alternatives pair up; anything else is a ProtocolError."""
    with pytest.raises(ValueError, match="2 top_ids but 1 top_logprobs"):
        Token(1, -1.0, 1, [1, 2], [-1.0])
    bad = msgspec.msgpack.encode([17, "r", 0, "", [1], [[1, -1.0, 1, [1, 2], [-1.0]]]])
    with pytest.raises(ProtocolError):
        decode_header(PREFIX + bad)
    assert "top_logprobs" in CAPABILITIES


def test_announce_decoder_takes_only_announcements() -> None:
    frame = encode_announce(Announce("w", "i", "tcp://h:1", state="leaving"))
    assert decode_announce([b"id", frame])[1].state == "leaving"
    for frames in (
        [b"id", bytes(encode_frames(Heartbeat("h"))[0])],  # a session message
        [b"id", frame, b"payload"],  # an announcement is one frame
        [b"id", b"LGW\x01\x93\x1a\xa1w"],  # an Announce without its endpoint
        [frame],
    ):
        with pytest.raises(ProtocolError):
            decode_announce(frames)


def test_shm_handles_are_the_transports_wire_shape(tmp_path) -> None:
    """``TensorRef.shm`` carries ``lmgw.transport.shm``'s handle byte for byte, and the
    decoded handle maps the tensor; a shm ref needs no payload frame."""
    np = pytest.importorskip("numpy")
    from lmgw.transport import shm

    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    with shm.ShmPool(directory=str(tmp_path)) as pool:
        handle = pool.put(array)
        ours = ShmHandle(handle.name, handle.size, handle.header, handle.generation)
        assert msgspec.msgpack.encode(handle) == msgspec.msgpack.encode(ours)
        done = PrefillDone("p1", tensors=[TensorRef(0, shm=handle)])  # no frame at all
        got = decode_frames(encode_frames(done)).msg
        assert isinstance(got, PrefillDone) and got.tensors[0].shm == ours
        mapped, close = shm.from_shm(got.tensors[0].shm, directory=str(tmp_path))
        assert (mapped == array).all()
        del mapped
        close()
    assert "tensor_shm" in CAPABILITIES


# -- malformed input --------------------------------------------------------------------------


def expect_message_or_protocol_error(frames: list, envelope: int = 0) -> None:
    try:
        decode_frames(frames, envelope)
    except ProtocolError as exc:
        assert isinstance(exc.code, FailureCode)


@SETTINGS
@given(st.lists(st.binary(max_size=64), max_size=4), st.integers(0, 2))
def test_garbage_frames(frames: list[bytes], envelope: int) -> None:
    expect_message_or_protocol_error(frames, envelope)


@SETTINGS
@given(st.binary(max_size=200))
def test_garbage_after_valid_prefix(body: bytes) -> None:
    expect_message_or_protocol_error([MAGIC + bytes([FRAMING_VERSION]) + body])


@SETTINGS
@given(st.lists(json_like, max_size=12), st.integers(0, 40))
def test_wrong_shapes_after_a_valid_tag(items: list, tag: int) -> None:
    """Well-formed msgpack of the wrong shape behind every possible tag."""
    body = msgspec.msgpack.encode([tag, *items])
    expect_message_or_protocol_error([MAGIC + bytes([FRAMING_VERSION]) + body])


@SETTINGS
@given(messages(), st.data())
def test_truncations_and_bit_flips(msg_needs: tuple[object, int], data: st.DataObject) -> None:
    msg, needs = msg_needs
    header = bytes(encode_frames(msg)[0])
    cut = data.draw(st.integers(0, len(header)))
    expect_message_or_protocol_error([header[:cut]])
    pos = data.draw(st.integers(0, len(header) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(header)
    flipped[pos] ^= 1 << bit
    expect_message_or_protocol_error([bytes(flipped), *([b"x"] * needs)])


_PARAMS = msgspec.msgpack.encode(SamplingParams())
DEEP_ANY = (
    b"\x98\x02\xa1r\xa1m\xa1p\xc0" + _PARAMS + b"\x90" + b"\x81\xa1a" + b"\x91" * 200_000 + b"\xc0"
)
"""A Generate whose kv_transfer_params nests 200k arrays deep (msgspec: RecursionError)."""


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b""], FailureCode.PROTOCOL),
        ([b"GET / HTTP/1.1\r\n"], FailureCode.PROTOCOL),
        ([MAGIC], FailureCode.PROTOCOL),
        ([MAGIC + b"\x02" + msgspec.msgpack.encode([6, "h"])], FailureCode.UNSUPPORTED_VERSION),
        ([], FailureCode.PROTOCOL),
        (
            [MAGIC + b"\x01" + msgspec.msgpack.encode([99, "h"])],
            FailureCode.PROTOCOL,
        ),  # unknown tag
        ([MAGIC + b"\x01" + msgspec.msgpack.encode([6, ""])], FailureCode.PROTOCOL),  # empty id
        (
            [MAGIC + b"\x01" + msgspec.msgpack.encode([2, "r", "m"])],
            FailureCode.PROTOCOL,
        ),  # no prompt
        ([MAGIC + b"\x01" + msgspec.msgpack.encode([1, "r", "gw", 3, 2])], FailureCode.PROTOCOL),
        ([MAGIC + b"\x01" + msgspec.msgpack.encode([6, "x" * 513])], FailureCode.PROTOCOL),
        ([MAGIC + b"\x01" + b"\x91" * 100_000], FailureCode.PROTOCOL),  # deep nesting
        ([object()], FailureCode.PROTOCOL),
        ([MAGIC + b"\x01" + DEEP_ANY], FailureCode.PROTOCOL),  # RecursionError inside Any
    ],
)
def test_specific_malformed_inputs(frames: list, code: FailureCode) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_frames(frames)
    assert info.value.code is code


def test_dangling_tensor_references_are_rejected() -> None:
    msg = Generate("r", "m", prompt="p", tensors=[TensorRef(1)])
    with pytest.raises(ProtocolError, match="tensor frame 1"):
        decode_frames(encode_frames(msg, [b"only one"]))
    msg = Encode("r", "m", media=[MediaItem("image", tensor=0)])
    with pytest.raises(ProtocolError, match="media tensor 0"):
        decode_frames(encode_frames(msg))
    ok = Encode("r", "m", media=[MediaItem("image", tensor=0)], tensors=[TensorRef(0, b"f32")])
    assert decode_frames(encode_frames(ok, [b"\0" * 16])).payload == [b"\0" * 16]
    msg = Generate("r", "m", prompt="p", tensors=[TensorRef(0)], kv_tensors=[0, 1])
    with pytest.raises(ProtocolError, match="KV tensor 1 missing"):
        decode_frames(encode_frames(msg, [b"kv"]))


def test_kv_tensors_are_a_trailing_field_an_older_build_ignores() -> None:
    """``Generate.kv_tensors`` rides at the end of the array, so a decoder without the field
    reads the rest unchanged (the gateway sends it only to workers that agreed on
    ``kv_tensors``); a Generate without hand-off tensors reads back with none."""

    class OldGenerate(msgspec.Struct, frozen=True, array_like=True, tag_field="t", tag=2):
        request_id: str
        model: str
        prompt: str | None = None
        prompt_token_ids: list[int] | None = None
        params: Any = None
        media: list[Any] = []
        kv_transfer_params: dict[str, Any] | None = None
        timeout_s: float | None = None
        tensors: list[Any] = []
        stream: bool = True

    msg = Generate("r", "m", prompt_token_ids=[1, 2], tensors=[TensorRef(0)], kv_tensors=[0])
    frames = encode_frames(msg, [b"kv"])
    old = msgspec.msgpack.decode(frames[0][4:], type=OldGenerate)
    assert (old.request_id, old.prompt_token_ids, old.stream) == ("r", [1, 2], True)
    assert decode_frames(frames).msg.kv_tensors == [0]
    assert decode_frames(encode_frames(Generate("r", "m", prompt="p"))).msg.kv_tensors == []


# -- registration -----------------------------------------------------------------------------


@given(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5), st.integers(0, 5))
def test_negotiate_picks_highest_common_version(a: int, b: int, c: int, d: int) -> None:
    lo, hi = min(a, b), max(a, b)
    wlo, whi = min(c, d), max(c, d)
    reg = Register("r", "gw", lo, hi, ["stream", "abort", "from_the_future"])
    common = set(range(lo, hi + 1)) & set(range(wlo, whi + 1))
    if common:
        version, caps = negotiate(reg, min_version=wlo, max_version=whi)
        assert version == max(common)
        assert caps == {"stream", "abort"}
    else:
        with pytest.raises(ProtocolError) as info:
            negotiate(reg, min_version=wlo, max_version=whi)
        assert info.value.code is FailureCode.UNSUPPORTED_VERSION


def test_this_build_negotiates_with_itself() -> None:
    reg = Register("r", "gw", 1, PROTOCOL_VERSION, sorted(CAPABILITIES))
    assert negotiate(reg) == (PROTOCOL_VERSION, CAPABILITIES)


def test_batch_is_agreed_only_when_both_sides_have_it() -> None:
    """An older peer (either side) lacks the capability, so neither side batches."""
    old = sorted(CAPABILITIES - {"batch"})
    assert "batch" in negotiate(Register("r", "gw", 1, 1, sorted(CAPABILITIES)))[1]
    assert "batch" not in negotiate(Register("r", "old-gw", 1, 1, old))[1]
    older_worker = CAPABILITIES - {"batch"}
    reg = Register("r", "gw", 1, 1, sorted(CAPABILITIES))
    assert "batch" not in negotiate(reg, capabilities=older_worker)[1]
