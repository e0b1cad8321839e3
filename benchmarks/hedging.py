"""Hedged streams: time to first token with and without hedging, when workers sometimes stall.

The question: a merged worker that stalls now and then (preemption, a GC pause, a long prefill
ahead in its queue) sets the fleet's TTFT tail, and no routing decision made before a request
left can see it coming. Does ``hedging`` (a second worker asked once the first token is late;
the first token wins, the other leg is aborted) cut that tail, and what does it cost in
duplicated work? One run, one process tree on 127.0.0.1, compared only within the run:

* a fleet of ``--workers`` simulated merged workers (``python -m lmgw.simulators``, processes)
  with the 7-8B timing model at ``--speed``, each stalling ``--stall-rate`` of its requests for
  ``--stall-s`` before their prefill (the simulator's ``stall_rate`` fault, seeded: the workers
  are reset before every run, so each system meets the same draws per worker);
* systems, each a fresh ``lmgw serve`` process (round_robin): ``off`` (no hedging),
  ``adaptive`` (``--hedge``: the delay is the 0.95 quantile of recent first-token times, at
  most 5% of streams hedged) and ``fixed`` (``hedging.delay_s`` = ``--fixed-delay``, same
  budget);
* load: ``lmgw bench`` open loop, Poisson arrivals at ``--rate`` per second for ``--duration``
  seconds, streamed chat with ``--input-len`` prompt tokens and ``--output-len`` answer tokens,
  the same seeded schedule for every system; rounds alternate the systems' order.

Figures per system (medians over rounds): TTFT p50 / p90 / p99 / max at the client, e2e p99,
errors, hedges (``lmgw_hedges_total`` by winner, ``lmgw_hedges_skipped_total``) and the extra
legs the workers saw per client request (the price: duplicated prefill, cut short when the
other leg wins).

    .venv/bin/python benchmarks/hedging.py [--quick] [--rounds 2] [--duration 20] [--rate 16]

Prints a table and writes benchmarks/results/hedging.json; child logs go to
benchmarks/results/hedging-logs/.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import trio

from fleet_runs import (
    MODEL,
    RESULTS,
    http,
    med,
    reset_workers,
    result,
    save,
    start_gateway,
    worker_requests,
)
from lmgw.bench import BenchOptions, run_bench
from lmgw.simulators.fleet import Fleet, open_fleet, stop_process

LOG_DIR = RESULTS / "hedging-logs"


#: the gateway flags of each system (beyond the workers); "fixed" also gets
#: LMGW_HEDGING_DELAY_S (see start_gateway)
SYSTEMS: dict[str, list[str]] = {"off": [], "adaptive": ["--hedge"], "fixed": ["--hedge"]}


_HEDGE_LINE = re.compile(
    r'lmgw_hedges(_skipped)?_total\{model="[^"]+",(?:outcome|reason)="(\w+)"\} (\S+)'
)


def hedge_counts(metrics: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        m = re.match(
            r'lmgw_hedges(_skipped)?_total\{model="[^"]+",(?:outcome|reason)="(\w+)"\} (\S+)', line
        )
        if m:
            key = ("skipped_" if m.group(1) else "won_by_") + m.group(2)
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


async def one_run(
    name: str, flags: list[str], fleet: Fleet, args: argparse.Namespace
) -> dict[str, Any]:
    await reset_workers(fleet)  # same stall draws per worker for every system
    env = {"LMGW_HEDGING_DELAY_S": str(args.fixed_delay)} if name == "fixed" else None
    proc, url = await start_gateway(name, flags, fleet, LOG_DIR, env)
    try:
        before = await worker_requests(fleet)
        report = await run_bench(
            BenchOptions(
                url=url,
                model=MODEL,
                rate=args.rate,
                duration=args.duration,
                input_len=args.input_len,
                output_len=args.output_len,
                ignore_eos=True,
                seed=args.seed,
                timeout=30.0,
                include_requests=False,
            )
        )
        await trio.sleep(0.5)  # let aborted legs settle in the workers' counters
        legs = await worker_requests(fleet) - before
        metrics = (await http(url, "GET", "/metrics"))[1].decode()
    finally:
        await stop_process(proc)
    s = report["summary"]
    ttft, e2e = s["latency_ms"]["ttft"], s["latency_ms"]["e2e"]
    requests = s["requests"]["completed"]
    return {
        "system": name,
        "requests": requests,
        "errors": s["requests"]["errors"],
        "ttft_ms": {k: ttft.get(k) for k in ("p50", "p90", "p99", "max")},
        "e2e_ms": {k: e2e.get(k) for k in ("p50", "p99")},
        "extra_legs_per_request": round(legs / max(requests, 1) - 1.0, 4),
        "hedges": hedge_counts(metrics),
        "warnings": report["warnings"],
    }


def table(by_system: dict[str, list[dict[str, Any]]]) -> str:
    def f(v: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if v is None else fmt.format(v)

    rows = [
        "| system | TTFT p50 ms | p90 | p99 | max | e2e p99 ms | errors | extra legs/req"
        " | hedges won by hedge / primary | skipped (budget) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in by_system.items():
        rows.append(
            f"| {name} | {f(med(runs, 'ttft_ms', 'p50'))} | {f(med(runs, 'ttft_ms', 'p90'))}"
            f" | {f(med(runs, 'ttft_ms', 'p99'))} | {f(med(runs, 'ttft_ms', 'max'))}"
            f" | {f(med(runs, 'e2e_ms', 'p99'))} | {f(med(runs, 'errors'), '{:.0f}')}"
            f" | {f(med(runs, 'extra_legs_per_request'), '{:.3f}')}"
            f" | {f(med(runs, 'hedges', 'won_by_hedge'), '{:.0f}')}"
            f" / {f(med(runs, 'hedges', 'won_by_primary'), '{:.0f}')}"
            f" | {f(med(runs, 'hedges', 'skipped_budget'), '{:.0f}')} |"
        )
    return "\n".join(rows)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    chosen = SYSTEMS
    by_system: dict[str, list[dict[str, Any]]] = {n: [] for n in chosen}
    extra = ["--stall-rate", str(args.stall_rate), "--stall-s", str(args.stall_s)]
    async with open_fleet(
        {"pd": args.workers}, model=MODEL, speed=args.speed, extra_args=extra
    ) as fleet:
        for rnd in range(args.rounds):
            order = list(chosen) if rnd % 2 == 0 else list(chosen)[::-1]
            for name in order:
                r = await one_run(name, chosen[name], fleet, args)
                by_system[name].append(r)
                print(
                    f"[round {rnd + 1}/{args.rounds}] {name}: TTFT p50 {r['ttft_ms']['p50']}"
                    f" p99 {r['ttft_ms']['p99']} ms, extra legs {r['extra_legs_per_request']},"
                    f" hedges {r['hedges']}",
                    flush=True,
                )
    off = med(by_system["off"], "ttft_ms", "p99")
    ratios: dict[str, float | None] = {}
    for n, rs in by_system.items():
        p99 = med(rs, "ttft_ms", "p99")
        ratios[n] = None if not off or p99 is None else round(p99 / off, 3)
    return result("hedging", args, runs=by_system, ttft_p99_vs_off=ratios, table=table(by_system))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--speed", type=float, default=1.0)
    ap.add_argument("--stall-rate", type=float, default=0.03)
    ap.add_argument("--stall-s", type=float, default=0.5)
    ap.add_argument("--rate", type=float, default=16.0, help="requests per second")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--fixed-delay", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1 round of 8 s")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 8.0
    data = trio.run(main_async, args)
    save("hedging", data)
    print("TTFT p99 / off:", data["ttft_p99_vs_off"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
