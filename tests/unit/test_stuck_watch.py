"""The stuck-worker verdict (lmgw.workers.stuck): requests in flight and no token processed."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lmgw.workers.stuck import ProgressWatch


def test_a_worker_is_stuck_only_with_work_and_no_progress() -> None:
    w = ProgressWatch(10.0)
    w.observe("a", -1.0, 0, 90.0)
    assert w.observe("a", 0.0, 3, 100.0) == 0.0  # it counts
    assert w.observe("a", 5.0, 3, 100.0) == 0.0
    assert w.observe("a", 10.0, 3, 100.0) == 10.0  # stuck
    assert w.observe("a", 15.0, 3, 100.0) == 0.0  # one verdict per timeout
    assert w.observe("a", 20.0, 3, 100.0) == 10.0


def test_progress_idleness_and_unknown_counters_reset_it() -> None:
    w = ProgressWatch(10.0)
    w.observe("a", -1.0, 0, 90.0)
    w.observe("a", 0.0, 3, 100.0)
    assert w.observe("a", 9.0, 3, 101.0) == 0.0  # a token: alive
    assert w.observe("a", 18.0, 3, 101.0) == 0.0  # 9 s since
    assert w.observe("a", 19.0, 0, 101.0) == 0.0  # nothing in flight: the clock starts over
    assert w.observe("a", 28.0, 2, 101.0) == 0.0  # an idle engine had nothing to count
    assert w.observe("a", 29.0, 2, 101.0) == 10.0
    w.observe("b", 0.0, 1, None)
    assert w.observe("b", 100.0, 1, None) == 0.0  # no counters: never judged
    off = ProgressWatch(0.0)
    off.observe("a", 0.0, 1, 5.0)
    assert off.observe("a", 1e6, 1, 5.0) == 0.0
    w.reset("a")
    assert w.observe("a", 1000.0, 2, 101.0) == 0.0  # forgotten: a fresh start
    assert w.observe("a", 2000.0, 2, 101.0) == 0.0  # ... and not judged before they move


def test_counters_that_never_move_are_never_judged() -> None:
    """A vLLM with --disable-log-stats may list the counters at 0 and never count."""
    w = ProgressWatch(10.0)
    for t in range(0, 100, 5):
        assert w.observe("a", float(t), 4, 0.0) == 0.0


@given(
    st.lists(
        st.tuples(st.floats(0.1, 20.0), st.integers(0, 3), st.sampled_from([1.0, 2.0, None])),
        max_size=60,
    )
)
def test_no_verdict_unless_the_whole_window_had_work_and_no_progress(
    steps: list[tuple[float, int, float | None]],
) -> None:
    """A reference model: a verdict at time t means every observation in (t - timeout, t]
    had work in flight and the same token count as the one that started the window."""
    timeout = 10.0
    w = ProgressWatch(timeout)
    now, history = 0.0, []
    for dt, in_flight, tokens in steps:
        now += dt
        history.append((now, in_flight, tokens))
        stalled = w.observe("w", now, in_flight, tokens)
        if stalled:
            assert stalled >= timeout
            start = now - stalled  # (floats: the observation that started it, within 1e-9)
            window = [h for h in history if h[0] >= start - 1e-9]
            assert abs(window[0][0] - start) < 1e-9
            assert all(h[1] > 0 and h[2] is not None for h in window[1:])
            assert len({h[2] for h in window}) == 1
            # and the counters were seen to change before (the engine does count)
            before = [h[2] for h in history if h[0] <= start + 1e-9 and h[2] is not None]
            assert len(set(before)) > 1
