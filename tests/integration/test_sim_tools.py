"""The simulated worker's tool mode over real HTTP: a chat request with ``tools`` gets the raw
text of a call in the worker's ``tool_format``, which the gateway's parser of that name turns
into the call, with arguments valid against the function's schema; requests without tools are
answered exactly as before."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import trio
from gateway_support import http_request

from lmgw.simulators import SimWorker, WorkerOptions, serve_worker_inprocess
from lmgw.simulators.engine import SamplingSpec, generate
from lmgw.simulators.worker import build_parser, options_from_args
from lmgw.tools import TOOL_PARSERS, assemble, get_tool_parser

MODEL = "sim-model"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "hourly": {"type": "boolean"},
        "fields": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
        "where": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
            "required": ["lat", "lon"],
        },
    },
    "required": ["city", "days", "unit", "where"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string"}},
                "required": ["zone"],
            },
        },
    },
]


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def validate(value: Any, schema: dict[str, Any], where: str = "$") -> None:
    """The JSON-schema subset the tools above use (no jsonschema dependency)."""
    if "enum" in schema:
        assert value in schema["enum"], where
        return
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), where
        for name in schema.get("required", ()):
            assert name in value, f"{where}.{name} missing"
        for name, v in value.items():
            validate(v, schema["properties"][name], f"{where}.{name}")
    elif kind == "array":
        assert isinstance(value, list), where
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9), where
        for i, v in enumerate(value):
            validate(v, schema.get("items", {}), f"{where}[{i}]")
    elif kind == "string":
        assert isinstance(value, str), where
        assert len(value) <= schema.get("maxLength", 10**9), where
    elif kind in ("integer", "number"):
        assert not isinstance(value, bool), where
        assert isinstance(value, int if kind == "integer" else int | float), where
        assert schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf), where
    elif kind == "boolean":
        assert isinstance(value, bool), where


async def start(nursery: trio.Nursery, **options: Any) -> tuple[SimWorker, str]:
    worker = SimWorker(WorkerOptions(speed=math.inf, **options))
    url = await nursery.start(serve_worker_inprocess, worker)
    return worker, url


async def ask(url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await http_request(url, "POST", "/v1/chat/completions", body)
    assert r.status == 200, r.body
    return r.json()


async def ask_stream(url: str, body: dict[str, Any]) -> tuple[list[str], str]:
    r = await http_request(url, "POST", "/v1/chat/completions", {**body, "stream": True})
    assert r.status == 200, r.body
    events = r.events()
    assert events[-1] == "[DONE]"
    pieces = [e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]]
    (finish,) = [e["choices"][0]["finish_reason"] for e in events[:-1] if "finish_reason"
                 in e["choices"][0]]  # fmt: skip
    return pieces, finish


@pytest.mark.parametrize("fmt", sorted(TOOL_PARSERS))
async def test_each_format_writes_a_call_its_parser_reads(nursery: trio.Nursery, fmt: str) -> None:
    _, url = await start(nursery, tool_format=fmt)
    body = chat(
        "Will it rain?",
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    answer = await ask(url, body)
    (choice,) = answer["choices"]
    # vLLM without --enable-auto-tool-choice: raw text, no tool_calls, finish_reason stop
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["tool_calls"] == []
    text = choice["message"]["content"]
    parser = get_tool_parser(fmt)
    content, calls = parser.extract(text, body)
    assert content is None
    (call,) = calls
    assert call["function"]["name"] == "get_weather"
    validate(json.loads(call["function"]["arguments"]), WEATHER)
    # the same text streamed, one token per event; the parser fed event by event agrees
    pieces, finish = await ask_stream(url, body)
    assert "".join(pieces) == text and finish == "stop"
    stream = parser.stream(body)
    deltas = [d for piece in pieces for d in stream.feed(piece)] + stream.finish()
    streamed_content, streamed_calls = assemble(deltas)
    assert streamed_content is None
    assert [c["function"] for c in streamed_calls] == [call["function"]]


async def test_tool_choice_decides_whether_and_what_is_called(nursery: trio.Nursery) -> None:
    _, url = await start(nursery)
    parser = get_tool_parser("hermes")

    async def called(body: dict[str, Any]) -> list[str]:
        text = (await ask(url, body))["choices"][0]["message"]["content"]
        return [c["function"]["name"] for c in parser.extract(text, body)[1]]

    assert await called(chat("hi", tools=TOOLS, tool_choice="required")) == ["get_weather"]
    named = {"type": "function", "function": {"name": "get_time"}}
    assert await called(chat("hi", tools=TOOLS, tool_choice=named)) == ["get_time"]
    # auto (the default with tools): only when the user's last message names a tool
    assert await called(chat("Please use get_time for Paris", tools=TOOLS)) == ["get_time"]
    assert await called(chat("get_time_zone?", tools=TOOLS, tool_choice="auto")) == []
    assert await called(chat("What time is it?", tools=TOOLS)) == []
    assert await called(chat("use get_time", tools=TOOLS, tool_choice="none")) == []
    parts = [{"type": "text", "text": "call get_weather please"}]
    assert await called(chat(parts, tools=TOOLS)) == ["get_weather"]  # type: ignore[arg-type]
    after_result = {
        "model": MODEL,
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "use get_time"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"zone": "CET"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        ],
    }
    assert await called(after_result) == []  # the model answers the result in text


async def test_calls_are_deterministic_per_prompt_and_seed(nursery: trio.Nursery) -> None:
    _, url = await start(nursery)
    body = chat("hi", tools=TOOLS, tool_choice="required")
    first = (await ask(url, body))["choices"][0]["message"]["content"]
    assert (await ask(url, {**body, "temperature": 1.7}))["choices"][0]["message"]["content"] == (
        first
    )
    seeded = [(await ask(url, {**body, "seed": s}))["choices"][0]["message"]["content"]
              for s in range(4)]  # fmt: skip
    assert len({first, *seeded}) > 1
    two = await ask(url, {**body, "n": 2})
    assert two["choices"][0]["message"]["content"] == first
    assert two["choices"][1]["message"]["content"] != first


async def test_requests_without_tools_are_answered_as_before(nursery: trio.Nursery) -> None:
    worker, url = await start(nursery)
    engine = worker.engine
    for body in (chat("What is the capital of France?"), chat("x", tools=None, tool_choice=None)):
        text = (await ask(url, body))["choices"][0]["message"]["content"]
        ids = engine.tokenizer.render_chat(body["messages"]).token_ids
        plain = generate(
            ids,
            SamplingSpec(),
            engine_seed=0,
            max_model_len=engine.max_model_len,
            vocab=engine.tokenizer.output,
        )
        assert text == plain.text
        assert "<tool_call>" not in text


async def test_limits_apply_to_the_call_text(nursery: trio.Nursery) -> None:
    _, url = await start(nursery)
    body = chat("hi", tools=TOOLS, tool_choice="required")
    full = (await ask(url, body))["choices"][0]
    cut = (await ask(url, {**body, "max_tokens": 4}))["choices"][0]
    assert cut["finish_reason"] == "length"
    assert full["message"]["content"].startswith(cut["message"]["content"])
    stopped = (await ask(url, {**body, "stop": ["</tool_call>"]}))["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["stop_reason"] == "</tool_call>"
    assert stopped["message"]["content"] == full["message"]["content"][: -len("</tool_call>")]


async def test_continuation_of_a_call_ends_like_the_uninterrupted_one(
    nursery: trio.Nursery,
) -> None:
    """The gateway's mid-stream migration re-asks with the partial answer as the final
    assistant message; the continuation must complete the same call text."""
    _, url = await start(nursery)
    body = chat("hi", tools=TOOLS, tool_choice="required")
    full = (await ask(url, body))["choices"][0]["message"]["content"]
    pieces, _ = await ask_stream(url, body)
    partial = "".join(pieces[:7])
    again = {
        **body,
        "messages": [*body["messages"], {"role": "assistant", "content": partial}],
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    rest = (await ask(url, again))["choices"][0]["message"]["content"]
    assert partial + rest == full


@pytest.mark.parametrize(
    "tool_choice",
    [{"type": "function", "function": {"name": "nope"}}, "sometimes", {"function": 3}],
)
async def test_bad_tool_choice_is_a_400(nursery: trio.Nursery, tool_choice: Any) -> None:
    _, url = await start(nursery)
    body = chat("hi", tools=TOOLS, tool_choice=tool_choice)
    r = await http_request(url, "POST", "/v1/chat/completions", body)
    assert r.status == 400
    assert r.json()["error"]["param"] == "tool_choice"


def test_tool_format_option_and_flag() -> None:
    ns = build_parser().parse_args(["--tool-format", "mistral"])
    assert options_from_args(ns, as_process=False).tool_format == "mistral"
    assert options_from_args(build_parser().parse_args([])).tool_format == "hermes"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--tool-format", "bogus"])
    with pytest.raises(ValueError, match="unknown tool_format 'bogus'"):
        SimWorker(WorkerOptions(tool_format="bogus"))
