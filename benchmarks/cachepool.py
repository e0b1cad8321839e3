"""The distributed cache pool: per-tier latency and throughput, and what the encoder-output cache
buys on a workload that repeats images.

1. **Tiers.** For values of 4 KiB, 1 MiB and 64 MiB (uint8 arrays), each tier alone
   (``memory``, ``shm``, ``redis`` on a local ``redis-server``) is timed for ``put`` and ``get``
   (median of repeats, interleaved), next to a ``memcpy`` of the same size (``np.copyto`` into a
   warm array, the yardstick). GB/s = 1e9 bytes/s. A memory get returns the stored array (no
   copy), an shm get maps the segment read-only (zero-copy), a Redis get copies the bytes over
   TCP: the ratio to memcpy says what each tier costs per byte.
2. **Encoder cache.** An in-process fleet (one encoder, one merged worker; simulated latency at
   speed 1: 10 ms per encoded image) behind a gateway, ``e+pd`` with vllm-epd. Workload: 48
   streamed chats, each with one of 12 distinct PNGs (every image 4 times, shuffled). Runs:
   ``off`` (no encoder cache: ``media.encoder_cache_ttl_s = 0``), ``pool`` (``[cache]`` memory
   tier), ``restart-local`` (a gateway that restarted with only a memory tier: cold) and
   ``restart-redis`` (a restarted gateway whose pool has a Redis tier that the previous gateway
   filled). Reports the share of E legs skipped and TTFT p50/p90 per run, and the TTFT gain as
   the ratio to ``off`` in the same run.
3. **Replicas.** Two gateway replicas (``cache_aware``, approximate mode: no KV events) in front
   of 4 in-process merged workers, sharing routing hints through Redis (``[replicas]``), and a
   control pair that shares nothing. 100 conversations of 3 turns with a shared system prompt,
   interleaved, each request sent to a random replica, then a think time of 0, 5 or 20 ms.
   Before each request both replicas are asked what they would choose for it (``peek``: the
   decision without recording it); the agreement rate is the share of requests on which they
   agree. Target: >= 99% at a realistic think time.

    .venv/bin/python benchmarks/cachepool.py [--quick]

Writes ``benchmarks/results/cachepool.json``. Needs ``redis-server`` (``apt-get install
redis-server``); without it the Redis rows are skipped.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

from lmgw.cache import CacheConfig, CachePool, MemoryTier
from lmgw.cache.redis import RedisTier
from lmgw.cache.shm import ShmTier
from lmgw.config import (
    GatewayConfig,
    HealthConfig,
    MediaLimits,
    ModelConfig,
    ServerConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway
from lmgw.simulators import SimWorker, WorkerOptions, serve_worker_inprocess

KIB, MIB = 1 << 10, 1 << 20
SIZES = (4 * KIB, MIB, 64 * MIB)
RESULTS = Path(__file__).parent / "results" / "cachepool.json"
MODEL = "sim-model"


# -- redis-server -------------------------------------------------------------------------------


class Redis:
    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="lmgw-bench-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> bool:
        if self.binary is None:
            return False
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", self.dir]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- 1. tiers -----------------------------------------------------------------------------------


def make_tier(name: str, redis: Redis | None) -> Any:
    if name == "memory":
        return MemoryTier(512 * MIB)
    if name == "shm":
        return ShmTier(512 * MIB, f"lmgw-bench-{os.getpid()}")
    assert redis is not None
    return RedisTier(redis.url, prefix="bench", timeout_s=30.0)


async def time_tiers(quick: bool, redis: Redis | None) -> list[dict[str, Any]]:
    names = ["memory", "shm"] + (["redis"] if redis is not None else [])
    pools = {n: CachePool([make_tier(n, redis)], ttl_s=0) for n in names}
    rows = []
    for size in SIZES:
        repeats = {4 * KIB: 400, MIB: 40, 64 * MIB: 5}[size] // (4 if quick else 1)
        value = np.random.default_rng(size).integers(0, 255, size, dtype=np.uint8)
        dst = np.empty_like(value)
        np.copyto(dst, value)
        samples: dict[str, list[float]] = {"memcpy": []}
        for n in names:
            samples[f"{n}.put"] = []
            samples[f"{n}.get"] = []
        for i in range(repeats + 1):  # the first round warms up (segments, connections)
            t0 = time.perf_counter()
            np.copyto(dst, value)
            memcpy = time.perf_counter() - t0
            if i:
                samples["memcpy"].append(memcpy)
            for n in names:
                pool = pools[n]
                key = f"k{size}"
                t0 = time.perf_counter()
                assert await pool.put(key, value)
                put = time.perf_counter() - t0
                t0 = time.perf_counter()
                got = await pool.get(key)
                get = time.perf_counter() - t0
                assert got is not None and got.nbytes == size
                if i:
                    samples[f"{n}.put"].append(put)
                    samples[f"{n}.get"].append(get)
                del got
        for what, values in samples.items():
            med = statistics.median(values)
            rows.append(
                {
                    "size": size,
                    "op": what,
                    "median_s": med,
                    "gb_s": size / med / 1e9,
                    "vs_memcpy": statistics.median(samples["memcpy"]) / med,
                    "repeats": len(values),
                }
            )
    for pool in pools.values():
        await pool.aclose()
    shm_dir = pools["shm"].tiers[0].path  # type: ignore[attr-defined]
    shutil.rmtree(shm_dir, ignore_errors=True)
    return rows


# -- 2. encoder cache ---------------------------------------------------------------------------


def png(i: int) -> str:
    from PIL import Image

    img = Image.new("RGB", (32, 32), ((i * 53) % 256, (i * 97) % 256, (i * 151) % 256))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def ttft(url: str, image: str, text: str) -> float:
    body = {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
        "max_tokens": 4,
        "stream": True,
    }
    import msgspec

    data = msgspec.json.encode(body)
    host, port = url.rsplit("/", 1)[1].split(":")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n"
        f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    ).encode()
    stream = await trio.open_tcp_stream(host, int(port))
    t0 = time.perf_counter()
    first = None
    async with stream:
        await stream.send_all(head + data)
        buf = b""
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            buf += chunk
            if first is None and b"\r\n\r\n" in buf:
                if not buf.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(buf[:300].decode("latin-1"))
                if b'"content"' in buf.split(b"\r\n\r\n", 1)[1]:
                    first = time.perf_counter() - t0
    assert first is not None
    return first


async def run_gateway(
    nursery: trio.Nursery, workers: list[WorkerConfig], cache: CacheConfig, ttl_s: float
) -> tuple[Gateway, str, trio.CancelScope]:
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        media=MediaLimits(encoder_cache_ttl_s=ttl_s),
        models=[ModelConfig(name=MODEL, flow="e+pd", dialect="vllm-epd")],
        workers=workers,
        cache=cache,
    )
    gw = Gateway(cfg)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        with scope:
            await gw.run(task_status=task_status)

    port = await nursery.start(run)
    return gw, f"http://127.0.0.1:{port}", scope


async def encoder_cache(quick: bool, redis: Redis | None) -> list[dict[str, Any]]:
    images = [png(i) for i in range(12)]
    workload = [img for img in images for _ in range(4)]
    random.Random(7).shuffle(workload)
    if quick:
        workload = workload[:24]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmgw-bench-ec-") as ec_dir:
        async with trio.open_nursery() as nursery:
            sims = {}
            for role in ("e", "pd"):
                sim = SimWorker(WorkerOptions(role=role, model=MODEL, speed=1.0, ec_dir=ec_dir))
                sims[role] = (sim, await nursery.start(serve_worker_inprocess, sim))
            workers = [WorkerConfig(url=url, role=role) for role, (_s, url) in sims.items()]
            encoder = sims["e"][0]
            runs: list[tuple[str, CacheConfig, float, bool]] = [
                ("off", CacheConfig(), 0.0, False),
                ("pool", CacheConfig(tiers=["memory"]), 600.0, False),
                ("restart-local", CacheConfig(tiers=["memory"]), 600.0, True),
            ]
            if redis is not None:
                shared = CacheConfig(tiers=["memory", "redis"], redis_url=redis.url,
                                     redis_prefix="bench-ec")  # fmt: skip
                runs.append(("restart-redis", shared, 600.0, True))
            for name, cache, ttl, restarted in runs:
                if restarted:  # a previous gateway served the whole workload, then stopped
                    _gw, url, scope = await run_gateway(nursery, workers, cache, ttl)
                    for i, img in enumerate(workload):
                        await ttft(url, img, f"warm {i}")
                    scope.cancel()
                before = encoder.stats.requests_total
                _gw, url, scope = await run_gateway(nursery, workers, cache, ttl)
                times = [await ttft(url, img, f"q{i}") for i, img in enumerate(workload)]
                scope.cancel()
                encoded = encoder.stats.requests_total - before
                times.sort()
                rows.append(
                    {
                        "run": name,
                        "requests": len(workload),
                        "e_legs": encoded,
                        "skip_rate": 1 - encoded / len(workload),
                        "ttft_p50_s": statistics.median(times),
                        "ttft_p90_s": times[int(0.9 * (len(times) - 1))],
                    }
                )
            nursery.cancel_scope.cancel()
    off = rows[0]["ttft_p50_s"]
    for row in rows:
        row["ttft_gain"] = off / row["ttft_p50_s"]
    return rows


# -- 3. replicas --------------------------------------------------------------------------------


def chat_body(text: str) -> bytes:
    import msgspec

    return msgspec.json.encode(
        {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 2}
    )


async def send(url: str, body: bytes) -> None:
    host, port = url.rsplit("/", 1)[1].split(":")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(head + body)
        buf = b""
        while chunk := await stream.receive_some(65536):
            buf += chunk
    if not buf.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(buf[:300].decode("latin-1"))


def peek(gw: Gateway, body: bytes, i: int) -> str:
    """What this replica's cache_aware policy would choose for ``body`` now (no side effects),
    with the routing key the API builds (the raw ``messages`` bytes: no gateway tokenizer)."""
    from lmgw.routing.policy import RouteContext

    ctx = RouteContext(MODEL, f"peek-{i}", text_key=body[body.find(b'"messages"') :])
    return gw.policies["pd"].peek(gw.registry.candidates(MODEL, "pd"), ctx).id  # type: ignore[attr-defined]


async def replicas(quick: bool, redis: Redis | None) -> list[dict[str, Any]]:
    from lmgw.config import ReplicasConfig, RoutingConfig

    if redis is None:
        return []
    rows = []
    system = "You are a careful assistant for the cache pool benchmark. " * 8
    n = 40 if quick else 100  # conversations, 3 turns each
    async with trio.open_nursery() as nursery:
        urls = []
        for _ in range(4):
            sim = SimWorker(WorkerOptions(role="pd", model=MODEL, speed=math.inf))
            urls.append(await nursery.start(serve_worker_inprocess, sim))
        workers = [WorkerConfig(url=u, role="pd", id=f"w{i}") for i, u in enumerate(urls)]
        for think_ms in (0, 5, 20):
            for shared in (True, False):
                prefix = f"bench-rep-{think_ms}-{int(shared)}"
                gws: list[tuple[Gateway, str, trio.CancelScope]] = []
                for _ in range(2):
                    cfg = GatewayConfig(
                        server=ServerConfig(port=0),
                        health=HealthConfig(interval_s=30),
                        routing=RoutingConfig(policy="cache_aware"),
                        models=[ModelConfig(name=MODEL)],
                        workers=workers,
                        replicas=ReplicasConfig(
                            redis_url=redis.url if shared else None, prefix=prefix
                        ),
                    )
                    gws.append(await run_gateway_plain(nursery, cfg))
                rng = random.Random(11)
                convs = [f"{system} User {c} asks about topic {rng.randrange(10**6)}."
                         for c in range(n)]  # fmt: skip
                turns = [(c, t) for c in range(n) for t in range(3)]
                turns.sort(key=lambda ct: (ct[0] // 8, ct[1], rng.random()))  # interleaved
                agree = total = 0
                for i, (c, t) in enumerate(turns):
                    text = convs[c] + " Assistant: ... User: and then?" * t
                    body = chat_body(text)
                    choices = {peek(gw, body, i) for gw, _u, _s in gws}
                    agree += len(choices) == 1
                    total += 1
                    await send(rng.choice(gws)[1], body)
                    await trio.sleep(think_ms / 1000)
                for _gw, _url, scope in gws:
                    scope.cancel()
                rows.append({"think_ms": think_ms, "shared": shared, "requests": total,
                             "agreement": agree / total})  # fmt: skip
        nursery.cancel_scope.cancel()
    return rows


async def run_gateway_plain(
    nursery: trio.Nursery, cfg: GatewayConfig
) -> tuple[Gateway, str, trio.CancelScope]:
    gw = Gateway(cfg)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        with scope:
            await gw.run(task_status=task_status)

    port = await nursery.start(run)
    return gw, f"http://127.0.0.1:{port}", scope


# -- main ---------------------------------------------------------------------------------------


def fmt_size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


async def main(args: argparse.Namespace) -> dict[str, Any]:
    redis = Redis()
    if not redis.start():
        print("redis-server not available: the Redis rows are skipped")
        redis.stop()
        redis = None  # type: ignore[assignment]
    try:
        tiers = await time_tiers(args.quick, redis)
        print("\n== tiers: median latency, GB/s, and speed relative to a memcpy of the same size")
        print(f"{'size':>8} {'op':>11} {'latency':>12} {'GB/s':>9} {'x memcpy':>9}")
        for r in tiers:
            print(f"{fmt_size(r['size']):>8} {r['op']:>11} {r['median_s'] * 1e6:>10.1f}us "
                  f"{r['gb_s']:>9.2f} {r['vs_memcpy']:>9.2f}")  # fmt: skip
        ec = await encoder_cache(args.quick, redis)
        print("\n== encoder cache: repeated images (e+pd, 10 ms per encoded image)")
        print(f"{'run':>14} {'E legs':>7} {'skipped':>8} {'TTFT p50':>10} {'p90':>9} {'gain':>6}")
        for r in ec:
            print(f"{r['run']:>14} {r['e_legs']:>7} {r['skip_rate']:>8.0%} "
                  f"{r['ttft_p50_s'] * 1e3:>8.1f}ms {r['ttft_p90_s'] * 1e3:>7.1f}ms "
                  f"{r['ttft_gain']:>5.2f}x")  # fmt: skip
        rep = await replicas(args.quick, redis)
        if rep:
            print("\n== two gateway replicas: same decision on the same request (target >= 99%)")
            print(f"{'think':>7} {'shared':>8} {'unshared':>9}")
            for think in sorted({r["think_ms"] for r in rep}):
                by = {r["shared"]: r["agreement"] for r in rep if r["think_ms"] == think}
                print(f"{think:>5}ms {by[True]:>8.1%} {by[False]:>9.1%}")
    finally:
        if redis is not None:
            redis.stop()
    return {"tiers": tiers, "encoder_cache": ec, "replicas": rep}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    ns = parser.parse_args()
    out = trio.run(main, ns)
    meta = {"python": platform.python_version(), "cpus": os.cpu_count(), "quick": ns.quick,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "inf": math.inf > 0}  # fmt: skip
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps({"benchmark": "cachepool", "meta": meta, **out}, indent=2))
    print(f"\nwrote {ns.out}")
