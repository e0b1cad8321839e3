"""Hash-ring lookups/s: the Cython extension vs its pure-Python twin vs a bisect + hash() baseline.

Why: lookup runs once per routed request for the consistent-hash and session-affinity policies, so
the extension has to earn its build step against the obvious pure-Python ring (bisect over
`hash()` points). All three use the same vnodes and node names; every run gets freshly built key
objects, because str/bytes cache their `hash()` and a reused key would flatter the baseline.

    .venv/bin/python benchmarks/hashring.py [--quick]

Prints medians of 5 runs and writes benchmarks/results/hashring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from pathlib import Path

from lmgw._fast import hashring_py as twin

try:
    from lmgw._fast import hashring as fast
except ImportError:
    sys.exit("lmgw._fast.hashring is not built: run `python setup.py build_ext --inplace` first")

REPEATS = 5
NODE_COUNTS = (8, 64)
KEY_TYPES = ("str", "bytes")
IMPLS = ("cython", "twin", "bisect")
RESULTS = Path(__file__).parent / "results" / "hashring.json"


class BisectRing:
    """Baseline: the ring a plain-Python policy would write (sorted `hash()` points + bisect)."""

    def __init__(self, names: list[str], vnodes: int) -> None:
        entries = sorted((hash(f"{name}#{i}"), name) for name in names for i in range(vnodes))
        self.points = [p for p, _ in entries]
        self.owners = [name for _, name in entries]

    def lookup(self, key: bytes | str) -> str:
        i = bisect_left(self.points, hash(key))
        return self.owners[i if i < len(self.points) else 0]


def fresh_keys(n: int, key_type: str, seed: int) -> list[bytes | str]:
    """Session-id-like keys, new objects every call (no cached hash or UTF-8 form)."""
    rng = random.Random(seed)
    keys = [f"session-{rng.getrandbits(64):016x}" for _ in range(n)]
    return [k.encode() for k in keys] if key_type == "bytes" else keys


def lookups_per_s(lookup: Callable[[bytes | str], object], keys: list[bytes | str]) -> float:
    start = time.perf_counter()
    deque(map(lookup, keys), maxlen=0)  # the cheapest way to drive a call per key from Python
    return len(keys) / (time.perf_counter() - start)


def build_rings(names: list[str], vnodes: int) -> dict[str, object]:
    rings = {"cython": fast.HashRing(vnodes), "twin": twin.HashRing(vnodes)}
    for ring in rings.values():
        for name in names:
            ring.add(name)
    rings["bisect"] = BisectRing(names, vnodes)
    probe = fresh_keys(500, "str", seed=-1)
    assert [rings["cython"].lookup(k) for k in probe] == [rings["twin"].lookup(k) for k in probe]
    return rings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer keys per run (smoke test)")
    args = parser.parse_args()
    vnodes = fast.DEFAULT_VNODES
    # The twin is ~50x slower, so it gets fewer keys per run; rates stay comparable.
    n_keys = {"cython": 20_000, "twin": 1_000, "bisect": 20_000}
    if not args.quick:
        n_keys = {impl: n * 10 for impl, n in n_keys.items()}

    t0 = time.perf_counter()
    rings = {
        nodes: build_rings([f"http://10.0.0.{i}:8000" for i in range(nodes)], vnodes)
        for nodes in NODE_COUNTS
    }
    print(f"built rings ({vnodes} vnodes) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    runs: dict[tuple[int, str, str], list[float]] = {}
    for rep in range(REPEATS):  # interleaved, so drift hits every configuration alike
        for nodes in NODE_COUNTS:
            for key_type in KEY_TYPES:
                for impl in IMPLS:
                    keys = fresh_keys(n_keys[impl], key_type, seed=rep)
                    rate = lookups_per_s(rings[nodes][impl].lookup, keys)
                    runs.setdefault((nodes, key_type, impl), []).append(rate)

    med = {cfg: statistics.median(rates) for cfg, rates in runs.items()}
    header = (
        f"{'nodes':>5} {'keys':>5} {'cython/s':>12} {'twin/s':>10} {'bisect/s':>12}"
        f" {'cy/twin':>8} {'cy/bisect':>9}"
    )
    py = platform.python_version()
    print(f"hash ring lookups/s, median of {REPEATS} runs, vnodes={vnodes}, python {py}")
    print(header)
    rows = []
    for nodes in NODE_COUNTS:
        for key_type in KEY_TYPES:
            cy, tw, bi = (med[(nodes, key_type, impl)] for impl in IMPLS)
            print(
                f"{nodes:>5} {key_type:>5} {cy:>12,.0f} {tw:>10,.0f} {bi:>12,.0f}"
                f" {cy / tw:>7.1f}x {cy / bi:>8.2f}x"
            )
            rows.append(
                {
                    "nodes": nodes,
                    "key_type": key_type,
                    "median_lookups_per_s": {"cython": cy, "twin": tw, "bisect": bi},
                    "ratio_cython_twin": cy / tw,
                    "ratio_cython_bisect": cy / bi,
                    "runs": {impl: runs[(nodes, key_type, impl)] for impl in IMPLS},
                }
            )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "vnodes": vnodes,
        "repeats": REPEATS,
        "keys_per_run": n_keys,
        "quick": args.quick,
    }
    RESULTS.write_text(json.dumps({"benchmark": "hashring", "meta": meta, "rows": rows}, indent=2))
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
