"""Joint placement of a P/D request's prefill and decode workers (sans-IO; ANCHORS.md §5.11).

Why one decision for both: a prefill's KV moves to its decode worker, and how long that takes
depends on the pair: within a zone (one node's NVLink, a rack) it is a few ms, across zones
(RDMA between nodes) ten times more, for the same long prompt. Picking the prefill worker for
its cache and queue and *then* a decode worker for its load (what SMG, vllm-router and llm-d
do) ignores that, and so does picking the decode worker first. Here each pair's time to first
token is estimated and the cheapest pair wins:

    prefill_s(P)   = (tokens queued on P + tokens P must compute) / prefill speed
    transfer_s(P,D) = prompt tokens x KV bytes per token / bandwidth(zone P, zone D)

with P's cached tokens as the prefill policy predicts them (``cache_aware``; other policies
predict none, so every prefill computes the whole prompt), the prefill speed learned from the
prefill legs the gateway times (queued + computed tokens over the leg's duration), and decode
workers kept within ``bounded_load_factor`` of their mean load (a decode worker's TTFT share is
small, but piling pairs onto the nearest one would slow every stream it decodes). Only the
least loaded decode worker of each zone is paired, and a transfer costs the same to any other
zone, so a decision costs O(prefills + zones).

A fleet whose workers name no zones (or one) has nothing to weigh: the stage policies choose
as in independent placement, and this module is not asked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ..workers.worker import Worker
    from .policy import RouteContext

__all__ = ["Pair", "Placement", "in_zone_of", "zoned"]

#: learning rate of the prefill speed (an EWMA over timed prefill legs)
SPEED_ALPHA = 0.1
#: legs computing fewer tokens than this are not timed into the speed (overheads dominate)
MIN_TIMED_TOKENS = 128


class Pair(NamedTuple):
    prefill: Worker
    decode: Worker
    prefill_s: float  #: estimated queue + compute time on the prefill worker
    transfer_s: float  #: estimated KV transfer time between the two


def zoned(*groups: Sequence[Worker]) -> bool:
    """Whether the workers name more than one zone (an unset zone counts as one)."""
    first = groups[0][0].zone if groups and groups[0] else None
    return any(w.zone != first for g in groups for w in g)


def in_zone_of(candidates: Sequence[Worker], worker: Worker) -> Sequence[Worker]:
    """The candidates in ``worker``'s zone, or all of them when none is (or it has none): the
    second stage of a pair whose first was chosen alone (a native P/D decode, after its
    prefill; a continued stream's prefill, after its new decode worker)."""
    if worker.zone is None:
        return candidates
    return [w for w in candidates if w.zone == worker.zone] or candidates


class Placement:
    """The pair estimator and its state: tokens queued per prefill worker, learned speeds."""

    def __init__(
        self,
        *,
        same_zone_gbps: float,
        cross_zone_gbps: float,
        prefill_tokens_per_s: float,
        bounded_load_factor: float,
        kv_bytes_per_token: Callable[[str], int],
    ) -> None:
        self.same_bps = same_zone_gbps * 1e9
        self.cross_bps = cross_zone_gbps * 1e9
        self.default_speed = prefill_tokens_per_s
        self.load_factor = bounded_load_factor
        self.kv_bytes_per_token = kv_bytes_per_token
        self.queued: dict[str, int] = {}  #: prefill worker id -> tokens to compute, in flight
        self.speed: dict[str, float] = {}  #: model -> learned prefill tokens per second
        self.pairs = {"same": 0, "cross": 0}
        self._turn = 0

    def choose(
        self,
        model: str,
        prefills: Sequence[Worker],
        decodes: Sequence[Worker],
        tokens: int,
        cached: Mapping[str, int],
        preferred: Worker | None = None,
    ) -> Pair:
        """The cheapest (prefill, decode) pair for a prompt of ``tokens`` tokens. ``cached``:
        the prefill policy's predicted cached tokens by worker id (absent: none);
        ``preferred``: the prefill policy's own choice, which wins ties."""
        speed = self.speed.get(model, self.default_speed)
        bpt = self.kv_bytes_per_token(model) * tokens
        same_s, cross_s = bpt / self.same_bps, bpt / self.cross_bps
        by_zone = self._decoders(decodes)
        # a prefill's best partner is its own zone's decode worker or, across zones, the least
        # loaded of the others (the transfer costs the same to any other zone): O(P + zones)
        ranked = sorted(by_zone.items(), key=lambda zw: zw[1].in_flight)
        best: Pair | None = None
        best_key: tuple[float, int, int] = (math.inf, 0, 0)
        least = min(same_s, cross_s)
        queued, hits = self.queued.get, cached.get
        for pw in prefills:
            hit = hits(pw.id, 0)
            prefill_s = (queued(pw.id, 0) + (tokens - hit if tokens > hit else 0)) / speed
            if prefill_s + least > best_key[0]:
                continue  # cannot win, whatever its partner
            tie = (pw is not preferred, pw.in_flight)
            home = by_zone.get(pw.zone)
            if home is not None and (prefill_s + same_s, *tie) < best_key:
                best_key = (prefill_s + same_s, *tie)
                best = Pair(pw, home, prefill_s, same_s)
            if (prefill_s + cross_s, *tie) < best_key:
                away = next((dw for zone, dw in ranked if zone != pw.zone), None)
                if away is not None:
                    best_key = (prefill_s + cross_s, *tie)
                    best = Pair(pw, away, prefill_s, cross_s)
        assert best is not None  # prefills and decodes are never empty
        self.pairs["same" if best.prefill.zone == best.decode.zone else "cross"] += 1
        return best

    def _decoders(self, decodes: Sequence[Worker]) -> dict[str | None, Worker]:
        """The least loaded decode worker of each zone, among those within the load bound
        (ties taken in turn, so equal workers share the pairs)."""
        total = sum(w.in_flight for w in decodes)
        bound = math.ceil(self.load_factor * (total + 1) / len(decodes))
        open_ = [w for w in decodes if w.in_flight < bound] or list(decodes)
        self._turn += 1
        best: dict[str | None, list[Worker]] = {}
        for w in open_:
            held = best.get(w.zone)
            if held is None or w.in_flight < held[0].in_flight:
                best[w.zone] = [w]
            elif w.in_flight == held[0].in_flight:
                held.append(w)
        return {z: ws[self._turn % len(ws)] for z, ws in best.items()}

    # -- the prefill queue and speed ---------------------------------------------------------

    def dispatched(self, ctx: RouteContext, pair: Pair, tokens: int, cached: int) -> None:
        """The pair was chosen: its prefill's tokens join the worker's queue until the
        prefill leg ends (:meth:`prefill_done`) or the request does (:meth:`release`)."""
        compute = max(0, tokens - cached)
        wid = pair.prefill.id
        before = self.queued.get(wid, 0)
        if compute:
            self.queued[wid] = before + compute
        ctx.memo()[Placement] = (wid, compute, before)

    def prefill_done(self, ctx: RouteContext, model: str, elapsed_s: float, ok: bool) -> None:
        """The prefill leg ended after ``elapsed_s``: a successful one teaches the speed."""
        entry = self._release(ctx)
        if entry is None or not ok or elapsed_s <= 0:
            return
        _wid, compute, before = entry
        if compute < MIN_TIMED_TOKENS:
            return
        observed = (before + compute) / elapsed_s
        old = self.speed.get(model, self.default_speed)
        self.speed[model] = old + SPEED_ALPHA * (observed - old)

    def release(self, ctx: RouteContext) -> None:
        """The request ended (idempotent): whatever it still held in a queue is dropped."""
        self._release(ctx)

    def _release(self, ctx: RouteContext) -> tuple[str, int, int] | None:
        if ctx.scratch is None:
            return None
        entry = ctx.scratch.pop(Placement, None)
        if entry is not None:
            wid, compute, _ = entry
            left = self.queued.get(wid, 0) - compute
            if left > 0:
                self.queued[wid] = left
            else:
                self.queued.pop(wid, None)
        return entry
