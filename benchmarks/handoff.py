"""A prefill's KV handed to the decode worker through the gateway: frames vs shared memory.

Why: an engine without a side channel between workers sends its KV back with ``PrefillDone``
and the gateway passes it on to the decode worker (docs/native-protocol.md, "Hand-offs through
the gateway"). Over TCP every byte crosses two loopback sockets and the gateway; on one host
the worker can put it in shared memory and the gateway relays a handle. This measures both, in
one run, for KV of 1, 16, 64 and 128 MiB:

* a prefill worker and a decode worker, each its own process (``python benchmarks/handoff.py
  --worker p|d``: ``lmgw.worker.WorkerServer`` around a small engine: P returns a prepared KV
  array, D touches every page of what arrives and answers one token);
* one gateway in this process (``lmgw.Gateway``, flow ``p/d``), driven by a minimal HTTP
  client on the same trio loop, one request at a time;
* ``frames``: ``native.shm_threshold_bytes = 0`` (tensor_shm not offered); ``shm``: 1 MiB.
  Rounds alternate between the two (a gateway each, the same workers), so drift hits both.

Per size and path: the median request latency, the gateway process's CPU per request (this
process: the gateway, its ZeroMQ I/O thread and the client), and shm/frames ratios.

    .venv/bin/python benchmarks/handoff.py [--quick] [--out PATH]

Writes benchmarks/results/handoff.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import trio

RESULTS = Path(__file__).parent / "results" / "handoff.json"
MODEL = "handoff-bench"
MIB = 1 << 20


def run_worker(role: str, sizes: list[int]) -> None:
    """The worker processes: P hands off ``kv_mib`` MiB (from the prompt's first token id),
    D checks the size and touches every page."""
    from lmgw.protocol import Usage
    from lmgw.worker import Engine, EngineRequest, GenerateOutput, PrefillResult, WorkerServer
    from lmgw.worker.cli import serve

    kv = {n: np.full(n * MIB, n % 251, dtype=np.uint8) for n in sizes}

    class Bench(Engine):
        models = (MODEL,)

        def __init__(self) -> None:
            self.role = role

        @property
        def capabilities(self) -> frozenset[str]:
            return super().capabilities | ({"kv_tensors"} if role == "d" else set())

        async def prefill(self, req: EngineRequest[Any]) -> PrefillResult:
            n = int(req.msg.params.extra["kv_mib"])
            await trio.lowlevel.checkpoint()
            return PrefillResult({"kv_mib": n}, Usage(1), [], [kv[n]])

        async def generate(self, req: EngineRequest[Any]) -> AsyncIterator[GenerateOutput]:  # type: ignore[override]
            (array,) = req.kv_arrays()
            n = req.msg.kv_transfer_params["kv_mib"]
            if array.nbytes != n * MIB or int(array[::4096].max()) != n % 251:
                raise ValueError("the KV arrived wrong")
            yield GenerateOutput(text="ok", token_ids=[1])
            yield GenerateOutput(finish_reason="length", usage=Usage(1, 1, 0))

        async def encode(self, req: Any) -> Any:
            raise NotImplementedError

        async def abort(self, request_id: str) -> None:
            await trio.lowlevel.checkpoint()

        def metrics(self) -> dict[str, float]:
            return {}

    server = WorkerServer(Bench(), bind="tcp://127.0.0.1:0", control_bind=None, shm_threshold=MIB)
    trio.run(serve, server)


async def http_post(port: int, body: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        await stream.send_all(head + body)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(data[:400].decode(errors="replace"))
    return data


async def measure(ns: argparse.Namespace, urls: dict[str, str]) -> dict[str, Any]:
    from lmgw.config import (
        GatewayConfig,
        HealthConfig,
        ModelConfig,
        NativeConfig,
        ServerConfig,
        WorkerConfig,
    )
    from lmgw.gateway import Gateway
    from lmgw.simulators import model_files

    folder = str(model_files.default_model_dir())
    rows: dict[tuple[str, int], dict[str, list[float]]] = {}
    for rnd in range(ns.rounds):
        for path in ("frames", "shm") if rnd % 2 == 0 else ("shm", "frames"):
            cfg = GatewayConfig(
                server=ServerConfig(port=0),
                health=HealthConfig(native_heartbeat_interval_s=1.0, native_heartbeat_timeout_s=30),
                models=[ModelConfig(name=MODEL, flow="p/d", tokenizer=folder)],
                workers=[WorkerConfig(url=urls[r], role=r, id=r) for r in ("p", "d")],
                native=NativeConfig(shm_threshold_bytes=MIB if path == "shm" else 0),
            )
            gw = Gateway(cfg)
            async with trio.open_nursery() as nursery:
                port = await nursery.start(gw.run)
                with trio.fail_after(30):
                    while not all(w.channel.session is not None for w in gw.registry):
                        await trio.sleep(0.05)
                assert all(w.channel.session.shm == (path == "shm") for w in gw.registry)
                for n in ns.sizes:
                    body = msgspec.json.encode({"model": MODEL, "prompt": "x", "max_tokens": 1,
                                                "kv_mib": n})  # fmt: skip
                    await http_post(port, body)  # warm: segments, pools, page tables
                    cell = rows.setdefault((path, n), {"latency_s": [], "cpu_s": []})
                    for _ in range(ns.requests):
                        c0, t0 = time.process_time(), time.perf_counter()
                        await http_post(port, body)
                        cell["latency_s"].append(time.perf_counter() - t0)
                        cell["cpu_s"].append(time.process_time() - c0)
                nursery.cancel_scope.cancel()
    out: dict[str, Any] = {}
    for n in ns.sizes:
        entry: dict[str, Any] = {}
        for path in ("frames", "shm"):
            cell = rows[(path, n)]
            entry[path] = {
                "latency_ms": statistics.median(cell["latency_s"]) * 1e3,
                "gateway_cpu_ms": statistics.median(cell["cpu_s"]) * 1e3,
                "samples": len(cell["latency_s"]),
            }
        entry["latency_ratio"] = entry["shm"]["latency_ms"] / entry["frames"]["latency_ms"]
        entry["cpu_ratio"] = entry["shm"]["gateway_cpu_ms"] / max(
            1e-9, entry["frames"]["gateway_cpu_ms"]
        )
        out[f"{n}MiB"] = entry
    return out


def spawn(role: str, sizes: list[int]) -> tuple[subprocess.Popen[str], str]:
    argv = [sys.executable, __file__, "--worker", role, "--sizes", *map(str, sizes)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit(f"the {role} worker did not start")
    return proc, "zmq+" + line.split()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=("p", "d"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 4 requests")
    parser.add_argument("--out", type=Path, default=RESULTS)
    ns = parser.parse_args()
    if ns.worker:
        run_worker(ns.worker, ns.sizes)
        return
    if ns.quick:
        ns.rounds, ns.requests = 2, 4
    procs = []
    try:
        urls = {}
        for role in ("p", "d"):
            proc, urls[role] = spawn(role, ns.sizes)
            procs.append(proc)
        result = trio.run(measure, ns, urls)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)
    print(f"{'KV':>7} {'frames ms':>10} {'shm ms':>8} {'ratio':>6}   "
          f"{'frames cpu ms':>13} {'shm cpu ms':>10} {'ratio':>6}")  # fmt: skip
    for size, e in result.items():
        f, s = e["frames"], e["shm"]
        print(f"{size:>7} {f['latency_ms']:>10.2f} {s['latency_ms']:>8.2f} "
              f"{e['latency_ratio']:>6.2f}   {f['gateway_cpu_ms']:>13.2f} "
              f"{s['gateway_cpu_ms']:>10.2f} {e['cpu_ratio']:>6.2f}")  # fmt: skip
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(
        json.dumps(
            {
                "benchmark": "handoff",
                "host": platform.node(),
                "cpus": os.cpu_count(),
                "rounds": ns.rounds,
                "requests": ns.requests,
                "results": result,
            },
            indent=1,
        )
    )
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
