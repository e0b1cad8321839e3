"""The cache pool's shared-memory tier: entries other processes read as zero-copy views, warm
segments reused only when no reader maps them, stale links refused, and cleanup after a
producer killed with SIGKILL. Every test uses its own tier name in the real /dev/shm.
"""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from lmgw.cache import CachePool, MemoryTier
from lmgw.cache.shm import PAGE, ShmTier
from lmgw.transport import shm as transport_shm

pytestmark = pytest.mark.skipif(
    not os.path.isdir(transport_shm.DEFAULT_DIR), reason="needs /dev/shm"
)


@pytest.fixture
def name() -> Iterator[str]:
    name = f"lmgwtest-{uuid.uuid4().hex[:12]}"
    yield name
    shutil.rmtree(os.path.join(transport_shm.DEFAULT_DIR, name), ignore_errors=True)


def files(tier: ShmTier) -> list[str]:
    return sorted(os.listdir(tier.path))


def base_of(array: np.ndarray) -> object:
    obj: object = array
    while isinstance(obj, np.ndarray) and obj.base is not None:
        obj = obj.base
    if isinstance(obj, memoryview):
        obj = obj.obj
    return obj


def child(code: str, *args: str) -> subprocess.Popen[str]:
    """A Python child that reads commands from stdin and answers on stdout."""
    return subprocess.Popen(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


PRODUCER = """
    import sys, numpy as np, trio
    from lmgw.cache.shm import ShmTier
    from lmgw.cache import CachePool
    tier = ShmTier(64 << 20, sys.argv[1])
    pool = CachePool([tier], producer="child", role="e")
    async def main():
        await pool.put("emb", np.arange(1 << 20, dtype=np.float32))
        await pool.put("blob", b"hello from the child")
    trio.run(main)
    print("ready", flush=True)
    sys.stdin.readline()  # wait to be killed
"""


async def test_another_process_reads_zero_copy_views_and_a_killed_producer_is_swept(
    name: str,
) -> None:
    proc = child(PRODUCER, name)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", (
            proc.stderr.read() if proc.stderr else ""
        )
        tier = ShmTier(1 << 20, name)  # this process owns nothing
        pool = CachePool([tier])
        entry = await pool.get_entry("emb")
        assert entry is not None and entry.meta.producer == "child" and entry.meta.role == "e"
        view = entry.value
        assert isinstance(base_of(view), mmap.mmap), "a view of the segment, not a copy"
        assert not view.flags.writeable
        assert np.array_equal(view, np.arange(1 << 20, dtype=np.float32))
        assert entry.meta.hits == 1
        assert await pool.get("blob") == b"hello from the child"
        assert tier.usage() == (0, 0)
        proc.kill()
        proc.wait(10)
        assert tier.sweep() == 2 + 2  # both segments and both links
        assert await pool.get("emb") is None and await pool.get("blob") is None
        assert view[12345] == 12345.0  # the reader's mapping outlives the unlink
        assert files(tier) == []
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)


async def test_warm_segments_are_reused_only_when_no_reader_maps_them(name: str) -> None:
    tier = ShmTier(3 * PAGE, name, idle_bytes=4 * PAGE)
    pool = CachePool([tier])
    await pool.put("a", np.ones(PAGE // 8, dtype=np.float64))  # one data page
    view = await pool.get("a")
    await pool.put("b", np.ones(PAGE // 8, dtype=np.float64))  # evicts a: mapped, so unlinked
    assert tier.statistics()["idle_bytes"] == 0 and tier.stats.evictions == 1
    assert np.all(view == 1.0)
    del view
    await pool.put("c", np.zeros(PAGE // 8))  # evicts b: nobody maps it, so it stays warm
    assert tier.statistics()["idle_bytes"] == PAGE
    segments = [f for f in files(tier) if f.startswith("seg-")]
    await pool.put("d", np.full(PAGE // 8, 7.0))  # reuses b's segment (and evicts c: warm)
    assert [f for f in files(tier) if f.startswith("seg-")] == segments
    assert np.all(await pool.get("d") == 7.0)
    assert await pool.get("b") is None and await pool.get("a") is None
    await pool.aclose()
    assert files(tier) == []


async def test_a_stale_link_to_a_reused_segment_is_a_miss(name: str) -> None:
    tier = ShmTier(2 * PAGE, name, idle_bytes=PAGE)
    await tier.put("a", *_meta_value(b"A" * 100))
    link_a = os.readlink(tier._link(tier._own["a"].digest))
    await tier.delete("a")  # kept warm
    await tier.put("b", *_meta_value(b"B" * 100))  # the same segment, b's key digest
    assert os.readlink(tier._link(tier._own["b"].digest)) == link_a
    from lmgw.cache.shm import _digest

    os.symlink(link_a, tier._link(_digest("a")))  # a reader that resolved "a" before
    assert await tier.get("a", 0.0) is None
    got = await tier.get("b", 0.0)
    assert got is not None and got[1] == b"B" * 100
    tier.close()


def _meta_value(value: bytes) -> tuple:
    from lmgw.cache.values import KIND_BYTES, Meta

    return Meta(KIND_BYTES, len(value), 0.0), value, (KIND_BYTES, b"", value), False


async def test_reads_by_other_processes_give_an_entry_a_second_chance(name: str) -> None:
    owner = ShmTier(5 * PAGE, name, idle_bytes=0)  # two entries of two pages
    pool = CachePool([owner])
    other = CachePool([ShmTier(0, name)])  # another reader (same code path as a process)
    await pool.put("old", b"o" * 10)
    await pool.put("new", b"n" * 10)
    assert await other.get("old") == b"o" * 10  # read elsewhere: "old" is in use
    await pool.put("third", b"t" * 10)  # evicts: "old" gets a second chance, "new" goes
    assert list(owner._own) == ["old", "third"]
    await pool.aclose()


async def test_ttl_and_delete_and_crash_leftovers(name: str) -> None:
    clock = [1000.0]
    tier = ShmTier(1 << 20, name)
    pool = CachePool([tier], ttl_s=10.0, clock=lambda: clock[0])
    await pool.put("k", b"v")
    assert await pool.get("k") == b"v"
    clock[0] += 11
    assert await pool.get("k") is None and tier.stats.expired == 1 and tier.usage() == (0, 0)
    await pool.put("k", b"v")
    assert await pool.delete("k") and await pool.get("k") is None
    # a temporary link left by a process that died mid-put is swept
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    os.symlink("nowhere", os.path.join(tier.path, f"t-{dead.stdout.strip()}-0"))
    tier.sweep()
    assert [f for f in files(tier) if not f.startswith("seg-")] == []  # (one warm segment)
    await pool.aclose()
    assert files(tier) == []


async def test_promotion_from_shm_into_memory(name: str) -> None:
    producer = CachePool([ShmTier(1 << 20, name)])
    await producer.put("k", np.arange(10))
    memory = MemoryTier(1 << 20)
    reader = CachePool([memory, ShmTier(1 << 20, name)])
    first = await reader.get_entry("k")
    assert first is not None and first.tier == "shm"
    second = await reader.get_entry("k")
    assert second is not None and second.tier == "memory"
    assert second.value is first.value or np.shares_memory(second.value, first.value)
    assert reader.promotions == {"memory": 1, "shm": 0}
    await producer.aclose()
    await reader.aclose()
