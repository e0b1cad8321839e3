"""The cache pool's rules on local tiers (the model test checks the LRU/promotion/demotion
interplay; these check the rest): typed values, metadata, TTL, write-back, refusals, metrics,
and the pool a ``[cache]`` section builds."""

from __future__ import annotations

import numpy as np
import pytest

from lmgw.cache import CacheConfig, CachePool, MemoryTier, build_pool
from lmgw.cache.metrics import CacheMetrics
from lmgw.config import ConfigError, loads_config
from lmgw.metrics import Metrics


async def test_values_are_typed_and_carry_their_metadata() -> None:
    clock = [100.0]
    pool = CachePool([MemoryTier(1 << 20)], producer="gw", role="gateway", clock=lambda: clock[0])
    data = bytearray(b"abc")
    assert await pool.put("b", data)
    data[0] = ord("X")  # a bytearray is copied: the entry keeps what was put
    assert await pool.get("b") == b"abc"
    array = np.arange(6, dtype=np.int16).reshape(2, 3)
    assert await pool.put("a", array, producer="enc-7", role="e")
    entry = await pool.get_entry("a")
    assert entry is not None and entry.tier == "memory"
    assert np.array_equal(entry.value, array) and not entry.value.flags.writeable
    meta = entry.meta
    assert (meta.producer, meta.role, meta.size, meta.created, meta.hits) == (
        "enc-7",
        "e",
        12,
        100.0,
        1,
    )
    assert (await pool.get_entry("b")).meta.producer == "gw"  # type: ignore[union-attr]
    with pytest.raises(TypeError, match="bytes or numpy arrays"):
        await pool.put("s", "text")  # type: ignore[arg-type]
    assert await pool.get("missing", "default") == "default"


async def test_ttl_expires_entries_and_a_per_put_ttl_overrides_it() -> None:
    clock = [0.0]
    memory = MemoryTier(1 << 20)
    pool = CachePool([memory], ttl_s=10.0, clock=lambda: clock[0])
    await pool.put("short", b"1", ttl_s=1.0)
    await pool.put("default", b"2")
    await pool.put("forever", b"3", ttl_s=0)
    clock[0] = 5.0
    assert await pool.get_many(["short", "default", "forever"]) == {
        "default": b"2",
        "forever": b"3",
    }
    clock[0] = 1e9
    assert await pool.contains("default") is False and await pool.get("forever") == b"3"
    assert memory.stats.expired == 2 and memory.usage()[1] == 1


async def test_write_back_puts_the_first_tier_only_and_drops_stale_copies_below() -> None:
    fast, slow = MemoryTier(1000), MemoryTier(1 << 20)
    fast.name, slow.name = "fast", "slow"
    pool = CachePool([fast, slow], write="back")
    await pool.put("k", b"old")
    assert fast.keys() == ["k"] and slow.keys() == []
    await pool.put("big", b"x" * 5000)  # too big for the first tier: the next one takes it
    assert slow.keys() == ["big"]
    await pool.put("k2", b"y" * 800)  # evicts k from fast: demoted into slow
    assert slow.keys() == ["big", "k"] and pool.demotions["slow"] == 1
    await pool.put("k", b"new")  # the stale copy in slow is deleted
    assert "k" not in slow.keys()  # noqa: SIM118 - a list, not a dict


async def test_values_no_tier_can_take_are_refused() -> None:
    pool = CachePool([MemoryTier(1000)], max_value_bytes=10_000)
    assert await pool.put("too-big-for-the-tier", b"x" * 2000) is False
    assert await pool.put("too-big-for-the-pool", b"x" * 20_000) is False
    assert pool.refused == 2 and await pool.get("too-big-for-the-tier") is None


async def test_metrics_export_tier_counts_and_latencies() -> None:
    metrics = Metrics()
    cm = CacheMetrics(metrics)
    assert "lmgw_cache_pool_hits_total{" not in metrics.render().decode()  # no pool: no samples
    pool = CachePool([MemoryTier(400)])
    cm.attach(pool)
    await pool.put("a", b"1" * 100)
    await pool.put("b", b"2" * 100)  # evicts a (budget 400, ~229 bytes charged each)
    assert await pool.get("b") and await pool.get("a") is None
    text = metrics.render().decode()
    for line in (
        'lmgw_cache_pool_hits_total{tier="memory"} 1',
        'lmgw_cache_pool_misses_total{tier="memory"} 1',
        'lmgw_cache_pool_evictions_total{tier="memory"} 1',
        'lmgw_cache_pool_entries{tier="memory"} 1',
        'lmgw_cache_pool_budget_bytes{tier="memory"} 400',
        'lmgw_cache_pool_transfer_bytes_total{tier="memory",direction="written"} 200',
        'lmgw_cache_pool_tier_up{tier="memory"} 1',
        'lmgw_cache_pool_operation_seconds_count{tier="memory",op="get"} 2',
        'lmgw_cache_pool_operation_seconds_count{tier="memory",op="put"} 2',
    ):
        assert line in text, line


def test_the_cache_section_builds_the_pool() -> None:
    assert build_pool(CacheConfig()) is None
    cfg = loads_config('[cache]\ntiers = ["Memory"]\nmemory_budget_bytes = 4096\nttl_s = 0\n')
    pool = build_pool(cfg.cache, producer="gw")
    assert pool is not None and [t.name for t in pool.tiers] == ["memory"]
    assert pool.tiers[0].budget_bytes == 4096 and pool.ttl_s == 0 and pool.producer == "gw"
    for text, path in [
        ('tiers = ["disk"]', "cache.tiers"),
        ('tiers = ["memory", "memory"]', "cache.tiers"),
        ('tiers = ["redis"]', "cache.redis_url"),
        ('redis_url = "redis://:secret@h:1/x"', "cache.redis_url"),
        ("chunk_bytes = 0", "cache.chunk_bytes"),
        ('shm_name = "a/b"', "cache.shm_name"),
        ('write = "around"', "cache.write"),
    ]:
        with pytest.raises(ConfigError) as info:
            loads_config(f"[cache]\n{text}\n")
        assert info.value.path == path, text
        assert "secret" not in str(info.value)


def test_tier_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        CachePool([MemoryTier(1), MemoryTier(2)])
