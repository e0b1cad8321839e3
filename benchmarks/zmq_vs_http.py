"""Native (ZeroMQ) vs HTTP workers behind the same gateway: gateway CPU and latency per request.

The question (issue 4): does the native protocol cost the gateway less per request than HTTP?
Target: gateway CPU per request over ZeroMQ <= 0.7x the HTTP path. One run, one process tree on
127.0.0.1, every figure compared only with figures of the same run:

* workers, started once: an HTTP simulator (``python -m lmgw.simulators --role pd --speed inf``)
  and a native worker (``python -m lmgw.worker --engine sim --role pd --speed inf``). Both run
  the simulator's engine core with no simulated delays, so what is left is transport and
  gateway cost;
* gateways, ``lmgw serve --config`` started fresh for each path in each round (the order
  rotates every round):

  ``zmq``         the native worker (``zmq+tcp://``). A native model needs ``models[].tokenizer``
                  (native workers take token ids), so the gateway renders and tokenizes;
  ``http``        the HTTP worker, with the same ``models[].tokenizer``: the gateway does the
                  same render + tokenize (its context check), so zmq/http compares transports;
  ``http-relay``  the HTTP worker without a tokenizer: the default HTTP deployment, which only
                  relays bytes (the honest floor for HTTP, doing less work than ``zmq``);

* scenarios (wrk, one thread, ``--duration`` s each): non-streamed chat, 16 tokens
  (``ignore_eos``), at c=1 and c=64; streamed chat, 64 tokens, at c=16 (CPU per SSE event).
* figures: wrk req/s and latency p50/p99; gateway CPU per request (all threads of the gateway
  process, ``/proc/<pid>/task/*/schedstat``, over the wrk run, divided by completed requests),
  and the part of it spent in ZeroMQ's I/O thread (``ZMQbg/IO/*``; the transport-alone rows
  split it the same way);
  the worker's CPU per request; medians over rounds. The gateway runs alone on the second CPU
  (``--layout pinned``, the default with 2+ CPUs); wrk, the workers and this script on the first.
* transport alone (``--transport``, on by default): the gateway's two clients without the rest
  of the gateway, in a client process pinned like the gateway: an ``RpcChannel`` calling
  ``Generate(16 tokens, stream=False)`` (answer: one Delta and a Finish) on the native worker,
  and the pooled HTTP client (``transport/pool.py``) posting the same request as
  ``/v1/completions`` with prompt token ids to the HTTP worker and decoding the JSON answer;
  c=1 and c=64 tasks; CPU of the client process (all threads, ZeroMQ's I/O thread included)
  per call, and call latency. This separates what the protocol costs from what the native
  pipeline does around it.
* the floor (with the transport rows, c=1): ``raw-zmq`` and ``raw-tcp``, blocking round trips
  of 256 bytes, one at a time with no event loop, from a pyzmq DEALER (ZeroMQ's I/O thread
  included) and from a plain TCP socket to an echo server of each kind. What libzmq costs per
  round trip before any trio integration or gateway code: the ratio of the two is the least
  ``zmq/http`` can be for a request's one round trip at c=1. ``trio-zmq``: the same from trio
  with the least integration (send; receive, or ``wait_readable(ZMQ_FD)``), the floor under
  ``RpcChannel``.
* tensors: ``benchmarks/tensors.py`` (ZmqSocket over loopback TCP and shared memory vs
  memcpy) is run too (``--quick`` unless ``--tensors-full``; ``--no-tensors`` skips it) and its
  medians are included.

    .venv/bin/python benchmarks/zmq_vs_http.py [--quick] [--rounds 3] [--duration 4] [--no-tensors]

Prints a table and writes benchmarks/results/zmq_vs_http.json; child logs go to
benchmarks/results/zmq_vs_http-logs/. Needs ``wrk``, and the sim-model folder (built on first
use). The issue asked for ``benchmarks/zmq.py``: a top-level ``zmq.py`` in benchmarks/ shadows
pyzmq for every script there (``tensors.py`` failed) and makes ruff, whose ``src`` includes
benchmarks/, treat ``zmq`` as first-party in the whole repository.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
OUT_JSON = RESULTS / "zmq_vs_http.json"
LOG_DIR = RESULTS / "zmq_vs_http-logs"
TARGET_RATIO = 0.7
STREAM_TOKENS = 64
PATHS = ("zmq", "http", "http-relay")
SCENARIOS: dict[str, tuple[str, int]] = {  # name: (body pool, connections)
    "chat16_c1": ("small", 1),
    "chat16_c64": ("small", 64),
    "sse64_c16": ("stream", 16),
}


def _load_overhead() -> Any:
    """benchmarks/overhead.py's process, CPU and wrk helpers (one harness for both)."""
    spec = importlib.util.spec_from_file_location("lmgw_bench_overhead", HERE / "overhead.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.LOG_DIR = LOG_DIR  # its wrk runs log here
    return module


oh = _load_overhead()
MODEL = oh.MODEL


def log(*parts: object) -> None:
    print(f"[zmq_vs_http {time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


BODIES = 50_000
"""Distinct bodies wrk cycles through: a shared system turn and a user turn new to the gateway
(more than a run sends), as real traffic has. With the 64 of sessions before 23, the tokenizer's
segment cache, which now keeps short stretches too, would have held every prompt: ``zmq`` and
``http`` would have paid no tokenizing at all."""


def write_bodies(path: Path, *, stream: bool, n: int = BODIES) -> None:
    with open(path, "w") as f:
        for i in range(n):
            body = oh.chat_body(i, stream=stream)
            if stream:
                body["max_tokens"] = STREAM_TOKENS
            f.write(json.dumps(body, separators=(",", ":")) + "\n")


# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------


def wait_ready_line(proc: Any, stdout: Path, name: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = stdout.read_text() if stdout.exists() else ""
        for line in text.splitlines():
            if line.startswith("READY "):
                return line
        if proc.poll() is not None:
            raise oh.BenchError(f"{name} exited with {proc.returncode}; see {LOG_DIR}/{name}.log")
        time.sleep(0.05)
    raise oh.BenchError(f"{name} printed no READY line in {timeout:.0f} s")


def start_workers(children: Any) -> dict[str, Any]:
    http_out, zmq_out = LOG_DIR / "http-worker.stdout", LOG_DIR / "zmq-worker.stdout"
    http_argv = [sys.executable, "-m", "lmgw.simulators", "--role", "pd", "--port", "0"]
    http_argv += ["--model", MODEL, "--speed", "inf", "--log-level", "WARNING"]
    zmq_argv = [sys.executable, "-m", "lmgw.worker", "--engine", "sim", "--role", "pd"]
    zmq_argv += ["--bind", "tcp://127.0.0.1:0", "--model", MODEL, "--speed", "inf"]
    zmq_argv += ["--max-inflight", "1024", "--log-level", "WARNING"]
    http = children.spawn(http_argv, log_path=LOG_DIR / "http-worker.log", stdout=http_out)
    native = children.spawn(zmq_argv, log_path=LOG_DIR / "zmq-worker.log", stdout=zmq_out)
    http_url = wait_ready_line(http, http_out, "http-worker").split()[1]
    zmq_line = wait_ready_line(native, zmq_out, "zmq-worker")
    return {
        "http": {"proc": http, "url": http_url},
        "zmq": {"proc": native, "url": "zmq+" + zmq_line.split()[1]},
    }


def gateway_config(path: str, port: int, workers: dict[str, Any], tokenizer: str) -> str:
    url = workers["zmq" if path == "zmq" else "http"]["url"]
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        "[logging]",
        'level = "warning"',
        "[[models]]",
        f'name = "{MODEL}"',
    ]
    if path != "http-relay":
        lines.append(f'tokenizer = "{tokenizer}"')
    lines += ["[[workers]]", f'url = "{url}"', 'role = "pd"', ""]
    return "\n".join(lines)


def start_gateway(children: Any, ctx: dict[str, Any], path: str) -> tuple[Any, int]:
    port = oh.free_port()
    config = LOG_DIR / f"gateway-{path}.toml"
    config.write_text(gateway_config(path, port, ctx["workers"], ctx["tokenizer"]))
    argv = [*oh.gateway_argv(port, [])[:2], "--config", str(config)]
    proc = children.spawn(argv, log_path=LOG_DIR / f"gateway-{path}.log", cpus=ctx["gw_cpus"])
    oh.wait_first_proxied(proc, port, time.perf_counter())
    return proc, port


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------


def io_thread_s(pids: Sequence[int]) -> float:
    """CPU time of ZeroMQ's I/O threads (``ZMQbg/IO/*``) in these processes, seconds."""
    return oh.cpu_s(pids, thread_prefix="ZMQbg/IO")


def measured(children: Any, ctx: dict[str, Any], gw: Any, port: int, scenario: str) -> dict:
    pool, conns = SCENARIOS[scenario]
    tree = oh.proc_tree(gw.pid)
    worker_pids = [w["proc"].pid for w in ctx["workers"].values()]
    io0 = io_thread_s(tree)
    g0, w0, m0, me0 = (
        oh.cpu_s(tree),
        oh.cpu_s(worker_pids),
        oh.machine_busy_s(),
        oh.cpu_s([os.getpid()]),
    )
    t0 = time.perf_counter()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    r = oh.run_wrk(children, url, ctx["bodies"][pool], conns, ctx["duration"], ctx["lua"])
    wall = time.perf_counter() - t0
    g1, w1, m1, me1 = (
        oh.cpu_s(tree),
        oh.cpu_s(worker_pids),
        oh.machine_busy_s(),
        oh.cpu_s([os.getpid()]),
    )
    io1 = io_thread_s(tree)
    n = max(r["requests"], 1)
    r["gw_cpu_us_per_req"] = (g1 - g0) / n * 1e6
    r["gw_io_thread_us_per_req"] = (io1 - io0) / n * 1e6
    r["worker_cpu_us_per_req"] = (w1 - w0) / n * 1e6
    ours = (g1 - g0) + (w1 - w0) + r["wrk_cpu_s"] + (me1 - me0)
    r["other_cores"] = max(0.0, (m1 - m0) - ours) / wall
    if pool == "stream":
        r["gw_cpu_us_per_event"] = r["gw_cpu_us_per_req"] / (STREAM_TOKENS + 3)
    return r


def answer_of(port: int, body: dict[str, Any]) -> str:
    resp = oh.http_once(port, "POST", "/v1/chat/completions", body, timeout=10.0)
    if resp.status != 200:
        raise oh.BenchError(f"status {resp.status}: {bytes(resp.body)[:300]!r}")
    return json.loads(bytes(resp.body))["choices"][0]["message"]["content"]


def run_round(children: Any, ctx: dict[str, Any], order: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    probe = oh.chat_body(7, stream=False)
    for path in order:
        gw, port = start_gateway(children, ctx, path)
        try:
            answer = answer_of(port, probe)
            ctx["answers"].setdefault(path, answer)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            oh.run_wrk(children, url, ctx["bodies"]["small"], 8, 1, ctx["lua"])  # warm-up
            out[path] = {s: measured(children, ctx, gw, port, s) for s in SCENARIOS}
            for s, r in out[path].items():
                log(
                    f"{path:>10} {s:>11}: {r['rps']:>8,.0f} req/s  p50 {r['p50_us']:>7,} us  "
                    f"gw {r['gw_cpu_us_per_req']:>6.1f} us/req  "
                    f"errors {r['errors']} non2xx {r['non_2xx']}"
                )
        finally:
            children.stop(gw)
    return out


# ------------------------------------------------------------------------------------------------
# Transport alone: one client process, the gateway's two clients
# ------------------------------------------------------------------------------------------------

TRANSPORT_IDS = list(range(100, 140))  # a 40-token prompt


async def transport_client(kind: str, target: str, conns: int, duration: float) -> dict:
    """Calls from ``conns`` tasks for ``duration`` s: calls/s, CPU per call, latency."""
    import msgspec
    import trio

    lat: list[float] = []
    if kind == "zmq":
        from lmgw.protocol import Generate, SamplingParams
        from lmgw.transport.zmq import RpcChannel

        params = SamplingParams(max_tokens=16, ignore_eos=True)
        counter = iter(range(1 << 62))

        async def call(chan: Any) -> None:
            rid = f"b{next(counter)}"
            msg = Generate(rid, MODEL, prompt_token_ids=TRANSPORT_IDS, params=params, stream=False)
            await chan.call(msg)

    else:
        from lmgw.transport.pool import ConnectionPool, Origin

        body = json.dumps(
            {"model": MODEL, "prompt": TRANSPORT_IDS, "max_tokens": 16, "ignore_eos": True}
        ).encode()
        headers = [(b"content-type", b"application/json")]
        decode = msgspec.json.decode

        async def call(pool: Any) -> None:
            resp = await pool.request(origin, "POST", "/v1/completions", headers, body)
            answer = decode(await resp.read_all())
            assert answer["choices"]

    async def worker(client: Any, stop_at: float, record: bool) -> None:
        perf = time.perf_counter
        while perf() < stop_at:
            t = perf()
            await call(client)
            if record:
                lat.append(perf() - t)

    async def phase(client: Any, seconds: float, record: bool) -> None:
        stop_at = time.perf_counter() + seconds
        async with trio.open_nursery() as tasks:
            for _ in range(conns):
                tasks.start_soon(worker, client, stop_at, record)

    async with trio.open_nursery() as nursery:
        if kind == "zmq":
            client: Any = await nursery.start(RpcChannel(target, max_inflight=1 << 16).run)
            await client.wait_ready(30)
        else:
            origin = Origin.from_url(target)
            client = ConnectionPool()
        await phase(client, 1.0, False)  # warm-up: connections, caches
        me = [os.getpid()]
        c0, t0, io0 = time.process_time(), time.perf_counter(), io_thread_s(me)
        await phase(client, duration, True)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        io = io_thread_s(me) - io0
        nursery.cancel_scope.cancel()
    lat.sort()
    n = max(len(lat), 1)
    return {
        "calls": len(lat),
        "calls_per_s": len(lat) / wall,
        "cpu_us_per_call": cpu / n * 1e6,
        "io_thread_us_per_call": io / n * 1e6,
        "p50_us": lat[len(lat) // 2] * 1e6 if lat else None,
        "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6 if lat else None,
    }


RAW_CALLS = 20_000
RAW_BYTES = 256  # about a Generate of TRANSPORT_IDS, and about its answer
RAW_KINDS = ("raw-zmq", "trio-zmq", "raw-tcp")


def echo_servers() -> None:
    """The raw floor's peers: a ROUTER and a TCP socket, each echoing what it gets, in one
    process (a thread each, blocking calls: nothing between the socket and the echo)."""
    import socket
    import threading

    import zmq

    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:0")
    listener = socket.create_server(("127.0.0.1", 0))

    def zmq_echo() -> None:
        while True:
            router.send_multipart(router.recv_multipart())

    def tcp_echo() -> None:
        while True:
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.close()

    threading.Thread(target=zmq_echo, daemon=True).start()
    threading.Thread(target=tcp_echo, daemon=True).start()
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    print("READY", endpoint, listener.getsockname()[1], flush=True)
    threading.Event().wait()


def raw_client(kind: str, target: str) -> dict[str, Any]:
    """``RAW_CALLS`` blocking round trips of ``RAW_BYTES``, one at a time: a pyzmq DEALER (with
    ZeroMQ's I/O thread) or a plain TCP socket, no event loop. CPU of the whole process."""
    import resource
    import socket

    msg = b"x" * RAW_BYTES
    if kind == "trio-zmq":
        return _trio_zmq_client(target, msg)
    if kind == "raw-zmq":
        import zmq

        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(target)

        def call() -> None:
            sock.send(msg)
            sock.recv()

    else:
        conn = socket.create_connection(("127.0.0.1", int(target)))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def call() -> None:
            conn.sendall(msg)
            got = 0
            while got < RAW_BYTES:
                got += len(conn.recv(65536))

    for _ in range(1000):  # warm-up: connection, caches
        call()
    lat: list[float] = []
    perf = time.perf_counter
    r0, io0 = resource.getrusage(resource.RUSAGE_SELF), io_thread_s([os.getpid()])
    for _ in range(RAW_CALLS):
        t = perf()
        call()
        lat.append(perf() - t)
    r1, io1 = resource.getrusage(resource.RUSAGE_SELF), io_thread_s([os.getpid()])
    return _raw_result(lat, r0, r1, io1 - io0)


def _trio_zmq_client(target: str, msg: bytes) -> dict[str, Any]:
    """The same round trips from trio with the least integration there is: send, try to
    receive, ``wait_readable(ZMQ_FD)`` when nothing is queued (one task, so no edge can be
    lost to another): what trio itself adds to libzmq, the floor for ``RpcChannel``."""
    import resource

    import trio
    import zmq
    from trio.lowlevel import wait_readable

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(target)
    fd = sock.getsockopt(zmq.FD)

    async def call() -> None:
        sock.send(msg, zmq.NOBLOCK)
        while True:
            try:
                sock.recv(zmq.NOBLOCK)
                return
            except zmq.Again:
                await wait_readable(fd)

    async def main() -> dict[str, Any]:
        for _ in range(1000):
            await call()
        lat: list[float] = []
        perf = time.perf_counter
        r0, io0 = resource.getrusage(resource.RUSAGE_SELF), io_thread_s([os.getpid()])
        for _ in range(RAW_CALLS):
            t = perf()
            await call()
            lat.append(perf() - t)
        r1, io1 = resource.getrusage(resource.RUSAGE_SELF), io_thread_s([os.getpid()])
        return _raw_result(lat, r0, r1, io1 - io0)

    return trio.run(main)


def _raw_result(lat: list[float], r0: Any, r1: Any, io_s: float) -> dict[str, Any]:
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    lat.sort()
    return {
        "calls": RAW_CALLS,
        "calls_per_s": RAW_CALLS / sum(lat),
        "cpu_us_per_call": cpu / RAW_CALLS * 1e6,
        "io_thread_us_per_call": io_s / RAW_CALLS * 1e6,
        "p50_us": lat[len(lat) // 2] * 1e6,
        "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
    }


def start_echo(children: Any) -> dict[str, str]:
    out = LOG_DIR / "echo.stdout"
    argv = [sys.executable, str(Path(__file__).resolve()), "--echo-servers"]
    proc = children.spawn(argv, log_path=LOG_DIR / "echo.log", stdout=out)
    _, endpoint, port = wait_ready_line(proc, out, "echo").split()
    return {"raw-zmq": endpoint, "trio-zmq": endpoint, "raw-tcp": port}


def run_transport(children: Any, ctx: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Each (kind, c) once per round, in a fresh client process on the gateway's CPU."""
    targets = {
        "zmq": ctx["workers"]["zmq"]["url"][len("zmq+") :],
        "http": ctx["workers"]["http"]["url"],
    }
    targets.update(start_echo(children))
    runs: dict[str, list[dict[str, Any]]] = {}
    for i in range(rounds):
        order = ("zmq", "http") if i % 2 == 0 else ("http", "zmq")
        raw = ("raw-zmq", "trio-zmq", "raw-tcp")
        raw = raw if i % 2 == 0 else raw[::-1]
        for conns in (1, 64):
            for kind in order if conns > 1 else order + raw:
                out = LOG_DIR / "transport.stdout"
                argv = [sys.executable, str(Path(__file__).resolve()), "--transport-client"]
                argv += [kind, targets[kind], str(conns), str(ctx["duration"])]
                proc = children.spawn(
                    argv, log_path=LOG_DIR / "transport.log", stdout=out, cpus=ctx["gw_cpus"]
                )
                try:
                    proc.wait(timeout=ctx["duration"] + 60)
                finally:
                    children.stop(proc)
                r = json.loads(out.read_text().strip().splitlines()[-1])
                runs.setdefault(f"{kind}_c{conns}", []).append(r)
                log(
                    f"transport {kind:>4} c={conns:<3}: {r['calls_per_s']:>8,.0f} calls/s  "
                    f"{r['cpu_us_per_call']:>6.1f} us CPU/call  p50 {r['p50_us']:>7,.0f} us"
                )
    summary: dict[str, Any] = {
        key: {
            k: med([r[k] for r in rs])
            for k in ("calls_per_s", "cpu_us_per_call", "io_thread_us_per_call", "p50_us", "p99_us")
        }
        for key, rs in runs.items()
    }
    for name, (a, b) in {
        "zmq_to_http_c1": ("zmq_c1", "http_c1"),
        "zmq_to_http_c64": ("zmq_c64", "http_c64"),
        "raw_zmq_to_raw_tcp_c1": ("raw-zmq_c1", "raw-tcp_c1"),
        "zmq_to_trio_zmq_c1": ("zmq_c1", "trio-zmq_c1"),
    }.items():
        summary[f"cpu_ratio_{name}"] = med(
            [
                x["cpu_us_per_call"] / y["cpu_us_per_call"]
                for x, y in zip(runs[a], runs[b], strict=True)
            ]
        )
    return {"summary": summary, "runs": runs}


def transport_table(t: dict[str, Any]) -> str:
    s = t["summary"]
    lines = [
        f"{'client':<8} {'c':>3} {'calls/s':>9} {'CPU us/call':>12} {'(ZMQ IO)':>9} "
        f"{'p50 us':>8} {'p99 us':>8}"
    ]
    for conns in (1, 64):
        for kind in ("zmq", "http", *RAW_KINDS) if conns == 1 else ("zmq", "http"):
            r = s[f"{kind}_c{conns}"]
            lines.append(
                f"{kind:<8} {conns:>3} {fmt(r['calls_per_s']):>9} "
                f"{fmt(r['cpu_us_per_call'], '.1f'):>12} "
                f"{fmt(r.get('io_thread_us_per_call'), '.1f'):>9} {fmt(r['p50_us']):>8} "
                f"{fmt(r['p99_us']):>8}"
            )
        lines.append(
            f"{'':<8} zmq/http CPU per call x{fmt(s[f'cpu_ratio_zmq_to_http_c{conns}'], '.2f')}"
        )
        if conns == 1:
            ratio = fmt(s["cpu_ratio_raw_zmq_to_raw_tcp_c1"], ".2f")
            lines.append(f"{'':<8} raw-zmq/raw-tcp (the floor: no event loop) x{ratio}")
            ratio = fmt(s["cpu_ratio_zmq_to_trio_zmq_c1"], ".2f")
            lines.append(f"{'':<8} zmq/trio-zmq (RpcChannel over trio's least) x{ratio}")
    return "\n".join(lines)


def med(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for s in SCENARIOS:
        row: dict[str, Any] = {}
        for path in PATHS:
            runs = [rnd[path][s] for rnd in rounds]
            row[path] = {
                k: med([r.get(k) for r in runs])
                for k in (
                    "rps",
                    "p50_us",
                    "p99_us",
                    "gw_cpu_us_per_req",
                    "gw_cpu_us_per_event",
                    "gw_io_thread_us_per_req",
                    "worker_cpu_us_per_req",
                    "other_cores",
                )
            }
            row[path]["errors"] = sum(r["errors"] + r["non_2xx"] for r in runs)
        # paired per round, then the median: drift between rounds cancels
        for base in ("http", "http-relay"):
            row[f"cpu_ratio_zmq_to_{base}"] = med(
                [
                    rnd["zmq"][s]["gw_cpu_us_per_req"] / rnd[base][s]["gw_cpu_us_per_req"]
                    for rnd in rounds
                ]
            )
            row[f"p50_diff_us_zmq_minus_{base}"] = med(
                [rnd["zmq"][s]["p50_us"] - rnd[base][s]["p50_us"] for rnd in rounds]
            )
        summary[s] = row
    return summary


def fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def table(summary: dict[str, Any]) -> str:
    lines = [
        f"{'scenario':<11} {'path':<10} {'req/s':>9} {'p50 us':>8} {'p99 us':>8} "
        f"{'gw us/req':>10} {'(ZMQ IO)':>9} {'worker us/req':>14} {'noise':>6}",
    ]
    for s, row in summary.items():
        for path in PATHS:
            r = row[path]
            lines.append(
                f"{s:<11} {path:<10} {fmt(r['rps']):>9} {fmt(r['p50_us']):>8} "
                f"{fmt(r['p99_us']):>8} {fmt(r['gw_cpu_us_per_req'], '.1f'):>10} "
                f"{fmt(r['gw_io_thread_us_per_req'], '.1f'):>9} "
                f"{fmt(r['worker_cpu_us_per_req'], '.1f'):>14} {fmt(r['other_cores'], '.2f'):>6}"
            )
        for base in ("http", "http-relay"):
            ratio = row[f"cpu_ratio_zmq_to_{base}"]
            verdict = "" if ratio is None else ("  (target met)" if ratio <= TARGET_RATIO else "")
            lines.append(
                f"{'':<11} zmq/{base}: gateway CPU x{fmt(ratio, '.2f')}, p50 "
                f"{fmt(row[f'p50_diff_us_zmq_minus_{base}'], '+,.0f')} us{verdict}"
            )
    return "\n".join(lines)


def run_tensors(full: bool) -> dict[str, Any] | None:
    argv = [sys.executable, str(HERE / "tensors.py")] + ([] if full else ["--quick"])
    log("tensor throughput:", " ".join(argv[1:]))
    try:
        subprocess.run(argv, cwd=REPO, check=True, timeout=900, stdout=subprocess.DEVNULL)
    except (subprocess.SubprocessError, OSError) as exc:
        log(f"benchmarks/tensors.py failed: {exc}")
        return None
    data = json.loads((RESULTS / "tensors.json").read_text())
    return {
        "meta": data["meta"],
        "rows": [
            {
                "mib": r["mib"],
                "median_gb_per_s": r["median_gb_per_s"],
                "ratio_to_memcpy_paired": r["ratio_to_memcpy_paired"],
            }
            for r in data["rows"]
        ],
    }


def tensor_table(t: dict[str, Any]) -> str:
    lines = [f"{'MiB':>4} {'memcpy GB/s':>12} {'tcp GB/s (x)':>15} {'shm GB/s (x)':>15}"]
    for r in t["rows"]:
        g, x = r["median_gb_per_s"], r["ratio_to_memcpy_paired"]
        lines.append(
            f"{r['mib']:>4} {g['memcpy']:>12.1f} {g['tcp']:>8.2f} ({x['tcp']:.2f}) "
            f"{g['shm']:>8.2f} ({x['shm']:.2f})"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s runs")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick: 1)")
    ap.add_argument("--duration", type=int, default=None, help="s per wrk run (4; --quick: 2)")
    ap.add_argument("--layout", choices=("pinned", "none"), default="pinned")
    ap.add_argument("--no-tensors", action="store_true", help="skip benchmarks/tensors.py")
    ap.add_argument("--tensors-full", action="store_true", help="tensors.py without --quick")
    ap.add_argument("--no-transport", action="store_true", help="skip the transport-alone part")
    ap.add_argument("--out", type=Path, default=OUT_JSON)
    ap.add_argument("--transport-client", nargs=4, help=argparse.SUPPRESS)  # internal
    ap.add_argument("--echo-servers", action="store_true", help=argparse.SUPPRESS)  # internal
    args = ap.parse_args(argv)
    if args.echo_servers:
        echo_servers()
        return 0
    if args.transport_client and args.transport_client[0] in RAW_KINDS:
        print(json.dumps(raw_client(*args.transport_client[:2])), flush=True)
        return 0
    if args.transport_client:
        import trio

        kind, target, conns, seconds = args.transport_client
        result = trio.run(transport_client, kind, target, int(conns), float(seconds))
        print(json.dumps(result), flush=True)
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration or (2 if args.quick else 4)
    if shutil.which("wrk") is None:
        print("benchmarks/zmq_vs_http.py needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    for old in LOG_DIR.iterdir():
        if old.is_file():
            old.unlink()
    from lmgw.simulators import model_files

    tokenizer = str(model_files.default_model_dir())  # built once, shared by every process
    allowed = sorted(os.sched_getaffinity(0))
    gw_cpus = None
    layout = "no pinning"
    if args.layout == "pinned" and len(allowed) >= 2:
        gw_cpus = {allowed[1]}
        os.sched_setaffinity(0, {allowed[0]})  # inherited by the workers and wrk
        layout = f"gateway on CPU {allowed[1]}; wrk, workers and this script on CPU {allowed[0]}"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    children = oh.Children(env)
    lua = LOG_DIR / "wrk_bodies.lua"
    lua.write_text(oh.WRK_LUA)
    bodies = {"small": LOG_DIR / "bodies_small.jsonl", "stream": LOG_DIR / "bodies_stream.jsonl"}
    write_bodies(bodies["small"], stream=False)
    write_bodies(bodies["stream"], stream=True)
    started = time.perf_counter()
    try:
        ctx: dict[str, Any] = {
            "workers": start_workers(children),
            "tokenizer": tokenizer,
            "gw_cpus": gw_cpus,
            "duration": duration,
            "lua": lua,
            "bodies": bodies,
            "answers": {},
        }
        results = []
        for i in range(rounds):
            order = PATHS[i % 3 :] + PATHS[: i % 3]
            log(f"round {i + 1}/{rounds}: {', '.join(order)}")
            results.append(run_round(children, ctx, order))
        transport = None if args.no_transport else run_transport(children, ctx, rounds)
    finally:
        children.stop_all()
    summary = summarize(results)
    same_text = len(set(ctx["answers"].values())) == 1
    tensors = None if args.no_tensors else run_tensors(args.tensors_full)
    meta = {
        "benchmark": "zmq_vs_http",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "rounds": rounds,
        "duration_s": duration,
        "layout": layout,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "cpu_method": oh.CPU_METHOD,
        "paths": {
            "zmq": "native worker (zmq+tcp), models[].tokenizer (required)",
            "http": "HTTP worker, same models[].tokenizer (same render + tokenize)",
            "http-relay": "HTTP worker, no tokenizer (bytes relayed)",
        },
        "same_answer_on_every_path": same_text,
        "wall_s": time.perf_counter() - started,
    }
    print(f"gateway per request, HTTP vs native workers; medians of {rounds} rounds x {duration} s")
    print(f"({layout}; noise = other processes' cores during the run)")
    print(table(summary))
    print(f"same answer on every path: {same_text}")
    if transport is not None:
        print("transport alone: the gateway's clients in one process (CPU incl. its threads)")
        print(transport_table(transport))
    if tensors is not None:
        print("tensor throughput (benchmarks/tensors.py; x = median ratio to memcpy)")
        print(tensor_table(tensors))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": summary,
                "rounds": results,
                "transport": transport,
                "tensors": tensors,
            },
            indent=2,
            default=str,
        )
    )
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
