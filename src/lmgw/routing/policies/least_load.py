"""Least load: the candidate with the fewest requests in flight through this gateway, plus
the requests the worker itself reports waiting (its ``/metrics``, scraped with each probe: load
from other gateways or clients shows there).

Ties rotate (a round-robin cursor picks where the scan starts), so an idle fleet still spreads
requests instead of sending every one to the first worker.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...workers.worker import Worker
from ..policy import Policy, RouteContext


class LeastLoad(Policy):
    name = "least_load"

    def __init__(self) -> None:
        self._start = 0

    def choose(self, candidates: Sequence[Worker], ctx: RouteContext) -> Worker:
        n = len(candidates)
        start = self._start
        self._start = start + 1
        best = candidates[start % n]
        best_load = best.in_flight + best.engine.waiting
        for k in range(1, n):
            w = candidates[(start + k) % n]
            load = w.in_flight + w.engine.waiting
            if load < best_load:
                best, best_load = w, load
        return best
