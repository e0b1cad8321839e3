"""The native lmgw <-> worker protocol: typed messages and a sans-IO multipart codec.

Why our own wire format instead of the seed's: the seed embedded vLLM's ``SamplingParams`` (so
both ends had to run the same vLLM), used one type byte shared by both directions, resent
cumulative text and prompt ids in every chunk, and let one malformed message kill its reader
(PROTOCOLS.md §1.6). Here every message is a frozen, tagged, ``array_like`` msgspec Struct of
our own (``gc=False``: plain data that never forms a cycle, so the collector never tracks
it); the union is decoded in one step by the tag; decoding anything malformed raises
:class:`ProtocolError` and nothing else, so a reader can count it and go on.

Framing of one ZeroMQ multipart message::

    [envelope..., header, *payload]

``envelope`` is what the socket adds (the peer identity on a ROUTER; nothing on a DEALER).
``header`` is ``MAGIC`` + the framing version byte + the msgpack of one :data:`Message`.
A :class:`Batch` (capability ``batch``) is one such message whose field is a list of
frame-less messages for the same peer: one ZeroMQ message, one msgspec decode, several
messages, dispatched in order as if each had arrived alone.
``payload`` frames are opaque bytes referenced by index from a message's ``tensors`` list
(:class:`TensorRef`), so large arrays never pass through msgpack and can be sent with
``copy=False``. Tensor encoding itself is left to ``_fast/tensorframe``; a tensor in shared
memory travels as a :class:`ShmHandle` inside its ``TensorRef`` instead of a frame.

:class:`Announce` (worker -> a gateway's registration endpoint) shares the framing and the
union, so one decoder reads everything; it never travels on a session's sockets.

Compatibility rules: tags and field order never change; new fields are appended with defaults
(old decoders skip trailing extras); the message-set version and the optional features are
agreed once per session by :class:`Register` / :class:`RegisterAck` (see :func:`negotiate`);
a new message type is sent only to a peer that agreed on its capability (``Batch``: ``batch``).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, NamedTuple, Union

import msgspec

__all__ = [
    "ANNOUNCE_STATES",
    "CAPABILITIES",
    "FRAMING_VERSION",
    "MAGIC",
    "MAX_BATCH",
    "MIN_PROTOCOL_VERSION",
    "NOT_STARTED_CODES",
    "PROTOCOL_VERSION",
    "RETRYABLE_CODES",
    "STRUCTURED_KINDS",
    "STRUCTURED_OPTIONS",
    "TO_GATEWAY",
    "TO_REGISTRY",
    "TO_WORKER",
    "Abort",
    "Announce",
    "Batch",
    "Delta",
    "Drain",
    "Encode",
    "EncodeDone",
    "Exit",
    "Failure",
    "FailureCode",
    "Finish",
    "Generate",
    "Heartbeat",
    "HeartbeatAck",
    "Incoming",
    "MediaItem",
    "Message",
    "Metrics",
    "MetricsRequest",
    "Prefill",
    "PrefillDone",
    "ProtocolError",
    "Register",
    "RegisterAck",
    "SamplingParams",
    "ShmHandle",
    "StructuredOutput",
    "TensorRef",
    "Token",
    "Usage",
    "batch_header",
    "decode_frames",
    "decode_header",
    "encode_frames",
    "encode_header",
    "encode_message",
    "negotiate",
    "new_request_id",
    "request_id_of",
]

MAGIC = b"LGW"
"""First bytes of every header frame: a stray or foreign sender is rejected at byte 0."""
FRAMING_VERSION = 1
"""The byte after MAGIC. Changes only if the framing itself changes (never so far)."""
PROTOCOL_VERSION = 1
"""The message-set version this build speaks best; agreed per session at registration."""
MIN_PROTOCOL_VERSION = 1
"""The oldest message-set version this build still accepts."""

CAPABILITIES: frozenset[str] = frozenset(
    {
        "stream",
        "prefill",
        "encode",
        "abort",
        "metrics",
        "drain",
        "tensor_frames",
        "tensor_shm",  # TensorRef.shm: the array is in a same-host shared-memory segment
        "logprobs",
        "top_logprobs",  # Token.rank/top_*, SamplingParams.prompt_logprobs, Finish.prompt_logprobs
        "batch",  # several frame-less messages in one ZeroMQ message (Batch), both directions
        "structured_outputs",  # SamplingParams.structured: the worker constrains its output
        "kv_tensors",  # Generate.kv_tensors: a prefill's KV handed to the decode as tensor frames
        "finish_output",  # Finish.text/token_ids/logprobs: a non-streamed answer in one message
    }
)
"""Optional features this build understands; a session uses the intersection of both sides."""

_HEADER_PREFIX = MAGIC + bytes([FRAMING_VERSION])
_PREFIX_LEN = len(_HEADER_PREFIX)
MAX_REQUEST_ID = 512
MAX_BATCH = 4096
"""The most messages one Batch may hold (a receiver's bound; senders pack far fewer)."""

RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REQUEST_ID)]
Name = Annotated[str, msgspec.Meta(max_length=256)]
Endpoint = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
Count = Annotated[int, msgspec.Meta(ge=0)]


