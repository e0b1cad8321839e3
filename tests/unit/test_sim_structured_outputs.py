"""Structured outputs in the simulators: the HTTP simulator (driven as a handler, with a
recording responder: no sockets) answers ``response_format``, ``structured_outputs`` and the
``guided_*`` fields with text that satisfies them, streamed or not, and 400s naming the field
for what it cannot produce or what vLLM refuses; the native ``SimEngine`` does the same for
``SamplingParams.structured`` and says so in its capabilities."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import jsonschema
import msgspec
import pytest

from lmgw.http.types import Headers, Request
from lmgw.protocol import Generate, SamplingParams, StructuredOutput
from lmgw.protocol.messages import FailureCode
from lmgw.simulators.app import SimWorker, WorkerOptions
from lmgw.worker.engine import EngineError, EngineRequest
from lmgw.worker.sim import SimEngine

MODEL = "sim-model"
SCHEMA = {
    "type": "object",
    "$defs": {"tag": {"type": "string", "pattern": "^#[a-z]{2,6}$"}},
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "minItems": 1},
        "kind": {"enum": ["cat", "dog"]},
        "owner": {"type": ["object", "null"], "properties": {"id": {"type": "integer"}}},
    },
    "required": ["name", "age", "tags", "kind"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}


class Recorder:
    """A :class:`~lmgw.http.types.Responder` that keeps what the handler answered."""

    def __init__(self) -> None:
        self.started = False
        self.status = 0
        self.body = b""

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        self.status, self.body = status, body

    async def start(self, status: int, headers: Headers) -> None:
        self.started, self.status = True, status

    async def send(self, data: bytes) -> None:
        self.body += data

    async def end(self, data: bytes = b"") -> None:
        self.body += data


@pytest.fixture(scope="module")
def worker() -> SimWorker:
    return SimWorker(WorkerOptions(model=MODEL, speed=math.inf))


async def post(worker: SimWorker, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """(status, the JSON body; for a stream, the list of its events' JSON)."""
    out = Recorder()
    request = Request(
        "POST", path, "", [(b"content-type", b"application/json")], msgspec.json.encode(body)
    )
    await worker(request, out)
    if not out.started:
        return out.status, json.loads(out.body)
    events = [e.removeprefix(b"data: ") for e in out.body.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    return out.status, [json.loads(e) for e in events[:-1]]


async def chat(worker: SimWorker, stream: bool = False, **fields: Any) -> tuple[int, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "A pet, please."}]}
    return await post(worker, "/v1/chat/completions", {**body, "stream": stream, **fields})


def streamed(events: list[Any], chat: bool = True) -> tuple[str, str | None]:
    """(text, finish_reason) of a stream."""
    text = "".join(
        (c["delta"].get("content") or "") if chat else c["text"]
        for e in events
        for c in e["choices"]
    )
    finish = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
    return text, finish[-1] if finish else None


async def test_json_schema_answers_validate_streamed_or_not(worker: SimWorker) -> None:
    for seed in range(5):
        status, body = await chat(worker, response_format=RESPONSE_FORMAT, seed=seed)
        assert status == 200, body
        choice = body["choices"][0]
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
        assert choice["finish_reason"] == "stop"
        status, events = await chat(worker, True, response_format=RESPONSE_FORMAT, seed=seed)
        assert status == 200
        assert streamed(events) == (choice["message"]["content"], "stop")
    # vLLM's older field, the schema as text; completions too, streamed
    status, body = await post(
        worker,
        "/v1/completions",
        {"model": MODEL, "prompt": "Pet:", "guided_json": json.dumps(SCHEMA), "stream": True},
    )
    assert status == 200
    text, finish = streamed(body, chat=False)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert finish == "stop"


async def test_json_object_choice_and_regex(worker: SimWorker) -> None:
    _, body = await chat(worker, response_format={"type": "json_object"})
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)
    choices = ["yes", "no", "maybe not"]
    for seed in range(6):
        _, body = await chat(worker, guided_choice=choices, seed=seed)
        assert body["choices"][0]["message"]["content"] in choices
        _, events = await chat(worker, True, guided_choice=choices, seed=seed)
        assert streamed(events)[0] in choices
    pattern = r"[A-Z]{2}-\d{3,5}(?:/[a-z]+)?"
    for seed in range(6):
        status, body = await post(
            worker,
            "/v1/completions",
            {"model": MODEL, "prompt": "Id:", "guided_regex": pattern, "seed": seed},
        )
        assert status == 200 and re.fullmatch(pattern, body["choices"][0]["text"]), body
    _, body = await chat(worker, structured_outputs={"regex": pattern, "disable_fallback": True})
    assert re.fullmatch(pattern, body["choices"][0]["message"]["content"])


