"""The cache pool's Redis tier against a real ``redis-server``: binary-safe values, chunking,
TTL, sharing between pools (two gateways), and the outage path (killed Redis: the pool goes on
with its local tiers, says so in a metric and a log line, and uses Redis again once it is back).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from redis_support import RedisServer

from lmgw.cache import CachePool, MemoryTier
from lmgw.cache.metrics import CacheMetrics
from lmgw.cache.redis import RedisTier
from lmgw.metrics import Metrics
from lmgw.workers.discovery.resp import RedisConnection, RespErrorReply, parse_redis_url

CHUNK = 1000


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), password="s3cret")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"t-{request.node.name[:40]}"


def tier(server: RedisServer, prefix: str, **kw: Any) -> RedisTier:
    kw.setdefault("chunk_bytes", CHUNK)
    kw.setdefault("timeout_s", 2.0)
    return RedisTier(server.url, prefix=prefix, **kw)


async def raw(server: RedisServer, *args: Any) -> Any:
    conn = await RedisConnection.open(parse_redis_url(server.url), 2.0)
    try:
        return await conn.command(*args)
    finally:
        await conn.aclose()


async def keys(server: RedisServer, prefix: str) -> list[bytes]:
    return sorted(await raw(server, "KEYS", f"{prefix}:*"))


async def test_binary_values_and_arrays_round_trip_inline_and_chunked(
    redis_server: RedisServer, prefix: str
) -> None:
    pool = CachePool([tier(redis_server, prefix)], producer="enc-1", role="e")
    every_byte = bytes(range(256)) * 5 + b"\r\n$-1\r\n*2\r\n"  # RESP syntax inside the value
    values: dict[str, Any] = {
        "empty": b"",
        "small": every_byte[:100],
        "binary": every_byte,  # > CHUNK: chunked
        "big": np.random.default_rng(1).integers(0, 255, 10 * CHUNK + 7, dtype=np.uint8).tobytes(),
        "array": np.arange(12 * 7, dtype=np.float32).reshape(12, 7),
        "view": np.arange(4000, dtype=np.int64).reshape(40, 100)[::2, ::-3],  # strided
        "scalar": np.array(2.5),  # 0-d
    }
    for key, value in values.items():
        assert await pool.put(key, value)
    sizes = []
    for key, value in values.items():
        entry = await pool.get_entry(key)
        assert entry is not None and entry.tier == "redis", key
        if isinstance(value, np.ndarray):
            assert entry.value.dtype == value.dtype and entry.value.shape == value.shape
            assert np.array_equal(entry.value, value)
        else:
            assert entry.value == value and type(entry.value) is bytes
        assert (entry.meta.producer, entry.meta.role) == ("enc-1", "e")
        sizes.append(entry.meta.size)
    stored = await keys(redis_server, prefix)
    chunked = [-(-n // CHUNK) for n in sizes if n > CHUNK]
    assert len(chunked) >= 3 and len(stored) == len(values) + sum(chunked)
    await pool.aclose()


async def test_chunk_layout_overwrite_and_delete_leave_no_orphans(
    redis_server: RedisServer, prefix: str
) -> None:
    t = tier(redis_server, prefix)
    pool = CachePool([t])
    await pool.put("k", b"x" * (3 * CHUNK + 1))  # 4 chunks
    assert len(await keys(redis_server, prefix)) == 1 + 4
    await pool.put("k", b"y" * (2 * CHUNK))  # 2 chunks of a new version; the old 4 go
    assert len(await keys(redis_server, prefix)) == 1 + 2
    assert await pool.get("k") == b"y" * (2 * CHUNK)
    await pool.put("k", b"small")  # inline now
    assert await keys(redis_server, prefix) == [t.head_key("k").encode()]
    assert await pool.get("k") == b"small"
    await pool.put("k", b"z" * (CHUNK + 1))
    assert await pool.delete("k") is True
    assert await keys(redis_server, prefix) == []
    assert await pool.delete("k") is False
    assert await pool.get("k") is None
    await pool.aclose()


async def test_a_missing_chunk_or_a_foreign_value_is_a_miss(
    redis_server: RedisServer, prefix: str
) -> None:
    t = tier(redis_server, prefix)
    pool = CachePool([t])
    await pool.put("k", b"q" * (2 * CHUNK + 5))
    chunk = [k for k in await keys(redis_server, prefix) if k.endswith(b":1")]
    await raw(redis_server, "DEL", chunk[0])
    assert await pool.get("k") is None
    await raw(redis_server, "SET", t.head_key("other"), b"not ours")
    assert await pool.get("other") is None
    await raw(redis_server, "SET", t.head_key("short"), b"LGC1")
    assert await pool.get("short") is None
    assert t.stats.errors == 0  # misses, not errors
    await pool.aclose()


async def test_ttl_is_set_on_every_key_and_entries_expire(
    redis_server: RedisServer, prefix: str
) -> None:
    pool = CachePool([tier(redis_server, prefix)], ttl_s=30.0)
    await pool.put("k", b"v" * (2 * CHUNK + 1))
    for key in await keys(redis_server, prefix):
        ttl = await raw(redis_server, "PTTL", key)
        assert 0 < ttl <= 30_000
    await pool.put("short", b"v", ttl_s=0.05)
    with trio.fail_after(5):
        while await pool.get("short") is not None:
            await trio.sleep(0.02)
    await pool.put("forever", b"v", ttl_s=0)
    assert await raw(redis_server, "PTTL", (await keys(redis_server, prefix))[0]) == -1
    await pool.aclose()


async def test_get_many_is_pipelined_over_inline_and_chunked_values(
    redis_server: RedisServer, prefix: str
) -> None:
    pool = CachePool([tier(redis_server, prefix)])
    want = {f"k{i}": bytes([i]) * (i * 400) for i in range(8)}  # up to 2800 bytes: some chunked
    for k, v in want.items():
        await pool.put(k, v)
    got = await pool.get_many([*want, "absent", "k3"])
    assert got == want
    await pool.aclose()


async def test_two_pools_share_entries_and_promote_into_memory(
    redis_server: RedisServer, prefix: str
) -> None:
    """Two gateways: what one puts, the other finds in Redis and keeps in its memory tier."""
    a = CachePool([MemoryTier(1 << 20), tier(redis_server, prefix)], producer="gw-a")
    b = CachePool([MemoryTier(1 << 20), tier(redis_server, prefix)], producer="gw-b")
    emb = np.linspace(0, 1, 3 * CHUNK, dtype=np.float32)
    assert await a.put("ec:m:abc", emb, role="e")
    first = await b.get_entry("ec:m:abc")
    assert first is not None and first.tier == "redis" and first.meta.producer == "gw-a"
    assert np.array_equal(first.value, emb)
    again = await b.get_entry("ec:m:abc")
    assert again is not None and again.tier == "memory"
    assert b.promotions["memory"] == 1 and b.hits == {"memory": 1, "redis": 1}
    assert await b.contains("ec:m:abc") and await a.delete("ec:m:abc")
    assert await b.get("ec:m:abc") is not None  # b's memory copy lives until evicted
    await a.aclose()
    await b.aclose()


async def test_demotion_from_memory_into_redis_in_write_back_mode(
    redis_server: RedisServer, prefix: str
) -> None:
    memory = MemoryTier(3000)
    pool = CachePool([memory, tier(redis_server, prefix)], write="back")
    for i in range(4):
        await pool.put(f"k{i}", bytes([i]) * 1000)
    assert memory.keys() == ["k2", "k3"]
    assert pool.demotions["redis"] == 2
    assert len(await keys(redis_server, prefix)) == 2  # k0, k1 (each 1 head, inline)
    assert await pool.get("k0") == bytes([0]) * 1000
    await pool.aclose()


async def test_many_tasks_share_a_few_connections(redis_server: RedisServer, prefix: str) -> None:
    t = tier(redis_server, prefix, max_connections=3)
    pool = CachePool([t])
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        value = np.full(50 + i * 37, i, dtype=np.int32)
        await pool.put(f"k{i}", value)
        results[i] = await pool.get(f"k{i}")

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(one, i)
    for i, value in results.items():
        assert np.array_equal(value, np.full(50 + i * 37, i, dtype=np.int32))
    assert len(results) == 40 and t.statistics()["connections"] <= 3
    await pool.aclose()


async def test_pipeline_returns_error_replies_in_place(redis_server: RedisServer) -> None:
    conn = await RedisConnection.open(parse_redis_url(redis_server.url), 2.0)
    replies = await conn.pipeline([("SET", "pl:a", b"1"), ("INCR", "pl:a", "x"), ("GET", "pl:a")])
    assert replies[0] == "OK" and isinstance(replies[1], RespErrorReply) and replies[2] == b"1"
    big = bytes(range(256)) * 1024  # a big argument goes from its own buffer
    assert await conn.pipeline([("SET", "pl:b", memoryview(big)), ("GET", "pl:b")]) == ["OK", big]
    await conn.command("DEL", "pl:a", "pl:b")
    await conn.aclose()


async def test_redis_down_the_pool_degrades_to_local_tiers_and_comes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    metrics = Metrics()
    cache_metrics = CacheMetrics(metrics)
    redis = RedisTier(server.url, prefix="down", timeout_s=0.5, chunk_bytes=CHUNK)
    pool = CachePool([MemoryTier(1 << 20), redis])
    cache_metrics.attach(pool)
    caplog.set_level(logging.INFO, logger="lmgw.cache")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            assert await pool.put("before", b"1")
            server.stop()
            # requests keep flowing: puts land in memory, gets answer from memory
            for i in range(20):
                assert await pool.put(f"during{i}", b"2")
                assert await pool.get(f"during{i}") == b"2"
            assert await pool.get("before") == b"1"
            assert not redis.up and redis.stats.failures == 1
            text = metrics.render().decode()
            assert 'lmgw_cache_pool_tier_up{tier="redis"} 0' in text
            assert 'lmgw_cache_pool_tier_failures_total{tier="redis"} 1' in text
            down = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(down) == 1, "logged once, not per operation"
            server.start()
            with trio.fail_after(15):
                while not redis.up:
                    await trio.sleep(0.05)
            assert any("answers again" in r.getMessage() for r in caplog.records)
            assert await pool.put("after", b"3")
            assert await raw(server, "EXISTS", redis.head_key("after")) == 1
            assert 'lmgw_cache_pool_tier_up{tier="redis"} 1' in metrics.render().decode()
            nursery.cancel_scope.cancel()
    finally:
        await pool.aclose()
        server.stop()


async def test_redis_down_from_the_start_and_retried_without_a_supervisor(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path)  # not started
    redis = RedisTier(server.url, prefix="never", timeout_s=0.5)
    pool = CachePool([MemoryTier(1 << 20), redis])
    assert await pool.put("k", b"v")  # the memory tier took it
    assert not redis.up
    assert await pool.get("k") == b"v"
    server.start()
    try:
        redis._retry_at = 0.0  # the backoff has passed: the next operation tries again
        assert await pool.put("k2", b"v2")
        assert redis.up
        assert await raw(server, "EXISTS", redis.head_key("k2")) == 1
    finally:
        await pool.aclose()
        server.stop()
