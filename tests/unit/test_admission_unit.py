"""Admission control without sockets (named apart from tests/integration/test_admission.py:
the test folders are not packages, so basenames must differ): the cap, FIFO hand-over, the
queue's bounds, cancellation, Retry-After, the per-worker filter, and the new config keys."""

from __future__ import annotations

import argparse
import time

import pytest
import trio
import trio.testing

from lmgw.admission import Admission, Rejected, with_capacity
from lmgw.config import (
    ConfigError,
    LimitsConfig,
    add_serve_arguments,
    config_from_args,
    dump_config,
    load_config,
    loads_config,
)
from lmgw.metrics import Metrics
from lmgw.workers.worker import Worker


def sample(metrics: Metrics, prefix: str) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {prefix}")


def test_cap_off_admits_everything_and_counts() -> None:
    metrics = Metrics()
    adm = Admission(0, 0, 1.0, metrics)
    for _ in range(1000):
        assert adm.enter()
    assert adm.in_flight == 1000
    assert sample(metrics, "lmgw_requests_in_flight") == 1000
    for _ in range(1000):
        adm.leave(0.0)
    assert adm.in_flight == 0 and adm.queue_depth == 0


async def test_queue_full_rejects_at_once_with_retry_after() -> None:
    metrics = Metrics()
    adm = Admission(1, 0, 5.0, metrics)
    assert adm.enter()
    assert not adm.enter()
    with trio.fail_after(1):  # a full queue does not wait
        with pytest.raises(Rejected) as info:
            await adm.wait()
    exc = info.value
    assert (exc.status, exc.reason, exc.type) == (429, "queue_full", "RateLimitError")
    assert exc.retry_after >= 1
    assert sample(metrics, 'lmgw_admission_rejected_total{reason="queue_full"}') == 1
    assert adm.in_flight == 1 and adm.queue_depth == 0


async def test_queue_timeout_rejects_and_leaves_the_queue(autojump_clock: trio.abc.Clock) -> None:
    metrics = Metrics()
    adm = Admission(1, 3, 2.0, metrics)
    assert adm.enter()
    t0 = trio.current_time()
    with pytest.raises(Rejected) as info:
        await adm.wait()
    assert info.value.reason == "queue_timeout" and info.value.status == 429
    assert trio.current_time() - t0 == pytest.approx(2.0)
    assert adm.queue_depth == 0 and adm.in_flight == 1
    assert sample(metrics, 'lmgw_admission_rejected_total{reason="queue_timeout"}') == 1


async def test_slots_pass_to_waiters_in_fifo_order() -> None:
    adm = Admission(1, 10, 60.0)
    assert adm.enter()
    order: list[int] = []
    done = trio.Event()

    async def waiter(i: int) -> None:
        await adm.wait()
        order.append(i)
        adm.leave(0.0)
        if len(order) == 5:
            done.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(waiter, i)
                await trio.testing.wait_all_tasks_blocked()
            assert adm.queue_depth == 5
            assert not adm.enter()  # a newcomer does not overtake the queue
            adm.leave(0.0)  # the first slot: each waiter hands it to the next
            await done.wait()
    assert order == [0, 1, 2, 3, 4]
    assert adm.in_flight == 0 and adm.queue_depth == 0
    assert adm.enter()  # the slot is free again


