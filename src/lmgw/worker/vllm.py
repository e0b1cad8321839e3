"""The vLLM engine adapter: :class:`VllmEngine` over vLLM's ``AsyncLLM`` (V1 engine).

vLLM is imported lazily, only by :meth:`VllmEngine.create` and :func:`run_vllm_worker`; it is
not a dependency of lmgw. Everything that touches vLLM's *shapes* is a pure translation layer
here, unit-tested with vLLM-shaped fakes:

* :func:`sampling_kwargs`: our :class:`~lmgw.protocol.SamplingParams` -> keyword arguments for
  ``vllm.SamplingParams`` (prefill legs forced to ``max_tokens=1`` with NIXL's default
  ``kv_transfer_params``; the hand-off travels in ``extra_args``, as vLLM's OpenAI layer puts it).
* :func:`prompt_input`: a stage message -> vLLM's prompt dict (``TokensPrompt``/``TextPrompt``
  with ``multi_modal_data`` and ``multi_modal_uuids``).
* :class:`OutputTranslator`: ``RequestOutput`` objects (DELTA or CUMULATIVE) -> our deltas,
  usage (with cached tokens), finish and stop reasons, the returned ``kv_transfer_params``,
  and logprobs: vLLM's per-position ``{token_id: Logprob(logprob, rank, decoded_token)}``
  dicts (the sampled or prompt token first, then the ``k`` best) -> :class:`Token` entries
  (the token's logprob and rank, the ``k`` best by rank), ``prompt_logprobs`` sent once.
* :class:`SchedulerGauges`: vLLM's stat-logger callbacks -> :meth:`Engine.metrics` values.

The event loops: vLLM runs on asyncio, the worker server on trio. :func:`run_vllm_worker` runs
trio as a *guest* of vLLM's asyncio loop (``trio.lowlevel.start_guest_run``): one thread, no
bridge thread; :class:`AsyncioBridge` hands coroutines and async iterators from trio tasks to
asyncio tasks and results back through trio's token. Cancelling the trio side cancels the
asyncio task, and vLLM's ``generate`` aborts the request when cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from typing import Any, TypeVar

import trio

from ..protocol.messages import (
    Encode,
    FailureCode,
    Generate,
    MediaItem,
    Prefill,
    SamplingParams,
    StructuredOutput,
    Token,
    Usage,
)
from .engine import (
    EncodeResult,
    Engine,
    EngineError,
    EngineRequest,
    GenerateOutput,
    PrefillResult,
    role_name,
)

__all__ = [
    "NIXL_PREFILL_PARAMS",
    "AsyncioBridge",
    "OutputTranslator",
    "SchedulerGauges",
    "VllmEngine",
    "decode_tensor",
    "prefill_result",
    "prompt_input",
    "run_vllm_worker",
    "sampling_kwargs",
    "structured_kwargs",
]

log = logging.getLogger("lmgw.worker")
T = TypeVar("T")

NIXL_PREFILL_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
"""What a proxy sets on the prefill leg when the gateway sent none (PROTOCOLS.md §2.2)."""

_DIRECT = (
    "max_tokens", "temperature", "top_p", "top_k", "min_tokens", "seed", "logprobs",
    "prompt_logprobs",
)  # fmt: skip
_NOT_FROM_EXTRA = frozenset({"n", "output_kind", "extra_args", "cache_salt"})


# -- requests ---------------------------------------------------------------------------------


def sampling_kwargs(
    params: SamplingParams,
    *,
    stage: str = "generate",
    kv_transfer_params: dict[str, Any] | None = None,
    known_fields: Collection[str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams(**kw)`` for one stage.

    ``stage``: ``generate`` (DELTA outputs), ``prefill`` (``max_tokens=1``, no
    ``min_tokens``, NIXL's ``do_remote_decode`` unless the gateway sent hand-off params) or
    ``encode`` (``max_tokens=1``). ``params.extra`` keys go through as fields when
    ``known_fields`` (vLLM's ``SamplingParams`` fields) names them or is None; other keys go
    into ``extra_args`` (where connectors and logits processors read them).
    ``output_kind`` is the *name* of vLLM's ``RequestOutputKind`` member.
    """
    kw: dict[str, Any] = {"n": 1}
    for name in _DIRECT:
        value = getattr(params, name)
        if value is not None:
            kw[name] = value
    if params.stop:
        kw["stop"] = list(params.stop)
    if params.stop_token_ids:
        kw["stop_token_ids"] = list(params.stop_token_ids)
    if params.ignore_eos:
        kw["ignore_eos"] = True
    extra_args: dict[str, Any] = {}
    for key, value in (params.extra or {}).items():
        if key == "extra_args" and isinstance(value, dict):
            extra_args.update(value)
        elif key in _NOT_FROM_EXTRA:
            continue
        elif known_fields is None or key in known_fields:
            kw[key] = value
        else:
            extra_args[key] = value
    if stage == "generate":
        kw["output_kind"] = "DELTA"
    elif stage in ("prefill", "encode"):
        kw["max_tokens"] = 1
        kw.pop("min_tokens", None)
        kw.pop("prompt_logprobs", None)  # a hand-off carries none: the decode leg answers them
        kw["output_kind"] = "FINAL_ONLY"
        if stage == "prefill" and kv_transfer_params is None:
            kv_transfer_params = dict(NIXL_PREFILL_PARAMS)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    if kv_transfer_params is not None:
        extra_args["kv_transfer_params"] = kv_transfer_params
    if extra_args:
        kw["extra_args"] = extra_args
    if params.structured is not None and stage == "generate":  # a hand-off leg emits 1 token
        kw["structured_outputs"] = structured_kwargs(params.structured)
    return kw