class FailureCode(enum.StrEnum):
    """Why a request (or a message) failed. Travels as its string value."""

    BAD_REQUEST = "bad_request"  # the request is invalid; never retry it as is
    OVERLOADED = "overloaded"  # queue full / not reading; another worker may take it
    ENGINE_ERROR = "engine_error"  # the engine failed while running it
    ABORTED = "aborted"  # aborted on request (client gone, deadline)
    TIMEOUT = "timeout"  # the deadline passed, or no answer in time
    UNSUPPORTED_VERSION = "unsupported_version"  # no common protocol version
    UNSUPPORTED = "unsupported"  # the worker lacks the role or capability asked for
    DRAINING = "draining"  # the worker takes nothing new
    NOT_REGISTERED = "not_registered"  # a request before Register (e.g. worker restarted)
    UNAVAILABLE = "unavailable"  # the peer is gone, restarted, or unreachable
    PROTOCOL = "protocol"  # a malformed message


RETRYABLE_CODES: frozenset[FailureCode] = frozenset(
    {
        FailureCode.OVERLOADED,
        FailureCode.DRAINING,
        FailureCode.NOT_REGISTERED,
        FailureCode.UNAVAILABLE,
    }
)
"""Failures that say nothing about the request itself: another worker may well take it."""
NOT_STARTED_CODES: frozenset[FailureCode] = frozenset(
    {
        FailureCode.OVERLOADED,
        FailureCode.DRAINING,
        FailureCode.NOT_REGISTERED,
        FailureCode.UNSUPPORTED_VERSION,
        FailureCode.UNSUPPORTED,
        FailureCode.BAD_REQUEST,
    }
)
"""Failures a worker sends only for requests it refused before starting them."""


