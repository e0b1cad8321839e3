"""The planner's core (:mod:`lmgw.planner.core`): levels, quantiles, learned capacities and
the plans they give, fed plain numbers."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmgw.metrics import TPOT_BUCKETS
from lmgw.planner import Planner, Signal, level_of, quantile
from lmgw.planner.core import HEADROOM, MIN_SAMPLES

D, P = ("d", "*"), ("p", "*")  # pools: a role's workers serving the same models (any, here)


def counts_at(value: float, n: int = MIN_SAMPLES) -> list[int]:
    """``n`` observations of ``value`` as TPOT bucket counts."""
    out = [0] * (len(TPOT_BUCKETS) + 1)
    out[next((i for i, b in enumerate(TPOT_BUCKETS) if value <= b), len(TPOT_BUCKETS))] = n
    return out


@given(st.floats(0, 5000, allow_nan=False))
def test_levels_are_exact_then_binned_and_never_above(in_flight: float) -> None:
    k = level_of(in_flight)
    rounded = int(in_flight + 0.5)
    assert k == rounded if rounded <= 16 else 16 <= k <= rounded
    assert level_of(in_flight + 1) >= k  # monotone


def test_quantile_interpolates_within_its_bucket() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert quantile(bounds, [10, 0, 0, 0], 0.5) == pytest.approx(0.5)
    assert quantile(bounds, [0, 10, 0, 0], 0.9) == pytest.approx(1.9)
    assert quantile(bounds, [5, 5, 0, 0], 0.9) == pytest.approx(1.8)
    assert quantile(bounds, [0, 0, 0, 3], 0.9) == math.inf  # past the last bound


def curve(signal: Signal, tpot: dict[int, float], n: int = MIN_SAMPLES) -> None:
    for level, value in tpot.items():
        signal.add(level, counts_at(value, n))


def test_capacity_is_the_highest_level_within_the_target() -> None:
    s = Signal("itl", TPOT_BUCKETS, 0.025)
    assert s.capacity() == (None, "learning")
    curve(s, {1: 0.012, 2: 0.014}, n=MIN_SAMPLES - 1)
    assert s.capacity() == (None, "learning")  # too few observations to count
    curve(s, {1: 0.012, 2: 0.014, 4: 0.018, 6: 0.019, 8: 0.034, 12: 0.045})
    assert s.capacity() == (6, "ok")


def test_a_role_seen_only_over_its_target_is_overloaded_or_unreachable() -> None:
    s = Signal("itl", TPOT_BUCKETS, 0.025)
    curve(s, {12: 0.045, 16: 0.06})
    assert s.capacity() == (6, "overloaded")  # 12 x 25 / 49 ms, and half the lowest level
    q = Signal("ttft", (0.1, 0.2, 0.5, 1.0), 0.15)  # a queue: 6 prefills of ~90 ms waiting
    q.add(6, [0, 0, 0, MIN_SAMPLES, 0])
    assert q.capacity() == (1, "overloaded")  # 6 x 0.15 / ~0.97 s: one at a time
    u = Signal("itl", TPOT_BUCKETS, 0.005)
    curve(u, {1: 0.012, 3: 0.02})
    assert u.capacity() == (1, "unreachable")  # one request at a time already misses


def test_decay_forgets_old_observations() -> None:
    s = Signal("itl", TPOT_BUCKETS, 0.025)
    curve(s, {4: 0.018})
    s.decay(0.5)
    assert s.capacity() == (None, "learning")  # 10 left, under MIN_SAMPLES
    s.decay(0.01)
    assert not s.levels  # nothing left to keep


def planner_with(tpot: dict[int, float], window_s: float = 10.0, delay_s: float = 30.0):
    p = Planner(window_s, delay_s)
    s = Signal("itl", TPOT_BUCKETS, 0.025)
    curve(s, tpot)
    p.track(D, s)
    return p


def test_the_plan_fills_the_capacity_with_headroom() -> None:
    p = planner_with({2: 0.014, 4: 0.018, 8: 0.034})  # capacity 4
    for t in range(10):
        p.observe_load(float(t), D, 2, 10.0 + (t % 2))  # ~10.5 in flight on 2 workers
    plan = p.plan(9.0)[D]
    assert plan.capacity == 4 and plan.status == "ok"
    assert plan.load == pytest.approx(10.5)
    assert plan.desired == math.ceil(10.5 / (4 * HEADROOM)) == 4
    assert plan.describe()["signals"]["itl"]["p90_by_level"].keys() == {2, 4, 8}


def test_a_fall_waits_for_the_delay_and_a_rise_does_not() -> None:
    first = planner_with({2: 0.014, 4: 0.018}, window_s=1.0, delay_s=30.0)
    first.observe_load(0.0, D, 4, 1.0)  # the first plan, light: no fall before a whole delay
    assert first.plan(0.0)[D].desired == 4
    first.observe_load(29.0, D, 4, 1.0)
    assert first.plan(29.0)[D].desired == 4
    first.observe_load(31.0, D, 4, 1.0)
    assert first.plan(31.0)[D].desired == 1
    p = planner_with({2: 0.014, 4: 0.018}, window_s=1.0, delay_s=30.0)
    p.observe_load(0.0, D, 4, 12.0)
    assert p.plan(0.0)[D].desired == 4  # 12 / 3.2
    p.observe_load(10.0, D, 4, 1.0)  # the load fell: the fall waits
    assert p.plan(10.0)[D].desired == 4
    p.observe_load(40.0, D, 4, 1.0)  # every plan of the last 30 s allows 1
    assert p.plan(40.0)[D].desired == 1
    p.observe_load(42.0, D, 1, 20.0)  # a rise at once
    assert p.plan(42.0)[D].desired == 7


def test_learning_and_unreachable_keep_the_count_and_idle_needs_one() -> None:
    p = Planner(10.0, 0.0)
    p.track(P, Signal("ttft", (0.5, 1.0, 2.0), 1.0))
    p.observe_load(0.0, P, 3, 5.0)
    assert (p.plan(0.0)[P].desired, p.plan(0.0)[P].status) == (3, "learning")
    q = Planner(10.0, 0.0)
    q.track(P, Signal("ttft", (0.5, 1.0, 2.0), 1.0))
    q.observe_load(0.0, P, 3, 0.0)
    assert (q.plan(0.0)[P].desired, q.plan(0.0)[P].status) == (1, "idle")
    u = planner_with({1: 0.05})  # unreachable at 25 ms
    u.observe_load(0.0, D, 2, 9.0)
    assert (u.plan(0.0)[D].desired, u.plan(0.0)[D].status) == (2, "unreachable")


@given(
    st.dictionaries(st.integers(1, 64), st.sampled_from(TPOT_BUCKETS[:-1]), min_size=1),
    st.floats(0.1, 500, allow_nan=False),
    st.floats(0, 500, allow_nan=False),
    st.integers(1, 64),
)
def test_more_load_never_asks_for_fewer_workers(
    tpot: dict[int, float], load: float, more: float, workers: int
) -> None:
    def desired(x: float) -> int:
        p = planner_with(tpot, delay_s=0.0)
        p.observe_load(0.0, D, workers, x)
        return p.plan(0.0)[D].desired

    low, high = desired(load), desired(load + more)
    assert low >= 1 and high >= low


def test_the_feed_plans_each_pool_of_a_role_and_its_models_apart() -> None:
    """Two decode workers of different models (two Deployments): each pool's load and
    latencies are its own. A worker whose models are not known yet is in its role's ``*``."""
    from lmgw.config import PlannerConfig
    from lmgw.metrics import Metrics
    from lmgw.planner.feed import PlannerFeed, pool_of
    from lmgw.workers.registry import Registry
    from lmgw.workers.worker import Worker, WorkerState

    registry, metrics = Registry(), Metrics()
    a = registry.add(Worker("a0", "http://h:1", "d", frozenset({"small"})))
    b = registry.add(Worker("b0", "http://h:2", "d", frozenset({"big", "big-lora"})))
    anyone = registry.add(Worker("x0", "http://h:3", "d"))
    for w in (a, b, anyone):
        registry.set_state(w, WorkerState.HEALTHY)
    assert [pool_of(w) for w in (a, b, anyone)] == [
        ("d", "small"), ("d", "big,big-lora"), ("d", "*"),
    ]  # fmt: skip
    feed = PlannerFeed(PlannerConfig(itl_slo_s=0.025, window_s=10.0), registry, metrics)
    a.in_flight, b.in_flight = 2, 9
    for _ in range(MIN_SAMPLES):
        metrics.stage_tpot.observe(("d", "a0"), 0.012)  # fast at 2
        metrics.stage_tpot.observe(("d", "b0"), 0.045)  # slow at 9
    feed.tick(0.0)
    feed.tick(0.5)  # the second sample reads the latencies
    plans = feed.evaluate(1.0)
    small, big = plans[("d", "small")], plans[("d", "big,big-lora")]
    assert (small.load, small.capacity, small.status) == (2.0, 2, "ok")
    assert (big.load, big.status) == (9.0, "overloaded") and big.desired >= 2
    assert plans[("d", "*")].status == "idle"
    shown = feed.describe()["pools"]
    assert [(p["role"], p["models"]) for p in shown] == [
        ("d", "*"), ("d", "big,big-lora"), ("d", "small"),
    ]  # fmt: skip


