"""The in-process tier: a dict in LRU order under a byte budget.

Values are kept as they are (bytes, or a read-only view of the array put): a hit costs a dict
lookup and a move to the LRU end, no copy. The pool does not copy arrays on put, so an array
must not be modified after it is put. An entry is charged its payload plus its key plus
:data:`ENTRY_OVERHEAD` bytes (a million tiny entries are not free), and the charge never exceeds
the budget.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from .tier import Evicted, Tier
from .values import Meta, Value

__all__ = ["ENTRY_OVERHEAD", "MemoryTier"]

ENTRY_OVERHEAD = 128
"""Bytes charged per entry besides payload and key (dict slot, tuple, Meta: ~120 measured)."""


class MemoryTier(Tier):
    name = "memory"

    def __init__(self, budget_bytes: int) -> None:
        super().__init__()
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, tuple[Meta, Value, int]] = OrderedDict()
        self._used = 0

    @staticmethod
    def charge(key: str, size: int) -> int:
        return size + len(key) + ENTRY_OVERHEAD

    def usage(self) -> tuple[int, int]:
        return self._used, len(self._entries)

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        return list(self._entries)

    def _lookup(self, key: str, now: float) -> tuple[Meta, Value, int] | None:
        slot = self._entries.get(key)
        if slot is None:
            return None
        if slot[0].expired(now):
            self._remove(key)
            self.stats.expired += 1
            return None
        return slot

    async def get(self, key: str, now: float) -> tuple[Meta, Value] | None:
        slot = self._lookup(key, now)
        if slot is None:
            return None
        self._entries.move_to_end(key)
        meta = slot[0]
        meta.hits += 1
        self.stats.read_bytes += meta.size
        return meta, slot[1]

    async def get_many(self, keys: Sequence[str], now: float) -> list[tuple[Meta, Value] | None]:
        return [await self.get(key, now) for key in keys]

    async def contains(self, key: str, now: float) -> bool:
        return self._lookup(key, now) is not None

    async def put(
        self, key: str, meta: Meta, value: Value, payload: tuple[int, bytes, Any], collect: bool
    ) -> tuple[bool, list[Evicted]]:
        charge = self.charge(key, meta.size)
        if key in self._entries:
            self._remove(key)
        if charge > self.budget_bytes:
            return False, []
        evicted: list[Evicted] = []
        entries = self._entries
        while self._used + charge > self.budget_bytes:
            old_key, (old_meta, old_value, old_charge) = entries.popitem(last=False)
            self._used -= old_charge
            self.stats.evictions += 1
            if collect:
                evicted.append(Evicted(old_key, old_meta, old_value))
        if isinstance(value, np.ndarray) and value.flags.writeable:
            value = value.view()
            value.flags.writeable = False
        own = meta.unhit()
        entries[key] = (own, value, charge)
        self._used += charge
        self.stats.written_bytes += meta.size
        return True, evicted

    def _remove(self, key: str) -> None:
        _meta, _value, charge = self._entries.pop(key)
        self._used -= charge

    async def delete(self, key: str) -> bool:
        if key not in self._entries:
            return False
        self._remove(key)
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._used = 0
