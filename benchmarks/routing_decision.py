"""Routing decision time: every policy's choose() at 8 and 64 workers, 1k- and 8k-token prompts
(and round_robin with a cache_aware shadow: what routing.shadow_policies adds per decision),
the load-aware ones at 512 workers reading the registry's load board vs scanning the fleet,
and cache_aware at 64 and 512 workers that all hold the same system prompt.

Why: the decision sits on every request's path, and cache_aware's target is p50 <= 20 us at 64
workers with 8k-token prompts (tokenization excluded, block hashing included). cache_aware runs
twice, on the Cython prefix module and on its pure-Python twin, so the extension has to earn its
build step; the components (hashing a prompt, one index match) are timed on both as well.

The workload is the one cache-aware routing exists for: 256 conversations sharing a 1k-token
system prompt, the index warmed by one completed request of each (conversation k on worker k
mod n), 20% of requests new conversations, worker loads random in 0..4. Each decision gets a
fresh RouteContext and a fresh token list (new int objects, as a tokenizer makes them), built
outside the timed call. The garbage
collector is off while timing: its pauses belong to the whole process, not to a decision.

    .venv/bin/python benchmarks/routing_decision.py [--quick]

Prints medians over 3 interleaved runs and writes benchmarks/results/routing_decision.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from array import array
from pathlib import Path

from lmgw._fast import prefix_py as twin
from lmgw.config import RoutingConfig
from lmgw.routing.policies.cache_aware import CacheAware
from lmgw.routing.policy import RouteContext
from lmgw.routing.registry import make_policy
from lmgw.routing.shadow import Shadowed, ShadowMetrics
from lmgw.workers.registry import Registry
from lmgw.workers.worker import Worker, WorkerState

try:
    from lmgw._fast import prefix as fast
except ImportError:
    sys.exit("lmgw._fast.prefix is not built: run `python setup.py build_ext --inplace` first")

REPEATS = 3
WORKERS = (8, 64)
PROMPTS = (1024, 8192)
SYSTEM = 1024  # shared system prompt tokens (the whole of a 1k prompt is then shared + 1 turn)
CONVERSATIONS = 256
POLICIES = (
    "round_robin",
    "random",
    "least_load",
    "power_of_two",
    "consistent_hash",
    "consistent_hash_bounded",
    "session_affinity",
    "prefix_hash",
    "cache_aware",
    "cache_aware[python]",
    "round_robin+shadow:cache_aware",
)
RESULTS = Path(__file__).parent / "results" / "routing_decision.json"


def build_fleet(n: int) -> tuple[Worker, ...]:
    reg = Registry()
    for i in range(n):
        w = reg.add(Worker(f"w{i}", f"http://10.0.0.{i}:8000", "pd", frozenset({"m"})))
        reg.set_state(w, WorkerState.HEALTHY)
    return reg.candidates("m", "pd")


def make(name: str):
    if name == "cache_aware[python]":
        return CacheAware(prefix_module=twin)
    if "+shadow:" in name:  # routing.shadow_policies: the active one plus a shadow's decision
        active, shadow = name.split("+shadow:")
        cfg = RoutingConfig()
        return Shadowed("pd", make_policy(active, cfg), [make_policy(shadow, cfg)], ShadowMetrics())
    return make_policy(name, RoutingConfig())


class Workload:
    """Conversations as arrays (cheap to turn into fresh int lists), sessions, new prompts."""

    def __init__(self, prompt_tokens: int, seed: int) -> None:
        rng = random.Random(seed)
        self.rng = rng
        system = [rng.randrange(1000, 150_000) for _ in range(min(SYSTEM, prompt_tokens // 2))]
        rest = prompt_tokens - len(system)
        self.convs = [
            array("l", system + [rng.randrange(1000, 150_000) for _ in range(rest)])
            for _ in range(CONVERSATIONS)
        ]
        self.fresh = [
            array("l", system + [rng.randrange(1000, 150_000) for _ in range(rest)])
            for _ in range(64)
        ]

    def ctx(self, i: int) -> RouteContext:
        rng = self.rng
        if rng.random() < 0.2:
            tokens, session = self.fresh[rng.randrange(len(self.fresh))], f"new-{i}"
        else:
            k = rng.randrange(CONVERSATIONS)
            tokens, session = self.convs[k], f"conv-{k}"
        return RouteContext("m", f"req-{i}", session_key=session, tokens=tokens.tolist())


def warm(policy, fleet: tuple[Worker, ...], work: Workload) -> None:
    """One completed request per conversation, conversation k on worker k mod n (as a fleet
    that spread them would hold them): every policy, and every version of one, is timed on
    the same index, whatever its own choices would have been."""
    for k, conv in enumerate(work.convs):
        ctx = RouteContext("m", f"warm-{k}", session_key=f"conv-{k}", tokens=conv.tolist())
        policy.choose(fleet, ctx)
        worker = fleet[k % len(fleet)]
        policy.on_dispatch(worker, ctx)
        policy.on_finish(worker, ctx, True)


def time_decisions(policy, fleet, work: Workload, n: int) -> list[float]:
    rng = random.Random(1)
    out = []
    gc.collect()
    gc.disable()  # a collection is the process's cost, not the decision's: keep it out
    try:
        return _time(policy, fleet, work, n, rng, out)
    finally:
        gc.enable()


def _time(policy, fleet, work: Workload, n: int, rng: random.Random, out: list) -> list[float]:
    for i in range(n):
        if i % 16 == 0:  # loads move between decisions, as requests come and go
            for w in fleet:
                w.in_flight = rng.randrange(5)
        ctx = work.ctx(i)
        t0 = time.perf_counter()
        policy.choose(fleet, ctx)
        out.append(time.perf_counter() - t0)
    return out


BIG_FLEET = 512
LOAD_POLICIES = ("least_load", "consistent_hash_bounded", "session_affinity", "cache_aware")


def fleet_scale(n: int) -> dict[str, dict[str, float]]:
    """Load-aware policies at ``BIG_FLEET`` workers, 1k-token prompts: handed the registry's
    candidate tuple (loads read from its board, kept current by the workers) vs a plain tuple
    of the same workers (each worker's load read per decision, as before the boards), the
    same decisions interleaved. Loads move as in the main runs (through ``in_flight``)."""
    fleet = build_fleet(BIG_FLEET)
    plain = tuple(fleet)
    work = Workload(1024, seed=5)
    out: dict[str, dict[str, float]] = {}
    for name in LOAD_POLICIES:
        boards: list[float] = []
        scans: list[float] = []
        pol_board, pol_plain = make(name), make(name)
        warm(pol_board, fleet, work)
        warm(pol_plain, plain, work)
        for _ in range(REPEATS):
            boards.append(pct(time_decisions(pol_board, fleet, work, n), 0.5) * 1e6)
            scans.append(pct(time_decisions(pol_plain, plain, work, n), 0.5) * 1e6)
        b, sc = statistics.median(boards), statistics.median(scans)
        out[name] = {"board_p50_us": b, "scan_p50_us": sc, "ratio": b / sc}
    return out


SHARED_FLEETS = (64, 512)


def shared_prefix(n: int) -> dict[str, dict[str, float]]:
    """The hot-prefix case at fleet scale: every worker has served the same 1k-token system
    prompt, so each decision weighs every worker as a holder at the same depth (before the
    compiled holder walk this cost one Python step per worker: ~60 us at 512). cache_aware on
    the extension vs on the twin (the same walk in Python), 1k-token system prompt plus a
    fresh 64-token turn per decision, loads moving as in the main runs."""
    rng = random.Random(11)
    system = [rng.randrange(1000, 150_000) for _ in range(SYSTEM)]
    out: dict[str, dict[str, float]] = {}
    for workers in SHARED_FLEETS:
        fleet = build_fleet(workers)
        row: dict[str, float] = {}
        for name, policy in (("cython", CacheAware()), ("python", CacheAware(prefix_module=twin))):
            for k, w in enumerate(fleet):
                ctx = RouteContext("m", f"warm-{k}", tokens=system + [k + 1000] * 64)
                policy.choose(fleet, ctx)
                policy.on_dispatch(w, ctx)
                policy.on_finish(w, ctx, True)
            p50s = []
            for _ in range(REPEATS):
                ts = []
                for i in range(n):
                    if i % 16 == 0:
                        for w in fleet:
                            w.in_flight = rng.randrange(5)
                    ctx = RouteContext(
                        "m",
                        f"r{i}",
                        tokens=system + [rng.randrange(1000, 150_000) for _ in range(64)],
                    )
                    t0 = time.perf_counter()
                    policy.choose(fleet, ctx)
                    ts.append(time.perf_counter() - t0)
                p50s.append(pct(ts, 0.5) * 1e6)
            row[f"{name}_p50_us"] = statistics.median(p50s)
            for w in fleet:
                w.in_flight = 0
        row["python_over_cython"] = row["python_p50_us"] / row["cython_p50_us"]
        out[str(workers)] = row
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def components(prompt_tokens: int, n: int) -> dict[str, dict[str, float]]:
    """Hashing one prompt and one 64-slot match, Cython vs twin (medians of n, us)."""
    rng = random.Random(2)
    base = array("l", [rng.randrange(1000, 150_000) for _ in range(prompt_tokens)])
    out: dict[str, dict[str, float]] = {}
    for impl_name, impl in (("cython", fast), ("python", twin)):
        m = n if impl is fast else max(20, n // 20)
        hashing = []
        for _ in range(m):
            tokens = base.tolist()
            t0 = time.perf_counter()
            impl.block_hashes(tokens, 16)
            hashing.append(time.perf_counter() - t0)
        hs = impl.block_hashes(base.tolist(), 16)
        ix = impl.PrefixIndex(64 << 20)
        for s in range(64):
            ix.insert(s, hs, len(hs) // 8)
        ix.insert(5, hs)
        q = impl.slot_mask(range(64))
        matching = []
        for _ in range(m):
            t0 = time.perf_counter()
            ix.match(hs, len(hs), q, 1)
            matching.append(time.perf_counter() - t0)
        out[impl_name] = {
            "hash_p50_us": statistics.median(hashing) * 1e6,
            "match_p50_us": statistics.median(matching) * 1e6,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer decisions (smoke test)")
    args = parser.parse_args()
    n_fast = 400 if args.quick else 3000
    n_slow = 40 if args.quick else 300  # the twin is ~15x slower at 8k tokens

    t0 = time.perf_counter()
    setups = {}
    for workers in WORKERS:
        fleet = build_fleet(workers)
        for tokens in PROMPTS:
            work = Workload(tokens, seed=tokens)
            for name in POLICIES:
                policy = make(name)
                warm(policy, fleet, work)
                setups[(name, workers, tokens)] = (policy, fleet, work)
    print(f"warmed {len(setups)} setups in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    runs: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
    for _ in range(REPEATS):  # interleaved, so drift hits every configuration alike
        for key, (policy, fleet, work) in setups.items():
            n = n_slow if key[0].endswith("[python]") else n_fast
            ts = time_decisions(policy, fleet, work, n)
            runs.setdefault(key, []).append((pct(ts, 0.5) * 1e6, pct(ts, 0.99) * 1e6))
        for fleet in {id(f): f for _, f, _ in setups.values()}.values():
            for w in fleet:
                w.in_flight = 0

    py_version = platform.python_version()
    print(f"routing decision time (us), median of {REPEATS} runs, python {py_version}")
    print(f"{'policy':<24} {'workers':>7} {'tokens':>6} {'p50':>8} {'p99':>8}")
    rows = []
    for (name, workers, tokens), samples in runs.items():
        p50 = statistics.median(s[0] for s in samples)
        p99 = statistics.median(s[1] for s in samples)
        print(f"{name:<24} {workers:>7} {tokens:>6} {p50:>8.2f} {p99:>8.2f}")
        policy = setups[(name, workers, tokens)][0]
        rows.append(
            {
                "policy": name,
                "workers": workers,
                "prompt_tokens": tokens,
                "p50_us": p50,
                "p99_us": p99,
                "runs": [{"p50_us": a, "p99_us": b} for a, b in samples],
                "statistics": policy.statistics() if name.startswith("cache_aware") else {},
            }
        )
    ratios = {}
    for workers in WORKERS:
        for tokens in PROMPTS:
            cy = statistics.median(s[0] for s in runs[("cache_aware", workers, tokens)])
            py = statistics.median(s[0] for s in runs[("cache_aware[python]", workers, tokens)])
            ratios[f"{workers}w_{tokens}t"] = py / cy
            print(f"cache_aware python/cython, {workers} workers, {tokens} tokens: {py / cy:.1f}x")
    scale = fleet_scale(n_fast)
    print(f"{BIG_FLEET} workers, 1k tokens: decision p50 with the registry's load board vs a scan")
    for name, r in scale.items():
        print(
            f"  {name:<24} board {r['board_p50_us']:7.2f} us  scan {r['scan_p50_us']:7.2f} us"
            f"  x{r['ratio']:.2f}"
        )
    shared = shared_prefix(n_fast // 2)
    print("every worker holds the 1k-token system prompt: cache_aware decision p50")
    for workers, r in shared.items():
        print(
            f"  {workers:>4} workers: cython {r['cython_p50_us']:7.2f} us"
            f"  twin {r['python_p50_us']:7.2f} us  x{r['python_over_cython']:.1f}"
        )
    comp = {str(t): components(t, n_fast) for t in PROMPTS}
    for t, c in comp.items():
        cy, py = c["cython"], c["python"]
        print(
            f"{t:>5} tokens: hash {cy['hash_p50_us']:.2f} us (twin {py['hash_p50_us']:.0f} us),"
            f" 64-slot match {cy['match_p50_us']:.2f} us (twin {py['match_p50_us']:.2f} us)"
        )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "repeats": REPEATS,
        "decisions_per_run": {"cython": n_fast, "python": n_slow},
        "conversations": CONVERSATIONS,
        "system_prompt_tokens": SYSTEM,
        "quick": args.quick,
    }
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "routing_decision",
                "meta": meta,
                "rows": rows,
                "cache_aware_python_over_cython": ratios,
                "load_board_vs_scan": {"workers": BIG_FLEET, "prompt_tokens": 1024, **scale},
                "shared_prefix_all_hold": shared,
                "components": comp,
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