def structured_kwargs(structured: StructuredOutput) -> dict[str, Any]:
    """Keyword arguments for vLLM's ``StructuredOutputsParams`` (``GuidedDecodingParams``
    before 0.10.2: the same names): the one constraint, then its options."""
    kw: dict[str, Any] = dict(structured.options or {})
    kind = structured.kind
    kw[kind] = True if kind == "json_object" else structured.spec
    return kw


def decode_tensor(header: bytes, data: Any) -> Any:
    """A payload frame as a read-only numpy array (``lmgw.transport.tensors``, the protocol's
    tensor-frame format; bounds-checked). Raises EngineError(bad_request)."""
    from ..transport.tensors import TensorFrameError, decode

    try:
        return decode(header, data)
    except TensorFrameError as exc:
        raise EngineError(FailureCode.BAD_REQUEST, f"unreadable tensor: {exc}") from None


def prompt_input(
    req: EngineRequest[Any],
    *,
    text: str | None = None,
    tensor_decoder: Callable[[bytes, Any], Any] = decode_tensor,
) -> dict[str, Any]:
    """vLLM's prompt dict for a stage request: token ids when given (``TokensPrompt``), else
    the text (``text`` overrides it: an encoder request has none of its own). The request's
    ``cache_salt`` (vLLM's per-tenant prefix-cache isolation; it rides in ``params.extra``)
    goes into the prompt, where vLLM reads it.

    Media: tensors become ``multi_modal_data[kind]`` entries; items' hashes become
    ``multi_modal_uuids`` (vLLM keys its encoder cache, and EC connectors their stores, by
    them). An item with neither a tensor nor a hash, or a URL only, is refused: vLLM's engine
    does not fetch URLs.
    """
    msg = req.msg
    ids = getattr(msg, "prompt_token_ids", None)
    prompt: dict[str, Any]
    if text is not None:
        prompt = {"prompt": text}
    elif ids is not None:
        prompt = {"prompt_token_ids": list(ids)}
    else:
        prompt = {"prompt": msg.prompt}
    params = getattr(msg, "params", None)
    salt = params.extra.get("cache_salt") if params is not None and params.extra else None
    if isinstance(salt, str) and salt:  # a prompt field in vLLM, not a sampling one
        prompt["cache_salt"] = salt
    data: dict[str, list[Any]] = {}
    uuids: dict[str, list[str | None]] = {}
    for i, item in enumerate(msg.media):
        if item.tensor is None and not item.hash:
            raise EngineError(
                FailureCode.UNSUPPORTED,
                f"media[{i}]: vLLM needs the item as a tensor (or its hash, if its encoder "
                "output is cached); it does not fetch URLs",
            )
        value = (
            None
            if item.tensor is None
            else tensor_decoder(req.tensor_header(item.tensor), req.tensor(item.tensor))
        )
        data.setdefault(item.kind, []).append(value)
        uuids.setdefault(item.kind, []).append(item.hash)
    if data:
        prompt["multi_modal_data"] = {k: v[0] if len(v) == 1 else v for k, v in data.items()}
        if any(h for hs in uuids.values() for h in hs):
            prompt["multi_modal_uuids"] = uuids
    return prompt


