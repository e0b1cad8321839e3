"""The simulators' hand-offs through the cache pool (``handoff="pool"``): encoder outputs E -> P
and KV blocks P -> D go through shared memory or Redis instead of the side channel, verified
byte for byte by the receiver; the gateway, sharing the pool, skips E for an item whose output
is there. Every answer must equal a merged worker's.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from gateway_support import MODEL, http_request
from redis_support import RedisServer

from lmgw.cache import CacheConfig, CachePool
from lmgw.cache.encoder import encoder_key
from lmgw.cache.shm import ShmTier
from lmgw.config import GatewayConfig, HealthConfig, ModelConfig, ServerConfig, WorkerConfig
from lmgw.gateway import Gateway

PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8IWfDwMDAx"
    "MDAwMDAAAAOTgEmR2hJIgAAAABJRU5ErkJggg=="
)
TEXT = [{"role": "user", "content": "Tell me about shared caches, " * 8}]


def with_image(text: str) -> list[dict[str, Any]]:
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": PNG}}]
    return [{"role": "user", "content": parts}]


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = f"lmgwtest-{uuid.uuid4().hex[:12]}"
    yield name
    shutil.rmtree(os.path.join("/dev/shm", name), ignore_errors=True)


async def chat(url: str, messages: list[dict[str, Any]], stream: bool = False) -> str:
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "seed": 3, "stream": stream}
    with trio.fail_after(15):
        r = await http_request(url, "POST", "/v1/chat/completions", body)
    assert r.status == 200, r.body
    if stream:
        return "".join(
            e["choices"][0]["delta"].get("content") or ""
            for e in r.events()
            if e != "[DONE]" and e["choices"]
        )
    return r.json()["choices"][0]["message"]["content"]


async def start_gateway(
    nursery: trio.Nursery, flow: str, dialect: str, sims: list, cache: CacheConfig
) -> tuple[Gateway, str]:
    workers = [
        WorkerConfig(
            url=s.url,
            role=s.sim.options.role,
            bootstrap_port=int(s.url.rsplit(":", 1)[1]) if s.sim.options.role == "p" else None,
        )
        for s in sims
    ]
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        models=[ModelConfig(name=MODEL, flow=flow, dialect=dialect)],
        workers=workers,
        cache=cache,
    )
    gw = Gateway(cfg)
    port = await nursery.start(gw.run)
    return gw, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("dialect", ["vllm-epd", "sglang-bootstrap"])
async def test_e_p_d_hand_off_through_shared_memory(
    nursery: trio.Nursery, sim_worker, shm_name: str, dialect: str
) -> None:
    pool = {"handoff": "pool", "pool_tiers": ("shm",), "pool_shm_name": shm_name}
    reference = await sim_worker(role="pd")
    flow = "e+p+d" if dialect == "vllm-epd" else "p/d"
    roles = ["e", "p", "d"] if flow == "e+p+d" else ["p", "d"]
    sims = {role: await sim_worker(role=role, **pool) for role in roles}
    _gw, url = await start_gateway(
        nursery, flow, dialect, list(sims.values()), CacheConfig(tiers=["shm"], shm_name=shm_name)
    )
    prompts = [TEXT, with_image("What is in the image?")] if "e" in sims else [TEXT]
    for messages in prompts:
        expected = await chat(reference.url, messages)
        for stream in (False, True):
            assert await chat(url, messages, stream) == expected
    p = (await sims["p"].stats())["handoff"]
    d = (await sims["d"].stats())["handoff"]
    n = 2 * len(prompts)
    assert p["handoff_mode"] == "pool" and p["pool_kv_published"] == n
    assert d["pool_kv_taken"] == n and d["kv_blocks_verified"] > 0 and d["kv_verify_failures"] == 0
    assert p["kv_entries_held"] == 0 and p["kv_blocks_served"] == 0  # no side channel
    if "e" in sims:
        e = (await sims["e"].stats())["handoff"]
        assert e["pool_embeddings_stored"] == 1  # the repeat skipped E: the output was there
        assert p["pool_embeddings_found"] == 2 and p["pool_embeddings_missing"] == 0
        assert (await sims["e"].stats())["requests_total"] == 1
    # nothing of the KV is left in the pool: D took it
    left = [f for f in os.listdir(f"/dev/shm/{shm_name}") if f.startswith("k-")]
    assert len(left) == (1 if "e" in sims else 0)  # the embedding stays cached


async def test_a_corrupted_or_missing_hand_off_fails_the_request(
    nursery: trio.Nursery, sim_worker, shm_name: str
) -> None:
    pool = {"handoff": "pool", "pool_tiers": ("shm",), "pool_shm_name": shm_name}
    encoder = await sim_worker(role="e", **pool)
    merged = await sim_worker(role="pd", **pool)
    cache = CacheConfig(tiers=["shm"], shm_name=shm_name)
    _gw, url = await start_gateway(nursery, "e+pd", "vllm-epd", [encoder, merged], cache)
    assert await chat(url, with_image("first"))
    # overwrite the stored embedding with wrong bytes: the merged worker must refuse it
    tamper = CachePool([ShmTier(1 << 20, shm_name)])
    key = encoder_key(MODEL, await _item_key())  # the gateway pins the item by its hash
    assert await tamper.contains(key)
    assert await tamper.put(key, b"\0" * 64)
    body = {"model": MODEL, "messages": with_image("again"), "max_tokens": 4}
    r = await http_request(url, "POST", "/v1/chat/completions", body)
    assert r.status >= 500 and "corrupted" in r.body.decode()
    await tamper.aclose()


async def _item_key() -> str:
    from lmgw.multimodal import preprocess
    from lmgw.multimodal.limits import MediaLimits

    (item,) = await preprocess({"messages": with_image("x")}, MediaLimits(), model_id=MODEL)
    return item.hash


async def test_kv_that_never_reaches_the_pool_is_a_clear_error(
    nursery: trio.Nursery, sim_worker, shm_name: str
) -> None:
    prefill = await sim_worker(role="p", handoff="pool", pool_shm_name=shm_name)
    decode = await sim_worker(
        role="d", handoff="pool", pool_shm_name=shm_name + "-other", kv_fetch_timeout_s=0.2
    )
    _gw, url = await start_gateway(nursery, "p/d", "vllm-nixl", [prefill, decode], CacheConfig())
    body = {"model": MODEL, "messages": TEXT, "max_tokens": 4}
    r = await http_request(url, "POST", "/v1/chat/completions", body)
    assert r.status >= 500 and "not in the cache pool" in r.body.decode()
    shutil.rmtree(f"/dev/shm/{shm_name}-other", ignore_errors=True)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_hand_offs_through_redis_and_the_gateway_skips_e(
    nursery: trio.Nursery, sim_worker, redis_server: RedisServer, tmp_path: Path
) -> None:
    pool = {"handoff": "pool", "pool_tiers": ("redis",), "pool_redis_url": redis_server.url}
    reference = await sim_worker(role="pd")
    sims = [await sim_worker(role=r, **pool) for r in ("e", "p", "d")]
    cache = CacheConfig(tiers=["memory", "redis"], redis_url=redis_server.url)
    _gw, url = await start_gateway(nursery, "e+p+d", "vllm-epd", sims, cache)
    messages = with_image("Describe the picture.")
    expected = await chat(reference.url, messages)
    assert await chat(url, messages) == expected
    # a second gateway (a restart, or a replica) finds the encoder output in Redis
    _gw2, url2 = await start_gateway(nursery, "e+p+d", "vllm-epd", sims, cache)
    assert await chat(url2, messages) == expected
    assert (await sims[0].stats())["requests_total"] == 1
    d = (await sims[2].stats())["handoff"]
    assert d["pool_kv_taken"] == 2 and d["kv_blocks_verified"] > 0
