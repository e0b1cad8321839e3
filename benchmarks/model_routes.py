"""What a model route, a mirror and KV accounting cost the gateway per request, in one run.

Why: a request for a model route is renamed to its target (the body decoded and encoded once,
where a plain request's bytes pass untouched); a mirror sends a copy of a share of them to a
second model; KV accounting puts a meter on every answer. Each is paid on the hot path, so
each is measured beside the plain request, against the same workers and the same wrk load
(floor.py's harness: the gateway alone on the second CPU, wrk and the workers on the first,
alternating order over rounds, CPU from ``/proc/<pid>/task/*/schedstat``):

* ``plain``: ``lmgw serve`` in front of two simulated workers, clients naming the model;
* ``route``: clients name ``chat``, a route with the model as its one target;
* ``route+mirror10%``: the same route with ``mirror`` = the model, ``mirror_share`` 0.1 (a
  tenth of the requests also go to the workers once more, answers dropped);
* ``kv_accounting``: ``plain`` with ``limits.kv_accounting``.

c=64 small non-streamed chat, the medians over rounds of requests/s and gateway CPU µs per
client request, and each system's ratio to ``plain`` (paired per round).

    .venv/bin/python benchmarks/model_routes.py [--rounds 3] [--duration 4] [--quick]

Writes benchmarks/results/model_routes.json; logs in benchmarks/results/model_routes-logs/.
Needs wrk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import floor
from fleet_runs import RESULTS, result

oh = floor.oh
LOG_DIR = RESULTS / "model_routes-logs"
oh.LOG_DIR = floor.LOG_DIR = LOG_DIR
CONNS = 64
ROUTE = "chat"

#: system -> (TOML config, the model the clients name)
SYSTEMS: dict[str, tuple[str, str]] = {
    "plain": ("", oh.MODEL),
    "route": (
        f'[[model_routes]]\nmodel = "{ROUTE}"\ntargets = [{{model = "{oh.MODEL}"}}]\n',
        ROUTE,
    ),
    "route+mirror10%": (
        f'[[model_routes]]\nmodel = "{ROUTE}"\ntargets = [{{model = "{oh.MODEL}"}}]\n'
        f'mirror = "{oh.MODEL}"\nmirror_share = 0.1\n',
        ROUTE,
    ),
    "kv_accounting": ("[limits]\nkv_accounting = true\n", oh.MODEL),
}


def log(*parts: object) -> None:
    print(f"[model_routes {time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def bodies_for(model: str) -> Path:
    """The wrk bodies (overhead.py's small chats), naming ``model``."""
    path = LOG_DIR / f"bodies-{model}.jsonl"
    with open(path, "w") as f:
        for i in range(64):
            body = oh.chat_body(i, stream=False)
            body["model"] = model
            f.write(json.dumps(body, separators=(",", ":")) + "\n")
    return path


def measure(children: Any, ctx: dict[str, Any], name: str) -> dict[str, Any]:
    toml, model = SYSTEMS[name]
    port = oh.free_port()
    argv = oh.gateway_argv(port, [f"pd=http://127.0.0.1:{w}" for w in ctx["workers"]])
    if toml:
        cfg = LOG_DIR / f"{name}.toml"
        cfg.write_text(toml)
        argv += ["--config", str(cfg)]
    proc = children.spawn(argv, log_path=LOG_DIR / f"{name}.log", cpus=ctx["cpus"])
    try:
        floor.wait_answering(port)
        return floor.wrk_cpu(children, ctx, name, proc, port, ctx["bodies"][model])
    finally:
        children.stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    args = parser.parse_args()
    rounds, duration = (1, 2) if args.quick else (args.rounds, args.duration)
    if shutil.which("wrk") is None:
        print("benchmarks/model_routes.py needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2
    cpus, children, lua = floor.harness()
    bodies = {model: bodies_for(model) for model in {m for _, m in SYSTEMS.values()}}
    names = list(SYSTEMS)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    try:
        ctx = {"workers": floor.start_workers(children, None), "cpus": cpus, "lua": lua}
        ctx |= {"bodies": bodies, "duration": duration}
        for i in range(rounds):
            for name in names if i % 2 == 0 else names[::-1]:
                runs[name].append(measure(children, ctx, name))
                log(f"round {i + 1}/{rounds} {name}: {runs[name][-1]['cpu_us_per_req']:.1f} µs/req")
    finally:
        children.stop_all()
    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("rps", "cpu_us_per_req")}
        for name, rs in runs.items()
    }
    ratio = {
        name: statistics.median(
            a["cpu_us_per_req"] / b["cpu_us_per_req"]
            for a, b in zip(runs[name], runs["plain"], strict=True)
        )
        for name in names
    }
    lines = [
        f"c={CONNS}, small non-streamed chat, {rounds} round(s) of {duration} s, medians",
        f"{'system':<16} {'req/s':>9} {'CPU µs/req':>11} {'vs plain':>9}",
    ]
    for name in names:
        m = med[name]
        lines.append(
            f"{name:<16} {m['rps']:>9,.0f} {m['cpu_us_per_req']:>11.1f} {ratio[name]:>8.2f}x"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = result("model_routes", args, rounds=rounds, duration_s=duration,
                 cpu_method=oh.CPU_METHOD, runs=runs, medians=med, ratio_to_plain=ratio,
                 table=table)  # fmt: skip
    path = RESULTS / "model_routes.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
