"""One client request, many native Generates: ``n > 1`` and batched completion prompts.

An HTTP worker (vLLM) answers ``n`` choices and prompt batches itself; a native worker takes one
prompt and one choice per ``Generate``. :class:`~lmgw.pipeline.native.NativeRunner` therefore
fans such a request out to one child request per choice (``prompts x n``, bounded by
``limits.max_n`` and ``limits.max_choices`` before any is sent) and merges their answers into
the one OpenAI answer vLLM writes:

* choice ``index`` = ``prompt_index * n + sample_index`` (vLLM's serving code numbers them so);
* seeds follow vLLM's ``ParentRequest``: with a ``seed``, choice ``i`` of a prompt is sampled
  with ``seed + i``; without one each choice is independent (:func:`child_params`);
* usage sums the choices' completion tokens and counts each prompt once (as vLLM does);
* a stream interleaves every choice's events as they arrive (each choice opens with its own
  role event), then one usage event (``stream_options.include_usage``) and ``[DONE]`` once.

Each child is a normal stage request (own request id ``<id>:<k>``, routing, retries, load
accounting, abort on cancellation). A child that still fails fails the whole request: the
others are cancelled (their workers get ``Abort``), what they had queued is written, and the
client gets the error (a status, or an SSE error event once the stream started).

This module holds the sans-policy parts: the per-choice responder the runner's relay writes
to (:class:`ChoiceSink`), the merge (:class:`Fanout`) and the child parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import trio

from ..errors import GatewayError
from ..http.types import Headers, Responder
from ..protocol.messages import SamplingParams
from ..transport.openai_synth import OpenAISynth, usage_dict
from .request import GatewayRequest

__all__ = [
    "BEST_OF_MESSAGE",
    "SAMPLE_INDEX",
    "ChoiceSink",
    "Fanout",
    "child_params",
    "child_request",
    "leaf_of",
    "write_as_they_come",
]

#: the key of ``SamplingParams.extra`` naming an unseeded choice's index: engines ignore it
#: (vLLM's adapter puts it in ``extra_args``); the simulator draws that choice by it, so its
#: texts equal the HTTP simulator's (``lmgw.simulators.engine.SAMPLE_INDEX``)
SAMPLE_INDEX = "lmgw_sample_index"

#: vLLM V1 refused ``best_of > 1`` and then removed it; the HTTP simulator says the same
BEST_OF_MESSAGE = (
    "best_of > 1 is not supported (vLLM V1 removed it): ask for n choices with logprobs and"
    " pick one"
)


def child_params(params: SamplingParams, sample: int) -> SamplingParams:
    """The sampling parameters of choice ``sample`` of a prompt: vLLM's rule (a seeded
    request's child ``i`` gets ``seed + i``; an unseeded one is independent). Choice 0 is the
    request's own parameters, so it answers what ``n = 1`` would. Only choice 0 asks for the
    prompt's logprobs (the same for every choice: :meth:`Fanout.merged` copies them)."""
    if sample == 0:
        return params
    if params.seed is not None:
        changes: dict[str, Any] = {"seed": params.seed + sample}
    else:
        changes = {"extra": {**(params.extra or {}), SAMPLE_INDEX: sample}}
    if params.prompt_logprobs is not None:
        changes["prompt_logprobs"] = None
    return msgspec.structs.replace(params, **changes)


def child_request(greq: GatewayRequest, k: int) -> GatewayRequest:
    """Choice ``k``'s request: the parent's, under its own id ``<id>:<k>`` (logs and workers
    correlate it to the parent). The leg timings list is shared, so Server-Timing has every
    child's legs."""
    if greq.timings is None:
        greq.timings = []
    child = copy.copy(greq)
    child.request_id = f"{greq.request_id}:{k}"
    return child


class ChoiceSink:
    """What one choice's relay writes to instead of the client's responder (the subset of
    :class:`~lmgw.http.types.Responder` the native relay uses). ``started`` is this choice's
    own: a choice that failed before its first event may still be retried on another worker
    while the others stream."""

    __slots__ = ("_fan", "_k", "started")

    def __init__(self, fan: Fanout, k: int) -> None:
        self._fan = fan
        self._k = k
        self.started = False

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True

    async def send(self, data: bytes) -> None:
        self.started = True
        if data:
            await self._fan.put(data)

    async def end(self, data: bytes = b"") -> None:
        if data:
            await self._fan.put(data)

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        self._fan.bodies[self._k] = body


