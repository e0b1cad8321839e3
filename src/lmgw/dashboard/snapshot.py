"""The dashboard's snapshot: what the page shows, built from the gateway's state (sans-IO).

Once per ``dashboard.interval_s`` the feed calls :meth:`SnapshotBuilder.tick`, which reads the
counters and histograms the gateway keeps anyway (no extra work per request) and remembers
them for ``dashboard.window_s``. Rates and percentiles come from the difference between the
newest reading and the oldest one in the window, so they describe the last minute, not the
process's whole life. Percentiles are interpolated within histogram buckets, as Prometheus'
``histogram_quantile`` does.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..config import ROLE_NAMES

if TYPE_CHECKING:
    from ..gateway import Gateway
    from ..metrics import Histogram

QUANTILES = (0.5, 0.9, 0.99)
#: stage keys of the page, per role
STAGES = ("e", "p", "d", "pd")


class RecentErrors:
    """A ring of the last errors (request errors, worker ejections) for the page. Written on
    error paths only."""

    def __init__(self, size: int = 50, clock=time.time) -> None:
        self.items: deque[dict[str, Any]] = deque(maxlen=size)
        self.total = 0
        self._clock = clock

    def add(
        self,
        status: int,
        message: str,
        request_id: str | None = None,
        model: str | None = None,
        endpoint: str | None = None,
        worker: str | None = None,
    ) -> None:
        self.total += 1
        item: dict[str, Any] = {"t": round(self._clock(), 3), "status": status,
                                "message": message[:500]}  # fmt: skip
        for key, value in (
            ("request_id", request_id),
            ("model", model),
            ("endpoint", endpoint),
            ("worker", worker),
        ):
            if value:
                item[key] = value
        self.items.append(item)

    def latest(self, n: int = 20) -> list[dict[str, Any]]:
        """The newest first."""
        return list(reversed(list(self.items)[-n:]))


def merged_counts(hist: Histogram, where: int | None = None, value: str | None = None) -> list[int]:
    """Bucket counts (non-cumulative, +Inf last) summed over the series of ``hist`` whose label
    number ``where`` equals ``value`` (all series when ``where`` is None)."""
    out = [0] * (len(hist.buckets) + 1)
    for labels, (counts, _total, _n) in hist.series.items():
        if where is not None and labels[where] != value:
            continue
        for i, c in enumerate(counts):
            out[i] += c
    return out


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile of a histogram (non-cumulative ``counts``, the last one +Inf);
    linear within the bucket it falls in; None without observations. A quantile in the +Inf
    bucket is reported as the highest finite bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * ((rank - seen) / c)
        seen += c
    return bounds[-1]


def _diff(new: Sequence[int], old: Sequence[int] | None) -> list[int]:
    if old is None:
        return list(new)
    return [a - b for a, b in zip(new, old, strict=True)]


def _percentiles(bounds: Sequence[float], counts: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"count": sum(counts)}
    for q in QUANTILES:
        v = quantile(bounds, counts, q)
        out[f"p{round(q * 100)}"] = None if v is None else round(v, 6)
    return out


class _Reading:
    """The cumulative numbers at one tick."""

    __slots__ = ("counters", "hists", "t")

    def __init__(self, t: float, counters: dict[str, float], hists: dict[str, list[int]]):
        self.t = t
        self.counters = counters
        self.hists = hists


class SnapshotBuilder:
    """Readings over a sliding window, and the snapshot the page gets."""

    def __init__(self, gateway: Gateway, interval_s: float = 1.0, window_s: float = 60.0):
        self.gw = gateway
        self.interval_s = interval_s
        self.window_s = window_s
        self._readings: deque[_Reading] = deque(maxlen=max(2, math.ceil(window_s / interval_s) + 1))
        self._hists = self._histograms()

    def _histograms(self) -> dict[str, tuple[Histogram, int | None, str | None]]:
        """Name -> (histogram, label index to filter on, value): what gets windowed."""
        m = self.gw.metrics
        out: dict[str, tuple[Histogram, int | None, str | None]] = {
            "ttft": (m.ttft, None, None),
            "tpot": (m.tpot, None, None),
            "e2e": (m.e2e, None, None),
            "queue": (m.queue_time, None, None),
        }
        for role in STAGES:
            out[f"stage:{role}"] = (m.stage, 0, role)
            if role in ("d", "pd"):
                out[f"ttft:{role}"] = (m.stage_ttft, 0, role)
                out[f"tpot:{role}"] = (m.stage_tpot, 0, role)
        return out

    # -- readings -----------------------------------------------------------------------------
    def _counters(self) -> dict[str, float]:
        gw = self.gw
        m = gw.metrics
        c: dict[str, float] = {"requests": 0.0, "errors": 0.0}
        for (_endpoint, _model, _flow, status), n in m.requests.values.items():
            c["requests"] += n
            if status.startswith("5"):  # the gateway's failures; 499 (client left) is not
                c["errors"] += n
        for (role, policy, reason), n in gw.fleet_stats.decisions().items():
            c[f"route:{role}:{policy}:{reason}"] = n
        for tier, (hits, queries) in gw.fleet_stats.caches().items():
            c[f"cache_hits:{tier}"] = hits
            c[f"cache_queries:{tier}"] = queries
        for event, n in gw.fleet_stats.pool_events().items():
            c[f"pool:{event}"] = float(n)
        for (role, _worker), n in m.worker_requests.collect():  # type: ignore[misc]
            key = f"dispatch:{role}"
            c[key] = c.get(key, 0.0) + n
        return c

    def tick(self, now: float) -> None:
        """Take a reading (call every ``interval_s``; ``now`` is a monotonic clock)."""
        hists = {name: merged_counts(h, i, v) for name, (h, i, v) in self._hists.items()}
        self._readings.append(_Reading(now, self._counters(), hists))

    # -- the snapshot -------------------------------------------------------------------------
    def _span(self) -> tuple[_Reading | None, _Reading | None, float]:
        r = self._readings
        if not r:
            return None, None, 0.0
        newest, oldest = r[-1], r[0]
        return newest, oldest if oldest is not newest else None, newest.t - oldest.t

    def snapshot(self) -> dict[str, Any]:
        """The page's JSON document (see docs/observability.md, "Dashboard")."""
        gw = self.gw
        newest, oldest, span = self._span()
        counters = newest.counters if newest else self._counters()

        def rate(key: str) -> float:
            if newest is None or oldest is None or span <= 0:
                return 0.0
            return (newest.counters.get(key, 0.0) - oldest.counters.get(key, 0.0)) / span

        def window(key: str) -> float:
            if newest is None:
                return 0.0
            base = oldest.counters.get(key, 0.0) if oldest is not None else 0.0
            return newest.counters.get(key, 0.0) - base

        def pct(name: str) -> dict[str, Any]:
            hist = self._hists[name][0]
            if newest is None:
                return _percentiles(hist.buckets, [0] * (len(hist.buckets) + 1))
            old = oldest.hists.get(name) if oldest is not None else None
            return _percentiles(hist.buckets, _diff(newest.hists[name], old))

        stages: dict[str, Any] = {}
        for role in STAGES:
            entry: dict[str, Any] = {
                "name": ROLE_NAMES[role],
                "duration": pct(f"stage:{role}"),
                "rate": round(rate(f"dispatch:{role}"), 3),
            }
            if role in ("d", "pd"):
                entry["ttft"] = pct(f"ttft:{role}")
                entry["tpot"] = pct(f"tpot:{role}")
            stages[role] = entry

        routing = []
        for key in sorted(k for k in counters if k.startswith("route:")):
            _, role, policy, reason = key.split(":", 3)
            routing.append({
                "role": role, "policy": policy, "reason": reason,
                "total": counters[key], "rate": round(rate(key), 3),
            })  # fmt: skip

        caches = {}
        for tier in ("encoder", "prefix"):
            hits, queries = window(f"cache_hits:{tier}"), window(f"cache_queries:{tier}")
            caches[tier] = {
                "hits": hits,
                "queries": queries,
                "hit_rate": round(hits / queries, 4) if queries else None,
                "total_hits": counters.get(f"cache_hits:{tier}", 0.0),
                "total_queries": counters.get(f"cache_queries:{tier}", 0.0),
            }

        admission = gw.app.admission
        return {
            "type": "snapshot",
            "t": round(time.time(), 3),
            "uptime_s": round(time.time() - gw.started_at, 1),
            "interval_s": self.interval_s,
            "window_s": round(span, 1),
            "workers": workers_by_role(gw.registry),
            "totals": {
                "requests": counters.get("requests", 0.0),
                "errors": counters.get("errors", 0.0),
                "in_flight": admission.in_flight,
                "queued": admission.queue_depth,
                "workers": len(gw.registry),
            },
            "rates": {
                "requests_per_s": round(rate("requests"), 3),
                "errors_per_s": round(rate("errors"), 3),
            },
            "latency": {name: pct(name) for name in ("ttft", "tpot", "e2e", "queue")},
            "stages": stages,
            "routing": routing,
            "cache": caches,
            "pool": {
                event: {
                    "total": counters.get(f"pool:{event}", 0.0),
                    "rate": round(rate(f"pool:{event}"), 3),
                }
                for event in ("connect", "reuse", "stale", "close")
            },
            "errors": gw.recent_errors.latest(),
            "errors_total": gw.recent_errors.total,
        }


def workers_by_role(workers: Iterable[Any]) -> dict[str, list[dict[str, Any]]]:
    """role -> the workers of that role, as the page's worker table shows them."""
    out: dict[str, list[dict[str, Any]]] = {}
    for w in workers:
        e = w.engine
        out.setdefault(w.role, []).append(
            {
                "id": w.id,
                "url": w.url,
                "role": w.role_name,
                "state": w.state.value,
                "in_flight": w.in_flight,
                "total_requests": w.total_requests,
                "running": e.running,
                "waiting": e.waiting,
                "kv_usage": round(e.kv_usage, 4),
                "models": sorted(w.models) if w.models is not None else None,
                "failures": w.consecutive_failures,
                "last_error": w.last_error or None,
            }
        )
    for items in out.values():
        items.sort(key=lambda d: d["id"])
    return out
