"""The ceiling of `lmgw bench`'s generator on one core, side by side with other generators.

The target is a canned server (this script, ``--canned-server``, in its own process): it answers
every ``POST /v1/chat/completions`` at once with a prebuilt SSE stream of ``max_tokens`` token
events (one write: the role event, the tokens, a finish event, a usage event, ``[DONE]``), so the
target costs as little as a server can and the generator's own cost is what is left. With two or
more CPUs the server runs on the second one and the generator under test on the first.

Per scenario (closed loop, 64 connections; 16-token and 256-token answers), one round runs:

* ``lmgw bench``: :func:`lmgw.bench.run_bench` in this process (the code the CLI runs);
* ``openai``: the openai client (``AsyncOpenAI``, asyncio + httpx) streaming the same requests,
  64 tasks, counting events and reading ``usage``: what a load script in Python usually is;
* ``wrk`` (if installed): the same POST without SSE parsing (raw HTTP, in C): the bound.

Figures: completed requests/s and output tokens/s (medians over rounds), the generator's CPU (a
share of one core) and the server's, so a server-bound row can be told apart (``SERVER-BOUND``
when the server used more than 90% of its core). The ratios printed are lmgw bench / openai and
lmgw bench / wrk, per scenario.

    .venv/bin/python benchmarks/loadgen.py [--quick] [--rounds N] [--duration S]

Writes benchmarks/results/loadgen.json. Compare only figures of one run (a shared box moves).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import trio

RESULTS = Path(__file__).parent / "results" / "loadgen.json"
CONNECTIONS = 64
SCENARIOS = {"16 tokens": 16, "256 tokens": 256}
MODEL = "canned"


# -- the canned server (child process) ---------------------------------------------------------


def _canned_stream(tokens: int) -> bytes:
    head = b'data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"canned"'
    events = [head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n']
    for i in range(tokens):
        events.append(
            head
            + b',"choices":[{"index":0,"delta":{"content":" w%d"},"finish_reason":null}]}\n\n'
            % (i % 100)
        )
    events.append(
        head + b',"choices":[{"index":0,"delta":{"content":""},"finish_reason":"length"}]}\n\n'
    )
    events.append(
        head + b',"choices":[],"usage":{"prompt_tokens":16,"completion_tokens":%d,'
        b'"total_tokens":%d}}\n\n' % (tokens, tokens + 16)
    )
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


class _Body(msgspec.Struct):
    max_tokens: int = 16


def canned_server() -> None:
    from lmgw.http.server import serve_http

    cache: dict[int, bytes] = {}
    decode = msgspec.json.Decoder(_Body).decode
    sse = [(b"content-type", b"text/event-stream")]

    async def handler(request: Any, responder: Any) -> None:
        try:
            n = decode(request.body).max_tokens
        except msgspec.DecodeError:
            n = 16
        body = cache.get(n)
        if body is None:
            body = cache[n] = _canned_stream(n)
        await responder.send_full(200, sse, body)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, handler, "127.0.0.1", 0)
            print(f"READY {port}", flush=True)

    trio.run(main)


# -- processes and CPU ---------------------------------------------------------------------------


def cpu_of(pid: int) -> float:
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, cpu: int | None) -> None:
        self.cpu = cpu

    def __enter__(self) -> Server:
        def pin() -> None:
            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})

        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--canned-server"],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=pin,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.__exit__()
            raise RuntimeError(f"the canned server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{line.split()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def busy_s() -> float:
    """CPU time the whole machine spent busy (all CPUs), seconds."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measured(server: Server, fn: Any) -> dict[str, Any]:
    """Run ``fn()`` (returns requests, tokens, wall, generator CPU); add the server's CPU, the
    rates, the generator's CPU per request, its one-core ceiling (requests and tokens per CPU
    second) and the noise (cores used by processes outside the benchmark)."""
    s0, b0 = cpu_of(server.proc.pid), busy_s()
    out = fn()
    server_s, busy = cpu_of(server.proc.pid) - s0, busy_s() - b0
    wall, cpu = out["wall_s"], out["gen_cpu_s"]
    out["server_cpu"] = server_s / wall
    out["rps"] = out["requests"] / wall
    out["tps"] = out["tokens"] / wall
    out["gen_cpu"] = cpu / wall
    out["cpu_us_per_req"] = cpu / out["requests"] * 1e6
    out["ceiling_rps"] = out["requests"] / cpu
    out["ceiling_tps"] = out["tokens"] / cpu
    out["noise_cores"] = max(0.0, (busy - server_s - cpu) / wall)
    return out


# -- the generators ------------------------------------------------------------------------------


def run_lmgw(url: str, tokens: int, duration: float) -> dict[str, Any]:
    from lmgw.bench import BenchOptions, run_bench

    options = BenchOptions(
        url=url,
        model=MODEL,
        concurrency=CONNECTIONS,
        duration=duration,
        input_len=16,
        output_len=tokens,
        include_requests=False,
    )
    report = trio.run(run_bench, options)
    s = report["summary"]
    assert s["requests"]["errors"] == 0, s["errors_by_type"]
    assert s["tokens"]["completion"] == s["requests"]["ok"] * tokens
    return {
        "requests": s["requests"]["ok"],
        "tokens": s["tokens"]["completion"],
        "wall_s": s["duration_s"],
        "gen_cpu_s": report["generator"]["cpu_s"],
    }


