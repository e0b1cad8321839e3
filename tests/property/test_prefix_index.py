"""The prefix index and block hashes: the Cython extension against its pure-Python twin, and
both against a brute-force model.

The model is what the index promises, written the obvious way: an LRU list of block hashes,
each with the set of slots holding it, and a slot's match is the longest run of leading blocks
it holds, found by walking. The index answers by binary search (it relies on every slot's
blocks being prefix-closed, which its deepest-first inserts guarantee); the stateful test
checks that the two agree after every step and that the index never passes its budget.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import tracemalloc
from array import array
from collections import OrderedDict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lmgw._fast import prefix_py as twin

try:
    from lmgw._fast import prefix as fast
except ImportError:  # not built: the comparisons skip, the twin is still checked
    fast = None

needs_fast = pytest.mark.skipif(
    fast is None, reason="extension not built (python setup.py build_ext --inplace)"
)
IMPLS = [pytest.param(twin, id="python")] + ([pytest.param(fast, id="cython")] if fast else [])
HASH = fast or twin  # hashes are the same either way (checked below); the fast one is quicker

# Token values that take every path: small ints, 0, ints past one 30-bit digit, negatives
# (hash(-1) == -2) and bools (not exact ints: the compiled code hashes those through Python).
TOKEN = st.integers(0, 200_000) | st.sampled_from([0, 1, -1, -2, 2**30, 2**62, -(2**63), True])
TOKENS = st.lists(TOKEN, max_size=120)
SEEDS = st.sampled_from([0, 1, -1, 2**61 - 1, 2**61, 2**63 - 1, -(2**63)]) | st.integers(
    -(2**63), 2**63 - 1
)


# --- cache_aware's least wait -----------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 12),
    data=st.data(),
    cap=st.sampled_from([0.0, 1.0, 2.5, 4.0, 100.0]),
    weight=st.sampled_from([0.0, 1.0, 64.0]),
)
def test_least_wait(impl, n: int, data: st.DataObject, cap: float, weight: float) -> None:
    """The least ``bias[slot] + weight x load`` among loads within ``cap``, ties to the
    smaller ``front[slot]``, then the first from ``start`` round the list (-1 if none); both
    implementations, against the obvious computation (slot -1 and out-of-range slots read the
    last entry, which stays 0)."""
    size = 9
    values = st.sampled_from([0.0, 8.0, 40.0, 96.0])
    bias = [*data.draw(st.lists(values, min_size=size - 1, max_size=size - 1)), 0.0]
    front = [*data.draw(st.lists(st.integers(0, 3), min_size=size - 1, max_size=size - 1)), 0]
    slots = data.draw(st.lists(st.integers(-1, size + 2), min_size=n, max_size=n))
    loads = data.draw(st.lists(st.sampled_from([0, 1, 2.0, 3, 5.0]), min_size=n, max_size=n))
    start = data.draw(st.integers(0, n - 1))
    got = impl.least_wait(bias, front, slots, loads, weight, cap, start)
    key = {}
    for j in range(n):
        i = (start + j) % n
        if loads[i] <= cap:
            s = slots[i] if 0 <= slots[i] < size - 1 else size - 1
            key[i] = (bias[s] + weight * loads[i], front[s], j)
    assert got == (min(key, key=key.__getitem__) if key else -1)
    if fast is not None:
        assert got == twin.least_wait(bias, front, slots, loads, weight, cap, start)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 9),
    data=st.data(),
    cap=st.sampled_from([0.0, 1.0, 2.5, 100.0]),
    weight=st.sampled_from([0.0, 64.0]),
    miss=st.sampled_from([1.0, 2.0]),
    limit=st.sampled_from([1.0, 2.5, 100.0]),
    seeded=st.booleans(),
)
def test_best_holder(
    impl,
    n: int,
    data: st.DataObject,
    cap: float,
    weight: float,
    miss: float,
    limit: float,
    seeded: bool,
) -> None:
    """cache_aware's holder walk: the least cost among the holders that count (enough cached
    tokens, within their recent share and the load slack) and the seeded candidate, whichever
    way the walk stopped early; both implementations, against the obvious computation, and
    each other (ties included)."""
    size = 9
    bias = data.draw(
        st.lists(st.sampled_from([0.0, 8.0, 40.0, 96.0]), min_size=size, max_size=size)
    )
    recent = data.draw(st.lists(st.integers(0, 3), min_size=size, max_size=size))
    loads = data.draw(st.lists(st.sampled_from([0, 1, 2.0, 3, 5.0]), min_size=n, max_size=n))
    slots = data.draw(st.lists(st.integers(0, size - 1), min_size=n, max_size=n, unique=True))
    pos = {s: i for i, s in enumerate(slots)}
    holders = data.draw(st.lists(st.sampled_from(slots), unique=True))
    depth = st.integers(0, 6) | st.sampled_from([0.5, 2.75])  # blocks, or tier credit
    held = dict(sorted(((s, data.draw(depth)) for s in holders), key=lambda kv: -kv[1]))
    usable, bs, ntok = data.draw(st.integers(0, 5)), 16, 90
    floor = data.draw(st.sampled_from([0.0, 20.0, 50.0]))
    least = min(bias) + weight * min(loads)  # no candidate waits less
    best, best_cost, best_c = -1, 0.0, 0.0
    if seeded:  # the caller's candidate: the least wait, as a miss
        best = min(range(n), key=lambda i: (bias[slots[i]] + weight * loads[i], i))
        least = bias[slots[best]] + weight * loads[best]
        best_cost = least + miss * ntok
    args = (held, usable, bs, floor, bias, loads, recent, pos, limit, cap, weight, miss, ntok)
    got = impl.best_holder(*args, least, best, best_cost, best_c)
    costs = {}
    for s, d in held.items():
        c = min(d, usable) * bs
        i = pos[s]
        if c >= floor and c > 0 and recent[s] + 1 <= limit and loads[i] <= cap:
            costs[i] = (bias[s] + weight * loads[i] + miss * (ntok - c), c)
    if seeded:
        costs.setdefault(best, (best_cost, 0.0))
    want_found = any(min(d, usable) * bs >= floor and min(d, usable) > 0 for d in held.values())
    assert got[3] == want_found
    if not costs:
        assert got[0] == -1
        return
    assert got[0] in costs
    assert got[1] == pytest.approx(min(c for c, _ in costs.values()))
    assert (got[1], got[2]) == pytest.approx(costs[got[0]])
    if fast is not None:
        assert got == twin.best_holder(*args, least, best, best_cost, best_c)


@pytest.mark.parametrize("impl", IMPLS)
def test_best_holder_ties(impl) -> None:
    """Equal costs go to the lower load, unless a seeded candidate lets the walk stop at a tie
    (then the first at that cost stands)."""
    held = {0: 3, 1: 3}  # slot 0 waits on its queue, slot 1 on its load: 64 tokens each
    bias, loads, recent, pos = [0.0, 64.0], [1, 0], [0, 0], {0: 0, 1: 1}
    args = (held, 3, 16, 0.0, bias, loads, recent, pos, 10.0, 10.0, 64.0, 1.0, 100.0)
    assert impl.best_holder(*args, 0.0) == (1, 116.0, 48.0, True)
    assert impl.best_holder(*args, 64.0, 0, 116.0, 48.0) == (0, 116.0, 48.0, True)


# --- block hashes ----------------------------------------------------------------------------


@needs_fast
@settings(max_examples=300, deadline=None)
@given(TOKENS, st.integers(1, 70), st.integers(-1, 10), SEEDS)
def test_block_hashes_match_twin(tokens: list[int], bs: int, max_blocks: int, seed: int) -> None:
    assert fast.block_hashes(tokens, bs, max_blocks, seed) == twin.block_hashes(
        tokens, bs, max_blocks, seed
    )


@needs_fast
def test_block_hashes_other_objects_match_twin() -> None:
    odd = [1.5, "x", None, (1, 2), 2**70, -5, 7, 8]
    for bs in (1, 2, 3, 8):
        assert fast.block_hashes(odd * 2, bs) == twin.block_hashes(odd * 2, bs)
    assert fast.block_hashes(tuple(range(40)), 16) == twin.block_hashes(list(range(40)), 16)
    with pytest.raises(TypeError):
        fast.block_hashes([[1]] * 16, 16)  # a list is not hashable
    with pytest.raises(TypeError):
        fast.block_hashes(5, 16)


@needs_fast
@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.sampled_from([4, 8, 12, 64, 68]), st.integers(-1, 5), SEEDS)
def test_text_block_hashes_match_twin(data: bytes, bb: int, max_blocks: int, seed: int) -> None:
    assert fast.text_block_hashes(data, bb, max_blocks, seed) == twin.text_block_hashes(
        data, bb, max_blocks, seed
    )
    assert fast.text_block_hashes(bytearray(data), bb, max_blocks, seed) == (
        twin.text_block_hashes(data, bb, max_blocks, seed)
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_block_hash_definition(impl) -> None:
    """Block i = hash((*block_i, h[i-1])) from the seed: full blocks only, a cap honoured."""
    toks = list(range(100, 141))  # 41 tokens: 2 full blocks of 16, 9 left over
    hs = impl.block_hashes(toks, 16)
    h0 = hash((*toks[:16], impl.TOKEN_SEED))
    assert list(hs) == [h0, hash((*toks[16:32], h0))]
    assert isinstance(hs, array) and hs.typecode == "q"
    assert list(impl.block_hashes(toks, 16, 1)) == [h0]
    assert list(impl.block_hashes(toks, 16, 0)) == []
    assert list(impl.block_hashes(toks[:15], 16)) == []
    with pytest.raises(ValueError):
        impl.block_hashes(toks, 0)
    with pytest.raises(ValueError):
        impl.text_block_hashes(b"abcd", 6)
    # text blocks are 4-byte native words hashed the same way, from their own seed
    data = bytes(range(64))
    words = list(memoryview(data).cast("I"))
    assert list(impl.text_block_hashes(data, 64)) == [hash((*words, impl.TEXT_SEED))]


@settings(max_examples=200, deadline=None)
@given(TOKENS, TOKENS, st.integers(1, 9))
def test_a_hash_names_its_whole_prefix(a: list[int], b: list[int], bs: int) -> None:
    """Hashes of a prefix are a prefix of the hashes, and a changed token changes every hash
    from its block on (vLLM's chaining: a hit on block i means blocks 0..i match)."""
    ha, hab = HASH.block_hashes(a, bs), HASH.block_hashes(a + b, bs)
    assert list(hab[: len(ha)]) == list(ha)
    if a:
        j = len(a) // 2
        changed = [*a[:j], a[j] + 1 if a[j] != -2 else 7, *a[j + 1 :]]  # hash(-1) == hash(-2)
        hc = HASH.block_hashes(changed, bs)
        assert list(hc[: j // bs]) == list(ha[: j // bs])
        assert all(x != y for x, y in zip(hc[j // bs :], ha[j // bs :], strict=True))


# --- the index against a brute-force model --------------------------------------------------


class Model:
    """The index's contract, the slow and obvious way."""

    def __init__(self, max_nodes: int) -> None:
        self.max_nodes = max_nodes
        self.nodes: OrderedDict[int, set[int]] = OrderedDict()  # least recently used first
        self.evictions = 0

    def insert(self, slot: int, hashes: list[int]) -> None:
        for h in reversed(hashes):  # deepest first, so the prefix ends up most recent
            if h in self.nodes:
                self.nodes[h].add(slot)
                self.nodes.move_to_end(h)
                continue
            if not self.max_nodes:
                return
            if len(self.nodes) >= self.max_nodes:
                self.nodes.popitem(last=False)
                self.evictions += 1
            self.nodes[h] = {slot}

    def clear_slot(self, slot: int) -> None:
        for h in list(self.nodes):
            self.nodes[h].discard(slot)
            if not self.nodes[h]:
                del self.nodes[h]

    def match(self, hashes: list[int], slots: set[int], min_depth: int) -> dict[int, int]:
        out = {}
        for s in slots:
            d = 0
            while d < len(hashes) and s in self.nodes.get(hashes[d], ()):
                d += 1
            if d >= max(min_depth, 1):
                out[s] = d
        return out


# Conversations that share prefixes the way real traffic does: a few system prompts, turns
# appended to earlier turns. Tokens come from a small alphabet so blocks repeat.
SYSTEMS = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9, 9], [7, 7]]
SLOTS = [0, 1, 2, 3, 63, 64, 200]
BS = 2


class IndexMachine(RuleBasedStateMachine):
    @initialize(max_nodes=st.sampled_from([0, 1, 2, 5, 12, 40, 1000]))
    def start(self, max_nodes: int) -> None:
        self.impls = [twin.PrefixIndex(1 << 30, max_nodes)]
        if fast is not None:
            self.impls.append(fast.PrefixIndex(1 << 30, max_nodes))
        self.model = Model(max_nodes)
        self.convs: list[list[int]] = [list(s) for s in SYSTEMS]
        self.removed: set[int] = set(SLOTS)  # slots that hold nothing

    def hashes(self, tokens: list[int]) -> list[int]:
        return list(HASH.block_hashes(tokens, BS))

    @rule(conv=st.integers(0, 100), turn=st.lists(st.integers(0, 3), max_size=7))
    def grow(self, conv: int, turn: list[int]) -> None:
        """A new conversation turn: an earlier conversation plus more tokens."""
        base = self.convs[conv % len(self.convs)]
        self.convs.append(base + turn)

    @rule(slot=st.sampled_from(SLOTS), conv=st.integers(0, 100), cut=st.integers(-1, 30))
    def insert(self, slot: int, conv: int, cut: int) -> None:
        hs = self.hashes(self.convs[conv % len(self.convs)])
        n = len(hs) if cut < 0 else min(cut, len(hs))
        note(f"insert slot={slot} blocks={n}")
        added = {impl.insert(slot, array("q", hs), n) for impl in self.impls}
        assert len(added) == 1
        self.model.insert(slot, hs[:n])
        self.removed.discard(slot)

    @rule(slot=st.sampled_from(SLOTS))
    def clear_slot(self, slot: int) -> None:
        note(f"clear_slot {slot}")
        held = {impl.clear_slot(slot) for impl in self.impls}
        assert len(held) == 1
        self.model.clear_slot(slot)
        self.removed.add(slot)

    @rule(
        conv=st.integers(0, 100),
        slots=st.sets(st.sampled_from(SLOTS)),
        min_depth=st.integers(0, 6),
        extra=st.lists(st.integers(0, 3), max_size=5),
    )
    def match(self, conv: int, slots: set[int], min_depth: int, extra: list[int]) -> None:
        hs = self.hashes(self.convs[conv % len(self.convs)] + extra)
        want = self.model.match(hs, slots, min_depth)
        query = twin.slot_mask(sorted(slots))
        for impl in self.impls:
            got = impl.match(array("q", hs), len(hs), query, min_depth)
            assert got == want, (type(impl).__module__, got, want)
            assert not set(got) & self.removed, "a cleared slot was returned"
            depths = list(got.values())
            assert depths == sorted(depths, reverse=True), "deepest first"

    @invariant()
    def agree(self) -> None:
        if not hasattr(self, "model"):
            return
        for impl in self.impls:
            assert len(impl) == len(self.model.nodes) <= impl.max_nodes
            assert impl.evictions == self.model.evictions
            for h, slots in self.model.nodes.items():
                assert impl.holders(h) == sum(1 << s for s in slots)
            st_ = impl.statistics()
            assert st_["nodes"] == len(self.model.nodes)
            assert st_["bytes"] <= st_["budget_bytes"]


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- the budget ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=25, deadline=None)
@given(budget=st.integers(0, 200_000), slots=st.lists(st.integers(0, 300), min_size=1, max_size=6))
def test_never_exceeds_budget(impl, budget: int, slots: list[int]) -> None:
    ix = impl.PrefixIndex(budget)
    for k, slot in enumerate(slots):
        hs = HASH.block_hashes(list(range(k * 10_000, k * 10_000 + 3000)), 1)
        ix.insert(slot, hs)
        st_ = ix.statistics()
        assert len(ix) <= ix.max_nodes == st_["max_nodes"]
        if budget >= 1024:  # below the fixed part the index holds nothing at all
            assert st_["bytes"] <= budget, st_
        assert ix.max_nodes == impl.nodes_for_budget(budget, (max(slots[: k + 1]) // 64 + 1) * 64)
    ix.resize(budget // 3)
    assert len(ix) <= ix.max_nodes
    if budget // 3 >= 1024:
        assert ix.statistics()["bytes"] <= budget // 3


@pytest.mark.parametrize("impl", IMPLS)
def test_eviction_is_least_recently_used_leaves_first(impl) -> None:
    ix = impl.PrefixIndex(1 << 30, max_nodes=6)
    a = HASH.block_hashes(list(range(8)), 2)  # 4 blocks
    b = HASH.block_hashes([100, 101, 102, 103], 2)  # 2 blocks
    ix.insert(0, a)
    ix.insert(1, b)  # 4 + 2 = 6 nodes: full
    assert ix.match(a, 4, impl.slot_mask([0])) == {0: 4}
    ix.insert(0, a, 2)  # touch a's first two blocks: now a[2], a[3] are the oldest
    ix.insert(2, HASH.block_hashes([7, 7, 7, 7], 2))  # two new nodes evict a[3], then a[2]
    assert ix.match(a, 4, impl.slot_mask([0])) == {0: 2}
    assert ix.match(b, 2, impl.slot_mask([1])) == {1: 2}
    assert ix.evictions == 2


@pytest.mark.parametrize("impl", IMPLS)
def test_api_edges(impl) -> None:
    ix = impl.PrefixIndex(1 << 20)
    hs = HASH.block_hashes(list(range(64)), 16)
    assert ix.match(hs, 4, impl.slot_mask([0])) == {}
    assert ix.insert(3, hs) == 4
    assert ix.insert(3, hs) == 0
    assert ix.match(hs, -1, impl.slot_mask([3])) == {3: 4}
    assert ix.match(hs, 2, impl.slot_mask([3])) == {3: 2}
    assert ix.match(hs, 4, impl.slot_mask([3]), 5) == {}
    assert ix.match(hs, 4, b"") == {}
    assert ix.remove(3, hs[3]) and not ix.remove(3, hs[3])
    assert not ix.remove(9, hs[0])
    assert ix.clear_slot(3) == 3 and len(ix) == 0
    assert ix.clear_slot(4000) == 0
    for bad in (-1, impl.MAX_SLOTS):
        with pytest.raises(ValueError):
            ix.insert(bad, hs)
        with pytest.raises(ValueError):
            impl.slot_mask([bad])
    with pytest.raises(ValueError):
        impl.PrefixIndex(-1)
    ix.insert(impl.MAX_SLOTS - 1, hs)  # the widest bit set works
    assert ix.match(hs, 4, impl.slot_mask([impl.MAX_SLOTS - 1, 0])) == {impl.MAX_SLOTS - 1: 4}
    assert ix.holders(hs[0]) == 1 << (impl.MAX_SLOTS - 1)
    ix.clear()
    assert len(ix) == 0 and ix.holders(hs[0]) == 0
    assert "PrefixIndex(" in repr(ix)


def test_twin_memory_estimate_is_honest() -> None:
    """The twin charges what its nodes really cost (tracemalloc), give or take 25%."""
    hs = HASH.block_hashes(list(range(16 * 6_000)), 16)
    for slots in (1, 64):
        ix = twin.PrefixIndex(1 << 34)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for s in range(slots):
            ix.insert(s, hs)
        used = (tracemalloc.get_traced_memory()[0] - before) / len(ix)
        tracemalloc.stop()
        assert 0.75 * ix.node_bytes <= used <= 1.25 * ix.node_bytes, (slots, used)


# --- facade ----------------------------------------------------------------------------------


def test_facade_uses_extension_when_built() -> None:
    from lmgw.routing import prefix

    if importlib.util.find_spec("lmgw._fast.prefix") is None:
        pytest.skip("extension not built")
    assert prefix.IMPLEMENTATION == "cython"
    assert prefix.PrefixIndex is fast.PrefixIndex


def test_facade_falls_back_to_twin(monkeypatch, caplog) -> None:
    import lmgw.routing.prefix as facade

    monkeypatch.setitem(sys.modules, "lmgw._fast.prefix", None)
    spec = importlib.util.spec_from_file_location("_prefix_fallback", Path(facade.__file__))
    module = importlib.util.module_from_spec(spec)
    with caplog.at_level(logging.WARNING):
        spec.loader.exec_module(module)
    assert module.IMPLEMENTATION == "python"
    assert module.PrefixIndex is twin.PrefixIndex
    assert "not built" in caplog.text
