"""The cache pool: one key space over a hierarchy of tiers, fastest first.

Typically ``memory`` (this process), ``shm`` (this host) and ``redis`` (every host). Rules:

* **get** asks the tiers in order; a hit in a lower tier is **promoted**: copied into every
  faster tier (a shared-memory hit goes into the memory tier as the same zero-copy view).
* **put** writes every tier (``write="through"``, the default: a shared tier is where other
  processes and hosts find the entry at once) or only the first that takes it (``"back"``: lower
  tiers get it on demotion; a stale copy below is deleted).
* an entry a tier **evicts** to stay under its budget is **demoted**: written to the next tier,
  unless that tier holds it already.
* a tier that is down (Redis) is skipped: gets miss there, puts do not reach it.
* ``ttl_s``: entries expire everywhere at ``created + ttl`` (Redis drops them itself).

Every operation is timed per tier and counted (hits, misses, promotions, demotions); the
tiers keep their own bytes, entries, evictions and errors (:mod:`.metrics` exports them all).
The pool creates no tasks of its own on the request path; :meth:`run` runs the tiers' upkeep
(Redis reconnection, shared-memory sweeps) in the owner's nursery.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import trio

from .tier import Evicted, Tier
from .values import Entry, Meta, Value, payload_of

__all__ = ["CachePool"]

_perf = time.perf_counter


class CachePool:
    """The pool over ``tiers`` (fastest first).

    Args:
        ttl_s: default lifetime of an entry (0: until evicted or deleted).
        write: ``"through"`` (every tier) or ``"back"`` (the first tier that takes it).
        producer, role: default metadata of this process's puts.
        max_value_bytes: bigger values are refused (a put returns False).
        observe: called with ``(tier, op, seconds)`` for every tier operation (metrics).
        clock: wall clock for ``created``/``expires`` (shared with other processes).
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        ttl_s: float = 0.0,
        write: str = "through",
        producer: str = "",
        role: str = "",
        max_value_bytes: int = 1 << 30,
        observe: Callable[[str, str, float], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if write not in ("through", "back"):
            raise ValueError("write must be 'through' or 'back'")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self.tiers = tuple(tiers)
        self.ttl_s = ttl_s
        self.write = write
        self.producer = producer
        self.role = role
        self.max_value_bytes = max_value_bytes
        self.observe = observe
        self.clock = clock
        self.hits = dict.fromkeys(names, 0)
        self.misses = dict.fromkeys(names, 0)
        self.promotions = dict.fromkeys(names, 0)  # entries copied into this tier on a hit
        self.demotions = dict.fromkeys(names, 0)  # entries written into this tier on eviction
        self.refused = 0  # puts no tier took

    def tier(self, name: str) -> Tier | None:
        for t in self.tiers:
            if t.name == name:
                return t
        return None

    @property
    def shared(self) -> bool:
        """Whether any tier is seen by other processes (shm, redis)."""
        return any(t.shared for t in self.tiers)

    def _timed(self, tier: Tier, op: str, t0: float) -> None:
        if self.observe is not None:
            self.observe(tier.name, op, _perf() - t0)

    # -- reads ------------------------------------------------------------------------------
    async def get(self, key: str, default: Any = None) -> Value | Any:
        """The value of ``key``, or ``default``."""
        entry = await self.get_entry(key)
        return default if entry is None else entry.value

    async def get_entry(self, key: str) -> Entry | None:
        """The value with its metadata and the tier that had it (then promoted), or None."""
        now = self.clock()
        for i, tier in enumerate(self.tiers):
            if not tier.available():
                continue
            t0 = _perf()
            got = await tier.get(key, now)
            self._timed(tier, "get", t0)
            if got is None:
                self.misses[tier.name] += 1
                continue
            self.hits[tier.name] += 1
            meta, value = got
            if i:
                await self._promote(i, key, meta, value)
            return Entry(value, meta, tier.name)
        return None

    async def get_many(self, keys: Iterable[str]) -> dict[str, Value]:
        """The values of the keys present (one round trip per tier that is asked)."""
        entries = await self.get_many_entries(keys)
        return {k: e.value for k, e in entries.items()}

    async def get_many_entries(self, keys: Iterable[str]) -> dict[str, Entry]:
        """Each tier is asked once (one round trip for Redis) for the keys still missing, in
        order; a lower tier's hits are promoted once it has answered them all (a key it answered
        is found even if an earlier key's promotion demotes something that evicts it there)."""
        now = self.clock()
        todo = list(dict.fromkeys(keys))
        found: dict[str, Entry] = {}
        for i, tier in enumerate(self.tiers):
            if not todo:
                break
            if not tier.available():
                continue
            t0 = _perf()
            got = await tier.get_many(todo, now)
            self._timed(tier, "get_many", t0)
            left: list[str] = []
            for key, item in zip(todo, got, strict=True):
                if item is None:
                    left.append(key)
                    continue
                meta, value = item
                found[key] = Entry(value, meta, tier.name)
                if i:
                    await self._promote(i, key, meta, value)
            self.hits[tier.name] += len(todo) - len(left)
            self.misses[tier.name] += len(left)
            todo = left
        return found

    async def contains(self, key: str) -> bool:
        """Whether some tier holds ``key`` (no promotion, no hit counted)."""
        now = self.clock()
        for tier in self.tiers:
            if not tier.available():
                continue
            t0 = _perf()
            held = await tier.contains(key, now)
            self._timed(tier, "contains", t0)
            if held:
                return True
        return False

    async def contains_many(self, keys: Iterable[str]) -> set[str]:
        """The keys some tier holds (each tier asked once, for the keys not found above it)."""
        now = self.clock()
        todo = list(dict.fromkeys(keys))
        held: set[str] = set()
        for tier in self.tiers:
            if not todo:
                break
            if not tier.available():
                continue
            t0 = _perf()
            answers = await tier.contains_many(todo, now)
            self._timed(tier, "contains", t0)
            held.update(k for k, yes in zip(todo, answers, strict=True) if yes)
            todo = [k for k, yes in zip(todo, answers, strict=True) if not yes]
        return held

    # -- writes -----------------------------------------------------------------------------
    async def put(
        self,
        key: str,
        value: Value | bytearray | memoryview,
        *,
        producer: str | None = None,
        role: str | None = None,
        ttl_s: float | None = None,
    ) -> bool:
        """Store ``value`` (bytes, or a numpy array that must not change afterwards) under
        ``key``; True when at least one tier took it. Raises TypeError for other types."""
        kind, header, buffer = payload = payload_of(value)
        if kind == 0:
            value = buffer  # bytearray/memoryview: an immutable copy
        size = buffer.nbytes if isinstance(buffer, memoryview) else len(buffer)
        if size > self.max_value_bytes:
            self.refused += 1
            return False
        now = self.clock()
        ttl = self.ttl_s if ttl_s is None else ttl_s
        meta = Meta(
            kind,
            size,
            now,
            now + ttl if ttl > 0 else 0.0,
            self.producer if producer is None else producer,
            self.role if role is None else role,
            header,
        )
        stored = False
        for i, tier in enumerate(self.tiers):
            if not tier.available():
                continue
            if stored and self.write == "back":
                t0 = _perf()
                await tier.delete(key)  # a stale copy below would come back on promotion
                self._timed(tier, "delete", t0)
                continue
            t0 = _perf()
            took, evicted = await tier.put(key, meta, value, payload, i + 1 < len(self.tiers))  # type: ignore[arg-type]
            self._timed(tier, "put", t0)
            stored = stored or took
            if evicted:
                await self._demote(i, evicted)
        if not stored:
            self.refused += 1
        return stored

    async def delete(self, key: str) -> bool:
        """Remove ``key`` from every tier; True when some tier had it."""
        removed = False
        for tier in self.tiers:
            if tier.available():
                t0 = _perf()
                removed = await tier.delete(key) or removed
                self._timed(tier, "delete", t0)
        return removed

    async def _promote(self, found_in: int, key: str, meta: Meta, value: Value) -> None:
        payload = payload_of(value)
        for j in range(found_in):
            tier = self.tiers[j]
            if not tier.available():
                continue
            t0 = _perf()
            took, evicted = await tier.put(key, meta, value, payload, True)
            self._timed(tier, "put", t0)
            if took:
                self.promotions[tier.name] += 1
            if evicted:
                await self._demote(j, evicted)

    async def _demote(self, evicted_from: int, evicted: list[Evicted]) -> None:
        """Write what tier ``evicted_from`` evicted into the next tier up that lacks it."""
        now = self.clock()
        for j in range(evicted_from + 1, len(self.tiers)):
            tier = self.tiers[j]
            if not tier.available():
                continue
            for key, meta, value in evicted:
                if meta.expired(now) or await tier.contains(key, now):
                    continue
                t0 = _perf()
                took, more = await tier.put(key, meta, value, payload_of(value), True)
                self._timed(tier, "put", t0)
                if took:
                    self.demotions[tier.name] += 1
                if more:
                    await self._demote(j, more)
            return

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The tiers' upkeep (Redis reconnection, shared-memory sweeps) until cancelled."""
        async with trio.open_nursery() as nursery:
            for tier in self.tiers:
                nursery.start_soon(tier.run)
            task_status.started()

    async def aclose(self) -> None:
        """Close the tiers (a shared-memory tier removes this process's entries)."""
        self.close()

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def statistics(self) -> dict[str, dict[str, float]]:
        """Per tier: the tier's own numbers plus the pool's hits, misses, promotions and
        demotions into it."""
        out: dict[str, dict[str, float]] = {}
        for tier in self.tiers:
            stats = tier.statistics()
            name = tier.name
            stats.update(
                hits=self.hits[name],
                misses=self.misses[name],
                promotions=self.promotions[name],
                demotions=self.demotions[name],
            )
            out[name] = stats
        return out
