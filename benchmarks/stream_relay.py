"""CPU per relayed SSE event, with paced tokens and with a worker as fast as it can go, for lmgw
(streams relayed by the compiled lane), ``lmgw-trio`` (``server.compiled_lane = false``: the
trio relay), ``lmgw-keepalive`` and ``lmgw-keepalive-trio`` (``--sse-keepalive 15``: keep-alive
comments on, in the lane and on trio), lmgw keeping every answer resumable
(``--resumable-streams`` and ``X-Lmgw-Resumable: 1``: the buffer and follower of
``lmgw.streams`` on the path), lmgw coalescing (``--coalesce`` with
greedy requests, all distinct: every one eligible, none shared, the price of the option),
``trio-floor`` (`floor_relay.py`: a bare trio relay with nothing in it, passing a stream's reads
on as they come: what trio and the kernel cost per event anyway, the floor for any trio relay),
and (when the peer harness's venv has it) vllm-router, in one run.

Why two regimes: the peer harness streams 256 tokens with no delay, so at c=32 lmgw runs
its CPU at 100% and its "CPU per chunk" is one core divided by the event rate, which the load
generator and the workers (on the other CPU) set: it cannot move whatever lmgw saves (a
faster relay just reads more often, fewer events per read). Real engines pace tokens (one
every few ms per stream), so each event is a wake-up, a read and a write of its own: that is
where a relay's cost per event shows. ``paced`` runs the harness's mock worker with
``--token-delay`` (default 1 ms) at c=64; ``burst`` is the harness's setting (no delay, c=32).

Layout as `floor.py`: the system under test alone on the second CPU, wrk and the workers on the
first; systems alternate order over rounds; medians. CPU from /proc/<pid>/stat, split into
user (interpreter) and system (kernel) time.

    .venv/bin/python benchmarks/stream_relay.py [--rounds 3] [--duration 4] [--token-delay 0.001]
        [--systems lmgw,lmgw-trio,...]

Writes benchmarks/results/stream_relay.json. Needs wrk and ../shared/bench/mock_worker.py.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT_JSON = RESULTS / "stream_relay.json"
LOG_DIR = RESULTS / "stream-relay-logs"
MOCK = HERE.parent.parent / "shared" / "bench" / "mock_worker.py"
VLLM_ROUTER = Path.home() / ".cache" / "lmgw-peers-venv" / "bin" / "vllm-router"
TOKENS = 256
CT = '{["Content-Type"] = "application/json"}'
TICK = os.sysconf("SC_CLK_TCK")


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"lmgw_bench_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


floor = _load("floor")  # its process/CPU/wrk helpers (overhead.py's) and wait_answering
oh = floor.oh
oh.LOG_DIR = LOG_DIR
wait_answering = floor.wait_answering


def log(*parts: object) -> None:
    print(f"[stream_relay {time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def user_sys_s(pids: list[int]) -> tuple[float, float]:
    """utime and stime of these processes (all threads), seconds."""
    user = system = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / TICK
        system += int(fields[12]) / TICK
    return user, system


def system_argv(name: str, port: int, workers: list[int]) -> list[str]:
    urls = [f"http://127.0.0.1:{w}" for w in workers]
    if name == "lmgw":
        return oh.gateway_argv(port, [f"pd={u}" for u in urls])
    if name == "lmgw-trio":  # the compiled lane off: streams relayed on trio, as before it
        trio_toml = LOG_DIR / "lane_off.toml"
        trio_toml.write_text("[server]\ncompiled_lane = false\n")
        return [*oh.gateway_argv(port, [f"pd={u}" for u in urls]), "--config", str(trio_toml)]
    if name == "lmgw-keepalive":  # SSE keep-alive comments on (15 s): relayed by the lane too
        return [*oh.gateway_argv(port, [f"pd={u}" for u in urls]), "--sse-keepalive", "15"]
    if name == "lmgw-keepalive-trio":  # the same on trio: what keep-alive gateways ran before
        trio_toml = LOG_DIR / "lane_off.toml"
        trio_toml.write_text("[server]\ncompiled_lane = false\n")
        argv = [*oh.gateway_argv(port, [f"pd={u}" for u in urls]), "--sse-keepalive", "15"]
        return [*argv, "--config", str(trio_toml)]
    if name == "lmgw-resumable":  # every answer kept and relayed through its buffer
        return [*oh.gateway_argv(port, [f"pd={u}" for u in urls]), "--resumable-streams"]
    if name == "lmgw-coalesce":  # greedy requests, each eligible to be shared (none is)
        return [*oh.gateway_argv(port, [f"pd={u}" for u in urls]), "--coalesce"]
    if name == "trio-floor":  # floor_relay.py: a bare trio relay, nothing in it (a yardstick)
        return [sys.executable, str(HERE / "floor_relay.py"), str(port), *map(str, workers)]
    argv = [str(VLLM_ROUTER), "--host", "127.0.0.1", "--port", str(port), "--worker-urls"]
    return [*argv, *urls, "--policy", "round_robin"]


def measure(children: Any, ctx: dict[str, Any], name: str, conns: int) -> dict[str, float]:
    port = oh.free_port()
    proc = children.spawn(
        system_argv(name, port, ctx["workers"]), log_path=LOG_DIR / f"{name}.log", cpus=ctx["cpus"]
    )
    try:
        wait_answering(port)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        lua = ctx["resumable_lua"] if name == "lmgw-resumable" else ctx["lua"]
        bodies = ctx["greedy_bodies"] if name == "lmgw-coalesce" else ctx["bodies"]
        oh.run_wrk(children, url, bodies, conns, 1, lua)  # warm-up
        tree = oh.proc_tree(proc.pid)
        u0, s0 = user_sys_s(tree)
        r = oh.run_wrk(children, url, bodies, conns, ctx["duration"], lua)
        u1, s1 = user_sys_s(tree)
        if r["errors"] or r["non_2xx"]:
            raise oh.BenchError(f"{name}: {r['errors']} socket errors, {r['non_2xx']} non-2xx")
        events = max(r["requests"], 1) * TOKENS
        return {
            "events_per_s": events / ctx["duration"],
            "user_us_per_event": (u1 - u0) / events * 1e6,
            "sys_us_per_event": (s1 - s0) / events * 1e6,
            "cpu_us_per_event": (u1 - u0 + s1 - s0) / events * 1e6,
        }
    finally:
        children.stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--token-delay", type=float, default=0.001, help="paced: s per token")
    parser.add_argument("--systems", default=None, help="comma-separated subset (default: all)")
    args = parser.parse_args()
    if shutil.which("wrk") is None or not MOCK.exists():
        print("needs wrk and ../shared/bench/mock_worker.py", file=sys.stderr)
        return 2
    systems = ["lmgw", "lmgw-trio", "lmgw-keepalive", "lmgw-keepalive-trio", "lmgw-resumable"]
    systems += ["lmgw-coalesce", "trio-floor"]
    systems += ["vllm-router"] if VLLM_ROUTER.exists() else []
    if args.systems:
        systems = [s for s in args.systems.split(",") if s in systems]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    floor.LOG_DIR.mkdir(parents=True, exist_ok=True)  # its start_workers logs there
    allowed = sorted(os.sched_getaffinity(0))
    cpus = None
    if len(allowed) >= 2:
        cpus = {allowed[1]}
        os.sched_setaffinity(0, {allowed[0]})
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    children = oh.Children(env)
    lua = LOG_DIR / "wrk_bodies.lua"
    lua.write_text(oh.WRK_LUA)
    resumable_lua = LOG_DIR / "wrk_bodies_resumable.lua"
    resumable_lua.write_text(oh.WRK_LUA.replace(CT, CT[:-1] + ', ["X-Lmgw-Resumable"] = "1"}'))
    bodies = LOG_DIR / "stream_bodies.jsonl"
    greedy_bodies = LOG_DIR / "stream_bodies_greedy.jsonl"  # distinct: eligible, none shared
    with bodies.open("w") as f, greedy_bodies.open("w") as g:
        for i in range(256):
            body = {
                "model": oh.MODEL,
                "messages": [{"role": "user", "content": f"Request {i}: stream a status note."}],
                "max_tokens": TOKENS,
                "ignore_eos": True,
                "stream": True,
            }
            f.write(json.dumps(body) + "\n")
            g.write(json.dumps({**body, "temperature": 0}) + "\n")
    regimes = {"paced": (args.token_delay, 64), "burst": (0.0, 32)}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        for regime, (delay, conns) in regimes.items():
            extra = ["--token-delay", str(delay)] if delay > 0 else []
            workers = floor.start_workers(children, str(MOCK), extra, tag=f"-{regime}")
            ctx = {"workers": workers, "cpus": cpus, "lua": lua, "bodies": bodies}
            ctx["greedy_bodies"] = greedy_bodies
            ctx["resumable_lua"] = resumable_lua
            ctx["duration"] = args.duration
            runs[regime] = {name: [] for name in systems}
            for i in range(args.rounds):
                for name in systems if i % 2 == 0 else systems[::-1]:
                    got = measure(children, ctx, name, conns)
                    runs[regime][name].append(got)
                    log(f"{regime} round {i + 1} {name}: {got['cpu_us_per_event']:.2f} µs/event")
            children.stop_all()
    finally:
        children.stop_all()
    keys = ("events_per_s", "user_us_per_event", "sys_us_per_event", "cpu_us_per_event")
    med = {
        regime: {
            name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in per.items()
        }
        for regime, per in runs.items()
    }
    for regime, (delay, conns) in regimes.items():
        print(f"{regime}: token delay {delay * 1e3:g} ms, c={conns}, {TOKENS} tokens, medians")
        print(f"  {'system':<20} {'events/s':>9} {'user µs':>8} {'sys µs':>7} {'CPU µs/event':>13}")
        for name, m in med[regime].items():
            print(
                f"  {name:<20} {m['events_per_s']:>9,.0f} {m['user_us_per_event']:>8.2f}"
                f" {m['sys_us_per_event']:>7.2f} {m['cpu_us_per_event']:>13.2f}"
            )
        plain = med[regime]["lmgw"]["cpu_us_per_event"]
        for name in ("lmgw-trio", "lmgw-keepalive", "lmgw-keepalive-trio", "lmgw-resumable",
                     "lmgw-coalesce"):  # fmt: skip
            if name in med[regime]:
                ratio = med[regime][name]["cpu_us_per_event"] / plain
                print(f"  {name} / plain lmgw: x{ratio:.2f}")
        if "vllm-router" in med[regime]:
            ratio = med[regime]["lmgw"]["cpu_us_per_event"] / max(
                med[regime]["vllm-router"]["cpu_us_per_event"], 1e-9
            )
            print(f"  lmgw / vllm-router CPU per event: x{ratio:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(
        json.dumps(
            {
                "benchmark": "stream_relay",
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "rounds": args.rounds,
                "duration_s": args.duration,
                "regimes": {k: {"token_delay_s": d, "conns": c} for k, (d, c) in regimes.items()},
                "runs": runs,
                "medians": med,
            },
            indent=2,
        )
    )
    log(f"wrote {OUT_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