async def test_max_tokens_cuts_constrained_text_short(worker: SimWorker) -> None:
    _, whole = await chat(worker, response_format=RESPONSE_FORMAT)
    _, cut = await chat(worker, response_format=RESPONSE_FORMAT, max_tokens=3)
    text = cut["choices"][0]["message"]["content"]
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 3
    assert whole["choices"][0]["message"]["content"].startswith(text)


async def test_a_tool_call_wins_over_a_constraint(worker: SimWorker) -> None:
    params = {"type": "object", "properties": {"zone": {"enum": ["UTC"]}}, "required": ["zone"]}
    tool = {"type": "function", "function": {"name": "get_time", "parameters": params}}
    named = {"type": "function", "function": {"name": "get_time"}}
    _, body = await chat(worker, tools=[tool], tool_choice=named, guided_choice=["x"])
    content = body["choices"][0]["message"]["content"]
    assert "<tool_call>" in content and '"get_time"' in content  # the hermes format's call


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"guided_grammar": 'root ::= "a" root'}, "guided_grammar", "no finite string"),
        ({"structured_outputs": {"grammar": "root ::= 'a'"}}, "structured_outputs", "parse"),
        ({"guided_regex": "(a)\\1"}, "guided_regex", "backreferences"),
        (
            {"response_format": {"type": "structural_tag", "format": {}}},
            "response_format",
            "structural_tag",
        ),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "structured_outputs", "one kind"),
        ({"response_format": {"type": "xml"}}, "response_format", "response_format.type"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ],
)
async def test_bad_or_unsimulated_constraints_are_400s_naming_the_field(
    worker: SimWorker, fields: dict[str, Any], param: str, says: str
) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        if path == "/v1/completions" and "response_format" in fields:
            continue
        body = {"model": MODEL, **fields}
        body.update(
            {"messages": [{"role": "user", "content": "hi"}]}
            if "chat" in path
            else {"prompt": "hi"}
        )
        for stream in (False, True):
            status, err = await post(worker, path, {**body, "stream": stream})
            assert status == 400, err
            assert err["error"]["param"] == param and err["error"]["type"] == "BadRequestError"
            assert says in err["error"]["message"]


async def test_sim_engine_constrains_generate_and_refuses_unfinishable_grammars() -> None:
    engine = SimEngine(WorkerOptions(role="pd", model=MODEL, speed=math.inf))
    assert "structured_outputs" in engine.capabilities
    prefill_only = SimEngine(WorkerOptions(role="p", model=MODEL, speed=math.inf))
    assert "structured_outputs" not in prefill_only.capabilities

    async def run(structured: StructuredOutput, prompt: str = "A pet:") -> tuple[str, str]:
        params = SamplingParams(max_tokens=300, seed=3, structured=structured)
        msg = Generate("r", MODEL, prompt, params=params)
        outs = [o async for o in engine.generate(EngineRequest(msg))]
        return "".join(o.text for o in outs), outs[-1].finish_reason or ""

    text, finish = await run(StructuredOutput("json", SCHEMA))
    jsonschema.validate(json.loads(text), SCHEMA)
    assert finish == "stop"
    assert await run(StructuredOutput("json", SCHEMA)) == (text, finish)  # deterministic
    text, _ = await run(StructuredOutput("choice", ["left", "right"]))
    assert text in ("left", "right")
    text, _ = await run(StructuredOutput("regex", r"\d{4}"))
    assert re.fullmatch(r"\d{4}", text)
    plain, _ = await run(None)  # type: ignore[arg-type]
    assert plain != text and not plain.isdigit()
    text, _ = await run(StructuredOutput("grammar", 'root ::= "yes" | "no" | [0-9]{2}'))
    assert re.fullmatch(r"yes|no|[0-9]{2}", text), text
    with pytest.raises(EngineError) as info:
        await run(StructuredOutput("grammar", 'root ::= "a" root'))
    assert info.value.code == FailureCode.BAD_REQUEST and "grammar" in str(info.value)


async def test_properties_come_in_the_schemas_order(worker: SimWorker) -> None:
    schema = {
        "type": "object",
        "properties": {k: {"type": "integer"} for k in "zyx"},
        "required": list("zyx"),
    }
    rf = {"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}
    _, body = await chat(worker, response_format=rf)
    assert list(json.loads(body["choices"][0]["message"]["content"])) == ["z", "y", "x"]
