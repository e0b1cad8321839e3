"""The gateway's encoder-output cache on the cache pool, with simulated E and PD workers and a
real Redis: a repeated media item skips the E stage, and still does after the gateway restarts
(a fresh gateway process would find the same Redis); a gateway without the pool encodes again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from gateway_support import MODEL, http_request, metric_value
from redis_support import RedisServer

from lmgw.cache import CacheConfig
from lmgw.config import GatewayConfig, HealthConfig, ModelConfig, ServerConfig, WorkerConfig
from lmgw.gateway import Gateway
from lmgw.workers.discovery.resp import RedisConnection, parse_redis_url

PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8IWfDwMDAx"
    "MDAwMDAAAAOTgEmR2hJIgAAAABJRU5ErkJggg=="
)


def body(text: str) -> dict[str, Any]:
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": PNG}}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Running:
    def __init__(self, gateway: Gateway, url: str, scope: trio.CancelScope) -> None:
        self.gateway, self.url, self.scope = gateway, url, scope

    async def chat(self, text: str) -> str:
        with trio.fail_after(15):
            r = await http_request(self.url, "POST", "/v1/chat/completions", body(text))
        assert r.status == 200, r.body
        return r.json()["choices"][0]["message"]["content"]

    async def skipped(self) -> float:
        r = await http_request(self.url, "GET", "/metrics")
        return metric_value(r.body.decode(), f'lmgw_encoder_cache_hits_total{{model="{MODEL}"}}')


async def start_gateway(
    nursery: trio.Nursery, workers: list[WorkerConfig], cache: CacheConfig
) -> Running:
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        models=[ModelConfig(name=MODEL, flow="e+pd", dialect="vllm-epd")],
        workers=workers,
        cache=cache,
    )
    gateway = Gateway(cfg)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        with scope:
            await gateway.run(task_status=task_status)

    port = await nursery.start(run)
    return Running(gateway, f"http://127.0.0.1:{port}", scope)


async def test_a_repeated_image_skips_e_across_a_gateway_restart(
    nursery: trio.Nursery, sim_worker, tmp_path: Path, redis_server: RedisServer
) -> None:
    ec_dir = str(tmp_path / "ec")
    encoder = await sim_worker(role="e", ec_dir=ec_dir)
    merged = await sim_worker(role="pd", ec_dir=ec_dir)
    workers = [WorkerConfig(url=encoder.url, role="e"), WorkerConfig(url=merged.url, role="pd")]
    prefix = "restart"
    cache = CacheConfig(tiers=["memory", "redis"], redis_url=redis_server.url, redis_prefix=prefix)

    async def encodes() -> int:
        return (await encoder.stats())["requests_total"]

    first = await start_gateway(nursery, workers, cache)
    answer = await first.chat("What is in the image?")
    assert await encodes() == 1
    assert await first.chat("Describe it again.")  # the same picture: no E leg
    assert await encodes() == 1 and await first.skipped() == 1
    # the gateway's note is in Redis, with the encoder as its producer and a TTL
    entry = await first.gateway.cache.get_entry(  # type: ignore[union-attr]
        next(iter(first.gateway.cache.tiers[0].keys()))  # type: ignore[union-attr]
    )
    assert (
        entry is not None and entry.meta.role == "e" and entry.meta.producer == encoder.url
    )  # the worker id
    first.scope.cancel()

    second = await start_gateway(nursery, workers, cache)  # a restarted gateway
    assert await second.chat("What is in the image?") == answer
    assert await encodes() == 1, "the E stage was skipped: Redis remembered the item"
    assert await second.skipped() == 1
    second.scope.cancel()

    plain = await start_gateway(nursery, workers, CacheConfig())  # no pool: encodes again
    assert await plain.chat("What is in the image?") == answer
    assert await encodes() == 2
    plain.scope.cancel()

    conn = await RedisConnection.open(parse_redis_url(redis_server.url), 2.0)
    keys = await conn.command("KEYS", f"{prefix}:cache:*")
    ttl = await conn.command("PTTL", keys[0])
    await conn.aclose()
    assert len(keys) == 1 and b"ec:" + MODEL.encode() in keys[0] and ttl > 0


async def test_redis_down_the_gateway_keeps_serving_media(
    nursery: trio.Nursery, sim_worker, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path)  # never started: Redis is down from the start
    ec_dir = str(tmp_path / "ec")
    encoder = await sim_worker(role="e", ec_dir=ec_dir)
    merged = await sim_worker(role="pd", ec_dir=ec_dir)
    workers = [WorkerConfig(url=encoder.url, role="e"), WorkerConfig(url=merged.url, role="pd")]
    cache = CacheConfig(tiers=["memory", "redis"], redis_url=server.url, redis_timeout_s=0.5)
    gw = await start_gateway(nursery, workers, cache)
    for i in range(3):
        assert await gw.chat(f"Question {i} about the image")
    assert (await encoder.stats())["requests_total"] == 1  # the memory tier held the note
    r = await http_request(gw.url, "GET", "/metrics")
    assert metric_value(r.body.decode(), 'lmgw_cache_pool_tier_up{tier="redis"}') == 0
    gw.scope.cancel()
