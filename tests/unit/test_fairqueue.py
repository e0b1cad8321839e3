"""The admission queue's order without trio's scheduler (lmgw.fairqueue, sans-IO): priority
levels, aging, fair share by tenant and weight, the cost of a request, eviction when full, and
the bookkeeping of waiters that leave."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.fairqueue import EVICTED, GONE, WAITING, FairQueue, FifoQueue, Waiter


def waiter(priority: int = 0, tenant: str | None = None, t: float = 0.0, **kw) -> Waiter:
    return Waiter(priority, tenant, arrival=t, label=tenant or "-", **kw)


def drain(q: FairQueue | FifoQueue, n: int | None = None) -> list[Waiter]:
    out = []
    while len(q) and (n is None or len(out) < n):
        out.append(q.pop())
    return out


def test_one_tenant_one_level_is_fifo() -> None:
    q = FairQueue(aging_s=10.0)
    ws = [waiter(t=i) for i in range(20)]
    for w in ws:
        q.push(w)
    assert drain(q) == ws
    assert len(q) == 0 and not q._levels


def test_strict_priority_lower_first_then_arrival() -> None:
    q = FairQueue(aging_s=0.0)
    ws = [waiter(5, t=0), waiter(0, t=1), waiter(-1, t=2), waiter(0, t=3), waiter(5, t=4)]
    for w in ws:
        q.push(w)
    order = [(w.priority, w.arrival) for w in drain(q)]
    assert order == [(-1, 2), (0, 1), (0, 3), (5, 0), (5, 4)]


def test_fifo_policy_ignores_priorities() -> None:
    q = FifoQueue()
    ws = [waiter(5, t=0), waiter(-3, t=1), waiter(0, "b", t=2)]
    for w in ws:
        q.push(w)
    assert drain(q) == ws


def test_aging_lets_an_old_low_priority_waiter_through() -> None:
    """With aging_s=10, a priority-1 waiter that arrived at t=0 counts as priority 0 from
    t=10: it goes before priority-0 waiters that arrived after t=10, not before earlier ones."""
    q = FairQueue(aging_s=10.0)
    low = waiter(1, t=0.0)
    early = waiter(0, t=5.0)  # effective 1 - (t - 0)/10 vs 0 - (t - 5)/10: early wins
    late = waiter(0, t=11.0)  # low has waited 11 s by then: it wins against this one
    for w in (low, early, late):
        q.push(w)
    assert drain(q) == [early, low, late]
    strict = FairQueue(aging_s=0.0)
    low, early, late = waiter(1, t=0.0), waiter(0, t=5.0), waiter(0, t=11.0)
    for w in (low, early, late):
        strict.push(w)
    assert drain(strict) == [early, late, low]  # strict: the low level waits for all of them


def test_aging_bounds_starvation_under_a_stream_of_urgent_requests() -> None:
    """A stream of priority-0 arrivals (one per slot) never ends; a priority-3 waiter still
    gets a slot once it has waited about 3 x aging_s."""
    q = FairQueue(aging_s=2.0)
    low = waiter(3, "batch", t=0.0)
    q.push(low)
    t = 0.0
    for _ in range(1000):
        t += 0.1
        q.push(waiter(0, "live", t=t))
        if q.pop() is low:
            break
    else:
        raise AssertionError("the low-priority waiter starved")
    assert 3 * 2.0 <= t <= 3 * 2.0 + 0.2


def _share(weights: dict[str, float], pops: int, cost: dict[str, float] | None = None) -> Counter:
    """Tenant "heavy" floods (2000 queued); every other tenant keeps 2 waiters queued (one
    more arrives each time one of theirs gets a slot). Slots counted per tenant."""
    q = FairQueue()
    cost = cost or {}
    t = 0.0

    def arrive(tenant: str) -> None:
        nonlocal t
        t += 0.001
        q.push(
            Waiter(0, tenant, cost.get(tenant, 1.0), weights.get(tenant, 1.0), tenant, arrival=t)
        )

    for _ in range(2000):
        arrive("heavy")
    for tenant in weights:
        if tenant != "heavy":
            arrive(tenant)
            arrive(tenant)
    got: Counter = Counter()
    for _ in range(pops):
        w = q.pop()
        got[w.tenant] += 1
        if w.tenant != "heavy":
            arrive(w.tenant)
    return got


@pytest.mark.parametrize(("w_light", "w_heavy"), [(1.0, 1.0), (3.0, 1.0), (1.0, 3.0)])
def test_weights_share_the_slots_while_one_tenant_floods(w_light: float, w_heavy: float) -> None:
    got = _share({"heavy": w_heavy, "light": w_light}, 400)
    expected = 400 * w_light / (w_light + w_heavy)
    assert abs(got["light"] - expected) <= 0.1 * expected, got


def test_cost_in_tokens_shares_work_not_requests() -> None:
    """Tenant "heavy" asks for 4x the tokens per request: with token costs the light tenant
    gets 4 slots to its 1 (equal work); with request costs (1 each) 1 to 1."""
    by_tokens = _share({"heavy": 1.0, "light": 1.0}, 500, cost={"heavy": 400.0, "light": 100.0})
    assert abs(by_tokens["light"] / by_tokens["heavy"] - 4.0) <= 0.4, by_tokens
    by_requests = _share({"heavy": 1.0, "light": 1.0}, 500)
    assert abs(by_requests["light"] / by_requests["heavy"] - 1.0) <= 0.1, by_requests


def test_a_lone_waiter_is_served_within_two_slots_while_another_tenant_has_1000() -> None:
    for weight in (1.0, 100.0):
        q = FairQueue()
        for i in range(1000):
            q.push(Waiter(0, "heavy", 1.0, weight, "heavy", arrival=i * 0.001))
        drain(q, 300)  # the heavy tenant has been served a while
        lone = Waiter(0, "light", 1.0, 1.0, "light", arrival=2.0)
        q.push(lone)
        assert lone in drain(q, 2), weight
        assert len(q) == 1000 - 300 - 1


def test_a_tenant_back_from_idle_has_no_banked_credit() -> None:
    """Tenant b waits for nothing while a is served 100 times; when b comes back with a
    backlog it shares the slots 1:1 with a from then on instead of taking 100 in a row."""
    q = FairQueue()
    for i in range(300):
        q.push(waiter(0, "a", t=i))
    # b was active once at the start, then idle
    q.push(waiter(0, "b", t=0.5))
    first = drain(q, 102)
    assert [w.tenant for w in first].count("b") == 1
    for i in range(100):
        q.push(waiter(0, "b", t=400 + i))
    nxt = [w.tenant for w in drain(q, 40)]
    assert 15 <= nxt.count("b") <= 25, nxt


def test_fair_share_is_per_level() -> None:
    """Tenants share within a level; a more urgent level still goes first whoever sent it."""
    q = FairQueue(aging_s=0.0)
    for i in range(10):
        q.push(waiter(0, "a", t=i))
    for i in range(3):
        q.push(waiter(-1, "a", t=20 + i))
    q.push(waiter(0, "b", t=30))
    order = [(w.priority, w.tenant) for w in drain(q)]
    assert order[:3] == [(-1, "a")] * 3
    assert (0, "b") in order[3:5]


def test_removed_waiters_are_skipped_and_memory_stays_bounded() -> None:
    q = FairQueue(aging_s=5.0)
    keep = []
    for i in range(2000):
        w = waiter(i % 3, f"t{i % 7}", t=i * 0.01)
        q.push(w)
        if i % 100 == 0:
            keep.append(w)
        else:
            q.remove(w)
            assert w.state == GONE
    assert len(q) == len(keep) == 20
    held = sum(len(level.arrivals) for level in q._levels.values())
    assert held <= 3 * (32 + 2 * 20)  # compacted as it goes
    assert sorted(drain(q), key=id) == sorted(keep, key=id)
    assert not q._levels and len(q._order) <= 64


def test_levels_and_heap_entries_do_not_pile_up() -> None:
    """Waiters at ever new priorities that leave at once (what a hostile client could send):
    the level heap is rebuilt instead of growing."""
    q = FairQueue()
    q.push(waiter(0, t=0))
    for i in range(5000):
        w = waiter(i + 1, t=1 + i)
        q.push(w)
        q.remove(w)
    assert len(q._levels) == 1 and len(q._order) <= 64 + 2
    assert q.pop().priority == 0


def test_many_tenants_coming_and_going_are_pruned() -> None:
    q = FairQueue()
    q.push(waiter(0, "steady", t=0))
    for i in range(3000):
        w = waiter(0, f"tenant-{i}", t=1 + i)
        q.push(w)
        q.remove(w)
    assert len(q._levels[0].tenants) <= 64 + 2 + 2


# -- eviction when the queue is full ---------------------------------------------------------


def test_a_more_urgent_newcomer_evicts_the_least_urgent_levels_heaviest_tenant() -> None:
    q = FairQueue()
    for i in range(3):
        q.push(waiter(5, "a", t=i))
    newest_b = None
    for i in range(4):
        newest_b = waiter(5, "b", t=10 + i)
        q.push(newest_b)
    q.push(waiter(0, "c", t=20))
    victim = q.evict_for(waiter(1, "a", t=30))
    assert victim is newest_b and victim.state == EVICTED
    assert len(q) == 7
    assert newest_b not in drain(q)


def test_a_less_urgent_newcomer_evicts_nobody() -> None:
    q = FairQueue()
    for i in range(4):
        q.push(waiter(0, "a", t=i))
    assert q.evict_for(waiter(1, "b", t=10)) is None
    assert len(q) == 4


def test_at_the_same_priority_a_light_tenant_takes_a_place_from_the_heaviest() -> None:
    q = FairQueue()
    for i in range(6):
        q.push(waiter(0, "heavy", t=i))
    q.push(waiter(0, "light", t=6))
    victim = q.evict_for(waiter(0, "light", t=7))
    assert victim is not None and victim.tenant == "heavy" and victim.arrival == 5
    # the heavy tenant cannot evict itself, nor a tenant with fewer places
    assert q.evict_for(waiter(0, "heavy", t=8)) is None
    # places even (after a swap the newcomer's tenant would hold more): no eviction
    q2 = FairQueue()
    for i in range(2):
        q2.push(waiter(0, "a", t=i))
        q2.push(waiter(0, "b", t=i + 0.5))
    assert q2.evict_for(waiter(0, "b", t=9)) is None
    assert q2.evict_for(waiter(0, "c", t=9)) is not None  # c holds none: it gets one


def test_eviction_counts_places_per_weight() -> None:
    q = FairQueue()
    for i in range(6):
        q.push(Waiter(0, "big", 1.0, 4.0, "big", arrival=i))  # 6 places / weight 4 = 1.5
    for i in range(2):
        q.push(Waiter(0, "small", 1.0, 1.0, "small", arrival=10 + i))  # 2 / 1
    assert q.evict_for(Waiter(0, "big", 1.0, 4.0, "big", arrival=20)) is not None
    assert q.evict_for(Waiter(0, "small", 1.0, 1.0, "small", arrival=21)) is None


def test_evict_from_an_empty_queue_is_none() -> None:
    assert FairQueue().evict_for(waiter()) is None
    assert FifoQueue().evict_for(waiter()) is None


def test_states() -> None:
    q = FairQueue()
    w = waiter()
    assert w.state == WAITING
    q.push(w)
    assert list(q) == [w]
    assert q.pop() is w and len(q) == 0


# -- settling the actual cost (fair_share_cost = "kv_seconds") ----------------------------------


def test_charging_the_actual_cost_after_the_grant_shares_by_it() -> None:
    """Both tenants are charged an estimate of 1 per grant; the actual cost of a's requests
    comes out 4x b's once they end: with the charges settled, b gets 4 grants to a's 1."""
    q = FairQueue()
    for i in range(200):
        q.push(Waiter(0, "a", 1.0, 1.0, "a", arrival=i))
        q.push(Waiter(0, "b", 1.0, 1.0, "b", arrival=i + 0.5))
    got: Counter = Counter()
    for _ in range(150):
        w = q.pop()
        got[w.tenant] += 1
        q.charge(w, (4.0 if w.tenant == "a" else 1.0) - w.cost)  # the request ended
    assert abs(got["b"] / got["a"] - 4.0) <= 0.5, got


def test_a_charge_reorders_a_tenant_that_is_waiting() -> None:
    """A refund to a waiting tenant moves it ahead at once (its queued entry is replaced)."""
    q = FairQueue()
    a1, a2 = Waiter(0, "a", 10.0, arrival=0), Waiter(0, "a", 10.0, arrival=1)
    b1, b2 = Waiter(0, "b", 10.0, arrival=2), Waiter(0, "b", 10.0, arrival=3)
    for w in (a1, a2, b1, b2):
        q.push(w)
    assert q.pop() is a1  # a: 10, b: 0
    assert q.pop() is b1  # a: 10, b: 10; ties in arrival order of entries
    q.charge(a1, -9.0)  # a1 cost far less than estimated: a at 1
    assert q.pop() is a2
    assert q.pop() is b2
    assert len(q) == 0


def test_a_charge_after_the_busy_period_is_dropped_and_fifo_ignores_charges() -> None:
    q = FairQueue()
    w = Waiter(0, "a", 1.0)
    q.push(w)
    assert q.pop() is w  # the level empties: its counters are gone
    q.charge(w, 100.0)
    other = Waiter(0, "a", 1.0)
    q.push(other)
    assert q.pop() is other
    fifo = FifoQueue()
    fifo.push(w)
    fifo.charge(fifo.pop(), 5.0)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["push", "pop", "charge", "remove"]),
            st.sampled_from(["a", "b", "c"]),
            st.floats(min_value=-5.0, max_value=20.0, allow_nan=False),
        ),
        max_size=80,
    )
)
def test_pop_always_serves_a_least_charged_tenant(ops: list[tuple[str, str, float]]) -> None:
    """Model check: whatever mix of arrivals, grants, charges and cancellations, the grant goes
    to a waiting tenant whose counter is the least of the waiting tenants' (one level), and
    the queue's size is the model's."""
    q = FairQueue()
    waiting: list[Waiter] = []
    granted: list[Waiter] = []
    t = 0.0
    for op, tenant, amount in ops:
        t += 1.0
        if op == "push":
            w = Waiter(0, tenant, 1.0, arrival=t)
            q.push(w)
            waiting.append(w)
        elif op == "pop" and waiting:
            counters = {w.queue: w.queue.served for w in waiting if w.queue is not None}
            w = q.pop()
            assert w in waiting
            # its tenant's counter before the grant (after it: that plus the cost, in floats)
            assert w.queue is not None and counters[w.queue] == min(counters.values())
            waiting.remove(w)
            granted.append(w)
        elif op == "charge" and granted:
            q.charge(granted[-1], amount)
        elif op == "remove":
            mine = [w for w in waiting if w.tenant == tenant]
            if mine:
                q.remove(mine[0])
                waiting.remove(mine[0])
        assert len(q) == len(waiting)
