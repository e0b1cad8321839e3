"""The sans-IO parts of hedged streams: the adaptive delay and the hedge budget."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.pipeline.hedge import Budget, DelayEstimator

_times = st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=1, max_size=600)


@settings(max_examples=200, deadline=None)
@given(_times, st.sampled_from([0.5, 0.9, 0.95, 0.99]))
def test_the_delay_is_the_nearest_rank_quantile_of_the_window(times: list[float], q: float) -> None:
    """After a recompute the estimate equals a brute-force nearest-rank quantile of the last
    ``window`` observations, or twice their median when that is more, whatever came before."""
    est = DelayEstimator(q, window=64, every=8)
    for t in times:
        est.observe(t)
    est.recompute()
    window = sorted(times[-64:])
    rank = max(1, math.ceil(q * len(window)))
    median = window[max(1, math.ceil(len(window) / 2)) - 1]
    assert est.value == max(window[rank - 1], 2 * median)
    assert est.samples == len(window)


def test_the_delay_follows_a_new_regime_within_a_window() -> None:
    est = DelayEstimator(0.95, window=256, every=32, median_factor=0.0)
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
    assert est.value == 0.1  # twice the median of one


def test_a_tight_distribution_hedges_past_twice_its_median() -> None:
    """53-56 ms first tokens with a few 0.5 s stalls: the 0.95 quantile is jitter (56 ms);
    the delay is twice the median instead, and a heavy tail keeps its own quantile."""
    tight = DelayEstimator(0.95)
    for i in range(256):
        tight.observe(0.5 if i % 33 == 0 else 0.053 + (i % 4) * 0.001)
    assert tight.value == pytest.approx(2 * 0.055)  # not the 0.95 quantile, 0.056
    heavy = DelayEstimator(0.95)
    for i in range(256):
        heavy.observe(0.01 * (1 + i % 20) ** 2)  # p50 1.0 s, p95 3.61 s
    assert heavy.value == 0.01 * 19**2


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


@settings(max_examples=100, deadline=None)
@given(
    st.floats(0.0, 1.0),
    st.integers(1, 5),
    st.booleans(),
    st.integers(0, 400),
    st.lists(st.floats(0.001, 1.0), max_size=8),
)
def test_would_hedge_is_delay_without_counting(
    delay_s: float, min_samples: int, stream: bool, body_bytes: int, seen: list[float]
) -> None:
    """What the compiled lane asks (would this stream be hedged now?) is what ``delay``
    answers, and asking spends and earns no budget."""
    from lmgw.config import HedgingConfig
    from lmgw.metrics import Metrics
    from lmgw.pipeline.hedge import Hedger
    from lmgw.pipeline.request import GatewayRequest

    cfg = HedgingConfig(enabled=True, delay_s=delay_s, min_samples=min_samples, max_body_bytes=200)
    hedger = Hedger(cfg, Metrics())
    for t in seen:
        hedger.observe("m", t)
    tokens = hedger.budget.tokens
    would = hedger.would_hedge("m", stream, body_bytes)
    assert hedger.budget.tokens == tokens
    greq = GatewayRequest(
        "chat", "/v1/chat/completions", "m", stream, b"x" * body_bytes, "r", [], 0.0
    )
    assert would == (hedger.delay(greq) is not None)
