"""Cache-aware routing: send a prompt where its prefix is already cached, unless that worker is
busy enough that waiting costs more than recomputing.

**What is cached where.** Each worker's prefix cache is predicted by a bounded index of chained
block hashes (`routing/prefix.py`): block i of the prompt (``block_size`` tokens, vLLM's 16 by
default) hashes together with block i-1, so a hash names its whole prefix, as vLLM's keys do.
A dispatch records that the worker now holds the prompt's blocks (approximate mode). When the
gateway feeds a worker's engine KV events (:meth:`on_kv_event`), that worker's blocks come from
the events alone (exact mode): stored, removed, cleared. The index has a hard byte budget with
LRU eviction (leaves first); its size is in :meth:`statistics`.

Tokens are the chat-templated ids the engine caches (``ctx.tokens``; ANCHORS complaint 6).
Without a tokenizer, ``ctx.text_key`` (the raw conversation bytes) is hashed in 4-byte words,
``4 * block_size`` bytes per block, and a "token" below means 4 bytes. Either way the whole
conversation counts, not its first message (complaint 5).

**Tiers.** KV events carry the medium a block is stored in (vLLM: ``GPU``, and ``CPU`` for
its offloading connector; others for disk or remote stores). Blocks of a non-GPU medium are
indexed in a slot of their own per worker, and a worker's cached tokens are credited per tier:
walking its tiers from the heaviest weight down, each tier adds ``weight x`` the blocks it holds
beyond the tiers above (``tier_weights``, by default GPU 1.0, CPU 0.75, DISK 0.25 as Dynamo's
router weighs device, host and disk hits): that credit is ``cached(w)`` below. A medium
without a weight is ignored. Without any non-GPU event the matched blocks count as they are.

**The decision** minimises the expected time to first token, in tokens of prefill (prefill
time grows about linearly with the tokens computed). On worker w (:func:`prefill_cost`):

    cost(w) = wait(w) + prompt tokens - cached(w)
    wait(w) = queued(w) + load_tokens * L(w) + SPREAD_TOKENS * recent(w)

``queued(w)``: the prefill work dispatched to w that has not ended, each request's tokens not
predicted cached there plus ``request_tokens`` (tracked from ``on_dispatch`` to its first token,
``on_first_token``, or its end; a first token also ends the prefills sent there before it, as
engines prefill first come, first served). Requests that only decode delay a new prefill
little: they count ``load_tokens`` each through L(w), the load (requests in flight plus the
engine's queue, as least_load). ``recent(w)``: w's share of the last ``SPREAD_ROUNDS`` rounds of
the fleet's dispatches, a small term that places new prefixes on the workers that serve least.
``cached(w)`` counts only when it is at least ``cache_threshold`` of the prompt (complaint 4);
with tiers it is the tier-weighted credit above.

Two bounds hold whatever the costs. A worker more than the slack S = max(
balance_abs_threshold, (balance_rel_threshold - 1) * L_min) above the least loaded is never
chosen (SGLang's imbalance thresholds as one number, per worker: a conversation on a worker
that is not the hot one keeps its affinity, complaint 3; load is always counted, complaint 2).
And a worker takes a cache hit only while its recent dispatches stay within
``bounded_load_factor`` times the mean (+2): a hot prefix held by few workers then spreads
(complaints 1, 2), as consistent hashing with bounded loads spreads a hot key. A miss goes to
the least wait, never to the worker with the smallest index (complaint 1). Ties go to the
worker whose oldest queued prefill was sent first (it is nearer done), then round robin. A
least-loaded worker that no decision chose for ``STARVE_ROUNDS`` rounds of the fleet gets the
next request ("warm"): a joining worker then holds the hot prefixes too.
"""

from __future__ import annotations

import hashlib
import types
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

from ...workers.worker import Worker
from .. import prefix as _prefix
from ..kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from ..policy import Policy, RouteContext, RouteInfo
from .least_load import loads_of

if TYPE_CHECKING:
    from ...config import RoutingConfig

_MAX_VIEWS = 16  # candidate sets remembered (models x roles)
#: what one engine-hash alias costs in a dict (key, value, table share), measured with
#: tracemalloc on CPython 3.11: ~124 B with vLLM's int hashes, ~153 B with 32-byte digests
ALIAS_BYTES = 152
#: share of the budget the aliases may take once KV events arrive (the index keeps the rest)
ALIAS_SHARE = 4
#: a least-loaded worker passed over for this many rounds of the fleet gets the next request
STARVE_ROUNDS = 4
#: credit per tier of a cached block (Dynamo's defaults: device, host, disk)
DEFAULT_TIER_WEIGHTS = {"GPU": 1.0, "CPU": 0.75, "DISK": 0.25}
#: ``recent(w)`` counts w's dispatches among the last this many rounds of the fleet
SPREAD_ROUNDS = 32
#: what each of those recent dispatches adds to a worker's wait, in tokens (a tie-breaker that
#: places new prefixes, and splits a shared one, toward the workers that serve least)
SPREAD_TOKENS = 8.0
#: replication (``replicas`` > 1): a prefix hit this many times is hot enough for another holder
HOT_HITS = 4
#: ... and is warmed on one more worker at most once per this many rounds of the fleet
WARM_ROUNDS = 8
#: prefixes whose heat is remembered (least recently hit forgotten first)
_HEAT_KEYS = 4096
#: past this many holders, the least wait of all candidates (one compiled pass) is weighed
#: first: it bounds the walk over the holders, which stops at once when that one holds too
_SEED_ABOVE = 4


