"""The Distributed Cache Pool: one key space over tiers (in-process memory, same-host shared
memory, Redis), with promotion on hit, demotion on eviction and per-tier metrics.

::

    pool = CachePool([MemoryTier(64 << 20), RedisTier("redis://127.0.0.1:6379/0")])
    await pool.put("ec:model:ab12...", embedding, producer="enc-1", role="e")
    entry = await pool.get_entry("ec:model:ab12...")   # Entry(value, meta, tier)

See :mod:`lmgw.cache.api` for the rules and docs/cache.md for the configuration.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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

# Loaded on first use: lmgw.config imports the [cache] section, and must not pull numpy in.
_WHERE = {
    "CacheConfig": ".config",
    "build_pool": ".config",
    "CachePool": ".api",
    "MemoryTier": ".memory",
    "ShmTier": ".shm",
    "RedisTier": ".redis",
    "Evicted": ".tier",
    "Tier": ".tier",
    "Entry": ".values",
    "Meta": ".values",
    "Value": ".values",
}


def __getattr__(name: str) -> object:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(name)
    return getattr(importlib.import_module(where, __name__), name)


if TYPE_CHECKING:
    from .api import CachePool as CachePool
    from .config import CacheConfig as CacheConfig
    from .config import build_pool as build_pool
    from .memory import MemoryTier as MemoryTier
    from .redis import RedisTier as RedisTier
    from .shm import ShmTier as ShmTier
    from .tier import Evicted as Evicted
    from .tier import Tier as Tier
    from .values import Entry as Entry
    from .values import Meta as Meta
    from .values import Value as Value
