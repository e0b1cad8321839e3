"""Routing policies and the registry's candidate snapshots (pure: no I/O)."""

import pytest

from lmgw.routing.policies.least_load import LeastLoad
from lmgw.routing.policies.round_robin import RoundRobin
from lmgw.routing.policy import RouteContext
from lmgw.routing.registry import UnknownPolicy, available, make_policy
from lmgw.workers.registry import Registry
from lmgw.workers.worker import Worker, WorkerState


def fleet(n: int, registry: Registry | None = None) -> list[Worker]:
    reg = registry if registry is not None else Registry()
    out = []
    for i in range(n):
        w = reg.add(Worker(f"w{i}", f"http://127.0.0.1:{9000 + i}", "pd", frozenset({"m"})))
        reg.set_state(w, WorkerState.HEALTHY)
        out.append(w)
    return out


def test_round_robin_cycles_evenly() -> None:
    ws = fleet(3)
    rr = RoundRobin()
    picks = [rr.choose(ws, RouteContext("m")).id for _ in range(9)]
    assert picks == ["w0", "w1", "w2"] * 3


def test_least_load_prefers_idle_and_rotates_ties() -> None:
    ws = fleet(3)
    ll = LeastLoad()
    ws[0].in_flight = 5
    ws[1].in_flight = 1
    ws[2].in_flight = 1
    picks = {ll.choose(ws, RouteContext("m")).id for _ in range(6)}
    assert picks == {"w1", "w2"}  # never the loaded one, ties spread
    ws[2].in_flight = 0
    assert ll.choose(ws, RouteContext("m")).id == "w2"


def test_registry_candidates_follow_state_and_models() -> None:
    reg = Registry()
    ws = fleet(3, reg)
    assert [w.id for w in reg.candidates("m", "pd")] == ["w0", "w1", "w2"]
    assert reg.candidates("other", "pd") == ()
    assert reg.candidates("m", "p") == ()
    reg.set_state(ws[1], WorkerState.EJECTED, "refused")
    assert [w.id for w in reg.candidates("m", "pd")] == ["w0", "w2"]
    assert ws[1].last_error == "refused"
    reg.remove("w0")
    assert [w.id for w in reg.candidates("m", "pd")] == ["w2"]
    assert ws[0].state is WorkerState.GONE
    # a worker whose models are unknown may serve anything
    anyw = reg.add(Worker("wx", "http://127.0.0.1:9100", "pd"))
    reg.set_state(anyw, WorkerState.HEALTHY)
    assert reg.candidates("other", "pd") == (anyw,)
    assert reg.has_model("other")


def test_candidates_are_cached_until_a_change() -> None:
    reg = Registry()
    fleet(2, reg)
    first = reg.candidates("m", "pd")
    assert reg.candidates("m", "pd") is first
    reg.add(Worker("new", "http://127.0.0.1:9200", "pd", frozenset({"m"})))
    assert reg.candidates("m", "pd") is not first


def test_load_accounting_pairs() -> None:
    (w,) = fleet(1)
    Registry.acquire(w)
    Registry.acquire(w)
    assert (w.in_flight, w.total_requests) == (2, 2)
    Registry.release(w)
    Registry.release(w)
    assert w.in_flight == 0


def test_registry_rejects_duplicates() -> None:
    reg = Registry()
    fleet(1, reg)
    with pytest.raises(ValueError, match="already registered"):
        reg.add(Worker("w0", "http://127.0.0.1:1", "pd"))


def test_policy_registry() -> None:
    assert {"round_robin", "least_load"} <= set(available())
    assert isinstance(make_policy("round_robin"), RoundRobin)
    with pytest.raises(UnknownPolicy, match=r"available: .*round_robin"):
        make_policy("nope")