def prefill_cost(
    wait: float, prompt_tokens: int, cached_tokens: int, miss_weight: float = 1.0
) -> float:
    """A request's expected time to first token on a worker, in tokens of prefill: what it
    waits for there (``wait``: the queued prefill work and the load, see the module doc), then
    its own prefill, the prompt tokens not cached there (weighed by ``miss_weight``: above 1,
    the delay a long prefill imposes on the requests queued behind it counts too). (Its own
    fixed per-request cost is the same everywhere and left out.)"""
    return wait + miss_weight * (prompt_tokens - cached_tokens)


class _Queued:
    """A dispatched request whose prefill has not ended (no first token seen yet)."""

    __slots__ = ("cost", "live", "seq", "slot")

    def __init__(self, slot: int, cost: float, seq: int) -> None:
        self.slot = slot
        self.cost = cost
        self.seq = seq
        self.live = True


class _View:
    """A candidate set as the index sees it: each candidate's slot and the query bit set
    (with tiers: also every tier slot, and which candidate and weight each belongs to)."""

    __slots__ = ("owner", "pos", "query", "slots")

    def __init__(
        self, slots: list[int], query: bytes, owner: dict[int, tuple[int, float]] | None = None
    ) -> None:
        self.slots = slots
        self.pos = {s: i for i, s in enumerate(slots) if s >= 0}
        self.query = query
        self.owner = owner


class _Decision:
    __slots__ = ("depths", "info", "usable", "warm")

    def __init__(self, info: RouteInfo, depths: dict[int, int], usable: int) -> None:
        self.info = info
        self.depths = depths  # slot -> matched blocks
        self.usable = usable  # blocks that can count as cached (vLLM computes the last token)
        self.warm: Worker | None = None  # a second holder to prefill the prompt on