# -- outputs ----------------------------------------------------------------------------------


class OutputTranslator:
    """``RequestOutput``s of one request (n=1) -> :class:`GenerateOutput` deltas.

    Reads ``outputs[0].text/token_ids/logprobs/finish_reason/stop_reason``,
    ``prompt_token_ids``, ``prompt_logprobs``, ``num_cached_tokens``, ``finished`` and
    ``kv_transfer_params``. ``cumulative=True`` for outputs that repeat everything so far
    (vLLM's default CUMULATIVE kind): only the new part is emitted. ``top_logprobs`` /
    ``prompt_top``: the alternatives asked for per output / prompt position
    (``SamplingParams.logprobs`` / ``prompt_logprobs``); the prompt's logprobs go out with the
    finishing delta (vLLM sends them once, on its first output).
    """

    __slots__ = (
        "_ids_seen",
        "_prompt_ids",
        "_prompt_lps",
        "_text_seen",
        "completion_tokens",
        "cumulative",
        "prompt_tokens",
        "prompt_top",
        "top_logprobs",
    )

    def __init__(
        self, *, cumulative: bool = False, top_logprobs: int = 0, prompt_top: int = 0
    ) -> None:
        self.cumulative = cumulative
        self.top_logprobs = top_logprobs
        self.prompt_top = prompt_top
        self._text_seen = 0
        self._ids_seen = 0
        self._prompt_ids: list[int] = []
        self._prompt_lps: list[Any] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def feed(self, out: Any) -> GenerateOutput | None:
        """The delta in ``out``, or None when it adds nothing and does not finish."""
        outputs = getattr(out, "outputs", None) or ()
        comp = outputs[0] if outputs else None
        prompt_ids = getattr(out, "prompt_token_ids", None)
        if prompt_ids:
            self.prompt_tokens = len(prompt_ids)
            self._prompt_ids = prompt_ids
        prompt_lps = getattr(out, "prompt_logprobs", None)
        if prompt_lps:  # once (V1); every time (cumulative, older engines); or in chunks
            if self.cumulative:
                self._prompt_lps = list(prompt_lps)
            else:
                self._prompt_lps.extend(prompt_lps)
        text, ids, lps = "", [], None
        if comp is not None:
            text = comp.text or ""
            ids = list(comp.token_ids or ())
            raw_lps = getattr(comp, "logprobs", None)
            if self.cumulative:
                text = text[self._text_seen :]
                ids = ids[self._ids_seen :]
                if raw_lps is not None:
                    raw_lps = raw_lps[self._ids_seen :]
                self._text_seen += len(text)
                self._ids_seen += len(ids)
            lps = _logprobs(ids, raw_lps, self.top_logprobs)
        self.completion_tokens += len(ids)
        finish: str | None = None
        stop_reason: str | int | None = None
        if getattr(out, "finished", False):
            finish = (comp.finish_reason if comp is not None else None) or "stop"
            stop_reason = getattr(comp, "stop_reason", None) if comp is not None else None
        if not text and not ids and finish is None:
            return None
        if finish is None:
            return GenerateOutput(text, ids, lps)
        return GenerateOutput(
            text,
            ids,
            lps,
            finish,
            stop_reason,
            Usage(self.prompt_tokens, self.completion_tokens, _cached(out)),
            getattr(out, "kv_transfer_params", None),
            self._prompt_logprobs(),
        )

    def _prompt_logprobs(self) -> list[Token | None] | None:
        """The prompt's entries (None where vLLM has none: position 0), or None if vLLM sent
        none (not asked)."""
        if not self._prompt_lps:
            return None
        ids, k = self._prompt_ids, self.prompt_top
        return [
            None if entry is None or p >= len(ids) else _token(ids[p], entry, k)
            for p, entry in enumerate(self._prompt_lps)
        ]


