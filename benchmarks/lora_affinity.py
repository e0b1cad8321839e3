"""LoRA affinity: time to first token for a fleet serving more adapters than its LoRA slots.

The question: vLLM runs at most ``--max-loras`` adapters in a batch; a request for another one
waits in the engine's queue until a slot frees, then pays the swap. Does routing an adapter's
requests where it is active or a slot is free (``routing.lora_affinity``) cut that wait, against
the same policy without it? One run, one process tree on 127.0.0.1, compared only within it:

* a fleet of ``--workers`` simulated merged workers (``python -m lmgw.simulators``, processes)
  with the 7-8B timing model at ``--speed``, ``--adapters`` LoRA adapters each (loaded at
  start), ``--max-loras`` slots and ``--lora-load-s`` per activation (the simulator's model of
  vLLM's LoRA scheduling); workers reset before every run;
* systems, each a fresh ``lmgw serve`` process: ``round_robin`` and ``least_load``, each
  without and with ``--lora-affinity``;
* load: ``lmgw bench`` open loop, Poisson arrivals at ``--rate`` per second for ``--duration``
  seconds, streamed chat, each request for a random adapter (Zipf-ish popularity: a few hot,
  many cold; the same seeded sequence and schedule for every system);
* figures (medians over rounds): TTFT p50 / p90 / p99, e2e p50, errors, and the decisions
  affinity narrowed (``lmgw_routing_policy_stat{stat="lora_affinity_narrowed"}``).

    .venv/bin/python benchmarks/lora_affinity.py [--quick] [--rounds 2] [--duration 15]

Prints a table and writes benchmarks/results/lora_affinity.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

import trio

from fleet_runs import RESULTS, http, med, reset_workers, result, save, start_gateway
from lmgw.bench import BenchOptions, run_bench
from lmgw.simulators.fleet import Fleet, open_fleet, stop_process

LOG_DIR = RESULTS / "lora_affinity-logs"

#: system name -> gateway flags
SYSTEMS: dict[str, list[str]] = {
    "round_robin": ["--policy", "round_robin"],
    "round_robin+affinity": ["--policy", "round_robin", "--lora-affinity"],
    "least_load": ["--policy", "least_load"],
    "least_load+affinity": ["--policy", "least_load", "--lora-affinity"],
}

_NARROWED = re.compile(
    r'lmgw_routing_policy_stat\{role="pd",[^}]*stat="lora_affinity_narrowed"\} (\S+)'
)


def write_dataset(path: Path, adapters: int, n: int, tokens: int, seed: int) -> None:
    """``n`` chat bodies, each for an adapter drawn with weights 1/rank (a few hot ones)."""
    rng = random.Random(seed)
    names = [f"lora-{i}" for i in range(adapters)]
    weights = [1.0 / (i + 1) for i in range(adapters)]
    with path.open("w") as f:
        for i in range(n):
            body = {
                "model": rng.choices(names, weights)[0],
                "messages": [{"role": "user", "content": f"Request {i}: a short question."}],
                "max_tokens": tokens,
                "ignore_eos": True,
            }
            f.write(json.dumps(body) + "\n")


async def one_run(
    name: str, flags: list[str], fleet: Fleet, args: argparse.Namespace, dataset: Path
) -> dict[str, Any]:
    await reset_workers(fleet)
    proc, url = await start_gateway(name, flags, fleet, LOG_DIR, model="lora-0")
    try:
        report = await run_bench(
            BenchOptions(
                url=url,
                rate=args.rate,
                duration=args.duration,
                dataset=str(dataset),
                seed=args.seed,
                timeout=60.0,
                include_requests=False,
            )
        )
        metrics = (await http(url, "GET", "/metrics"))[1].decode()
    finally:
        await stop_process(proc)
    s = report["summary"]
    ttft, e2e = s["latency_ms"]["ttft"], s["latency_ms"]["e2e"]
    m = _NARROWED.search(metrics)
    return {
        "system": name,
        "requests": s["requests"]["completed"],
        "errors": s["requests"]["errors"],
        "ttft_ms": {k: ttft.get(k) for k in ("p50", "p90", "p99")},
        "e2e_ms": {k: e2e.get(k) for k in ("p50", "p99")},
        "narrowed": float(m.group(1)) if m else 0.0,
        "warnings": report["warnings"],
    }


def table(by_system: dict[str, list[dict[str, Any]]]) -> str:
    def f(v: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if v is None else fmt.format(v)

    rows = [
        "| system | TTFT p50 ms | p90 | p99 | e2e p50 ms | errors | decisions narrowed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in by_system.items():
        rows.append(
            f"| {name} | {f(med(runs, 'ttft_ms', 'p50'))} | {f(med(runs, 'ttft_ms', 'p90'))}"
            f" | {f(med(runs, 'ttft_ms', 'p99'))} | {f(med(runs, 'e2e_ms', 'p50'))}"
            f" | {f(med(runs, 'errors'), '{:.0f}')} | {f(med(runs, 'narrowed'), '{:.0f}')} |"
        )
    return "\n".join(rows)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    dataset = LOG_DIR / "requests.jsonl"
    write_dataset(dataset, args.adapters, 4096, args.output_len, args.seed)
    modules = [f"lora-{i}=/adapters/{i}" for i in range(args.adapters)]
    extra = ["--lora-modules", *modules, "--max-loras", str(args.max_loras)]
    extra += ["--lora-load-s", str(args.lora_load_s)]
    by_system: dict[str, list[dict[str, Any]]] = {n: [] for n in SYSTEMS}
    async with open_fleet(
        {"pd": args.workers}, model="sim-model", speed=args.speed, extra_args=extra
    ) as fleet:
        for rnd in range(args.rounds):
            order = list(SYSTEMS) if rnd % 2 == 0 else list(SYSTEMS)[::-1]
            for name in order:
                r = await one_run(name, SYSTEMS[name], fleet, args, dataset)
                by_system[name].append(r)
                print(
                    f"[round {rnd + 1}/{args.rounds}] {name}: TTFT p50 {r['ttft_ms']['p50']}"
                    f" p99 {r['ttft_ms']['p99']} ms, errors {r['errors']},"
                    f" narrowed {r['narrowed']:.0f}",
                    flush=True,
                )
    ratios: dict[str, dict[str, float | None]] = {}
    for base in ("round_robin", "least_load"):
        ratios[base] = {}
        for q in ("p50", "p99"):
            a = med(by_system[base], "ttft_ms", q)
            b = med(by_system[base + "+affinity"], "ttft_ms", q)
            ratios[base][q] = None if not a or b is None else round(b / a, 3)
    return result(
        "lora_affinity",
        args,
        runs=by_system,
        ttft_with_affinity_vs_without=ratios,
        table=table(by_system),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--speed", type=float, default=1.0)
    ap.add_argument("--adapters", type=int, default=12)
    ap.add_argument("--max-loras", type=int, default=2)
    ap.add_argument("--lora-load-s", type=float, default=0.05)
    ap.add_argument("--rate", type=float, default=12.0, help="requests per second")
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1 round of 6 s")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 6.0
    data = trio.run(main_async, args)
    save("lora_affinity", data)
    print("TTFT with affinity / without:", data["ttft_with_affinity_vs_without"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
