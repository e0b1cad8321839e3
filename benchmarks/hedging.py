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
import datetime
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from lmgw.bench import BenchOptions, run_bench
from lmgw.simulators.fleet import Fleet, open_fleet, stop_process

RESULTS = Path(__file__).resolve().parent / "results"
LOG_DIR = RESULTS / "hedging-logs"
MODEL = "sim-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: the gateway flags of each system (beyond the workers); "fixed" also gets
#: LMGW_HEDGING_DELAY_S (see start_gateway)
SYSTEMS: dict[str, list[str]] = {"off": [], "adaptive": ["--hedge"], "fixed": ["--hedge"]}


async def http(url: str, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(body)}\r\n"
            "content-type: application/json\r\nconnection: close\r\n\r\n"
        ).encode()
        await stream.send_all(head + body)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head_bytes.lower():
        out, rest = b"", payload
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        payload = out
    return status, payload


async def start_gateway(
    name: str, flags: list[str], fleet: Fleet, fixed_delay: float
) -> tuple[trio.Process, str]:
    port = free_port()
    argv = [sys.executable, "-c", "import sys; from lmgw.cli import main; sys.exit(main())"]
    argv += ["serve", "--host", "127.0.0.1", "--port", str(port)]
    for m in fleet.members:
        argv += ["--worker", f"pd={m.url}"]
    argv += ["--log-level", "warning", "--open", *flags]
    env = dict(os.environ)
    if name == "fixed":
        env["LMGW_HEDGING_DELAY_S"] = str(fixed_delay)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    logf = open(LOG_DIR / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env, start_new_session=True
    )
    logf.close()
    url = f"http://127.0.0.1:{port}"
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    ).encode()
    with trio.fail_after(60):
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {LOG_DIR}")
            try:
                if (await http(url, "POST", "/v1/chat/completions", body))[0] == 200:
                    return proc, url
            except OSError:
                pass
            await trio.sleep(0.2)


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
    for m in fleet.members:  # same stall draws per worker for every system
        status, _ = await http(m.url, "POST", "/sim/reset")
        assert status == 200
    proc, url = await start_gateway(name, flags, fleet, args.fixed_delay)
    try:
        before = 0
        for m in fleet.members:
            before += json.loads((await http(m.url, "GET", "/sim/stats"))[1])["requests_total"]
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
        legs = -before
        for m in fleet.members:
            legs += json.loads((await http(m.url, "GET", "/sim/stats"))[1])["requests_total"]
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


def _med(runs: list[dict[str, Any]], *path: str) -> float | None:
    values = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            values.append(float(v))
    return statistics.median(values) if values else None


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
            f"| {name} | {f(_med(runs, 'ttft_ms', 'p50'))} | {f(_med(runs, 'ttft_ms', 'p90'))}"
            f" | {f(_med(runs, 'ttft_ms', 'p99'))} | {f(_med(runs, 'ttft_ms', 'max'))}"
            f" | {f(_med(runs, 'e2e_ms', 'p99'))} | {f(_med(runs, 'errors'), '{:.0f}')}"
            f" | {f(_med(runs, 'extra_legs_per_request'), '{:.3f}')}"
            f" | {f(_med(runs, 'hedges', 'won_by_hedge'), '{:.0f}')}"
            f" / {f(_med(runs, 'hedges', 'won_by_primary'), '{:.0f}')}"
            f" | {f(_med(runs, 'hedges', 'skipped_budget'), '{:.0f}')} |"
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
    off = _med(by_system["off"], "ttft_ms", "p99")
    ratios: dict[str, float | None] = {}
    for n, rs in by_system.items():
        p99 = _med(rs, "ttft_ms", "p99")
        ratios[n] = None if not off or p99 is None else round(p99 / off, 3)
    return {
        "benchmark": "hedging",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "args": vars(args),
        "runs": by_system,
        "ttft_p99_vs_off": ratios,
        "table": table(by_system),
    }


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
    result = trio.run(main_async, args)
    print()
    print(result["table"])
    print("TTFT p99 / off:", result["ttft_p99_vs_off"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hedging.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS / 'hedging.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
