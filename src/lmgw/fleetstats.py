"""Readings of the gateway's own state for ``/metrics`` and the dashboard: routing decisions,
cache hits by tier, the upstream pool, engine load, worker state transitions.

All of them are computed when read (a scrape, a dashboard tick) from numbers the gateway keeps
anyway, so none of them costs a request anything. The one that needs memory between reads is
the engines' prefix-cache tally: workers come and go and restart (their counters reset), so
the per-worker counters are folded into gateway-wide totals that only grow.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .metrics import Metrics

if TYPE_CHECKING:
    from .gateway import Gateway
    from .workers.worker import Worker

Samples = Iterable[tuple[tuple[str, ...], float]]


class EngineCacheTotals:
    """Monotonic totals of the engines' ``vllm:prefix_cache_{hits,queries}_total`` across the
    fleet: each read adds every worker's growth since the previous read (a counter that went
    down means a restarted engine: its new value is all growth)."""

    def __init__(self) -> None:
        self.hits = 0.0
        self.queries = 0.0
        self._last: dict[str, tuple[float, float]] = {}

    def update(self, workers: Iterable[Worker]) -> tuple[float, float]:
        last = self._last
        seen = {}
        for w in workers:
            e = w.engine
            h, q = e.prefix_hits, e.prefix_queries
            ph, pq = last.get(w.id, (0.0, 0.0))
            self.hits += h - ph if h >= ph else h
            self.queries += q - pq if q >= pq else q
            seen[w.id] = (h, q)
        self._last = seen
        return self.hits, self.queries


class FleetStats:
    """The scrape-time metrics of :meth:`Metrics._observability`, wired to one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.engine_cache = EngineCacheTotals()
        #: last state seen per worker id, for lmgw_worker_state_transitions_total
        self._states: dict[str, str] = {}

    def install(self, metrics: Metrics) -> None:
        metrics.routing_decisions.collect = self.decision_samples
        metrics.cache_hits.collect = lambda: self.cache_samples(0)
        metrics.cache_queries.collect = lambda: self.cache_samples(1)
        metrics.pool_events.collect = self.pool_event_samples
        metrics.pool_connections.collect = self.pool_connection_samples
        metrics.worker_kv_usage.collect = self.kv_usage_samples
        metrics.worker_engine_requests.collect = self.engine_request_samples

    # -- routing ------------------------------------------------------------------------------
    def decisions(self) -> dict[tuple[str, str, str], float]:
        """(role, policy, reason) -> choices so far (see lmgw_routing_decisions_total)."""
        gw = self.gw
        retries = gw.metrics.retries.values
        picks = gw.pipeline.picks
        out: dict[tuple[str, str, str], float] = {}
        for role, policy in gw.policies.items():
            own = policy.decision_counts()
            if own is None:
                n = picks.get(role, 0)
                if n:
                    out[(role, policy.name, "pick")] = float(n)
            else:
                for reason, n in own.items():
                    if n:
                        out[(role, policy.name, reason)] = float(n)
            retried = retries.get((role,), 0.0)
            if retried:
                out[(role, policy.name, "retry")] = retried
        return out

    def decision_samples(self) -> Samples:
        return sorted(self.decisions().items())

    # -- caches -------------------------------------------------------------------------------
    def caches(self) -> dict[str, tuple[float, float]]:
        """tier -> (hits, queries): ``encoder`` in media items, ``prefix`` in tokens."""
        m = self.gw.metrics
        prefix = self.engine_cache.update(self.gw.registry)
        return {
            "encoder": (
                sum(m.encoder_cache_hits.values.values()),
                sum(m.encoder_cache_lookups.values.values()),
            ),
            "prefix": prefix,
        }

    def cache_samples(self, index: int) -> Samples:
        return [((tier,), pair[index]) for tier, pair in self.caches().items()]

    # -- the upstream pool --------------------------------------------------------------------
    def _relay(self) -> Any:
        """The compiled lane's loop (its own upstream connections), or None."""
        server = self.gw.server
        lane = server.lane if server is not None else None
        return lane.relay if lane is not None else None

    def pool_events(self) -> dict[str, float]:
        st = self.gw.pool.stats
        events = {
            "connect": st.connects,
            "reuse": st.reuses,
            "stale": st.stale_retries,
            "close": st.closed,
        }
        relay = self._relay()
        if relay is not None:  # the lane's connections to the workers count as the pool's
            events["connect"] += relay.connects
            events["reuse"] += relay.reuses
            events["stale"] += relay.stale
        return events

    def pool_event_samples(self) -> Samples:
        return [((event,), float(n)) for event, n in self.pool_events().items()]

    def pool_connection_samples(self) -> Samples:
        relay = self._relay()
        for w in self.gw.registry:
            origin = w.origin
            idle = len(origin.idle)
            if relay is not None and origin.slot >= 0:
                idle += relay.idle_in(origin.slot)
            yield (w.role, w.id, "idle"), float(idle)
            yield (w.role, w.id, "waiting"), float(len(origin.waiting))

    # -- engines ------------------------------------------------------------------------------
    def kv_usage_samples(self) -> Samples:
        for w in self.gw.registry:
            yield (w.role, w.id), w.engine.kv_usage

    def engine_request_samples(self) -> Samples:
        for w in self.gw.registry:
            yield (w.role, w.id, "running"), w.engine.running
            yield (w.role, w.id, "waiting"), w.engine.waiting

    # -- worker states ------------------------------------------------------------------------
    def on_worker_change(self, worker: Worker) -> None:
        """A registry listener: counts a transition when the worker's state really changed
        (membership and model updates call listeners too)."""
        state = worker.state.value
        before = self._states.get(worker.id, "new")
        if before == state:
            return
        if state == "gone":
            self._states.pop(worker.id, None)
        else:
            self._states[worker.id] = state
        self.gw.metrics.worker_transitions.inc((worker.role, worker.id, before, state))
        if state == "ejected":
            self.gw.recent_errors.add(
                0, f"worker {worker.id} ejected: {worker.last_error or 'failing'}", worker=worker.id
            )
