"""The SDK's costs: the in-process gateway vs the HTTP client, and the asyncio bridge.

Simulated workers run as separate processes (``python -m lmgw.simulators``), so the CPU time
read here (``time.process_time``: every thread of this process) is the SDK's and the gateway's
alone. One run measures, against the same workers:

1. per request (chat, ``max_tokens`` 16, one at a time): wall time and CPU of
   * ``direct``: ``lmgw.Client`` straight to a worker (no gateway: the floor),
   * ``http``: ``lmgw.Client`` -> the gateway's HTTP server (in this process) -> worker,
   * ``in-process``: ``lmgw.Gateway.chat`` (trio) -> worker,
   * ``aio in-process``: ``lmgw.aio.Gateway.chat`` from asyncio (the trio thread) -> worker,
   * ``aio http``: ``lmgw.Client`` on asyncio -> the same gateway's HTTP server;
   and ``concurrent``: 16 requests at a time, requests/s, in-process vs http;
2. per streamed event (256-token streams): trio in-process vs the asyncio bridge, from a worker
   with no delays (events arrive in bursts: batches of many) and from a paced one (~0.2 ms per
   token: one event per batch, the bridge's worst case);
3. the bridge alone: 1-event batches from a trio thread through the pipe to an asyncio reader,
   against the same through a trio memory channel inside trio (no network, no gateway).

    .venv/bin/python benchmarks/sdk.py [--quick]

Prints a table (medians of the rounds) and writes benchmarks/results/sdk.json. Compare only
figures of one run: the shared box moves between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

import lmgw
import lmgw.aio
from lmgw.sdk.aio import _END, _EventPipe
from lmgw.simulators import model_files
from lmgw.simulators.fleet import worker_command

MODEL = "sim-model"
MESSAGES = [{"role": "user", "content": "Tell me about disaggregated serving."}]
RESULTS = Path(__file__).parent / "results" / "sdk.json"
STREAM_TOKENS = 256
CONCURRENCY = 16


# -- worker processes ---------------------------------------------------------------------------


class Workers:
    """Simulated worker processes: ``{name: speed}``; their URLs once READY."""

    def __init__(self, speeds: dict[str, float]) -> None:
        self.speeds = speeds
        self.procs: list[subprocess.Popen] = []
        self.urls: dict[str, str] = {}

    def __enter__(self) -> Workers:
        model_dir = str(model_files.default_model_dir())
        for name, speed in self.speeds.items():
            cmd = worker_command(
                "pd", model=MODEL, speed=speed, extra_args=["--model-dir", model_dir]
            )
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            self.procs.append(proc)
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            line = proc.stdout.readline().decode() if ready else ""
            if not line.startswith("READY "):
                self.__exit__()
                raise RuntimeError(f"worker {name} did not start: {line!r}")
            self.urls[name] = line.split()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- timing ---------------------------------------------------------------------------------------


def per_op(wall: float, cpu: float, n: int) -> dict[str, float]:
    return {"wall_us": wall / n * 1e6, "cpu_us": cpu / n * 1e6}


async def timed(n: int, op: Callable[[], Awaitable[Any]], warmup: int = 20) -> dict[str, float]:
    """``op`` ``n`` times in a row (after ``warmup`` runs): wall and CPU per run."""
    for _ in range(warmup):
        await op()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        await op()
    return per_op(time.perf_counter() - w0, time.process_time() - c0, n)


async def timed_events(n: int, stream: Callable[[], Any]) -> dict[str, float]:
    """``n`` streams: wall and CPU per event (events counted)."""

    async def one() -> int:
        count = 0
        async for _ in stream():
            count += 1
        return count

    await one()
    events = 0
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        events += await one()
    out = per_op(time.perf_counter() - w0, time.process_time() - c0, events)
    out["events_per_stream"] = events / n
    return out


def chat(target: Any) -> Callable[[], Awaitable[Any]]:
    return lambda: target.chat(model=MODEL, messages=MESSAGES, max_tokens=16)


def stream(target: Any) -> Callable[[], Any]:
    return lambda: target.chat_stream(
        model=MODEL, messages=MESSAGES, max_tokens=STREAM_TOKENS, ignore_eos=True
    )


# -- the rounds ---------------------------------------------------------------------------------


async def trio_round(urls: dict[str, str], n: int, n_streams: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with lmgw.Client(urls["fast"]) as direct:
        out["direct"] = await timed(n, chat(direct))
    async with lmgw.Gateway(workers=[urls["fast"]]) as gw:
        out["in-process"] = await timed(n, chat(gw))
        await gw.serve(port=0)
        async with lmgw.Client(gw.url) as client:
            out["http"] = await timed(n, chat(client))
            out["concurrent http"] = await concurrent_rps(chat(client), n)
        out["concurrent in-process"] = await concurrent_rps(chat(gw), n)
        out["stream burst"] = await timed_events(n_streams, stream(gw))
    async with lmgw.Gateway(workers=[urls["paced"]]) as gw:
        out["stream paced"] = await timed_events(n_streams, stream(gw))
    return out


async def concurrent_rps(op: Callable[[], Awaitable[Any]], n: int) -> dict[str, float]:
    async def worker(count: int) -> None:
        for _ in range(count):
            await op()

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(CONCURRENCY):
            nursery.start_soon(worker, max(1, n // CONCURRENCY))
    total = CONCURRENCY * max(1, n // CONCURRENCY)
    return {"rps": total / (time.perf_counter() - t0)}


async def asyncio_round(urls: dict[str, str], n: int, n_streams: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with lmgw.aio.Gateway(workers=[urls["fast"]]) as gw:
        out["aio in-process"] = await timed(n, chat(gw))
        await gw.serve(port=0)
        async with lmgw.Client(gw.url) as client:
            out["aio http"] = await timed(n, chat(client))
        out["aio stream burst"] = await timed_events(n_streams, stream(gw))
    async with lmgw.aio.Gateway(workers=[urls["paced"]]) as gw:
        out["aio stream paced"] = await timed_events(n_streams, stream(gw))
    return out


# -- the bridge alone ---------------------------------------------------------------------------


def bridge_alone(n_events: int, max_batches: int = 16) -> dict[str, float]:
    """1-event batches: trio thread -> pipe -> asyncio, per event. ``max_batches=1`` is the
    ping-pong worst case: every event wakes the reader and then the writer (two thread hops)."""

    async def main() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        box: dict[str, Any] = {}
        started = threading.Event()

        async def produce() -> None:
            token = trio.lowlevel.current_trio_token()
            pipe = box["pipe"] = _EventPipe(loop, token, max_batches)
            started.set()
            batch = ["event"]
            for _ in range(n_events):
                await pipe.send(batch)
            pipe.close()

        w0, c0 = time.perf_counter(), time.process_time()
        thread = threading.Thread(target=trio.run, args=(produce,))
        thread.start()
        await asyncio.to_thread(started.wait)
        pipe = box["pipe"]
        count = 0
        while (item := await pipe.get()) is not _END:
            count += len(item)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        await asyncio.to_thread(thread.join)
        assert count == n_events
        return per_op(wall, cpu, n_events)

    return asyncio.run(main())


def channel_alone(n_events: int) -> dict[str, float]:
    """The same through a trio memory channel, inside trio."""

    async def main() -> dict[str, float]:
        send, receive = trio.open_memory_channel[list[str]](16)

        async def produce() -> None:
            batch = ["event"]
            async with send:
                for _ in range(n_events):
                    await send.send(batch)

        w0, c0 = time.perf_counter(), time.process_time()
        count = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            async for item in receive:
                count += len(item)
        assert count == n_events
        return per_op(time.perf_counter() - w0, time.process_time() - c0, n_events)

    return trio.run(main)


# -- report ---------------------------------------------------------------------------------------


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rounds[0]:
        out[key] = {
            field: statistics.median(r[key][field] for r in rounds) for field in rounds[0][key]
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke test)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    n = 200 if args.quick else 1000
    n_streams = 4 if args.quick else 20
    rounds = args.rounds or (1 if args.quick else 3)
    bridge_events = 20_000 if args.quick else 200_000

    results: list[dict[str, Any]] = []
    with Workers({"fast": float("inf"), "paced": 50.0}) as workers:
        for _ in range(rounds):
            r = trio.run(trio_round, workers.urls, n, n_streams)
            r.update(asyncio.run(asyncio_round(workers.urls, n, n_streams)))
            r["bridge alone"] = bridge_alone(bridge_events)
            r["bridge ping-pong"] = bridge_alone(bridge_events // 10, max_batches=1)
            r["trio channel alone"] = channel_alone(bridge_events)
            results.append(r)
    m = median_of(results)

    def us(key: str, field: str = "wall_us") -> float:
        return m[key][field]

    derived = {
        "http hop per request (http - in-process), wall us": us("http") - us("in-process"),
        "http hop per request, cpu us": us("http", "cpu_us") - us("in-process", "cpu_us"),
        "bridge per request (aio - trio in-process), wall us": us("aio in-process")
        - us("in-process"),
        "bridge per request, cpu us": us("aio in-process", "cpu_us") - us("in-process", "cpu_us"),
        "bridge per event, burst, cpu us": us("aio stream burst", "cpu_us")
        - us("stream burst", "cpu_us"),
        "bridge per event, paced, cpu us": us("aio stream paced", "cpu_us")
        - us("stream paced", "cpu_us"),
        "bridge alone per 1-event batch, wall us": us("bridge alone"),
        "bridge alone per 1-event batch, cpu us": us("bridge alone", "cpu_us"),
        "bridge ping-pong per event (worst case), cpu us": us("bridge ping-pong", "cpu_us"),
        "trio channel alone per item, wall us": us("trio channel alone"),
    }
    where = f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"\nlmgw SDK, {rounds} round(s), medians; {where}")
    print(f"{'measure':<28}{'wall us':>12}{'cpu us':>12}   note")
    notes = {
        "direct": "Client -> worker (no gateway)",
        "http": "Client -> gateway HTTP -> worker",
        "in-process": "lmgw.Gateway.chat -> worker",
        "aio in-process": "lmgw.aio.Gateway.chat -> worker",
        "aio http": "Client on asyncio -> gateway HTTP",
        "stream burst": "per event, trio in-process",
        "aio stream burst": "per event, asyncio bridge",
        "stream paced": "per event, trio, 1 event/batch",
        "aio stream paced": "per event, bridge, 1 event/batch",
        "bridge alone": "per 1-event batch, pipe only",
        "bridge ping-pong": "per event, pipe of 1: 2 hops each",
        "trio channel alone": "per item, memory channel",
    }
    for key, note in notes.items():
        print(f"{key:<28}{us(key):>12.1f}{us(key, 'cpu_us'):>12.1f}   {note}")
    for key in ("concurrent in-process", "concurrent http"):
        print(f"{key:<28}{m[key]['rps']:>12.0f}{'req/s':>12}   c={CONCURRENCY}")
    print()
    for key, value in derived.items():
        print(f"{key:<56}{value:>10.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "rounds": rounds,
                "requests_per_measure": n,
                "streams_per_measure": n_streams,
                "stream_tokens": STREAM_TOKENS,
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "medians": m,
                "derived": derived,
                "all_rounds": results,
            },
            indent=2,
        )
    )
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
