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
router weighs device, host and disk hits). A medium without a weight is ignored. Without any
non-GPU event the policy takes the untiered path below unchanged.

**The decision.** With loads L (requests in flight plus the engine's queue, as least_load),
L_min the least, and the slack S = max(balance_abs_threshold, (balance_rel_threshold - 1) *
L_min) (SGLang's imbalance thresholds as one number):

    cached(w) = tokens of the prompt predicted cached on w (vLLM recomputes the last token)
    ratio(w)  = cached(w) / prompt tokens, counted only when >= cache_threshold
    score(w)  = ratio(w) * S - (L(w) - L_min)

The highest score wins; ties go to the less loaded, then round robin. So a worker is never
chosen while more than S above the least loaded (the fleet-imbalance fallback, per worker: a
conversation on a worker that is not the hot one keeps its affinity, complaint 3), a full hit
is worth at most S requests of extra load, a partial hit proportionally less (a hot shared
system prompt spreads instead of piling, complaints 1, 2, 4), and a miss goes to the least
loaded, never to the worker with the smallest index (complaint 1). A joining worker has the
least load and gets the misses and the spill at once; and since a hot prefix held by the
others can outbid it at light load, a least-loaded worker that no decision chose for
``STARVE_ROUNDS`` rounds of the fleet gets the next request ("warm"): from then on it holds
the prefix too and competes on equal terms.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

from ...workers.worker import Worker
from .. import prefix as _prefix
from ..kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from ..policy import Policy, RouteContext, RouteInfo

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
    __slots__ = ("depths", "info", "usable")

    def __init__(self, info: RouteInfo, depths: dict[int, int], usable: int) -> None:
        self.info = info
        self.depths = depths  # slot -> matched blocks
        self.usable = usable  # blocks that can count as cached (vLLM computes the last token)


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
    ) -> None:
        if block_size < 1 or max_prefix_tokens < block_size:
            raise ValueError("block_size must be >= 1 and max_prefix_tokens >= block_size")
        if not 0.0 <= cache_threshold <= 1.0 or balance_abs_threshold < 0:
            raise ValueError("cache_threshold must be 0..1 and balance_abs_threshold >= 0")
        if balance_rel_threshold < 1.0:
            raise ValueError("balance_rel_threshold must be >= 1")
        weights = DEFAULT_TIER_WEIGHTS if tier_weights is None else tier_weights
        self.tier_weights = {k.upper(): float(v) for k, v in weights.items()}
        if any(not 0.0 <= w <= 1.0 for w in self.tier_weights.values()):
            raise ValueError("tier weights must be between 0 and 1")
        mod = prefix_module or _prefix
        self._block_hashes = mod.block_hashes
        self._text_block_hashes = mod.text_block_hashes
        self._slot_mask = mod.slot_mask
        self._token_seed = mod.TOKEN_SEED
        self._max_slots = mod.MAX_SLOTS
        self.block_size = block_size
        self.budget_bytes = budget_bytes
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs_threshold
        self.balance_rel = balance_rel_threshold
        self.max_blocks = max_prefix_tokens // block_size
        self._index = mod.PrefixIndex(budget_bytes)
        self._memo_key = ("prefix", block_size, self.max_blocks)
        self._slots: dict[str, int] = {}  # worker id -> slot in the index
        self._free: list[int] = []  # released slots, reused lowest first
        self._next_slot = 0
        self._views: dict[tuple[Worker, ...], _View] = {}
        self._last_candidates: object = None
        self._last_view: _View | None = None
        self._cursor = 0
        self._last: _Decision | None = None
        self._picked: dict[str, int] = {}  # worker id -> decision number it was last chosen
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
        if tokens is not None:
            got = (self._block_hashes(tokens, self.block_size, self.max_blocks), len(tokens))
        elif ctx.text_key is not None:
            data = ctx.text_key
            hashes = self._text_block_hashes(data, 4 * self.block_size, self.max_blocks)
            got = (hashes, len(data) // 4)
        else:
            got = (None, 0)
        ctx.memo()[self._memo_key] = got
        return got

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
        return slot

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
        loads = [w.in_flight + w.engine.waiting for w in candidates]
        lmin = min(loads)
        start = self._cursor % n
        self._cursor += 1
        try:
            best = loads.index(lmin, start)
        except ValueError:
            best = loads.index(lmin)
        base = best
        depths: dict[int, int] = {}
        usable = 0
        if hashes is None or not len(hashes):
            reason = "no_prompt" if hashes is None else "no_match"
        else:
            view = self._view(candidates)
            bs = self.block_size
            floor = self.cache_threshold * ntok
            # tiers shallower than the threshold cannot count: the index skips them
            depths = self._index.match(hashes, len(hashes), view.query, -int(-floor // bs))
            reason = "no_match"
            if depths and view.owner is not None:
                usable = (ntok - 1) // bs
                best, reason, depths = self._choose_tiered(
                    view, depths, loads, lmin, best, usable, ntok, floor
                )
            elif depths:
                usable = (ntok - 1) // bs
                slack = max(self.balance_abs, (self.balance_rel - 1.0) * lmin)
                per_token = slack / ntok
                # the least loaded worker's own score (it may hold part of the prompt too)
                c = min(depths.get(view.slots[best], 0), usable) * bs
                best_score = c * per_token if c >= floor and c > 0 else 0.0
                best_load = lmin
                found = False
                pos = view.pos
                for slot, d in depths.items():  # deepest first: the bound below only falls
                    c = (d if d < usable else usable) * bs
                    if c < floor or c <= 0:
                        continue
                    found = True
                    bound = c * per_token  # the best score this or any later entry can have
                    if bound < best_score or (bound == best_score and best_load == lmin):
                        break
                    i = pos[slot]
                    excess = loads[i] - lmin
                    if excess > slack:
                        continue
                    score = bound - excess
                    if score > best_score or (score == best_score and loads[i] < best_load):
                        best, best_score, best_load = i, score, loads[i]
                reason = "cache" if best_score > 0 else "load" if found else "below_threshold"
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
        self._last = decision
        ctx.memo()[self] = decision
        return worker

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

    def _choose_tiered(
        self,
        view: _View,
        depths: dict[int, int],
        loads: list[int],
        lmin: int,
        best: int,
        usable: int,
        ntok: int,
        floor: float,
    ) -> tuple[int, str, dict[int, int]]:
        """The decision when some worker reported non-GPU blocks: credit each candidate's tiers
        by weight, then score as the untiered path does. Returns the choice, the reason, and the
        deepest match per candidate (by its GPU slot: what the audit predicts)."""
        owner = view.owner
        assert owner is not None
        per: dict[int, list[tuple[float, int]]] = {}
        for slot, d in depths.items():
            i, weight = owner[slot]
            per.setdefault(i, []).append((weight, d if d < usable else usable))
        bs = self.block_size
        slack = max(self.balance_abs, (self.balance_rel - 1.0) * lmin)
        per_token = slack / ntok
        best_score, best_load, found = 0.0, lmin, False
        deepest: dict[int, int] = {}
        for i, tiers in per.items():
            tiers.sort(reverse=True)  # heaviest tier first
            covered = credit = 0.0
            for weight, d in tiers:
                if d > covered:
                    credit += weight * (d - covered)
                    covered = d
            deepest[view.slots[i]] = int(covered)
            c = credit * bs
            if c < floor or c <= 0:
                continue
            found = True
            excess = loads[i] - lmin
            if excess > slack:
                continue
            score = c * per_token - excess
            if score > best_score or (score == best_score and loads[i] < best_load):
                best, best_score, best_load = i, score, loads[i]
        reason = "cache" if best_score > 0 else "load" if found else "below_threshold"
        return best, reason, deepest

    # -- hooks ----------------------------------------------------------------------------------
    def on_dispatch(self, worker: Worker, ctx: RouteContext) -> None:
        """Predict on route: once it has prefilled, the worker holds the prompt's blocks."""
        if worker.id in self._exact:
            return  # its engine's events will say what it stored
        hashes, _ = self._prompt(ctx)
        if hashes is not None and len(hashes):
            slot = self._slot(worker.id)
            if slot >= 0:
                self._index.insert(slot, hashes)
            if self.hint_sink is not None:
                self.hint_sink(worker.id, hashes)

    def import_hint(self, worker: Worker, hashes: Sequence[int]) -> None:
        """Another gateway replica dispatched a prompt with these block hashes to ``worker``:
        predict it as if this replica had (unless the worker's engine sends KV events), and
        count the decision, so that the replicas' tie-break cursors and starvation rounds move
        together and they decide alike."""
        self._cursor += 1
        self._picked[worker.id] = self._round
        self._round += 1
        if worker.id in self._exact or not len(hashes):
            return
        slot = self._slot(worker.id)
        if slot >= 0:
            self._index.insert(slot, hashes)
            self.hints_imported += 1

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
        self._exact.discard(worker.id)
        self._picked.pop(worker.id, None)
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
        if event.parent_block_hash is None:
            seed = self._token_seed
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
            "tier_slots": len(self._tier_slots),
            "hints_imported": self.hints_imported,
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
