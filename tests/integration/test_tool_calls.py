"""Tool calls end to end: the simulated worker writes a model-style call as raw text, the
gateway's parser turns it into OpenAI tool_calls (streamed and not) for the official client."""

from __future__ import annotations

import json
import math

import openai
import pytest
import trio

from lmgw.config import GatewayConfig, HealthConfig, ModelConfig, ServerConfig, WorkerConfig
from lmgw.gateway import Gateway
from lmgw.tools import TOOL_PARSERS

MODEL = "sim-model"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
ASK = [{"role": "user", "content": "What is the weather like? use get_weather"}]


async def start(
    nursery: trio.Nursery, sim_worker, fmt: str, compiled_lane: bool = True, **model
) -> str:
    sim = await sim_worker(model=MODEL, speed=math.inf, tool_format=fmt)
    cfg = GatewayConfig(
        server=ServerConfig(port=0, compiled_lane=compiled_lane),
        health=HealthConfig(interval_s=30),
        models=[ModelConfig(name=MODEL, **model)],
        workers=[WorkerConfig(url=sim.url, role="pd")],
    )
    port = await nursery.start(Gateway(cfg).run)
    return f"http://127.0.0.1:{port}/v1"


def calls_of(base: str, stream: bool, **extra):
    client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
    args = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", **extra)
    if not stream:
        r = client.chat.completions.create(**args)
        msg = r.choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in msg.tool_calls or []]
        return msg.content, calls, r.choices[0].finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **args):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                name, arguments = calls.get(tc.index, ("", ""))
                calls[tc.index] = (
                    name + (tc.function.name or ""),
                    arguments + (tc.function.arguments or ""),
                )
            finish = ch.finish_reason or finish
    return content or None, list(calls.values()), finish


@pytest.mark.parametrize("fmt", sorted(TOOL_PARSERS))
async def test_tool_calls_through_the_gateway(nursery: trio.Nursery, sim_worker, fmt: str) -> None:
    base = await start(nursery, sim_worker, fmt, tool_parser=fmt)
    results = [await trio.to_thread.run_sync(calls_of, base, stream) for stream in (False, True)]
    for content, calls, finish in results:
        assert finish == "tool_calls"
        ((name, arguments),) = calls
        assert name == "get_weather"
        args = json.loads(arguments)
        assert isinstance(args["city"], str) and args["days"] >= 1
        assert not content or "<tool_call>" not in content
    assert results[0][1] == results[1][1]  # streamed calls reassemble to the whole answer


async def test_without_a_parser_the_raw_text_is_relayed(nursery: trio.Nursery, sim_worker) -> None:
    base = await start(nursery, sim_worker, "hermes")
    content, calls, finish = await trio.to_thread.run_sync(calls_of, base, False)
    assert calls == [] and "<tool_call>" in content and finish == "stop"


async def test_worker_tool_choice_none_for_workers_without_auto_tool_choice(
    nursery: trio.Nursery,
) -> None:
    """A worker that refuses "auto" gets "none"; the gateway still parses what it writes."""
    import msgspec

    from lmgw.http.server import serve_http

    seen: list[dict] = []
    call = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>'
    )

    async def worker(req, responder) -> None:
        json_ct = [(b"content-type", b"application/json")]
        if req.method == "GET":
            models = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
            await responder.send_full(200, json_ct, msgspec.json.encode(models))
            return
        seen.append(json.loads(req.body))
        answer = {
            "id": "x",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": call},
                    "finish_reason": "stop",
                }
            ],
        }
        await responder.send_full(200, json_ct, msgspec.json.encode(answer))

    wport = await nursery.start(serve_http, worker, "127.0.0.1", 0)
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        models=[ModelConfig(name=MODEL, tool_parser="hermes", worker_tool_choice="none")],
        workers=[WorkerConfig(url=f"http://127.0.0.1:{wport}", role="pd")],
    )
    port = await nursery.start(Gateway(cfg).run)

    def ask() -> tuple:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
        return r.choices[0].finish_reason, r.choices[0].message.tool_calls

    finish, calls = await trio.to_thread.run_sync(ask)
    assert finish == "tool_calls" and calls[0].function.name == "get_weather"
    assert seen[-1]["tool_choice"] == "none" and seen[-1]["tools"] == TOOLS


@pytest.mark.parametrize("compiled_lane", [True, False], ids=["lane", "trio"])
async def test_requests_without_tools_skip_the_tool_parser(
    nursery: trio.Nursery, sim_worker, compiled_lane: bool
) -> None:
    """A model with a tool parser: a chat that offers no tools is plain (the express lane),
    one that offers tools is parsed; with a reasoning parser every answer is read, so none is
    plain. The compiled lane parses answers itself: it serves them all."""
    import urllib.request

    def counted(base: str, name: str) -> float:
        with urllib.request.urlopen(base.removesuffix("/v1") + "/metrics", timeout=5) as r:
            text = r.read().decode()
        line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
        return float(line.rsplit(" ", 1)[1])

    def express(base: str) -> float:
        return counted(base, "lmgw_express_requests_total")

    lane = 1 if compiled_lane else 0
    base = await start(nursery, sim_worker, "hermes", compiled_lane, tool_parser="hermes")
    client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
    plain = await trio.to_thread.run_sync(
        lambda: client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)
    )
    assert plain.choices[0].message.content and await trio.to_thread.run_sync(express, base) == 1
    _, calls, finish = await trio.to_thread.run_sync(calls_of, base, False)
    assert calls and calls[0][0] == "get_weather" and finish == "tool_calls"
    assert await trio.to_thread.run_sync(express, base) == 1 + lane  # parsed (by the lane)
    thinking = await start(nursery, sim_worker, "hermes", compiled_lane, reasoning_parser="think")
    client = openai.OpenAI(base_url=thinking, api_key="x", max_retries=0)
    await trio.to_thread.run_sync(
        lambda: client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)
    )
    assert await trio.to_thread.run_sync(express, thinking) == lane
    if compiled_lane:
        assert await trio.to_thread.run_sync(counted, base, "lmgw_lane_answers_total") == 2
        _, calls, finish = await trio.to_thread.run_sync(calls_of, base, True)  # a stream
        assert calls and calls[0][0] == "get_weather" and finish == "tool_calls"
        assert await trio.to_thread.run_sync(counted, base, "lmgw_lane_streams_total") == 1
