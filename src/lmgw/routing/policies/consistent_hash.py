"""Consistent hashing: the same key goes to the same worker while the fleet stays the same, and
a change of membership moves only about 1/N of the keys (the Cython ring, DESIGN.md §3).

The key is the request's ``session_key`` (for encoder legs: the media item's content hash, so
an item goes to the encoder that already has it), else its request id. A ring is built per
candidate set and cached: the registry hands out the same tuple until the fleet changes.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...workers.worker import Worker
from ..hashring import HashRing
from ..policy import Policy, RouteContext

#: virtual nodes per worker: enough for a ±10% spread at a few dozen workers, cheap to build
VNODES = 256
_MAX_RINGS = 16  # candidate sets remembered (models x roles)


class ConsistentHash(Policy):
    name = "consistent_hash"

    def __init__(self, vnodes: int = VNODES) -> None:
        self.vnodes = vnodes
        self._rings: dict[tuple[str, ...], tuple[HashRing, dict[str, Worker]]] = {}

    def _ring(self, candidates: Sequence[Worker]) -> tuple[HashRing, dict[str, Worker]]:
        ids = tuple(w.id for w in candidates)
        found = self._rings.get(ids)
        if found is None:
            ring = HashRing(self.vnodes)
            for wid in ids:
                ring.add(wid)
            if len(self._rings) >= _MAX_RINGS:
                self._rings.pop(next(iter(self._rings)))
            found = self._rings[ids] = (ring, {w.id: w for w in candidates})
        return found

    def choose(self, candidates: Sequence[Worker], ctx: RouteContext) -> Worker:
        if len(candidates) == 1:
            return candidates[0]
        ring, by_id = self._ring(candidates)
        wid = ring.lookup(ctx.session_key or ctx.request_id)
        return by_id[wid] if wid is not None else candidates[0]

    def on_worker_removed(self, worker: Worker) -> None:
        self._rings = {ids: r for ids, r in self._rings.items() if worker.id not in ids}
