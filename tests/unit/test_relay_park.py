"""Parked requests in the compiled lane's loop (lmgw._fast.relay and its twin): a request that
waits with no upstream leg (in the admission queue) until Python resumes it with a plan,
answers it, or hands its connection over; its deadline and its client's leaving still end it.

Each test runs on both implementations, over real sockets (test_relay's harness).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from test_relay import REQ, Harness, answer, harnesses

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
