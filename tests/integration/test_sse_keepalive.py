"""SSE keep-alives while a streamed request waits for its first event (limits.sse_keepalive_s).

A worker that takes long to its first token (a slow simulator): the client gets the 200 and
event-stream head early, ``: keep-alive`` comments meanwhile, then the same events as without
keep-alives. A worker that never answers: comments, then the deadline's error as an SSE event
and [DONE] (the status is gone). Non-streamed requests and fast streams are untouched, and off
(the default) nothing changes. The official `openai` client reads such a stream unmodified.
Every front door: the trio server, the compiled lane (which writes the comments itself) and
hypercorn.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
import trio
from gateway_support import MODEL, http_request, metric_value, open_stream
from test_compiled_lane import KeepAlive

BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "hello there " * 40}],
    "max_tokens": 4,
    "stream": True,
    "seed": 3,
}


def blocks(payload: bytes) -> list[bytes]:
    return [b for b in payload.split(b"\n\n") if b]


def in_lane(gw: Any, streamed: int = 1) -> None:
    """On the compiled lane: the comments were the lane's (nothing handed to the server)."""
    if gw.server == "lane":
        relay = gw.gateway.server.lane.relay
        assert relay.demoted == 0 and relay.streamed >= streamed


@pytest.mark.parametrize("stream_head", ["first_token", "arrival"])
async def test_comments_until_the_first_event_then_the_same_answer(
    gateway: Any, stream_head: str
) -> None:
    """The worker's head with its first event (the simulator's default), or at once (vLLM's
    way, the head before the queue and the prefill): comments until the first event."""
    slow = await gateway(  # a slower prefill
        1, speed=0.1, stream_head=stream_head, limits={"sse_keepalive_s": 0.02}
    )
    r = await http_request(slow.url, "POST", "/v1/chat/completions", BODY)
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    got = blocks(r.body)
    first_data = next(i for i, b in enumerate(got) if b.startswith(b"data:"))
    assert first_data >= 1 and all(b == b": keep-alive" for b in got[:first_data])
    assert b": keep-alive" not in got[first_data:]  # comments stop once the answer begins
    assert r.headers["x-request-id"]
    in_lane(slow)
    metrics = (await http_request(slow.url, "GET", "/metrics")).body.decode()
    assert metric_value(metrics, "lmgw_sse_keepalives_total") == first_data  # each counted
    client = openai.OpenAI(base_url=slow.url + "/v1", api_key="x", max_retries=0)

    def via_openai() -> str:
        s = client.chat.completions.create(**{k: v for k, v in BODY.items() if k != "stream"},
                                           stream=True)  # fmt: skip
        return "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    text = await trio.to_thread.run_sync(via_openai)
    assert text and text == "".join(
        json.loads(b[6:])["choices"][0]["delta"].get("content") or ""
        for b in got[first_data:]
        if b.startswith(b"data: {")
    )


@pytest.mark.parametrize("stream_head", ["first_token", "arrival"])
async def test_a_worker_that_never_answers_ends_in_an_error_event(
    gateway: Any, stream_head: str
) -> None:
    """No head at all, or the head and then nothing (a hang after vLLM accepted it)."""
    hung = await gateway(
        1,
        faults={"hang": True},
        stream_head=stream_head,
        limits={"sse_keepalive_s": 0.05, "request_timeout_s": 0.5},
    )
    r = await http_request(hung.url, "POST", "/v1/chat/completions", BODY)
    assert r.status == 200
    got = blocks(r.body)
    assert got[0] == b": keep-alive"
    assert got[-1] == b"data: [DONE]" and b'"code":504' in got[-2], got[-3:]
    in_lane(hung, streamed=0)


@pytest.mark.parametrize("stream_head", ["first_token", "arrival"])
async def test_the_connection_goes_on_after_a_deadline_ended_the_stream(
    gateway: Any, stream_head: str
) -> None:
    """The head said keep-alive, so a stream the deadline ended (its last event the 504) leaves
    its connection open for the client's next request, which a good worker answers."""
    gw = await gateway(
        per_worker=[{"faults": {"hang": True}, "stream_head": stream_head}, {}],
        limits={"sse_keepalive_s": 0.05, "request_timeout_s": 0.5},
    )
    c = KeepAlive(await open_stream(gw.url), gw.url)
    r = await c.ask(BODY)  # the hung worker (round robin starts there)
    got = blocks(r.body)
    assert r.status == 200 and got[0] == b": keep-alive"
    assert got[-1] == b"data: [DONE]" and b'"code":504' in got[-2], got[-3:]
    if gw.server == "hypercorn":
        return  # (hypercorn's own connection handling)
    r = await c.ask({**BODY, "stream": False})  # the same connection: the good worker
    assert r.status == 200 and r.json()["choices"][0]["message"]["content"]


async def test_off_or_fast_or_whole_nothing_changes(gateway: Any) -> None:
    fast = await gateway(1, limits={"sse_keepalive_s": 0.05})
    r = await http_request(fast.url, "POST", "/v1/chat/completions", BODY)
    assert r.status == 200 and b": keep-alive" not in r.body
    r = await http_request(fast.url, "POST", "/v1/chat/completions", {**BODY, "stream": False})
    assert r.status == 200 and r.json()["choices"]
    plain = await gateway(1, speed=0.1)  # off: the status waits for the answer
    r = await http_request(plain.url, "POST", "/v1/chat/completions", BODY)
    assert r.status == 200 and b": keep-alive" not in r.body
