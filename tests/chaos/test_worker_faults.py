"""Worker faults under load: SIGKILL, SIGSTOP, a slow worker, an erroring worker, flapping
health. Every scenario also checks the gateway's own invariants (nothing left in flight, no
task, connection or fd leak, RSS steady)."""

from __future__ import annotations

import signal

import pytest
import trio
from chaos_support import (
    Answers,
    chaos_env,
    check_gateway_invariants,
    metric_sum,
    scrape_metrics,
    snapshot,
    states_of,
    wait_for,
)

from lmgw.workers.worker import WorkerState

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


async def test_kill_9_mid_stream_is_continued_elsewhere(answers: Answers) -> None:
    async with chaos_env(answers) as env:
        gw = env.gateway
        before = snapshot(gw)
        load = env.load()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run)
            await load.wait_streaming(gw, "w0", 20)
            on_worker = env.worker("w0").in_flight
            env.fleet.kill(0, signal.SIGKILL)
        metrics = await scrape_metrics(gw)
        continued = metric_sum(metrics, "lmgw_stream_migrations_total", outcome="continued")
        print(
            f"\nkill -9 with {on_worker} on the worker, {continued:g} continued: {load.summary()}"
        )
        load.check(min_correct=0.99)
        assert not env.fleet.members[0].alive
        assert continued >= 1  # the kill did break streams that had begun
        assert env.worker("w0").state is WorkerState.EJECTED
        print(await check_gateway_invariants(gw, before, env.seen))


async def test_kill_9_of_a_data_parallel_server_moves_its_ranks_streams(
    answers: Answers,
) -> None:
    """Two servers of two data-parallel ranks each: SIGKILL of one takes both its ranks down
    at once; their streams continue on the other server's ranks, both dead ranks are
    ejected, nothing is lost."""
    async with chaos_env(answers, workers=2, dp=2) as env:
        gw = env.gateway
        before = snapshot(gw)
        load = env.load()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run)
            await load.wait_streaming(gw, "w0#dp1", 10)
            env.fleet.kill(0, signal.SIGKILL)
        metrics = await scrape_metrics(gw)
        continued = metric_sum(metrics, "lmgw_stream_migrations_total", outcome="continued")
        print(f"\nkill -9 of a 2-rank server, {continued:g} continued: {load.summary()}")
        load.check(min_correct=0.99)
        assert continued >= 1
        for rank in ("w0#dp0", "w0#dp1"):
            assert env.worker(rank).state is WorkerState.EJECTED, rank
        for rank in ("w1#dp0", "w1#dp1"):
            assert env.worker(rank).state is WorkerState.HEALTHY, rank
        print(await check_gateway_invariants(gw, before, env.seen))


async def test_sigstop_worker_is_ejected_and_its_streams_move(answers: Answers) -> None:
    async with chaos_env(
        answers,
        health={"interval_s": 0.5, "timeout_s": 0.5, "failure_threshold": 2},
        upstream={"stream_stall_timeout_s": 1.0, "response_timeout_s": 3.0},
    ) as env:
        gw = env.gateway
        before = snapshot(gw)
        load = env.load()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load.run)
                await load.wait_streaming(gw, "w0", 20)
                env.fleet.kill(0, signal.SIGSTOP)
                stopped_at = trio.current_time()
                await wait_for(
                    lambda: env.worker("w0").state is WorkerState.EJECTED, "w0 ejected", 10
                )
            ejected = [t for t, s in states_of(env, "w0") if s is WorkerState.EJECTED]
            took = ejected[0] - stopped_at
            metrics = await scrape_metrics(gw)
            continued = metric_sum(metrics, "lmgw_stream_migrations_total", outcome="continued")
            print(
                f"\nSIGSTOP: ejected after {took:.2f} s, {continued:g} continued; {load.summary()}"
            )
            assert took <= 3.0
            load.check(min_correct=0.0)
            assert continued >= 1  # stalled streams moved on
            # while the worker is still stopped: nothing may hang on it
            print(await check_gateway_invariants(gw, before, env.seen))
        finally:
            env.fleet.kill(0, signal.SIGCONT)
        await wait_for(lambda: env.worker("w0").state is WorkerState.HEALTHY, "w0 back", 10)


async def test_slow_worker_gets_less_load(short_answers: Answers) -> None:
    async with chaos_env(short_answers, policy="least_load") as env:
        gw = env.gateway
        await env.set_faults(0, slow=10.0)
        before = snapshot(gw)
        load = env.load(per_client=3)
        await load.run()
        totals = {w.id: w.total_requests for w in gw.registry}
        print(f"\n10x slow w0, least_load: requests per worker {totals}; {load.summary()}")
        load.check(min_correct=1.0)
        assert totals["w0"] < min(v for k, v in totals.items() if k != "w0"), totals
        print(await check_gateway_invariants(gw, before, env.seen))


async def test_error_rate_worker(answers: Answers) -> None:
    async with chaos_env(answers) as env:
        gw = env.gateway
        await env.set_faults(0, error_rate=0.2)
        before = snapshot(gw)
        load = env.load()
        await load.run()
        totals = {w.id: w.total_requests for w in gw.registry}
        metrics = await scrape_metrics(gw)
        retries = metric_sum(metrics, "lmgw_retries_total")
        print(f"\n20% errors on w0: per worker {totals}, {retries:g} retries; {load.summary()}")
        load.check(min_correct=0.95)
        print(await check_gateway_invariants(gw, before, env.seen))


async def test_flapping_health_loses_nothing(answers: Answers) -> None:
    async with chaos_env(
        answers,
        health={"interval_s": 0.25, "timeout_s": 0.5, "failure_threshold": 1},
    ) as env:
        gw = env.gateway
        await env.set_faults(0, flap_health=True)
        before = snapshot(gw)
        load = env.load()
        await load.run()
        flips = [s for _, s in states_of(env, "w0")]
        print(f"\nflapping w0: {len(flips)} state changes; {load.summary()}")
        load.check(min_correct=1.0)
        assert flips.count(WorkerState.EJECTED) >= 2 and flips.count(WorkerState.HEALTHY) >= 2
        print(await check_gateway_invariants(gw, before, env.seen))
