"""LoRA affinity: send an adapter's requests where the adapter is active or can be.

Why: a vLLM engine runs at most ``--max-loras`` adapters in a batch at once; a request for
another adapter waits in the engine's queue until a slot frees (and then pays the swap). A
policy that spreads requests by load alone sends adapter X to a worker whose slots are all held
by adapters A and B, where it waits, while a worker with X active (or a free slot) would start
it at once. llm-d and vLLM's production stack route with this in mind; here it wraps any
policy (``routing.lora_affinity``), like the shadows do, so the pipeline does not change:

* what is active where: the adapters the gateway has requests in flight for on each worker
  (counted from its own dispatches: fresh), plus those the engine reported running at its last
  ``/metrics`` scrape (``vllm:lora_requests_info``), and the engine's ``max_lora``;
* the rule: among the candidates, keep those where the adapter is active or a slot is free
  (``max_lora`` unknown counts as free), if any; the wrapped policy chooses among them by its
  own criteria (load, cache). Base-model requests and adapters no engine limits are routed as
  if this were not here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .policy import Policy, RouteContext, RouteInfo

if TYPE_CHECKING:
    from ..workers.worker import Worker
    from .kv_events import KVEvent

_OWN = frozenset({"inner", "name", "needs_tokens", "wants_kv_events", "in_flight", "narrowed"})


def affine(
    candidates: Sequence[Worker], adapter: str, in_flight: dict[str, dict[str, int]]
) -> Sequence[Worker]:
    """The candidates where ``adapter`` is active or has a free slot; all of them when none."""
    keep = []
    for w in candidates:
        mine = in_flight.get(w.id)
        engine = w.engine
        active = set(mine) if mine else set()
        active |= engine.lora_running
        if adapter in active:
            keep.append(w)
            continue
        limit = engine.lora_max
        if not limit or len(active) < limit:
            keep.append(w)
    return keep if keep and len(keep) < len(candidates) else candidates


class LoraAffine(Policy):
    """A role's policy, with the candidates of an adapter's request narrowed first."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.name = inner.name
        self.needs_tokens = inner.needs_tokens
        self.wants_kv_events = inner.wants_kv_events
        #: worker id -> adapter -> this gateway's requests in flight there
        self.in_flight: dict[str, dict[str, int]] = {}
        #: decisions where affinity left out some candidates
        self.narrowed = 0

    def __getattr__(self, name: str) -> Any:  # the inner policy's own API (hints, stats)
        return getattr(self.__dict__["inner"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        inner = self.__dict__.get("inner")
        if inner is not None and name not in _OWN and hasattr(inner, name):
            setattr(inner, name, value)
        else:
            object.__setattr__(self, name, value)

    def choose(self, candidates: Sequence[Worker], ctx: RouteContext) -> Worker:
        adapter = ctx.lora
        if adapter is not None and len(candidates) > 1:
            kept = affine(candidates, adapter, self.in_flight)
            if kept is not candidates:
                self.narrowed += 1
                candidates = kept
        return self.inner.choose(candidates, ctx)

    def on_dispatch(self, worker: Worker, ctx: RouteContext) -> None:
        adapter = ctx.lora
        if adapter is not None:
            mine = self.in_flight.setdefault(worker.id, {})
            mine[adapter] = mine.get(adapter, 0) + 1
        self.inner.on_dispatch(worker, ctx)

    def on_finish(self, worker: Worker, ctx: RouteContext, ok: bool) -> None:
        adapter = ctx.lora
        if adapter is not None:
            mine = self.in_flight.get(worker.id)
            if mine is not None and adapter in mine:
                n = mine[adapter] - 1
                if n > 0:
                    mine[adapter] = n
                else:
                    del mine[adapter]
                    if not mine:
                        del self.in_flight[worker.id]
        self.inner.on_finish(worker, ctx, ok)

    def on_first_token(self, worker: Worker, ctx: RouteContext) -> None:
        self.inner.on_first_token(worker, ctx)

    def on_usage(
        self, worker: Worker, ctx: RouteContext, prompt_tokens: int, cached_tokens: int | None
    ) -> None:
        self.inner.on_usage(worker, ctx, prompt_tokens, cached_tokens)

    def on_kv_event(self, worker: Worker, event: KVEvent) -> None:
        self.inner.on_kv_event(worker, event)

    def on_worker_removed(self, worker: Worker) -> None:
        self.in_flight.pop(worker.id, None)
        self.inner.on_worker_removed(worker)

    def predicted_cached_tokens(
        self, worker: Worker, ctx: RouteContext | None = None
    ) -> int | None:
        return self.inner.predicted_cached_tokens(worker, ctx)

    def predicted_cached_by_worker(
        self, candidates: Sequence[Worker], ctx: RouteContext
    ) -> Mapping[str, int]:
        return self.inner.predicted_cached_by_worker(candidates, ctx)

    def route_info(self, ctx: RouteContext | None = None) -> RouteInfo | None:
        return self.inner.route_info(ctx)

    def statistics(self) -> dict[str, float]:
        return {**self.inner.statistics(), "lora_affinity_narrowed": float(self.narrowed)}

    def decision_counts(self) -> dict[str, int] | None:
        return self.inner.decision_counts()
