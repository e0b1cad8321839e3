"""Joint P/D placement against independent placement, on a simulated P/D fleet spread over two
KV-transfer zones (ANCHORS.md §5.11).

The question: when a prefill's KV must move to its decode worker, and moving it across zones
costs ten times what it costs within one, does choosing the pair as one (``routing.placement =
"joint"``: least estimated TTFT, transfer included) beat choosing each stage by its own policy
(``"independent"``, what SMG, vllm-router and llm-d do), without giving up prefix-cache hits?

* fleet: ``--prefill`` and ``--decode`` simulated workers (``python -m lmgw.simulators``,
  vLLM NIXL hand-offs), the k-th worker of each role in zone ``z{k % 2}``; prefills computed one
  at a time per worker (``--serial-prefill``), KV of ``--kv-bytes-per-token`` bytes per prompt
  token moved at 100 GB/s within a zone and 12.5 GB/s across (the simulators' defaults: NVLink
  vs a 100 Gb/s RDMA link), before the decode worker's first token.
* systems, each ``lmgw serve`` in its own process with the same policies (prefill
  ``cache_aware`` with the gateway's tokenizer, decode ``least_load``): ``independent`` and
  ``joint``. ``--systems independent-rr,...`` adds round robin at both stages (with as many
  prefill as decode workers it pairs the k-th of each, which this fleet puts in one zone: its
  pairs never cross, by construction, not by choice).
* workloads (benchmarks/routing.py's): ``sysprompt`` (shared long system prompts: the prefill
  policy's cache hits matter) and ``control`` (unique prompts).
* load: open-loop Poisson arrivals at ``--rate`` requests/s (the same schedule for every
  system), after the workers' caches and counters are reset.

Figures over the requests after the warm-up: TTFT p50/p99 at the client; over the whole run:
the share of pairs that moved KV across zones and the mean transfer time (the decode workers'
own counters), the prefill workers' prefix-cache hit rate, errors. Ratios joint /
independent are computed in the same run.

    .venv/bin/python benchmarks/placement.py [--quick] [--rate 6] [--duration 20]

Prints a table and writes benchmarks/results/placement.json; child logs go to
benchmarks/results/placement-logs/.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import trio

from fleet_runs import start_gateway
from lmgw.config import (
    GatewayConfig,
    LoggingConfig,
    ModelConfig,
    RoutingConfig,
    ServerConfig,
    WorkerConfig,
)
from lmgw.simulators import model_files
from lmgw.simulators.fleet import Fleet, open_fleet, stop_process
from routing import (
    MODEL,
    Control,
    SystemPrompts,
    http,
    log,
    open_loop,
    summarize,
)

HERE = Path(__file__).resolve().parent
OUT_JSON = HERE / "results" / "placement.json"
LOG_DIR = HERE / "results" / "placement-logs"


@dataclass
class System:
    name: str
    placement: str
    prefill: str
    decode: str


SYSTEMS = {
    s.name: s
    for s in (
        System("independent", "independent", "cache_aware", "least_load"),
        System("joint", "joint", "cache_aware", "least_load"),
        System("independent-rr", "independent", "round_robin", "round_robin"),
    )
}


def gateway_config(system: System, fleet: Fleet, port: int, kv_bytes: int) -> GatewayConfig:
    return GatewayConfig(
        server=ServerConfig(host="127.0.0.1", port=port),
        routing=RoutingConfig(
            policies={"p": system.prefill, "d": system.decode},
            placement=system.placement,  # type: ignore[arg-type]
            kv_bytes_per_token=kv_bytes,
        ),
        logging=LoggingConfig(level="warning"),
        models=[ModelConfig(name=MODEL, flow="p/d", tokenizer=str(fleet.model_dir))],
        workers=[
            WorkerConfig(url=m.url, role=m.role, id=f"{m.role}{i}", models=[MODEL], zone=m.zone)
            for i, m in enumerate(fleet.members)
        ],
    )


def registration_order(fleet: Fleet, seed: int) -> None:
    """Workers in an order unrelated to their zones (as a fleet registers them): policies
    that break ties by position would otherwise pair same-zone workers by accident."""
    random.Random(seed).shuffle(fleet.members)


async def fleet_counts(fleet: Fleet) -> dict[str, float]:
    """The decode workers' KV transfers (same/cross zone, seconds) and the prefill workers'
    prefix-cache hits and queries (a decode worker counts transferred KV as cached, so the
    answers' usage says nothing of the prefill's cache)."""
    out = dict.fromkeys(("same", "cross", "seconds", "hits", "queries"), 0.0)
    for m in fleet.members:
        stats = msgspec.json.decode((await http(m.url, "GET", "/sim/stats")).body)
        if m.role == "d":
            h = stats["handoff"]
            out["same"] += h["kv_transfers_same_zone"]
            out["cross"] += h["kv_transfers_cross_zone"]
            out["seconds"] += h["kv_transfer_seconds_total"]
        else:
            out["hits"] += stats["prefix_cache"]["hits"]
            out["queries"] += stats["prefix_cache"]["queries"]
    return out


async def run_one(
    system: System, workload: str, fleet: Fleet, args: argparse.Namespace
) -> dict[str, Any]:
    proc, url = await start_gateway(
        system.name, [], fleet, LOG_DIR, model=MODEL,
        config=lambda port: gateway_config(system, fleet, port, args.kv_bytes_per_token),
    )  # fmt: skip
    try:
        for m in fleet.members:
            assert (await http(m.url, "POST", "/sim/reset")).status == 200
        wl = SystemPrompts(prompts=4, seed=args.seed) if workload == "sysprompt" else Control()
        before = await fleet_counts(fleet)
        records, dropped = await open_loop(url, wl, args.rate, args.duration, args.seed)
        after = await fleet_counts(fleet)
    finally:
        await stop_process(proc)
    moved = {k: after[k] - before[k] for k in after}
    pairs = moved["same"] + moved["cross"]
    figures = summarize(records, args.warmup * args.duration, args.duration)
    result = {
        "system": system.name, "workload": workload, "rate_rps": args.rate, "dropped": dropped,
        **figures, "cross_zone_share": moved["cross"] / pairs if pairs else None,
        "transfer_s_mean_ms": 1e3 * moved["seconds"] / pairs if pairs else None,
        "hit_rate": moved["hits"] / moved["queries"] if moved["queries"] else 0.0,
    }  # fmt: skip
    log(f"{workload:<9} {system.name:<15} ttft p50 {result['ttft_p50_ms']:.0f} ms"
        f" p99 {result['ttft_p99_ms']:.0f} ms cross {result['cross_zone_share']:.0%}"
        f" hit {result['hit_rate']:.0%} err {result['errors']}")  # fmt: skip
    return result


def decision_cost(n: int, decisions: int = 3000) -> dict[str, float]:
    """The pair decision alone, µs per request (median of 3 interleaved runs): independent
    (cache_aware chooses the prefill, least_load the decode) against joint (the same prefill
    choice for its predictions, then the pair), on ``n`` prefill and ``n`` decode workers in two
    zones, with routing_decision.py's workload (shared 1k-token system prompt, 2k-token
    conversations) warmed into the prefill index."""
    from lmgw.routing.policy import RouteContext
    from lmgw.routing.registry import make_policy
    from lmgw.workers.registry import Registry
    from lmgw.workers.worker import Worker, WorkerState
    from routing_decision import Workload, warm

    reg = Registry()
    for role in ("p", "d"):
        for i in range(n):
            w = reg.add(Worker(f"{role}{i}", f"http://10.0.{int(role == 'd')}.{i}:8000", role,
                               frozenset({"m"})))  # fmt: skip
            w.zone = f"z{i % 2}"
            reg.set_state(w, WorkerState.HEALTHY)
    prefills, decodes = reg.candidates("m", "p"), reg.candidates("m", "d")
    cfg = RoutingConfig()
    pol_p, pol_d = make_policy("cache_aware", cfg), make_policy("least_load", cfg)
    work = Workload(2048, 1)
    warm(pol_p, prefills, work)
    pl = __import__("lmgw.routing.placement", fromlist=["Placement"]).Placement(
        same_zone_gbps=100.0, cross_zone_gbps=12.5, prefill_tokens_per_s=20000.0,
        bounded_load_factor=1.25, kv_bytes_per_token=lambda model: 131072,
    )  # fmt: skip
    rng = random.Random(2)

    def run(joint: bool) -> float:
        ctxs: list[RouteContext] = [work.ctx(i) for i in range(decisions)]
        for w in (*prefills, *decodes):
            w.in_flight = rng.randrange(5)
        t0 = time.perf_counter()
        for ctx in ctxs:
            first = pol_p.choose(prefills, ctx)
            if joint:
                n_tok = len(ctx.tokens)
                hits = pol_p.predicted_cached_by_worker(prefills, ctx)
                pair = pl.choose("m", prefills, decodes, n_tok, hits, first)
                pl.dispatched(ctx, pair, n_tok, 0)
                pl.release(ctx)
            else:
                pol_d.choose(decodes, ctx)
        return (time.perf_counter() - t0) / decisions * 1e6

    run(False), run(True)  # warm-up: caches, allocator
    runs: dict[str, list[float]] = {"independent": [], "joint": []}
    for _ in range(3):
        for name in ("independent", "joint"):
            runs[name].append(run(name == "joint"))
    ind, jnt = (statistics.median(runs[k]) for k in ("independent", "joint"))
    return {"workers": n, "independent_us": ind, "joint_us": jnt, "ratio": jnt / ind}


def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'workload':<10}{'system':<16}{'TTFT p50':>10}{'p99':>8}{'cross':>7}"
            f"{'xfer':>7}{'hit':>6}{'err':>5}")  # fmt: skip
    lines = [head]
    for r in results:
        lines.append(
            f"{r['workload']:<10}{r['system']:<16}{r['ttft_p50_ms']:>8.0f}ms"
            f"{r['ttft_p99_ms']:>6.0f}ms{r['cross_zone_share']:>7.0%}"
            f"{r['transfer_s_mean_ms']:>5.0f}ms{r['hit_rate']:>6.0%}{r['errors']:>5}"
        )
    return "\n".join(lines)


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """joint / independent, per workload, over the repeats' medians."""
    out: dict[str, dict[str, float]] = {}
    for wl in sorted({r["workload"] for r in results}):

        def med(system: str, key: str, wl: str = wl) -> float:
            return statistics.median(
                r[key] for r in results if r["workload"] == wl and r["system"] == system
            )

        out[wl] = {
            "ttft_p50": med("joint", "ttft_p50_ms") / med("independent", "ttft_p50_ms"),
            "ttft_p99": med("joint", "ttft_p99_ms") / med("independent", "ttft_p99_ms"),
        }
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    costs = [decision_cost(n) for n in (8, 64)]
    for c in costs:
        log(f"pair decision, {c['workers']}p + {c['workers']}d in 2 zones: independent"
            f" {c['independent_us']:.1f} µs, joint {c['joint_us']:.1f} µs"
            f" ({c['ratio']:.2f}x)")  # fmt: skip
    if args.decision_only:
        return {"runs": [], "decision": costs}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    model_dir = await trio.to_thread.run_sync(model_files.default_model_dir)
    worker_args = ["--serial-prefill", "--kv-bytes-per-token", str(args.kv_bytes_per_token),
                   "--log-level", "WARNING"]  # fmt: skip
    results: list[dict[str, Any]] = []
    async with open_fleet(
        {"p": args.prefill, "d": args.decode}, model=MODEL, speed=args.speed,
        model_dir=model_dir, role_args={"p": worker_args, "d": worker_args}, zones=2,
        ready_timeout_s=60.0,
    ) as fleet:  # fmt: skip
        registration_order(fleet, args.seed)
        for rep in range(args.repeats):
            for workload in args.workloads.split(","):
                for name in args.systems.split(","):
                    r = await run_one(SYSTEMS[name], workload, fleet, args)
                    results.append({**r, "repeat": rep})
    return {"runs": results, "decision": costs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs, one repeat")
    ap.add_argument("--prefill", type=int, default=4)
    ap.add_argument("--decode", type=int, default=4)
    ap.add_argument("--rate", type=float, default=6.0, help="arrivals per second")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=0.2, help="share of each run not measured")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--speed", type=float, default=1.0, help="simulator timing scale")
    ap.add_argument("--kv-bytes-per-token", type=int, default=131072)
    ap.add_argument("--workloads", default="sysprompt,control")
    ap.add_argument("--systems", default="independent,joint")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--decision-only", action="store_true", help="only the decision's cost")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.repeats = 8.0, 1
    out = trio.run(main_async, args)
    runs = out["runs"]
    for c in out["decision"]:
        print(f"pair decision {c['workers']}p+{c['workers']}d: independent"
              f" {c['independent_us']:.1f} µs, joint {c['joint_us']:.1f} µs,"
              f" joint/independent {c['ratio']:.2f}x")  # fmt: skip
    if not runs:
        return 0
    print(table(runs))
    rat = ratios(runs) if "joint" in args.systems and "independent" in args.systems else {}
    for wl, r in rat.items():
        print(f"{wl}: joint/independent TTFT p50 {r['ttft_p50']:.2f}x, p99 {r['ttft_p99']:.2f}x")
    OUT_JSON.parent.mkdir(exist_ok=True)
    OUT_JSON.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "platform": platform.platform()},
        "args": {k: v for k, v in vars(args).items()}, "runs": runs, "ratios": rat,
        "decision": out["decision"],
    }, indent=1) + "\n")  # fmt: skip
    print(f"wrote {OUT_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
