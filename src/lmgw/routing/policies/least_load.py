"""Least load: the candidate with the fewest requests in flight through this gateway, plus
the requests the worker itself reports waiting (its ``/metrics``, scraped with each probe: load
from other gateways or clients shows there).

Ties rotate (a round-robin cursor picks where the scan starts), so an idle fleet still spreads
requests instead of sending every one to the first worker. :func:`load` is the one load signal
every load-aware policy uses (power_of_two, bounded consistent hashing, cache_aware).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...workers.worker import Worker
from ..policy import Policy, RouteContext

if TYPE_CHECKING:
    from ...config import RoutingConfig


def load(worker: Worker) -> float:
    """Requests in flight through this gateway plus those the engine reports waiting."""
    return worker.in_flight + worker.engine.waiting


def least_loaded(candidates: Sequence[Worker], start: int) -> int:
    """Index of the least-loaded candidate; ties go to the first at or after ``start``."""
    n = len(candidates)
    start %= n
    best = start
    best_load = load(candidates[start])
    for k in range(1, n):
        i = start + k
        if i >= n:
            i -= n
        w = candidates[i]
        lw = w.in_flight + w.engine.waiting
        if lw < best_load:
            best, best_load = i, lw
    return best


class LeastLoad(Policy):
    name = "least_load"

    def __init__(self) -> None:
        self._start = 0

    @classmethod
    def from_config(cls, cfg: RoutingConfig) -> LeastLoad:
        return cls()

    def choose(self, candidates: Sequence[Worker], ctx: RouteContext) -> Worker:
        start = self._start
        self._start = start + 1
        return candidates[least_loaded(candidates, start)]
