"""Side legs under a random mix (lmgw._fast.relay and its twin): many clients at once, main
and side workers that answer, fail, stream, break or answer late, clients that leave.

Every request must end exactly once, every side leg must reach ``on_side`` exactly once (a
cancelled one before its request's end), and the relay's counts must go back to zero: what
the compiled relay's reference counting and connection table must survive.
"""

from __future__ import annotations

import random
import select
import socket
import time
from collections import defaultdict
from typing import Any

import pytest
from test_relay import IMPLS

from lmgw._fast import relay_py
from lmgw.transport.sse_stream import SseStream

TERMINAL = {"answer", "failure", "timeout", "abandon", "handoff", "stream_end", "broken"}
MAIN = ["answer", "answer", "error", "close", "stream", "stream", "stream_break"]
SIDE = ["answer", "answer", "chunked", "error", "close", "late", "late", "none"]
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _request(path: bytes, n: int) -> bytes:
    return b"POST /%b HTTP/1.1\r\nx-id: %d\r\ncontent-length: 2\r\n\r\nhi" % (path, n)


class Mix:
    """One relay, two worker listeners (main: slot 0, side: slot 1), clients made on the go."""

    def __init__(self, impl: Any, seed: int) -> None:
        self.rng = random.Random(seed)
        self.events: list[tuple[str, str, Any]] = []  # (callback, token, detail), in order
        self.plans: dict[str, dict[str, Any]] = {}
        self.relay = impl.Relay(
            self._on_request, self._on_answer, self._on_handoff, self._on_failure,
            self._on_timeout, self._on_abandon, self._on_demote,
            on_stream=self._on_stream, on_first=lambda t: None,
            on_stream_end=lambda t: self._end("stream_end", t), on_broken=self._on_broken,
            on_side=self._on_side, keepalive_s=5.0, partial_s=0.5,
        )  # fmt: skip
        self.listeners = []
        for slot in (0, 1):
            listener = socket.create_server(("127.0.0.1", 0))
            listener.setblocking(False)
            self.relay.set_origin(slot, relay_py.pack_sockaddr(*listener.getsockname()[:2]))
            self.listeners.append(listener)
        self.workers: list[tuple[socket.socket, bytearray]] = []
        self.clients: list[tuple[socket.socket, int]] = []  # (socket, step to leave at)
        #: (step, socket, bytes to send, close after)
        self.actions: list[tuple[int, socket.socket, bytes, bool]] = []
        self.step_no = 0
        self.sent = 0

    # the relay's callbacks
    def _on_request(self, ident: Any, data: bytes) -> Any:
        n = int(data.split(b"x-id: ", 1)[1].split(b"\r\n", 1)[0])
        token = f"t{n}"
        plan = self.plans[token]
        stream = SseStream() if plan["main"].startswith("stream") else None
        side = None if plan["side"] == "none" else (1, _request(b"side", n), 0.0)
        self.events.append(("request", token, None))
        return (0, data, token, 0.0, 0.0, stream, False, side)

    def _end(self, kind: str, token: str, detail: Any = None) -> None:
        self.events.append((kind, token, detail))

    def _on_answer(self, token: str, data: bytes) -> Any:
        self._end("answer", token)
        return b"ANSWER|", True

    def _on_handoff(self, token: str, fd: int, data: bytes) -> Any:
        self._end("handoff", token)
        socket.close(fd)
        return "cont"

    def _on_failure(self, token: str, kind: int, sent: bool, reused: bool, got: bool) -> Any:
        self._end("failure", token, kind)
        return "cont"

    def _on_timeout(self, token: str) -> Any:
        self._end("timeout", token)
        return b"TIMEOUT"

    def _on_abandon(self, token: str) -> None:
        self._end("abandon", token)

    def _on_demote(self, ident: Any, fd: int, pending: bytes, cont: Any) -> None:
        socket.close(fd)

    def _on_stream(self, token: str, head: bytes) -> Any:
        return b"HEAD|", True

    def _on_broken(self, token: str, kind: int, unsent: bytes) -> Any:
        self._end("broken", token, kind)
        return b"|BROKEN", True

    def _on_side(self, token: str, kind: int, data: bytes) -> Any:
        self.events.append(("side", token, kind))
        failed = kind not in (0, relay_py.CANCELLED) or b" 500 " in data[:16]
        return failed and self.rng.random() < 0.7

    # the world around it
    def new_client(self) -> None:
        mine, theirs = socket.socketpair()
        mine.setblocking(False)
        theirs.setblocking(False)
        self.relay.add_client(theirs.detach(), f"c{self.sent}", time.perf_counter())
        n = self.sent
        self.sent += 1
        self.plans[f"t{n}"] = {"main": self.rng.choice(MAIN), "side": self.rng.choice(SIDE)}
        mine.sendall(_request(b"main", n))
        leave = self.step_no + self.rng.randint(0, 40) if self.rng.random() < 0.2 else 1 << 30
        self.clients.append((mine, leave))

    def _later(self, sock: socket.socket, data: bytes, close: bool, at_most: int = 6) -> None:
        self.actions.append((self.step_no + self.rng.randint(0, at_most), sock, data, close))

    def _serve(self, sock: socket.socket, request: bytes) -> None:
        path, n = request.split(b" ", 2)[1], int(request.split(b"x-id: ")[1].split(b"\r\n")[0])
        plan = self.plans[f"t{n}"]
        if path == b"/main":
            what = plan["main"]
            if what == "answer":
                self._later(sock, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", False)
            elif what == "error":
                self._later(sock, b"HTTP/1.1 404 No\r\ncontent-length: 2\r\n\r\nno", False)
            elif what == "close":
                self._later(sock, b"", True)
            else:
                self._later(sock, SSE_HEAD + _chunk(b"data: 1\n\n"), False)
                if what == "stream":
                    self._later(sock, _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n", False, 12)
                else:
                    self._later(sock, b"", True, 12)
            return
        what = plan["side"]
        if what in ("answer", "late"):
            body = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\npre"
            self._later(sock, body, False, 6 if what == "answer" else 30)
        elif what == "chunked":
            head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            self._later(sock, head + _chunk(b"data: x\n\n"), False)
            self._later(sock, b"0\r\n\r\n", False, 10)
        elif what == "error":
            self._later(sock, b"HTTP/1.1 500 E\r\ncontent-length: 4\r\n\r\ndead", False)
        else:
            self._later(sock, b"", True)

    def step(self) -> None:
        self.step_no += 1
        self.workers = [(w, buf) for w, buf in self.workers if w.fileno() >= 0]
        fds = [self.relay.fileno(), *self.listeners, *(w for w, _ in self.workers)]
        select.select(fds, [], [], 0.0005)
        for listener in self.listeners:
            try:
                w, _ = listener.accept()
                w.setblocking(False)
                self.workers.append((w, bytearray()))
            except BlockingIOError:
                pass
        for w, buf in list(self.workers):
            try:
                data = w.recv(65536)
            except (BlockingIOError, OSError):
                continue
            if not data:
                self.workers.remove((w, buf))
                w.close()
                continue
            buf += data
            while b"\r\n\r\n" in buf and len(buf) >= buf.index(b"\r\n\r\n") + 6:
                end = buf.index(b"\r\n\r\n") + 6
                self._serve(w, bytes(buf[:end]))
                del buf[:end]
        due = [a for a in self.actions if a[0] <= self.step_no]
        self.actions = [a for a in self.actions if a[0] > self.step_no]
        for _, sock, data, close in due:
            if sock.fileno() < 0:
                continue
            try:
                if data:
                    sock.sendall(data)
                if close:
                    sock.close()
            except OSError:
                sock.close()
        for c, leave in list(self.clients):
            try:
                got = c.recv(65536)
            except BlockingIOError:
                got = None
            except OSError:
                got = b""
            done = got and got.endswith((b"ANSWER|", b"|BROKEN", b"0\r\n\r\n"))
            if got == b"" or self.step_no >= leave or done:
                self.clients.remove((c, leave))
                c.close()
        self.relay.run(time.perf_counter())
        self.relay.sweep(time.perf_counter())

    def close(self) -> None:
        self.relay.close()
        for s in (*self.listeners, *(w for w, _ in self.workers), *(c for c, _ in self.clients)):
            s.close()


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_a_random_mix_ends_every_request_and_every_side_leg_once(impl: Any, seed: int) -> None:
    mix = Mix(impl, seed)
    try:
        end = time.monotonic() + 20
        while mix.sent < 400:
            if len(mix.clients) < 12:
                mix.new_client()
            mix.step()
        # the rest: workers answer (late side legs too), clients read or leave
        while mix.actions or mix.relay.in_flight or mix.relay.sides:
            assert time.monotonic() < end, (mix.relay.in_flight, mix.relay.sides, mix.actions)
            mix.step()
        ends: dict[str, list[int]] = defaultdict(list)
        sides: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, (kind, token, detail) in enumerate(mix.events):
            if kind in TERMINAL:
                ends[token].append(i)
            elif kind == "side":
                sides[token].append((i, detail))
        requested = {token for kind, token, _ in mix.events if kind == "request"}
        assert len(requested) > 300
        for token in requested:
            assert len(ends[token]) == 1, (token, mix.plans[token], ends[token])
            with_side = mix.plans[token]["side"] != "none"
            assert len(sides[token]) == (1 if with_side else 0), (token, sides[token])
            if with_side and sides[token][0][1] == relay_py.CANCELLED:
                assert sides[token][0][0] < ends[token][0]  # cancelled before the end's call
        outlived = [t for t in requested if sides[t] and sides[t][0][0] > ends[t][0]]
        assert len(outlived) > 10  # side legs that went on after their request's end
        kinds = {kind for kind, _, _ in mix.events}
        assert {"answer", "failure", "handoff", "stream_end", "broken", "abandon"} <= kinds
        failures = [d for kind, _, d in mix.events if kind in ("failure", "broken")]
        assert relay_py.SIDE in failures  # some side legs ended their requests
        assert (mix.relay.in_flight, mix.relay.sides) == (0, 0)
    finally:
        mix.close()
    assert (mix.relay.clients, mix.relay.upstreams) == (0, 0)
