"""The interface every tier of the cache pool implements, and its statistics.

A tier maps string keys to ``(Meta, value)``. Local tiers (memory, shared memory) have a byte
budget they never exceed and evict least-recently-used entries to stay under it; a put returns
what it evicted so the pool can demote it to the next tier. The Redis tier has no budget of its
own (Redis's ``maxmemory`` is) and may be down, in which case it answers misses and drops puts
instead of failing requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .values import Meta, Value

__all__ = ["Evicted", "Tier", "TierStats"]


class Evicted(NamedTuple):
    """An entry a put pushed out of a tier (its value, for demotion to the next tier)."""

    key: str
    meta: Meta
    value: Value


class TierStats:
    """Counters a tier keeps about itself (the pool's metrics read them at scrape time)."""

    __slots__ = ("errors", "evictions", "expired", "failures", "read_bytes", "written_bytes")

    def __init__(self) -> None:
        self.evictions = 0
        self.expired = 0
        self.errors = 0  # operations that failed (the pool answered as if missed)
        self.failures = 0  # times the tier went down (Redis)
        self.read_bytes = 0
        self.written_bytes = 0


class Tier:
    """Base class: one storage level. Every method is safe to cancel (a cancelled put may or
    may not have stored the value; it never leaves a half-written entry readable)."""

    name: str = "tier"
    #: byte budget (None: the tier has none of its own)
    budget_bytes: int | None = None
    #: other processes (shm) or hosts (redis) see its entries
    shared: bool = False

    def __init__(self) -> None:
        self.stats = TierStats()

    @property
    def up(self) -> bool:
        """False while the tier is unreachable."""
        return True

    def available(self) -> bool:
        """Whether to use the tier now: up, or down but due for another try."""
        return True

    def usage(self) -> tuple[int, int]:
        """``(bytes, entries)`` this tier (this process's share of it) holds now."""
        return 0, 0

    async def get(self, key: str, now: float) -> tuple[Meta, Value] | None:
        raise NotImplementedError

    async def get_many(self, keys: Sequence[str], now: float) -> list[tuple[Meta, Value] | None]:
        return [await self.get(key, now) for key in keys]

    async def contains(self, key: str, now: float) -> bool:
        raise NotImplementedError

    async def contains_many(self, keys: Sequence[str], now: float) -> list[bool]:
        return [await self.contains(key, now) for key in keys]

    async def put(
        self, key: str, meta: Meta, value: Value, payload: tuple[int, bytes, Any], collect: bool
    ) -> tuple[bool, list[Evicted]]:
        """Store ``value`` (``payload`` is its ``payload_of``): ``(stored, evicted)``, the
        entries evicted to make room listed only when ``collect``. A value that can never fit
        (or a tier that is down) is not stored and evicts nothing."""
        raise NotImplementedError

    async def delete(self, key: str) -> bool:
        raise NotImplementedError

    async def run(self) -> None:
        """Background upkeep (reconnects, sweeps), run by :meth:`CachePool.run`; default none."""

    def close(self) -> None:
        """Release what the tier holds in this process (shm: its entries; redis: connections)."""

    async def aclose(self) -> None:
        self.close()

    def statistics(self) -> dict[str, float]:
        used, entries = self.usage()
        s = self.stats
        out: dict[str, float] = {
            "bytes": used,
            "entries": entries,
            "evictions": s.evictions,
            "expired": s.expired,
            "errors": s.errors,
            "read_bytes": s.read_bytes,
            "written_bytes": s.written_bytes,
            "up": 1.0 if self.up else 0.0,
        }
        if self.budget_bytes is not None:
            out["budget_bytes"] = self.budget_bytes
        return out
