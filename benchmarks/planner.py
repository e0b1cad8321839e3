"""The planner in a closed loop: following ``lmgw_planner_desired_workers`` from a fleet too
small, does the fleet reach one that meets the target, and how does its size compare with the
fewest workers that meet it?

Simulated merged workers whose time per output token grows with their batch (``--timing
c=0.002,d=0.004``: 2 ms + 4 ms per running stream, so one worker holds 5 streams within 25 ms),
an inter-token target of 25 ms (p90, ``planner.itl_slo_s``), ``--streams`` clients in a closed
loop, each streaming 16 tokens of a fresh prompt (routing.py's ``control`` workload).

1. **Ground truth.** For n = 1..``--workers``: a gateway in front of n workers, the p90 of the
   streams' time per output token measured at the client; the fewest n that meets 25 ms.
2. **The loop.** A gateway in front of one worker (``planner.window_s`` 5 s, a 15 s
   scale-down delay); every 5 s this script reads ``GET /admin/planner`` and adds or removes
   workers (``POST``/``DELETE /admin/workers``, from the started pool) to match the recommended
   count, as an autoscaler would. ``--streams`` clients for the first half of the run,
   ``--then-streams`` for the second. Per step: workers, the recommendation, the learned
   capacity, the status, and the clients' p90 in that step.

    .venv/bin/python benchmarks/planner.py [--streams 12] [--workers 5] [--steps 8]

Prints tables and writes benchmarks/results/planner.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fleet_runs as F
import routing as R
from lmgw.config import (
    AdminConfig,
    GatewayConfig,
    LoggingConfig,
    PlannerConfig,
    ServerConfig,
    WorkerConfig,
)
from lmgw.simulators import model_files
from lmgw.simulators.fleet import Fleet, open_fleet, stop_process

TOKEN = "planner-bench"
TIMING = "c=0.002,d=0.004"
TARGET_S = 0.025
STEP_S = 5.0
LOGS = F.RESULTS / "planner-logs"


def config(fleet: Fleet, n: int, port: int) -> GatewayConfig:
    return GatewayConfig(
        server=ServerConfig(host="127.0.0.1", port=port),
        logging=LoggingConfig(level="info"),
        admin=AdminConfig(token=TOKEN),
        planner=PlannerConfig(itl_slo_s=TARGET_S, window_s=STEP_S, scale_down_delay_s=15.0),
        workers=[
            WorkerConfig(url=m.url, role="pd", id=f"w{m.index}", models=[R.MODEL])
            for m in fleet.members[:n]
        ],
    )


def tpot_p90(records: list[R.Record], since: float, until: float) -> float | None:
    """The p90 over the streams that ended in [since, until) of their mean time per output
    token at the client ((end - first token) / 15 for 16 tokens)."""
    values = [
        (r.done - r.arrival - r.ttft) / (R.MAX_TOKENS - 1)
        for r in records
        if r.ok and r.done is not None and r.ttft is not None and since <= r.done < until
    ]
    return R.percentile(values, 0.9) if values else None


async def admin(url: str, method: str, path: str, body: Any = None) -> Any:
    """An admin call with the token; its JSON answer (None for an empty one)."""
    data = b"" if body is None else json.dumps(body).encode()
    status, payload = await F.http(
        url, method, path, data, headers={"authorization": f"Bearer {TOKEN}"}
    )
    if status >= 300:
        raise RuntimeError(f"{method} {path}: {status} {payload[:200]!r}")
    return json.loads(payload) if payload.strip().startswith(b"{") else None


async def ground_truth(
    fleet: Fleet, streams: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """For n = 1, 2, ... workers until the target is met: the clients' p90."""
    rows: list[dict[str, Any]] = []
    for n in range(1, args.workers + 1):
        proc, url = await F.start_gateway(
            f"truth{n}", [], fleet, LOGS, config=lambda port, n=n: config(fleet, n, port)
        )
        try:
            records = await R.closed_loop(
                url, R.Control(prompt_words=20), streams, args.truth_s, args.seed
            )
        finally:
            await stop_process(proc)
        p90 = tpot_p90(records, 1.0, math.inf)
        meets = p90 is not None and p90 <= TARGET_S
        rows.append({"streams": streams, "workers": n, "tpot_p90_s": p90, "meets": meets})
        R.log(f"ground truth: {streams} streams, {n} worker(s): client p90 {p90 * 1000:.1f} ms")
        if meets:
            break
    return rows


