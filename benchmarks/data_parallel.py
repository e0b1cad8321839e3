"""Routing to data-parallel ranks: one vLLM-style server with N ranks (``--data-parallel-size``),
the gateway seeing it as one worker (the server places each request on the rank with the fewest
in flight, as vLLM's own balancer does, blind to the ranks' caches) against the gateway seeing
each rank as a worker (``workers[].data_parallel_size``, requests pinned with
``X-data-parallel-rank``) under round_robin and cache_aware.

The question: what does routing to the ranks buy? Same harness as ``routing.py`` (its
workloads, open-loop Poisson arrivals at a share of the measured capacity, hit rate = cached /
prompt tokens from the answers' usage, TTFT at the client, max/mean requests per rank), one
simulated server process (``python -m lmgw.simulators --data-parallel-size N --serial-prefill
--kv-blocks K``: each rank its own prefix cache and serial prefill), every system a fresh
``lmgw serve`` process, the ranks' caches reset before each run.

    .venv/bin/python benchmarks/data_parallel.py [--quick] [--ranks 4] [--loads 0.7,0.9]
        [--workloads chat,sysprompt,control] [--duration 6]

Prints a table (and the ratios against the server's own balancing) and writes
benchmarks/results/data_parallel.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import routing as R
from lmgw.config import (
    GatewayConfig,
    LoggingConfig,
    ModelConfig,
    RoutingConfig,
    ServerConfig,
    WorkerConfig,
    dump_config,
)
from lmgw.simulators import model_files
from lmgw.simulators.fleet import open_fleet

OUT_JSON = R.RESULTS / "data_parallel.json"
#: the systems: (name, policy, the gateway sees the ranks, tokenizer)
SYSTEMS = {
    "server-balanced": ("round_robin", False, False),
    "ranks+round_robin": ("round_robin", True, False),
    "ranks+cache_aware": ("cache_aware", True, True),
}


class DPBench(R.Bench):
    ranks: int = 4

    def engines(self) -> int:
        return self.ranks

    def gateway_argv(self, system: R.System, port: int) -> list[str]:
        policy, ranks, tokenizer = SYSTEMS[system.name]
        server = self.fleet.members[0]
        cfg = GatewayConfig(
            server=ServerConfig(host="127.0.0.1", port=port),
            routing=RoutingConfig(policy=policy),
            logging=LoggingConfig(level="warning"),
            models=[ModelConfig(name=R.MODEL, tokenizer=str(self.fleet.model_dir))]
            if tokenizer
            else [],
            workers=[
                WorkerConfig(
                    url=server.url,
                    id="dp",
                    models=[R.MODEL],
                    data_parallel_size=self.ranks if ranks else 1,
                )
            ],
        )
        path = self.run_dir / f"dp-{system.name}.toml"
        path.write_text(dump_config(cfg))
        return [sys.executable, "-m", "lmgw.cli", "serve", "--config", str(path)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="chat only, 4 s runs")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--loads", default="0.7,0.9", help="open-loop rates, share of capacity")
    p.add_argument("--workloads", default="chat,sysprompt,control")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--capacity-duration", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=0.3)
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--kv-blocks", type=int, default=640)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT_JSON)
    args = p.parse_args(argv)
    if args.quick:
        args.workloads = "chat"
        args.duration = min(args.duration, 4.0)
        args.capacity_duration = min(args.capacity_duration, 3.0)
    return args


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    systems = [R.System(name) for name in args.systems.split(",") if name]
    loads = [float(x) for x in args.loads.split(",") if x]
    R.LOG_DIR.mkdir(parents=True, exist_ok=True)
    model_dir = await trio.to_thread.run_sync(model_files.default_model_dir)
    worker_args = ["--serial-prefill", "--kv-blocks", str(args.kv_blocks)]
    worker_args += ["--data-parallel-size", str(args.ranks), "--log-level", "WARNING"]
    results: list[dict[str, Any]] = []
    capacity: dict[str, float] = {}
    async with open_fleet(
        {"pd": 1},
        model=R.MODEL,
        speed=args.speed,
        model_dir=model_dir,
        role_args={"pd": worker_args},
        ready_timeout_s=60.0,
    ) as fleet:
        bench = DPBench(args, fleet, R.LOG_DIR, results)
        bench.ranks = args.ranks
        for wl in (w for w in args.workloads.split(",") if w):
            cap = await bench.run(R.System("server-balanced"), wl, "capacity", 1.0, None)
            capacity[wl] = cap["throughput_rps"]
            for level in loads:
                for system in systems:
                    await bench.run(system, wl, "open", level, level * cap["throughput_rps"])
    return {
        "meta": R.run_meta(args),
        "capacity_rps": capacity,
        "runs": results,
    }


def ratios(runs: list[dict[str, Any]]) -> list[str]:
    """Each system's TTFT p50 and hit rate against the server balancing by itself."""
    base = {
        (r["workload"], r["load"]): r
        for r in runs
        if r["mode"] == "open" and r["system"] == "server-balanced"
    }
    lines = []
    for r in runs:
        b = base.get((r["workload"], r["load"]))
        if r["mode"] != "open" or b is None or r["system"] == "server-balanced":
            continue
        if r["ttft_p50_ms"] and b["ttft_p50_ms"]:
            lines.append(
                f"{r['workload']:<9} {r['load']:>4.0%} {r['system']:<18} TTFT p50 "
                f"{r['ttft_p50_ms'] / b['ttft_p50_ms']:.2f}x, p99 "
                f"{(r['ttft_p99_ms'] or 0) / (b['ttft_p99_ms'] or 1):.2f}x, hit rate "
                f"{r['hit_rate']:.0%} vs {b['hit_rate']:.0%} (server-balanced)"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = trio.run(main_async, args)
    print(R.table(out["runs"]))
    print("\n".join(ratios(out["runs"])))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
