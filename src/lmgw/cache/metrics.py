"""The cache pool's Prometheus metrics (``lmgw_cache_pool_*``), registered in a gateway's Metrics.

Counts the pool and its tiers keep anyway are read at scrape time (``collect``), so the request
path pays only for the latency histogram's observation per tier operation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..metrics import Counter, Gauge, Histogram, Metrics
from .api import CachePool

__all__ = ["OPERATION_BUCKETS", "CacheMetrics"]

#: a memory hit takes about a microsecond, a 64 MiB Redis value tens of milliseconds
OPERATION_BUCKETS = (1e-06, 2.5e-06, 5e-06, 1e-05, 2.5e-05, 5e-05, 0.0001, 0.00025, 0.0005,
                     0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # fmt: skip

Samples = Iterable[tuple[tuple[str, ...], float]]


class CacheMetrics:
    """Registers the metrics in ``metrics``; :meth:`attach` points them at a pool (there may be
    none: then they export nothing)."""

    def __init__(self, metrics: Metrics) -> None:
        self.pool: CachePool | None = None
        self.operation = Histogram(
            "lmgw_cache_pool_operation_seconds",
            "Duration of each cache operation on each tier (get, get_many, contains, put, delete).",
            ("tier", "op"),
            buckets=OPERATION_BUCKETS,
        )

        def pool_counts(attr: str) -> Callable[[], Samples]:
            def collect() -> Samples:
                if self.pool is not None:
                    for name, n in getattr(self.pool, attr).items():
                        yield (name,), float(n)

            return collect

        def tier_stat(stat: str) -> Callable[[], Samples]:
            def collect() -> Samples:
                if self.pool is not None:
                    for tier in self.pool.tiers:
                        value = tier.statistics().get(stat)
                        if value is not None:
                            yield (tier.name,), float(value)

            return collect

        def transfer() -> Samples:
            if self.pool is not None:
                for tier in self.pool.tiers:
                    yield (tier.name, "read"), float(tier.stats.read_bytes)
                    yield (tier.name, "written"), float(tier.stats.written_bytes)

        def refused() -> Samples:
            if self.pool is not None:
                yield (), float(self.pool.refused)

        tier = ("tier",)
        for metric in (
            self.operation,
            Counter("lmgw_cache_pool_hits_total", "Cache lookups a tier answered.", tier,
                    collect=pool_counts("hits")),
            Counter("lmgw_cache_pool_misses_total", "Cache lookups a tier did not hold.", tier,
                    collect=pool_counts("misses")),
            Counter("lmgw_cache_pool_promotions_total",
                    "Entries copied into a faster tier after a hit in a slower one.", tier,
                    collect=pool_counts("promotions")),
            Counter("lmgw_cache_pool_demotions_total",
                    "Entries evicted from a faster tier and written into this one.", tier,
                    collect=pool_counts("demotions")),
            Counter("lmgw_cache_pool_evictions_total",
                    "Entries a tier dropped to stay under its byte budget.", tier,
                    collect=tier_stat("evictions")),
            Gauge("lmgw_cache_pool_bytes",
                  "Bytes a local tier holds (shm: this process's entries); charged as payload"
                  " + key + per-entry overhead (memory) or whole pages (shm).", tier,
                  collect=tier_stat("bytes")),
            Gauge("lmgw_cache_pool_entries", "Entries a local tier holds.", tier,
                  collect=tier_stat("entries")),
            Gauge("lmgw_cache_pool_budget_bytes", "A local tier's byte budget.", tier,
                  collect=tier_stat("budget_bytes")),
            Counter("lmgw_cache_pool_transfer_bytes_total",
                    "Value bytes read from and written to each tier.", ("tier", "direction"),
                    collect=transfer),
            Counter("lmgw_cache_pool_errors_total",
                    "Tier operations that failed and were answered as misses (or dropped puts).",
                    tier, collect=tier_stat("errors")),
            Gauge("lmgw_cache_pool_tier_up",
                  "1 while a tier is usable; 0 while Redis is unreachable (the pool then runs"
                  " on its local tiers).", tier, collect=tier_stat("up")),
            Counter("lmgw_cache_pool_tier_failures_total",
                    "Times a tier went down (Redis unreachable).", tier,
                    collect=tier_stat("failures")),
            Counter("lmgw_cache_pool_refused_total",
                    "Puts no tier took (too big for every budget, or every tier down).", (),
                    collect=refused),
        ):  # fmt: skip
            metrics.add(metric)

    def attach(self, pool: CachePool) -> None:
        self.pool = pool
        pool.observe = self.observe

    def observe(self, tier: str, op: str, seconds: float) -> None:
        self.operation.observe((tier, op), seconds)
