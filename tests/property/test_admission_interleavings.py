"""Admission under random interleavings of arrivals, cancellations, finishes and clock jumps
(hypothesis, trio's MockClock): after every step the counters match what the clients see (no
slot or queue place leaked), no slot idles while someone waits, and at the end everything is
back to zero. Both queue orders, with evictions (a full fair queue) and timeouts."""

from __future__ import annotations

from typing import Any

import msgspec
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.admission import Admission, Rejected
from lmgw.api.openai import decode_view
from lmgw.auth import KeyEntry, KeySpec
from lmgw.fairqueue import FairQueue
from lmgw.http.types import Request

KEYS = [
    KeyEntry(KeySpec("sha256:" + f"{i:02x}" * 32, f"k{i}", weight=float(i + 1)), 0.0)
    for i in range(3)
]

arrive = st.tuples(st.just("arrive"), st.integers(0, 2), st.integers(-2, 2))
steps = st.lists(
    st.one_of(
        arrive,  # weighted: the queue must fill up for evictions to happen
        arrive,
        arrive,
        st.tuples(st.just("cancel"), st.integers(0, 1000)),
        st.tuples(st.just("finish"), st.integers(0, 1000)),
        st.tuples(st.just("jump"), st.sampled_from([0.5, 1.0, 3.0])),
    ),
    min_size=15,
    max_size=60,
)


def request(key: KeyEntry, priority: int) -> tuple[Request, Any]:
    body = {"messages": [{"role": "user", "content": "x"}], "priority": priority}
    if priority % 2:  # some name a model (the planner counts the queue by model)
        body["model"] = f"m{priority % 3}"
    raw = msgspec.json.encode(body)
    req = Request("POST", "/v1/chat/completions", "", [], raw)
    req.principal = key
    return req, decode_view("chat", raw)


@settings(max_examples=300, deadline=None)
@given(
    policy=st.sampled_from(["fair", "fifo"]),
    cap=st.integers(1, 3),
    queue_size=st.integers(0, 4),
    aging_s=st.sampled_from([0.0, 1.0]),
    script=steps,
)
def test_no_slot_or_place_leaks(
    policy: str, cap: int, queue_size: int, aging_s: float, script: list[tuple]
) -> None:
    clock = trio.testing.MockClock()
    trio.run(_run, policy, cap, queue_size, aging_s, script, clock=clock)


async def _run(policy: str, cap: int, queue_size: int, aging_s: float, script: list[tuple]) -> None:
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)
    adm = Admission(cap, queue_size, 2.0, policy=policy, aging_s=aging_s)
    state: list[str] = []  # per client: queued, running, done, rejected, cancelled
    scopes: list[trio.CancelScope] = []
    releases: list[trio.Event] = []

    async def client(i: int, key: KeyEntry, priority: int) -> None:
        with scopes[i]:
            if not adm.enter():
                try:
                    await adm.wait(*request(key, priority))
                except Rejected:
                    state[i] = "rejected"
                    return
            state[i] = "running"
            try:
                await releases[i].wait()
            finally:
                adm.leave(0.0)
                state[i] = "done"
        if state[i] == "queued":
            state[i] = "cancelled"

    def check() -> None:
        running = state.count("running")
        queued = state.count("queued")
        assert adm.in_flight == running <= cap
        assert adm.queue_depth == queued == len(adm._queue) <= max(queue_size, 0)
        assert (
            sum(adm.waiting_by_model.values()) == queued and 0 not in adm.waiting_by_model.values()
        )
        if queued:
            assert running == cap, "a slot idles while a request waits"
        if isinstance(adm._queue, FairQueue):
            levels = adm._queue._levels
            assert sum(level.live for level in levels.values()) == queued
            assert all(level.live > 0 for level in levels.values())

    async with trio.open_nursery() as nursery:
        for step in script:
            if step[0] == "arrive":
                i = len(state)
                state.append("queued")
                scopes.append(trio.CancelScope())
                releases.append(trio.Event())
                nursery.start_soon(client, i, KEYS[step[1]], step[2])
            elif step[0] == "jump":
                clock.jump(step[1])
            else:
                want = ("queued", "running") if step[0] == "cancel" else ("running",)
                alive = [i for i, s in enumerate(state) if s in want]
                if alive:
                    i = alive[step[1] % len(alive)]
                    if step[0] == "cancel":
                        scopes[i].cancel()
                    else:
                        releases[i].set()
            await trio.testing.wait_all_tasks_blocked()
            check()
        for scope in scopes:
            scope.cancel()
    assert adm.in_flight == 0 and adm.queue_depth == 0 and len(adm._queue) == 0
    assert adm.waiting_by_model == {}
    if isinstance(adm._queue, FairQueue):
        assert not adm._queue._levels
    assert adm.enter()
