"""Mid-stream migration of constrained answers (ANCHORS.md §5.5): a stream under a JSON schema,
regex or choice that breaks is continued on another worker under the constraint of its *rest*,
so the client's whole answer still meets the constraint.

The simulators behave as engines do here: a continued request's constraint applies to the new
tokens only (a resent schema would start a second document), so only the gateway's replayed
grammar can make these answers valid.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
import trio
from gateway_support import MODEL, GatewayFactory, metric_value

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("hard_deadline")

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "population": {"type": "integer", "minimum": 0},
        "districts": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "districts", "capital"],
}
MESSAGES = [{"role": "user", "content": "Describe Paris as JSON."}]
CONTINUED = 'lmgw_stream_migrations_total{role="pd",outcome="continued"}'


def _text(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]
    )


async def _broken_then_served(gw: Any, body: dict[str, Any]) -> list[list[Any]]:
    """Two streams (round robin: one starts on the worker that drops mid-stream)."""
    out = []
    for _ in range(2):
        r = await gw.request("POST", "/v1/chat/completions", body, timeout=10)
        out.append(r.events())
    return out


async def test_a_json_schema_stream_is_continued_into_one_valid_document(
    gateway: GatewayFactory,
) -> None:
    gw = await gateway(per_worker=[{"faults": {"drop_at_token": 5}}, {}])
    body = {
        "model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 400,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "city", "schema": SCHEMA}},
    }  # fmt: skip
    for events in await _broken_then_served(gw, body):
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), events
        doc = json.loads(_text(events))  # one document, not a second one after half the first
        jsonschema.validate(doc, SCHEMA)
        assert len({e["id"] for e in events[:-1]}) == 1
    assert metric_value(await gw.metrics(), CONTINUED) >= 1


async def test_the_official_client_gets_a_valid_document_across_a_break(
    gateway: GatewayFactory,
) -> None:
    gw = await gateway(per_worker=[{"faults": {"drop_at_token": 3}}, {}])

    def run() -> list[str]:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=10)
        texts = []
        for _ in range(2):
            stream = client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=400, stream=True,
                extra_body={"guided_json": SCHEMA},
            )  # fmt: skip
            texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
        return texts

    for text in await trio.to_thread.run_sync(run):
        jsonschema.validate(json.loads(text), SCHEMA)
    assert metric_value(await gw.metrics(), CONTINUED) >= 1


@pytest.mark.parametrize(
    "constraint",
    [
        {"structured_outputs": {"regex": r"(?:[a-z]{4} ){6}[0-9]{3}"}},
        {"guided_choice": ["the quick brown fox jumps over the lazy dog again",
                           "the quick brown fox sleeps", "a slow red fox runs far away now"]},
    ],
    ids=["regex", "choice"],
)  # fmt: skip
async def test_regex_and_choice_streams_are_continued_within_the_constraint(
    gateway: GatewayFactory, constraint: dict[str, Any]
) -> None:
    gw = await gateway(per_worker=[{"faults": {"drop_at_token": 3}}, {}])
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 200, **constraint}
    for events in await _broken_then_served(gw, body):
        assert all("error" not in e for e in events[:-1]), events
        text = _text(events)
        if "guided_choice" in constraint:
            assert text in constraint["guided_choice"]
        else:
            assert re.fullmatch(constraint["structured_outputs"]["regex"], text), text
    assert metric_value(await gw.metrics(), CONTINUED) >= 1


async def test_a_constraint_the_gateway_cannot_replay_ends_with_an_error_event(
    gateway: GatewayFactory,
) -> None:
    gw = await gateway(per_worker=[{"faults": {"drop_at_token": 3}}, {}])
    body = {
        "model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 400,
        "structured_outputs": {"json": SCHEMA, "whitespace_pattern": "[ ]?"},
    }  # fmt: skip
    broken = [e for e in await _broken_then_served(gw, body) if "error" in e[-2]]
    assert len(broken) == 1
    assert broken[0][-1] == "[DONE]"
    assert "whitespace_pattern" in broken[0][-2]["error"]["message"]


async def test_a_regex_completion_stream_is_continued_within_the_constraint(
    gateway: GatewayFactory,
) -> None:
    gw = await gateway(per_worker=[{"faults": {"drop_at_token": 3}}, {}])
    pattern = r"[0-9]{3}-(?:[a-z]{4,6} ){4}[a-z]{4,6}"  # a restart would not match
    body = {"model": MODEL, "prompt": "Say it:", "stream": True, "max_tokens": 200,
            "guided_regex": pattern}  # fmt: skip
    for _ in range(2):
        r = await gw.request("POST", "/v1/completions", body, timeout=10)
        events = r.events()
        assert all("error" not in e for e in events[:-1]), events
        text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
        assert re.fullmatch(pattern, text), text
    assert metric_value(await gw.metrics(), CONTINUED) >= 1


async def test_a_long_partial_answer_is_replayed_off_the_event_loop_and_bounded(
    gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``INLINE_REPLAY_CHARS`` the replay runs in a worker thread; one that takes longer
    than ``REPLAY_TIMEOUT_S`` ends the stream with an error event that says so."""
    from lmgw.pipeline import migration, runner

    monkeypatch.setattr(migration, "INLINE_REPLAY_CHARS", 0)  # every replay goes to a thread
    gw = await gateway(per_worker=[{"faults": {"drop_at_token": 5}}, {}])
    rf = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 400,
            "response_format": rf}  # fmt: skip
    for events in await _broken_then_served(gw, body):
        assert all("error" not in e for e in events[:-1]), events
        jsonschema.validate(json.loads(_text(events)), SCHEMA)
    monkeypatch.setattr(runner, "REPLAY_TIMEOUT_S", 0.0)  # no replay finishes in time
    broken = [e for e in await _broken_then_served(gw, body) if "error" in e[-2]]
    assert len(broken) == 1 and "took over 0 s" in broken[0][-2]["error"]["message"]
