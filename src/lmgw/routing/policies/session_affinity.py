"""Session affinity: the requests of one session (``RouteContext.session_key``) stick to the
worker that served the session last, so its prefix cache keeps serving the conversation.

A session is new, expired (idle longer than ``session_ttl_s``) or its worker is gone, not
routable or overloaded (more than the balance slack above the least loaded, as in cache_aware:
stickiness must not pile a fleet's traffic on one worker): then it goes to the least-loaded
worker and sticks there. Requests without a session key are routed by least load. The table is
an LRU bounded by ``session_max_entries``; the mapping is written on dispatch (the final
choice, after retries), not on choice.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ...workers.worker import Worker
from ..policy import Policy, RouteContext, RouteInfo
from .least_load import least_loaded, loads_of

if TYPE_CHECKING:
    from ...config import RoutingConfig

_EXPIRE_PER_CALL = 4  # expired entries dropped per dispatch (amortized cleanup)


class SessionAffinity(Policy):
    name = "session_affinity"

    def __init__(
        self,
        ttl_s: float = 600.0,
        max_entries: int = 100_000,
        balance_abs_threshold: int = 4,
        balance_rel_threshold: float = 1.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or max_entries < 1:
            raise ValueError("ttl_s must be > 0 and max_entries >= 1")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.balance_abs = balance_abs_threshold
        self.balance_rel = balance_rel_threshold
        self._clock = clock
        #: session key -> (worker id, expiry); least recently used first
        self._table: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._by_id: tuple[Sequence[Worker] | None, dict[str, int]] = (None, {})
        self._cursor = 0
        self._last: RouteInfo | None = None
        self.counts = {"sticky": 0, "new": 0, "expired": 0, "gone": 0, "overloaded": 0, "none": 0}

    @classmethod
    def from_config(cls, cfg: RoutingConfig) -> SessionAffinity:
        return cls(
            cfg.session_ttl_s,
            cfg.session_max_entries,
            cfg.balance_abs_threshold,
            cfg.balance_rel_threshold,
        )

    def _index_of(self, candidates: Sequence[Worker], wid: str) -> int | None:
        cached, by_id = self._by_id
        if cached is not candidates:
            by_id = {w.id: i for i, w in enumerate(candidates)}
            self._by_id = (candidates, by_id) if isinstance(candidates, tuple) else (None, {})
        return by_id.get(wid)

    def choose(self, candidates: Sequence[Worker], ctx: RouteContext) -> Worker:
        key = ctx.session_key
        start = self._cursor
        self._cursor = start + 1
        reason = "none"
        if key is not None:
            entry = self._table.get(key)
            if entry is None:
                reason = "new"
            elif entry[1] <= self._clock():
                reason = "expired"
            else:
                i = self._index_of(candidates, entry[0])
                if i is None:
                    reason = "gone"  # removed, draining, ejected, or not serving this model
                else:
                    w = candidates[i]
                    lw = w.load
                    lmin = min(loads_of(candidates))
                    slack = max(self.balance_abs, (self.balance_rel - 1.0) * lmin)
                    if lw - lmin <= slack:
                        return self._decide(ctx, w, "sticky")
                    reason = "overloaded"
        return self._decide(ctx, candidates[least_loaded(candidates, start)], reason)

    def _decide(self, ctx: RouteContext, worker: Worker, reason: str) -> Worker:
        self.counts[reason] += 1
        self._last = info = RouteInfo(self.name, worker.id, reason)
        ctx.memo()[self] = info
        return worker

    def on_dispatch(self, worker: Worker, ctx: RouteContext) -> None:
        key = ctx.session_key
        if key is None:
            return
        now = self._clock()
        table = self._table
        table[key] = (worker.id, now + self.ttl_s)
        table.move_to_end(key)
        for _ in range(_EXPIRE_PER_CALL):  # the oldest first: expired ones are at the front
            first = next(iter(table))
            if table[first][1] > now:
                break
            del table[first]
        while len(table) > self.max_entries:
            table.popitem(last=False)

    def on_worker_removed(self, worker: Worker) -> None:
        self._by_id = (None, {})  # its sessions re-stick on their next request

    def route_info(self, ctx: RouteContext | None = None) -> RouteInfo | None:
        if ctx is None:
            return self._last
        return ctx.scratch.get(self) if ctx.scratch else None

    def __len__(self) -> int:
        return len(self._table)

    def statistics(self) -> dict[str, float]:
        return {"sessions": len(self._table), **{f"routed_{k}": v for k, v in self.counts.items()}}

    def decision_counts(self) -> dict[str, int]:
        return self.counts
