"""Pure-Python twin of `prefix.pyx`: chained block hashes and the bounded prefix index.

It is the reference the property tests compare the extension against, and the fallback when the
extension is not built. Keep the two in lockstep: hashing, LRU order, eviction and match semantics
here must be mirrored in the .pyx, or the tests fail. Only the memory estimate differs: each
implementation charges its own real cost per node against the same byte budget.

**Block hashes.** Block i of a prompt (``block_size`` tokens) gets
``h[i] = hash((*tokens[i*bs:(i+1)*bs], h[i-1]))`` with ``h[-1] = seed``: Python's tuple hash
(xxHash-style, not salted per process for ints), so a block's hash names its whole prefix, like
vLLM's prefix-caching keys. The parent comes *last* so the compiled version can mix a block's
tokens before its parent is known: consecutive blocks overlap in the CPU (8k tokens: ~8 us,
against ~14 us parent-first). Only full blocks count, as in vLLM. Raw bytes (no tokenizer) are
read as native uint32 "tokens", 4 bytes each.

**The index.** A node per block hash holds a bit set of worker *slots* (small ints the policy
assigns) that hold that block. Nodes are kept in one LRU order; an insert touches a prompt's
blocks deepest first, so a prefix is always more recent than its extensions and eviction removes
leaves first. Each slot's set of blocks is therefore prefix-closed, which lets :meth:`match`
find a slot's longest cached prefix by binary search instead of a walk.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "MAX_SLOTS",
    "TEXT_SEED",
    "TOKEN_SEED",
    "PrefixIndex",
    "best_holder",
    "block_hashes",
    "least_wait",
    "nodes_for_budget",
    "slot_mask",
    "text_block_hashes",
]

#: chain seeds: token blocks and byte blocks never share a chain
TOKEN_SEED = 0
TEXT_SEED = 1
#: most worker slots one index tracks (64 words of bit set per node)
MAX_SLOTS = 4096

_M64 = (1 << 64) - 1

# What one node costs in this implementation, measured with tracemalloc on CPython 3.11 (a test
# keeps the estimate within 25% of the measurement): the OrderedDict entry and its linked-list
# node (~100 B), the int key (36 B) and the int bit set (28 B + 4 B per 30 slots).
_NODE_BASE = 164
_FIXED = 1024


def _node_bytes(slots: int) -> int:
    return _NODE_BASE + 4 * ((max(slots, 1) + 29) // 30)


def nodes_for_budget(budget_bytes: int, slots: int = 64) -> int:
    """How many nodes this implementation keeps within ``budget_bytes`` at ``slots`` slots."""
    return max(0, (budget_bytes - _FIXED) // _node_bytes(slots))


def block_hashes(
    tokens: Sequence[int], block_size: int, max_blocks: int = -1, seed: int = TOKEN_SEED
) -> array:
    """Chained hashes of the full blocks of ``tokens`` (at most ``max_blocks``; -1: all)."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    n = len(tokens) // block_size
    if 0 <= max_blocks < n:
        n = max_blocks
    out = array("q", bytes(8 * n))
    parent = seed
    for i in range(n):
        s = i * block_size
        parent = hash((*tokens[s : s + block_size], parent))
        out[i] = parent
    return out


