"""lmgw's CPU per proxied request beside the floor of any trio relay, in one run.

Why: issue 2 asks for gateway CPU per small request at c=64 of at most 0.75x vllm-router's.
Whether that is within reach of a Python/trio gateway at all is a measurement, not a belief:
this script runs, against the same two workers and the same wrk load,

* ``relay``: `floor_relay.py`, the smallest relay trio can run (one task and one upstream
  connection per client connection, Content-Length framing, nothing else),
* ``featured``: `floor_featured.py`, the least a trio gateway with issue 2's features can do
  (parse, validate with lmgw's ``decode_view``, request id, round robin, pooled upstream,
  response head, metrics; no error handling),
* ``lmgw``: ``lmgw serve --worker pd=W1 --worker pd=W2`` with its defaults (the compiled lane
  relays these requests: lmgw.http.lane),
* ``lmgw-twin``: the same with the compiled lane's loop in its pure-Python twin
  (``LMGW_RELAY=python``: lmgw._fast.relay_py), for the Cython / Python ratio,
* ``lmgw-trio``: the same with ``server.compiled_lane = false`` (the express lane on trio:
  lmgw.pipeline.express), and
* ``lmgw-general``: the same with ``upstream.express_lane = false`` (the general path),
* ``lmgw-keys`` and ``lmgw-keys-trio``: ``lmgw`` and ``lmgw-trio`` with an API key configured
  and sent on every request (the lane checks keys itself since session 19),
* ``lmgw-ca`` and ``lmgw-ca-trio``: ``lmgw`` and ``lmgw-trio`` with ``routing.policy =
  "cache_aware"`` (text keys; the lane reads its usage audit itself since session 20),
* ``lmgw-alias`` and ``lmgw-alias-trio``: ``lmgw`` and ``lmgw-trio`` with every request
  naming the model by an alias (the lane renames it itself since session 22; on trio it takes
  the general path),
* ``lmgw-probed`` and ``lmgw-probed-trio``: ``lmgw`` and ``lmgw-trio`` with one request in
  ``PROBE_EVERY`` a ``GET /v1/models`` on the same connections (a client that lists the models,
  a probe sharing its pool): the GETs are the trio server's, and since session 23 the
  connection returns to the lane after one,
* ``lmgw-capped`` and ``lmgw-capped-trio``: ``lmgw`` and ``lmgw-trio`` with
  ``limits.max_concurrent_requests = 16`` under the 64 connections: the admission queue holds
  most requests (since session 23 parked in the compiled lane's relay until their grant; on
  trio, waiting in the server's queue),
* ``lmgw-ca-chat`` and ``lmgw-ca-tok-chat``: ``routing.policy = "cache_aware"`` on
  multi-turn chats (``CHAT_BODIES`` requests of routing.py's chat workload: a short shared
  system turn, then each conversation's history and a new ~120-word user turn), keyed by text,
  and by token ids (``models[].tokenizer``: the sim model's; the gateway renders the chat
  template and tokenizes every request, which its segment cache makes cheap for the turns
  seen before),

each a fresh process alone on the second CPU (wrk, the workers and this script on the first),
alternating order over rounds, and reports requests/s, CPU µs per request (all threads,
``/proc/<pid>/task/*/schedstat``) and lmgw's ratios to the others, medians over rounds. With
``--strace`` it also counts system calls per request for each (``strace -c -f`` attached for
one extra run; strace slows the process, so those runs are not timed).

Workers: ``python -m lmgw.simulators --role pd --speed inf`` by default; ``--mock PATH`` uses
the peer harness's faster mock worker (``../shared/bench/mock_worker.py``) instead, as the
peer comparison in benchmarks/README.md does; ``--mock-python`` runs it with another Python
(the peer harness's venv, with uvloop: its workers idle between requests, so every send wakes
a sleeping peer, and every system here costs more per request, as in the harness).

    .venv/bin/python benchmarks/floor.py [--rounds 3] [--duration 4] [--strace] [--mock PATH]
        [--mock-python PATH]

Writes benchmarks/results/floor.json; logs in benchmarks/results/floor-logs/. Needs wrk.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT_JSON = RESULTS / "floor.json"
LOG_DIR = RESULTS / "floor-logs"
CONNS = 64
#: the Python that runs ``--mock`` (``--mock-python``: the peer harness's, with uvloop)
MOCK_PYTHON = [sys.executable]
SYSTEMS = (
    "relay", "featured", "lmgw", "lmgw-twin", "lmgw-trio", "lmgw-general", "lmgw-keys",
    "lmgw-keys-trio", "lmgw-ca", "lmgw-ca-trio", "lmgw-alias", "lmgw-alias-trio",
    "lmgw-probed", "lmgw-probed-trio", "lmgw-capped", "lmgw-capped-trio", "lmgw-ca-chat",
    "lmgw-ca-tok-chat",
)  # fmt: skip
KEY = "sk-floor-0123456789abcdef0123456789abcdef"
_KEYS = f'[[auth.keys]]\nkey = "{KEY}"\n'
KEYED = ("lmgw-keys", "lmgw-keys-trio")
ALIAS = "floor-alias"
PROBED = ("lmgw-probed", "lmgw-probed-trio")
CHATS = ("lmgw-ca-chat", "lmgw-ca-tok-chat")
CHAT_BODIES = 5000
PROBE_EVERY = 50
CAPPED = 16
ALIASED = ("lmgw-alias", "lmgw-alias-trio")
SCRIPTS = {"relay": "floor_relay.py", "featured": "floor_featured.py"}
#: the lmgw systems' configs beyond the defaults
CONFIGS = {
    "lmgw-trio": "[server]\ncompiled_lane = false\n",
    "lmgw-general": "[upstream]\nexpress_lane = false\n",
    "lmgw-keys": _KEYS,
    "lmgw-keys-trio": "[server]\ncompiled_lane = false\n" + _KEYS,
    "lmgw-ca": '[routing]\npolicy = "cache_aware"\n',
    "lmgw-ca-trio": '[server]\ncompiled_lane = false\n[routing]\npolicy = "cache_aware"\n',
}


def _load_overhead() -> Any:
    """benchmarks/overhead.py's process, CPU and wrk helpers (one harness for all)."""
    spec = importlib.util.spec_from_file_location("lmgw_bench_overhead", HERE / "overhead.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.LOG_DIR = LOG_DIR
    return module


oh = _load_overhead()
_ALIASES = f'[[models]]\nname = "{oh.MODEL}"\naliases = ["{ALIAS}"]\n'
CONFIGS["lmgw-alias"] = _ALIASES
CONFIGS["lmgw-alias-trio"] = "[server]\ncompiled_lane = false\n" + _ALIASES
CONFIGS["lmgw-probed-trio"] = "[server]\ncompiled_lane = false\n"
_CAPPED = f"[limits]\nmax_concurrent_requests = {CAPPED}\n"
CONFIGS["lmgw-capped"] = _CAPPED
CONFIGS["lmgw-capped-trio"] = "[server]\ncompiled_lane = false\n" + _CAPPED
CONFIGS["lmgw-ca-chat"] = CONFIGS["lmgw-ca"]


def chat_bodies() -> Path:
    """``CHAT_BODIES`` requests of routing.py's chat workload (its conversations in turn,
    each answered with the same few words), for :data:`CHATS`."""
    spec = importlib.util.spec_from_file_location("lmgw_bench_routing", HERE / "routing.py")
    assert spec is not None and spec.loader is not None
    routing = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = routing  # (its dataclasses look their module up)
    spec.loader.exec_module(routing)
    workload = routing.make_workload("chat", 2, 7)
    rng = random.Random(3)
    path = LOG_DIR / "bodies-chat.jsonl"
    with open(path, "w") as f:
        for _ in range(CHAT_BODIES):
            item = workload.next(rng)
            body = routing.request_body(item) | {"model": oh.MODEL, "max_tokens": 4}
            f.write(json.dumps(body, separators=(",", ":")) + "\n")
            workload.finish(item, "an answer of a few words " * 8)
    return path


def log(*parts: object) -> None:
    print(f"[floor {time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def start_workers(
    children: Any, mock: str | None, mock_args: Sequence[str] = (), tag: str = ""
) -> list[int]:
    """Two workers: simulators, or ``mock`` (the peer harness's mock) with ``mock_args``."""
    ports = []
    for i in range(2):
        if mock is None:
            _, url = oh.start_worker(children, f"worker{i + 1}")
            ports.append(int(url.rsplit(":", 1)[1]))
            continue
        port = oh.free_port()
        argv = [MOCK_PYTHON[0], mock, "--port", str(port), "--model", oh.MODEL, *mock_args]
        children.spawn(argv, log_path=LOG_DIR / f"mock{tag}{i + 1}.log")
        ports.append(port)
    for port in ports:
        wait_answering(port)
    return ports


def wait_answering(port: int, timeout: float = 30.0, keyed: bool = False) -> None:
    deadline = time.monotonic() + timeout
    headers = {"authorization": f"Bearer {KEY}"} if keyed else None
    while time.monotonic() < deadline:
        try:
            if (
                oh.http_once(
                    port,
                    "POST",
                    "/v1/chat/completions",
                    oh.chat_body(0, stream=False),
                    headers=headers,
                ).status
                == 200
            ):
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise oh.BenchError(f"nothing answered 200 on port {port} within {timeout:.0f} s")


def start_system(
    children: Any, name: str, workers: list[int], cpus: set[int] | None
) -> tuple[Any, int]:
    port = oh.free_port()
    if name in SCRIPTS:
        argv = [sys.executable, str(HERE / SCRIPTS[name]), str(port), *map(str, workers)]
    else:
        argv = oh.gateway_argv(port, [f"pd=http://127.0.0.1:{w}" for w in workers])
        if name in CONFIGS:
            config = LOG_DIR / f"{name}.toml"
            config.write_text(CONFIGS[name])
            argv[2:2] = ["--config", str(config)]
    env = {"LMGW_RELAY": "python"} if name == "lmgw-twin" else None
    proc = children.spawn(argv, log_path=LOG_DIR / f"{name}.log", cpus=cpus, extra_env=env)
    wait_answering(port, keyed=name in KEYED)
    return proc, port


def measure(children: Any, ctx: dict[str, Any], name: str) -> dict[str, Any]:
    proc, port = start_system(children, name, ctx["workers"], ctx["cpus"])
    try:
        bodies = ctx["bodies"]
        if name in ALIASED:
            bodies = ctx["bodies_alias"]
        elif name in PROBED:
            bodies = ctx["bodies_probed"]
        elif name in CHATS:
            bodies = ctx["bodies_chat"]
        return wrk_cpu(children, ctx, name, proc, port, bodies)
    finally:
        children.stop(proc)


def wrk_cpu(
    children: Any, ctx: dict[str, Any], name: str, proc: Any, port: int, bodies: Path
) -> dict[str, Any]:
    """wrk at ``CONNS`` connections against ``port`` (a warm-up second, then
    ``ctx["duration"]``): requests/s and the process's CPU µs per request."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    lua = ctx["lua_keys"] if name in KEYED else ctx["lua"]
    if name in PROBED:
        lua = ctx["lua_probed"]
    oh.run_wrk(children, url, bodies, CONNS, 1, lua)  # warm-up
    tree = oh.proc_tree(proc.pid)
    c0 = oh.cpu_s(tree)
    r = oh.run_wrk(children, url, bodies, CONNS, ctx["duration"], lua)
    cpu = oh.cpu_s(tree) - c0
    if r["errors"] or r["non_2xx"]:
        raise oh.BenchError(f"{name}: {r['errors']} socket errors, {r['non_2xx']} non-2xx")
    return {"rps": r["rps"], "cpu_us_per_req": cpu / max(r["requests"], 1) * 1e6}


def harness() -> tuple[set[int] | None, Any, Path]:
    """The measured process's CPU (the second one, when there are two: this process, the
    workers and wrk keep the first), the children's keeper, and wrk's body script."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    allowed = sorted(os.sched_getaffinity(0))
    cpus = None
    if len(allowed) >= 2:
        cpus = {allowed[1]}
        os.sched_setaffinity(0, {allowed[0]})  # inherited by the workers and wrk
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    children = oh.Children(env)
    lua = LOG_DIR / "wrk_bodies.lua"
    lua.write_text(oh.WRK_LUA)
    plain = '{["Content-Type"] = "application/json"}'
    assert plain in oh.WRK_LUA
    keyed = f'{{["Content-Type"] = "application/json", ["Authorization"] = "Bearer {KEY}"}}'
    (LOG_DIR / "wrk_bodies_keys.lua").write_text(oh.WRK_LUA.replace(plain, keyed))
    post = f'bodies[count] = wrk.format("POST", nil, {plain}, line)'
    assert post in oh.WRK_LUA
    probed = (  # a line "GET <path>": that GET instead of a POST
        'if line:sub(1, 4) == "GET " then bodies[count] = wrk.format("GET", line:sub(5))'
        f" else {post} end"
    )
    (LOG_DIR / "wrk_bodies_probed.lua").write_text(oh.WRK_LUA.replace(post, probed))
    return cpus, children, lua


