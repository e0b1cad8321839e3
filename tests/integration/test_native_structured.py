"""Structured outputs and forced tool choices over the native protocol, end to end: the
official `openai` client -> gateway -> ``SimEngine`` workers, which constrain their output as
a vLLM engine does (the simulator draws text that satisfies the constraint).

What is checked: the JSON answered for ``response_format`` validates against the schema,
streamed or not, in the merged and the P/D flow; ``tool_choice`` named or ``"required"`` gives
``tool_calls`` (vLLM's finish reasons: ``stop`` for a named function, ``tool_calls`` for
required) whose arguments validate against the tool's parameters; a worker that did not agree
on the ``structured_outputs`` capability never gets such a request (the client gets an error
naming it, and unconstrained requests still go there); bad constraints are 400s naming the
field.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
import trio
from gateway_support import MODEL
from test_native_e2e import BOUND, Recording, gateway_config, run, start_gateway, start_worker

from lmgw.simulators import WorkerOptions
from lmgw.simulators.faults import Faults
from lmgw.worker import WorkerServer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "kind": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "tags", "kind"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "Describe a pet as JSON, please."}]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=BOUND)


def answer(url: str, stream: bool, **kw: Any) -> dict[str, Any]:
    """content, tool_calls [(name, arguments)] and finish_reason of one chat."""
    kw.setdefault("max_tokens", 200)
    c = client(url)
    if not stream:
        r = c.chat.completions.create(model=MODEL, messages=ASK, **kw)
        msg = r.choices[0].message
        calls = [(t.function.name, t.function.arguments) for t in msg.tool_calls or ()]
        return {"content": msg.content, "calls": calls, "finish": r.choices[0].finish_reason}
    parts: list[str] = []
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in c.chat.completions.create(model=MODEL, messages=ASK, stream=True, **kw):
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            for t in ch.delta.tool_calls or ():
                cur = calls.setdefault(t.index, ["", ""])
                cur[0] += (t.function and t.function.name) or ""
                cur[1] += (t.function and t.function.arguments) or ""
            finish = ch.finish_reason or finish
    return {
        "content": "".join(parts) or None,
        "calls": [tuple(calls[i]) for i in sorted(calls)],
        "finish": finish,
    }


async def fleet(nursery: trio.Nursery, flow: str = "pd") -> str:
    roles = {"pd": ["pd", "pd"], "p/d": ["p", "d"]}[flow]
    workers = [(role, (await start_worker(nursery, role))[1]) for role in roles]
    return (await start_gateway(nursery, gateway_config(workers, flow)))[1]


@pytest.mark.parametrize("flow", ["pd", "p/d"])
async def test_response_format_json_schema_validates(nursery: trio.Nursery, flow: str) -> None:
    url = await fleet(nursery, flow)
    rf = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    for stream in (False, True):
        got = await run(answer, url, stream, response_format=rf, seed=5)
        jsonschema.validate(json.loads(got["content"]), SCHEMA)
        assert got["finish"] == "stop" and not got["calls"]
    # json_object and vLLM's own fields go the same way
    got = await run(answer, url, False, response_format={"type": "json_object"})
    assert isinstance(json.loads(got["content"]), dict)
    got = await run(answer, url, True, extra_body={"guided_choice": ["yes", "no"]})
    assert got["content"] in ("yes", "no")
    got = await run(
        answer, url, False, extra_body={"structured_outputs": {"regex": "[a-c]{3}-\\d"}}
    )
    assert len(got["content"]) == 5 and got["content"][3] == "-"


async def test_forced_tool_choices_answer_calls(nursery: trio.Nursery) -> None:
    url = await fleet(nursery)
    named = {"type": "function", "function": {"name": "get_weather"}}
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for stream in (False, True):
        got = await run(answer, url, stream, tools=[WEATHER, TIME], tool_choice=named)
        assert got["finish"] == "stop" and not got["content"], got
        ((name, args),) = got["calls"]
        assert name == "get_weather"
        jsonschema.validate(json.loads(args), params[name])
        got = await run(answer, url, stream, tools=[TIME, WEATHER], tool_choice="required")
        assert got["finish"] == "tool_calls" and not got["content"], got
        assert got["calls"]
        for name, args in got["calls"]:
            jsonschema.validate(json.loads(args), params[name])
    # parallel_tool_calls false: at most one call
    got = await run(
        answer, url, False, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False
    )
    assert len(got["calls"]) == 1


class Seeing(Recording):
    """Remembers the constraint of every Generate."""

    seen: list[Any]

    def generate(self, req: Any) -> Any:
        self.seen = [*getattr(self, "seen", []), req.msg.params.structured]
        return super().generate(req)


class Unconstrained(Seeing):
    """A worker of an older build: it does not agree on ``structured_outputs``."""

    @property
    def capabilities(self) -> frozenset[str]:
        return super().capabilities - {"structured_outputs"}


async def test_a_worker_without_the_capability_never_gets_a_constraint(
    nursery: trio.Nursery,
) -> None:
    engine = Unconstrained(WorkerOptions(role="pd", model=MODEL, speed=float("inf")))
    server = await nursery.start(
        WorkerServer(engine, bind="tcp://127.0.0.1:0", control_bind=None).run
    )
    _, url = await start_gateway(nursery, gateway_config([("pd", "zmq+" + server.endpoint)]))
    rf = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    with pytest.raises(openai.APIStatusError) as info:
        await run(answer, url, False, response_format=rf)
    assert "structured_outputs" in info.value.message
    assert info.value.status_code == 502  # as for a missing top_logprobs capability
    got = await run(answer, url, False)  # an unconstrained request still goes there
    assert got["content"]
    assert engine.seen == [None]


async def test_bad_constraints_are_400s_naming_the_field(nursery: trio.Nursery) -> None:
    url = await fleet(nursery)
    cases = [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]},
         "tool_choice"),
        ({"tool_choice": "required"}, "tools"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"extra_body": {"guided_regex": "a", "guided_choice": ["b"]}}, "structured_outputs"),
        ({"extra_body": {"guided_grammar": 'root ::= "a" root'}}, None),  # the simulator's 400
    ]  # fmt: skip
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await run(answer, url, False, **kw)
        if param is not None:
            assert info.value.body["param"] == param, (kw, info.value.body)  # type: ignore[index]


async def test_a_constrained_stream_that_breaks_is_continued_under_its_rest(
    nursery: trio.Nursery,
) -> None:
    """A native worker failing mid-answer: the continuation's `SamplingParams.structured` is the
    grammar of the rest of the document (the engine restarts a constraint at its first token,
    so a resent schema would make a second document), and the client gets one valid one."""
    bad = (await start_worker(nursery, "pd", faults=Faults(crash_at_token=4)))[1]
    good_engine = Seeing(WorkerOptions(role="pd", model=MODEL, speed=float("inf")))
    server = await nursery.start(
        WorkerServer(good_engine, bind="tcp://127.0.0.1:0", control_bind=None).run
    )
    good = "zmq+" + server.endpoint
    gw, url = await start_gateway(nursery, gateway_config([("pd", bad), ("pd", good)]))
    rf = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    for _ in range(2):  # round robin: one starts on the crashing worker
        got = await run(answer, url, True, response_format=rf, temperature=0)
        jsonschema.validate(json.loads(got["content"]), SCHEMA)
    assert gw.metrics.migrations.values.get(("pd", "continued")) == 1
    assert sorted(c.kind for c in good_engine.seen) == ["grammar", "json"], good_engine.seen