def _cached(out: Any) -> int:
    return int(getattr(out, "num_cached_tokens", 0) or 0)


def _logprobs(ids: Sequence[int], raw: Any, k: int = 0) -> list[Token] | None:
    """vLLM's per-position ``{token_id: Logprob}`` (a list, or vLLM's list-like
    ``FlatLogprobs``) -> the sampled tokens' entries with ``k`` alternatives."""
    if raw is None:
        return None
    out: list[Token] = []
    for tid, entry in zip(ids, raw, strict=False):
        token = None if entry is None else _token(tid, entry, k)
        if token is not None:
            out.append(token)
    return out


def _token(tid: int, entry: Any, k: int) -> Token | None:
    """One position's dict -> its entry: ``tid``'s logprob and rank, and the ``k`` best by
    rank (vLLM's dict holds ``tid`` first, then ranks 1..k; ``tid`` keeps its own rank when it
    is among them). Values may be bare floats (no rank): then the best by logprob."""
    own = entry.get(tid)
    if own is None:
        return None
    if not k:
        return Token(tid, _value(own), _rank(own))
    ranked = [(_rank(lp), -_value(lp), t) for t, lp in entry.items()]
    if all(r is not None for r, _, _ in ranked):
        best = sorted(x for x in ranked if x[0] <= k)[:k]
    else:
        best = sorted(ranked, key=lambda x: x[1])[:k]
    return Token(tid, _value(own), _rank(own), [t for _, _, t in best], [-v for _, v, _ in best])


def _value(lp: Any) -> float:
    return float(getattr(lp, "logprob", lp))


def _rank(lp: Any) -> int | None:
    rank = getattr(lp, "rank", None)
    return None if rank is None else int(rank)


def prefill_result(final: Any) -> PrefillResult:
    """The final ``RequestOutput`` of a prefill leg -> its hand-off."""
    comp = (getattr(final, "outputs", None) or (None,))[0]
    ids = list(comp.token_ids or ()) if comp is not None else []
    prompt = len(getattr(final, "prompt_token_ids", None) or ())
    return PrefillResult(
        getattr(final, "kv_transfer_params", None),
        Usage(prompt, len(ids), _cached(final)),
        ids,
    )


class SchedulerGauges:
    """Gauges from vLLM's stat-logger callbacks (``record(scheduler_stats, iteration_stats)``)
    under vLLM's Prometheus names, so the gateway reads them as it reads /metrics."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {
            "vllm:num_requests_running": 0.0,
            "vllm:num_requests_waiting": 0.0,
            "vllm:kv_cache_usage_perc": 0.0,
            "vllm:prefix_cache_queries_total": 0.0,
            "vllm:prefix_cache_hits_total": 0.0,
            "vllm:prompt_tokens_total": 0.0,
            "vllm:generation_tokens_total": 0.0,
        }

    def record(self, scheduler_stats: Any, iteration_stats: Any, *_: Any, **__: Any) -> None:
        v = self.values
        if scheduler_stats is not None:
            v["vllm:num_requests_running"] = float(getattr(scheduler_stats, "num_running_reqs", 0))
            v["vllm:num_requests_waiting"] = float(getattr(scheduler_stats, "num_waiting_reqs", 0))
            usage = getattr(scheduler_stats, "kv_cache_usage", None)
            if usage is None:
                usage = getattr(scheduler_stats, "gpu_cache_usage", 0.0)
            v["vllm:kv_cache_usage_perc"] = float(usage or 0.0)
            prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
            if prefix is not None:
                v["vllm:prefix_cache_queries_total"] += float(getattr(prefix, "queries", 0))
                v["vllm:prefix_cache_hits_total"] += float(getattr(prefix, "hits", 0))
        if iteration_stats is not None:
            prompt = getattr(iteration_stats, "num_prompt_tokens", 0)
            v["vllm:prompt_tokens_total"] += float(prompt)
            v["vllm:generation_tokens_total"] += float(
                getattr(iteration_stats, "num_generation_tokens", 0)
            )


# -- trio as a guest of asyncio ---------------------------------------------------------------


class AsyncioBridge:
    """Await asyncio coroutines and iterate asyncio async iterators from trio tasks, while trio
    runs as a guest of ``loop`` (same thread: no locks, no thread hops).

    Cancelling the trio side cancels the asyncio task. Results and wake-ups come back through
    the trio token, so trio primitives are only touched from trio's own scheduling.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, buffer: int = 64) -> None:
        self.loop = loop
        self.buffer = buffer

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        task = self.loop.create_task(_call(fn, *args))
        task.add_done_callback(lambda _t: token.run_sync_soon(done.set))
        try:
            await done.wait()
        finally:
            if not task.done():
                task.cancel()
        if task.cancelled():  # by the asyncio side (e.g. the engine shutting down)
            raise EngineError(FailureCode.UNAVAILABLE, "the engine's asyncio task was cancelled")
        return task.result()

    async def stream(self, make: Callable[[], AsyncIterator[T]]) -> AsyncIterator[T]:
        """Items of ``make()`` (an asyncio async iterator), with backpressure: the asyncio
        side pauses while ``buffer`` items wait for the trio side."""
        pump = _Pump(trio.lowlevel.current_trio_token(), self.buffer)
        task = self.loop.create_task(pump.run(make))
        try:
            while True:
                while pump.items:
                    item = pump.items.popleft()
                    if len(pump.items) <= self.buffer // 2:
                        pump.room.set()
                    yield item
                if pump.done:
                    if pump.error is not None:
                        raise pump.error
                    return
                pump.wakeup = trio.Event()
                await pump.wakeup.wait()
        finally:
            if not task.done():
                task.cancel()


