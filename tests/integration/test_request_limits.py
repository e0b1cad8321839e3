"""limits.*: the connection limits of the native server (a client that stops reading, too many
connections from one address) and the request-body bounds of the API on both servers (JSON
depth, messages, content parts, max_tokens, n, best_of, stop, logit_bias), each a 400 naming
its parameter and never a 5xx."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import test_http_server as h
import trio
from gateway_support import MODEL, http_request

from lmgw.http.types import Request, Responder

# -- the native server's connection limits -----------------------------------------------------


class Flood:
    """Streams 64 KiB chunks until cancelled; notes the cancellation."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.cancelled = trio.Event()

    async def __call__(self, req: Request, resp: Responder) -> None:
        await resp.start(200, [(b"content-type", b"text/event-stream")])
        self.started.set()
        chunk = b"data: " + b"x" * 65536 + b"\n\n"
        try:
            while True:
                await resp.send(chunk)
        except trio.Cancelled:
            self.cancelled.set()
            raise


async def test_a_client_that_stops_reading_is_dropped(nursery: trio.Nursery) -> None:
    app = Flood()
    server, port = await h.start_server(nursery, app, write_timeout_s=0.2)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((h.HOST, port))
    try:
        sock.sendall(h.get("/flood"))  # and never read
        with trio.fail_after(10):
            await app.started.wait()
            await app.cancelled.wait()
            while server.active_connections:
                await trio.sleep(0.01)
    finally:
        sock.close()


async def test_a_reading_client_is_not_dropped(nursery: trio.Nursery) -> None:
    _, port = await h.start_server(nursery, h.App(), write_timeout_s=0.2)
    c = await h.Client.open(port)
    await c.send(h.get("/stream", b""))
    assert (await c.response("GET")).status == 200


async def test_connections_per_client_address(nursery: trio.Nursery) -> None:
    server, port = await h.start_server(nursery, h.App(), max_connections_per_client=2)
    first = [await h.Client.open(port) for _ in range(2)]
    for c in first:
        await c.send(h.get("/echo"))
        assert (await c.response()).status == 200
    extra = await h.Client.open(port)
    await extra.send(h.get("/echo"))
    r = await extra.response()
    assert r.status == 429 and r.headers[b"connection"] == b"close"
    assert b"too many connections from this address" in r.body
    assert await extra.closed()
    await first[0].aclose()
    with trio.fail_after(2):
        while server.active_connections > 1:
            await trio.sleep(0.01)
    again = await h.Client.open(port)
    await again.send(h.get("/echo"))
    assert (await again.response()).status == 200
    assert server._per_client == {h.HOST: 2}


# -- request bodies ----------------------------------------------------------------------------

LIMITS = {
    "max_json_depth": 16,
    "max_messages": 3,
    "max_content_parts": 4,
    "max_output_tokens": 50,
    "max_n": 2,
    "max_best_of": 3,
    "max_choices": 3,
    "max_stop_sequences": 2,
    "max_logit_bias": 2,
}


def chat(**extra: Any) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def parts(n: int) -> list[dict]:
    return [{"type": "text", "text": f"p{i}"} for i in range(n)]


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = {"role": "user", "content": "x"}
CASES = [
    (CHAT, chat(metadata=nested(20)), None, "max_json_depth"),
    (CHAT, chat(messages=[USER] * 4), "messages", "max_messages"),
    (
        CHAT,
        chat(messages=[{**USER, "content": parts(3)}, {**USER, "content": parts(2)}]),
        "messages",
        "max_content_parts",
    ),
    (CHAT, chat(max_tokens=51), "max_tokens", "max_output_tokens"),
    (CHAT, chat(max_completion_tokens=51), "max_completion_tokens", "max_output_tokens"),
    (CHAT, chat(n=3), "n", "max_n"),
    (CHAT, chat(stop=["a", "b", "c"]), "stop", "max_stop_sequences"),
    (CHAT, chat(logit_bias={"1": 1, "2": 1, "3": 1}), "logit_bias", "max_logit_bias"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "best_of": 4}, "best_of", "max_best_of"),
    (COMPLETIONS, {"model": MODEL, "prompt": nested(40)}, None, "max_json_depth"),
    (COMPLETIONS, {"model": MODEL, "prompt": ["x", "y"], "n": 2}, "prompt", "max_choices"),
    (COMPLETIONS, {"model": MODEL, "prompt": [[1], [2], [3], [4]]}, "prompt", "max_choices"),
    (
        "/generate",
        {"text": "x", "sampling_params": {"max_new_tokens": 99}},
        "max_new_tokens",
        "max_output_tokens",
    ),
    ("/generate", {"text": ["x", "y"], "sampling_params": [{}, {"n": 5}]}, "n", "max_n"),
    ("/tokenize", {"model": MODEL, "prompt": "x", "extra": nested(30)}, None, "max_json_depth"),
]


@pytest.mark.usefixtures("hard_deadline")
async def test_request_bounds_are_400s_naming_the_parameter(gateway) -> None:
    gw = await gateway(1, limits=LIMITS)
    for path, body, param, key in CASES:
        r = await http_request(gw.url, "POST", path, body)
        assert r.status == 400, (path, key, r.status, r.body)
        err = r.json()["error"]
        assert err["param"] == param and f"limits.{key}" in err["message"], (key, err)
    # within every bound: served
    ok = chat(
        messages=[{"role": "user", "content": parts(2)}, {"role": "user", "content": "x"}],
        max_tokens=5,
        n=2,
        stop=["a", "b"],
        logit_bias={"1": 1},
        metadata=nested(10),
    )
    r = await http_request(gw.url, "POST", "/v1/chat/completions", ok)
    assert r.status == 200, r.body


@pytest.mark.usefixtures("hard_deadline")
async def test_nesting_past_pythons_recursion_limit_is_a_400(gateway) -> None:
    """msgspec raises RecursionError near 1000 levels: without the depth bound that was a 500."""
    gw = await gateway(1)
    deep = b"[" * 5000 + b"]" * 5000
    for path, body in (
        ("/v1/chat/completions", b'{"model": "%s", "messages": %s}' % (MODEL.encode(), deep)),
        ("/v1/completions", b'{"model": "%s", "prompt": %s}' % (MODEL.encode(), deep)),
        ("/tokenize", b'{"prompt": %s}' % deep),
        ("/admin/workers", deep),
    ):
        r = await http_request(gw.url, "POST", path, body)
        assert r.status in (400, 403), (path, r.status, r.body)  # admin: no token configured
    health = await http_request(gw.url, "GET", "/health")
    assert health.status == 200
