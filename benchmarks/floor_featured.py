"""The least a trio gateway with issue 2's features can do per request: a second yardstick.

Why: `floor_relay.py` moves bytes and nothing else, so its CPU per request is a floor no
gateway reaches. This one does, per request, the work the issue's CPU target asks a gateway to
do with "every feature on", each step the cheapest way Python offers and nothing more: parse
the request head (keep-alive, Content-Length), validate the body with lmgw's own
``decode_view`` (msgspec, the limits), take or make the request id, pick a worker round robin,
send on a pooled keep-alive connection, parse the answer's head, write the client's response
(lmgw's ``build_head``) and count the request and its latency in lmgw's metric types. No error
handling, retries, timeouts, admission, health or per-worker accounting: it is a bound, not a
product. If this already misses a target, no Python/trio gateway with those features meets it
on this machine (floor.py runs it beside lmgw: system ``featured``).

    python benchmarks/floor_featured.py PORT UPSTREAM_PORT [UPSTREAM_PORT...]
"""

from __future__ import annotations

import itertools
import socket
import sys
import time
from collections import deque

import trio

from floor_relay import accept_loop, receive  # (this script's folder is on sys.path)
from lmgw.api.openai import decode_view
from lmgw.http.server import build_head
from lmgw.metrics import Metrics

_now = time.perf_counter


def _head(buf: bytes) -> tuple[list[bytes], int, int] | None:
    """The head's lines, where the body starts and its length, once the whole message is in."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].split(b"\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    if len(buf) < end + 4 + length:
        return None
    return lines, end + 4, length


class _Worker:
    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: deque[socket.socket] = deque()
        self.line = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n" % port

    def connection(self) -> socket.socket:
        if self.idle:
            return self.idle.pop()
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


_ids = itertools.count()


async def _serve(
    client: socket.socket, workers: list[_Worker], turn: itertools.cycle, metrics: Metrics
) -> None:
    client.setblocking(False)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    try:
        while True:
            while (got := _head(buf)) is None:
                data = await receive(client)
                if not data:
                    return
                buf += data
            lines, start, length = got
            body, buf = buf[start : start + length], buf[start + length :]
            t0 = _now()
            rid = None
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"x-request-id":
                    rid = value.strip()
            view = decode_view("chat", body)
            if rid is None:
                rid = b"gw-%x" % next(_ids)
            worker = workers[next(turn)]
            up = worker.connection()
            up.sendall(
                worker.line
                + b"content-type: application/json\r\nx-request-id: "
                + rid
                + b"\r\ncontent-length: %d\r\n\r\n" % len(body)
                + body
            )
            answer = b""
            while (head := _head(answer)) is None:
                data = await receive(up)
                if not data:
                    return
                answer += data
            worker.idle.append(up)
            alines, astart, alength = head
            ctype = b"application/json"
            for line in alines[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-type":
                    ctype = value.strip()
            out = answer[astart : astart + alength]
            framing = b"content-length: %d\r\n\r\n" % len(out)
            head_bytes = build_head(
                int(alines[0][9:12]), [(b"content-type", ctype), (b"x-request-id", rid)], framing,
                True,
            )  # fmt: skip
            client.sendall(head_bytes + out)
            metrics.requests.inc(("chat", view.model or "-", "pd", "200"))
            metrics.e2e.observe(("chat", view.model or "-"), _now() - t0)
    except OSError:
        pass
    finally:
        client.close()


async def main(port: int, upstreams: list[int]) -> None:
    workers = [_Worker(p) for p in upstreams]
    turn = itertools.cycle(range(len(workers)))
    metrics = Metrics()
    await accept_loop(port, lambda client: _serve(client, workers, turn, metrics))


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), [int(p) for p in sys.argv[2:]])