class CacheAware(Policy):
    name = "cache_aware"
    needs_tokens = True
    wants_kv_events = True

    def __init__(
        self,
        block_size: int = 16,
        budget_bytes: int = 64 * 1024 * 1024,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 4,
        balance_rel_threshold: float = 1.5,
        max_prefix_tokens: int = 65536,
        prefix_module: types.ModuleType | None = None,
        tier_weights: Mapping[str, float] | None = None,
        request_tokens: float = 32.0,
        load_tokens: float = 64.0,
        bounded_load_factor: float = 1.25,
        replicas: int = 1,
        miss_weight: float = 1.0,
    ) -> None:
        if block_size < 1 or max_prefix_tokens < block_size:
            raise ValueError("block_size must be >= 1 and max_prefix_tokens >= block_size")
        if not 0.0 <= cache_threshold <= 1.0 or balance_abs_threshold < 0:
            raise ValueError("cache_threshold must be 0..1 and balance_abs_threshold >= 0")
        if balance_rel_threshold < 1.0:
            raise ValueError("balance_rel_threshold must be >= 1")
        if not (0.0 <= request_tokens <= 1e9 and 0.0 <= load_tokens <= 1e9):
            raise ValueError("request_tokens and load_tokens must be 0..1e9")
        if not 1.0 < bounded_load_factor <= 100.0:
            raise ValueError("bounded_load_factor must be > 1 and <= 100")
        weights = DEFAULT_TIER_WEIGHTS if tier_weights is None else tier_weights
        self.tier_weights = {k.upper(): float(v) for k, v in weights.items()}
        if any(not 0.0 <= w <= 1.0 for w in self.tier_weights.values()):
            raise ValueError("tier weights must be between 0 and 1")
        mod = prefix_module or _prefix
        self._block_hashes = mod.block_hashes
        self._text_block_hashes = mod.text_block_hashes
        self._slot_mask = mod.slot_mask
        self._least_wait_of = mod.least_wait
        self._best_holder = mod.best_holder
        self._token_seed = mod.TOKEN_SEED
        self._text_seed = mod.TEXT_SEED
        #: (LoRA adapter, base seed) -> the adapter's root seed (adapters cache apart)
        self._lora_seeds: dict[tuple[str, int], int] = {}
        self._max_slots = mod.MAX_SLOTS
        self.block_size = block_size
        self.budget_bytes = budget_bytes
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs_threshold
        self.balance_rel = balance_rel_threshold
        self.max_blocks = max_prefix_tokens // block_size
        self.request_tokens = float(request_tokens)
        self.load_tokens = float(load_tokens)
        self.bounded_load_factor = bounded_load_factor
        if not 1 <= replicas <= 16:
            raise ValueError("replicas must be 1..16")
        #: holders a hot prefix should have (1: no replication)
        self.replicas = replicas
        if not 1.0 <= miss_weight <= 100.0:
            raise ValueError("miss_weight must be 1..100")
        #: what an uncached prompt token weighs against a queued one (module doc)
        self.miss_weight = float(miss_weight)
        self._heat: OrderedDict[int, int] = OrderedDict()  # prefix key -> hits (bounded)
        self._warmed: dict[int, int] = {}  # prefix key -> round it was last warmed
        self.warmups = 0
        self._index = mod.PrefixIndex(budget_bytes)
        self._memo_key = ("prefix", block_size, self.max_blocks)
        self._slots: dict[str, int] = {}  # worker id -> slot in the index
        self._slot_ids: dict[int, str] = {}  # and back
        self._free: list[int] = []  # released slots, reused lowest first
        self._next_slot = 0
        self._views: dict[tuple[Worker, ...], _View] = {}
        self._last_candidates: object = None
        self._last_view: _View | None = None
        self._cursor = 0
        self._last: _Decision | None = None
        self._picked: dict[str, int] = {}  # worker id -> decision number it was last chosen
        # Per slot (index -1, the slot of workers past MAX_SLOTS, stays 0): the wait that does
        # not depend on the load, queued prefill work + SPREAD_TOKENS x recent dispatches; the
        # recent dispatches (the last ones' slots in ``_ring``); the queued requests in order.
        self._bias = [0.0] * (self._max_slots + 1)
        self._recent = [0] * (self._max_slots + 1)
        self._front = [0] * (self._max_slots + 1)  # the oldest queued prefill's seq (0: none)
        self._ring: deque[int] = deque()
        self._rcount = [0]  # known workers by their number of recent dispatches
        self._rmin = 0  # the fewest recent dispatches of any known worker
        self._fifo: dict[int, deque[_Queued]] = {}
        self._qkey = ("queued", id(self))  # this policy's _Queued in a request's memo
        self._seq = 0
        self.queued_requests = 0
        self.queued_tokens = 0.0
        self._round = 0  # decisions here plus those other replicas reported (import_hint)
        # tiers: (worker id, medium) -> slot of that worker's blocks in a non-GPU medium
        self._tier_slots: dict[tuple[str, str], int] = {}
        self.tier_blocks: dict[str, int] = {}  # blocks stored per medium (from events)
        # gateway replicas (lmgw.workers.replicas): dispatch predictions go out through
        # hint_sink(worker id, block hashes) and come in through import_hint
        self.hint_sink: Any = None
        self.hints_imported = 0
        # exact mode
        self._exact: set[str] = set()
        self._alias: dict[Any, Any] = {}  # engine block hash -> our hash (or tuple of ours)
        self._alias_max = 0
        self._alias_dropped = 0
        # counters (statistics())
        self.decisions = 0
        self.reasons: dict[str, int] = dict.fromkeys(
            ("cache", "load", "below_threshold", "no_match", "no_prompt", "warm"), 0
        )
        self.prompt_tokens = 0
        self.predicted_tokens = 0
        self.kv_events = 0
        self.kv_ignored = 0
        self.kv_unresolved = 0
        self.audits = 0
        self.audit_predicted = 0
        self.audit_cached = 0
        self.audit_matched = 0

    @classmethod
    def from_config(cls, cfg: RoutingConfig) -> CacheAware:
        return cls(
            cfg.cache_aware_block_size,
            cfg.cache_aware_budget_bytes,
            cfg.cache_threshold,
            cfg.balance_abs_threshold,
            cfg.balance_rel_threshold,
            cfg.cache_aware_max_prefix_tokens,
            tier_weights=cfg.cache_tier_weights,
            request_tokens=cfg.cache_aware_request_tokens,
            load_tokens=cfg.cache_aware_load_tokens,
            bounded_load_factor=cfg.bounded_load_factor,
            replicas=cfg.cache_aware_replicas,
            miss_weight=cfg.cache_aware_miss_weight,
        )

    # -- prompt and candidate set ---------------------------------------------------------------
    def _prompt(self, ctx: RouteContext) -> tuple[Any, int]:
        """(block hashes or None, prompt length in tokens), computed once per request."""
        memo = ctx.scratch
        if memo is not None:
            got = memo.get(self._memo_key)
            if got is not None:
                return got
        tokens = ctx.tokens
        lora = ctx.lora
        if tokens is not None:
            seed = self._token_seed if lora is None else self._lora_seed(lora, self._token_seed)
            hashes = self._block_hashes(tokens, self.block_size, self.max_blocks, seed)
            got = (hashes, len(tokens))
        elif ctx.text_key is not None:
            data = ctx.text_key
            seed = self._text_seed if lora is None else self._lora_seed(lora, self._text_seed)
            hashes = self._text_block_hashes(data, 4 * self.block_size, self.max_blocks, seed)
            got = (hashes, len(data) // 4)
        else:
            got = (None, 0)
        ctx.memo()[self._memo_key] = got
        return got

    def _lora_seed(self, name: str, base: int) -> int:
        """The chain root of a LoRA adapter's blocks: an engine caches an adapter's blocks
        apart from the base model's and other adapters' (vLLM keys each block by its adapter),
        so a prompt the base model cached is no hit for the adapter. Stable across processes
        (gateway replicas share block hashes), unlike ``hash(str)``."""
        seed = self._lora_seeds.get((name, base))
        if seed is None:
            digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
            seed = hash((base, int.from_bytes(digest, "little", signed=True)))
            if len(self._lora_seeds) < 4096:  # bounded: names come from requests' models
                self._lora_seeds[(name, base)] = seed
        return seed

    def _new_slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next_slot < self._max_slots:
            self._next_slot += 1
            return self._next_slot - 1
        return -1  # more workers than slots: this one is routed by load only

    def _slot(self, wid: str) -> int:
        slot = self._slots.get(wid)
        if slot is None:
            slot = self._new_slot()
            if slot < 0:
                return -1
            self._slots[wid] = slot
            self._slot_ids[slot] = wid
            self._rcount[0] += 1  # a worker with no recent dispatch
            self._rmin = 0
        return slot

    def _recount(self, slot: int, delta: int) -> None:
        """``recent[slot] += delta`` (+1 or -1), keeping ``_rmin``, the fewest recent
        dispatches of any known worker (so ``SPREAD_TOKENS x _rmin`` bounds every wait)."""
        recent, count = self._recent, self._rcount
        old = recent[slot]
        new = old + delta
        recent[slot] = new
        count[old] -= 1
        if new == len(count):
            count.append(0)
        count[new] += 1
        if new < self._rmin or (old == self._rmin and not count[old]):
            self._rmin = new

    def _tier_slot(self, wid: str, medium: str) -> int:
        """The slot of ``wid``'s blocks in ``medium`` (the GPU's is the worker's own)."""
        if medium == "GPU":
            return self._slot(wid)
        slot = self._tier_slots.get((wid, medium))
        if slot is None:
            slot = self._new_slot()
            if slot < 0:
                return -1
            self._tier_slots[(wid, medium)] = slot
            self._views.clear()  # candidate views now include this slot
            self._last_candidates = self._last_view = None
        return slot

    def _view(self, candidates: Sequence[Worker]) -> _View:
        if candidates is self._last_candidates:
            return self._last_view  # type: ignore[return-value]
        cacheable = isinstance(candidates, tuple)
        view = self._views.get(candidates) if cacheable else None  # type: ignore[call-overload]
        if view is None:
            slots = [self._slot(w.id) for w in candidates]
            owner: dict[int, tuple[int, float]] | None = None
            if self._tier_slots:
                weights = self.tier_weights
                gpu = weights.get("GPU", 1.0)
                owner = {s: (i, gpu) for i, s in enumerate(slots) if s >= 0}
                index = {w.id: i for i, w in enumerate(candidates)}
                for (wid, medium), s in self._tier_slots.items():
                    i = index.get(wid)
                    if i is not None:
                        owner[s] = (i, weights.get(medium, 0.0))
                view = _View(slots, self._slot_mask(owner), owner)
            else:
                view = _View(slots, self._slot_mask(s for s in slots if s >= 0))
            if cacheable:
                if len(self._views) >= _MAX_VIEWS:
                    self._views.pop(next(iter(self._views)))
                self._views[candidates] = view  # type: ignore[index]
        if cacheable:
            self._last_candidates, self._last_view = candidates, view
        return view

    # -- decision -------------------------------------------------------------------------------
    def choose(self, candidates: Sequence[Worker], ctx: RouteContext) -> Worker:
        hashes, ntok = self._prompt(ctx)
        n = len(candidates)
        view = self._view(candidates)
        slots = view.slots
        loads = loads_of(candidates)
        lmin = min(loads)
        cap = lmin + max(self.balance_abs, (self.balance_rel - 1.0) * lmin)
        start = self._cursor % n
        self._cursor += 1
        try:
            base = loads.index(lmin, start)
        except ValueError:
            base = loads.index(lmin)
        bias = self._bias
        lt = self.load_tokens
        g = self.miss_weight
        least = lt * lmin + SPREAD_TOKENS * self._rmin  # no candidate waits less
        best = -1
        best_cost = 0.0
        best_c = 0.0
        depths: dict[int, int] = {}
        usable = 0
        found = scanned = False
        if hashes is None or not len(hashes):
            reason = "no_prompt" if hashes is None else "no_match"
        else:
            bs = self.block_size
            floor = self.cache_threshold * ntok
            # tiers shallower than the threshold cannot count: the index skips them
            depths = self._index.match(hashes, len(hashes), view.query, -int(-floor // bs))
            reason = "no_match"
            if depths:
                usable = (ntok - 1) // bs
                # blocks each holder has, deepest first: matched, or with tiers credited
                held: dict[int, Any] = depths
                if view.owner is not None:
                    held, depths = self._tier_credit(view, depths, usable)
                limit = self.bounded_load_factor * (len(self._ring) + 1) / n + 2
                recent = self._recent
                if len(held) > _SEED_ABOVE:
                    # Many hold the prompt: the least wait of all candidates (one compiled
                    # pass), weighed as a hit or a miss first, bounds the walk tightly; when
                    # it holds the prefix too, the walk stops at once.
                    scanned = True
                    best = self._least_wait(slots, loads, cap, start, base)
                    si = slots[best]
                    least = bias[si] + lt * loads[best]
                    best_c = min(held.get(si, 0), usable) * bs
                    if best_c < floor or recent[si] + 1 > limit:
                        best_c = 0
                    best_cost = prefill_cost(least, ntok, best_c, g)
                # deepest first, stopping where even the least wait cannot beat the best
                best, best_cost, best_c, found = self._best_holder(
                    held, usable, bs, floor, bias, loads, recent, view.pos, limit, cap,
                    lt, g, ntok, least, best, best_cost, best_c,
                )  # fmt: skip
                reason = "cache" if best_c > 0 else "load" if found else "below_threshold"
        if not scanned and (best < 0 or best_cost >= prefill_cost(least, ntok, 0, g)):
            # a miss may do as well: the least wait within the slack (a full scan, only now)
            miss = self._least_wait(slots, loads, cap, start, base)
            cost = prefill_cost(bias[slots[miss]] + lt * loads[miss], ntok, 0, g)
            if best < 0 or cost < best_cost or (cost == best_cost and loads[miss] < loads[best]):
                best = miss
                if reason == "cache":
                    reason = "load"
        # Starvation guard: a least-loaded worker nobody chose for STARVE_ROUNDS rounds of the
        # fleet (one that joined while every prompt shares a hot prefix others hold) gets this
        # request, after which it holds the prefix and competes on equal terms. (A worker never
        # chosen counts from round 0, not from when this replica first saw it idle: gateway
        # replicas then agree on who is starved.)
        if (
            reason == "cache"
            and best != base
            and self._round - self._picked.get(candidates[base].id, 0) > STARVE_ROUNDS * n
        ):
            best, reason = base, "warm"
        worker = candidates[best]
        self._picked[worker.id] = self._round
        self._round += 1
        predicted = 0
        if depths:
            slot = self._slots.get(worker.id, -1)
            predicted = min(depths.get(slot, 0), usable) * self.block_size
        self.decisions += 1
        self.reasons[reason] += 1
        self.prompt_tokens += ntok
        self.predicted_tokens += predicted
        info = RouteInfo(self.name, worker.id, reason, predicted, ntok)
        decision = _Decision(info, depths, usable)
        if self.replicas > 1 and reason == "cache" and len(depths) < self.replicas:
            decision.warm = self._warm(candidates, slots, loads, cap, hashes, depths, best, usable)
        self._last = decision
        ctx.memo()[self] = decision
        return worker

    def _warm(
        self,
        candidates: Sequence[Worker],
        slots: list[int],
        loads: list[float],
        cap: float,
        hashes: Any,
        depths: dict[int, int],
        best: int,
        usable: int,
    ) -> Worker | None:
        """Replication: a hot prefix (hit ``HOT_HITS`` times) held by fewer than ``replicas``
        candidates gets one more holder, the non-holder with the least wait: the pipeline
        prefills the prompt there in the background, so that the next requests choose between
        two holders by their queues (two choices cut the queueing of a busy holder) instead of
        one request paying a miss to spread it."""
        d = min(depths.get(slots[best], 0), usable)
        if d <= 0:
            return None
        key = hashes[d - 1]  # names the prefix the holder has (block hashes chain)
        heat = self._heat
        hits = heat.pop(key, 0) + 1
        heat[key] = hits
        if len(heat) > _HEAT_KEYS:
            heat.popitem(last=False)
        if hits < HOT_HITS:
            return None
        last = self._warmed.get(key)
        if last is not None and self._round - last < WARM_ROUNDS * len(candidates):
            return None
        bias, lt = self._bias, self.load_tokens
        target, least = -1, 0.0
        for j, slot in enumerate(slots):
            if slot < 0 or slot in depths or loads[j] > cap:
                continue
            wait = bias[slot] + lt * loads[j]
            if target < 0 or wait < least:
                target, least = j, wait
        if target < 0:
            return None
        if len(self._warmed) > _HEAT_KEYS:
            self._warmed.clear()
        self._warmed[key] = self._round
        self.warmups += 1
        return candidates[target]

    def warm_target(self, ctx: RouteContext) -> Worker | None:
        decision = ctx.scratch.get(self) if ctx.scratch else None
        return decision.warm if decision is not None else None

    def peek(self, candidates: Sequence[Worker], ctx: RouteContext) -> Worker:
        """The worker :meth:`choose` would pick now, without recording the decision (no
        cursor, counters, starvation clock or explanation change): for comparing the decisions
        of gateway replicas on the same request."""
        saved = (self._cursor, self._round, dict(self._picked), self.decisions, dict(self.reasons),
                 self.prompt_tokens, self.predicted_tokens, self._last)  # fmt: skip
        try:
            return self.choose(candidates, ctx)
        finally:
            (self._cursor, self._round, self._picked, self.decisions, self.reasons,
             self.prompt_tokens, self.predicted_tokens, self._last) = saved  # fmt: skip
            if ctx.scratch:
                ctx.scratch.pop(self, None)

    def _tier_credit(
        self, view: _View, depths: dict[int, int], usable: int
    ) -> tuple[dict[int, float], dict[int, int]]:
        """With tiers (some worker reported non-GPU blocks): each candidate's cached blocks
        credited by weight, walking its tiers from the heaviest down, each tier for the blocks
        it holds beyond the tiers above; by the candidate's GPU slot, largest credit first (for
        the cost, :func:`prefill_cost`). Also the deepest match per candidate (what the audit
        predicts)."""
        owner = view.owner
        assert owner is not None
        per: dict[int, list[tuple[float, int]]] = {}
        for slot, d in depths.items():
            i, weight = owner[slot]
            per.setdefault(i, []).append((weight, d if d < usable else usable))
        credit: dict[int, float] = {}
        deepest: dict[int, int] = {}
        for i, tiers in per.items():
            tiers.sort(reverse=True)  # heaviest tier first
            covered = total = 0.0
            for weight, d in tiers:
                if d > covered:
                    total += weight * (d - covered)
                    covered = d
            deepest[view.slots[i]] = int(covered)
            if total > 0:
                credit[view.slots[i]] = total
        ranked = dict(sorted(credit.items(), key=lambda kv: kv[1], reverse=True))
        return ranked, deepest

    def _least_wait(
        self, slots: list[int], loads: list[float], cap: float, start: int, base: int
    ) -> int:
        """The candidate with the least wait among those within the slack (one pass over the
        fleet, compiled); ties go to the one whose oldest queued prefill was sent first (the
        nearest to done: dispatch order stands in for a clock), then round robin."""
        i = self._least_wait_of(self._bias, self._front, slots, loads, self.load_tokens, cap, start)
        return base if i < 0 else i

    # -- hooks ----------------------------------------------------------------------------------
    def on_dispatch(self, worker: Worker, ctx: RouteContext) -> None:
        """Queue the request's prefill on ``worker``, count the dispatch, and predict on route:
        once it has prefilled, the worker holds the prompt's blocks."""
        hashes, ntok = self._prompt(ctx)
        wid = worker.id
        slot = self._slot(wid)
        if slot >= 0:
            self._queue(slot, ctx, ntok)
        if wid in self._exact or hashes is None or not len(hashes):
            return  # an engine that sends KV events says itself what it stored
        if slot >= 0:
            self._index.insert(slot, hashes)
        if self.hint_sink is not None:
            self.hint_sink(wid, hashes)

    def import_hint(self, worker: Worker, hashes: Sequence[int]) -> None:
        """Another gateway replica dispatched a prompt with these block hashes to ``worker``:
        predict it as if this replica had (unless the worker's engine sends KV events), and
        count the decision, so that the replicas' tie-break cursors and starvation rounds move
        together and they decide alike."""
        self._cursor += 1
        self._picked[worker.id] = self._round
        self._round += 1
        slot = self._slot(worker.id)
        if slot < 0:
            return
        self._count(slot)  # its share of recent dispatches: all the replicas' (no queue: unknown)
        if worker.id in self._exact or not len(hashes):
            return
        self._index.insert(slot, hashes)
        self.hints_imported += 1

    def _queue(self, slot: int, ctx: RouteContext, ntok: int) -> None:
        memo = ctx.memo()
        old = memo.get(self._qkey)
        if old is not None and old.live:  # dispatched again without a finish: count it once
            self._release(old)
        # the work it queues: the prompt tokens the decision predicted not cached there
        decision = memo.get(self)
        cached = 0
        if decision is not None and decision.depths:
            cached = min(decision.depths.get(slot, 0), decision.usable) * self.block_size
        self._seq += 1
        entry = _Queued(slot, max(0, ntok - cached) + self.request_tokens, self._seq)
        memo[self._qkey] = entry
        q = self._fifo.get(slot)
        if q is None:
            q = self._fifo[slot] = deque()
            self._front[slot] = entry.seq
        q.append(entry)
        self.queued_requests += 1
        self.queued_tokens += entry.cost
        self._bias[slot] += entry.cost
        self._count(slot)

    def _count(self, slot: int) -> None:
        """One more dispatch to ``slot`` in the recent window (the oldest one leaves it)."""
        bias, ring = self._bias, self._ring
        bias[slot] += SPREAD_TOKENS
        self._recount(slot, 1)
        ring.append(slot)
        if len(ring) > SPREAD_ROUNDS * max(1, len(self._slots)):
            old_slot = ring.popleft()
            self._recount(old_slot, -1)
            bias[old_slot] -= SPREAD_TOKENS
            if old_slot not in self._fifo:
                bias[old_slot] = SPREAD_TOKENS * self._recent[old_slot]  # exact, no drift

    def on_first_token(self, worker: Worker, ctx: RouteContext) -> None:
        """The request's first token came: its prefill ended, and so did the prefills of the
        requests sent to ``worker`` before it (engines prefill first come, first served)."""
        entry = ctx.scratch.get(self._qkey) if ctx.scratch else None
        if entry is not None and entry.live:
            self._drain(entry)

    def on_finish(self, worker: Worker, ctx: RouteContext, ok: bool) -> None:
        """The request ended: its prefill is no longer queued, whatever happened (a success
        also ends the prefills sent before it, as a first token does)."""
        entry = ctx.scratch.pop(self._qkey, None) if ctx.scratch else None
        if entry is not None and entry.live:
            if ok:
                self._drain(entry)
            else:
                self._release(entry)

    def _release(self, entry: _Queued) -> None:
        entry.live = False
        self.queued_requests -= 1
        self.queued_tokens -= entry.cost
        slot = entry.slot
        q = self._fifo.get(slot)
        if q is None:  # its worker left meanwhile
            return
        while q and not q[0].live:
            q.popleft()
        if q:
            self._bias[slot] -= entry.cost
            self._front[slot] = q[0].seq
        else:  # nothing queued there: exact, whatever the float sums left
            del self._fifo[slot]
            self._front[slot] = 0
            self._bias[slot] = SPREAD_TOKENS * self._recent[slot]
            if not self._fifo:
                self.queued_tokens = 0.0

    def _drain(self, entry: _Queued) -> None:
        """Release ``entry`` and every request queued on its worker before it."""
        seq, slot = entry.seq, entry.slot
        q = self._fifo.get(slot)
        while q and q[0].seq < seq:
            if q[0].live:
                self._release(q[0])  # pops it and the dead ones behind it
            else:
                q.popleft()
            q = self._fifo.get(slot)
        if entry.live:
            self._release(entry)

    def on_usage(
        self, worker: Worker, ctx: RouteContext, prompt_tokens: int, cached_tokens: int | None
    ) -> None:
        if cached_tokens is None:
            return
        predicted = self.predicted_cached_tokens(worker, ctx)
        if predicted is None:
            return
        self.audits += 1
        self.audit_predicted += predicted
        self.audit_cached += cached_tokens
        self.audit_matched += min(predicted, cached_tokens)

    def on_worker_removed(self, worker: Worker) -> None:
        slot = self._slots.pop(worker.id, None)
        if slot is not None and self._slot_ids.get(slot) == worker.id:
            del self._slot_ids[slot]
        self._exact.discard(worker.id)
        self._picked.pop(worker.id, None)
        if slot is not None:
            for entry in self._fifo.pop(slot, ()):
                if entry.live:
                    entry.live = False
                    self.queued_requests -= 1
                    self.queued_tokens -= entry.cost
            if not self._fifo:
                self.queued_tokens = 0.0
            # its slot goes to the next new worker: with no queue and no recent dispatches
            self._ring = deque(s for s in self._ring if s != slot)
            count = self._rcount
            count[self._recent[slot]] -= 1
            self._recent[slot] = 0
            self._bias[slot] = 0.0
            self._front[slot] = 0
            # the fewest recent dispatches among the workers left (none: 0)
            self._rmin = next((v for v, c in enumerate(count) if c), 0)
        slots = [] if slot is None else [slot]
        for key in [k for k in self._tier_slots if k[0] == worker.id]:
            slots.append(self._tier_slots.pop(key))
        for slot in slots:
            self._index.clear_slot(slot)
            self._free.append(slot)
        self._free.sort(reverse=True)  # reuse the lowest: keeps the bit sets short
        self._views.clear()
        self._last_candidates = self._last_view = None

    # -- exact mode -------------------------------------------------------------------------------
    def on_kv_event(self, worker: Worker, event: KVEvent) -> None:
        """Feed ``worker``'s engine events: from the first one on, its index entries are the
        blocks the engine reported, replacing the dispatch-time predictions. Blocks of a
        weighted non-GPU medium go to that tier's slot."""
        slot = self._slot(worker.id)
        if slot < 0:
            return
        if worker.id not in self._exact:
            self._exact.add(worker.id)
            self._index.clear_slot(slot)
            if not self._alias_max:  # aliases get their share of the budget from now on
                share = self.budget_bytes // ALIAS_SHARE
                self._index.resize(self.budget_bytes - share)
                self._alias_max = max(1, share // ALIAS_BYTES)
        self.kv_events += 1
        if isinstance(event, AllBlocksCleared):
            self._index.clear_slot(slot)
            return
        medium = "GPU" if event.medium is None else event.medium.upper()
        if event.group_idx not in (None, 0) or medium not in self.tier_weights:
            self.kv_ignored += 1
            return
        if medium != "GPU":
            slot = self._tier_slot(worker.id, medium)
            if slot < 0:
                return
        if isinstance(event, BlockStored):
            if self._stored(slot, event):
                self.tier_blocks[medium] = self.tier_blocks.get(medium, 0) + len(event.block_hashes)
        elif isinstance(event, BlockRemoved):
            alias = self._alias
            for e in event.block_hashes:
                ours = alias.get(e)
                if ours is None:
                    self.kv_unresolved += 1
                elif isinstance(ours, tuple):
                    for h in ours:
                        self._index.remove(slot, h)
                else:
                    self._index.remove(slot, ours)

    def _stored(self, slot: int, event: BlockStored) -> bool:
        bs = self.block_size
        if event.block_size % bs:
            self.kv_ignored += 1
            return False
        alias = self._alias
        if event.lora_id is not None and event.lora_name is None:
            self.kv_ignored += 1  # an adapter's blocks, but which adapter is unknown here
            return False
        if event.parent_block_hash is None:
            seed = self._token_seed
            if event.lora_name is not None:
                seed = self._lora_seed(event.lora_name, seed)
        else:
            parent = alias.get(event.parent_block_hash)
            if parent is None:  # its parent was never seen (or aged out): cannot chain
                self.kv_unresolved += 1
                return False
            seed = parent[-1] if isinstance(parent, tuple) else parent
        ours = self._block_hashes(event.token_ids, bs, -1, seed)
        r = event.block_size // bs
        k = min(len(event.block_hashes), len(ours) // r)
        for j, e in enumerate(event.block_hashes[:k]):
            alias.pop(e, None)  # re-insert: the newest aliases are dropped last
            alias[e] = ours[j] if r == 1 else tuple(ours[j * r : (j + 1) * r])
        if len(alias) > self._alias_max:  # drop the oldest quarter at once (amortized O(1))
            drop = len(alias) - self._alias_max + self._alias_max // 4
            self._alias = dict(islice(alias.items(), drop, None))
            self._alias_dropped += drop
        self._index.insert(slot, ours, k * r)
        return True

    # -- audit and explanation -------------------------------------------------------------------
    def _decision(self, ctx: RouteContext | None) -> _Decision | None:
        if ctx is None:
            return self._last
        return ctx.scratch.get(self) if ctx.scratch else None

    def predicted_cached_tokens(
        self, worker: Worker, ctx: RouteContext | None = None
    ) -> int | None:
        decision = self._decision(ctx)
        if decision is None:
            return None
        slot = self._slots.get(worker.id, -1)
        return min(decision.depths.get(slot, 0), decision.usable) * self.block_size

    def predicted_cached_by_worker(
        self, candidates: Sequence[Worker], ctx: RouteContext
    ) -> dict[str, int]:
        """Only the workers the decision matched (its depths), not one look-up per worker."""
        decision = self._decision(ctx)
        if decision is None:
            return {}
        ids, usable, bs = self._slot_ids, decision.usable, self.block_size
        return {ids[s]: min(d, usable) * bs for s, d in decision.depths.items() if s in ids}

    def route_info(self, ctx: RouteContext | None = None) -> RouteInfo | None:
        decision = self._decision(ctx)
        return decision.info if decision is not None else None

    def statistics(self) -> dict[str, float]:
        """Index size against its budget, evictions, predicted hit ratio, the KV-event feed
        and the precision audit (predicted vs reported cached tokens)."""
        st = self._index.statistics()
        alias_bytes = len(self._alias) * ALIAS_BYTES
        out: dict[str, float] = {
            "entries": st["nodes"],
            "bytes": st["bytes"] + alias_bytes,
            "budget_bytes": self.budget_bytes,
            "evictions": st["evictions"] + self._alias_dropped,
            "hit_ratio": self.predicted_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            "decisions": self.decisions,
            "prompt_tokens": self.prompt_tokens,
            "predicted_tokens": self.predicted_tokens,
            "workers": len(self._slots),
            "exact_workers": len(self._exact),
            "kv_events": self.kv_events,
            "kv_events_ignored": self.kv_ignored,
            "kv_blocks_unresolved": self.kv_unresolved,
            "kv_aliases": len(self._alias),
            "queued_requests": self.queued_requests,
            "queued_tokens": self.queued_tokens,
            "tier_slots": len(self._tier_slots),
            "hints_imported": self.hints_imported,
            "warmups": self.warmups,
            "audit_requests": self.audits,
            "audit_predicted_tokens": self.audit_predicted,
            "audit_cached_tokens": self.audit_cached,
            "audit_matched_tokens": self.audit_matched,
            "precision": self.audit_matched / self.audit_predicted if self.audit_predicted else 1.0,
            "recall": self.audit_matched / self.audit_cached if self.audit_cached else 1.0,
        }
        for reason, count in self.reasons.items():
            out[f"routed_{reason}"] = count
        for medium, count in self.tier_blocks.items():
            out[f"kv_blocks_stored_{medium.lower()}"] = count
        return out

    def decision_counts(self) -> dict[str, int]:
        return self.reasons