class Fanout:
    """The merge of ``count`` choices into one answer on ``responder``.

    Streams go through one memory channel to :meth:`pump`, the only writer to the client:
    events queued while it writes go out in one write, a partial event never does (a failing
    choice cancels the choices, never the writer). Whole answers are collected per choice and
    merged by :meth:`merged`."""

    def __init__(self, responder: Responder, synths: Sequence[OpenAISynth], n: int) -> None:
        self.responder = responder
        self.synths = synths
        self.n = n
        self.bodies: list[bytes | None] = [None] * len(synths)
        #: the first failure of a choice: the request's answer
        self.error: GatewayError | None = None
        #: the choices' scope (set by the runner): cancelled on the first failure
        self.scope: trio.CancelScope | None = None
        self._send, self._recv = trio.open_memory_channel[bytes](max(16, len(synths)))

    # -- choices ------------------------------------------------------------------------------
    def sink(self, k: int) -> ChoiceSink:
        return ChoiceSink(self, k)

    async def put(self, data: bytes) -> None:
        await self._send.send(data)

    def fail(self, error: GatewayError) -> None:
        """A choice failed for good: the first failure is the answer; cancel the others."""
        if self.error is None:
            self.error = error
        if self.scope is not None:
            self.scope.cancel()

    def usage(self) -> tuple[int, int, int]:
        """(prompt, completion, cached) tokens of the whole answer: every choice's completion,
        each prompt once (its first choice's), as vLLM counts a batch with ``n``."""
        prompt = completion = cached = 0
        for k, synth in enumerate(self.synths):
            p, c, h = synth.final_usage or (0, 0, 0)
            completion += c
            if k % self.n == 0:
                prompt += p
                cached += h
        return prompt, completion, cached

    # -- streams ------------------------------------------------------------------------------
    def close(self) -> None:
        """No more events (the choices ended: the last one queued was the stream's tail, the
        usage event and ``[DONE]``, unless a choice failed)."""
        self._send.close()

    async def pump(self, headers: Callable[[], list], on_first: Callable[[], None]) -> None:
        """Write the choices' events to the client as they come, until :meth:`close`; then
        end the response, unless a choice failed (the caller answers that)."""
        responder = self.responder
        await write_as_they_come(self._recv, responder, headers, on_first)
        if self.error is None and responder.started:
            await responder.end()

    # -- whole answers ------------------------------------------------------------------------
    def merged(self) -> bytes:
        """The choices' bodies as one: the first body's envelope (a chat's ``prompt_logprobs``
        with it), every choice in index order (a completion choice with its prompt's
        ``prompt_logprobs``, which its prompt's first choice brought), the summed usage."""
        objs: list[Any] = [msgspec.json.decode(b) for b in self.bodies if b is not None]
        if len(objs) != len(self.bodies):
            raise GatewayError(502, "a choice ended without an answer")
        out = objs[0]
        out["choices"] = [c for o in objs for c in o.get("choices") or ()]
        choices, n = out["choices"], self.n
        for k in range(len(choices)):
            if k % n and isinstance(choices[k], dict) and choices[k].get("prompt_logprobs") is None:
                first = choices[k - k % n]
                if isinstance(first, dict) and first.get("prompt_logprobs") is not None:
                    choices[k]["prompt_logprobs"] = first["prompt_logprobs"]
        out["usage"] = usage_dict(*self.usage())
        return msgspec.json.encode(out)


def leaf_of(group: BaseExceptionGroup) -> BaseException:
    """What a nursery's group means to the caller: its first failure that is not a
    cancellation (a client write that failed), else its first cancellation."""
    match, _ = group.split(lambda e: not isinstance(e, (trio.Cancelled, BaseExceptionGroup)))
    exc: BaseException = match if match is not None else group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def write_as_they_come(
    recv: trio.MemoryReceiveChannel[bytes],
    responder: Responder,
    headers: Callable[[], Headers],
    on_first: Callable[[], None] | None = None,
) -> None:
    """The one writer of a merged stream: what its parts queued on ``recv`` goes to the client
    as it comes, what queued meanwhile in one write, until the channel closes. The head (200,
    ``headers()``) goes with the first write."""
    async with recv:
        async for data in recv:
            parts = [data]
            while True:
                try:
                    parts.append(recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if not responder.started:
                await responder.start(200, headers())
                if on_first is not None:
                    on_first()
            await responder.send(b"".join(parts) if len(parts) > 1 else data)
