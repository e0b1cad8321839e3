"""The engine interface a worker serves: what :class:`~lmgw.worker.server.WorkerServer` calls.

Why an interface of our own: the server (sockets, registration, abort, drain, heartbeats) must
not care whether tokens come from vLLM's ``AsyncLLM``, the simulator's mock engine or a test
fake, and must not couple the wire to an engine's types (the seed shipped vLLM's
``SamplingParams``). So an engine takes the protocol's own stage messages (wrapped in
:class:`EngineRequest` with their tensor frames) and answers with the small engine-neutral
results below; adapters translate to and from their engine.

Contract:

* ``generate`` yields :class:`GenerateOutput` deltas (never cumulative); the last one has a
  ``finish_reason``. The server turns them into ``Delta``/``Finish`` messages with ``seq``.
* A typed refusal raises :class:`EngineError` with a :class:`~lmgw.protocol.FailureCode`;
  anything else is reported as ``engine_error``.
* Cancellation is the abort path: the server cancels the task running a request, then awaits
  ``abort(request_id)`` (shielded, bounded) so the engine frees what it holds even when the
  cancellation did not reach it (e.g. work queued inside another event loop).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..protocol.messages import Encode, FailureCode, Generate, Prefill, Token, Usage

__all__ = [
    "ROLE_CAPABILITIES",
    "ROLE_NAMES",
    "EncodeResult",
    "Engine",
    "EngineError",
    "EngineRequest",
    "GenerateOutput",
    "PrefillResult",
    "role_name",
]

ROLE_NAMES: dict[str, str] = {"e": "encode", "p": "prefill", "d": "decode", "pd": "merged"}
"""Short role -> the name a worker reports in ``RegisterAck.roles`` (as ``lmgw.config``)."""
_ROLE_ALIASES = {**{r: r for r in ROLE_NAMES}, **{n: r for r, n in ROLE_NAMES.items()}}

ROLE_CAPABILITIES: dict[str, frozenset[str]] = {
    "e": frozenset({"encode", "tensor_frames"}),
    "p": frozenset({"prefill", "tensor_frames"}),
    "d": frozenset({"stream", "tensor_frames"}),
    "pd": frozenset({"stream", "prefill", "tensor_frames"}),
}
"""Stage capabilities a role brings (the server adds abort, metrics and drain itself)."""

Msg = TypeVar("Msg", Generate, Prefill, Encode)


def role_name(role: str) -> str:
    """``"p"`` or ``"prefill"`` -> ``"p"``. Raises ValueError for anything else."""
    try:
        return _ROLE_ALIASES[role.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown role {role!r}: expected pd/merged, e/encode, p/prefill or d/decode"
        ) from None


class EngineError(Exception):
    """A typed failure the server reports as ``Failure(code, message)``."""

    def __init__(self, code: FailureCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class EngineRequest(Generic[Msg]):
    """One stage request as the engine sees it: the wire message and its tensor frames.

    ``tensors[i]`` is the payload frame named by ``msg.tensors[i]`` (zero-copy buffers), so
    ``MediaItem.tensor`` indexes it directly.
    """

    msg: Msg
    tensors: tuple[Any, ...] = ()

    @property
    def request_id(self) -> str:
        return self.msg.request_id

    def tensor(self, index: int) -> memoryview:
        """The bytes of tensor ``index`` (IndexError if the message has no such tensor)."""
        return memoryview(self.tensors[index])

    def tensor_header(self, index: int) -> bytes:
        return self.msg.tensors[index].header

    def kv_arrays(self) -> list[Any]:
        """The hand-off a prefill worker sent through the gateway (``PrefillResult.payload``),
        as read-only numpy arrays in the order it sent them; empty when the KV came another
        way. Raises EngineError(bad_request) for an unreadable tensor."""
        indexes = getattr(self.msg, "kv_tensors", None)
        if not indexes:
            return []
        from ..transport.tensors import TensorFrameError, decode

        try:
            return [decode(self.tensor_header(i), self.tensors[i]) for i in indexes]
        except (TensorFrameError, IndexError) as exc:
            raise EngineError(FailureCode.BAD_REQUEST, f"unreadable KV tensor: {exc}") from None


@dataclass(frozen=True, slots=True)
class GenerateOutput:
    """New output since the previous one. The last one carries ``finish_reason`` (and may
    carry text too); ``usage`` and ``kv_transfer_params`` are read from the last one.
    ``logprobs``: one :class:`~lmgw.protocol.Token` per token id (with the alternatives
    asked for); ``prompt_logprobs`` (``SamplingParams.prompt_logprobs``): one entry per prompt
    position, None for the first, on any one output (the server sends them on ``Finish``)."""

    text: str = ""
    token_ids: Sequence[int] = ()
    logprobs: list[Token] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None
    kv_transfer_params: dict[str, Any] | None = None
    prompt_logprobs: list[Token | None] | None = None


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """The hand-off of a prefill: ``kv_transfer_params`` for the decode stage (opaque to the
    gateway, relayed verbatim), plus ``payload``: arrays (numpy, or bytes-like sent as uint8)
    that travel through the gateway as tensor frames to the decode worker, which reads them
    with :meth:`EngineRequest.kv_arrays`: the KV itself, for engines without a side channel
    between workers (needs a decode worker with the ``kv_tensors`` capability)."""

    kv_transfer_params: dict[str, Any] | None = None
    usage: Usage = field(default_factory=Usage)
    first_token_ids: list[int] = field(default_factory=list)
    payload: Sequence[Any] = ()


@dataclass(frozen=True, slots=True)
class EncodeResult:
    """One hash per input item (the key of its stored encoder output); ``payload``: the
    outputs themselves, one array per item in item order (numpy, or bytes-like sent as
    uint8), for an encoder that stores none where the prefill worker can read it. The gateway
    hands each to the prompt stage as that media item's tensor (with its hash)."""

    mm_hashes: list[str] = field(default_factory=list)
    ec_transfer_params: dict[str, Any] | None = None
    payload: Sequence[Any] = ()


class Engine(abc.ABC):
    """What a worker serves. Implementations: :class:`lmgw.worker.sim.SimEngine`,
    :class:`lmgw.worker.vllm.VllmEngine`; tests write small fakes."""

    #: short role: "e", "p", "d" or "pd"
    role: str = "pd"
    #: model names this engine answers to (the first is the default)
    models: tuple[str, ...] = ()

    @property
    def capabilities(self) -> frozenset[str]:
        """Stage capabilities (``stream``, ``prefill``, ``encode``, ``tensor_frames``,
        ``logprobs``, ``top_logprobs``: alternatives and prompt logprobs); the server adds what
        it implements itself."""
        return ROLE_CAPABILITIES[self.role]

    @abc.abstractmethod
    async def encode(self, req: EngineRequest[Encode]) -> EncodeResult:
        """Run the encoder over ``req.msg.media``."""

    @abc.abstractmethod
    async def prefill(self, req: EngineRequest[Prefill]) -> PrefillResult:
        """Compute the prompt's KV and publish it for a decode worker."""

    @abc.abstractmethod
    def generate(self, req: EngineRequest[Generate]) -> AsyncIterator[GenerateOutput]:
        """Deltas of the completion (an async generator; the server closes it)."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop ``request_id`` and free what it holds. Idempotent; unknown ids are ignored."""

    @abc.abstractmethod
    def metrics(self) -> dict[str, float]:
        """Gauges and counters, cheap to compute (asked on every heartbeat). Names as vLLM's
        (``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ...)."""

    async def aclose(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Release the engine (the CLI calls it after the server stopped)."""
