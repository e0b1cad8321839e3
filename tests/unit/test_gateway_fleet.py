"""The gateway's fleet operations that discovery backends and the admin API build on."""

from __future__ import annotations

import pytest
import trio

from lmgw.config import GatewayConfig, WorkerConfig
from lmgw.gateway import Gateway
from lmgw.workers.registry import Registry
from lmgw.workers.worker import WorkerState


def wc(port: int, role: str = "pd") -> WorkerConfig:
    return WorkerConfig(url=f"http://127.0.0.1:{port}", role=role, id=f"w{port}")


def states(gw: Gateway) -> dict[str, str]:
    return {w.id: w.state.value for w in gw.registry}


def test_sync_adds_drains_and_removes_only_its_own_workers() -> None:
    gw = Gateway(GatewayConfig(workers=[wc(1)]))
    assert gw.sync_workers("redis", [wc(2), wc(3)]) == (2, 0)
    assert set(states(gw)) == {"w1", "w2", "w3"}
    assert gw.source_of("w2") == "redis" and gw.source_of("w1") == "static"
    w3 = gw.registry.get("w3")
    Registry.acquire(w3)  # a request in flight on w3
    assert gw.sync_workers("redis", [wc(2)]) == (0, 1)
    assert states(gw)["w3"] == "draining"  # not removed while busy
    assert gw.sync_workers("file", []) == (0, 0)  # another source: nothing of redis's touched
    Registry.release(w3)
    gw.sweep_retired()
    assert set(states(gw)) == {"w1", "w2"}
    assert gw.sync_workers("redis", [wc(1)]) == (0, 1)  # w1 is static: never taken over
    assert set(states(gw)) == {"w1"} and gw.source_of("w1") == "static"


def test_drain_unknown_worker_is_a_key_error() -> None:
    gw = Gateway(GatewayConfig())
    with pytest.raises(KeyError):
        gw.drain_worker("nope")


async def test_retire_waits_for_in_flight_then_removes() -> None:
    gw = Gateway(GatewayConfig(workers=[wc(1)]))
    w = gw.registry.get("w1")
    Registry.acquire(w)

    async def finish_later() -> None:
        await trio.sleep(0.2)
        Registry.release(w)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish_later)
        with trio.fail_after(3):
            await gw.retire_worker("w1", grace_s=2.0)
    assert len(gw.registry) == 0 and w.state is WorkerState.GONE
