"""The simulator's mock engine behind the native protocol: :class:`SimEngine`.

It drives the same sans-IO core as the HTTP simulator (:mod:`lmgw.simulators.engine`): same
tokenizer, same deterministic completions, same timing model (queue for one of
``max_num_seqs`` slots, prefill = a + b * uncached tokens, one decode step per token), same
prefix cache and counters. So a test asserts the same exact text over ZeroMQ as over HTTP.

Hand-offs move real bytes (DESIGN.md §6), so a hand-off bug fails a request instead of
producing plausible text:

Two hand-off modes (``WorkerOptions.handoff``): ``direct`` (an engine with a side channel
between workers and a shared encoder cache) and ``gateway`` (one without: the data itself goes
through the gateway as tensor frames).

* ``e`` computes each media item's embedding (:func:`~lmgw.simulators.disagg.derive_embedding`
  of its content hash) and stores it under ``ec_dir`` (the layout of vLLM's shared-storage EC
  connector); in ``gateway`` mode it returns it instead, one tensor per item after
  ``EncodeDone``.
* ``p`` returns the prompt's KV blocks (:func:`~lmgw.simulators.disagg.kv_block_payloads`)
  inside ``kv_transfer_params`` (NIXL-shaped keys plus ``sim_kv``: the gateway relays that
  dict verbatim, as it relays vLLM's); in ``gateway`` mode as a tensor after ``PrefillDone``.
* ``d`` refuses a Generate without that hand-off, and verifies it byte for byte
  (:func:`~lmgw.simulators.disagg.verify_kv_blocks`): a corrupted, reordered or foreign
  transfer is an ``engine_error`` naming the first bad block.
* ``p``/``pd`` check encoder outputs a request brings: a media item with a ``hash`` and a
  tensor must carry that item's embedding; one with a hash only must be in ``ec_dir``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import trio

from ..protocol.messages import (
    Encode,
    FailureCode,
    Generate,
    MediaItem,
    Prefill,
    Token,
    Usage,
)
from ..simulators import engine as _core_module
from ..simulators.app import WorkerOptions
from ..simulators.disagg import (
    EmbeddingError,
    EmbeddingStore,
    KVVerifyError,
    derive_embedding,
    kv_block_payloads,
    prompt_digest,
    verify_kv_blocks,
)
from ..simulators.engine import (
    Completion,
    PromptError,
    SamplingSpec,
    StructuredPlan,
    Ticket,
    sample_index,
)
from ..simulators.engine import Engine as SimCore
from ..simulators.faults import FaultInjector
from ..simulators.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from ..simulators.structured import Unsimulated
from .engine import (
    EncodeResult,
    Engine,
    EngineError,
    EngineRequest,
    GenerateOutput,
    PrefillResult,
    role_name,
)

__all__ = ["SimEngine", "SimRun", "check_logprobs", "sampling_spec", "wire_token"]

RECENT = 256
"""How many ended runs and aborted ids the engine remembers (tests read them)."""


@dataclass(slots=True)
class SimRun:
    """One request's progress, kept for tests: ``emitted`` tokens of ``total``; ``state`` ends
    as ``done``, ``cut`` (stopped early: aborted, failed or cancelled) or ``failed``."""

    request_id: str
    kind: str
    total: int
    emitted: int = 0
    state: str = "waiting"


def check_logprobs(params: Any) -> None:
    """vLLM's bound on alternatives (``max_logprobs``: the HTTP simulator's 20), as
    ``bad_request`` with vLLM's message."""
    for what, k in (("sample", params.logprobs), ("prompt", params.prompt_logprobs)):
        if k is not None and k > MAX_TOP_LOGPROBS:
            raise EngineError(
                FailureCode.BAD_REQUEST,
                f"Requested {what} logprobs of {k}, which is greater than max allowed: "
                f"{MAX_TOP_LOGPROBS}",
            )