def syscalls(children: Any, ctx: dict[str, Any], name: str) -> dict[str, float]:
    """System calls per request while wrk runs, from ``strace -c -f`` attached to the process."""
    proc, port = start_system(children, name, ctx["workers"], ctx["cpus"])
    out = LOG_DIR / f"strace-{name}.txt"
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        oh.run_wrk(children, url, ctx["bodies"], CONNS, 1, ctx["lua"])
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-p", str(proc.pid), "-o", str(out)],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        r = oh.run_wrk(children, url, ctx["bodies"], CONNS, 2, ctx["lua"])
        tracer.send_signal(2)
        tracer.wait(30)
    finally:
        children.stop(proc)
    counts: dict[str, int] = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            counts[parts[-1]] = int(parts[3])
    # wrk's count covers a little less than strace's window: per request via the client sends
    # (one sendto per answered request in both systems)
    n = max(counts.get("sendto", 0) / 2, 1) if name not in SCRIPTS else max(r["requests"], 1)
    return {k: round(v / n, 2) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def paired(runs: dict[str, list[dict[str, Any]]], a: str, b: str) -> list[float]:
    """CPU per request of ``a`` over ``b``, round by round (the same minutes of the box);
    empty unless both ran."""
    if a not in runs or b not in runs:
        return []
    return [
        x["cpu_us_per_req"] / y["cpu_us_per_req"] for x, y in zip(runs[a], runs[b], strict=True)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    parser.add_argument("--strace", action="store_true", help="also count syscalls per request")
    parser.add_argument("--systems", help=f"a comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--mock", help="the peer harness's mock_worker.py as the workers")
    parser.add_argument(
        "--mock-python",
        help="the Python that runs --mock (the peer harness's venv: uvloop workers, as there)",
    )
    args = parser.parse_args()
    if args.mock_python:
        MOCK_PYTHON[0] = args.mock_python
    rounds, duration = (1, 2) if args.quick else (args.rounds, args.duration)
    if shutil.which("wrk") is None:
        print("benchmarks/floor.py needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2
    if args.strace and shutil.which("strace") is None:
        print("--strace needs strace: apt-get install -y strace", file=sys.stderr)
        return 2
    cpus, children, lua = harness()
    bodies = LOG_DIR / "bodies.jsonl"
    oh.write_bodies(bodies, stream=False)
    aliased = LOG_DIR / "bodies-alias.jsonl"
    aliased.write_text(bodies.read_text().replace(f'"{oh.MODEL}"', f'"{ALIAS}"'))
    probed = LOG_DIR / "bodies-probed.jsonl"
    lines = bodies.read_text().splitlines()
    probed.write_text(
        "".join(
            ("GET /v1/models" if i % PROBE_EVERY == PROBE_EVERY - 1 else line) + "\n"
            for i, line in enumerate(lines * PROBE_EVERY)  # (a whole number of cycles)
        )
    )
    systems = [s for s in args.systems.split(",") if s] if args.systems else list(SYSTEMS)
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        print(f"unknown systems: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    counted: dict[str, dict[str, float]] = {}
    try:
        ctx = {"workers": start_workers(children, args.mock), "cpus": cpus, "lua": lua}
        ctx["lua_keys"] = LOG_DIR / "wrk_bodies_keys.lua"
        ctx |= {"bodies": bodies, "bodies_alias": aliased, "duration": duration}
        ctx |= {"bodies_probed": probed, "lua_probed": LOG_DIR / "wrk_bodies_probed.lua"}
        if set(systems) & set(CHATS):
            ctx["bodies_chat"] = chat_bodies()
            from lmgw.simulators import model_files

            CONFIGS["lmgw-ca-tok-chat"] = CONFIGS["lmgw-ca"] + (
                f'[[models]]\nname = "{oh.MODEL}"\ntokenizer = "{model_files.default_model_dir()}"'
                "\nmax_model_len = 32768\n"
            )
        for i in range(rounds):
            order = systems if i % 2 == 0 else systems[::-1]
            for name in order:
                runs[name].append(measure(children, ctx, name))
                log(f"round {i + 1}/{rounds} {name}: {runs[name][-1]['cpu_us_per_req']:.1f} µs/req")
        if args.strace:
            counted = {name: syscalls(children, ctx, name) for name in systems}
    finally:
        children.stop_all()
    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("rps", "cpu_us_per_req")}
        for name, rs in runs.items()
    }
    ratios = paired(runs, "lmgw", "relay")
    express = paired(runs, "lmgw-trio", "lmgw-general")
    lane = paired(runs, "lmgw", "lmgw-trio")
    twin = paired(runs, "lmgw", "lmgw-twin")
    featured = paired(runs, "lmgw", "featured")
    keyed = paired(runs, "lmgw-keys", "lmgw-keys-trio")
    cache_aware = paired(runs, "lmgw-ca", "lmgw-ca-trio")
    alias = paired(runs, "lmgw-alias", "lmgw-alias-trio")
    alias_cost = paired(runs, "lmgw-alias", "lmgw")
    probed_pairs = paired(runs, "lmgw-probed", "lmgw-probed-trio")
    tok_pairs = paired(runs, "lmgw-ca-tok-chat", "lmgw-ca-chat")
    capped_pairs = paired(runs, "lmgw-capped", "lmgw-capped-trio")
    print(f"c={CONNS}, small non-streamed chat, {rounds} round(s) of {duration} s, medians")
    print(f"{'system':<14} {'req/s':>9} {'CPU µs/req':>11}")
    for name in systems:
        print(f"{name:<14} {med[name]['rps']:>9,.0f} {med[name]['cpu_us_per_req']:>11.1f}")
    for label, pairs in (
        ("lmgw / relay CPU per request", ratios),
        ("lmgw / featured CPU per request", featured),
        ("lmgw / lmgw-trio (compiled lane / express lane on trio)", lane),
        ("lmgw-trio / lmgw-general (express lane / general path)", express),
        ("lmgw / lmgw-twin (the lane's loop in Cython / its Python twin)", twin),
        ("lmgw-keys / lmgw-keys-trio (with an API key: lane / trio)", keyed),
        ("lmgw-ca / lmgw-ca-trio (cache_aware: lane / trio)", cache_aware),
        ("lmgw-alias / lmgw-alias-trio (a model alias: lane / trio)", alias),
        ("lmgw-alias / lmgw (a model alias in the lane / the model's name)", alias_cost),
        (f"lmgw-probed / lmgw-probed-trio (a GET in {PROBE_EVERY}: lane / trio)", probed_pairs),
        (f"lmgw-capped / lmgw-capped-trio ({CAPPED} at once: lane / trio)", capped_pairs),
        ("lmgw-ca-tok-chat / lmgw-ca-chat (multi-turn, cache_aware: tokens / text)", tok_pairs),
    ):
        if pairs:
            print(f"{label}: x{statistics.median(pairs):.2f} (paired per round)")
    for name, calls in counted.items():
        shown = ", ".join(f"{k} {v:g}" for k, v in list(calls.items())[:6])
        print(f"syscalls per request, {name}: {shown}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(
        json.dumps(
            {
                "benchmark": "floor",
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "workers": args.mock or "lmgw.simulators --speed inf",
                "rounds": rounds,
                "duration_s": duration,
                "cpu_method": oh.CPU_METHOD,
                "runs": runs,
                "medians": med,
                "lmgw_to_relay_paired": ratios,
                "express_to_general_paired": express,
                "lane_to_trio_paired": lane,
                "cython_to_twin_paired": twin,
                "lmgw_to_featured_paired": featured,
                "keys_lane_to_trio_paired": keyed,
                "cache_aware_lane_to_trio_paired": cache_aware,
                "alias_lane_to_trio_paired": alias,
                "alias_to_name_paired": alias_cost,
                "mock_python": MOCK_PYTHON[0],
                "syscalls_per_request": counted,
            },
            indent=2,
        )
    )
    log(f"wrote {OUT_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
