"""Conditional disaggregation: a P/D request whose prompt leaves few tokens to prefill runs whole
on its decode worker (``models[].local_prefill_tokens``) instead of a prefill leg, a KV transfer
and a decode leg.

The question: what does skipping the prefill leg buy for short prompts, and does it change
nothing for long ones? One simulated prefill and one decode worker (processes, vLLM NIXL
hand-offs, the decode worker started with ``--local-prefill``), each system a fresh ``lmgw
serve``: ``disaggregated`` (limit 0, every request takes both legs) and ``local<=N``; closed
loop, ``--concurrency`` clients streaming chats of unique prompts (routing.py's ``control``
workload: nothing cached) of ``short`` (~24 tokens) or ``long`` (~1,300 tokens) prompts.

Workload ``busy`` asks the other question (``models[].local_prefill_busy``): when the prefill
worker is the bottleneck, does sending its overflow to idle decode engines help? One prefill and
two decode workers, every one computing prefills one at a time (``--serial-prefill``: a busy
engine queues), ~400-token prompts arriving open loop (Poisson) at each of ``--busy-rates``:
one the prefill worker alone sustains and one it cannot; systems ``disaggregated`` and
``busy>=N``. The simulator does not model what a
prefill costs the decode engine's running streams (vLLM's chunked prefill slows their
inter-token latency), so this is the TTFT side of the trade only.

Figures, in one run: TTFT p50/p99 at the client, requests/s, the gateway's CPU per request
(/proc), the prefill legs the prefill worker received; ratios local / disaggregated.

    .venv/bin/python benchmarks/local_prefill.py [--quick] [--limit 256] [--busy 2]
        [--workloads short,long,busy] [--rounds 2]

Prints a table and writes benchmarks/results/local_prefill.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fleet_runs as F
import routing as R
from lmgw.config import (
    GatewayConfig,
    LoggingConfig,
    ModelConfig,
    ServerConfig,
    WorkerConfig,
)
from lmgw.simulators import model_files
from lmgw.simulators.fleet import Fleet, open_fleet, stop_process

WORKLOADS = {"short": 12, "long": 1300, "busy": 300}  # prompt words


def config(fleet: Fleet, limit: int, busy: int, port: int) -> GatewayConfig:
    return GatewayConfig(
        server=ServerConfig(host="127.0.0.1", port=port),
        logging=LoggingConfig(level="warning"),
        models=[
            ModelConfig(
                name=R.MODEL,
                flow="p/d",
                dialect="vllm-nixl",
                local_prefill_tokens=limit,
                local_prefill_busy=busy,
            )
        ],
        workers=[
            WorkerConfig(url=m.url, role=m.role, id=f"{m.role}{m.index}", models=[R.MODEL])
            for m in fleet.members
        ],
    )


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, clock ticks


async def prefill_legs(fleet: Fleet) -> int:
    total = 0
    for m in fleet.members:
        if m.role == "p":
            total += json.loads((await F.http(m.url, "GET", "/sim/stats"))[1])["requests_total"]
    return total


async def one_run(
    fleet: Fleet,
    name: str,
    limit: int,
    busy: int,
    words: int,
    rate: float | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One system on one workload: closed loop of ``--concurrency`` clients, or (``rate``)
    Poisson arrivals at that rate."""
    proc, url = await F.start_gateway(
        name,
        [],
        fleet,
        F.RESULTS / "local_prefill-logs",
        config=lambda port: config(fleet, limit, busy, port),
    )
    try:
        await F.reset_workers(fleet)
        legs0 = await prefill_legs(fleet)
        cpu0 = proc_cpu_s(proc.pid)
        workload = R.Control(prompt_words=words)
        if rate is None:
            records = await R.closed_loop(url, workload, args.concurrency, args.duration, args.seed)
        else:
            records, _ = await R.open_loop(url, workload, rate, args.duration, args.seed)
        cpu1 = proc_cpu_s(proc.pid)
        legs = await prefill_legs(fleet) - legs0
    finally:
        await stop_process(proc)
    figures = R.summarize(records, args.warmup * args.duration, args.duration, args.speed)
    ok = sum(r.ok for r in records)
    return {
        **figures,
        "system": name,
        "prefill_legs": legs,
        "requests_all": len(records),
        "gateway_cpu_us_per_req": 1e6 * (cpu1 - cpu0) / max(1, ok),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = await trio.to_thread.run_sync(model_files.default_model_dir)
    runs: list[dict[str, Any]] = []
    names: dict[str, list[str]] = {}
    for workload in args.workloads.split(","):
        busy = workload == "busy"
        # name: (local_prefill_tokens, local_prefill_busy)
        systems = (
            {"disaggregated": (0, 0), f"busy>={args.busy}": (0, args.busy)}
            if busy
            else {"disaggregated": (0, 0), f"local<={args.limit}": (args.limit, 0)}
        )
        serial = ["--serial-prefill"] if busy else []
        async with open_fleet(
            {"p": 1, "d": 2 if busy else 1},
            model=R.MODEL,
            speed=args.speed,
            model_dir=model_dir,
            dialect="vllm-nixl",
            role_args={
                "d": ["--local-prefill", "--log-level", "WARNING", *serial],
                "p": ["--log-level", "WARNING", *serial],
            },
            ready_timeout_s=60.0,
        ) as fleet:
            rates = [float(r) for r in args.busy_rates.split(",")] if busy else [None]
            for rnd, rate in itertools.product(range(args.rounds), rates):
                order = list(systems.items())
                label = workload if rate is None else f"{workload}@{rate:g}/s"
                names[label] = list(systems)
                for name, (limit, at) in order if rnd % 2 == 0 else order[::-1]:  # either first
                    words = WORKLOADS[workload]
                    run = await one_run(fleet, name, limit, at, words, rate, args)
                    run.update(workload=label, round=rnd)
                    runs.append(run)
                    R.log(
                        f"{label:<5} {name:<14} ttft p50 {R._ms(run['ttft_p50_ms'])} p99 "
                        f"{R._ms(run['ttft_p99_ms'])} thr {run['throughput_rps']:.1f}/s gateway "
                        f"{run['gateway_cpu_us_per_req']:.0f} us/req prefill legs "
                        f"{run['prefill_legs']} errors {run['errors']}"
                    )
    return {"meta": R.run_meta(args), "systems": names, "runs": runs}


def table(out: dict[str, Any]) -> str:
    lines = [
        "| workload | system | TTFT p50 | TTFT p99 | req/s | gateway CPU µs/req | prefill legs "
        "| errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    by: dict[tuple[str, str], dict[str, float]] = {}
    for workload in dict.fromkeys(r["workload"] for r in out["runs"]):
        for system in out["systems"][workload]:
            rs = [r for r in out["runs"] if r["workload"] == workload and r["system"] == system]
            m = {
                k: statistics.median(r[k] or 0.0 for r in rs)
                for k in ("ttft_p50_ms", "ttft_p99_ms", "throughput_rps",
                          "gateway_cpu_us_per_req", "prefill_legs", "errors")
            }  # fmt: skip
            by[(workload, system)] = m
            lines.append(
                f"| {workload} | {system} | {m['ttft_p50_ms']:.1f} ms | {m['ttft_p99_ms']:.1f} ms "
                f"| {m['throughput_rps']:.1f} | {m['gateway_cpu_us_per_req']:.0f} "
                f"| {m['prefill_legs']:.0f} | {m['errors']:.0f} |"
            )
        base, local = (by[(workload, s)] for s in out["systems"][workload])
        ratios.append(
            f"{workload}: local / disaggregated TTFT p50 "
            f"{local['ttft_p50_ms'] / base['ttft_p50_ms']:.2f}x, gateway CPU "
            f"{local['gateway_cpu_us_per_req'] / base['gateway_cpu_us_per_req']:.2f}x, req/s "
            f"{local['throughput_rps'] / base['throughput_rps']:.2f}x"
        )
    return "\n".join([*lines, "", *ratios])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 round of 3 s")
    p.add_argument("--limit", type=int, default=256, help="local_prefill_tokens of local<=N")
    p.add_argument("--busy", type=int, default=2, help="local_prefill_busy of busy>=N")
    p.add_argument("--workloads", default="short,long,busy")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument(
        "--busy-rates",
        default="18,36",
        help="arrivals/s of workload busy: the prefill worker alone sustains ~24 at speed 1",
    )
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=float, default=0.2)
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 3.0
    out = trio.run(main_async, args)
    text = table(out)
    F.save("local_prefill", {**F.result("local_prefill", args), **out, "table": text})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
