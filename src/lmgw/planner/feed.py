"""The planner's feed: every half second, the requests in flight on each worker; every second,
the latencies the pipeline recorded since (the per-worker leg histograms of
:class:`~lmgw.metrics.Metrics`, so no request pays for the planner); every ``EVALUATE_S``,
the plans (:class:`lmgw.planner.core.Planner`), exported as metrics and on ``GET
/admin/planner``, and logged when a recommendation changes.

Workers are planned in pools: those of one role that serve the same models (what one
Deployment of an autoscaler runs). A worker whose models are not known yet serves any
(``*``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

import trio

from ..config import PlannerConfig
from ..metrics import Gauge, Histogram, Metrics
from ..workers.registry import Registry
from ..workers.worker import Worker
from .core import Planner, Pool, RolePlan, Signal, level_of

log = logging.getLogger("lmgw")

#: seconds between in-flight samples, and samples per latency read
TICK_S = 0.5
SAMPLES_PER_READ = 2
#: seconds between plans
EVALUATE_S = 5.0


def waiting_for(pool: Pool, queued: Mapping[str | None, int]) -> int:
    """The admission queue's requests that ``pool`` would serve: those naming one of its
    models, and those naming none (the gateway's one model); a ``*`` pool serves any."""
    models = pool[1]
    if models == "*":
        return sum(queued.values())
    served = models.split(",")
    return sum(n for model, n in queued.items() if model is None or model in served)


def pool_of(worker: Worker) -> Pool:
    """The pool a worker is planned in: its role and the models it serves."""
    models = worker.models
    return worker.role, "*" if models is None else ",".join(sorted(models))


class PlannerFeed:
    """Owns a :class:`Planner` for one gateway: what it reads, and the plans it last gave."""

    def __init__(self, cfg: PlannerConfig, registry: Registry, metrics: Metrics) -> None:
        self.cfg = cfg
        self.registry = registry
        self.planner = Planner(cfg.window_s, cfg.scale_down_delay_s)
        ttft, itl = cfg.ttft_slo_s, cfg.itl_slo_s
        #: role -> (signal name, the histogram it reads by (role, worker id), its target)
        self._specs: dict[str, list[tuple[str, Histogram, float]]] = {
            "e": [("ttft", metrics.stage, ttft)],  # an encode leg's whole time
            "p": [("ttft", metrics.stage, ttft)],  # a prefill leg's (queue + compute)
            "pd": [("ttft", metrics.stage_ttft, ttft), ("itl", metrics.stage_tpot, itl)],
            # a decode stream's first token: the KV transfer and the decode engine's own queue
            "d": [("ttft", metrics.stage_ttft, ttft), ("itl", metrics.stage_tpot, itl)],
        }
        self._signals: dict[Pool, list[tuple[Signal, Histogram]]] = {}
        #: (worker id, signal name) -> that worker's bucket counts at the last read
        self._last: dict[tuple[str, str], list[int]] = {}
        self._held: dict[str, float] = {}  # worker id -> in flight summed over the samples
        self._samples = 0
        #: requests waiting in the gateway's admission queue, by the model they name (None:
        #: none named); set by the gateway (lmgw.admission.Admission.waiting_by_model)
        self.queued: Mapping[str | None, int] = {}
        self.plans: dict[Pool, RolePlan] = {}
        labels = ("role", "models")
        metrics.add(Gauge(
            "lmgw_planner_desired_workers",
            "Workers the planner recommends for each pool (the workers of one role serving the"
            " same models) to meet planner.ttft_slo_s and planner.itl_slo_s at the load of the"
            " last planner.window_s (for an autoscaler).",
            labels, collect=lambda: self._gauge(lambda p: p.desired),
        ))  # fmt: skip
        metrics.add(Gauge(
            "lmgw_planner_load",
            "Requests in flight on each pool's workers, averaged over planner.window_s.",
            labels, collect=lambda: self._gauge(lambda p: p.load),
        ))  # fmt: skip
        metrics.add(Gauge(
            "lmgw_planner_capacity_per_worker",
            "Requests one worker of the pool held while its p90 latencies met the targets, as"
            " learned (absent while learning).",
            labels, collect=lambda: self._gauge(lambda p: p.capacity),
        ))  # fmt: skip

    def _gauge(
        self, value: Callable[[RolePlan], float | None]
    ) -> Iterable[tuple[tuple[str, ...], float]]:
        for pool, plan in sorted(self.plans.items()):
            v = value(plan)
            if v is not None:
                yield pool, float(v)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        next_plan = time.monotonic() + EVALUATE_S
        while True:
            await trio.sleep(TICK_S)
            now = time.monotonic()
            self.tick(now)
            if now >= next_plan:
                next_plan = now + EVALUATE_S
                self.evaluate(now)

    def _signals_of(self, pool: Pool) -> list[tuple[Signal, Histogram]]:
        signals = self._signals.get(pool)
        if signals is None:
            signals = self._signals[pool] = []
            for name, hist, target in self._specs.get(pool[0], ()):
                signal = Signal(name, hist.buckets, target)
                self.planner.track(pool, signal)
                signals.append((signal, hist))
        return signals

    def tick(self, now: float) -> None:
        """Sample the requests in flight (each worker and each pool); every
        ``SAMPLES_PER_READ`` samples, read the latencies recorded since the last read."""
        held = self._held
        pools: dict[Pool, list[float]] = {}
        members: list[tuple[Worker, Pool]] = []
        for w in self.registry:
            held[w.id] = held.get(w.id, 0.0) + w.in_flight
            pool = pool_of(w)
            members.append((w, pool))
            p = pools.get(pool)
            if p is None:
                p = pools[pool] = [0, 0.0]
            p[0] += w.routable
            p[1] += w.in_flight
        queued = self.queued
        for pool, (workers, in_flight) in pools.items():
            if queued:  # each waiting request will need a worker of every pool serving it
                in_flight += waiting_for(pool, queued)
            self.planner.observe_load(now, pool, int(workers), in_flight)
        self._samples += 1
        if self._samples < SAMPLES_PER_READ:
            return
        n, self._samples = self._samples, 0
        self._held = {}
        last = self._last
        for w, pool in members:
            for signal, hist in self._signals_of(pool):
                s = hist.series.get((w.role, w.id))
                if s is None:
                    continue
                counts = s[0]
                key = (w.id, signal.name)
                seen = last.get(key)
                if seen is None:
                    delta = counts
                elif seen != counts:
                    delta = [a - b for a, b in zip(counts, seen, strict=True)]
                else:
                    continue
                last[key] = list(counts)
                # a latency seen means at least one request was there
                signal.add(max(1, level_of(held.get(w.id, 0.0) / n)), delta)

    def evaluate(self, now: float) -> dict[Pool, RolePlan]:
        """The plans now (and a line in the log for each recommendation that changed)."""
        self.planner.decay(now)
        plans = self.planner.plan(now)
        for pool, plan in plans.items():
            old = self.plans.get(pool)
            if old is None or old.desired != plan.desired or old.status != plan.status:
                log.info(
                    "planner: role %s (models %s): %d worker(s), %s recommended (load %.1f,"
                    " capacity %s per worker, %s)",
                    plan.role, plan.models, plan.workers, plan.desired, plan.load,
                    plan.capacity, plan.status,
                )  # fmt: skip
        self.plans = plans
        for pool in [p for p in self._signals if p not in plans]:
            del self._signals[pool]  # a pool gone (the planner dropped its curves too)
        for key in [k for k in self._last if self.registry.get(k[0]) is None]:
            del self._last[key]  # workers gone
        return plans

    def describe(self) -> dict:
        """``GET /admin/planner``."""
        return {
            "object": "planner",
            "ttft_slo_s": self.cfg.ttft_slo_s,
            "itl_slo_s": self.cfg.itl_slo_s,
            "window_s": self.cfg.window_s,
            "pools": [plan.describe() for _, plan in sorted(self.plans.items())],
        }
