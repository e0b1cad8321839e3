"""The Distributed Cache Pool: one key space over tiers (in-process memory, same-host shared
memory, Redis), with promotion on hit, demotion on eviction and per-tier metrics.

::

    pool = CachePool([MemoryTier(64 << 20), RedisTier("redis://127.0.0.1:6379/0")])
    await pool.put("ec:model:ab12...", embedding, producer="enc-1", role="e")
    entry = await pool.get_entry("ec:model:ab12...")   # Entry(value, meta, tier)

See :mod:`lmgw.cache.api` for the rules and docs/cache.md for the configuration.
"""

from __future__ import annotations

from .api import CachePool
from .config import CacheConfig, build_pool
from .memory import MemoryTier
from .tier import Evicted, Tier
from .values import Entry, Meta, Value

__all__ = [
    "CacheConfig",
    "CachePool",
    "Entry",
    "Evicted",
    "MemoryTier",
    "Meta",
    "RedisTier",
    "ShmTier",
    "Tier",
    "Value",
    "build_pool",
]


def __getattr__(name: str) -> object:  # the shm and redis tiers are imported when used
    if name == "ShmTier":
        from .shm import ShmTier

        return ShmTier
    if name == "RedisTier":
        from .redis import RedisTier

        return RedisTier
    raise AttributeError(name)
