"""Hedged streams: a stream whose first token is late also goes to a second worker.

Why: a merged worker that stalls (a long prefill ahead of it in its queue, preemption, a GC
pause, a sick GPU) turns into the client's time to first token, and no routing decision made
before the request left can see it coming. "The Tail at Scale" (Dean & Barroso) answers with
hedged requests: after a delay near the usual latency's high quantile, send a second copy
elsewhere and keep whichever answers first. For a stream, answering means its first token
(vLLM sends the response head at once, so the head proves nothing); the loser's connection
is closed, which aborts it on its worker (vLLM and SGLang abort on disconnect).

The delay is fixed (``hedging.delay_s``) or adaptive: the ``quantile`` of the model's recent
first-token times at this gateway, so only the slowest ~(1 - quantile) of streams are hedged.
A token bucket caps the hedged share at ``max_ratio`` whatever the delay, and only short
requests (``max_body_bytes``) qualify: repeating a short prompt's prefill is cheap, a 100k-token
one's is not. Only the merged flow over HTTP hedges; the first attempt only (a retry is not
hedged again).

:class:`DelayEstimator` and :class:`Budget` are sans-IO; :meth:`Hedger.race` runs the legs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import trio

from ..admission import with_capacity
from ..config import HedgingConfig
from ..metrics import Counter, Gauge, Metrics
from ..routing.policy import RouteContext
from ..transport.pool import Response, UpstreamError
from ..workers.worker import Worker

if TYPE_CHECKING:
    from ..http.types import Headers
    from ..tracing import LegTrace
    from .request import GatewayRequest
    from .runner import Pipeline


class DelayEstimator:
    """The hedging delay from the last ``window`` first-token times, recomputed every
    ``every`` of them: their ``quantile``, but at least ``median_factor`` times their median.

    Why the median floor: on a fleet whose times are tight (53-56 ms, say), the 0.95 quantile
    is ordinary jitter; a stream late by that much is nearly done, a hedge cannot beat it (a
    fresh leg needs about the median itself) and only spends the budget that a stalled stream
    needed. Past twice the median, the hedge wins whenever the primary would have taken more
    than three times the median: the outliers hedging is for.

    Why not a streaming sketch: a sorted copy of 256 floats every 32 requests is ~1 µs
    amortized per request, exact over its window, and forgets old regimes by construction.
    """

    __slots__ = (
        "_count", "_every", "_next", "_ring", "median_factor", "quantile", "value", "window",
    )  # fmt: skip

    def __init__(
        self, quantile: float, window: int = 256, every: int = 32, median_factor: float = 2.0
    ) -> None:
        self.quantile = quantile
        self.median_factor = median_factor
        self.window = window
        self._every = every
        self._ring: list[float] = []
        self._next = 0
        self._count = 0
        #: the current estimate (nan until the first recompute)
        self.value = math.nan

    @property
    def samples(self) -> int:
        return len(self._ring)

    def observe(self, seconds: float) -> None:
        ring = self._ring
        if len(ring) < self.window:
            ring.append(seconds)
        else:
            ring[self._next] = seconds
            self._next = (self._next + 1) % self.window
        self._count += 1
        if self._count % self._every == 0 or len(ring) < self._every:
            self.recompute()

    def recompute(self) -> None:
        ordered = sorted(self._ring)
        if ordered:
            # nearest-rank quantiles: the value at or below which that share of them lie
            rank = max(1, math.ceil(self.quantile * len(ordered)))
            median = ordered[max(1, math.ceil(0.5 * len(ordered))) - 1]
            self.value = max(ordered[rank - 1], self.median_factor * median)


class Budget:
    """A token bucket: each eligible request adds ``ratio`` of a token, a hedge spends one;
    ``burst`` tokens at most. Over time at most ``ratio`` of requests are hedged."""

    __slots__ = ("burst", "ratio", "tokens")

    def __init__(self, ratio: float, burst: float = 10.0) -> None:
        self.ratio = ratio
        self.burst = max(burst, 1.0)
        self.tokens = 1.0  # the first late stream may hedge

    def earn(self) -> None:
        tokens = self.tokens + self.ratio
        self.tokens = tokens if tokens < self.burst else self.burst

    def spend(self) -> bool:
        if self.tokens >= 1.0 - 1e-9:  # ten earnings of 0.1 are 0.9999999999999999
            self.tokens = max(self.tokens - 1.0, 0.0)
            return True
        return False


class Leg:
    """One worker's attempt in a race: its answer's head and first bytes, or its failure;
    its routing context (a hedge's is its own: :meth:`RouteContext.fork`) and trace."""

    __slots__ = ("ctx", "done", "error", "primary", "resp", "scope", "trace", "worker")

    def __init__(
        self, worker: Worker, ctx: RouteContext, trace: LegTrace | None, primary: bool
    ) -> None:
        self.worker = worker
        self.ctx = ctx
        self.trace = trace
        self.primary = primary
        self.scope = trio.CancelScope()
        self.resp: Response | None = None
        self.error: UpstreamError | None = None
        self.done = False

    @property
    def answered(self) -> bool:
        """A token (or the whole answer) arrived with a success status."""
        return self.resp is not None and self.resp.status < 400


class Hedger:
    """Decides which streams may be hedged and runs their races (one per Pipeline)."""

    def __init__(self, cfg: HedgingConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        self.budget = Budget(cfg.max_ratio)
        self._delays: dict[str, DelayEstimator] = {}
        self.hedges = Counter(
            "lmgw_hedges_total",
            "Hedged streams (a second worker asked after a late first token), by which leg won:"
            " primary, hedge, or failed (both failed).",
            ("model", "outcome"),
        )
        self.skipped = Counter(
            "lmgw_hedges_skipped_total",
            "Late first tokens that were not hedged: budget (hedging.max_ratio spent) or"
            " no_other_worker.",
            ("model", "reason"),
        )
        self.delay_gauge = Gauge(
            "lmgw_hedge_delay_seconds",
            "The adaptive wait for a first token before a stream is hedged: the quantile of"
            " recent first-token times, at least twice their median and min_delay_s (hedging"
            " starts once min_samples were seen).",
            ("model",),
        )
        for metric in (self.hedges, self.skipped, self.delay_gauge):
            metrics.add(metric)

    def _estimator(self, model: str) -> DelayEstimator:
        est = self._delays.get(model)
        if est is None:
            est = self._delays[model] = DelayEstimator(self.cfg.quantile)
        return est

    def observe(self, model: str, seconds: float) -> None:
        """A merged stream's time to its first token (adaptive delay only)."""
        if self.cfg.delay_s:
            return
        est = self._estimator(model)
        est.observe(seconds)
        self.delay_gauge.set((model,), max(est.value, self.cfg.min_delay_s))

    def eligible(self, stream: bool, body_bytes: int) -> bool:
        """Whether a request may be hedged at all: a stream, short enough."""
        return stream and body_bytes <= self.cfg.max_body_bytes

    def would_hedge(self, model: str, stream: bool, body_bytes: int) -> bool:
        """Whether such a request would wait to be hedged now (:meth:`delay` would give a
        delay), without counting it: the compiled lane relays the others."""
        if not self.eligible(stream, body_bytes):
            return False
        if self.cfg.delay_s:
            return True
        est = self._delays.get(model)
        return est is not None and est.samples >= self.cfg.min_samples

    def delay(self, greq: GatewayRequest) -> float | None:
        """How long ``greq`` waits for its first token before a hedge, or None when it is
        not to be hedged (not a stream, too long, or no estimate yet)."""
        cfg = self.cfg
        if not self.eligible(greq.stream, len(greq.body)):
            return None
        self.budget.earn()
        if cfg.delay_s:
            return cfg.delay_s
        est = self._estimator(greq.model)
        if est.samples < cfg.min_samples:
            return None
        return max(est.value, cfg.min_delay_s)

    async def race(
        self,
        pipe: Pipeline,
        greq: GatewayRequest,
        role: str,
        primary: Worker,
        primary_trace: LegTrace | None,
        ctx: RouteContext,
        method: str,
        path: str,
        headers: Headers,
        base_headers: Headers,
        body: bytes,
        delay: float,
    ) -> tuple[Leg, tuple[Worker, ...]]:
        """Send to ``primary``; if no token came within ``delay``, to a second worker too.

        Returns the leg that decides (the first with a token, or a whole answer, in a
        success status; else the last to fail: its ``resp`` or its ``error``) and every leg's
        worker. The caller (``Pipeline.dispatch``) did the primary's accounting and finishes
        the returned leg's; this finishes every other leg's (the loser's connection is
        closed, which aborts its generation)."""
        legs = [Leg(primary, ctx, primary_trace, True)]
        decided = trio.Event()
        winner: list[Leg] = []
        stall_s = pipe.stall_s or math.inf

        def settle(leg: Leg) -> None:
            leg.done = True
            if decided.is_set():
                return
            if leg.answered or all(other.done for other in legs):
                winner.append(leg)
                decided.set()
                for other in legs:
                    if other is not leg:
                        other.scope.cancel()

        async def run(leg: Leg, leg_headers: Headers) -> None:
            with leg.scope:
                try:
                    resp = await pipe.pool.request(
                        leg.worker.origin, method, path, leg_headers, body,
                        response_timeout_s=pipe.response_timeout_s,
                    )  # fmt: skip
                    leg.resp = resp
                    if resp.status < 400:
                        with trio.move_on_after(stall_s) as waited:
                            await resp.wait_body()
                        if waited.cancelled_caught:
                            resp.release()
                            leg.resp = None
                            leg.error = UpstreamError(
                                f"worker sent nothing for {stall_s:g} s", status=504
                            )
                except UpstreamError as exc:
                    leg.resp = None
                    leg.error = exc
            if leg.scope.cancelled_caught and leg.resp is not None and not leg.answered:
                leg.resp.release()  # cancelled while waiting for the first token
                leg.resp = None
            settle(leg)

        model = (greq.model,)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, legs[0], headers)
                with trio.move_on_after(delay):
                    await decided.wait()
                if not decided.is_set():
                    hctx = ctx.fork()
                    second = self._second(pipe, greq, role, primary, hctx)
                    if second is not None:
                        trace = None if greq.trace is None else greq.trace.leg(role, second)
                        leg = Leg(second, hctx, trace, False)
                        legs.append(leg)
                        leg_headers = base_headers if trace is None else trace.headers(base_headers)
                        pipe.registry.acquire(second)
                        pipe.policies[role].on_dispatch(second, hctx)
                        nursery.start_soon(run, leg, leg_headers)
                await decided.wait()
        finally:
            won = winner[0] if winner else None
            for leg in legs:
                if leg is not won:
                    # cancelled from outside (no winner): the caller accounts for the primary
                    account = won is not None or not leg.primary
                    self._finish_loser(pipe, role, leg, account)
        if len(legs) > 1:
            outcome = "failed" if not won.answered else "primary" if won.primary else "hedge"
            self.hedges.inc((*model, outcome))
        return won, tuple(leg.worker for leg in legs)

    def _second(
        self, pipe: Pipeline, greq: GatewayRequest, role: str, primary: Worker, ctx: RouteContext
    ) -> Worker | None:
        """The hedge's worker (the policy's choice among the others), or None (counted)."""
        others = [w for w in pipe.registry.candidates(greq.model, role) if w is not primary]
        if pipe.worker_cap:
            others = with_capacity(others, pipe.worker_cap)
        if not others:
            self.skipped.inc((greq.model, "no_other_worker"))
            return None
        if not self.budget.spend():
            self.skipped.inc((greq.model, "budget"))
            return None
        return pipe.policies[role].choose(others, ctx)

    @staticmethod
    def _finish_loser(pipe: Pipeline, role: str, leg: Leg, account: bool) -> None:
        """Close a losing leg and (``account``) end its accounting: the primary's too when it
        lost, the caller then accounts for the winner."""
        worker = leg.worker
        resp = leg.resp
        if resp is not None:
            resp.release()  # not read to its end: closed, which aborts it upstream
            if resp.status >= 500:
                pipe.registry.record_failure(worker, f"answered {resp.status}", eject=False)
        if leg.error is not None:
            exc = leg.error
            pipe.metrics.upstream_errors.inc((role, worker.id, exc.kind))
            if not exc.local:  # the gateway's own limit is no fault of the worker's
                pipe.registry.record_failure(worker, exc.message, eject=exc.retryable)
        if not account:
            return
        pipe.policies[role].on_finish(worker, leg.ctx, False)
        pipe.registry.release(worker)
        if leg.trace is not None:
            leg.trace.end("hedge lost")


def hedger_for(cfg: HedgingConfig, metrics: Metrics, roles: Mapping[str, object]) -> Hedger | None:
    """The pipeline's hedger, or None when hedging is off or no merged role is routed."""
    if not cfg.enabled or "pd" not in roles:
        return None
    return Hedger(cfg, metrics)