async def _call(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await fn(*args)


class _Pump:
    """The asyncio half of :meth:`AsyncioBridge.stream`."""

    def __init__(self, token: trio.lowlevel.TrioToken, buffer: int) -> None:
        self.token = token
        self.buffer = max(1, buffer)
        self.items: collections.deque[Any] = collections.deque()
        self.done = False
        self.error: BaseException | None = None
        self.wakeup: trio.Event | None = None
        self.room = asyncio.Event()
        self.room.set()

    async def run(self, make: Callable[[], AsyncIterator[Any]]) -> None:
        try:
            async for item in make():
                self.items.append(item)
                self._wake()
                if len(self.items) >= self.buffer:
                    self.room.clear()
                    await self.room.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc
        finally:
            self.done = True
            self._wake()

    def _wake(self) -> None:
        self.token.run_sync_soon(self._set)

    def _set(self) -> None:
        if self.wakeup is not None:
            self.wakeup.set()


# -- the engine -------------------------------------------------------------------------------


def _vllm_structured_cls() -> Any:
    """vLLM's constraint class: ``StructuredOutputsParams`` (0.10.2 on), else
    ``GuidedDecodingParams``; None when neither is there."""
    try:
        from vllm.sampling_params import StructuredOutputsParams  # type: ignore[import-not-found]

        return StructuredOutputsParams
    except ImportError:
        pass
    try:
        from vllm.sampling_params import GuidedDecodingParams  # type: ignore[import-not-found]

        return GuidedDecodingParams
    except ImportError:
        return None


class VllmEngine(Engine):
    """vLLM's ``AsyncLLM`` (or anything with its ``generate``/``abort`` shape) as an Engine.

    Build it with :meth:`create` inside the asyncio loop, or pass an existing ``llm``.
    ``sampling_params_cls`` and ``output_kinds`` default to vLLM's (imported then);
    tests pass fakes. ``encode_prompt`` renders the prompt of an encoder request (an
    ``Encode`` carries media only); by default one user turn with one part per item through
    the tokenizer's chat template.
    """

    def __init__(
        self,
        llm: Any,
        *,
        role: str,
        models: Sequence[str],
        bridge: AsyncioBridge,
        sampling_params_cls: Any = None,
        output_kinds: Any = None,
        structured_params_cls: Any = None,
        gauges: SchedulerGauges | None = None,
        encode_prompt: Callable[[Sequence[MediaItem]], Awaitable[str]] | None = None,
    ) -> None:
        if sampling_params_cls is None or output_kinds is None:
            from vllm import SamplingParams as VllmSamplingParams  # type: ignore[import-not-found]
            from vllm.sampling_params import RequestOutputKind  # type: ignore[import-not-found]

            sampling_params_cls = sampling_params_cls or VllmSamplingParams
            output_kinds = output_kinds or RequestOutputKind
            structured_params_cls = structured_params_cls or _vllm_structured_cls()
        self.llm = llm
        self.role = role_name(role)
        self.models = tuple(models)
        self.bridge = bridge
        self.gauges = gauges or SchedulerGauges()
        self._sp_cls = sampling_params_cls
        self._kinds = output_kinds
        fields = getattr(sampling_params_cls, "__struct_fields__", None)
        self._fields = frozenset(fields) if fields else None
        # vLLM >= 0.10.2 names the field structured_outputs; before, guided_decoding
        self._so_cls = structured_params_cls
        self._so_field = (
            "guided_decoding"
            if self._fields is not None and "structured_outputs" not in self._fields
            else "structured_outputs"
        )
        self._encode_prompt = encode_prompt or self._chat_template_prompt

    @property
    def capabilities(self) -> frozenset[str]:
        """The role's, plus ``logprobs`` and ``top_logprobs`` where it generates (vLLM returns
        alternatives, ranks and prompt logprobs)."""
        caps = super().capabilities
        if "stream" not in caps:
            return caps
        caps = caps | {"logprobs", "top_logprobs"}
        return caps | {"structured_outputs"} if self._so_cls is not None else caps

    @classmethod
    async def create(cls, engine_args: Any, *, role: str) -> VllmEngine:
        """Build ``AsyncLLM.from_engine_args`` in the running asyncio loop, with a stat logger
        feeding :meth:`metrics`."""
        from vllm.v1.engine.async_llm import AsyncLLM  # type: ignore[import-not-found]

        gauges = SchedulerGauges()
        llm = AsyncLLM.from_engine_args(engine_args, stat_loggers=[_stat_logger_factory(gauges)])
        names = getattr(engine_args, "served_model_name", None) or [engine_args.model]
        if isinstance(names, str):
            names = [names]
        bridge = AsyncioBridge(asyncio.get_running_loop())
        return cls(llm, role=role, models=names, bridge=bridge, gauges=gauges)

    def _params(self, kw: dict[str, Any]) -> Any:
        kw = dict(kw)
        kw["output_kind"] = getattr(self._kinds, kw["output_kind"])
        try:
            structured = kw.pop("structured_outputs", None)
            if structured is not None:
                if self._so_cls is None:  # the gateway checks the capability first
                    raise EngineError(FailureCode.UNSUPPORTED, "no structured outputs here")
                kw[self._so_field] = self._so_cls(**structured)
            return self._sp_cls(**kw)
        except (TypeError, ValueError) as exc:
            raise EngineError(FailureCode.BAD_REQUEST, f"sampling parameters: {exc}") from None

    async def generate(self, req: EngineRequest[Generate]) -> AsyncIterator[GenerateOutput]:  # type: ignore[override]
        msg = req.msg
        kw = sampling_kwargs(
            msg.params,
            stage="generate",
            kv_transfer_params=msg.kv_transfer_params,
            known_fields=self._fields,
        )
        params = self._params(kw)
        prompt = prompt_input(req)
        translator = OutputTranslator(
            top_logprobs=msg.params.logprobs or 0, prompt_top=msg.params.prompt_logprobs or 0
        )
        llm = self.llm
        rid = msg.request_id
        outputs = self.bridge.stream(lambda: llm.generate(prompt, params, rid))
        async with contextlib.aclosing(outputs):  # closing it cancels vLLM's generate
            while True:
                with _input_errors():
                    try:
                        out = await outputs.__anext__()
                    except StopAsyncIteration:
                        return
                delta = translator.feed(out)
                if delta is not None:
                    yield delta
                    if delta.finish_reason is not None:
                        return

    async def prefill(self, req: EngineRequest[Prefill]) -> PrefillResult:
        msg = req.msg
        kw = sampling_kwargs(
            msg.params,
            stage="prefill",
            kv_transfer_params=msg.kv_transfer_params,
            known_fields=self._fields,
        )
        final = await self._final(prompt_input(req), self._params(kw), msg.request_id)
        return prefill_result(final)

    async def encode(self, req: EngineRequest[Encode]) -> EncodeResult:
        msg = req.msg
        if not msg.media:
            raise EngineError(FailureCode.BAD_REQUEST, "an Encode needs at least one media item")
        for i, item in enumerate(msg.media):
            if item.tensor is None:
                raise EngineError(
                    FailureCode.BAD_REQUEST, f"media[{i}]: an encoder needs the item's tensor"
                )
        text = await self._encode_prompt(msg.media)
        kw = sampling_kwargs(SamplingParams(), stage="encode", known_fields=self._fields)
        await self._final(prompt_input(req, text=text), self._params(kw), msg.request_id)
        return EncodeResult([item.hash or "" for item in msg.media])

    async def _final(self, prompt: dict[str, Any], params: Any, rid: str) -> Any:
        final = None
        llm = self.llm
        outputs = self.bridge.stream(lambda: llm.generate(prompt, params, rid))
        async with contextlib.aclosing(outputs):
            with _input_errors():
                async for out in outputs:
                    final = out
        if final is None:
            raise EngineError(FailureCode.ENGINE_ERROR, "vLLM returned no output")
        return final

    async def abort(self, request_id: str) -> None:
        await self.bridge.run(self.llm.abort, request_id)

    def metrics(self) -> dict[str, float]:
        return dict(self.gauges.values)

    async def aclose(self) -> None:
        shutdown = getattr(self.llm, "shutdown", None)
        if shutdown is not None:
            shutdown()

    async def _chat_template_prompt(self, media: Sequence[MediaItem]) -> str:
        tokenizer = await self.bridge.run(self.llm.get_tokenizer)
        parts = [{"type": item.kind} for item in media]
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
        )