def test_requests_waiting_for_admission_count_as_the_load_of_the_pools_serving_them() -> None:
    from lmgw.planner.feed import waiting_for

    queued = {"small": 6, "big": 2, None: 1}  # None: no model named (the gateway's one)
    assert waiting_for(("d", "small"), queued) == 7
    assert waiting_for(("p", "big,big-lora"), queued) == 3
    assert waiting_for(("d", "*"), queued) == 9
    assert waiting_for(("d", "other"), queued) == 1
    assert waiting_for(("d", "small"), {}) == 0


@pytest.mark.parametrize(
    ("desired", "active", "standby", "want"),
    [
        (3, ["a"], 5, (2, [])),
        (6, ["a"], 2, (2, [])),  # no more than the standby list has
        (1, ["a", "b", "c"], 0, (0, ["c", "b"])),  # the newest leave first
        (0, ["a", "b"], 0, (0, ["b"])),  # never below one
        (2, ["a", "b"], 3, (0, [])),
    ],
)
def test_standby_moves(desired: int, active: list[str], standby: int, want: tuple) -> None:
    from lmgw.planner.standby import moves

    assert moves(desired, active, standby) == want


def test_split_standby_keeps_the_specs_count_of_each_role() -> None:
    from lmgw.config import GatewayConfig, WorkerConfig
    from lmgw.simulate import split_standby

    workers = [WorkerConfig(url=f"http://h:{i + 1}", role=r) for i, r in enumerate("ppppdddd")]
    kept, standby = split_standby(GatewayConfig(workers=workers), {"p": 1, "d": 2})
    assert [w.url for w in kept.workers] == ["http://h:1", "http://h:5", "http://h:6"]
    assert [w.url for w in standby] == [f"http://h:{i}" for i in (2, 3, 4, 7, 8)]


def test_a_pool_is_judged_by_the_signals_that_know_something() -> None:
    """A decode pool holds both targets: its first tokens (KV transfer and the engine's own
    queue) and its time between tokens. A signal with no data yet (non-streamed traffic
    teaches no TTFT) says nothing; one over its target makes the pool overloaded even when
    the other is well within."""
    p = Planner(10.0, 0.0)
    ttft = Signal("ttft", (0.1, 0.2, 0.5, 1.0, 2.0), 0.2)
    itl = Signal("itl", TPOT_BUCKETS, 0.025)
    p.track(D, ttft)
    p.track(D, itl)
    curve(itl, {2: 0.012, 4: 0.018})
    p.observe_load(0.0, D, 2, 6.0)
    plan = p.plan(0.0)[D]
    assert (plan.status, plan.capacity) == ("ok", 4)  # the TTFT signal is still learning
    ttft.add(4, [0, 0, 0, MIN_SAMPLES, 0, 0])  # first tokens at ~0.9 s with 4 streams
    plan = p.plan(1.0)[D]
    assert plan.status == "overloaded" and plan.capacity == 1 and plan.desired == 8
