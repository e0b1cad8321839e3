"""Fleet changes under load: the discovery Redis restarted, a worker retired (drained, then
removed). Nothing may be lost, and the gateway's own invariants hold afterwards."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import pytest
import trio
from chaos_support import (
    Answers,
    chaos_env,
    check_gateway_invariants,
    redis_server,
    snapshot,
)

from lmgw.config import DiscoveryConfig, WorkerConfig
from lmgw.simulators import Fleet
from lmgw.workers.discovery.redis import entry_key, register
from lmgw.workers.discovery.resp import RedisConnection, parse_redis_url
from lmgw.workers.worker import WorkerState

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

PREFIX = "chaos"
TTL_S = 2.0
GRACE_S = 3.0


async def test_redis_restart_keeps_the_fleet(
    answers: Answers, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "lmgw.workers.discovery")
    with redis_server(tmp_path) as redis:

        async def register_all(fleet: Fleet, nursery: trio.Nursery) -> None:
            for i, url in enumerate(fleet.urls()):
                wc = WorkerConfig(url=url, role="pd", id=f"w{i}")
                await nursery.start(partial(register, redis.url, wc, prefix=PREFIX, ttl_s=TTL_S))

        discovery = DiscoveryConfig(
            redis_url=redis.url,
            redis_prefix=PREFIX,
            redis_interval_s=0.2,
            redis_timeout_s=0.5,
            redis_reconnect_grace_s=GRACE_S,
        )
        async with chaos_env(
            answers, static=False, before_gateway=register_all, discovery=discovery
        ) as env:
            gw = env.gateway
            assert {gw.source_of(w.id) for w in gw.registry} == {"redis"}
            before = snapshot(gw)
            load = env.load()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load.run)
                await load.wait_streaming(gw, "w0", 20)
                redis.stop()  # everything in it is lost: no persistence
                await trio.sleep(0.5)  # a few failed polls and refreshes
                await trio.to_thread.run_sync(redis.start)
                restarted = trio.current_time()
            # past the reconnection grace: from here on only what Redis holds counts
            await trio.sleep_until(restarted + GRACE_S + 3 * 0.2)
            conn = await RedisConnection.open(parse_redis_url(redis.url), 2.0)
            try:
                keys = [await conn.command("EXISTS", entry_key(PREFIX, f"w{i}")) for i in range(4)]
            finally:
                await conn.aclose()
            fleet = {w.id: w.state for w in gw.registry}
            left = [(wid, s) for _, wid, s in env.changes if s is not WorkerState.HEALTHY]
            print(f"\nRedis restarted under load: fleet {fleet}; {load.summary()}")
            load.check(min_correct=1.0)
            assert "reachable again" in caplog.text  # the gateway did see the outage end
            assert keys == [1, 1, 1, 1]  # written back by the registrations
            assert fleet == {f"w{i}": WorkerState.HEALTHY for i in range(4)}
            assert left == []  # no worker drained or left at any time
            print(await check_gateway_invariants(gw, before, env.seen))


async def test_worker_retired_under_load(answers: Answers) -> None:
    async with chaos_env(answers) as env:
        gw = env.gateway
        before = snapshot(gw)
        w0 = env.worker("w0")
        load = env.load()
        drained: dict[str, int] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run)
            await load.wait_streaming(gw, "w0", 20)
            drained.update(in_flight=w0.in_flight, total=w0.total_requests)
            # no checkpoint between reading the counts and the drain inside retire_worker
            await gw.retire_worker("w0", grace_s=10.0)
            drained["left_in_flight"] = w0.in_flight
        sim = await env.sim_call(0, "GET", "/sim/stats")
        print(f"\nretired w0 with {drained}; it served {sim['requests_total']}; {load.summary()}")
        load.check(min_correct=1.0)
        assert drained["in_flight"] > 0 and drained["left_in_flight"] == 0  # finished, not cut
        assert w0.state is WorkerState.GONE and gw.registry.get("w0") is None
        assert w0.total_requests == drained["total"]  # nothing new went there ...
        assert sim["requests_total"] == drained["total"]  # ... as the worker itself counts
        assert sim["in_flight"] == 0
        print(await check_gateway_invariants(gw, before, env.seen))
