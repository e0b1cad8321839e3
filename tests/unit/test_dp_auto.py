"""The bookkeeping of ``data_parallel_size = "auto"`` entries (:mod:`lmgw.workers.dp_auto`):
which rank workers to add and retire when a probe counts a server's engines."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lmgw.config import WorkerConfig
from lmgw.workers.dp_auto import AutoRanks

AUTO = WorkerConfig(url="http://h:1", id="s", data_parallel_size="auto")


def test_one_worker_until_counted_then_its_ranks() -> None:
    auto = AutoRanks()
    (whole,) = auto.expand(AUTO)
    assert whole.worker_id == "s" and auto.owns("s")
    assert auto.observe("s", 1) == ([], [])  # one engine: nothing to do
    assert auto.observe("s", 0) == ([], [])  # no engine label: one engine too
    adds, retires = auto.observe("s", 2)
    assert [w.worker_id for w in adds] == ["s#dp0", "s#dp1"] and retires == ["s"]
    assert not auto.owns("s") and auto.owns("s#dp1")
    assert [w.worker_id for w in auto.expand(AUTO)] == ["s#dp0", "s#dp1"]  # (a re-sync)
    assert auto.observe("s#dp1", 2) == ([], [])
    adds, retires = auto.observe("s#dp0", 3)  # restarted bigger
    assert [w.worker_id for w in adds] == ["s#dp2"] and retires == []
    adds, retires = auto.observe("s#dp2", 1)  # and without ranks
    assert [w.worker_id for w in adds] == ["s"] and retires == ["s#dp0", "s#dp1", "s#dp2"]


def test_entries_that_are_not_auto_are_only_expanded() -> None:
    auto = AutoRanks()
    fixed = WorkerConfig(url="http://h:2", id="f", data_parallel_size=2)
    assert [w.worker_id for w in auto.expand(fixed)] == ["f#dp0", "f#dp1"]
    assert not auto.owns("f#dp0")


def test_a_removed_entry_is_forgotten_with_its_last_worker() -> None:
    auto = AutoRanks()
    auto.expand(AUTO)
    auto.observe("s", 2)
    auto.forget("s#dp0")
    assert auto.owns("s#dp1")
    auto.forget("s#dp1")
    assert not auto.owns("s#dp1") and not auto._entries and not auto._size
    (whole,) = auto.expand(AUTO)  # added again: one worker, counted afresh
    assert whole.worker_id == "s"


@given(st.lists(st.integers(0, 6), max_size=12))
def test_the_workers_are_always_one_set_of_ranks(sizes: list[int]) -> None:
    """Applying every change in turn, the fleet is exactly the entry's workers for the last
    count: ``s`` alone, or ``s#dp0..n-1``; nothing is added twice or retired when absent."""
    auto = AutoRanks()
    fleet = {w.worker_id for w in auto.expand(AUTO)}
    for n in sizes:
        member = sorted(fleet)[0]
        adds, retires = auto.observe(member, n)
        for w in adds:
            assert w.worker_id not in fleet
            fleet.add(w.worker_id)
        for wid in retires:
            fleet.remove(wid)
        want = {"s"} if n <= 1 else {f"s#dp{r}" for r in range(n)}
        assert fleet == want
        assert all(auto.owns(wid) for wid in fleet)