async def test_cancelled_waiter_leaves_the_queue() -> None:
    adm = Admission(1, 10, 60.0)
    assert adm.enter()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def cancelled_waiter() -> None:
                with scope:
                    await adm.wait()
                    raise AssertionError("admitted while cancelled")

            nursery.start_soon(cancelled_waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert adm.queue_depth == 1
            scope.cancel()
    assert adm.queue_depth == 0 and adm.in_flight == 1
    adm.leave(0.0)
    assert adm.in_flight == 0


async def test_slot_handed_over_to_a_cancelled_waiter_is_passed_on() -> None:
    """The slot is set on a waiter in the same tick as its cancellation: it must not leak."""
    adm = Admission(1, 10, 60.0)
    assert adm.enter()
    admitted: list[str] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            first = trio.CancelScope()

            async def queued(name: str, scope: trio.CancelScope) -> None:
                with scope:
                    await adm.wait()
                    admitted.append(name)
                    await trio.sleep_forever()  # hold the slot until cancelled ...
                if name in admitted:
                    adm.leave(0.0)  # ... then give it back, as generate() does

            nursery.start_soon(queued, "a", first)
            await trio.testing.wait_all_tasks_blocked()
            second = trio.CancelScope()
            nursery.start_soon(queued, "b", second)
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()  # "a" is cancelled while queued, and in the same tick ...
            adm.leave(0.0)  # ... the slot is handed to it (it is still first in line)
            await trio.testing.wait_all_tasks_blocked()
            assert admitted == ["b"], admitted  # "a" passed the slot on to "b"
            assert adm.in_flight == 1 and adm.queue_depth == 0
            second.cancel()
    assert adm.in_flight == 0 and adm.queue_depth == 0


def test_retry_after_follows_the_mean_duration_within_bounds() -> None:
    adm = Admission(2, 10, 60.0)
    assert adm.retry_after() == 1  # nothing measured yet
    for _ in range(200):  # requests that took ~10 s each
        adm.enter()
        adm.leave(_ago(10.0))
    # 10 s each, 2 slots, this request next: ~5 s
    assert 4 <= adm.retry_after() <= 6
    for _ in range(200):
        adm.enter()
        adm.leave(_ago(1000.0))
    assert adm.retry_after() == 60  # capped
    assert Admission(0).retry_after() == 1


def _ago(seconds: float) -> float:
    """A request start ``seconds`` ago, on the clock Admission.leave reads."""
    return time.perf_counter() - seconds


def test_with_capacity_keeps_the_tuple_when_all_have_room() -> None:
    workers = tuple(Worker(f"w{i}", f"http://127.0.0.1:{9000 + i}", "pd") for i in range(3))
    assert with_capacity(workers, 2) is workers
    workers[1].in_flight = 2
    assert with_capacity(workers, 2) == (workers[0], workers[2])
    for w in workers:
        w.in_flight = 5
    assert with_capacity(workers, 2) == ()


# -- config ---------------------------------------------------------------------------------------


def test_limits_defaults_are_off() -> None:
    lim = LimitsConfig()
    assert (lim.max_concurrent_requests, lim.max_in_flight_per_worker) == (0, 0)
    assert (lim.queue_size, lim.queue_timeout_s) == (100, 60.0)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_concurrent_requests", -1),
        ("max_in_flight_per_worker", -1),
        ("queue_size", -1),
        ("queue_timeout_s", 0),
        ("queue_timeout_s", float("inf")),
    ],
)
def test_limits_validation_names_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError) as info:
        loads_config(f"[limits]\n{key} = {value!r}")
    assert info.value.path == f"limits.{key}"


def test_limits_from_environment() -> None:
    cfg = load_config(
        env={"LMGW_LIMITS_MAX_CONCURRENT_REQUESTS": "8", "LMGW_LIMITS_QUEUE_TIMEOUT_S": "2.5"}
    )
    assert cfg.limits.max_concurrent_requests == 8 and cfg.limits.queue_timeout_s == 2.5


def test_admin_token_from_env_flag_and_redacted() -> None:
    assert load_config(env={}).admin.token is None
    cfg = load_config(env={"LMGW_ADMIN_TOKEN": "tok-env"})
    assert cfg.admin.token == "tok-env" and not cfg.admin.allow_unauthenticated_localhost
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    ns = parser.parse_args(["--admin-token", "tok-flag"])
    cfg = config_from_args(ns, env={"LMGW_ADMIN_TOKEN": "tok-env"})
    assert cfg.admin.token == "tok-flag"  # flags override the environment
    text = dump_config(cfg, redact=True)
    assert "tok-flag" not in text and 'token = "<redacted>"' in text
    assert loads_config(dump_config(cfg)).admin.token == "tok-flag"


def test_bad_admin_token_flag_is_not_echoed() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    ns = parser.parse_args(["--admin-token", " secret-with-space"])
    with pytest.raises(ConfigError) as info:
        config_from_args(ns, env={})
    assert info.value.path == "admin.token"
    assert "secret-with-space" not in str(info.value)


def test_admin_section_is_strict() -> None:
    with pytest.raises(ConfigError) as info:
        loads_config("[admin]\ntokn = 'x'")
    assert "token" in str(info.value)
    cfg = loads_config("[admin]\nallow_unauthenticated_localhost = true")
    assert cfg.admin.allow_unauthenticated_localhost and cfg.admin.token is None
