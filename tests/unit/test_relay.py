"""The compiled lane's loop (lmgw._fast.relay) and its pure-Python twin, side by side.

The framing functions are compared on generated messages (the twin is the reference); the loop
is driven without trio, over real sockets: a client socket pair and a TCP listener standing in
for the worker, every callback recorded.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw._fast import relay_py
from lmgw.http.h1parse import parse_request

try:
    from lmgw._fast import relay as relay_c
except ImportError:  # pragma: no cover - the extension is built by `make build`
    relay_c = None

IMPLS = [relay_py] + ([relay_c] if relay_c is not None else [])
needs_c = pytest.mark.skipif(relay_c is None, reason="the extension is not built")

# -- framing ---------------------------------------------------------------------------------

_names = st.sampled_from(
    [b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Host", b"Connection",
     b"Transfer-Encoding", b"Expect", b"Upgrade", b"X-Other", b"content-type"]
)  # fmt: skip
_values = st.one_of(
    st.sampled_from([b"0", b"5", b"12", b"close", b"keep-alive", b"chunked", b"abc", b"",
                     b" 7 ", b"99999999999999999999", b"Close"]),
    st.binary(max_size=8).filter(lambda v: b"\r" not in v and b"\n" not in v),
)  # fmt: skip


@st.composite
def messages(draw: Any, response: bool) -> bytes:
    first = (
        draw(
            st.sampled_from(
                [
                    b"HTTP/1.1 200 OK",
                    b"HTTP/1.1 404 Not Found",
                    b"HTTP/1.1 204 No",
                    b"HTTP/1.1 301 M",
                    b"HTTP/1.0 200 OK",
                    b"HTTP/1.1 2x0 OK",
                    b"HTTP/1.1 100 Continue",
                    b"HTTP/1.1 200",
                ]
            )
        )
        if response
        else draw(
            st.sampled_from(
                [b"POST /v1/chat/completions HTTP/1.1", b"GET / HTTP/1.1", b"POST /x HTTP/1.0"]
            )
        )
    )
    headers = draw(st.lists(st.tuples(_names, _values), max_size=5))
    head = first + b"".join(b"\r\n" + k + b": " + v for k, v in headers) + b"\r\n\r\n"
    body = draw(st.binary(max_size=40))
    tail = draw(st.binary(max_size=8))
    cut = draw(st.integers(0, len(head) + len(body) + len(tail)))
    whole = head + body + tail
    return whole[:cut] if draw(st.booleans()) else whole


@needs_c
@settings(max_examples=400, deadline=None)
@given(messages(False), st.integers(0, 200), st.integers(0, 60))
def test_request_frame_matches_the_twin(data: bytes, max_head: int, max_body: int) -> None:
    assert relay_c.request_frame(data, max_head, max_body) == relay_py.request_frame(
        data, max_head, max_body
    )


@needs_c
@settings(max_examples=400, deadline=None)
@given(messages(True), st.integers(0, 60))
def test_response_frame_matches_the_twin(data: bytes, cap: int) -> None:
    assert relay_c.response_frame(data, cap) == relay_py.response_frame(data, cap)


@settings(max_examples=300, deadline=None)
@given(messages(False))
def test_a_whole_simple_request_is_framed_whole(data: bytes) -> None:
    """What the server's one-call parser takes whole, the lane frames to the same length."""
    parts = parse_request(data, 65536, 1 << 20)
    if parts is not None:
        for impl in IMPLS:
            assert impl.request_frame(data, 65536, 1 << 20) == len(data)


def test_frames_by_hand() -> None:
    req = b"POST /v1/completions HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
    for impl in IMPLS:
        assert impl.request_frame(req, 65536, 100) == len(req)
        assert impl.request_frame(req + b"POST", 65536, 100) == len(req)  # pipelined
        assert impl.request_frame(req[:-1], 65536, 100) == relay_py.MORE
        assert impl.request_frame(req, 65536, 2) == relay_py.NOT_OURS  # body over the cap
        chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        assert impl.request_frame(chunked, 65536, 100) == relay_py.NOT_OURS
        assert impl.request_frame(b"x" * 70, 64, 100) == relay_py.NOT_OURS  # no head end
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
        assert impl.response_frame(ok, 100) == (relay_py.WHOLE, len(ok), False)
        assert impl.response_frame(ok[:-1], 100)[0] == relay_py.MORE
        bad = b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\nhi"
        assert impl.response_frame(bad, 100)[0] == relay_py.HANDOFF
        assert impl.response_frame(ok, 1)[0] == relay_py.HANDOFF  # over the cap


