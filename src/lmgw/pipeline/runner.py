"""The pipeline: runs a request's stages on workers chosen by the role's policy.

The merged ``pd`` flow runs here (one stage, the fast path); the multi-stage flows run in
:mod:`.disagg`, which uses :meth:`Pipeline.dispatch` for the client-facing leg. Retries happen
only before any byte reached the client and only for failures that cannot have started work on
the worker (connection refused, stale socket, 503 from the worker).
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import trio

from ..admission import with_capacity, worker_capacity_error
from ..config import (
    ROLE_NAMES,
    ConfigError,
    GatewayConfig,
    WorkerConfig,
    infer_flow,
    is_native_url,
)
from ..errors import DECODE_ERRORS, GatewayError, sse_error_event
from ..http.types import Responder
from ..metrics import Metrics
from ..routing.placement import Placement, in_zone_of, zoned
from ..routing.policy import Policy, RouteContext, RouteInfo, route_header
from ..transport import openai_http
from ..transport.dialects import Dialect, Peer, get_dialect
from ..transport.pool import ConnectionPool, Origin, Response, ResponseParts, UpstreamError
from ..workers.registry import Registry
from ..workers.worker import Worker
from . import migration
from .disagg import DisaggRunner, EncodedItems
from .hedge import hedger_for
from .local_prefill import LocalPrefill, LocalQueues
from .native import NativeRunner
from .request import Gate, GatewayRequest, MidStream
from .warm import PrefixWarmer, warmup_counter

log = logging.getLogger("lmgw.pipeline")

REPLAY_TIMEOUT_S = 2.0
"""A broken constrained stream whose partial answer takes longer to replay through its
grammar is not continued (the stream ends with an error event): it would only grow later."""
_now = time.perf_counter


_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_CACHED_TOKENS = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')

#: policies whose key is the session (X-Session-Id or the user field)
_SESSION_POLICIES = frozenset({"consistent_hash", "consistent_hash_bounded", "session_affinity"})


def _chain(
    first: Callable[[bytes], bytes] | None, then: Callable[[bytes], bytes] | None
) -> Callable[[bytes], bytes] | None:
    """Two byte rewrites applied in order (either may be None)."""
    if first is None or then is None:
        return first or then
    return lambda data: then(first(data))


#: the dialect a model gets when config leaves ``dialect`` at its default ("openai")
DEFAULT_DIALECT = {"pd": "openai", "p/d": "vllm-nixl", "e+pd": "vllm-epd", "e+p+d": "vllm-epd"}


def dialect_for(flow: str, name: str, where: str) -> Dialect | None:
    """The dialect object for a (flow, dialect name), None for merged OpenAI pass-through.

    Raises ValueError (a start-up error) when the dialect cannot run the flow."""
    name = DEFAULT_DIALECT[flow] if name == "openai" else name
    dialect = get_dialect(name)
    if flow not in dialect.flows:
        raise ValueError(
            f"{where}: dialect {name!r} cannot run flow {flow!r}"
            f" (it runs {', '.join(sorted(dialect.flows))})"
        )
    return None if name == "openai" else dialect


class Pipeline:
    def __init__(
        self,
        cfg: GatewayConfig,
        registry: Registry,
        pool: ConnectionPool,
        policies: Mapping[str, Policy],
        metrics: Metrics,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.policies = policies
        self.metrics = metrics
        self.max_attempts = cfg.upstream.max_attempts
        #: upstream.express_lane; requests it took (read at scrape time)
        self.express_lane = cfg.upstream.express_lane
        self.express_served = 0
        metrics.express.collect = lambda: [((), float(self.express_served))]
        self.migrations = cfg.upstream.migrate_streams
        self.route_header = cfg.routing.route_header
        #: some policy learns from usage or predicts cached tokens: tap answers for usage
        self.audits = any(
            type(p).on_usage is not Policy.on_usage
            or type(p).predicted_cached_tokens is not Policy.predicted_cached_tokens
            for p in policies.values()
        )
        #: roles whose policy wants to hear when a stream's first token arrives
        self.first_token_roles = frozenset(
            role
            for role, p in policies.items()
            if type(p).on_first_token is not Policy.on_first_token
        )
        #: some role's policy routes on the prompt or the session: the API fills greq.route
        self.route_keys = any(  # (encoders route each item by its own hash: not here)
            p.needs_tokens or p.name in _SESSION_POLICIES
            for role, p in policies.items()
            if role != "e"
        )
        self.retry_backoff_s = cfg.upstream.retry_backoff_s
        self.stall_s = cfg.upstream.stream_stall_timeout_s or None
        # A time-to-headers limit looser than the whole-request deadline would never fire:
        # skip its cancel scope then (one fewer per request).
        deadline = cfg.limits.request_timeout_s or math.inf
        rt = cfg.upstream.response_timeout_s
        self.response_timeout_s = rt if rt < deadline else math.inf
        self.flows = {m.name: m.flow for m in cfg.models}
        # models whose workers speak the native ZeroMQ protocol run in .native
        self.native = NativeRunner(self, cfg)
        # per model: the dialect when the flow is not plain merged OpenAI (None: the fast path)
        self.dialects: dict[str, Dialect | None] = {
            m.name: dialect_for(m.flow, m.dialect, f"model {m.name!r}")
            for m in cfg.models
            if m.name not in self.native.models
        }
        #: conditional disaggregation: per model, when a decode worker prefills a request
        #: itself (models[].local_prefill_tokens, models[].local_prefill_busy)
        self.local_prefill: dict[str, LocalPrefill] = {}
        for i, m in enumerate(cfg.models):
            if m.local_prefill_tokens or m.local_prefill_busy:
                dialect = self.dialects.get(m.name)
                if m.flow not in ("p/d", "e+p+d") or dialect is None or not dialect.local_prefill:
                    key = "tokens" if m.local_prefill_tokens else "busy"
                    raise ConfigError(
                        "only p/d and e+p+d flows whose decode workers prefill on their own"
                        " (vllm-nixl, vllm-lmcache, vllm-epd) take it, not"
                        f" {m.flow} with {m.dialect}",
                        path=f"models[{i}].local_prefill_{key}",
                    )
                self.local_prefill[m.name] = LocalPrefill(
                    m.local_prefill_tokens, m.local_prefill_busy
                )
        #: the decode workers' unfinished local prefills, when some model deflects under load
        self.local_queues = (
            LocalQueues() if any(r.busy for r in self.local_prefill.values()) else None
        )
        # models not in [[models]] (reported by workers): routing.flow, else what the roles say
        roles = {w.role for w in cfg.workers}
        try:
            inferred = infer_flow(roles) if roles else "pd"
        except ConfigError:
            inferred = "pd"
        self.default_flow = cfg.routing.flow or inferred
        self.default_dialect = (
            None
            if self.native.default
            else dialect_for(self.default_flow, cfg.routing.dialect, "routing")
        )
        media = cfg.media
        self.disagg = DisaggRunner(
            self, EncodedItems(media.encoder_cache_ttl_s, media.encoder_cache_entries)
        )
        self._check_workers(cfg)
        #: limits.max_in_flight_per_worker (0: off), applied in pick()
        self.worker_cap = cfg.limits.max_in_flight_per_worker
        #: first choices per role (lmgw_routing_decisions_total for policies without reasons)
        self.picks = dict.fromkeys(policies, 0)
        #: hedged streams (hedging.enabled): None when off, one attribute test per stream
        self.hedger = hedger_for(cfg.hedging, metrics, policies)
        #: routing.cache_aware_replicas > 1: background prefills on a hot prefix's next holder
        #: (the gateway runs it); None when off, one attribute test per request
        self.warmer: PrefixWarmer | None = None
        warmups = warmup_counter(metrics)
        if cfg.routing.cache_aware_replicas > 1:
            self.warmer = PrefixWarmer(warmups)
        #: routing.lora_affinity: a request's context names its LoRA adapter (the gateway
        #: sets ``is_lora``: whether a model is an adapter)
        self.lora_affinity = cfg.routing.lora_affinity
        self.is_lora: Callable[[str], bool] = lambda model: False
        #: routing.placement = "joint": P/D pairs by estimated TTFT (used when workers name
        #: zones); None: each stage's policy alone
        self.placement: Placement | None = None
        self._zoned_for: tuple[Sequence[Worker], Sequence[Worker], bool] | None = None
        rc = cfg.routing
        if rc.placement == "joint":
            per_model = {
                m.name: m.kv_bytes_per_token for m in cfg.models if m.kv_bytes_per_token is not None
            }
            self.placement = Placement(
                same_zone_gbps=rc.kv_gbps_same_zone,
                cross_zone_gbps=rc.kv_gbps_cross_zone,
                prefill_tokens_per_s=rc.prefill_tokens_per_s,
                bounded_load_factor=rc.bounded_load_factor,
                kv_bytes_per_token=lambda model: per_model.get(model, rc.kv_bytes_per_token),
            )
            pl = self.placement
            metrics.placement_speed.collect = lambda: [((m,), v) for m, v in pl.speed.items()]
            metrics.placement_queued.collect = lambda: [
                ((w,), float(n)) for w, n in sorted(pl.queued.items())
            ]

    def _check_workers(self, cfg: GatewayConfig) -> None:
        """Refuse to start with a configured worker that a model's dialect cannot name on the
        wire (e.g. a P2P NCCL worker without its KV address): every request would fail."""
        for wc in cfg.workers:
            self.check_worker(wc)

    def check_worker(self, wc: WorkerConfig) -> None:
        """Raise ValueError when a dialect of the models ``wc`` serves cannot name it on the
        wire (used at start and by the admin API before adding a worker)."""
        if is_native_url(wc.url):
            return  # named by its channel; native_models() checked its models at start
        if wc.models:
            dialects = [self.dialects.get(m, self.default_dialect) for m in wc.models]
        else:  # serves whatever it reports: every configured dialect may reach it
            dialects = [*self.dialects.values(), self.default_dialect]
        origin = Origin.from_url(wc.url)
        peer = Peer(origin.host, origin.port, wc.kv_address, wc.bootstrap_port)
        for dialect in dialects:
            problem = dialect.peer_problem(wc.role, peer) if dialect else None
            if problem is not None:
                raise ValueError(f"worker {wc.worker_id}: {problem}")

    def route_of(self, greq: GatewayRequest) -> RouteContext:
        """The routing context of a request the API gave none (no policy routes on its
        prompt or session): its model, and its LoRA adapter when affinity routes on it."""
        return self.context(greq.model, greq.request_id)

    def context(self, model: str, request_id: str) -> RouteContext:
        """The routing context of a request to ``model`` with nothing else to route on."""
        lora = model if self.lora_affinity and self.is_lora(model) else None
        return RouteContext(model, request_id, lora=lora)

    def express_for(self, model: str) -> bool:
        """Whether a plain non-streamed request to ``model`` may take the express lane
        (:mod:`.express`): workers over HTTP, merged or P/D (also E+P+D, for requests
        without media) in a sequential dialect whose decode retries may keep the hand-off
        (vllm-nixl, vllm-lmcache, vllm-epd), and nothing that taps or adds to the exchange
        (prefix warming, usage audits, the route header)."""
        if self.audits or self.route_header:
            return False
        return self.lane_for(model, compiled=False)

    def lane_for(self, model: str, compiled: bool = True) -> bool:
        """:meth:`express_for` for the compiled lane (:mod:`lmgw.api.lane`), which reads
        usage for the audits and adds the route header itself, runs the legs of a concurrent
        dialect (SGLang) at once, and restarts a pair whose decode leg failed with a hand-off
        that names it (P2P NCCL, SGLang). ``compiled``: False for the express lane on trio,
        which does neither."""
        if not self.express_lane or self.warmer is not None:
            return False
        if self.native.handles(model):
            return False
        dialect = self.dialect_of(model)
        if dialect is None:
            return True
        if self.flows.get(model, self.default_flow) not in ("p/d", "e+p+d"):
            return False  # (e+p+d: the API sends only requests without media: no E stage)
        return compiled or (
            not dialect.concurrent_prefill_decode and dialect.decode_retry_keeps_handoff
        )

    def dialect_of(self, model: str) -> Dialect | None:
        """The dialect of ``model``'s flow; None for merged workers spoken to in plain OpenAI."""
        return self.dialects[model] if model in self.flows else self.default_dialect

    def pick(self, model: str, role: str, ctx: RouteContext, near: Worker | None = None) -> Worker:
        """The role's policy's choice among the routable workers of ``model``; 503 if none.
        ``near``: with joint placement, among those in that worker's zone when there are any
        (a prefill for a decode worker chosen first)."""
        candidates = self._routable(model, role)
        if near is not None and self.placement is not None:
            candidates = in_zone_of(candidates, near)
        self.picks[role] += 1
        return self.policies[role].choose(candidates, ctx)

    def _routable(self, model: str, role: str) -> Sequence[Worker]:
        """The routable workers of ``model`` for ``role`` with room (503 if none)."""
        candidates: Sequence[Worker] = self.registry.candidates(model, role)
        if not candidates:
            raise GatewayError(
                503,
                f"no healthy {ROLE_NAMES[role]} worker available for model {model!r}",
            )
        if candidates.panic:  # every one ejected: those whose probe passes (health.panic_routing)
            self.metrics.panic_routes.inc((role,))
        if self.worker_cap:  # off: not even a scan of the cached tuple
            candidates = with_capacity(candidates, self.worker_cap)
            if not candidates:
                raise worker_capacity_error(model, ROLE_NAMES[role], self.worker_cap, self.metrics)
        return candidates

    def place(self, model: str, ctx: RouteContext, body_bytes: int) -> tuple[Worker, Worker]:
        """A P/D request's prefill and decode workers: as one pair by estimated time to first
        token when the workers name zones and ``routing.placement`` is joint
        (:mod:`lmgw.routing.placement`), else each stage's policy's choice."""
        prefills = self._routable(model, "p")
        decodes = self._routable(model, "d")
        self.picks["p"] += 1
        self.picks["d"] += 1
        policy = self.policies["p"]
        preferred = policy.choose(prefills, ctx)
        placement = self.placement
        if placement is None or not self._zoned(prefills, decodes):
            return preferred, self.policies["d"].choose(decodes, ctx)
        tokens = len(ctx.tokens) if ctx.tokens is not None else body_bytes // 4
        hits = policy.predicted_cached_by_worker(prefills, ctx)
        pair = placement.choose(model, prefills, decodes, tokens, hits, preferred)
        cached = hits.get(pair.prefill.id, 0)
        placement.dispatched(ctx, pair, tokens, cached)
        same = pair.prefill.zone == pair.decode.zone
        if self.route_header:
            ctx.memo()[RouteInfo] = RouteInfo(
                "joint",
                pair.decode.id,
                f"prefill {pair.prefill.id} ({pair.prefill.zone}) est"
                f" {1e3 * pair.prefill_s:.1f} ms, kv {1e3 * pair.transfer_s:.1f} ms"
                f" to {pair.decode.zone}",
                cached,
                tokens,
            )
        self.metrics.placements.inc((model, "same_zone" if same else "cross_zone"))
        return pair.prefill, pair.decode

    def _zoned(self, prefills: Sequence[Worker], decodes: Sequence[Worker]) -> bool:
        """:func:`zoned`, remembered for the last candidate tuples (the registry's, unchanged
        until the fleet changes)."""
        last = self._zoned_for
        if last is not None and last[0] is prefills and last[1] is decodes:
            return last[2]
        found = zoned(prefills, decodes)
        self._zoned_for = (prefills, decodes, found)
        return found

    async def run(self, greq: GatewayRequest, responder: Responder) -> None:
        """Run the request's flow: merged ``pd`` here, multi-stage flows in :mod:`.disagg`."""
        if self.native.handles(greq.model):  # native (zmq+) workers: every flow in .native
            await self.native.run(greq, responder)
            return
        flow = self.flows.get(greq.model)
        if flow is None:
            flow, dialect = self.default_flow, self.default_dialect
        else:
            dialect = self.dialects[greq.model]
        if dialect is not None and not greq.merged_only:
            await self.disagg.run(greq, responder, flow, dialect)
            return
        role = "pd"
        ctx = greq.route or self.route_of(greq)
        worker = self.pick(greq.model, role, ctx)
        if self.warmer is not None:  # a hot prefix's next holder (routing.cache_aware_replicas)
            target = self.policies[role].warm_target(ctx)
            if target is not None:
                self.warmer.submit(self, greq, target, ctx)
        journal = migration.Journal(greq.endpoint) if greq.stream and self.migrations else None
        hedge = None if self.hedger is None else self.hedger.delay(greq)
        await self.attempts(greq, responder, ctx, worker, journal, hedge)

    async def attempts(
        self,
        greq: GatewayRequest,
        responder: Responder,
        ctx: RouteContext,
        worker: Worker,
        journal: list[bytes] | None = None,
        hedge: float | None = None,
        failure: GatewayError | None = None,
    ) -> None:
        """The merged flow's attempts: on ``worker``, then on others while a failure leaves
        the request to retry. ``failure``: the first attempt already ran (the express lane,
        :mod:`.express`) and failed so."""
        role = "pd"
        last = self.max_attempts - 1
        tried: tuple[Worker, ...] = ()  # the empty tuple: no allocation on the success path
        for attempt in range(self.max_attempts):
            if attempt or failure is None:
                failure = await self.dispatch(
                    greq, responder, role, worker, ctx, attempt < last,
                    greq.path, greq.forward_headers, greq.body, None, journal, hedge=hedge,
                )  # fmt: skip
                hedge = None  # the first attempt only
                if failure is None:
                    return
            # the attempt's workers: a hedged one may have had two (dispatch sets them)
            tried += failure.workers or (worker,)
            if isinstance(failure, MidStream):
                await self.continue_stream(greq, responder, role, ctx, tried, journal)
                return
            # A failure that cannot have started work: another worker, if there is one left;
            # else the client hears what went wrong (not just "no worker left").
            candidates = [w for w in self.registry.candidates(greq.model, role) if w not in tried]
            if not candidates:
                raise failure
            worker = self.policies[role].choose(candidates, ctx)
            self.metrics.retries.inc((role,))
            log.info("request %s: retrying on %s after %s", greq.request_id, worker.id, failure,
                     extra={"request_id": greq.request_id, "worker": worker.id})  # fmt: skip
            await self.backoff(attempt)

    async def run_pinned(
        self, greq: GatewayRequest, responder: Responder, worker: Worker, method: str = "POST"
    ) -> None:
        """Run a merged request on ``worker`` and nowhere else: a Responses API follow-up that
        only the worker which stored the response can answer. No retry elsewhere (another
        worker would answer 404) and no continuation; a failure is the client's answer."""
        ctx = greq.route or self.route_of(greq)
        await self.dispatch(
            greq, responder, "pd", worker, ctx, False, greq.path, greq.forward_headers,
            greq.body, method=method,
        )  # fmt: skip

    def audit_tap(
        self, policy: Policy, worker: Worker, ctx: RouteContext, model: str
    ) -> Callable[[bytes], bytes] | None:
        """A tap on the answer's bytes that reads the worker's usage (prompt and cached
        tokens) for the policy's ``on_usage`` and the routing precision audit. Reads only:
        a bytes search per chunk, a regex on the one that carries usage."""
        predicted = policy.predicted_cached_tokens(worker, ctx)
        metrics = self.metrics
        labels = (model,)
        done = False

        def tap(data: bytes) -> bytes:
            nonlocal done
            if done or b'"prompt_tokens"' not in data:
                return data
            m = _PROMPT_TOKENS.search(data)
            if m is None:
                return data
            done = True
            c = _CACHED_TOKENS.search(data)
            cached = int(c.group(1)) if c else None
            policy.on_usage(worker, ctx, int(m.group(1)), cached)
            if predicted is not None and cached is not None:
                metrics.routing_predicted.inc(labels, predicted)
                metrics.routing_reported.inc(labels, cached)
                metrics.routing_matched.inc(labels, min(predicted, cached))
                total = metrics.routing_predicted.values.get(labels, 0.0)
                if total:
                    matched = metrics.routing_matched.values.get(labels, 0.0)
                    metrics.routing_precision.set(labels, matched / total)
            return data

        return tap

    async def next_leg(
        self, endpoint: str, obj: Any, progress: migration.Progress, *, aliases: bool = True
    ) -> tuple[bytes | None, str | None]:
        """:func:`migration.next_leg`, with a long constrained partial answer replayed in a
        worker thread (CPU-bound: the event loop keeps serving) and given up after
        ``REPLAY_TIMEOUT_S``."""
        rest = None
        text = progress.text
        if len(text) > migration.INLINE_REPLAY_CHARS and migration.replays(obj, text):
            with trio.move_on_after(REPLAY_TIMEOUT_S):
                rest = await trio.to_thread.run_sync(
                    migration.rest_constraint, endpoint, obj, text, abandon_on_cancel=True
                )
            if rest is None:
                rest = (None, f"replaying the partial answer took over {REPLAY_TIMEOUT_S:g} s")
        return migration.next_leg(endpoint, obj, progress, aliases=aliases, rest=rest)

    async def backoff(self, attempt: int) -> None:
        """The pause before retry ``attempt + 1``: exponential, jittered (see the config)."""
        base = self.retry_backoff_s
        if base:
            await trio.sleep(base * 2**attempt * (0.5 + random.random()))

    async def continue_stream(
        self,
        greq: GatewayRequest,
        responder: Responder,
        role: str,
        ctx: RouteContext,
        tried: tuple[Worker, ...],
        journal: list[bytes] | None,
    ) -> None:
        """A stream broke after the client got part of it: continue it on another worker
        (:mod:`.migration`), at most ``upstream.migrate_streams`` times, or end it with an SSE
        error event and ``[DONE]`` when it cannot be continued."""
        endpoint = greq.endpoint
        progress = migration.progress_of(journal or [], endpoint)
        try:
            obj = msgspec.json.decode(greq.body)
        except DECODE_ERRORS:
            obj = None
        reason = f"the stream broke {self.migrations + 1} times"
        for _ in range(self.migrations):
            body, refusal = await self.next_leg(endpoint, obj, progress)
            if body is None:
                reason = refusal or "not continued"
                break
            outcome = await self._continuation(greq, responder, role, ctx, tried, body, progress)
            if outcome is None:
                self.metrics.migrations.inc((role, "continued"))
                return
            if isinstance(outcome, str):  # no worker took it
                reason = outcome
                break
            tried, more = outcome
            progress = migration.extend(progress, migration.progress_of(more, endpoint))
        await self.end_broken_stream(responder, role, reason)

    async def _continuation(
        self,
        greq: GatewayRequest,
        responder: Responder,
        role: str,
        ctx: RouteContext,
        tried: tuple[Worker, ...],
        body: bytes,
        progress: migration.Progress,
    ) -> tuple[tuple[Worker, ...], list[bytes]] | str | None:
        """One continuation of a broken stream: None when it finished the stream; the
        workers tried and what it relayed when it broke too; why not (a str) when no worker
        took it. A worker that refuses it before its first byte (an error status, a failed
        connection) is like one refusing a first attempt: another worker gets it, up to
        ``upstream.max_attempts`` in all."""
        endpoint = greq.endpoint
        reason = "no other worker"
        for _ in range(self.max_attempts):
            others = [w for w in self.registry.candidates(greq.model, role) if w not in tried]
            if not others:
                return reason
            worker = self.policies[role].choose(others, ctx)
            tried = (*tried, worker)
            log.warning(
                "request %s: stream broke after %d tokens; continuing on %s",
                greq.request_id, progress.tokens, worker.id,
                extra={"request_id": greq.request_id, "worker": worker.id},
            )  # fmt: skip
            more = migration.Journal(endpoint)
            failure = await self.dispatch(
                greq, responder, role, worker, ctx, True, greq.path, greq.forward_headers,
                body, None, more, migration.Splice(endpoint, progress),
            )  # fmt: skip
            if failure is None:
                return None
            if more:  # it relayed part of the rest, then broke as well
                return tried, more
            reason = failure.message
        return reason

    async def end_broken_stream(self, responder: Responder, role: str, reason: str) -> None:
        """A broken stream that is not continued ends with an SSE error event and [DONE]."""
        self.metrics.migrations.inc((role, "failed"))
        if not getattr(responder, "broken", False):
            await responder.send(
                sse_error_event(502, f"worker stream failed and was not continued: {reason}")
            )
            await responder.end()

    async def dispatch(
        self,
        greq: GatewayRequest,
        responder: Responder,
        role: str,
        worker: Worker,
        ctx: RouteContext,
        may_retry: bool,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        gate: Gate | None = None,
        journal: list[bytes] | None = None,
        splice: Callable[[bytes], bytes] | None = None,
        method: str = "POST",
        hedge: float | None = None,
    ) -> GatewayError | None:
        """Run the client-facing leg on ``worker`` and relay its answer. Returns the error
        when the caller should retry on another worker (only before anything reached the
        client), else None: after a 5xx answer, a connection that failed before anything was
        sent, or the worker's ejection while waiting for its answer.

        ``gate``, when given, is awaited once the worker's answer has begun and before any of
        it is relayed; it returns the rewrite to apply to the answer (a dialect merging the
        prefill's output into decode's), or None.

        ``journal`` (streams that may migrate) collects the relayed chunks; a stream that
        breaks after its head reached the client then returns :class:`MidStream` instead of
        ending the client's stream, so the caller can continue it elsewhere. ``splice``
        rewrites a continuation's events into the client's stream (its head already sent).
        ``method``: a pass-through read (``GET /v1/responses/{id}``) is not a POST. ``hedge``:
        seconds to wait for the first token before the stream also goes to a second worker
        (:mod:`.hedge`; the winner then takes ``worker``'s place)."""
        registry, policy, metrics = self.registry, self.policies[role], self.metrics
        leg = None if greq.trace is None else greq.trace.leg(role, worker)
        base_headers = headers
        if leg is not None:
            headers = leg.headers(headers)
        registry.acquire(worker)  # also counts lmgw_worker_requests_total
        policy.on_dispatch(worker, ctx)
        ok = False
        labels = (role, worker.id)
        t0 = _now()
        legs: tuple[Worker, ...] = (worker,)  # the workers this attempt used (hedged: two)
        try:
            # (a worker ejected meanwhile makes this fail at once, retryable: pool.abort)
            resp: Response | ResponseParts
            if hedge is None:  # a whole small answer comes as its parts (see ConnectionPool)
                resp = await self.pool.request(
                    worker.origin,
                    method,
                    path,
                    headers,
                    body,
                    response_timeout_s=self.response_timeout_s,
                    whole=not greq.stream,
                )
            else:
                won, legs = await self.hedger.race(
                    self, greq, role, worker, leg, ctx, method, path, headers, base_headers,
                    body, hedge,
                )  # fmt: skip
                worker, ctx, leg = won.worker, won.ctx, won.trace  # the winner's, from now on
                labels = (role, worker.id)
                if won.resp is None:
                    raise won.error
                resp = won.resp
            failure = await self.answer(
                greq, responder, resp, role, worker, ctx, legs, may_retry, t0, gate, journal,
                splice,
            )  # fmt: skip
            if failure is not None:
                return failure
            ok = True
        except UpstreamError as exc:
            return self.failed(exc, responder, role, worker, legs, may_retry, journal)
        finally:
            metrics.stage.observe(labels, _now() - t0)
            policy.on_finish(worker, ctx, ok)
            registry.release(worker)
            if leg is not None:
                leg.end(None if ok else "failed")
        registry.record_success(worker)
        return None

    async def dispatch_whole(
        self,
        responder: Responder,
        role: str,
        worker: Worker,
        ctx: RouteContext,
        may_retry: bool,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        request_id: str,
        make_greq: Callable[[], GatewayRequest],
        timing: bytes | None = None,
    ) -> GatewayError | None:
        """The express lane's attempt (:mod:`.express`): :meth:`dispatch`'s accounting and
        outcome for a non-streamed leg (None when answered, else the failure to retry; the
        client's errors raised), a whole answer below 400 taken in one read written at once
        (``timing``: its ``Server-Timing``), anything else relayed by :meth:`answer`.
        ``make_greq`` builds the request object only when the general code needs it."""
        registry, policy = self.registry, self.policies[role]
        registry.acquire(worker)  # also counts lmgw_worker_requests_total
        policy.on_dispatch(worker, ctx)
        ok = False
        failure = None
        t0 = _now()
        try:
            got = await self.pool.request(
                worker.origin, "POST", path, headers, body,
                response_timeout_s=self.response_timeout_s, whole=True,
            )  # fmt: skip
            if isinstance(got, tuple):
                status, _, ctype, _, answer = got
                out = [(b"x-request-id", request_id.encode())]
                if timing:
                    out.append((b"server-timing", timing))
                await openai_http.send_json(responder, status, ctype, answer, out)
                ok = True
            else:
                failure = await self.answer(
                    make_greq(), responder, got, role, worker, ctx, (worker,), may_retry, t0
                )
                ok = failure is None
        except UpstreamError as exc:
            failure = self.failed(exc, responder, role, worker, (worker,), may_retry)
        finally:
            self.metrics.stage.observe((role, worker.id), _now() - t0)
            policy.on_finish(worker, ctx, ok)
            registry.release(worker)
        if ok:
            registry.record_success(worker)
        return failure

    async def answer(
        self,
        greq: GatewayRequest,
        responder: Responder,
        resp: Response | ResponseParts,
        role: str,
        worker: Worker,
        ctx: RouteContext,
        legs: tuple[Worker, ...],
        may_retry: bool,
        t0: float,
        gate: Gate | None = None,
        journal: list[bytes] | None = None,
        splice: Callable[[bytes], bytes] | None = None,
    ) -> GatewayError | None:
        """Relay a worker's answer whose head has arrived (see :meth:`dispatch`; ``t0``: when
        the request left for the worker), or a whole one taken in one read (its parts: a
        status below 400); a 5xx that may go to another worker is returned, other errors
        raised. Releases ``resp``."""
        metrics, policy = self.metrics, self.policies[role]
        labels = (role, worker.id)
        whole = isinstance(resp, tuple)
        try:
            if not whole and resp.status >= 400:
                err = await openai_http.read_error(resp, worker)
                if resp.status >= 500:
                    self.registry.record_failure(worker, err.message, eject=False)
                    if may_retry:  # nothing reached the client: another worker may serve it
                        err.workers = legs
                        return err
                raise err
            if gate is not None:
                rewrite = await gate()
            elif greq.tap is not None:  # a pass-through answer read as it passes
                rewrite = greq.tap(worker)
            else:
                rewrite = None
            out = [(b"x-request-id", greq.request_id.encode())]
            if greq.timings:
                out.append((b"server-timing", greq.server_timing()))
            if self.route_header:
                out.append((b"x-lmgw-route", route_header(policy, worker, ctx)))
            audit = self.audit_tap(policy, worker, ctx, greq.model) if self.audits else None
            if not whole and greq.stream and resp.content_type.startswith(b"text/event-stream"):
                hook = role in self.first_token_roles
                local = self.local_queues if role == "d" else None  # a local leg's prefill
                hedger = self.hedger if role == "pd" and splice is None else None
                t_first = 0.0

                def first_byte() -> None:
                    nonlocal t_first
                    t_first = _now()
                    if splice is None:  # a continuation's first byte is not the TTFT
                        metrics.ttft.observe((greq.model,), t_first - greq.t_start)
                    metrics.stage_ttft.observe(labels, t_first - t0)
                    if hook:  # this leg's prefill is over
                        policy.on_first_token(worker, ctx)
                    if local is not None:
                        local.first_token(ctx)
                    if hedger is not None:  # the adaptive hedging delay's sample
                        hedger.observe(greq.model, t_first - t0)

                events_fix = _chain(audit, splice or (rewrite and rewrite.events))
                if greq.output is not None:  # after the splice: one parse state throughout
                    events_fix = _chain(events_fix, greq.output.events)
                events = await openai_http.relay_sse(
                    resp, responder, out, first_byte, events_fix, journal, self.stall_s,
                )  # fmt: skip
                if events > 1:
                    tpot = (_now() - t_first) / (events - 1)
                    metrics.stage_tpot.observe(labels, tpot)
                    if splice is None:
                        metrics.tpot.observe((greq.model,), tpot)
            else:
                body_fix = _chain(audit, rewrite.body if rewrite else None)
                body_fix = _chain(body_fix, greq.usage_fill)
                if greq.output is not None:
                    body_fix = _chain(body_fix, greq.output.body)
                if whole:
                    status, _, ctype, _, data = resp
                    await openai_http.send_json(responder, status, ctype, data, out, body_fix)
                else:
                    await openai_http.relay_json(resp, responder, out, body_fix)
        finally:
            if not whole:
                resp.release()
        return None

    def failed(
        self,
        exc: UpstreamError,
        responder: Responder,
        role: str,
        worker: Worker,
        legs: tuple[Worker, ...],
        may_retry: bool,
        journal: list[bytes] | None = None,
    ) -> GatewayError | None:
        """An exchange with ``worker`` that failed (see :meth:`dispatch`): the error to retry
        with, a :class:`MidStream` to continue, or None (the stream carries the error);
        raised when the client is to hear it."""
        self.metrics.upstream_errors.inc((role, worker.id, exc.kind))
        if not exc.local:  # the gateway's own limit is no fault of the worker's
            self.registry.record_failure(worker, exc.message, eject=exc.retryable)
        if responder.started:
            if journal is not None:  # the caller continues the stream or ends it
                broken = MidStream(exc.status, exc.message)
                broken.workers = (worker,)  # the one whose stream broke (a hedge's winner)
                return broken
            return None  # the stream already carries the error event
        # nothing reached the client: another worker may take the whole request, unless
        # this one merely timed out (a retry would double the load of a slow fleet)
        if may_retry and not exc.local and (exc.retryable or exc.status != 504):
            retry = GatewayError(exc.status, exc.message)
            retry.workers = legs
            retry.delivered = exc.sent
            return retry
        raise GatewayError(exc.status, exc.message) from None
