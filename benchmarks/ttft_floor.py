"""The TTFT floor under routing.py's sharing workloads: one worker, one request at a time.

Issue 6 asks cache_aware for TTFT p50 <= 0.9x sglang-router's cache_aware on the sharing
workloads. Both routers reach the same ~95% hits there and sit a few ms above the prefill
floor routing.py prints (the timing model on the uncached tokens). This asks where those ms
are: the same worker (``--serial-prefill``, routing.py's cache size), the same requests, its
prompts all cached after a warm-up, sent one at a time (no queueing anywhere), straight to the
worker and through each router. What a router adds is its own latency; what the worker adds
above the floor (HTTP, chat template, tokenizing, the first token's write) no router removes.
A 0.9x target below the worker's own TTFT with nothing in between is out of any router's reach.

    .venv/bin/python benchmarks/ttft_floor.py [--rounds 3] [--requests 40] [--no-peers]

Rounds interleave the systems; each figure is the median over rounds of per-round medians.
Prints a table and writes benchmarks/results/ttft_floor.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import routing
from lmgw.simulators import model_files
from lmgw.simulators.engine import TimingModel
from lmgw.simulators.fleet import open_fleet, stop_process

OUT_JSON = routing.RESULTS / "ttft_floor.json"
SYSTEMS = ("direct", "cache_aware+tok", "sglang-router-ca")


async def measure(url: str, workload_name: str, requests: int, warmup: int, seed: int) -> dict:
    """``warmup`` unmeasured requests (the prompts get cached), then ``requests`` measured,
    each sent after the previous one finished."""
    workload = routing.make_workload(workload_name, 1, seed)
    rng = random.Random(seed)
    timing = TimingModel()
    ttfts, floors, hits = [], [], []
    for i in range(warmup + requests):
        rec = routing.Record(arrival=0.0)
        await routing.one_request(url, workload, workload.next(rng), rec, trio.current_time())
        if not rec.ok:
            raise RuntimeError(f"{url}: {rec.error}")
        if i < warmup:
            continue
        assert rec.ttft is not None
        ttfts.append(rec.ttft)
        floors.append(timing.prefill_s(rec.prompt_tokens - rec.cached_tokens))
        hits.append(rec.cached_tokens / max(1, rec.prompt_tokens))
    return {
        "ttft_p50_ms": 1e3 * statistics.median(ttfts),
        "floor_p50_ms": 1e3 * statistics.median(floors),
        "hit_rate": statistics.fmean(hits),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    systems = [s for s in args.systems.split(",") if not (args.no_peers and s.startswith("sg"))]
    if not (routing.PEERS_VENV / "bin" / "python").exists():
        systems = [s for s in systems if not s.startswith("sglang")]
    routing.LOG_DIR.mkdir(parents=True, exist_ok=True)
    model_dir = await trio.to_thread.run_sync(model_files.default_model_dir)
    worker_args = ["--serial-prefill", "--kv-blocks", str(args.kv_blocks)]
    worker_args += ["--kv-events", "tcp://127.0.0.1:0", "--log-level", "WARNING"]
    runs: list[dict[str, Any]] = []
    async with open_fleet(
        {"pd": 1},
        model=routing.MODEL,
        speed=1.0,
        model_dir=model_dir,
        role_args={"pd": worker_args},
        ready_timeout_s=60.0,
    ) as fleet:
        bench = routing.Bench(args, fleet, routing.LOG_DIR, [])
        for rnd in range(args.rounds):
            order = systems[rnd % len(systems) :] + systems[: rnd % len(systems)]
            for name in order:
                proc = None
                if name == "direct":
                    url = fleet.members[0].url
                else:
                    proc, url = await bench.start_system(routing.SYSTEMS[name])
                try:
                    for wl in args.workloads.split(","):
                        await bench.reset_workers()
                        got = await measure(url, wl, args.requests, args.warmup, args.seed + rnd)
                        runs.append({"round": rnd, "system": name, "workload": wl, **got})
                        routing.log(
                            f"round {rnd} {wl:<9} {name:<16} ttft p50 {got['ttft_p50_ms']:.2f} ms"
                            f" floor {got['floor_p50_ms']:.2f} ms hit {got['hit_rate']:.0%}"
                        )
                finally:
                    if proc is not None:
                        await stop_process(proc)
    return {"meta": routing.run_meta(args), "runs": runs, "summary": summarize(runs)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per workload and system: the median over rounds of the round's p50 (and the floor)."""
    out: dict[str, dict[str, float]] = {}
    for r in runs:
        out.setdefault(r["workload"], {}).setdefault(r["system"], []).append(r["ttft_p50_ms"])  # type: ignore[arg-type]
        out[r["workload"]].setdefault("floor", []).append(r["floor_p50_ms"])  # type: ignore[arg-type]
    return {wl: {k: statistics.median(v) for k, v in d.items()} for wl, d in out.items()}  # type: ignore[arg-type]


def table(summary: dict[str, dict[str, float]], names: list[str]) -> str:
    lines = [
        "| workload | floor | " + " | ".join(names) + " | 0.9x sglang | 0.9x sglang vs direct |",
        "|---|---|" + "---|" * len(names) + "---|---|",
    ]
    for wl, d in summary.items():
        sg = d.get("sglang-router-ca")
        cells = [f"{d[k]:.2f}" if k in d else "-" for k in names]
        bound = "-" if sg is None else f"{0.9 * sg:.2f}"
        vs = "-" if sg is None or "direct" not in d else f"{0.9 * sg / d['direct']:.2f}x"
        lines.append(f"| {wl} | {d['floor']:.2f} | " + " | ".join(cells) + f" | {bound} | {vs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="sysprompt,rag")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="direct and routing.py's")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=40, help="measured requests per run")
    p.add_argument("--warmup", type=int, default=12, help="unmeasured requests first")
    p.add_argument("--kv-blocks", type=int, default=640)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--out", type=Path, default=OUT_JSON)
    args = p.parse_args(argv)
    args.speed = 1.0  # routing.Bench reads it
    t0 = time.monotonic()
    report = trio.run(main_async, args)
    report["meta"]["wall_s"] = time.monotonic() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table(report["summary"], args.systems.split(",")))
    print(f"\nms, medians over {args.rounds} rounds; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
