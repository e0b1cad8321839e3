"""The tiered cache pool against an obviously correct model (hypothesis stateful test).

Two local tiers, memory then shared memory, each a byte-budget LRU, write-through, promotion on
hit and demotion on eviction. The model is a list of ordered dicts that follows the rules of
``lmgw.cache.api`` step by step; after every rule the pool must agree with it exactly: the same
keys in each tier in the same LRU order (so the same evictions), never over budget, and a get
returns what was put unless the model evicted it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import trio
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from lmgw.cache import CachePool, MemoryTier
from lmgw.cache.memory import ENTRY_OVERHEAD
from lmgw.cache.shm import PAGE, ShmTier
from lmgw.cache.values import payload_of
from lmgw.transport import shm as transport_shm

pytestmark = pytest.mark.skipif(
    not os.path.isdir(transport_shm.DEFAULT_DIR), reason="needs /dev/shm"
)

MEMORY_BUDGET = 6000
SHM_BUDGET = 8 * PAGE
KEYS = [f"k{i}" for i in range(8)]


def run(fn: Any, *args: Any) -> Any:
    return trio.run(fn, *args)


def nbytes(value: Any) -> int:
    """What the pool charges for: an array's tensor-frame span (a view ships its span)."""
    return memoryview(payload_of(value)[2]).nbytes


class Model:
    """A byte-budget LRU: what each tier must hold, in order."""

    def __init__(self, budget: int, charge: Any) -> None:
        self.budget = budget
        self.charge = charge
        self.entries: OrderedDict[str, Any] = OrderedDict()

    def used(self) -> int:
        return sum(self.charge(k, nbytes(v)) for k, v in self.entries.items())

    def put(self, key: str, value: Any) -> tuple[bool, list[tuple[str, Any]]]:
        self.entries.pop(key, None)
        need = self.charge(key, nbytes(value))
        if need > self.budget:
            return False, []
        evicted = []
        while self.used() + need > self.budget:
            evicted.append(self.entries.popitem(last=False))
        self.entries[key] = value
        return True, evicted


values = st.one_of(
    st.binary(min_size=0, max_size=3 * PAGE),
    st.integers(min_value=0, max_value=700).map(lambda n: np.arange(n, dtype=np.float32)),
    st.integers(min_value=0, max_value=40).map(
        lambda n: np.arange(n * 3, dtype=np.int16).reshape(n, 3)[:, ::2]  # a strided view
    ),
)


class PoolMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.name = f"lmgwtest-{uuid.uuid4().hex[:10]}"
        self.memory = MemoryTier(MEMORY_BUDGET)
        self.shm = ShmTier(SHM_BUDGET, self.name, idle_bytes=0)
        self.pool = CachePool([self.memory, self.shm])
        self.model = [
            Model(MEMORY_BUDGET, lambda k, n: n + len(k) + ENTRY_OVERHEAD),
            Model(SHM_BUDGET, lambda k, n: PAGE + -(-n // PAGE) * PAGE),
        ]
        self.views: list[Any] = []  # arrays handed out keep their segments mapped

    def teardown(self) -> None:
        if hasattr(self, "pool"):
            self.views.clear()
            run(self.pool.aclose)
            left = [f for f in os.listdir(self.shm.path) if not f.startswith("k-")]
            shutil.rmtree(self.shm.path, ignore_errors=True)
            assert not left, f"segments left after close: {left}"

    # -- the model's rules, as lmgw.cache.api states them ---------------------------------------
    def _demote(self, tier: int, evicted: list[tuple[str, Any]]) -> None:
        if tier + 1 < len(self.model):
            lower = self.model[tier + 1]
            for key, value in evicted:
                if key not in lower.entries:
                    _stored, more = lower.put(key, value)
                    self._demote(tier + 1, more)

    def _model_put(self, key: str, value: Any) -> bool:
        stored = False
        for i, tier in enumerate(self.model):
            took, evicted = tier.put(key, value)
            stored = stored or took
            self._demote(i, evicted)
        return stored

    def _model_get(self, key: str) -> tuple[Any, int] | None:
        for i, tier in enumerate(self.model):
            if key in tier.entries:
                tier.entries.move_to_end(key)
                value = tier.entries[key]
                for j in range(i):
                    _took, evicted = self.model[j].put(key, value)
                    self._demote(j, evicted)
                return value, i
        return None

    # -- rules ----------------------------------------------------------------------------------
    @rule(key=st.sampled_from(KEYS), value=values)
    def put(self, key: str, value: Any) -> None:
        note(f"put {key} ({type(value).__name__}, {nbytes(value)} bytes)")
        expected = self._model_put(key, value)
        assert run(self.pool.put, key, value) == expected

    @rule(key=st.sampled_from(KEYS))
    def get(self, key: str) -> None:
        expected = self._model_get(key)
        entry = run(self.pool.get_entry, key)
        note(f"get {key} -> {None if entry is None else entry.tier}")
        if expected is None:
            assert entry is None
            return
        value, tier = expected
        assert entry is not None, f"{key} should be in {self.pool.tiers[tier].name}"
        assert entry.tier == self.pool.tiers[tier].name
        if isinstance(value, np.ndarray):
            assert isinstance(entry.value, np.ndarray)
            assert entry.value.dtype == value.dtype and entry.value.shape == value.shape
            assert np.array_equal(entry.value, value)
            assert not entry.value.flags.writeable
            self.views.append(entry.value)
        else:
            assert entry.value == value
        assert entry.meta.size == nbytes(value)

    @rule(keys=st.lists(st.sampled_from(KEYS), max_size=4, unique=True))
    def get_many(self, keys: list[str]) -> None:
        # each tier is asked once for the keys still missing and answers them all (one round
        # trip) before its hits are promoted: a promotion's demotions may then evict a key this
        # tier already answered, which is still found (so the LRU order differs from gets)
        expected = {}
        todo = keys
        for i, tier in enumerate(self.model):
            hits = [key for key in todo if key in tier.entries]
            for key in hits:
                tier.entries.move_to_end(key)
                expected[key] = tier.entries[key]
            for key in hits:
                for j in range(i):
                    _took, evicted = self.model[j].put(key, expected[key])
                    self._demote(j, evicted)
            todo = [key for key in todo if key not in expected]
        found = run(self.pool.get_many, keys)
        assert sorted(found) == sorted(expected)

    @rule(key=st.sampled_from(KEYS))
    def contains(self, key: str) -> None:
        expected = any(key in tier.entries for tier in self.model)
        assert run(self.pool.contains, key) is expected

    @precondition(lambda self: any(t.entries for t in self.model))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        present = sorted({k for t in self.model for k in t.entries})
        key = data.draw(st.sampled_from(present))
        for tier in self.model:
            tier.entries.pop(key, None)
        assert run(self.pool.delete, key) is True

    @rule()
    def drop_views(self) -> None:
        self.views.clear()

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def same_entries_in_the_same_order(self) -> None:
        assert self.memory.keys() == list(self.model[0].entries)
        assert list(self.shm._own) == list(self.model[1].entries)

    @invariant()
    def never_over_budget(self) -> None:
        used, _ = self.memory.usage()
        assert used == self.model[0].used() <= MEMORY_BUDGET
        used, _ = self.shm.usage()
        assert used == self.model[1].used() <= SHM_BUDGET


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_tiered_pool_agrees_with_the_model = PoolMachine.TestCase


def test_get_many_promotes_after_the_tier_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the machine: shm answers k1 and k5 at once, then promoting k1 demotes k3 from
    memory into shm. Both are found, and shm's LRU has both at its end before k3 comes in (the
    model once promoted k1 before looking up k5, so k5 was evicted first and seemed missing)."""
    monkeypatch.setitem(globals(), "note", lambda _value: None)  # no hypothesis test to note in
    machine = PoolMachine()
    machine.setup()
    try:
        puts = [
            ("k0", b""),
            ("k5", np.arange(1, dtype=np.float32)),
            ("k1", np.arange(514, dtype=np.float32)),
            ("k3", np.arange(111, dtype=np.float32)),
            ("k4", np.arange(357, dtype=np.float32)),
            ("k2", np.arange(356, dtype=np.float32)),
        ]
        for key, value in puts:
            machine.put(key, value)
            machine.same_entries_in_the_same_order()
        machine.get_many(["k0"])
        machine.same_entries_in_the_same_order()
        machine.get_many(["k0", "k1", "k2", "k5"])  # k1, k5 from shm
        machine.same_entries_in_the_same_order()
        machine.never_over_budget()
        assert machine.memory.keys() == ["k4", "k0", "k2", "k1", "k5"]
        assert list(machine.shm._own) == ["k0", "k1", "k5", "k3"]
    finally:
        machine.teardown()
