"""What every discovery backend hands its results to, and how it backs off.

A backend produces "the workers this source wants now" (a list of ``WorkerConfig``); the gateway's
``sync_workers(source, workers)`` turns that into adds and drains. :class:`SourceSync` calls it
only when the list changed (and ``sweep_retired`` otherwise, so drained workers are removed once
idle): re-syncing an unchanged list every poll would undo an operator's drain of a discovered
worker. Pure apart from the sink's own calls.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from typing import Protocol

from ...config import WorkerConfig

__all__ = ["FleetSink", "SourceSync", "backoff_delay"]

log = logging.getLogger("lmgw.workers.discovery")


class FleetSink(Protocol):
    """The part of :class:`~lmgw.gateway.Gateway` discovery needs (tests may pass their own)."""

    def sync_workers(self, source: str, desired: Iterable[WorkerConfig]) -> tuple[int, int]: ...

    def sweep_retired(self) -> None: ...

    def source_of(self, worker_id: str) -> str: ...


class SourceSync:
    """One source's view of the fleet: applies a new desired list, warns about taken ids."""

    def __init__(self, sink: FleetSink, source: str) -> None:
        self.sink = sink
        self.source = source
        self.workers: list[WorkerConfig] | None = None  # last list applied
        self._taken: set[str] = set()  # wanted ids another source (or static config) owns

    def update(self, workers: list[WorkerConfig] | None) -> None:
        """Apply ``workers`` (None: unchanged since the last call)."""
        if workers is not None and workers != self.workers:
            self._apply(workers)
        elif self._taken and self.workers is not None:
            self._apply(self.workers)  # the owner may have let go of a taken id: try again
        else:
            self.sink.sweep_retired()

    def _apply(self, workers: list[WorkerConfig]) -> None:
        added, retired = self.sink.sync_workers(self.source, workers)
        self.workers = workers
        taken = {w.worker_id for w in workers if self.sink.source_of(w.worker_id) != self.source}
        for wid in sorted(taken - self._taken):
            log.warning(
                "discovery %s: worker id %r belongs to %s; this entry is ignored",
                self.source,
                wid,
                self.sink.source_of(wid),
            )
        self._taken = taken
        if added or retired:
            log.info(
                "discovery %s: %d added, %d draining (%d listed)",
                self.source,
                added,
                retired,
                len(workers),
            )


def backoff_delay(
    failures: int, base_s: float, cap_s: float, rand: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with jitter: base * 2^(failures-1), capped, times [0.5, 1.0).

    Jitter keeps replicas (and workers re-registering) from hammering a recovering server in
    lockstep; the floor of one half keeps the retry rate bounded.
    """
    exp = min(max(failures - 1, 0), 30)
    return min(cap_s, base_s * (1 << exp)) * (0.5 + 0.5 * rand())
