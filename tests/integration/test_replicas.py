"""Two gateway replicas in front of one simulated fleet, sharing routing hints and health
verdicts through a real Redis: a prompt gets the same cache-aware decision whichever replica
takes it, a worker one replica ejects is ejected on the other, and a replica that starts late
warms from the shared history. The control (replicas not sharing) disagrees.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from gateway_support import MODEL, http_request
from redis_support import RedisServer

from lmgw.config import (
    GatewayConfig,
    HealthConfig,
    ModelConfig,
    ReplicasConfig,
    RoutingConfig,
    ServerConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway
from lmgw.workers.worker import WorkerState


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Replica:
    def __init__(self, gateway: Gateway, url: str, scope: trio.CancelScope) -> None:
        self.gateway, self.url, self.scope = gateway, url, scope

    async def route(self, text: str) -> str:
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 2}
        with trio.fail_after(10):
            r = await http_request(self.url, "POST", "/v1/chat/completions", body)
        assert r.status == 200, r.body
        m = re.search(r"worker=([^;]+)", r.headers["x-lmgw-route"])
        assert m is not None
        return m.group(1)

    def stat(self, name: str) -> float:
        return self.gateway.policies["pd"].statistics()[name]


async def start_replica(
    nursery: trio.Nursery, urls: list[str], redis_url: str | None, prefix: str
) -> Replica:
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        routing=RoutingConfig(policy="cache_aware", route_header=True, cache_threshold=0.1),
        models=[ModelConfig(name=MODEL)],
        workers=[WorkerConfig(url=u, role="pd", id=f"w{i}") for i, u in enumerate(urls)],
        replicas=ReplicasConfig(redis_url=redis_url, prefix=prefix, flush_interval_s=0.001),
    )
    gateway = Gateway(cfg)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        with scope:
            await gateway.run(task_status=task_status)

    port = await nursery.start(run)
    return Replica(gateway, f"http://127.0.0.1:{port}", scope)


def conversation(rng: random.Random, i: int) -> str:
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "kappa"]) for _ in range(60))
    return f"Conversation {i}: {words}"


async def wait_for(condition: Any, what: str) -> None:
    with trio.fail_after(5):
        while not condition():
            await trio.sleep(0.005)


def _count(replica: Replica, direction: str) -> int:
    sync = replica.gateway.replicas
    return 0 if sync is None else sync.counts.get((direction, "hint"), 0)


async def settle(a: Replica, b: Replica, routed: int) -> None:
    """Wait until each replica applied every hint the other published (``routed`` so far)."""
    await wait_for(
        lambda: (
            _count(a, "published") + _count(b, "published") == routed
            and _count(a, "applied") == _count(b, "published")
            and _count(b, "applied") == _count(a, "published")
        ),
        "the replicas to exchange their hints",
    )


async def agreement(a: Replica, b: Replica, n: int, seed: int, shared: bool) -> float:
    """Each prompt goes to one replica, then (once a shared hint could arrive) to the other;
    between them, other traffic reaches one replica or the other (replicas never see the same
    requests, so their round-robin tie-breaks drift apart)."""
    rng = random.Random(seed)
    same = 0
    routed = _count(a, "published") + _count(b, "published")

    async def route(replica: Replica, text: str) -> str:
        nonlocal routed
        worker = await replica.route(text)
        routed += 1
        if shared:
            await settle(a, b, routed)
        return worker

    for i in range(n):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        if rng.random() < 0.5:
            await route(rng.choice((a, b)), f"unrelated {seed} {i} " * 30)
        text = conversation(rng, i)
        chosen = await route(first, text)
        same += await route(second, text + " and a follow-up question?") == chosen
    return same / n


async def test_two_replicas_route_alike_share_verdicts_and_a_late_one_warms(
    nursery: trio.Nursery, sim_worker, redis_server: RedisServer
) -> None:
    sims = [await sim_worker() for _ in range(4)]
    urls = [s.url for s in sims]
    a = await start_replica(nursery, urls, redis_server.url, "agree")
    b = await start_replica(nursery, urls, redis_server.url, "agree")
    assert await agreement(a, b, 16, seed=1, shared=True) == 1.0

    # a worker that stops answering: A ejects it on a refused connection; B hears of it
    await sims[3].stop()
    for i in range(8):  # round the fleet until A tries w3
        await a.route(f"fresh prompt {i} " * 20)
        if a.gateway.registry.get("w3").state is WorkerState.EJECTED:  # type: ignore[union-attr]
            break
    assert a.gateway.registry.get("w3").state is WorkerState.EJECTED  # type: ignore[union-attr]
    w3 = b.gateway.registry.get("w3")
    assert w3 is not None
    await wait_for(lambda: w3.state is WorkerState.EJECTED, "B ejects w3")
    assert "a replica saw" in w3.last_error

    # a third replica started now replays the history: it routes a known prompt like A did
    rng = random.Random(1)
    first = conversation(rng, 0)
    c = await start_replica(nursery, urls, redis_server.url, "agree")
    assert c.stat("hints_imported") > 0
    assert await c.route(first + " and again") == await a.route(first + " and once more")
    for r in (a, b, c):
        r.scope.cancel()


async def test_without_sharing_the_replicas_disagree(nursery: trio.Nursery, sim_worker) -> None:
    sims = [await sim_worker() for _ in range(4)]
    urls = [s.url for s in sims]
    a = await start_replica(nursery, urls, None, "unshared")
    b = await start_replica(nursery, urls, None, "unshared")
    assert a.gateway.replicas is None
    # B has never seen A's prompts: it routes each to its own least-loaded, round-robin choice
    assert await agreement(a, b, 16, seed=2, shared=False) < 0.75
    a.scope.cancel()
    b.scope.cancel()


async def test_replicas_share_stored_response_ids(
    nursery: trio.Nursery, sim_worker, redis_server: RedisServer
) -> None:
    """A Responses API response created through one replica is continued through the other:
    its id -> worker record travels through Redis."""
    sims = [await sim_worker() for _ in range(3)]
    urls = [s.url for s in sims]
    a = await start_replica(nursery, urls, redis_server.url, "responses")
    b = await start_replica(nursery, urls, redis_server.url, "responses")
    with trio.fail_after(10):
        r = await http_request(a.url, "POST", "/v1/responses", {"model": MODEL, "input": "hi"})
    assert r.status == 200, r.body
    rid = r.json()["id"]
    await wait_for(lambda: b.gateway.app.passthru.affinity.lookup(rid) is not None, "the record")
    holder = [i for i, s in enumerate(sims) if rid in s.sim.response_store.entries]
    for _ in range(3):  # b's own round robin would miss the holder twice in three
        body = {"model": MODEL, "input": "more", "previous_response_id": rid}
        with trio.fail_after(10):
            r = await http_request(b.url, "POST", "/v1/responses", body)
        assert r.status == 200, r.body
        assert [
            i for i, s in enumerate(sims) if r.json()["id"] in s.sim.response_store.entries
        ] == holder