async def closed_loop(fleet: Fleet, args: argparse.Namespace) -> list[dict[str, Any]]:
    proc, url = await F.start_gateway(
        "loop", [], fleet, LOGS, config=lambda port: config(fleet, 1, port)
    )
    steps: list[dict[str, Any]] = []
    records: list[R.Record] = []
    active = 1
    try:
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()

            async def load() -> None:
                for streams, seconds in phases:
                    offset = trio.current_time() - t0
                    done = await R.closed_loop(
                        url, R.Control(prompt_words=20), streams, seconds, args.seed
                    )
                    for r in done:  # times from the loop's start, not the phase's
                        r.arrival += offset
                        if r.done is not None:
                            r.done += offset
                    records.extend(done)

            phases = [(args.streams, args.steps * STEP_S * 0.5)]
            phases.append((args.then_streams, args.steps * STEP_S * 0.5 + STEP_S))
            nursery.start_soon(load)
            for step in range(args.steps):
                await trio.sleep_until(t0 + (step + 1) * STEP_S)
                pools = (await admin(url, "GET", "/admin/planner"))["pools"]
                plan = next((p for p in pools if p["role"] == "pd" and p["models"] != "*"), None)
                if plan is None:
                    continue
                desired = min(max(plan["desired"], 1), args.workers)
                row = {
                    "t_s": (step + 1) * STEP_S,
                    "workers": active,
                    "desired": plan["desired"],
                    "capacity": plan["capacity_per_worker"],
                    "status": plan["status"],
                    "load": plan["load"],
                }
                steps.append(row)
                R.log(f"loop: {row}")
                while active < desired:  # the autoscaler: add from the pool...
                    m = fleet.members[active]
                    await admin(url, "POST", "/admin/workers",
                                {"url": m.url, "role": "pd", "id": f"w{m.index}",
                                 "models": [R.MODEL]})  # fmt: skip
                    active += 1
                while active > desired:  # ...or retire the newest
                    active -= 1
                    await admin(url, "DELETE", f"/admin/workers/w{active}?grace_s=5")
    finally:
        await stop_process(proc)
    # the clients' p90 in each step (the records are complete now)
    for row in steps:
        row["tpot_p90_s"] = tpot_p90(records, row["t_s"] - STEP_S, row["t_s"])
    return steps


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = await trio.to_thread.run_sync(model_files.default_model_dir)
    async with open_fleet(
        {"pd": args.workers},
        model=R.MODEL,
        speed=1.0,
        model_dir=model_dir,
        role_args={"pd": ["--timing", TIMING, "--log-level", "WARNING"]},
        ready_timeout_s=60.0,
    ) as fleet:
        truth = await ground_truth(fleet, args.streams, args)
        truth += await ground_truth(fleet, args.then_streams, args)
        loop = await closed_loop(fleet, args)
    return {"meta": R.run_meta(args), "ground_truth": truth, "loop": loop}


def table(out: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.1f} ms"

    lines = ["| streams | workers | client p90 TPOT | meets 25 ms |", "|---|---|---|---|"]
    fewest: dict[int, int] = {}
    for r in out["ground_truth"]:
        meets = "yes" if r["meets"] else "no"
        lines.append(f"| {r['streams']} | {r['workers']} | {ms(r['tpot_p90_s'])} | {meets} |")
        if r["meets"]:
            fewest[r["streams"]] = r["workers"]
    lines += ["", "| t | workers | recommended | capacity | status | load | client p90 TPOT |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in out["loop"]:
        lines.append(
            f"| {r['t_s']:.0f} s | {r['workers']} | {r['desired']} | {r['capacity'] or '-'} "
            f"| {r['status']} | {r['load']:.1f} | {ms(r['tpot_p90_s'])} |"
        )
    last = out["loop"][-1] if out["loop"] else None
    if last is not None:
        lines.append("")
        lines.append(
            f"fewest workers meeting the target, by streams: {fewest}; the loop ended at"
            f" {last['workers']} (recommended {last['desired']}), client p90 in its last step"
            f" {ms(last['tpot_p90_s'])}"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=12, help="concurrent client streams")
    p.add_argument("--workers", type=int, default=5, help="the pool (and the ground truth's n)")
    p.add_argument("--steps", type=int, default=16, help="autoscaler steps of 5 s")
    p.add_argument(
        "--then-streams", type=int, default=4, help="the streams of the run's second half"
    )
    p.add_argument("--truth-s", type=float, default=5.0, help="seconds per ground-truth run")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    out = trio.run(main_async, args)
    out["table"] = table(out)
    F.save("planner", {**F.result("planner", args), **out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
