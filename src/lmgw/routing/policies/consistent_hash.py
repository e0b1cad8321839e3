"""Consistent hashing: the same key goes to the same worker while the fleet stays the same, and
a change of membership moves only about 1/N of the keys (the Cython ring, DESIGN.md §3).

The key is the request's ``session_key`` (the pipeline fills it from the session header, else
the OpenAI ``user`` field; for encoder legs: the media item's content hash, so an item goes to
the encoder that already has it), else its request id. A ring is built per candidate set and
cached: the registry hands out the same tuple until the fleet changes. A key's owner in a
smaller set is the first of its ring successors in that set, so an ejected worker's keys move
and come back with it, and nobody else's keys move.

``consistent_hash_bounded`` is consistent hashing with bounded loads (Mirrokni, Thorup,
Zadimoghaddam, 2018): a worker takes a key only while its load + 1 stays within
``ceil(c * (total load + 1) / n)``; otherwise the key walks clockwise to the next worker
that has room. No worker ever goes past c times the mean (rounded up), and keys still stick
while their worker is not the hot one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...workers.worker import Worker
from ..hashring import HashRing
from ..policy import Policy, RouteContext, RouteInfo
from .least_load import least_loaded, loads_of

if TYPE_CHECKING:
    from ...config import RoutingConfig

#: virtual nodes per worker: enough for a ±10% spread at a few dozen workers, cheap to build
VNODES = 256
_MAX_RINGS = 16  # candidate sets remembered (models x roles)


class ConsistentHash(Policy):
    name = "consistent_hash"

    def __init__(self, vnodes: int = VNODES) -> None:
        self.vnodes = vnodes
        self._rings: dict[tuple[str, ...], tuple[HashRing, dict[str, Worker]]] = {}
        self._last: tuple[object, tuple[HashRing, dict[str, Worker]] | None] = (None, None)

    @classmethod
    def from_config(cls, cfg: RoutingConfig) -> ConsistentHash:
        return cls()

    def _ring(self, candidates: Sequence[Worker]) -> tuple[HashRing, dict[str, Worker]]:
        last, found = self._last
        if last is candidates:  # the registry's cached tuple: no O(n) key to build
            return found  # type: ignore[return-value]
        ids = tuple(w.id for w in candidates)
        found = self._rings.get(ids)
        if found is None:
            ring = HashRing(self.vnodes)
            for wid in ids:
                ring.add(wid)
            if len(self._rings) >= _MAX_RINGS:
                self._rings.pop(next(iter(self._rings)))
            found = self._rings[ids] = (ring, {w.id: w for w in candidates})
        if isinstance(candidates, tuple):  # a retry's list may change: not remembered
            self._last = (candidates, found)
        return found

    def key(self, ctx: RouteContext) -> str | bytes:
        """What the request hashes on."""
        return ctx.session_key or ctx.request_id

    def choose(self, candidates: Sequence[Worker], ctx: RouteContext) -> Worker:
        if len(candidates) == 1:
            return candidates[0]
        ring, by_id = self._ring(candidates)
        wid = ring.lookup(self.key(ctx))
        return by_id[wid] if wid is not None else candidates[0]

    def on_worker_removed(self, worker: Worker) -> None:
        self._rings = {ids: r for ids, r in self._rings.items() if worker.id not in ids}
        self._last = (None, None)


class ConsistentHashBounded(ConsistentHash):
    name = "consistent_hash_bounded"

    def __init__(self, load_factor: float = 1.25, vnodes: int = VNODES) -> None:
        if not load_factor > 1.0:
            raise ValueError("load_factor must be > 1")
        super().__init__(vnodes)
        self.load_factor = load_factor
        self._info: RouteInfo | None = None
        self.spills = 0
        self.rings = 0  # choices that kept the key's own worker

    @classmethod
    def from_config(cls, cfg: RoutingConfig) -> ConsistentHashBounded:
        return cls(cfg.bounded_load_factor)

    def choose(self, candidates: Sequence[Worker], ctx: RouteContext) -> Worker:
        n = len(candidates)
        if n == 1:
            self.rings += 1
            return candidates[0]
        ring, by_id = self._ring(candidates)
        key = self.key(ctx)
        total = sum(loads_of(candidates))
        cap = math.ceil(self.load_factor * (total + 1) / n)
        w = by_id[ring.lookup(key)]
        reason = "ring"
        if w.load + 1 <= cap:
            self.rings += 1
        else:
            reason = "spill"
            self.spills += 1
            for wid in ring.candidates(key, n)[1:]:
                other = by_id[wid]
                if other.load + 1 <= cap:
                    w = other
                    break
            else:  # only when scraped engine queues fill every worker: least load
                w = candidates[least_loaded(candidates, 0)]
        self._info = info = RouteInfo(self.name, w.id, reason)
        ctx.memo()[self] = info
        return w

    def route_info(self, ctx: RouteContext | None = None) -> RouteInfo | None:
        if ctx is None:
            return self._info
        return ctx.scratch.get(self) if ctx.scratch else None

    def statistics(self) -> dict[str, float]:
        return {"spills": self.spills}

    def decision_counts(self) -> dict[str, int]:
        return {"ring": self.rings, "spill": self.spills}
