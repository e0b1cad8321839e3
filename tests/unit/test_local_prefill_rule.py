"""Conditional disaggregation's decision (:mod:`lmgw.pipeline.local_prefill`): which requests a
decode worker prefills itself and why, and the decode workers' queues of local prefills."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmgw.pipeline.local_prefill import DECODE_KV_CEILING, REASONS, LocalPrefill, LocalQueues
from lmgw.routing.policy import RouteContext


def ask(
    rule: LocalPrefill,
    tokens: int,
    cached: int = 0,
    load: float = 0.0,
    queued: int = 0,
    waiting: float = 0.0,
    kv: float = 0.0,
) -> str | None:
    return rule.reason(tokens, lambda: cached, load, queued, waiting, kv)


@pytest.mark.parametrize(
    ("rule", "kw", "want"),
    [
        (LocalPrefill(), {"tokens": 10}, None),  # both arms off
        (LocalPrefill(tokens=64), {"tokens": 64}, "short"),
        (LocalPrefill(tokens=64), {"tokens": 65}, None),
        (LocalPrefill(tokens=64), {"tokens": 1000, "cached": 936}, "cached"),  # 64 left
        (LocalPrefill(tokens=64), {"tokens": 1000, "cached": 935}, None),
        (LocalPrefill(tokens=64), {"tokens": 1000, "load": 50}, None),  # no busy arm
        (LocalPrefill(busy=4), {"tokens": 100_000, "load": 4}, "busy"),  # any length
        (LocalPrefill(busy=4), {"tokens": 10, "load": 3}, None),  # no length arm
        # the shorter queue of prefills wins: the decode worker's must be shorter
        (LocalPrefill(busy=4), {"tokens": 100, "load": 5, "queued": 4}, "busy"),
        (LocalPrefill(busy=4), {"tokens": 100, "load": 5, "queued": 5}, None),
        # the decode engine's own report vetoes: it queues, or its KV cache is full
        (LocalPrefill(busy=4), {"tokens": 100, "load": 9, "waiting": 1}, None),
        (LocalPrefill(busy=4), {"tokens": 100, "load": 9, "kv": DECODE_KV_CEILING}, None),
        (LocalPrefill(busy=4), {"tokens": 100, "load": 9, "kv": DECODE_KV_CEILING - 0.01}, "busy"),
        # both arms (Dynamo's isl_or_load): either one
        (LocalPrefill(tokens=64, busy=4), {"tokens": 32}, "short"),
        (LocalPrefill(tokens=64, busy=4), {"tokens": 5000, "load": 4}, "busy"),
        (LocalPrefill(tokens=64, busy=4), {"tokens": 5000, "cached": 4990, "load": 1}, "cached"),
        (LocalPrefill(tokens=64, busy=4), {"tokens": 5000, "load": 1}, None),
        # a short prompt needs no decode headroom: a few tokens fit between decode steps
        (LocalPrefill(tokens=64, busy=4), {"tokens": 32, "queued": 9, "waiting": 3, "kv": 1},
         "short"),
    ],
)  # fmt: skip
def test_reasons(rule: LocalPrefill, kw: dict, want: str | None) -> None:
    assert ask(rule, **kw) == want


def test_the_cache_is_asked_only_when_the_length_is_over_the_limit() -> None:
    """The decode policy's prediction walks its index: not for a prompt short enough anyway,
    nor for one the busy arm already sends."""
    asked: list[int] = []

    def cached() -> int:
        asked.append(1)
        return 0

    rule = LocalPrefill(tokens=64, busy=2)
    assert rule.reason(10, cached, 0, 0, 0, 0) == "short"
    assert rule.reason(1000, cached, 5, 0, 0, 0) == "busy"
    assert asked == []
    assert rule.reason(1000, cached, 0, 0, 0, 0) is None
    assert asked == [1]


@given(
    st.builds(LocalPrefill, st.integers(0, 4096), st.integers(0, 64)),
    st.integers(0, 100_000),  # prompt tokens
    st.integers(0, 100_000),  # predicted cached
    st.integers(0, 100),  # prefill load
    st.integers(0, 100),  # decode's local queue
    st.floats(0, 10, allow_nan=False),  # decode waiting
    st.floats(0, 1, allow_nan=False),  # decode KV usage
    st.integers(0, 1000),
    st.integers(0, 50),
)
def test_more_load_or_fewer_tokens_never_undo_a_local_prefill(
    rule: LocalPrefill,
    tokens: int,
    cached: int,
    load: int,
    queued: int,
    waiting: float,
    kv: float,
    fewer: int,
    more: int,
) -> None:
    """Monotone: a request prefilled locally still is with a busier prefill worker, a shorter
    local queue or a shorter prompt; the reason is one of the documented ones; nothing is
    local with both arms off."""
    cached = min(cached, tokens)
    got = ask(rule, tokens, cached, load, queued, waiting, kv)
    assert got is None or got in REASONS
    if not rule.tokens and not rule.busy:
        assert got is None
    if got is not None:
        assert ask(rule, tokens, cached, load + more, queued, waiting, kv) is not None
        assert ask(rule, tokens, cached, load, max(0, queued - more), waiting, kv) is not None
        shorter = max(0, tokens - fewer)
        assert ask(rule, shorter, min(cached, shorter), load, queued, waiting, kv) is not None


def test_local_queues_drain_first_in_first_out() -> None:
    """A first token ends that prefill and the older ones on the same worker; a failure ends
    only its own; an answer ends the older ones too; other workers are untouched."""
    q = LocalQueues()
    r = [RouteContext("m", f"r{i}") for i in range(6)]
    for i in range(4):
        q.sent("d0", r[i])
    q.sent("d1", r[4])
    assert (q.queued("d0"), q.queued("d1")) == (4, 1)
    q.ended(r[0], ok=False)  # failed: only itself
    assert q.queued("d0") == 3
    q.first_token(r[2])  # r1 and r2 are done prefilling
    assert q.queued("d0") == 1
    q.ended(r[1], ok=True)  # already counted out: nothing more
    q.ended(r[2], ok=True)
    assert q.queued("d0") == 1
    q.ended(r[3], ok=True)
    q.first_token(r[4])
    q.first_token(r[4])  # twice is once
    q.ended(r[4], ok=True)
    assert (q.queued("d0"), q.queued("d1")) == (0, 0)
    assert not q._fifo and not q._count  # nothing left behind
    q.first_token(r[5])  # a route that never had a local leg
    q.ended(r[5], ok=True)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["send", "first", "ok", "fail"]), st.integers(0, 7), st.integers(0, 2)
        ),
        max_size=80,
    )
)
def test_local_queues_match_a_reference(ops: list[tuple[str, int, int]]) -> None:
    """Against a plain list per worker: the count is always the live entries, each entry's
    leg ends once, and when every leg has ended nothing is left."""
    q = LocalQueues()
    routes = [RouteContext("m", f"r{i}") for i in range(8)]
    where: dict[int, str] = {}  # route -> worker of its live-or-pending local leg
    ref: dict[str, list[int]] = {}
    for op, i, w in ops:
        worker = f"d{w}"
        if op == "send":
            if i in where:  # one leg at a time per request (the runner ends it first)
                continue
            q.sent(worker, routes[i])
            where[i] = worker
            ref.setdefault(worker, []).append(i)
        elif i in where:
            worker = where[i]
            live = ref[worker]
            if op in ("first", "ok") and i in live:
                del live[: live.index(i) + 1]  # it and the older ones
            elif op == "fail" and i in live:
                live.remove(i)
            if op == "first":
                q.first_token(routes[i])
            else:
                q.ended(routes[i], ok=op == "ok")
                del where[i]
        for name, live in ref.items():
            assert q.queued(name) == len(live), (name, live)
    for i in list(where):
        q.ended(routes[i], ok=False)
    assert not q._fifo and not q._count
