"""Shadow policies: candidate policies asked on live traffic, never obeyed (ANCHORS.md §5.9).

Why: switching a fleet from ``round_robin`` to ``cache_aware`` (or between two settings of
one) is decided today by offline replays or by trying it in production. Here the active policy
routes as usual while each shadow is asked the same question, on the same candidates and
request, and lives in its own counterfactual world: it is told about its own choices
(``on_dispatch``/``on_finish`` with the worker *it* picked), so a cache-aware shadow's index
holds what the caches would hold had it routed, and its predictions are of that world. What
operators compare, per role and policy, active included (``routing.shadow_policies``; metrics
in docs/metrics.md):

- how often a shadow agrees with the active policy;
- the prompt tokens it expects cached at its choice, against the prompt tokens routed (the
  hit rate it predicts; only cache-aware policies predict, the others count 0);
- the load skew of its choices (max/mean dispatches per worker over its last
  :data:`WINDOW` decisions), the failure mode of affinity policies.

:class:`Shadowed` wraps a role's active policy and is a :class:`Policy` itself, so the pipeline
needs no change; anything else it is asked goes to the active policy. Costs each shadow's
``choose`` per decision (and tokenizing, when a shadow needs tokens and the active does not).
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..metrics import Counter, Gauge
from .policy import Policy, RouteContext, RouteInfo

if TYPE_CHECKING:
    from ..workers.worker import Worker
    from .kv_events import KVEvent

log = logging.getLogger("lmgw.routing")

WINDOW = 1024
"""Decisions per policy the load skew is computed over."""


class ShadowMetrics:
    """The shadow-evaluation metrics, shared by every role's :class:`Shadowed`."""

    def __init__(self) -> None:
        self.decisions = Counter(
            "lmgw_shadow_decisions_total",
            "Decisions a shadow policy made on live traffic, by whether the active policy"
            " chose the same worker.",
            ("role", "policy", "agreed"),
        )
        self.predicted = Counter(
            "lmgw_shadow_predicted_cached_tokens_total",
            "Prompt tokens each policy (active and shadows) expected cached at the worker it"
            " chose, each in its own world (0 for policies that do not predict).",
            ("role", "policy"),
        )
        self.prompt = Counter(
            "lmgw_shadow_prompt_tokens_total",
            "Prompt tokens of the decisions above (the denominator of a predicted hit rate;"
            " counted when the request's tokens were known).",
            ("role", "policy"),
        )
        self.roles: list[Shadowed] = []
        self.skew = Gauge(
            "lmgw_shadow_load_skew",
            "Max over mean dispatches per worker (of the role's candidates) among each"
            " policy's last 1024 choices (1.0: even).",
            ("role", "policy"),
            collect=self._skews,
        )

    def all(self) -> list[Counter | Gauge]:
        return [self.decisions, self.predicted, self.prompt, self.skew]

    def _skews(self) -> Iterable[tuple[tuple[str, ...], float]]:
        for shadowed in self.roles:
            for name, window in shadowed.windows.items():
                skew = load_skew(window, shadowed.fleet_size)
                if skew is not None:
                    yield (shadowed.role, name), skew


def load_skew(choices: Iterable[str], workers: int = 0) -> float | None:
    """Max over mean of how often each of ``workers`` workers was chosen (workers never chosen
    count as 0; at least as many as appear); None for no choices."""
    tally = Tally(choices)
    if not tally:
        return None
    n = max(workers, len(tally))
    return max(tally.values()) * n / sum(tally.values())


_OWN = frozenset({"role", "active", "shadows", "metrics", "name", "needs_tokens",
                  "wants_kv_events", "windows", "_failed", "fleet_size"})  # fmt: skip