def test_pack_sockaddr() -> None:
    packed = relay_py.pack_sockaddr("127.0.0.1", 8080)
    assert packed is not None and len(packed) == 16
    assert relay_py._address(socket.AF_INET, packed) == ("127.0.0.1", 8080)
    six = relay_py.pack_sockaddr("::1", 9)
    assert six is not None and len(six) == 28
    assert relay_py._address(socket.AF_INET6, six)[:2] == ("::1", 9)
    assert relay_py.pack_sockaddr("worker.local", 80) is None


# -- the loop ----------------------------------------------------------------------------------

REQ = b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\nhi"


def answer(body: bytes = b"ok", status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-length: %d\r\n%s\r\n%s" % (status, len(body), extra, body)


class Harness:
    """A relay of ``impl`` with one client (a socket pair) and one worker (a listener)."""

    def __init__(self, impl: Any, plan: Callable[[bytes], Any] | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.plan = plan or (lambda data: "forward")
        self.deadline = 0.0
        #: streams: each request's answer is relayed as a stream when this makes its state
        self.stream: Callable[[], Any] | None = None
        self.streams: list[Any] = []
        #: what on_broken answers: None for the tail b"BROKEN", else a continuation
        self.broken_cont: Any = None
        #: SSE keep-alives: plans ask for them (a seventh item); what on_beat gives (None:
        #: b"H|" and b"B|" the first time, b"B|" after; or this function's answer)
        self.beats = False
        self.beat: Callable[[str], Any] | None = None
        self.head_out = False
        #: side legs: plans carry this one (an eighth item), and on_side answers ``side_says``
        self.side: tuple | None = None
        self.side_says: Any = False
        self.relay = impl.Relay(
            self._request,
            self._answer,
            self._handoff,
            self._failure,
            self._timeout,
            self._abandon,
            self._demote,
            on_stream=self._stream,
            on_first=self._first,
            on_stream_end=self._stream_end,
            on_broken=self._broken,
            on_beat=self._beat,
            on_side=self._side,
            beat_s=0.05,
            keepalive_s=5.0,
            partial_s=0.2,
        )
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.relay.set_origin(0, relay_py.pack_sockaddr("127.0.0.1", self.port))
        self.client, theirs = socket.socketpair()
        self.client.settimeout(5)
        theirs.setblocking(False)
        self.relay.add_client(theirs.detach(), "client-1", time.perf_counter())
        self.workers: list[socket.socket] = []
        self.tokens = 0

    # callbacks
    def _request(self, ident: str, data: bytes) -> Any:
        self.calls.append(("request", data))
        what = self.plan(data)
        if what == "forward":
            self.tokens += 1
            plan = (0, data.replace(b"host: gw", b"host: w"), f"t{self.tokens}", self.deadline, 0.0)
            if self.stream is not None:
                self.streams.append(self.stream())
                plan = (*plan, self.streams[-1], self.beats)
            if self.side is not None:
                plan = (*(*plan, None, False)[:7], self.side)
            return plan
        return what

    def _answer(self, token: str, data: bytes) -> Any:
        self.calls.append(("answer", (token, data)))
        return b"ANSWER " + data.split(b"\r\n\r\n", 1)[1], True

    def _handoff(self, token: str, fd: int, data: bytes) -> Any:
        self.calls.append(("handoff", (token, data)))
        socket.close(fd)
        return "cont-handoff"

    def _failure(self, token: str, kind: int, sent: bool, reused: bool, got: bool) -> Any:
        self.calls.append(("failure", (token, kind, sent, reused, got)))
        return "cont-failure"

    def _timeout(self, token: str) -> bytes:
        self.calls.append(("timeout", token))
        return b"TIMEOUT"

    def _stream(self, token: str, head: bytes) -> Any:
        self.calls.append(("stream", (token, head)))
        if b"event-stream" not in head:
            return None
        if self.head_out:
            return b"", True
        self.head_out = True
        return b"HEAD|", True

    def _beat(self, token: str) -> Any:
        self.calls.append(("beat", token))
        if self.beat is not None:
            return self.beat(token)
        if self.head_out:
            return b"B|"
        self.head_out = True
        return b"H|B|"

    def _side(self, token: str, kind: int, data: bytes) -> Any:
        self.calls.append(("side", (token, kind, data)))
        return self.side_says

    def _first(self, token: str) -> None:
        self.calls.append(("first", token))

    def _stream_end(self, token: str) -> None:
        self.calls.append(("stream_end", token))

    def _broken(self, token: str, kind: int, unsent: bytes) -> Any:
        self.calls.append(("broken", (token, kind, unsent)))
        return (b"|BROKEN", True) if self.broken_cont is None else self.broken_cont

    def _abandon(self, token: str) -> None:
        self.calls.append(("abandon", token))

    def _demote(self, ident: str, fd: int, pending: bytes, cont: Any) -> None:
        self.calls.append(("demote", (ident, pending, cont)))
        socket.close(fd)

    # driving
    def spin(self, until: Callable[[], bool], timeout: float = 3.0) -> None:
        end = time.monotonic() + timeout
        while not until():
            if time.monotonic() > end:
                raise AssertionError(f"timed out; calls: {self.calls}")
            self.step()

    def step(self) -> None:
        """One pass of the loop (after waiting up to 10 ms for an event)."""
        select.select([self.relay.fileno(), self.listener], [], [], 0.01)
        try:
            w, _ = self.listener.accept()
            w.settimeout(5)
            self.workers.append(w)
        except BlockingIOError:
            pass
        self.relay.run(time.perf_counter())

    def kinds(self) -> list[str]:
        return [k for k, _ in self.calls]

    def worker_reads(self, worker: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = worker.recv(65536)
            assert chunk
            data += chunk
        return data

    def close(self) -> None:
        self.relay.close()
        self.client.close()
        self.listener.close()
        for w in self.workers:
            w.close()


def harnesses(cls: type[Harness], name: str) -> Any:
    """A fixture ``name`` that makes ``cls`` harnesses (its arguments after the relay's
    implementation's), on each implementation, and closes them after the test."""

    @pytest.fixture(params=IMPLS, ids=lambda m: m.__name__.rsplit(".", 1)[1], name=name)
    def fixture(request: pytest.FixtureRequest):
        made: list[Harness] = []

        def make(*args: Any, **kwargs: Any) -> Any:
            h = cls(request.param, *args, **kwargs)
            made.append(h)
            return h

        yield make
        for h in made:
            h.close()

    return fixture


harness = harnesses(Harness, "harness")


def test_a_request_and_its_answer_then_keep_alive(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.client.sendall(REQ)
    h.spin(lambda: h.workers)
    w = h.workers[0]
    h.spin(lambda: h.relay.in_flight == 1)
    sent = REQ.replace(b"host: gw", b"host: w")
    assert h.worker_reads(w, len(sent)) == sent
    w.sendall(answer(b"first"))
    h.spin(lambda: "answer" in h.kinds())
    assert h.client.recv(100) == b"ANSWER first"
    # the same upstream connection serves the next request
    h.client.sendall(REQ)
    h.spin(lambda: h.kinds().count("request") == 2 and h.relay.in_flight == 1)
    assert h.worker_reads(w, len(sent)) == sent
    w.sendall(answer(b"second"))
    h.spin(lambda: h.kinds().count("answer") == 2)
    assert h.client.recv(100) == b"ANSWER second"
    assert (h.relay.connects, h.relay.reuses, h.relay.in_flight) == (1, 1, 0)
    assert h.relay.idle_upstreams() == 1


def test_a_request_whose_worker_connection_grows_the_table(
    harness: Callable[..., Harness],
) -> None:
    """The worker's connection is the first fd past the connection table (1024 entries):
    the table grows under the request being started, which must still own its connection
    (a client gone meanwhile closes it: the worker sees the abort)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"needs 1100 file descriptors (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    held: list[int] = []
    try:
        h = harness()
        while True:  # every fd below 1024 taken: the worker's connection gets one above
            fd = os.open(os.devnull, os.O_RDONLY)
            held.append(fd)
            if fd >= 1023:
                break
        h.client.sendall(REQ)
        h.spin(lambda: h.workers and h.relay.in_flight == 1)
        w = h.workers[0]
        assert h.worker_reads(w, len(REQ) - 1)
        h.client.close()
        h.spin(lambda: "abandon" in h.kinds())
        assert w.recv(10) == b""  # the abort: the client's exchange owned the connection
        assert (h.relay.in_flight, h.relay.upstreams) == (0, 0)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_pipelined_requests_are_answered_in_order(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.client.sendall(REQ + REQ.replace(b"hi", b"yo"))
    h.spin(lambda: h.workers and h.relay.in_flight == 1)
    w = h.workers[0]
    h.worker_reads(w, len(REQ) - 1)
    assert h.kinds() == ["request"]  # the second waits for the first's answer
    w.sendall(answer(b"one"))
    h.spin(lambda: h.kinds().count("request") == 2)
    assert h.worker_reads(w, len(REQ) - 1).endswith(b"yo")
    w.sendall(answer(b"two"))
    h.spin(lambda: h.kinds().count("answer") == 2)
    got = b""
    while len(got) < len(b"ANSWER oneANSWER two"):
        got += h.client.recv(100)
    assert got == b"ANSWER oneANSWER two"


def test_a_client_gone_mid_request_abandons_it_and_closes_upstream(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    h.client.sendall(REQ)
    h.spin(lambda: h.workers and h.relay.in_flight == 1)
    w = h.workers[0]
    h.worker_reads(w, len(REQ) - 1)
    h.client.close()
    h.spin(lambda: "abandon" in h.kinds())
    assert w.recv(10) == b""  # the worker sees the connection close: that is the abort
    assert (h.relay.in_flight, h.relay.clients, h.relay.upstreams) == (0, 0, 0)
    assert h.relay.take_closed() == ["client-1"]


def test_a_request_not_for_the_lane_is_handed_back_with_its_bytes(
    harness: Callable[..., Harness],
) -> None:
    h = harness(plan=lambda data: None)
    h.client.sendall(REQ + b"GET /next")
    h.spin(lambda: "demote" in h.kinds())
    assert h.calls[-1][1] == ("client-1", REQ + b"GET /next", None)
    assert h.relay.clients == 0 and h.relay.take_closed() == []  # handed over, not closed


def test_a_continuation_takes_the_request_out_of_the_buffer(
    harness: Callable[..., Harness],
) -> None:
    h = harness(plan=lambda data: "cont")
    h.client.sendall(REQ + b"GET /next")
    h.spin(lambda: "demote" in h.kinds())
    assert h.calls[-1][1] == ("client-1", b"GET /next", "cont")


def test_an_error_answer_is_handed_over_with_its_connection(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    h.client.sendall(REQ)
    h.spin(lambda: h.workers and h.relay.in_flight == 1)
    h.worker_reads(h.workers[0], len(REQ) - 1)
    h.workers[0].sendall(answer(b"nope", b"503 Busy"))
    h.spin(lambda: "demote" in h.kinds())
    assert h.kinds()[-2:] == ["handoff", "demote"]
    assert h.calls[-2][1] == ("t1", answer(b"nope", b"503 Busy"))
    assert h.calls[-1][1][2] == "cont-handoff"
    assert h.relay.upstreams == 0 and h.relay.in_flight == 0


def test_a_refused_connect_is_a_failure_before_sending(harness: Callable[..., Harness]) -> None:
    h = harness()
    closed = socket.create_server(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    h.relay.set_origin(0, relay_py.pack_sockaddr("127.0.0.1", dead_port))
    h.client.sendall(REQ)
    h.spin(lambda: "failure" in h.kinds())
    _, kind, sent, reused, got = h.calls[-2][1]
    assert (kind, sent, reused, got) == (relay_py.CONNECT, False, False, False)
    assert h.calls[-1] == ("demote", ("client-1", b"", "cont-failure"))


def test_a_worker_dropping_the_request_is_a_failure_after_sending(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    h.client.sendall(REQ)
    h.spin(lambda: h.workers and h.relay.in_flight == 1)
    h.worker_reads(h.workers[0], len(REQ) - 1)
    h.workers[0].sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\npartial")
    h.workers[0].close()
    h.spin(lambda: "failure" in h.kinds())
    _, kind, sent, reused, got = h.calls[-2][1]
    assert (kind, sent, reused, got) == (relay_py.DROPPED, True, False, True)


def test_abort_origin_fails_the_waiting_request_on_the_next_pass(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    h.client.sendall(REQ)
    h.spin(lambda: h.workers and h.relay.in_flight == 1)
    assert h.relay.abort_origin(0) == 1
    assert "failure" not in h.kinds()  # the caller is not re-entered
    h.spin(lambda: "failure" in h.kinds())
    assert h.calls[-2][1][1] == relay_py.ABORTED


def test_the_deadline_answers_and_closes(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.deadline = time.perf_counter() + 0.05
    h.client.sendall(REQ)
    h.spin(lambda: h.workers and h.relay.in_flight == 1)
    w = h.workers[0]
    h.relay.sweep(time.perf_counter())
    assert "timeout" not in h.kinds()
    time.sleep(0.06)
    h.relay.sweep(time.perf_counter())
    assert h.calls[-1] == ("timeout", "t1")
    assert h.client.recv(100) == b"TIMEOUT" and h.client.recv(100) == b""
    h.worker_reads(w, len(REQ) - 1)
    assert w.recv(10) == b""  # abandoned upstream too


def test_a_stale_idle_connection_is_never_reused(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.client.sendall(REQ)
    h.spin(lambda: h.workers and h.relay.in_flight == 1)
    h.worker_reads(h.workers[0], len(REQ) - 1)
    h.workers[0].sendall(answer())
    h.spin(lambda: "answer" in h.kinds())
    h.client.recv(100)
    h.workers[0].close()  # the worker closes the idle connection
    h.spin(lambda: h.relay.idle_upstreams() == 0)
    h.client.sendall(REQ)
    h.spin(lambda: len(h.workers) == 2 and h.relay.in_flight == 1)
    h.worker_reads(h.workers[1], len(REQ) - 1)
    h.workers[1].sendall(answer(b"fresh"))
    h.spin(lambda: h.kinds().count("answer") == 2)
    assert h.client.recv(100) == b"ANSWER fresh"
    assert h.relay.connects == 2 and "failure" not in h.kinds()


def test_a_request_in_pieces_waits_then_goes_to_the_server(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    h.client.sendall(REQ[:20])
    h.spin(lambda: h.relay.run(time.perf_counter()) == 0 and h.relay.clients == 1, 0.5)
    h.client.sendall(REQ[20:])  # the rest in time: the lane's
    h.spin(lambda: "request" in h.kinds())
    assert h.calls[0] == ("request", REQ)
    h2 = harness()
    h2.client.sendall(REQ[:20])
    time.sleep(0.02)
    h2.relay.run(time.perf_counter())  # read: the lane waits for the rest...
    h2.relay.sweep(time.perf_counter())
    assert h2.calls == []
    time.sleep(0.25)
    h2.relay.sweep(time.perf_counter())  # ...past partial_s: the server's timeouts take over
    assert h2.calls == [("demote", ("client-1", REQ[:20], None))]


def test_a_large_answer_is_written_as_the_client_reads(harness: Callable[..., Harness]) -> None:
    h = harness()
    big = b"x" * (4 << 20)
    h.client.sendall(REQ)
    h.spin(lambda: h.workers and h.relay.in_flight == 1)
    w = h.workers[0]
    h.worker_reads(w, len(REQ) - 1)
    sender = threading.Thread(target=w.sendall, args=(answer(big),))
    sender.start()
    h.spin(lambda: "answer" in h.kinds())
    sender.join()
    got = b""
    want = len(b"ANSWER ") + len(big)
    while len(got) < want:
        h.relay.run(time.perf_counter())
        got += h.client.recv(1 << 20)
    assert got == b"ANSWER " + big
    h.spin(lambda: h.relay.clients == 1 and h.relay.in_flight == 0)


def test_idle_clients_past_keep_alive_are_closed(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.relay.sweep(time.perf_counter() + 10)
    assert (
        h.client.recv(10) == b"" and h.relay.clients == 0 and h.relay.take_closed() == ["client-1"]
    )


def test_close_abandons_what_is_in_flight(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.client.sendall(REQ)
    h.spin(lambda: h.workers and h.relay.in_flight == 1)
    h.relay.close()
    assert h.calls[-1] == ("abandon", "t1")
    assert h.client.recv(10) == b""
    assert h.relay.take_closed() == ["client-1"]  # the client only: not its upstream connection


def test_a_callback_that_raises_closes_only_its_connection(
    harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    def boom(data: bytes) -> Any:
        raise RuntimeError("bug")

    h = harness(plan=boom)
    h.client.sendall(REQ)
    h.spin(lambda: h.relay.clients == 0)
    assert h.client.recv(10) == b""
    assert "a callback of the compiled lane failed" in caplog.text
    assert "RuntimeError: bug" in caplog.text


def test_a_connect_past_its_timeout_fails_unsent(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.client.sendall(REQ)
    h.spin(lambda: h.relay.in_flight == 1)  # read and connecting: no pass has seen it connect
    h.relay.sweep(time.perf_counter() + 10)
    _, kind, sent, _, _ = h.calls[-2][1]
    assert (kind, sent) == (relay_py.CONNECT_TIMEOUT, False)
    assert h.calls[-1][0] == "demote" and h.relay.upstreams == 0


def test_no_idle_connection_is_kept_past_max_idle(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.relay.max_idle = 0  # upstream.max_idle_per_worker = 0: no pooling
    for i in range(2):
        h.client.sendall(REQ)
        h.spin(lambda i=i: len(h.workers) == i + 1 and h.relay.in_flight == 1)
        h.worker_reads(h.workers[i], len(REQ) - 1)
        h.workers[i].sendall(answer())
        h.spin(lambda i=i: h.kinds().count("answer") == i + 1)
        h.client.recv(100)
        assert h.workers[i].recv(10) == b""  # closed after its answer
    assert (h.relay.connects, h.relay.reuses, h.relay.idle_upstreams()) == (2, 0, 0)


# -- streamed answers ---------------------------------------------------------------------------

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def streaming(
    harness: Callable[..., Harness],
    beats: bool = False,
    beat: Callable[[str], Any] | None = None,
    **options: Any,
) -> tuple[Harness, socket.socket]:
    """A harness whose requests stream (with keep-alive comments: ``beats``, ``beat``), with
    one request sent and the worker holding it."""
    from lmgw.transport.sse_stream import SseStream

    h = harness()
    h.stream = lambda: SseStream(**options)
    h.beats, h.beat = beats, beat
    h.client.sendall(REQ)
    h.spin(lambda: h.workers and h.relay.in_flight == 1)
    w = h.workers[0]
    h.worker_reads(w, len(REQ) - 1)
    return h, w


def client_reads(h: Harness, until: bytes) -> bytes:
    got = b""
    h.client.settimeout(0)
    end = time.monotonic() + 5
    while not got.endswith(until):
        assert time.monotonic() < end, got
        h.step()
        try:
            more = h.client.recv(1 << 20)
        except BlockingIOError:
            continue
        assert more, got
        got += more
    h.client.settimeout(5)
    return got


def test_a_stream_goes_out_as_whole_events_then_keep_alive(
    harness: Callable[..., Harness],
) -> None:
    h, w = streaming(harness)
    w.sendall(SSE_HEAD + chunk(b"data: 1\n\nda"))
    got = client_reads(h, b"data: 1\n\n\r\n")
    assert got == b"HEAD|" + chunk(b"data: 1\n\n")  # the torn event is held back
    assert h.kinds()[-2:] == ["stream", "first"]
    w.sendall(chunk(b"ta: 2\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    got = client_reads(h, b"0\r\n\r\n")
    assert got == chunk(b"data: 2\n\ndata: [DONE]\n\n") + b"0\r\n\r\n"
    h.spin(lambda: "stream_end" in h.kinds())
    assert h.streams[0].events == 3 and h.relay.streamed == 1
    assert (h.relay.in_flight, h.relay.idle_upstreams(), h.relay.idle_in(0)) == (0, 1, 1)
    h.stream = None  # the next request, on the same connections
    h.client.sendall(REQ)
    h.spin(lambda: h.kinds().count("request") == 2 and h.relay.in_flight == 1)
    h.worker_reads(w, len(REQ) - 1)
    w.sendall(answer(b"after"))
    h.spin(lambda: "answer" in h.kinds())
    assert h.client.recv(100) == b"ANSWER after"
    assert h.relay.reuses == 1


def test_a_stream_that_breaks_ends_as_python_says(harness: Callable[..., Harness]) -> None:
    h, w = streaming(harness)
    w.sendall(SSE_HEAD + chunk(b"data: 1\n\ndata: torn"))
    client_reads(h, b"data: 1\n\n\r\n")
    w.close()
    got = client_reads(h, b"|BROKEN")
    assert got == b"|BROKEN" and b"torn" not in got
    token, kind, unsent = h.calls[-1][1]
    assert (token, kind, unsent) == ("t1", relay_py.DROPPED, b"")
    assert (h.relay.in_flight, h.relay.upstreams, h.relay.clients) == (0, 0, 1)


def test_a_broken_stream_may_go_on_in_python(harness: Callable[..., Harness]) -> None:
    h, w = streaming(harness)
    h.broken_cont = "cont-broken"
    w.sendall(SSE_HEAD + chunk(b"data: 1\n\n"))
    client_reads(h, b"data: 1\n\n\r\n")
    w.close()
    h.spin(lambda: "demote" in h.kinds())
    assert h.calls[-1][1] == ("client-1", b"", "cont-broken")
    assert h.relay.clients == 0


def test_a_client_gone_mid_stream_abandons_it(harness: Callable[..., Harness]) -> None:
    h, w = streaming(harness)
    w.sendall(SSE_HEAD + chunk(b"data: 1\n\n"))
    client_reads(h, b"data: 1\n\n\r\n")
    h.client.close()
    h.spin(lambda: "abandon" in h.kinds())
    assert w.recv(10) == b""  # the worker sees its connection close: the abort
    assert (h.relay.in_flight, h.relay.clients, h.relay.upstreams) == (0, 0, 0)


def test_a_silent_worker_breaks_the_stream(harness: Callable[..., Harness]) -> None:
    h, w = streaming(harness, stall_s=0.2)
    w.sendall(SSE_HEAD + chunk(b"data: 1\n\n"))
    client_reads(h, b"data: 1\n\n\r\n")
    t0 = time.monotonic()
    h.spin(lambda: (h.relay.sweep(time.perf_counter()), "broken" in h.kinds())[1])
    assert 0.15 < time.monotonic() - t0 < 2
    assert h.calls[-1][1][1] == relay_py.TIMEOUT


def test_the_deadline_breaks_a_stream(harness: Callable[..., Harness]) -> None:
    h = harness()
    from lmgw.transport.sse_stream import SseStream

    h.stream = SseStream
    h.deadline = time.perf_counter() + 0.2
    h.client.sendall(REQ)
    h.spin(lambda: h.workers and h.relay.in_flight == 1)
    w = h.workers[0]
    w.sendall(SSE_HEAD + chunk(b"data: 1\n\n"))
    client_reads(h, b"data: 1\n\n\r\n")
    h.spin(lambda: (h.relay.sweep(time.perf_counter()), "broken" in h.kinds())[1])
    assert h.calls[-1][1][1] == relay_py.DEADLINE


def test_a_slow_client_holds_the_worker_back(harness: Callable[..., Harness]) -> None:
    """A client that does not read: the relay stops reading the worker (the worker's sends
    block), and everything arrives in order once the client reads."""
    from lmgw.transport.chunked import ChunkedDecoder

    h, w = streaming(harness)
    event = b"data: " + b"x" * 60000 + b"\n\n"
    w.sendall(SSE_HEAD)
    w.setblocking(False)
    sent, out = 0, b""
    stuck_at = None
    end = time.monotonic() + 8
    while time.monotonic() < end:  # the worker writes until its socket is full
        if not out:
            out = chunk(event)
            sent += 1
        try:
            out = out[w.send(out) :]
            stuck_at = None
        except BlockingIOError:
            if stuck_at is None:
                stuck_at = time.monotonic()
            elif time.monotonic() - stuck_at > 0.3:
                break
        h.step()
    assert stuck_at is not None, "the relay read everything the worker sent"
    assert sent * len(event) < 64 << 20
    out += b"0\r\n\r\n"
    got = b""
    h.client.settimeout(0)
    end = time.monotonic() + 10
    while not got.endswith(b"0\r\n\r\n"):  # now the client reads, and the worker can send
        assert time.monotonic() < end, len(got)
        if out:
            try:
                out = out[w.send(out) :]
            except BlockingIOError:
                pass
        h.step()
        try:
            got += h.client.recv(1 << 20)
        except BlockingIOError:
            pass
    assert got.startswith(b"HEAD|")
    assert ChunkedDecoder().feed(got[5:]) == event * sent
    h.spin(lambda: "stream_end" in h.kinds())


def test_an_answer_that_is_not_an_event_stream_is_handed_over(
    harness: Callable[..., Harness],
) -> None:
    h, w = streaming(harness)
    w.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
              b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n")  # fmt: skip
    h.spin(lambda: "demote" in h.kinds())
    assert "handoff" in h.kinds() and "first" not in h.kinds()


def test_a_stream_with_bytes_after_its_end_does_not_keep_the_connection(
    harness: Callable[..., Harness],
) -> None:
    h, w = streaming(harness)
    w.sendall(SSE_HEAD + chunk(b"data: 1\n\n") + b"0\r\n\r\nJUNK")
    client_reads(h, b"0\r\n\r\n")
    h.spin(lambda: "stream_end" in h.kinds())
    assert h.relay.idle_upstreams() == 0 and h.relay.upstreams == 0


def test_a_burst_on_a_busy_pass_leaves_the_worker_unread_for_a_moment(
    harness: Callable[..., Harness],
) -> None:
    """Three events in one read while another connection is ready too: relayed at once, then
    the worker is not read for BURST_WAIT_S (the next events go out together); a lone event,
    or a pass with nothing else ready, never waits."""
    h, w = streaming(harness)
    w.sendall(SSE_HEAD + chunk(b"data: 0\n\n"))
    client_reads(h, b"data: 0\n\n\r\n")
    assert h.relay.paused == 0
    burst = b"data: 1\n\ndata: 2\n\ndata: 3\n\n"
    w.sendall(chunk(burst))
    h.client.sendall(b"G")  # the client's fd ready in the same pass: a busy one
    time.sleep(0.05)
    t0 = 1000.0  # the loop's clock is the caller's
    assert h.relay.run(t0) == 2
    assert h.relay.paused == 1
    assert h.client.recv(100) == chunk(burst)  # (written in that pass)
    w.sendall(chunk(b"data: 4\n\n") + chunk(b"data: 5\n\n"))
    time.sleep(0.05)
    h.relay.run(t0 + relay_py.BURST_WAIT_S / 2)
    h.client.settimeout(0.05)
    with pytest.raises(TimeoutError):
        h.client.recv(100)  # not read yet
    h.relay.run(t0 + relay_py.BURST_WAIT_S)  # its time came: read (both events at once)
    h.relay.run(t0 + relay_py.BURST_WAIT_S)
    assert h.client.recv(100) == chunk(b"data: 4\n\ndata: 5\n\n")
    assert h.relay.paused == 0
    w.sendall(chunk(burst))  # a burst with nothing else ready: no wait
    time.sleep(0.05)
    h.relay.run(t0 + 1)
    assert h.relay.paused == 0


def sweeping(h: Harness, seconds: float) -> None:
    """Run the loop and its sweep for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        h.step()
        h.relay.sweep(time.perf_counter())


def test_keep_alive_comments_while_the_worker_has_not_answered(
    harness: Callable[..., Harness],
) -> None:
    """The client's head with the first comment, comments every ``beat_s``, then the
    worker's events with no second head, and no comment after the first event."""
    h, w = streaming(harness, beats=True)
    sweeping(h, 0.32)
    beats = h.kinds().count("beat")
    assert 3 <= beats <= 8, h.calls
    got = client_reads(h, b"B|" * (beats - 1))
    assert got == b"H|B|" + b"B|" * (beats - 1)
    w.sendall(SSE_HEAD + chunk(b"data: 1\n\n"))
    assert client_reads(h, b"data: 1\n\n\r\n") == chunk(b"data: 1\n\n")
    sweeping(h, 0.15)
    assert h.kinds().count("beat") == beats  # the first event ended them
    w.sendall(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    assert client_reads(h, b"0\r\n\r\n") == chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    h.spin(lambda: "stream_end" in h.kinds())


def test_keep_alive_comments_after_the_head_until_the_first_event(
    harness: Callable[..., Harness],
) -> None:
    """A worker that sends its head at once (vLLM's) and its first event later."""
    h, w = streaming(harness, beats=True)
    w.sendall(SSE_HEAD)
    assert client_reads(h, b"HEAD|") == b"HEAD|"
    sweeping(h, 0.2)
    beats = h.kinds().count("beat")
    assert beats >= 2
    assert client_reads(h, b"B|" * beats) == b"B|" * beats
    w.sendall(chunk(b"data: 1\n\n") + b"0\r\n\r\n")
    assert client_reads(h, b"0\r\n\r\n") == chunk(b"data: 1\n\n") + b"0\r\n\r\n"
    h.spin(lambda: "stream_end" in h.kinds())
    sweeping(h, 0.1)
    assert h.kinds().count("beat") == beats


def test_no_keep_alive_comments_unless_the_plan_asks_or_while_python_declines(
    harness: Callable[..., Harness],
) -> None:
    h, w = streaming(harness)  # plans without the seventh item's yes
    sweeping(h, 0.15)
    assert "beat" not in h.kinds()
    w.close()
    h.spin(lambda: "failure" in h.kinds())
    h, _ = streaming(harness, beats=True, beat=lambda token: None)
    sweeping(h, 0.2)
    assert h.kinds().count("beat") == 1  # None: no more asking


def test_a_client_gone_while_the_comments_go_abandons_the_request(
    harness: Callable[..., Harness],
) -> None:
    h, w = streaming(harness, beats=True)
    sweeping(h, 0.12)
    h.client.close()
    h.spin(lambda: (h.relay.sweep(time.perf_counter()), "abandon" in h.kinds())[1])
    assert w.recv(10) == b""  # the abort
    assert (h.relay.in_flight, h.relay.clients, h.relay.upstreams) == (0, 0, 0)


@needs_c
@settings(max_examples=300, deadline=None)
@given(messages(True))
def test_stream_head_matches_the_twin(data: bytes) -> None:
    assert relay_c.stream_head(data) == relay_py.stream_head(data)


def test_stream_heads_by_hand() -> None:
    for impl in IMPLS:
        assert impl.stream_head(SSE_HEAD) == (relay_py.STREAM, len(SSE_HEAD), True)
        assert impl.stream_head(SSE_HEAD[:-1])[0] == relay_py.MORE
        close = SSE_HEAD.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
        assert impl.stream_head(close) == (relay_py.STREAM, len(close), False)
        assert impl.stream_head(answer())[0] == relay_py.HANDOFF  # a length: not a stream
        assert impl.stream_head(SSE_HEAD.replace(b"200 OK", b"500 No"))[0] == relay_py.HANDOFF
