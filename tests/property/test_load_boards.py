"""The registry's load boards (:class:`lmgw.workers.registry.Candidates`): whatever happens to
the fleet and its workers, a candidate tuple's load list equals what reading every worker
gives, and load-aware policies choose exactly as they would from the workers themselves."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.routing.policies.least_load import least_loaded, loads_of
from lmgw.routing.policies.power_of_two import PowerOfTwo
from lmgw.routing.policy import RouteContext
from lmgw.routing.registry import make_policy
from lmgw.workers.monitor import apply_engine_metrics
from lmgw.workers.registry import Candidates, Registry
from lmgw.workers.worker import Worker, WorkerState

MODELS = ("m1", "m2")
ROLES = ("pd", "d")

ops = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(0, 7)),
        st.tuples(st.just("release"), st.integers(0, 7)),
        st.tuples(st.just("scrape"), st.integers(0, 7), st.integers(0, 9)),
        st.tuples(st.just("set_waiting"), st.integers(0, 7), st.integers(0, 9)),
        st.tuples(st.just("set_in_flight"), st.integers(0, 7), st.integers(0, 9)),
        st.tuples(st.just("state"), st.integers(0, 7), st.sampled_from(list(WorkerState))),
        st.tuples(st.just("remove"), st.integers(0, 7)),
        st.tuples(st.just("add"), st.integers(0, 7)),
        st.tuples(st.just("read"), st.sampled_from(MODELS), st.sampled_from(ROLES)),
    ),
    max_size=80,
)


def _worker(i: int) -> Worker:
    w = Worker(f"w{i}", f"http://10.0.0.{i}:8000", ROLES[i % 2], frozenset({MODELS[i % 3 % 2]}))
    w.state = WorkerState.HEALTHY
    return w


@settings(max_examples=300, deadline=None)
@given(ops=ops, initial=st.integers(1, 8))
def test_boards_always_equal_the_workers_loads(ops: list[tuple], initial: int) -> None:
    reg = Registry()
    workers: dict[int, Worker] = {}
    for i in range(initial):
        workers[i] = reg.add(_worker(i))
    seen: list[Candidates] = []  # tuples read since the last fleet change: all must stay exact
    generation = reg.generation
    for op in ops:
        kind, i = op[0], op[1]
        w = workers.get(i) if isinstance(i, int) else None
        if kind == "acquire" and w is not None:
            reg.acquire(w)
        elif kind == "release" and w is not None and w.in_flight > 0:
            reg.release(w)
        elif kind == "scrape" and w is not None:
            apply_engine_metrics(w.engine, b'vllm:num_requests_waiting{x="1"} %d\n' % op[2])
        elif kind == "set_waiting" and w is not None:
            w.engine.waiting = float(op[2])
        elif kind == "set_in_flight" and w is not None:
            w.in_flight = op[2]
        elif kind == "state" and w is not None:
            reg.set_state(w, op[2])
        elif kind == "remove" and w is not None:
            reg.remove(w.id)
            del workers[i]
        elif kind == "add" and w is None:
            workers[i] = reg.add(_worker(i))
        elif kind == "read":
            got = reg.candidates(op[1], op[2])
            assert type(got) is Candidates
            got.loads()
            seen.append(got)
        if reg.generation != generation:
            generation = reg.generation
            seen = []  # dropped by the registry: their lists are not kept any more
        for cands in seen:
            assert cands.loads() == [w.in_flight + w.engine.waiting for w in cands]
        # no worker keeps writing into a list the registry dropped (a leak, and wasted work)
        live = {id(cands.loads()) for cands in seen}
        assert all(id(loads) in live for w in workers.values() for loads, _ in w.boards)


@settings(max_examples=150, deadline=None)
@given(
    loads=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), min_size=1, max_size=12),
    policy=st.sampled_from(["least_load", "power_of_two", "consistent_hash", "cache_aware"]),
    requests=st.integers(1, 20),
)
def test_policies_choose_alike_from_the_board_and_from_the_workers(
    loads: list[tuple[int, int]], policy: str, requests: int
) -> None:
    """The same decisions, request after request, whether a policy is handed the registry's
    tuple (it reads the board) or a plain list of the same workers (it reads each worker)."""
    reg = Registry()
    for i, (in_flight, waiting) in enumerate(loads):
        w = Worker(f"w{i}", f"http://10.0.1.{i}:8000", "pd", frozenset({"m"}))
        w.state = WorkerState.HEALTHY
        reg.add(w)
        w.in_flight, w.engine.waiting = in_flight, float(waiting)
    if policy == "power_of_two":  # the same draws on both sides
        board, plain = PowerOfTwo(seed=7), PowerOfTwo(seed=7)
    else:
        board, plain = make_policy(policy), make_policy(policy)
    for r in range(requests):
        cands = reg.candidates("m", "pd")
        assert loads_of(cands) == loads_of(list(cands))
        assert least_loaded(cands, r) == least_loaded(list(cands), r)
        ctx = RouteContext("m", f"r{r}", session_key=f"s{r % 3}", text_key=b"p%d" % (r % 4))
        a = board.choose(cands, ctx)
        b = plain.choose(list(cands), RouteContext("m", f"r{r}", session_key=f"s{r % 3}",
                                                   text_key=b"p%d" % (r % 4)))  # fmt: skip
        assert a.id == b.id
        reg.acquire(a)  # the chosen one gets busier: the next choice must see it