class Shadowed(Policy):
    """A role's active policy, with shadows asked beside it (see the module doc)."""

    def __init__(
        self, role: str, active: Policy, shadows: Sequence[Policy], metrics: ShadowMetrics
    ) -> None:
        self.role = role
        self.active = active
        self.shadows = list(shadows)
        self.metrics = metrics
        self.name = active.name
        self.needs_tokens = active.needs_tokens or any(s.needs_tokens for s in shadows)
        self.wants_kv_events = active.wants_kv_events or any(s.wants_kv_events for s in shadows)
        self.windows: dict[str, deque[str]] = {
            p.name: deque(maxlen=WINDOW) for p in (active, *shadows)
        }
        self._failed: set[str] = set()
        self.fleet_size = 0  #: candidates at the last decision (the skew's worker count)
        metrics.roles.append(self)

    def __getattr__(self, name: str) -> Any:  # the active policy's own API (hints, stats)
        return getattr(self.__dict__["active"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Attributes the active policy has are its own (a replica sets cache_aware's
        # hint_sink); the rest are this wrapper's.
        active = self.__dict__.get("active")
        if active is not None and name not in _OWN and hasattr(active, name):
            setattr(active, name, value)
        else:
            object.__setattr__(self, name, value)

    # -- deciding ---------------------------------------------------------------------------
    def choose(self, candidates: Sequence[Worker], ctx: RouteContext) -> Worker:
        chosen = self.active.choose(candidates, ctx)
        self.fleet_size = len(candidates)
        picks = ctx.memo()[self] = [self._ask(s, candidates, ctx) for s in self.shadows]
        m, role = self.metrics, self.role
        n = len(ctx.tokens) if ctx.tokens is not None else None
        self._account(self.active, chosen, ctx, n)
        for shadow, pick in zip(self.shadows, picks, strict=True):
            if pick is None:
                continue
            agreed = "true" if pick is chosen else "false"
            m.decisions.inc((role, shadow.name, agreed))
            self._account(shadow, pick, ctx, n)
        return chosen

    def _ask(self, shadow: Policy, candidates: Sequence[Worker], ctx: RouteContext) -> Any:
        """A shadow's choice; a shadow that fails is logged once and never breaks routing."""
        try:
            return shadow.choose(candidates, ctx)
        except Exception:
            if shadow.name not in self._failed:
                self._failed.add(shadow.name)
                log.exception("shadow policy %s failed (role %s); it is skipped when it fails",
                              shadow.name, self.role)  # fmt: skip
            return None

    def _account(self, policy: Policy, worker: Worker, ctx: RouteContext, n: int | None) -> None:
        self.windows[policy.name].append(worker.id)
        if n is None:
            return
        labels = (self.role, policy.name)
        self.metrics.prompt.inc(labels, n)
        self.metrics.predicted.inc(labels, policy.predicted_cached_tokens(worker, ctx) or 0)

    def _pairs(self, ctx: RouteContext) -> list[tuple[Policy, Worker]]:
        """Each shadow with its choice for ``ctx`` (the last one made: a retry asks again)."""
        scratch = ctx.scratch
        picks = None if scratch is None else scratch.get(self)
        if not picks:
            return []
        return [(s, w) for s, w in zip(self.shadows, picks, strict=True) if w is not None]

    # -- the life of a request: the active policy's, and each shadow's own world ------------
    def on_dispatch(self, worker: Worker, ctx: RouteContext) -> None:
        self.active.on_dispatch(worker, ctx)
        for shadow, pick in self._pairs(ctx):
            shadow.on_dispatch(pick, ctx)

    def on_first_token(self, worker: Worker, ctx: RouteContext) -> None:
        self.active.on_first_token(worker, ctx)
        for shadow, pick in self._pairs(ctx):
            shadow.on_first_token(pick, ctx)

    def on_finish(self, worker: Worker, ctx: RouteContext, ok: bool) -> None:
        self.active.on_finish(worker, ctx, ok)
        for shadow, pick in self._pairs(ctx):
            shadow.on_finish(pick, ctx, ok)

    def on_usage(
        self, worker: Worker, ctx: RouteContext, prompt_tokens: int, cached_tokens: int | None
    ) -> None:
        # What the engine reports is of the real placement: only the active policy learns it.
        self.active.on_usage(worker, ctx, prompt_tokens, cached_tokens)

    def on_kv_event(self, worker: Worker, event: KVEvent) -> None:
        for policy in (self.active, *self.shadows):
            policy.on_kv_event(worker, event)

    def on_worker_removed(self, worker: Worker) -> None:
        for policy in (self.active, *self.shadows):
            policy.on_worker_removed(worker)

    def predicted_cached_tokens(
        self, worker: Worker, ctx: RouteContext | None = None
    ) -> int | None:
        return self.active.predicted_cached_tokens(worker, ctx)

    def predicted_cached_by_worker(
        self, candidates: Sequence[Worker], ctx: RouteContext
    ) -> Mapping[str, int]:
        return self.active.predicted_cached_by_worker(candidates, ctx)

    def route_info(self, ctx: RouteContext | None = None) -> RouteInfo | None:
        return self.active.route_info(ctx)

    def statistics(self) -> dict[str, float]:
        return self.active.statistics()

    def decision_counts(self) -> dict[str, int] | None:
        return self.active.decision_counts()
