"""Parked requests in the compiled lane's loop (lmgw._fast.relay and its twin): a request that
waits with no upstream leg (in the admission queue) until Python resumes it with a plan,
answers it, or hands its connection over; its deadline and its client's leaving still end it.

Each test runs on both implementations, over real sockets (test_relay's harness).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_relay import IMPLS, REQ, Harness, answer, harnesses

from lmgw._fast import relay_py


class ParkHarness(Harness):
    """Every request is parked; ``parked`` keeps its token."""

    def __init__(self, impl: Any) -> None:
        super().__init__(impl, plan=self._park)
        self.parked: list[str] = []

    def _park(self, data: bytes) -> Any:
        self.tokens += 1
        token = f"t{self.tokens}"
        self.parked.append(token)
        return (relay_py.PARK, b"", token, self.deadline, 0.0)

    def forward(self, token: str) -> tuple:
        return (0, REQ.replace(b"host: gw", b"host: w"), token, self.deadline, 0.0)


parking = harnesses(ParkHarness, "parking")


def _parked(h: ParkHarness, n: int = 1) -> None:
    h.spin(lambda: len(h.parked) == n and h.relay.in_flight == 1)


def test_a_parked_request_resumed_goes_upstream_and_is_answered(
    parking: Callable[[], ParkHarness],
) -> None:
    h = parking()
    h.client.sendall(REQ)
    _parked(h)
    for _ in range(3):  # parked: nothing goes anywhere
        h.step()
    assert not h.workers and h.kinds() == ["request"]
    token = h.parked[0]
    assert h.relay.resume(token, h.forward(token), time.perf_counter())
    h.spin(lambda: h.workers)
    w = h.workers[0]
    sent = REQ.replace(b"host: gw", b"host: w")
    assert h.worker_reads(w, len(sent)) == sent
    w.sendall(answer(b"late"))
    h.spin(lambda: "answer" in h.kinds())
    assert h.client.recv(100) == b"ANSWER late"
    assert h.relay.in_flight == 0
    assert not h.relay.resume(token, h.forward(token), time.perf_counter())  # (once)
    # the connection is the lane's as before: the next request is parked too
    h.client.sendall(REQ)
    _parked(h, 2)


def test_a_parked_request_answered_from_python(parking: Callable[[], ParkHarness]) -> None:
    h = parking()
    h.client.sendall(REQ + REQ)  # (a pipelined second request waits its turn)
    _parked(h)
    assert h.relay.reply(h.parked[0], b"HTTP/1.1 429 X\r\n\r\n", True, time.perf_counter())
    assert h.client.recv(100) == b"HTTP/1.1 429 X\r\n\r\n"
    _parked(h, 2)  # the pipelined one, dispatched after the answer
    assert not h.relay.reply(h.parked[0], b"again", True, time.perf_counter())
    assert h.relay.reply(h.parked[1], b"bye", False, time.perf_counter())
    h.spin(lambda: h.relay.clients == 0)
    assert h.client.recv(100) == b"bye" and h.client.recv(100) == b""


def test_a_parked_requests_connection_handed_over(parking: Callable[[], ParkHarness]) -> None:
    h = parking()
    h.client.sendall(REQ)
    _parked(h)
    assert h.relay.hand(h.parked[0], "cont-parked")
    assert h.calls[-1] == ("demote", ("client-1", b"", "cont-parked"))
    assert h.relay.in_flight == 0 and h.relay.clients == 0
    assert not h.relay.hand(h.parked[0], "again")


def test_a_parked_requests_deadline_and_then_a_late_resume(
    parking: Callable[[], ParkHarness],
) -> None:
    h = parking()
    h.deadline = time.perf_counter() + 0.05
    h.client.sendall(REQ)
    _parked(h)
    while "timeout" not in h.kinds():
        h.step()
        h.relay.sweep(time.perf_counter())
    assert h.calls[-1] == ("timeout", h.parked[0])
    assert h.client.recv(100) == b"TIMEOUT"
    assert h.relay.in_flight == 0
    token = h.parked[0]
    assert not h.relay.resume(token, h.forward(token), time.perf_counter())
    assert not h.workers


def test_a_parked_requests_client_gone(parking: Callable[[], ParkHarness]) -> None:
    h = parking()
    h.client.sendall(REQ)
    _parked(h)
    h.client.close()
    h.spin(lambda: "abandon" in h.kinds())
    assert h.calls[-1] == ("abandon", h.parked[0]) and h.relay.in_flight == 0
    assert not h.relay.reply(h.parked[0], b"late", True, time.perf_counter())


def test_closing_the_relay_abandons_the_parked(parking: Callable[[], ParkHarness]) -> None:
    h = parking()
    h.client.sendall(REQ)
    _parked(h)
    h.relay.close()
    assert ("abandon", h.parked[0]) in h.calls and h.relay.in_flight == 0
    assert not h.relay.resume(h.parked[0], h.forward(h.parked[0]), time.perf_counter())


def test_a_resumed_request_parked_again_keeps_its_new_deadlines(
    parking: Callable[[], ParkHarness],
) -> None:
    """A ``PARK`` plan given to resume (the native lane: the request got its slot and now
    waits for a worker's answer) parks it again under that plan's deadlines."""
    h = parking()
    h.client.sendall(REQ)
    _parked(h)
    token = h.parked[0]
    now = time.perf_counter()
    assert h.relay.resume(token, (relay_py.PARK, b"", token, 0.0, now + 0.05), now)
    assert h.relay.in_flight == 1 and not h.workers
    while "failure" not in h.kinds():  # its response deadline: the relay's TIMEOUT
        h.step()
        h.relay.sweep(time.perf_counter())
    failure = next(args for kind, args in h.calls if kind == "failure")
    assert failure[:2] == (token, relay_py.TIMEOUT)
    assert h.calls[-1][0] == "demote"  # (with the continuation on_failure gave)
    assert h.relay.in_flight == 0
    assert not h.relay.reply(token, b"late", True, time.perf_counter())


def _recv_exactly(sock: Any, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk
        data += chunk
    return data


def test_a_parked_request_answered_as_a_stream_python_writes(
    parking: Callable[[], ParkHarness],
) -> None:
    """push() writes each part (a native worker's events), reply() the last bytes; then the
    connection goes on with its next request. Nothing is written after the end."""
    h = parking()
    h.client.sendall(REQ + REQ)
    _parked(h)
    token, now = h.parked[0], time.perf_counter()
    for part in (b"HEAD|", b"e1|", b"e2|"):
        assert h.relay.push(token, part, 0.0, now)
    assert h.relay.in_flight == 1
    assert h.relay.reply(token, b"END", True, now)
    assert _recv_exactly(h.client, 14) == b"HEAD|e1|e2|END"
    _parked(h, 2)  # the pipelined request, after the stream
    assert not h.relay.push(token, b"late", 0.0, now)
    assert not h.relay.reply(token, b"late", True, now)


def test_a_pushed_stream_keeps_what_a_slow_client_has_not_taken(
    parking: Callable[[], ParkHarness],
) -> None:
    h = parking()
    h.client.sendall(REQ)
    _parked(h)
    token, now = h.parked[0], time.perf_counter()
    big = b"x" * (1 << 20)  # more than the socket pair takes at once
    for _ in range(4):
        assert h.relay.push(token, big, 0.0, now)
    assert h.relay.reply(token, b"END", False, now)
    got = b""
    while len(got) < 4 * len(big) + 3:
        h.step()  # the loop writes the rest as the client reads
        h.client.settimeout(0.01)
        try:
            got += h.client.recv(1 << 20)
        except TimeoutError:
            pass
    assert got == big * 4 + b"END"
    h.spin(lambda: h.relay.clients == 0)  # (keep False: closed after the end)


def test_a_pushed_stream_that_breaks_or_stalls_ends_through_on_broken(
    parking: Callable[[], ParkHarness],
) -> None:
    h = parking()
    h.client.sendall(REQ + REQ)
    _parked(h)
    token, now = h.parked[0], time.perf_counter()
    assert not h.relay.broke(token, relay_py.PROTOCOL, now)  # parked: not a stream yet
    assert h.relay.push(token, b"HEAD|", 0.0, now)
    assert h.relay.broke(token, relay_py.PROTOCOL, now)
    assert h.calls[-1][0] == "request"  # (the pipelined one, after the stream's tail)
    assert ("broken", (token, relay_py.PROTOCOL, b"")) in h.calls
    assert _recv_exactly(h.client, 12) == b"HEAD||BROKEN"
    _parked(h, 2)
    token = h.parked[1]
    assert h.relay.push(token, b"a|", time.perf_counter() + 0.05, time.perf_counter())
    while ("broken", (token, relay_py.TIMEOUT, b"")) not in h.calls:
        h.step()
        h.relay.sweep(time.perf_counter())  # the stall deadline the push gave
    assert ("broken", (token, relay_py.TIMEOUT, b"")) in h.calls
    assert _recv_exactly(h.client, 9) == b"a||BROKEN"


def test_a_pushed_streams_client_gone(parking: Callable[[], ParkHarness]) -> None:
    h = parking()
    h.client.sendall(REQ)
    _parked(h)
    token = h.parked[0]
    assert h.relay.push(token, b"HEAD|", 0.0, time.perf_counter())
    h.client.close()
    h.spin(lambda: "abandon" in h.kinds())
    assert h.calls[-1] == ("abandon", token) and h.relay.in_flight == 0
    assert not h.relay.push(token, b"late", 0.0, time.perf_counter())


def test_a_pushed_stream_too_far_behind_is_given_up(parking: Callable[[], ParkHarness]) -> None:
    """A client that takes nothing while PUSH_MAX bytes wait for it: the push says so, and
    the loop abandons the request (its source cannot be made to wait)."""
    h = parking()
    h.client.sendall(REQ)
    _parked(h)
    token, now = h.parked[0], time.perf_counter()
    part = b"x" * (1 << 20)
    pushed = 0
    while h.relay.push(token, part, 0.0, now):
        pushed += len(part)
        assert pushed <= relay_py.PUSH_MAX + 2 * len(part)
    assert pushed >= relay_py.PUSH_MAX
    h.spin(lambda: "abandon" in h.kinds())
    assert h.calls[-1] == ("abandon", token) and h.relay.in_flight == 0


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=300_000), min_size=1, max_size=8),
    st.binary(max_size=2000),
    st.booleans(),
    st.lists(st.integers(1, 400_000), max_size=6),
)
def test_pushed_parts_reach_the_client_whole_and_in_order(
    parts: list[bytes], tail: bytes, keep: bool, reads: list[int]
) -> None:
    """Whatever the parts' sizes and however the client reads meanwhile: it gets every part
    in order, then the tail, on both twins alike; then the connection goes on or closes as
    asked."""
    for impl in IMPLS:
        h = ParkHarness(impl)
        try:
            h.client.sendall(REQ)
            _parked(h)
            token = h.parked[0]
            got = b""
            for i, part in enumerate(parts):
                assert h.relay.push(token, part, 0.0, time.perf_counter())
                if i < len(reads):  # the client takes some now and then
                    h.client.settimeout(0.01)
                    try:
                        got += h.client.recv(reads[i])
                    except TimeoutError:
                        pass
                    h.step()
            assert h.relay.reply(token, tail, keep, time.perf_counter())
            want = b"".join(parts) + tail
            h.client.settimeout(0.01)
            while len(got) < len(want):
                h.step()
                try:
                    got += h.client.recv(1 << 20)
                except TimeoutError:
                    pass
            assert got == want
            assert h.relay.in_flight == 0
            if not keep:
                relay = h.relay
                h.spin(lambda: relay.clients == 0)  # noqa: B023 (spun here, in this turn)
        finally:
            h.close()
