"""Least load: the candidate with the fewest requests in flight through this gateway, plus
the requests the worker itself reports waiting (its ``/metrics``, scraped with each probe: load
from other gateways or clients shows there).

Ties rotate (a round-robin cursor picks where the scan starts), so an idle fleet still spreads
requests instead of sending every one to the first worker. ``Worker.load`` is the one load
signal every load-aware policy uses (power_of_two, bounded consistent hashing, session
affinity, cache_aware), read through :func:`loads_of` for a whole candidate set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...workers.registry import Candidates
from ...workers.worker import Worker
from ..policy import Policy, RouteContext

if TYPE_CHECKING:
    from ...config import RoutingConfig


def loads_of(candidates: Sequence[Worker]) -> list[float]:
    """Each candidate's load, in order: the registry's list for its own candidate tuples
    (kept current by the workers: no scan), else read from the workers (do not modify)."""
    if type(candidates) is Candidates:
        return candidates.loads()
    return [w.load for w in candidates]


def least_loaded(candidates: Sequence[Worker], start: int) -> int:
    """Index of the least-loaded candidate; ties go to the first at or after ``start``."""
    loads = loads_of(candidates)  # C-speed min and index
    lmin = min(loads)
    try:
        return loads.index(lmin, start % len(loads))
    except ValueError:
        return loads.index(lmin)


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