class ProtocolError(Exception):
    """Bytes that are not a valid message. The only exception decoding ever raises."""

    def __init__(self, message: str, code: FailureCode = FailureCode.PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


# -- building blocks --------------------------------------------------------------------------


class ShmHandle(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A tensor in a shared-memory segment on the same host (``lmgw.transport.shm``): the
    segment, the data size, the tensor-frame header, and the segment's generation when written.

    The wire shape of ``lmgw.transport.shm.ShmHandle`` (same fields, same order; either
    encodes to the same bytes, and ``from_shm`` reads this one). Defined here so the protocol
    needs no numpy; ``from_shm`` checks the name and everything else before mapping."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    size: Count
    header: bytes
    generation: Count = 0


class TensorRef(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """An array. ``frame`` indexes the payload frames after the header; ``header`` is a small
    opaque description (dtype, shape, layout) owned by tensorframe. With ``shm`` (capability
    ``tensor_shm``), the array is in that segment instead and ``frame`` is ignored (0)."""

    frame: Count
    header: bytes = b""
    shm: ShmHandle | None = None


class MediaItem(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One multimodal input: by URL, by content hash (expected cached), or by tensor."""

    kind: Name  # "image" | "audio" | "video"
    hash: Name | None = None
    url: str | None = None
    tensor: Count | None = None  # index into the message's ``tensors``


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
"""What a :class:`StructuredOutput` may constrain output to (vLLM's ``StructuredOutputsParams``
kinds; one per request)."""
STRUCTURED_OPTIONS = frozenset(
    {"disable_any_whitespace", "disable_additional_properties", "whitespace_pattern",
     "disable_fallback"}
)  # fmt: skip
"""The settings that may come with a constraint (vLLM's names)."""


class StructuredOutput(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Output the engine must constrain (capability ``structured_outputs``): ``kind`` one of
    :data:`STRUCTURED_KINDS`; ``spec`` the schema (``json``: an object), the text (``regex``,
    ``grammar``, ``structural_tag``) or the options (``choice``: a list of strings), None for
    ``json_object``; ``options`` of :data:`STRUCTURED_OPTIONS`. Why a field of its own and not
    ``extra``: an engine that ignored it would answer free text where the client asked for
    JSON, so only workers that agreed on the capability get such a request."""

    kind: Name
    spec: Any = None
    options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        kind, spec = self.kind, self.spec
        if kind not in STRUCTURED_KINDS:
            raise ValueError(f"unknown structured output kind {kind!r}")
        if kind == "json" and not isinstance(spec, dict):
            raise ValueError("a json constraint needs a schema object")
        if kind in ("regex", "grammar", "structural_tag") and not (isinstance(spec, str) and spec):
            raise ValueError(f"a {kind} constraint needs a non-empty string")
        if kind == "choice" and not (
            isinstance(spec, list) and spec and all(isinstance(c, str) for c in spec)
        ):
            raise ValueError("a choice constraint needs a non-empty list of strings")
        if kind == "json_object" and spec is not None:
            raise ValueError("a json_object constraint has no spec")
        if self.options is not None and not self.options.keys() <= STRUCTURED_OPTIONS:
            unknown = sorted(self.options.keys() - STRUCTURED_OPTIONS)
            raise ValueError(f"unknown structured output options: {', '.join(unknown)}")


class SamplingParams(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Engine-neutral sampling settings (not vLLM's struct: no version coupling).
    ``extra`` carries engine-specific keys through untouched."""

    max_tokens: Count | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_tokens: Count | None = None
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: Count | None = None
    extra: dict[str, Any] | None = None
    prompt_logprobs: Count | None = None  # vLLM's: the prompt's, with this many alternatives
    structured: StructuredOutput | None = None  # capability structured_outputs


class Usage(msgspec.Struct, frozen=True, array_like=True, gc=False):
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    cached_tokens: Count = 0


class Token(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """The logprob entry of one position: the token there (sampled, or the prompt's own), its
    logprob and rank (1: the most likely; None: not reported), and the ``k`` most likely
    tokens asked for (``SamplingParams.logprobs`` / ``prompt_logprobs``) as parallel lists,
    best first (rank ``i + 1`` at index ``i``; the token itself among them when its rank is at
    most ``k``). Ids only: the gateway names tokens with the model's tokenizer, as vLLM's
    ``decoded_token`` does (each id decoded alone). ``rank`` and ``top_*`` came with the
    ``top_logprobs`` capability; a peer without it sends ``[token_id, logprob]``."""

    token_id: int
    logprob: float
    rank: Count | None = None
    top_ids: list[int] = []
    top_logprobs: list[float] = []

    def __post_init__(self) -> None:
        if len(self.top_ids) != len(self.top_logprobs):
            raise ValueError(
                f"{len(self.top_ids)} top_ids but {len(self.top_logprobs)} top_logprobs"
            )


# -- the message union ------------------------------------------------------------------------


class Message(msgspec.Struct, frozen=True, array_like=True, tag_field="t", gc=False):
    """Base of every wire message (never sent itself)."""


class Register(Message, tag=1):
    """Gateway -> worker, first on a session: who I am, which versions and features I speak."""

    request_id: RequestId
    client: Name
    min_version: Count
    max_version: Count
    capabilities: list[Name] = []
    host: Name = ""  # lmgw.transport.shm.host_id(): same host -> tensors may go by shared memory

    def __post_init__(self) -> None:
        if self.min_version > self.max_version:
            raise ValueError("min_version > max_version")


class _StageRequest(Message):
    request_id: RequestId
    model: Name
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    params: SamplingParams = SamplingParams()
    media: list[MediaItem] = []
    kv_transfer_params: dict[str, Any] | None = None
    timeout_s: float | None = None  # time left when sent: a deadline without synchronized clocks
    tensors: list[TensorRef] = []

    def __post_init__(self) -> None:
        if self.prompt is None and self.prompt_token_ids is None:
            raise ValueError("a prompt or prompt_token_ids is required")


class Generate(_StageRequest, tag=2):
    """Gateway -> worker: run a merged or decode stage. Answer: Delta* then Finish | Failure.
    ``stream=False`` lets the worker coalesce all deltas into one. ``kv_tensors`` (capability
    ``kv_tensors``): indexes into ``tensors`` of the hand-off a prefill worker sent through the
    gateway (``PrefillDone.tensors``, in its order)."""

    stream: bool = True
    kv_tensors: list[Count] = []


class Prefill(_StageRequest, tag=3):
    """Gateway -> worker: run the prefill stage. Answer: PrefillDone | Failure."""


class Encode(Message, tag=4):
    """Gateway -> worker: run the encoder over media items. Answer: EncodeDone | Failure."""

    request_id: RequestId
    model: Name
    media: list[MediaItem] = []
    timeout_s: float | None = None
    tensors: list[TensorRef] = []


class Abort(Message, tag=5):
    """Gateway -> worker: stop this request and free what it holds. No answer required."""

    request_id: RequestId
    reason: str = ""


class Heartbeat(Message, tag=6):
    """Gateway -> worker: liveness and load probe. Answer: HeartbeatAck."""

    request_id: RequestId


class MetricsRequest(Message, tag=7):
    """Gateway -> worker: ask for gauges/counters. Answer: Metrics | Failure."""

    request_id: RequestId


class RegisterAck(Message, tag=16):
    """Worker -> gateway: the agreed version and features, and what this worker is.
    ``instance`` changes on every worker start, so a restart is visible to the gateway."""

    request_id: RequestId
    version: Count
    capabilities: list[Name]
    worker_id: Name
    instance: Name
    roles: list[Name] = []
    models: list[Name] = []
    max_inflight: Count = 0  # 0: no stated limit
    control_endpoint: Endpoint | None = None  # the control ROUTER (heartbeats, metrics)
    host: Name = ""  # the worker's shm.host_id(), as Register.host


class Delta(Message, tag=17):
    """Worker -> gateway: new output since the previous Delta (never cumulative).
    ``seq`` counts the messages of one request from 0, so a gap is detectable."""

    request_id: RequestId
    seq: Count
    text: str = ""
    token_ids: list[int] = []
    logprobs: list[Token] | None = None


class Finish(Message, tag=18):
    """Worker -> gateway: the end of a Generate, after its last Delta. With the
    ``finish_output`` capability, a non-streamed Generate's whole output may come in the
    Finish itself (``text``, ``token_ids``, ``logprobs``: as one Delta before it would carry
    them), so its answer is one message, not two; a stream's never does."""

    request_id: RequestId
    seq: Count
    finish_reason: Name  # "stop" | "length" | "abort" | ...
    stop_reason: str | int | None = None
    usage: Usage = Usage()
    kv_transfer_params: dict[str, Any] | None = None
    #: ``SamplingParams.prompt_logprobs``: one entry per prompt position, None for the first
    #: (vLLM's ``prompt_logprobs``, sent once as vLLM's first output does; here at the end)
    prompt_logprobs: list[Token | None] | None = None
    #: output not sent as a Delta (capability ``finish_output``)
    text: str = ""
    token_ids: list[int] = []
    logprobs: list[Token] | None = None


class PrefillDone(Message, tag=19):
    """Worker -> gateway: prefill finished; ``kv_transfer_params`` is the hand-off for D;
    ``tensors`` reference payload frames (KV blocks sent through the gateway)."""

    request_id: RequestId
    kv_transfer_params: dict[str, Any] | None = None
    usage: Usage = Usage()
    first_token_ids: list[int] = []
    tensors: list[TensorRef] = []


class EncodeDone(Message, tag=20):
    """Worker -> gateway: encoder outputs stored; one hash per input item; ``tensors``
    reference the embeddings in the payload frames, when the worker sends them."""

    request_id: RequestId
    mm_hashes: list[Name] = []
    ec_transfer_params: dict[str, Any] | None = None
    tensors: list[TensorRef] = []


class HeartbeatAck(Message, tag=21):
    request_id: RequestId
    instance: Name
    in_flight: Count = 0
    queued: Count = 0
    draining: bool = False


class Metrics(Message, tag=22):
    request_id: RequestId
    values: dict[str, float] = {}


class Failure(Message, tag=23):
    """Worker -> gateway: a request failed. ``request_id`` is "" when the failure is about a
    message that could not be read. ``code`` is a :class:`FailureCode` value; unknown codes
    (from newer peers) read as ENGINE_ERROR through :attr:`failure_code`."""

    request_id: str
    code: Name
    message: str = ""
    retryable: bool = False

    @property
    def failure_code(self) -> FailureCode:
        try:
            return FailureCode(self.code)
        except ValueError:
            return FailureCode.ENGINE_ERROR

    @classmethod
    def of(cls, request_id: str, code: FailureCode, message: str = "") -> Failure:
        return cls(request_id, code.value, message, code in RETRYABLE_CODES)


class Drain(Message, tag=24):
    """Worker -> gateway, unsolicited: take nothing new; in-flight requests still finish."""

    reason: str = ""
    grace_s: float = 0.0


class Exit(Message, tag=25):
    """Worker -> gateway, unsolicited: leaving now; ``in_flight`` requests will not finish."""

    reason: str = ""
    in_flight: Count = 0


ANNOUNCE_STATES = ("up", "draining", "leaving")


class Announce(Message, tag=26):
    """Worker -> a gateway's registration endpoint (not a session): "I am here, reach me at
    ``endpoint``". Sent every ``interval_s``, at once on a drain, and as ``leaving`` on the
    way out; never answered. Silence for ~3 intervals means the worker is gone."""

    worker_id: Name
    instance: Name  # changes at every start: a new value means the worker restarted
    endpoint: Endpoint  # the data ROUTER, as reachable from the gateway
    control_endpoint: Endpoint | None = None  # heartbeats and metrics (never behind data)
    roles: list[Name] = []
    models: list[Name] = []
    min_version: Count = 1
    max_version: Count = 1
    max_inflight: Count = 0
    interval_s: float = 2.0  # the next announcement comes within this
    state: Name = "up"  # "up" | "draining" | "leaving"
    zone: Name | None = None  # its KV-transfer zone (workers[].zone; a gateway of an older
    # build ignores the trailing field)


_ALL = (
    Register,
    Generate,
    Prefill,
    Encode,
    Abort,
    Heartbeat,
    MetricsRequest,
    RegisterAck,
    Delta,
    Finish,
    PrefillDone,
    EncodeDone,
    HeartbeatAck,
    Metrics,
    Failure,
    Drain,
    Exit,
    Announce,
)
TO_WORKER: frozenset[type[Message]] = frozenset(_ALL[:7])
"""Messages a gateway sends and a worker accepts."""
TO_GATEWAY: frozenset[type[Message]] = frozenset(_ALL[7:17])
"""Messages a worker sends and a gateway's session (``RpcChannel``) accepts."""
TO_REGISTRY: frozenset[type[Message]] = frozenset(_ALL[17:])
"""Messages a worker sends to a gateway's registration endpoint (not on a session)."""

SessionMessage = Union[_ALL[:17]]  # noqa: UP007 (a runtime tuple of types)


class Batch(Message, tag=27):
    """Either direction, only when both sides agreed on the ``batch`` capability: several
    messages for the same peer in one ZeroMQ message, in the order they were queued. Each is
    handled exactly as if it had arrived alone. Only frame-less messages travel in a batch (a
    batch has no payload frames: a ``TensorRef`` inside must point to shared memory); a batch
    never holds a batch nor an ``Announce``. Why: every ZeroMQ message costs a libzmq send, a
    wake-up of ZeroMQ's I/O thread and a receive on the other side; a request's Delta and
    Finish, or the Generates of many requests started together, need only one."""

    messages: Annotated[list[SessionMessage], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


AnyMessage = Union[(*_ALL, Batch)]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)


# -- codec ------------------------------------------------------------------------------------


class Incoming(NamedTuple):
    """One decoded multipart message."""

    envelope: list[Any]  # frames before the header, as received (ROUTER identity)
    msg: Message
    payload: list[Any]  # frames after the header, as received (zero-copy zmq Frames or bytes)


def encode_header(msg: Message) -> bytearray:
    """The header frame of ``msg`` (written in place after the prefix: no extra copy)."""
    buf = bytearray(_HEADER_PREFIX)
    _encoder.encode_into(msg, buf, _PREFIX_LEN)
    return buf


def encode_message(msg: Message) -> bytes:
    """The msgpack of ``msg`` alone (no prefix): a batch item, or, after ``MAGIC`` and the
    framing byte, a header frame (:func:`batch_header` builds either)."""
    return _encoder.encode(msg)


_BATCH_TAG = Batch.__struct_config__.tag
assert isinstance(_BATCH_TAG, int) and 0 <= _BATCH_TAG < 128  # a positive fixint
# the msgpack of a Batch up to its list's length: a 2-array (tag, messages) and the tag
_BATCH_PREFIX = _HEADER_PREFIX + bytes([0x92, _BATCH_TAG])


def batch_header(items: Sequence[bytes]) -> bytes:
    """The header frame holding ``items`` (each :func:`encode_message` output): the message
    itself for one item, else a :class:`Batch` of them, spliced without decoding them again
    (byte for byte what encoding ``Batch([...])`` gives)."""
    n = len(items)
    if n == 1:
        return _HEADER_PREFIX + items[0]
    if n < 16:
        head = _BATCH_PREFIX + bytes([0x90 | n])
    elif n <= 0xFFFF:
        head = _BATCH_PREFIX + b"\xdc" + n.to_bytes(2, "big")
    else:
        raise ValueError(f"a batch of {n} messages")
    return b"".join((head, *items))


def encode_frames(msg: Message, payload: Sequence[Any] = (), envelope: Sequence[Any] = ()) -> list:
    """``[*envelope, header, *payload]`` ready for ``send_multipart``."""
    if payload or envelope:
        return [*envelope, encode_header(msg), *payload]
    return [encode_header(msg)]


def decode_header(frame: Any) -> Message:
    """Decode one header frame (bytes, memoryview or zmq Frame). Raises ProtocolError only."""
    try:
        view = memoryview(frame)
    except TypeError:
        raise ProtocolError(f"a frame must be a buffer, not {type(frame).__name__}") from None
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    if view[: len(MAGIC)] != MAGIC:
        raise ProtocolError("not an lmgw message (bad magic)")
    if len(view) < _PREFIX_LEN:
        raise ProtocolError("truncated header frame")
    if view[len(MAGIC)] != FRAMING_VERSION:
        raise ProtocolError(
            f"framing version {view[len(MAGIC)]} is not supported (this build reads "
            f"{FRAMING_VERSION})",
            FailureCode.UNSUPPORTED_VERSION,
        )
    try:
        return _decoder.decode(view[_PREFIX_LEN:])
    except (msgspec.DecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        # ValidationError is a DecodeError; the rest guard against surprises in nested Any data
        raise ProtocolError(f"malformed message: {exc}") from None


def decode_frames(frames: Sequence[Any], envelope: int = 0) -> Incoming:
    """Split ``frames`` into envelope, message and payload; check tensor references.

    ``envelope`` is how many frames precede the header (1 on a ROUTER, 0 on a DEALER).
    Raises ProtocolError (and nothing else) for anything malformed.
    """
    if len(frames) <= envelope:
        raise ProtocolError(f"expected at least {envelope + 1} frames, got {len(frames)}")
    msg = decode_header(frames[envelope])
    payload = list(frames[envelope + 1 :])
    if type(msg) is Batch:
        if payload:
            raise ProtocolError(f"a batch carries no payload frames ({len(payload)} came)")
        for item in msg.messages:
            if type(item) in _WITH_REFERENCES:
                _check_references(item, 0)
    else:
        _check_references(msg, len(payload))
    return Incoming(list(frames[:envelope]), msg, payload)


_WITH_REFERENCES = frozenset({Generate, Prefill, Encode, PrefillDone, EncodeDone})
"""The messages with ``tensors`` or ``media`` (a batch checks only these: cheaper than
looking for the fields on every Delta)."""


def _check_references(msg: Message, frames: int) -> None:
    refs = getattr(msg, "tensors", None)
    if refs:
        for ref in refs:
            if ref.frame >= frames and ref.shm is None:
                raise ProtocolError(f"tensor frame {ref.frame} missing ({frames} payload frames)")
    media = getattr(msg, "media", None)
    if media:
        n = len(refs or ())
        for item in media:
            if item.tensor is not None and item.tensor >= n:
                raise ProtocolError(f"media tensor {item.tensor} missing ({n} tensors)")
    kv = getattr(msg, "kv_tensors", None)
    if kv:
        n = len(refs or ())
        for index in kv:
            if index >= n:
                raise ProtocolError(f"KV tensor {index} missing ({n} tensors)")


# -- helpers ----------------------------------------------------------------------------------


def request_id_of(msg: Message) -> str | None:
    """The correlation id of ``msg``, or None for unsolicited control messages."""
    return getattr(msg, "request_id", None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def negotiate(
    reg: Register,
    *,
    min_version: int = MIN_PROTOCOL_VERSION,
    max_version: int = PROTOCOL_VERSION,
    capabilities: frozenset[str] = CAPABILITIES,
) -> tuple[int, frozenset[str]]:
    """The worker's side of registration: the highest common version and the common
    capabilities. Raises ProtocolError(UNSUPPORTED_VERSION) when the ranges do not meet."""
    version = min(reg.max_version, max_version)
    if version < max(reg.min_version, min_version):
        raise ProtocolError(
            f"no common protocol version: peer speaks {reg.min_version}..{reg.max_version}, "
            f"this side {min_version}..{max_version}",
            FailureCode.UNSUPPORTED_VERSION,
        )
    return version, frozenset(reg.capabilities) & capabilities
