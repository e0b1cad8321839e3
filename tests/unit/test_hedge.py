"""The sans-IO parts of hedged streams: the adaptive delay and the hedge budget."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.pipeline.hedge import Budget, DelayEstimator

_times = st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=1, max_size=600)


@settings(max_examples=200, deadline=None)
@given(_times, st.sampled_from([0.5, 0.9, 0.95, 0.99]))
def test_the_delay_is_the_nearest_rank_quantile_of_the_window(times: list[float], q: float) -> None:
    """After a recompute the estimate equals a brute-force nearest-rank quantile of the last
    ``window`` observations, whatever came before them."""
    est = DelayEstimator(q, window=64, every=8)
    for t in times:
        est.observe(t)
    est.recompute()
    window = sorted(times[-64:])
    assert est.value == window[max(1, math.ceil(q * len(window))) - 1]
    assert est.samples == len(window)


def test_the_delay_follows_a_new_regime_within_a_window() -> None:
    est = DelayEstimator(0.95, window=256, every=32)
    for _ in range(256):
        est.observe(0.010)
    assert est.value == 0.010
    for _ in range(256):
        est.observe(0.200)
    assert est.value == 0.200


def test_the_first_samples_give_an_estimate_at_once() -> None:
    est = DelayEstimator(0.95, every=32)
    assert math.isnan(est.value)
    est.observe(0.05)
    assert est.value == 0.05


@settings(max_examples=200, deadline=None)
@given(st.floats(0.001, 1.0), st.lists(st.booleans(), max_size=2000))
def test_the_budget_never_hedges_more_than_its_share(ratio: float, late: list[bool]) -> None:
    """Over any sequence of eligible requests (some late), hedges <= ratio * requests + the
    one token the bucket starts with (plus rounding)."""
    budget = Budget(ratio, burst=10.0)
    hedges = 0
    for is_late in late:
        budget.earn()
        if is_late and budget.spend():
            hedges += 1
    assert hedges <= ratio * len(late) + 1 + 1e-9
    assert 0.0 <= budget.tokens <= budget.burst


def test_the_budget_refills_at_its_ratio() -> None:
    budget = Budget(0.1)
    assert budget.spend() and not budget.spend()
    for _ in range(10):
        budget.earn()
    assert budget.spend() and not budget.spend()
