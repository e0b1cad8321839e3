"""How many workers each role needs to meet the latency targets: a recommendation learned
from the gateway's own observations (``[planner]``).

Why: in a disaggregated fleet the question operators ask most is how many prefill and how
many decode workers to run, and it changes with the traffic (long prompts want prefill
workers, long answers decode workers). Dynamo's SLA planner answers it from an offline
profile of the engine; the gateway already sees, per worker, how many requests it holds and
how fast their legs go, so it can learn the same curve online, with no profile to keep up to
date and no per-engine constants to tune:

* per pool (the workers of one role that serve the same models: a Deployment, to an
  autoscaler), the latency of its legs is recorded by the per-worker concurrency at which it was
  observed (requests in flight on that worker: its "level"), in decaying histograms;
* the role's capacity is the highest level whose p90 latency met the target (the TTFT target
  for encode, prefill and merged legs, the inter-token target for decode and merged streams);
* the role's load is its requests in flight, averaged over ``window_s`` (Little's law: what
  the workers must hold at once);
* desired workers = ceil(load / (capacity x headroom)); a fall is taken only once it has held
  for ``scale_down_delay_s`` (the stabilization window of Kubernetes' autoscaler).

When every level observed misses the target the role is ``overloaded`` and the capacity is
the lowest level seen scaled by target / latency there (exact when the wait is queueing, an
underestimate when part of it is fixed), at most half that level (the next window observes
the lower levels that brings);
when even one request per worker misses it, ``unreachable``: more workers would not help and
the current count is kept. Until a level has ``MIN_SAMPLES`` observations, ``learning``.

Sans-IO: :class:`Planner` takes numbers (loads, histogram deltas) and answers plans; the
feed that reads the registry and the metrics every half second is :mod:`lmgw.planner.feed`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

#: observations a level needs before its latency counts
MIN_SAMPLES = 20
#: the share of the learned capacity a plan fills (room for bursts between two windows)
HEADROOM = 0.8
#: the latency quantile held to the target
QUANTILE = 0.9
#: half-life of the latency histograms, in seconds (the engine and the traffic drift)
HALF_LIFE_S = 600.0
#: levels up to this are kept one by one; above it, in quarter-octave bins
EXACT_LEVELS = 16


def level_of(in_flight: float) -> int:
    """The level (bin) of a per-worker concurrency: exact up to :data:`EXACT_LEVELS`, then the
    lower edge of its quarter-octave (so a capacity read from a bin is never overstated)."""
    k = int(in_flight + 0.5)
    if k <= EXACT_LEVELS:
        return max(k, 0)
    return int(2 ** (math.floor(math.log2(k) * 4) / 4))


def quantile(bounds: Sequence[float], counts: Sequence[float], q: float) -> float:
    """The ``q`` quantile of a histogram (``counts`` per bucket, the last one past the last
    bound), interpolated linearly within its bucket as Prometheus' histogram_quantile does;
    infinity when it falls past the last bound."""
    total = sum(counts)
    want = q * total
    acc = 0.0
    lower = 0.0
    for bound, c in zip(bounds, counts, strict=False):
        if c and acc + c >= want:
            return lower + (bound - lower) * (want - acc) / c
        acc += c
        lower = bound
    return math.inf


class Signal:
    """One latency of one role (TTFT or inter-token), by level, with its target."""

    def __init__(self, name: str, bounds: Sequence[float], target_s: float) -> None:
        self.name = name
        self.bounds = tuple(bounds)
        self.target_s = target_s
        self.levels: dict[int, list[float]] = {}

    def add(self, level: int, counts: Sequence[int]) -> None:
        """Observations made while a worker held ``level`` requests (bucket counts)."""
        h = self.levels.get(level)
        if h is None:
            h = self.levels[level] = [0.0] * (len(self.bounds) + 1)
        for i, c in enumerate(counts):
            if c:
                h[i] += c

    def decay(self, factor: float) -> None:
        for level, h in list(self.levels.items()):
            for i, c in enumerate(h):
                h[i] = c * factor
            if sum(h) < 0.5:
                del self.levels[level]

    def table(self) -> dict[int, tuple[float, float]]:
        """Level -> (p90 latency, observations), for the levels with enough of them."""
        return {
            k: (quantile(self.bounds, h, QUANTILE), n)
            for k, h in sorted(self.levels.items())
            if (n := sum(h)) >= MIN_SAMPLES
        }

    def capacity(self) -> tuple[int | None, str]:
        """The highest level that met the target, and the status (see the module's text)."""
        table = self.table()
        if not table:
            return None, "learning"
        ok = [k for k, (p90, _) in table.items() if p90 <= self.target_s]
        if ok:
            return max(max(ok), 1), "ok"
        lowest = min(table)
        if lowest <= 1:
            return 1, "unreachable"
        # as if latency grew in proportion to the level (queueing: exact; a decode step's
        # fixed part: an underestimate), and at most half of it (the next window sees lower)
        scaled = int(lowest * self.target_s / table[lowest][0])
        return max(1, min(lowest // 2, scaled)), "overloaded"


#: a pool of workers planned together: (role, the models they serve, "," joined; "*": any)
Pool = tuple[str, str]


@dataclass
class RolePlan:
    """What the planner says of one pool."""

    role: str
    models: str  #: the models the pool's workers serve ("," joined; "*": any)
    workers: int  #: routable now
    load: float  #: requests in flight on the role, averaged over the window
    capacity: int | None  #: requests one worker holds within the targets (None: not known yet)
    desired: int  #: workers recommended
    status: str  #: ok, overloaded, unreachable, learning, idle
    signals: dict[str, dict] = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "role": self.role,
            "models": self.models,
            "workers": self.workers,
            "desired": self.desired,
            "load": round(self.load, 3),
            "capacity_per_worker": self.capacity,
            "status": self.status,
            "signals": self.signals,
        }


_ORDER = ("ok", "learning", "overloaded", "unreachable")


class Planner:
    """The learned curves and load windows of every pool, and the plans they give."""

    def __init__(self, window_s: float = 60.0, scale_down_delay_s: float = 300.0) -> None:
        self.window_s = window_s
        self.scale_down_delay_s = scale_down_delay_s
        self.signals: dict[Pool, list[Signal]] = {}
        #: pool -> (time, routable workers, requests in flight) samples within the window
        self._load: dict[Pool, deque[tuple[float, int, float]]] = {}
        #: pool -> (time, raw desired) within the scale-down delay
        self._raw: dict[Pool, deque[tuple[float, int]]] = {}
        self._since: dict[Pool, float] = {}  #: pool -> its first plan
        self._decayed_at: float | None = None

    def track(self, pool: Pool, signal: Signal) -> None:
        self.signals.setdefault(pool, []).append(signal)

    def observe_load(self, now: float, pool: Pool, workers: int, in_flight: float) -> None:
        q = self._load.setdefault(pool, deque())
        q.append((now, workers, in_flight))
        while q and q[0][0] < now - self.window_s:
            q.popleft()

    def decay(self, now: float) -> None:
        """Age the histograms (called now and then; the factor follows the time passed)."""
        last, self._decayed_at = self._decayed_at, now
        if last is None or now <= last:
            return
        factor = 0.5 ** ((now - last) / HALF_LIFE_S)
        for signals in self.signals.values():
            for s in signals:
                s.decay(factor)

    def plan(self, now: float) -> dict[Pool, RolePlan]:
        plans = {}
        for pool, q in list(self._load.items()):
            while q and q[0][0] < now - self.window_s:
                q.popleft()
            if not q:  # no worker of the pool seen for a whole window: gone
                del self._load[pool]
                self._raw.pop(pool, None)
                self._since.pop(pool, None)
                self.signals.pop(pool, None)
                continue
            workers = q[-1][1]
            load = sum(s[2] for s in q) / len(q)
            caps = []
            status = "learning"  # until a signal knows something (one without data says nothing)
            shown = {}
            for s in self.signals.get(pool, ()):
                cap, st = s.capacity()
                shown[s.name] = {
                    "target_s": s.target_s,
                    "capacity": cap,
                    "status": st,
                    "p90_by_level": {k: round(v[0], 6) for k, v in s.table().items()},
                }
                if st == "learning":
                    continue
                if status == "learning" or _ORDER.index(st) > _ORDER.index(status):
                    status = st
                if st != "unreachable":
                    caps.append(cap)
            capacity = min(caps) if caps else None
            if load < 0.05:  # nothing to serve: one worker (a lull waits out the fall's delay)
                raw, status = 1, "idle"
            elif capacity is None or status == "unreachable":
                raw = workers
            else:
                raw = max(1, math.ceil(load / (capacity * HEADROOM)))
            hist = self._raw.get(pool)
            if hist is None:
                hist = self._raw[pool] = deque()
                self._since[pool] = now
            hist.append((now, raw))
            while hist and hist[0][0] < now - self.scale_down_delay_s:
                hist.popleft()
            # a rise at once; a fall only as far as every plan within the delay allows, and
            # not before the plans cover a whole delay (one burst says little)
            if raw >= workers:
                desired = raw
            elif now - self._since[pool] < self.scale_down_delay_s:
                desired = workers
            else:
                desired = min(workers, max(h[1] for h in hist))
            plans[pool] = RolePlan(*pool, workers, load, capacity, desired, status, shown)
        return plans
