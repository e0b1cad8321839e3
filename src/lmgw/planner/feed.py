"""The planner's feed: every half second, the requests in flight on each worker; every second,
the latencies the pipeline recorded since (the per-worker leg histograms of
:class:`~lmgw.metrics.Metrics`, so no request pays for the planner); every ``evaluate_s``,
the plans (:class:`lmgw.planner.core.Planner`), exported as metrics and on ``GET
/admin/planner``, and logged when a recommendation changes."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import trio

from ..config import PlannerConfig
from ..metrics import Gauge, Histogram, Metrics
from ..workers.registry import Registry
from .core import Planner, RolePlan, Signal, level_of

log = logging.getLogger("lmgw")

#: seconds between in-flight samples, and samples per latency read
TICK_S = 0.5
SAMPLES_PER_READ = 2
#: seconds between plans
EVALUATE_S = 5.0


class PlannerFeed:
    """Owns a :class:`Planner` for one gateway: what it reads, and the plans it last gave."""

    def __init__(self, cfg: PlannerConfig, registry: Registry, metrics: Metrics) -> None:
        self.cfg = cfg
        self.registry = registry
        self.planner = Planner(cfg.window_s, cfg.scale_down_delay_s)
        ttft, itl = cfg.ttft_slo_s, cfg.itl_slo_s
        #: (role, signal, the histogram it reads, by (role, worker id))
        self._reads: list[tuple[str, Signal, Histogram]] = []
        for role, name, hist, target in (
            ("e", "ttft", metrics.stage, ttft),  # an encode leg's whole time
            ("p", "ttft", metrics.stage, ttft),  # a prefill leg's (queue + compute)
            ("pd", "ttft", metrics.stage_ttft, ttft),
            ("pd", "itl", metrics.stage_tpot, itl),
            ("d", "itl", metrics.stage_tpot, itl),
        ):
            signal = Signal(name, hist.buckets, target)
            self.planner.track(role, signal)
            self._reads.append((role, signal, hist))
        self._last: dict[tuple[int, str], list[int]] = {}  # (read, worker id) -> counts seen
        self._held: dict[str, float] = {}  # worker id -> in flight summed over the samples
        self._samples = 0
        self.plans: dict[str, RolePlan] = {}
        metrics.add(Gauge(
            "lmgw_planner_desired_workers",
            "Workers of each role the planner recommends to meet planner.ttft_slo_s and"
            " planner.itl_slo_s at the load of the last planner.window_s (for an autoscaler).",
            ("role",), collect=lambda: self._gauge(lambda p: p.desired),
        ))  # fmt: skip
        metrics.add(Gauge(
            "lmgw_planner_load",
            "Requests in flight on each role's workers, averaged over planner.window_s.",
            ("role",), collect=lambda: self._gauge(lambda p: p.load),
        ))  # fmt: skip
        metrics.add(Gauge(
            "lmgw_planner_capacity_per_worker",
            "Requests one worker of the role held while its p90 latency met the target, as"
            " learned (absent while learning).",
            ("role",),
            collect=lambda: self._gauge(lambda p: p.capacity, skip_none=True),
        ))  # fmt: skip

    def _gauge(self, value, skip_none: bool = False) -> Iterable[tuple[tuple[str, ...], float]]:
        for role, plan in sorted(self.plans.items()):
            v = value(plan)
            if v is None and skip_none:
                continue
            yield (role,), float(v or 0)

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

    def tick(self, now: float) -> None:
        """Sample the requests in flight (each worker and each role); every
        ``SAMPLES_PER_READ`` samples, read the latencies recorded since the last read."""
        held = self._held
        roles: dict[str, list[float]] = {}
        for w in self.registry:
            held[w.id] = held.get(w.id, 0.0) + w.in_flight
            r = roles.get(w.role)
            if r is None:
                r = roles[w.role] = [0, 0.0]
            r[0] += w.routable
            r[1] += w.in_flight
        for role, (workers, in_flight) in roles.items():
            self.planner.observe_load(now, role, int(workers), in_flight)
        self._samples += 1
        if self._samples < SAMPLES_PER_READ:
            return
        n, self._samples = self._samples, 0
        self._held = {}
        last = self._last
        for i, (role, signal, hist) in enumerate(self._reads):
            series = hist.series
            for w in self.registry:
                if w.role != role:
                    continue
                s = series.get((role, w.id))
                if s is None:
                    continue
                counts = s[0]
                key = (i, w.id)
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

    def evaluate(self, now: float) -> dict[str, RolePlan]:
        """The plans now (and a line in the log for each recommendation that changed)."""
        self.planner.decay(now)
        plans = self.planner.plan(now)
        for role, plan in plans.items():
            old = self.plans.get(role)
            if old is None or old.desired != plan.desired or old.status != plan.status:
                log.info(
                    "planner: role %s: %d worker(s), %s recommended (load %.1f, capacity %s"
                    " per worker, %s)",
                    role, plan.workers, plan.desired, plan.load, plan.capacity, plan.status,
                )  # fmt: skip
        self.plans = plans
        for key in [k for k in self._last if self.registry.get(k[1]) is None]:
            del self._last[key]  # workers gone
        return plans

    def describe(self) -> dict:
        """``GET /admin/planner``."""
        return {
            "object": "planner",
            "ttft_slo_s": self.cfg.ttft_slo_s,
            "itl_slo_s": self.cfg.itl_slo_s,
            "window_s": self.cfg.window_s,
            "roles": {role: plan.describe() for role, plan in sorted(self.plans.items())},
        }