def wire_token(entry: TokenLogprob, k: int) -> Token:
    """The simulator's logprobs of one position as the protocol's entry, with the ``k``
    most likely tokens (what the HTTP simulator renders from the same entry)."""
    top = entry.top[:k]
    return Token(
        entry.token_id,
        entry.logprob,
        entry.rank,
        [t for t, _ in top],
        [lp for _, lp in top],
    )


def sampling_spec(params: Any) -> SamplingSpec:
    """Our :class:`~lmgw.protocol.SamplingParams` -> the mock engine's spec (only the fields
    that change its output), with vLLM's argument checks as ``bad_request``."""
    mt, mn = params.max_tokens, params.min_tokens or 0
    if mt is not None and mt < 1:
        raise EngineError(FailureCode.BAD_REQUEST, f"max_tokens must be at least 1, got {mt}.")
    if mt is not None and mn > mt:
        raise EngineError(
            FailureCode.BAD_REQUEST,
            f"min_tokens must be less than or equal to max_tokens={mt}, got {mn}.",
        )
    if params.temperature is not None and params.temperature < 0:
        raise EngineError(
            FailureCode.BAD_REQUEST,
            f"temperature must be non-negative, got {params.temperature}.",
        )
    if params.top_p is not None and not 0.0 < params.top_p <= 1.0:
        raise EngineError(FailureCode.BAD_REQUEST, f"top_p must be in (0, 1], got {params.top_p}.")
    extra = params.extra or {}
    return SamplingSpec(
        max_tokens=mt,
        min_tokens=mn,
        ignore_eos=params.ignore_eos,
        stop=tuple(params.stop),
        stop_token_ids=tuple(params.stop_token_ids),
        include_stop_str_in_output=bool(extra.get("include_stop_str_in_output", False)),
        seed=params.seed,
    )


HANDOFFS = ("direct", "gateway")
"""How the native simulator hands off KV and encoder outputs (see the module doc)."""


