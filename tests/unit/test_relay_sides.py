"""Side legs of the compiled lane's loop (lmgw._fast.relay and its twin): a second exchange
of a request, sent with its main leg, whose answer only Python reads (an SGLang prefill leg).

Each test runs on both implementations, over real sockets: the client a socket pair, the main
leg's worker one TCP listener (slot 0), the side leg's another (slot 1).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_relay import (
    IMPLS,
    REQ,
    SSE_HEAD,
    Harness,
    answer,
    chunk,
    client_reads,
    harnesses,
    needs_c,
    relay_c,
)

from lmgw._fast import relay_py

SIDE_REQ = b"POST /prefill HTTP/1.1\r\nhost: p\r\ncontent-length: 2\r\n\r\nhi"


class SideHarness(Harness):
    """A harness whose requests carry a side leg to a second worker (slot 1)."""

    def __init__(self, impl: Any) -> None:
        super().__init__(impl)
        self.side_listener = socket.create_server(("127.0.0.1", 0))
        self.side_listener.setblocking(False)
        port = self.side_listener.getsockname()[1]
        self.relay.set_origin(1, relay_py.pack_sockaddr("127.0.0.1", port))
        self.side = (1, SIDE_REQ, 0.0)
        self.prefills: list[socket.socket] = []

    def step(self) -> None:
        select_on = [self.relay.fileno(), self.listener, self.side_listener]
        __import__("select").select(select_on, [], [], 0.01)
        try:
            p, _ = self.side_listener.accept()
            p.settimeout(5)
            self.prefills.append(p)
        except BlockingIOError:
            pass
        super().step()

    def sides(self) -> list[tuple[str, int, bytes]]:
        return [args for kind, args in self.calls if kind == "side"]

    def close(self) -> None:
        super().close()
        self.side_listener.close()
        for p in self.prefills:
            p.close()


sided = harnesses(SideHarness, "sided")


def both_sent(make: Callable[[], SideHarness]) -> tuple[SideHarness, socket.socket, socket.socket]:
    """A harness with one request whose main and side legs both reached their workers."""
    h = make()
    h.client.sendall(REQ)
    h.spin(lambda: h.workers and h.prefills and h.relay.in_flight == 1)
    w, p = h.workers[0], h.prefills[0]
    h.worker_reads(w, len(REQ) - 1)
    assert h.worker_reads(p, len(SIDE_REQ)) == SIDE_REQ
    assert h.relay.sides == 1
    return h, w, p


# -- framing -----------------------------------------------------------------------------------

_SIDE_HEADS = [
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
    b"HTTP/1.1 500 E\r\ncontent-length: 3\r\nconnection: close\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 204 No\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\n",
]
_CHUNK_PIECES = st.sampled_from(
    [b"5\r\nhello\r\n", b"0\r\n\r\n", b"3;ext=1\r\nabc\r\n", b" 2 \r\nhi\r\n",
     b"A\r\n0123456789\r\n", b"0\r\nx-trailer: 1\r\n\r\n", b"g\r\n", b"2\r\nabc\r\n",
     b"hello", b"\r\n", b"1\r\n"]
)  # fmt: skip


@st.composite
def side_answers(draw: Any) -> bytes:
    head = draw(st.sampled_from(_SIDE_HEADS))
    body = b"".join(draw(st.lists(_CHUNK_PIECES, max_size=5))) + draw(st.binary(max_size=6))
    whole = head + body
    return whole[: draw(st.integers(0, len(whole)))] if draw(st.booleans()) else whole


@needs_c
@settings(max_examples=400, deadline=None)
@given(side_answers(), st.sampled_from([0, 4, 12, 1 << 20]), st.booleans())
def test_side_frame_matches_the_twin(data: bytes, cap: int, eof: bool) -> None:
    assert relay_c.side_frame(data, cap, eof) == relay_py.side_frame(data, cap, eof)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_side_frames_by_hand(impl: Any) -> None:
    frame = impl.side_frame
    WHOLE, MORE, BAD = relay_py.WHOLE, relay_py.MORE, relay_py.BAD
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
    assert frame(ok + b"next", 1 << 20, False) == (WHOLE, len(ok), True)
    assert frame(ok[:-1], 1 << 20, False) == (MORE, 0, False)
    assert frame(ok, 4, False) == (BAD, 0, False)  # over the cap
    err = b"HTTP/1.1 503 Busy\r\ncontent-length: 2\r\nconnection: close\r\n\r\nno"
    assert frame(err, 1 << 20, False) == (WHOLE, len(err), False)  # any status: Python judges
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    body = b"5;x=y\r\nhello\r\n 1 \r\n!\r\n0\r\ntrailer: t\r\n\r\n"
    assert frame(head + body, 1 << 20, False) == (WHOLE, len(head + body), True)
    for cut in range(len(head), len(head + body)):
        assert frame((head + body)[:cut], 1 << 20, False)[0] == MORE
    assert frame(head + b"zz\r\n", 1 << 20, False)[0] == BAD
    assert frame(head + b"2\r\nabc\r\n", 1 << 20, False)[0] == BAD
    assert frame(head + b"1" * 2000, 1 << 20, False)[0] == BAD  # no end of a size line
    until_close = b"HTTP/1.1 200 OK\r\n\r\nall of it"
    assert frame(until_close, 1 << 20, False) == (MORE, 0, False)
    assert frame(until_close, 1 << 20, True) == (WHOLE, len(until_close), False)
    nobody = b"HTTP/1.1 204 No Content\r\n\r\n"
    assert frame(nobody + b"x", 1 << 20, False) == (WHOLE, len(nobody), True)
    assert frame(b"HTTP/1.0 200 OK\r\n\r\n", 1 << 20, True)[0] == BAD
    assert frame(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", 1 << 20, True)[0] == BAD


# -- the loop ----------------------------------------------------------------------------------


def test_a_side_leg_goes_with_its_request_and_its_connection_is_reused(
    sided: Callable[[], SideHarness],
) -> None:
    h, w, p = both_sent(sided)
    side_answer = answer(b"prefilled")
    p.sendall(side_answer)
    h.spin(lambda: h.sides())
    assert h.sides() == [("t1", 0, side_answer)]
    assert (h.relay.sides, h.relay.idle_in(1)) == (0, 1)  # back in its slot
    w.sendall(answer(b"decoded"))
    h.spin(lambda: "answer" in h.kinds())
    assert h.client.recv(100) == b"ANSWER decoded"
    # the next request's side leg takes the same connection
    h.client.sendall(REQ)
    h.spin(lambda: h.kinds().count("request") == 2 and h.relay.sides == 1)
    assert h.worker_reads(p, len(SIDE_REQ)) == SIDE_REQ
    assert len(h.prefills) == 1 and h.relay.reuses == 2


def test_a_side_leg_outlives_the_answer_of_its_request(sided: Callable[[], SideHarness]) -> None:
    h, w, p = both_sent(sided)
    w.sendall(answer(b"decoded"))
    h.spin(lambda: "answer" in h.kinds())
    assert h.client.recv(100) == b"ANSWER decoded"
    assert (h.relay.in_flight, h.relay.sides) == (0, 1)
    h.side_says = True  # its request is over: nothing to end
    head = b"HTTP/1.1 500 E\r\ntransfer-encoding: chunked\r\n\r\n"
    body = chunk(b"late") + b"0\r\n\r\n"
    p.sendall(head)
    h.step()
    p.sendall(body)
    h.spin(lambda: h.sides())
    assert h.sides() == [("t1", 0, head + body)]
    assert h.relay.sides == 0 and "failure" not in h.kinds()
    h.client.sendall(REQ)  # the client's connection goes on
    h.spin(lambda: h.kinds().count("request") == 2)


def test_a_failed_side_leg_ends_its_request_when_python_says(
    sided: Callable[[], SideHarness],
) -> None:
    h, w, p = both_sent(sided)
    h.side_says = True
    p.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\npart")
    p.close()
    h.spin(lambda: "failure" in h.kinds())
    read = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\npart"
    assert h.sides() == [("t1", relay_py.DROPPED, read)]
    token, kind, sent, _, _ = h.calls[-2][1]
    assert (token, kind, sent) == ("t1", relay_py.SIDE, True)
    assert h.calls[-1] == ("demote", ("client-1", b"", "cont-failure"))
    assert w.recv(10) == b""  # the main leg's worker sees its connection close
    assert (h.relay.in_flight, h.relay.sides, h.relay.upstreams) == (0, 0, 0)


def test_a_failed_side_leg_python_ignores_leaves_the_request_alone(
    sided: Callable[[], SideHarness],
) -> None:
    h, w, p = both_sent(sided)
    p.close()
    h.spin(lambda: h.sides())
    assert h.sides()[0][1] == relay_py.DROPPED
    w.sendall(answer(b"decoded"))
    h.spin(lambda: "answer" in h.kinds())
    assert h.client.recv(100) == b"ANSWER decoded"


def test_a_failed_side_leg_breaks_a_stream_when_python_says(
    sided: Callable[[], SideHarness],
) -> None:
    from lmgw.transport.sse_stream import SseStream

    h = sided()
    h.stream = SseStream
    h.side_says = True
    h.client.sendall(REQ)
    h.spin(lambda: h.workers and h.prefills and h.relay.in_flight == 1)
    w, p = h.workers[0], h.prefills[0]
    h.worker_reads(w, len(REQ) - 1)
    w.sendall(SSE_HEAD + chunk(b"data: 1\n\n"))
    client_reads(h, b"data: 1\n\n\r\n")
    p.sendall(b"HTTP/1.1 400 Bad\r\ncontent-length: 3\r\n\r\nbad")
    got = client_reads(h, b"|BROKEN")
    assert got == b"|BROKEN"
    assert h.sides()[0][1] == 0
    assert h.calls[-1] == ("broken", ("t1", relay_py.SIDE, b""))
    assert w.recv(10) == b""


def test_the_main_legs_failure_cancels_the_side_leg_first(
    sided: Callable[[], SideHarness],
) -> None:
    h, w, p = both_sent(sided)
    w.close()
    h.spin(lambda: "failure" in h.kinds())
    kinds = h.kinds()
    assert kinds.index("side") < kinds.index("failure")
    assert h.sides() == [("t1", relay_py.CANCELLED, b"")]
    assert h.calls[kinds.index("failure")][1][1] == relay_py.DROPPED
    assert p.recv(10) == b""  # the side leg's worker sees the cancel
    assert h.relay.sides == 0


@pytest.mark.parametrize("end", ["gone", "handoff", "close"])
def test_a_request_that_ends_otherwise_cancels_its_side_leg(
    sided: Callable[[], SideHarness], end: str
) -> None:
    h, w, p = both_sent(sided)
    if end == "gone":
        h.client.close()
        h.spin(lambda: "abandon" in h.kinds())
    elif end == "handoff":
        w.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\nno")
        h.spin(lambda: "handoff" in h.kinds())
    else:
        h.relay.close()
    assert h.sides() == [("t1", relay_py.CANCELLED, b"")]
    ends = {"gone": "abandon", "handoff": "handoff", "close": "abandon"}
    assert h.kinds().index("side") < h.kinds().index(ends[end])
    assert p.recv(10) == b""


def test_the_deadline_cancels_the_side_leg(sided: Callable[[], SideHarness]) -> None:
    h = sided()
    h.deadline = time.perf_counter() + 0.05
    h.client.sendall(REQ)
    h.spin(lambda: h.workers and h.prefills and h.relay.in_flight == 1)
    p = h.prefills[0]
    h.spin(lambda: (h.relay.sweep(time.perf_counter()), "timeout" in h.kinds())[1])
    assert h.sides() == [("t1", relay_py.CANCELLED, b"")]
    assert h.kinds().index("side") < h.kinds().index("timeout")
    assert h.client.recv(100) == b"TIMEOUT"
    assert h.worker_reads(p, len(SIDE_REQ)) == SIDE_REQ
    assert p.recv(10) == b""


def test_a_side_leg_past_its_response_deadline_times_out(
    sided: Callable[[], SideHarness],
) -> None:
    h = sided()
    h.side = (1, SIDE_REQ, time.perf_counter() + 0.05)
    h.client.sendall(REQ)
    h.spin(lambda: h.workers and h.prefills and h.relay.in_flight == 1)
    h.spin(lambda: (h.relay.sweep(time.perf_counter()), h.sides())[1])
    assert h.sides() == [("t1", relay_py.TIMEOUT, b"")]
    assert h.relay.in_flight == 1  # on_side said nothing: the main leg goes on


def test_a_side_leg_that_cannot_connect_ends_its_request_before_the_main_leg_goes(
    sided: Callable[[], SideHarness],
) -> None:
    h = sided()
    closed = socket.create_server(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    h.relay.set_origin(1, relay_py.pack_sockaddr("127.0.0.1", dead_port))
    h.side_says = True
    h.client.sendall(REQ)
    h.spin(lambda: "failure" in h.kinds())
    assert h.sides()[0][:2] == ("t1", relay_py.CONNECT)
    assert h.calls[-2][1][1] == relay_py.SIDE
    assert (h.relay.in_flight, h.relay.sides) == (0, 0)


def test_an_unknown_side_slot_fails_at_once(sided: Callable[[], SideHarness]) -> None:
    h = sided()
    h.side = (7, SIDE_REQ, 0.0)  # no such origin
    h.side_says = True
    h.client.sendall(REQ)
    h.spin(lambda: "failure" in h.kinds())
    assert h.sides() == [("t1", relay_py.CONNECT, b"")]
    assert h.workers == []  # the main leg never left


def test_a_side_answer_without_a_length_ends_when_the_worker_closes(
    sided: Callable[[], SideHarness],
) -> None:
    h, _w, p = both_sent(sided)
    p.sendall(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    h.step()
    assert h.sides() == []
    p.close()
    h.spin(lambda: h.sides())
    assert h.sides() == [("t1", 0, b"HTTP/1.1 200 OK\r\n\r\nuntil the end")]
    assert h.relay.idle_in(1) == 0


def test_a_side_answer_that_cannot_be_read_is_a_protocol_failure(
    sided: Callable[[], SideHarness],
) -> None:
    h, _w, p = both_sent(sided)
    p.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nnot-hex\r\n")
    h.spin(lambda: h.sides())
    assert h.sides()[0][1] == relay_py.PROTOCOL
    assert p.recv(10) == b""


def test_abort_origin_reaches_side_legs(sided: Callable[[], SideHarness]) -> None:
    h, _w, _p = both_sent(sided)
    assert h.relay.abort_origin(1) == 1
    h.spin(lambda: h.sides())
    assert h.sides()[0][1] == relay_py.ABORTED


def test_close_cancels_the_side_legs_that_outlived_their_request(
    sided: Callable[[], SideHarness],
) -> None:
    h, w, p = both_sent(sided)
    w.sendall(answer(b"decoded"))
    h.spin(lambda: "answer" in h.kinds())
    h.relay.close()
    assert h.sides() == [("t1", relay_py.CANCELLED, b"")]
    assert p.recv(10) == b""