def text_block_hashes(
    data: bytes, block_bytes: int, max_blocks: int = -1, seed: int = TEXT_SEED
) -> array:
    """Chained hashes of the full ``block_bytes`` blocks of raw bytes (a multiple of 4)."""
    if block_bytes < 4 or block_bytes % 4:
        raise ValueError("block_bytes must be a positive multiple of 4")
    n = len(data) // block_bytes
    if 0 <= max_blocks < n:
        n = max_blocks
    words = memoryview(data)[: n * block_bytes].cast("B").cast("I")
    return block_hashes(words, block_bytes // 4, n, seed)


def slot_mask(slots: Iterable[int]) -> bytes:
    """The query bit set for :meth:`PrefixIndex.match`: little-endian uint64 words."""
    mask = 0
    for s in slots:
        if not 0 <= s < MAX_SLOTS:
            raise ValueError(f"slot {s} out of range 0..{MAX_SLOTS - 1}")
        mask |= 1 << s
    return mask.to_bytes(8 * ((mask.bit_length() + 63) // 64), "little")


def least_wait(
    bias: Sequence[float],
    front: Sequence[int],
    slots: Sequence[int],
    loads: Sequence[float],
    load_weight: float,
    cap: float,
    start: int,
) -> int:
    """The candidate (index into ``slots``/``loads``) with the least wait, ``bias[slot] +
    load_weight x load``, among those whose load is at most ``cap``; ties go to the smaller
    ``front[slot]``, then to the first from ``start`` round the list. -1 when none qualifies.
    (cache_aware's scan of the fleet: one pass, compiled in the extension.)"""
    n = len(loads)
    last = len(bias) - 1
    best, least, first = -1, 0.0, 0
    for j in range(n):
        i = start + j
        if i >= n:
            i -= n
        x = loads[i]
        if x > cap:
            continue
        s = slots[i]
        if not 0 <= s < last:
            s = last
        w = bias[s] + load_weight * x
        f = front[s]
        if best < 0 or w < least or (w == least and f < first):
            best, least, first = i, w, f
    return best


def best_holder(
    held: Mapping[int, float],
    usable: float,
    block_size: float,
    floor: float,
    bias: Sequence[float],
    loads: Sequence[float],
    recent: Sequence[int],
    pos: Mapping[int, int],
    limit: float,
    cap: float,
    load_weight: float,
    miss_weight: float,
    ntok: float,
    least: float,
    best: int = -1,
    best_cost: float = 0.0,
    best_c: float = 0.0,
) -> tuple[int, float, float, bool]:
    """cache_aware's cheapest holder: over ``held`` (slot -> matched blocks or tier credit,
    deepest first), the candidate index ``pos[slot]`` with the least ``bias[slot] +
    load_weight x load + miss_weight x (ntok - cached)``, where cached is the held blocks
    (at most ``usable``) times ``block_size``; a holder caching less than ``floor`` tokens
    does not count, one with ``recent[slot] + 1 > limit`` or a load above ``cap`` is passed
    over; equal costs go to the lower load, then the first. ``least`` is a wait no candidate
    goes below: deepest first, the cost bound only rises, so the walk stops where even that
    wait cannot beat the best so far. A caller that knows a candidate of wait ``least`` passes
    it in (``best``, its cost and cached tokens): the walk then also stops where a holder can
    at most tie with it. Returns (index or -1, its cost, its cached tokens, whether any
    holder counted). (One pass in C in the extension.)"""
    ties_stop = best >= 0
    found = False
    for slot, d in held.items():
        c = (d if d < usable else usable) * block_size
        if c < floor or c <= 0:
            continue
        found = True
        if best >= 0:
            bound = least + miss_weight * (ntok - c)
            if bound > best_cost or (ties_stop and bound == best_cost):
                break
        if recent[slot] + 1 > limit:  # served more than its share lately
            continue
        i = pos[slot]
        x = loads[i]
        if x > cap:  # never more than the slack above the least loaded
            continue
        cost = bias[slot] + load_weight * x + miss_weight * (ntok - c)
        if best < 0 or cost < best_cost or (cost == best_cost and x < loads[best]):
            best, best_cost, best_c = i, cost, c
    return best, float(best_cost), float(best_c), found


class PrefixIndex:
    """Which worker slots hold which block hashes, within a hard byte budget (LRU)."""

    def __init__(self, budget_bytes: int, max_nodes: int | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        if max_nodes is not None and max_nodes < 0:
            raise ValueError("max_nodes must be >= 0")
        self.budget_bytes = budget_bytes
        self._cap_override = max_nodes
        self._nodes: OrderedDict[int, int] = OrderedDict()  # hash -> slot bit set; LRU first
        self._slots = 64  # slot range the estimate is charged for (grows in words of 64)
        self.evictions = 0
        self.max_nodes = self._max_nodes()

    def _max_nodes(self) -> int:
        n = nodes_for_budget(self.budget_bytes, self._slots)
        return n if self._cap_override is None else min(n, self._cap_override)

    def _need_slot(self, slot: int) -> None:
        if not 0 <= slot < MAX_SLOTS:
            raise ValueError(f"slot {slot} out of range 0..{MAX_SLOTS - 1}")
        if slot >= self._slots:
            self._slots = (slot // 64 + 1) * 64
            self.max_nodes = self._max_nodes()
            self._evict_to(self.max_nodes)

    def _evict_to(self, limit: int) -> None:
        nodes = self._nodes
        while len(nodes) > limit:
            nodes.popitem(last=False)
            self.evictions += 1

    def resize(self, budget_bytes: int) -> None:
        """A new budget; when it holds fewer nodes, the least recently used go first."""
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self.max_nodes = self._max_nodes()
        self._evict_to(self.max_nodes)

    # -- writes --------------------------------------------------------------------------------
    def insert(self, slot: int, hashes: Sequence[int], n: int = -1) -> int:
        """``slot`` holds the blocks ``hashes[:n]`` (all when n < 0); returns new nodes."""
        self._need_slot(slot)
        if n < 0 or n > len(hashes):
            n = len(hashes)
        if self.max_nodes == 0:
            return 0
        bit = 1 << slot
        nodes = self._nodes
        added = 0
        for i in range(n - 1, -1, -1):  # deepest first: the prefix ends up most recent
            h = hashes[i]
            mask = nodes.get(h)
            if mask is None:
                if len(nodes) >= self.max_nodes:
                    nodes.popitem(last=False)
                    self.evictions += 1
                nodes[h] = bit
                added += 1
            else:
                nodes[h] = mask | bit
                nodes.move_to_end(h)
        return added

    def remove(self, slot: int, h: int) -> bool:
        """``slot`` no longer holds block ``h``; True if it did."""
        if not 0 <= slot < MAX_SLOTS:
            raise ValueError(f"slot {slot} out of range 0..{MAX_SLOTS - 1}")
        mask = self._nodes.get(h)
        bit = 1 << slot
        if mask is None or not mask & bit:
            return False
        mask &= ~bit
        if mask:
            self._nodes[h] = mask
        else:
            del self._nodes[h]
        return True

    def clear_slot(self, slot: int) -> int:
        """Forget everything ``slot`` holds (a worker left, or switched to KV events); O(nodes).
        Returns how many blocks it held."""
        if not 0 <= slot < MAX_SLOTS:
            raise ValueError(f"slot {slot} out of range 0..{MAX_SLOTS - 1}")
        bit = 1 << slot
        nodes = self._nodes
        held = [h for h, m in nodes.items() if m & bit]
        for h in held:
            m = nodes[h] & ~bit
            if m:
                nodes[h] = m
            else:
                del nodes[h]
        return len(held)

    def clear(self) -> None:
        self._nodes.clear()

    # -- reads ---------------------------------------------------------------------------------
    def holders(self, h: int) -> int:
        """The slot bit set of block ``h`` (0 when absent); does not touch the LRU order."""
        return self._nodes.get(h, 0)

    def match(
        self, hashes: Sequence[int], n: int, query: bytes, min_depth: int = 1
    ) -> dict[int, int]:
        """Longest cached prefix, in blocks, of ``hashes[:n]`` for each slot in ``query``
        (from :func:`slot_mask`); slots matching fewer than ``min_depth`` blocks are left
        out. Read-only: a match is not a use (the dispatch that follows inserts, and that
        refreshes the LRU order). Slots come out deepest first."""
        if n < 0 or n > len(hashes):
            n = len(hashes)
        q = int.from_bytes(query, "little")
        nodes = self._nodes
        if n == 0 or not q:
            return {}
        remaining = nodes.get(hashes[0], 0) & q
        out: dict[int, int] = {}
        min_depth = max(min_depth, 1)
        if min_depth > n:
            return out
        if min_depth > 1:  # one probe drops every slot that cannot reach min_depth
            remaining &= nodes.get(hashes[min_depth - 1], 0)
        lo, hi = min_depth, n  # every remaining slot holds at least `lo` blocks
        while remaining and hi >= lo:
            # deepest depth d in [lo, hi] where some remaining slot still holds block d-1
            if nodes.get(hashes[hi - 1], 0) & remaining:
                d = hi
            else:
                a, b = lo, hi - 1  # invariant: a holds, b + 1 does not
                while a < b:
                    mid = (a + b + 1) >> 1
                    if nodes.get(hashes[mid - 1], 0) & remaining:
                        a = mid
                    else:
                        b = mid - 1
                d = a
            deepest = nodes.get(hashes[d - 1], 0) & remaining
            m = deepest
            while m:
                low = m & -m
                out[low.bit_length() - 1] = d
                m ^= low
            remaining &= ~deepest
            hi = d - 1
        return out

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def node_bytes(self) -> int:
        return _node_bytes(self._slots)

    def statistics(self) -> dict[str, int]:
        """Nodes, their estimated bytes (never above the budget), evictions so far."""
        return {
            "nodes": len(self._nodes),
            "max_nodes": self.max_nodes,
            "bytes": _FIXED + len(self._nodes) * self.node_bytes,
            "budget_bytes": self.budget_bytes,
            "evictions": self.evictions,
            "slot_words": self._slots // 64,
        }

    def __repr__(self) -> str:
        return f"PrefixIndex(nodes={len(self._nodes)}, max_nodes={self.max_nodes})"


def _self_check() -> None:  # pragma: no cover - import-time sanity, cheap
    assert sys.hash_info.width == 64, "block hashes assume a 64-bit build"


_self_check()