@contextlib.contextmanager
def _input_errors() -> Iterator[None]:
    """vLLM refuses invalid input (prompt too long, bad sampling values) with ValueError or
    TypeError from ``generate``: those are the request's fault, not the engine's."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise EngineError(FailureCode.BAD_REQUEST, f"vLLM refused the request: {exc}") from None


def _stat_logger_factory(gauges: SchedulerGauges) -> Callable[..., Any]:
    """A vLLM ``StatLoggerFactory`` whose loggers feed ``gauges``."""
    from vllm.v1.metrics.loggers import StatLoggerBase  # type: ignore[import-not-found]

    class _GaugeLogger(StatLoggerBase):  # type: ignore[misc, valid-type]
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any, *a: Any, **k: Any) -> None:
            gauges.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

    return _GaugeLogger


def build_engine_args(argv: Sequence[str]) -> Any:
    """vLLM's ``AsyncEngineArgs`` from command-line arguments (vLLM's own parser)."""
    from vllm.engine.arg_utils import AsyncEngineArgs  # type: ignore[import-not-found]

    try:
        from vllm.utils.argparse_utils import (  # type: ignore[import-not-found]
            FlexibleArgumentParser,
        )
    except ImportError:
        from vllm.utils import FlexibleArgumentParser  # type: ignore[import-not-found,no-redef]

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="lmgw.worker (vLLM)"))
    return AsyncEngineArgs.from_cli_args(parser.parse_args(list(argv)))


def run_vllm_worker(
    ns: argparse.Namespace,
    vllm_argv: Sequence[str],
    make_server: Callable[[argparse.Namespace, Engine], Any],
) -> int:
    """Build vLLM in an asyncio loop and serve it with trio as that loop's guest."""
    from .cli import serve

    engine_args = build_engine_args(vllm_argv)

    async def host() -> None:
        loop = asyncio.get_running_loop()
        engine = await VllmEngine.create(engine_args, role=ns.role)
        finished: asyncio.Future[Any] = loop.create_future()
        try:
            trio.lowlevel.start_guest_run(
                serve,
                make_server(ns, engine),
                run_sync_soon_threadsafe=loop.call_soon_threadsafe,
                done_callback=finished.set_result,
                host_uses_signal_set_wakeup_fd=True,
            )
            outcome = await finished
        finally:
            await engine.aclose()
        outcome.unwrap()

    asyncio.run(host())
    return 0