def run_openai(url: str, tokens: int, duration: float) -> dict[str, Any]:
    import openai

    async def main() -> dict[str, Any]:
        # the client's own pool (up to 100 keep-alive connections: enough for 64 tasks)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "w " * 16}]
        done = [0, 0]
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                stream = await client.chat.completions.create(
                    model=MODEL,
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                events = 0
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        events += 1
                    if chunk.usage is not None:
                        done[1] += chunk.usage.completion_tokens
                assert events == tokens
                done[0] += 1

        c0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        await client.close()
        return {"requests": done[0], "tokens": done[1], "wall_s": wall, "gen_cpu_s": cpu}

    return asyncio.run(main())


_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '%s'
"""


def run_wrk(url: str, tokens: int, duration: float, cpu: int | None) -> dict[str, Any]:
    message = {"role": "user", "content": "w " * 16}
    body = json.dumps({"model": MODEL, "messages": [message], "max_tokens": tokens, "stream": True})
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_LUA % body)
    secs = max(1, round(duration))
    argv = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{secs}s", "-s", f.name]
    argv.append(url + "/v1/chat/completions")

    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    before = os.times()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 30, preexec_fn=pin)
    after = os.times()
    os.unlink(f.name)
    m = re.search(r"(\d+) requests in ([\d.]+)s", proc.stdout)
    if not m:
        raise RuntimeError(f"wrk printed no summary: {proc.stdout} {proc.stderr}")
    n, wall = int(m.group(1)), float(m.group(2))
    cpu_s = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return {"requests": n, "tokens": n * tokens, "wall_s": wall, "gen_cpu_s": cpu_s}


# -- main ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--canned-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="1 round of 1.5 s runs")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (3; --quick: 1)")
    ap.add_argument("--duration", type=float, default=None, help="s per run (3; --quick: 1.5)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.canned_server:
        canned_server()
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration or (1.5 if args.quick else 3.0)
    cpus = sorted(os.sched_getaffinity(0))
    gen_cpu, server_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    if gen_cpu is not None:
        os.sched_setaffinity(0, {gen_cpu})
    have_wrk = shutil.which("wrk") is not None
    tools = ["lmgw bench", "openai", *(["wrk"] if have_wrk else [])]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {t: [] for t in tools} for s in SCENARIOS
    }
    t_start = time.perf_counter()
    with Server(server_cpu) as server:
        run_lmgw(server.url, 16, 0.3)  # warm-up (imports, first connections)
        for r in range(rounds):
            for scenario, tokens in SCENARIOS.items():
                order = tools if r % 2 == 0 else list(reversed(tools))
                for tool in order:
                    if tool == "lmgw bench":
                        fn = partial(run_lmgw, server.url, tokens, duration)
                    elif tool == "openai":
                        fn = partial(run_openai, server.url, tokens, duration)
                    else:
                        fn = partial(run_wrk, server.url, tokens, duration, gen_cpu)
                    runs[scenario][tool].append(measured(server, fn))
    summary: dict[str, Any] = {}
    print(
        f"\nlmgw bench generator ceiling: closed loop, {CONNECTIONS} connections, canned SSE"
        f" server; medians of {rounds} round(s) of {duration:g} s"
        + (
            f"; generator on CPU {gen_cpu}, server on CPU {server_cpu}"
            if gen_cpu is not None
            else ""
        )
    )
    header = f"{'scenario':<11} {'generator':<11} {'req/s':>8} {'tokens/s':>10} {'gen CPU':>8}"
    header += (
        f" {'CPU/req':>9} {'1-core req/s':>13} {'1-core tok/s':>13} {'server':>7} {'noise':>6}"
    )
    print(header)
    print("-" * len(header))
    keys = ("rps", "tps", "gen_cpu", "cpu_us_per_req", "ceiling_rps", "ceiling_tps")
    keys += ("server_cpu", "noise_cores")
    for scenario in SCENARIOS:
        summary[scenario] = {}
        for tool in tools:
            rs = runs[scenario][tool]
            med = {k: statistics.median(x[k] for x in rs) for k in keys}
            summary[scenario][tool] = med
            flag = "  SERVER-BOUND" if med["server_cpu"] > 0.9 else ""
            flag += "  NOISY" if med["noise_cores"] > 0.15 else ""
            print(
                f"{scenario:<11} {tool:<11} {med['rps']:>8,.0f} {med['tps']:>10,.0f}"
                f" {med['gen_cpu']:>7.0%} {med['cpu_us_per_req']:>7,.0f}us"
                f" {med['ceiling_rps']:>13,.0f} {med['ceiling_tps']:>13,.0f}"
                f" {med['server_cpu']:>6.0%} {med['noise_cores']:>6.2f}{flag}"
            )
        ours = summary[scenario]["lmgw bench"]
        ratios: dict[str, float] = {}
        for t in tools[1:]:
            theirs = summary[scenario][t]
            ratios[f"lmgw bench / {t}, req/s"] = ours["rps"] / theirs["rps"]
            ratios[f"lmgw bench / {t}, 1-core req/s"] = ours["ceiling_rps"] / theirs["ceiling_rps"]
        summary[scenario]["ratios"] = ratios
        print("   " + ", ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()))
    print(f"\n({time.perf_counter() - t_start:.0f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "meta": {
                    "rounds": rounds,
                    "duration_s": duration,
                    "connections": CONNECTIONS,
                    "generator_cpu": gen_cpu,
                    "server_cpu": server_cpu,
                    "python": platform.python_version(),
                    "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                },
                "summary": summary,
                "runs": runs,
            },
            indent=1,
        )
    )
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