class SimEngine(Engine):
    """A simulated engine of one role (``options.role``: e, p, d or pd) for
    :class:`~lmgw.worker.server.WorkerServer`. ``options`` are the HTTP simulator's
    (:class:`~lmgw.simulators.WorkerOptions`); the HTTP-only ones are ignored. Faults used:
    ``error_rate``, ``hang``, ``slow``, ``crash_at_token`` (exits the process when
    ``exit_on_crash``, else fails the request)."""

    def __init__(self, options: WorkerOptions | None = None, *, core: SimCore | None = None):
        self.options = opts = options or WorkerOptions()
        self.role = role_name(opts.role)
        self.models = opts.served_names
        self.core = core or SimCore(opts.engine_config())
        self.faults = FaultInjector(opts.faults, seed=opts.seed)
        self.core.slow = self.faults.faults.slow
        self.engine_id = opts.engine_id or str(uuid.uuid4())
        if opts.handoff not in HANDOFFS:
            raise ValueError(f"unknown handoff {opts.handoff!r}: expected one of {HANDOFFS}")
        self.through_gateway = opts.handoff == "gateway"
        """Hand-offs as tensor frames through the gateway (else side channel and ec_dir)."""
        self.ec_store = EmbeddingStore(opts.ec_dir) if opts.ec_dir else None
        self._slots = trio.Semaphore(max(1, opts.max_num_seqs))
        self.runs: dict[str, SimRun] = {}
        """Requests in the engine now."""
        self.recent: collections.deque[SimRun] = collections.deque(maxlen=RECENT)
        """Requests that ended, oldest first."""
        self.aborted: collections.deque[str] = collections.deque(maxlen=RECENT)
        """Ids ``abort`` was called for, oldest first."""
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "kv_blocks_published",
                "kv_blocks_verified",
                "kv_verify_failures",
                "embeddings_computed",
                "embeddings_verified",
                "embedding_failures",
                "errors_injected",
            ),
            0,
        )

    @property
    def capabilities(self) -> frozenset[str]:
        """The role's, plus ``logprobs``, ``top_logprobs`` and ``structured_outputs`` where it
        generates (the HTTP simulator's values: sampled tokens, alternatives, the prompt's;
        constrained text, :mod:`lmgw.simulators.structured`)."""
        caps = super().capabilities
        extra = {"logprobs", "top_logprobs", "structured_outputs", "kv_tensors"}
        return caps | extra if "stream" in caps else caps

    # -- the Engine interface -------------------------------------------------------------------
    async def generate(self, req: EngineRequest[Generate]) -> AsyncIterator[GenerateOutput]:  # type: ignore[override]
        msg = req.msg
        ids = self._prompt_ids(msg)
        spec = sampling_spec(msg.params)
        check_logprobs(msg.params)
        self._check_length(len(ids), spec.max_tokens)
        self._inject_error()
        extra_s = self._check_media(req)
        external = self._verify_handoff(req, ids)
        structured = msg.params.structured
        plan = StructuredPlan.of(structured) if structured is not None else None
        try:
            completion = self.core.generate(ids, spec, sample_index(msg.params.extra), plan)
        except Unsimulated as exc:
            raise EngineError(FailureCode.BAD_REQUEST, str(exc)) from None
        run = self._start(msg.request_id, "generate", completion.num_tokens)
        ticket = self.core.submit(len(ids))
        arrival = trio.current_time()
        acquired = finished = False
        try:
            await self._hang()
            await self._acquire()
            acquired = True
            ticket.admit(completion.num_tokens)
            clock = await self._prefill(ticket, ids, external, extra_s, arrival, run)
            ticket.begin_decode()
            run.state = "decode"
            timed = not self.core.config.timing.instant
            crash = self.faults.faults.crash_at_token
            # the HTTP simulator's logprobs: the sampled tokens' with the alternatives asked for
            k = msg.params.logprobs
            lps = (
                None
                if k is None
                else self.core.logprobs.output(
                    completion.key, completion.token_ids, completion.offset
                )
            )
            for step, (tid, piece) in enumerate(
                zip(completion.token_ids, completion.pieces, strict=True)
            ):
                if crash == step:
                    self._crash(step)
                if step == 0:
                    self.core.stats.ttft.observe(trio.current_time() - arrival)
                elif timed:
                    # deadline-driven steps (no drift), at most 50 ms of catch-up: as app.py
                    clock = max(clock, trio.current_time() - 0.05) + ticket.decode_step_s()
                    await trio.sleep_until(clock)
                yield GenerateOutput(
                    piece, (tid,), None if lps is None else [wire_token(lps[step], k or 0)]
                )
                run.emitted = step + 1
            if crash is not None and crash == completion.num_tokens:
                self._crash(crash)
            if not completion.token_ids:
                self.core.stats.ttft.observe(trio.current_time() - arrival)
            finished = True
            yield GenerateOutput(
                finish_reason=completion.finish_reason,
                stop_reason=completion.stop_reason,
                usage=Usage(len(ids), completion.num_tokens, ticket.cached_tokens),
                prompt_logprobs=self._prompt_logprobs(ids, msg.params.prompt_logprobs),
            )
        finally:
            if acquired:
                self._slots.release()
            self._close(ticket, run, completion, finished, arrival)

    async def prefill(self, req: EngineRequest[Prefill]) -> PrefillResult:
        msg = req.msg
        ids = self._prompt_ids(msg)
        spec = sampling_spec(msg.params)
        self._check_length(len(ids), 1)
        self._inject_error()
        extra_s = self._check_media(req)
        # the first token, as vLLM's prefill (max_tokens=1) computes it (unconstrained: the
        # decode worker's Generate carries the constraint and answers the whole text)
        first = self.core.generate(
            ids, _replace_max_tokens(spec, 1), sample_index(msg.params.extra)
        )
        run = self._start(msg.request_id, "prefill", first.num_tokens)
        ticket = self.core.submit(len(ids))
        arrival = trio.current_time()
        acquired = finished = False
        try:
            await self._hang()
            await self._acquire()
            acquired = True
            ticket.admit(first.num_tokens)
            await self._prefill(ticket, ids, 0, extra_s, arrival, run)
            self.core.stats.ttft.observe(trio.current_time() - arrival)
            block_size = self.core.config.block_size
            blocks = kv_block_payloads(ids, block_size)
            self.counters["kv_blocks_published"] += len(blocks)
            params: dict[str, Any] = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_engine_id": self.engine_id,
                "remote_request_id": msg.request_id,
                "remote_block_ids": list(range(len(blocks))),
                "tp_size": 1,
                "sim_prompt_digest": prompt_digest(ids),
                "sim_block_size": block_size,
            }
            kv = b"".join(blocks)
            if not self.through_gateway:
                params["sim_kv"] = kv
            run.emitted = first.num_tokens
            finished = True
            return PrefillResult(
                params,
                Usage(len(ids), first.num_tokens, ticket.cached_tokens),
                list(first.token_ids),
                [kv] if self.through_gateway else (),
            )
        finally:
            if acquired:
                self._slots.release()
            self._close(ticket, run, first, finished, arrival)

    async def encode(self, req: EngineRequest[Encode]) -> EncodeResult:
        msg = req.msg
        if not msg.media:
            raise EngineError(FailureCode.BAD_REQUEST, "an Encode needs at least one media item")
        self._inject_error()
        keys = [self._media_key(req, item, i) for i, item in enumerate(msg.media)]
        tokens = [self._media_tokens(item) for item in msg.media]
        run = self._start(msg.request_id, "encode", len(keys))
        acquired = finished = False
        try:
            await self._hang()
            await self._acquire()
            acquired = True
            core = self.core
            delay = core.config.timing.encode_s(len(keys), core.slow)
            if delay > 0:
                await trio.sleep(delay)
            out = [
                derive_embedding(key, item.kind, n)
                for key, item, n in zip(keys, msg.media, tokens, strict=True)
            ]
            if self.ec_store is not None:
                for key, data in zip(keys, out, strict=True):
                    self.ec_store.put(key, data)
            self.counters["embeddings_computed"] += len(out)
            run.emitted = len(out)
            finished = True
            return EncodeResult(keys, None, out if self.through_gateway else ())
        finally:
            if acquired:
                self._slots.release()
            self._end(run, finished)

    async def abort(self, request_id: str) -> None:
        # The server cancelled the request's task before calling this, so the run has been
        # cut short already; the id is recorded for tests and stats.
        self.aborted.append(request_id)
        await trio.lowlevel.checkpoint()

    def metrics(self) -> dict[str, float]:
        core = self.core
        c = self.counters
        finished = sum(core.stats.finished.values())
        return {
            "vllm:num_requests_running": float(core.running),
            "vllm:num_requests_waiting": float(core.waiting),
            "vllm:kv_cache_usage_perc": core.kv_cache_usage,
            "vllm:prefix_cache_queries_total": float(core.cache.queries),
            "vllm:prefix_cache_hits_total": float(core.cache.hits),
            "vllm:prompt_tokens_total": float(core.stats.prompt_tokens),
            "vllm:generation_tokens_total": float(core.stats.generation_tokens),
            "vllm:request_success_total": float(finished),
            "vllm:request_aborted_total": float(core.stats.aborted_total),
            "lmgw_sim_kv_blocks_published_total": float(c["kv_blocks_published"]),
            "lmgw_sim_kv_blocks_verified_total": float(c["kv_blocks_verified"]),
            "lmgw_sim_kv_verify_failures_total": float(c["kv_verify_failures"]),
            "lmgw_sim_embeddings_computed_total": float(c["embeddings_computed"]),
            "lmgw_sim_embeddings_verified_total": float(c["embeddings_verified"]),
        }

    # -- helpers --------------------------------------------------------------------------------
    def _prompt_logprobs(self, ids: list[int], k: int | None) -> list[Token | None] | None:
        """The prompt's logprobs (``prompt_logprobs: k``): position 0 None, as vLLM's."""
        if k is None:
            return None
        return [None if e is None else wire_token(e, k) for e in self.core.logprobs.prompt(ids)]

    def _prompt_ids(self, msg: Generate | Prefill) -> list[int]:
        """Token ids as the HTTP simulator's completions make them (text encoded with the
        model's special tokens, as vLLM does); ids out of the vocabulary are refused."""
        tok = self.core.tokenizer
        if msg.prompt_token_ids is not None:
            ids = list(msg.prompt_token_ids)
            check = getattr(tok, "check_ids", None)
            if check is not None:
                try:
                    check(ids, "prompt")
                except PromptError as exc:
                    raise EngineError(FailureCode.BAD_REQUEST, str(exc)) from None
            else:
                vocab = getattr(tok, "vocab_size", None) or getattr(_core_module, "VOCAB_SIZE", 0)
                for t in ids:
                    if not 0 <= t < vocab:
                        raise EngineError(
                            FailureCode.BAD_REQUEST, f"Token id {t} is out of vocabulary"
                        )
        else:
            ids = list(tok.encode(msg.prompt or ""))
        if not ids:
            raise EngineError(FailureCode.BAD_REQUEST, "The decoder prompt cannot be empty")
        return ids

    @property
    def max_model_len(self) -> int:
        core = self.core
        return getattr(core, "max_model_len", None) or core.config.max_model_len

    def _check_length(self, prompt_len: int, max_tokens: int | None) -> None:
        limit = self.max_model_len
        if prompt_len >= limit:
            raise EngineError(
                FailureCode.BAD_REQUEST,
                f"This model's maximum context length is {limit} tokens. However, your request "
                f"has {prompt_len} input tokens. Please reduce the length of the input prompt.",
            )
        if max_tokens is not None and prompt_len + max_tokens > limit:
            raise EngineError(
                FailureCode.BAD_REQUEST,
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
                f"model's maximum context length is {limit} tokens and your request has "
                f"{prompt_len} input tokens ({max_tokens} > {limit} - {prompt_len}).",
            )

    def _inject_error(self) -> None:
        if self.faults.should_error():
            self.counters["errors_injected"] += 1
            raise EngineError(
                FailureCode.ENGINE_ERROR, "Simulated engine failure (fault: error_rate)."
            )

    async def _hang(self) -> None:
        if self.faults.faults.hang:
            await trio.sleep_forever()

    def _crash(self, step: int) -> None:
        if self.options.exit_on_crash:
            os._exit(1)
        raise RuntimeError(f"simulated crash at token {step}")

    async def _acquire(self) -> None:
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()

    async def _prefill(
        self,
        ticket: Ticket,
        ids: list[int],
        external: int,
        extra_s: float,
        arrival: float,
        run: SimRun,
    ) -> float:
        """Look the prompt up, cache it, sleep the prefill time; returns the clock for the
        decode steps (as app.py's ``_run``)."""
        run.state = "prefill"
        delay = ticket.prefill([ids], external) + extra_s
        clock = arrival
        if delay > 0:
            clock = trio.current_time() + delay
            await trio.sleep_until(clock)
        return clock

    def _start(self, request_id: str, kind: str, total: int) -> SimRun:
        run = SimRun(request_id, kind, total)
        self.runs[request_id] = run
        return run

    def _end(self, run: SimRun, finished: bool) -> None:
        run.state = "done" if finished else "cut"
        if self.runs.get(run.request_id) is run:
            del self.runs[run.request_id]
        self.recent.append(run)

    def _close(
        self, ticket: Ticket, run: SimRun, completion: Completion, finished: bool, arrival: float
    ) -> None:
        if finished:
            ticket.emitted(completion.num_tokens)
            ticket.close([completion])
            self.core.stats.e2e.observe(trio.current_time() - arrival)
        else:
            ticket.emitted(run.emitted)
            ticket.close(aborted=True)
        self._end(run, finished)

    def run_of(self, request_id: str) -> SimRun | None:
        """The live or most recent run of ``request_id``."""
        run = self.runs.get(request_id)
        if run is not None:
            return run
        for old in reversed(self.recent):
            if old.request_id == request_id:
                return old
        return None

    # -- hand-offs ------------------------------------------------------------------------------
    def _verify_handoff(self, req: EngineRequest[Generate], ids: list[int]) -> int:
        """Prompt tokens whose KV arrived from a prefill worker (verified), or 0."""
        msg = req.msg
        params = msg.kv_transfer_params
        kv = params.get("sim_kv") if params else None
        arrays = req.kv_arrays()
        if arrays:  # through the gateway as tensor frames
            kv = b"".join(a.tobytes() for a in arrays)
        if kv is None:
            if self.role == "d":
                raise EngineError(
                    FailureCode.BAD_REQUEST,
                    "this is a decode-only worker (role d): Generate needs the "
                    "kv_transfer_params of a Prefill (PrefillDone.kv_transfer_params, relayed "
                    "verbatim), which carry the prompt's KV",
                )
            return 0
        assert params is not None
        block_size = self.core.config.block_size
        try:
            if not isinstance(kv, bytes | bytearray | memoryview):
                raise KVVerifyError(f"sim_kv must be bytes, not {type(kv).__name__}")
            if params.get("sim_prompt_digest", prompt_digest(ids)) != prompt_digest(ids):
                raise KVVerifyError(
                    "the prefill worker computed KV for a different prompt than this request's"
                )
            if params.get("sim_block_size", block_size) != block_size:
                raise KVVerifyError(
                    f"block size {params.get('sim_block_size')} != this worker's {block_size}"
                )
            verified = verify_kv_blocks(ids, block_size, bytes(kv))
        except KVVerifyError as exc:
            self.counters["kv_verify_failures"] += 1
            raise EngineError(
                FailureCode.ENGINE_ERROR,
                f"KV transfer for {msg.request_id!r} failed verification: {exc}",
            ) from None
        self.counters["kv_blocks_verified"] += verified
        return min(verified * block_size, max(0, len(ids) - 1) // block_size * block_size)

    def _media_tokens(self, item: MediaItem) -> int:
        media = self.core.config.media
        count = {"image": media.image_tokens, "audio": media.audio_tokens}.get(item.kind)
        if count is None and item.kind == "video":
            count = media.video_tokens
        if count is None:
            raise EngineError(FailureCode.BAD_REQUEST, f"unknown media kind {item.kind!r}")
        return count

    def _media_key(self, req: EngineRequest[Any], item: MediaItem, index: int) -> str:
        """The item's encoder-cache key: its hash, else a digest of its URL or its tensor."""
        if item.hash:
            return item.hash
        if item.url:
            return hashlib.sha256(item.url.encode()).hexdigest()
        if item.tensor is not None:
            return hashlib.sha256(req.tensor(item.tensor)).hexdigest()
        raise EngineError(
            FailureCode.BAD_REQUEST, f"media[{index}] has no hash, url or tensor to encode"
        )

    def _check_media(self, req: EngineRequest[Any]) -> float:
        """Check the encoder outputs a prefill/merged request brings; returns extra seconds
        (none: the encoder ran elsewhere)."""
        for i, item in enumerate(req.msg.media):
            if not item.hash:
                continue  # raw media for a worker with its own encoder: nothing handed off
            n = self._media_tokens(item)
            if item.tensor is not None:
                got = req.tensor(item.tensor)
                if got != derive_embedding(item.hash, item.kind, n):
                    self.counters["embedding_failures"] += 1
                    raise EngineError(
                        FailureCode.ENGINE_ERROR,
                        f"media[{i}]: the encoder output sent for {item.kind} item "
                        f"{item.hash[:16]}... is not that item's (corrupted hand-off)",
                    )
                self.counters["embeddings_verified"] += 1
            elif self.ec_store is not None:
                try:
                    self.ec_store.require(item.hash, item.kind, n)
                except (EmbeddingError, ValueError) as exc:
                    self.counters["embedding_failures"] += 1
                    raise EngineError(
                        FailureCode.ENGINE_ERROR, f"media[{i}]: encoder cache: {exc}"
                    ) from None
                self.counters["embeddings_verified"] += 1
        return 0.0


def _replace_max_tokens(spec: SamplingSpec, max_tokens: int) -> SamplingSpec:
    return dataclasses.replace(
        spec, max_tokens=max_tokens, min_tokens=min(spec.min_tokens, max_tokens)
    )
