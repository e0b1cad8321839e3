"""lmgw.structured: what a request's fields constrain the output to, with vLLM's rules, and the
forced tool choice read back into calls (tools.parsers.forced)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.protocol import StructuredOutput
from lmgw.structured import (
    StructuredOutputError,
    forced_tool,
    forced_tool_schema,
    structured_output,
)
from lmgw.tools import assemble
from lmgw.tools.parsers.forced import NamedCallParser, RequiredCallsParser

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"$ref": "#/$defs/city"}},
            "required": ["city"],
            "$defs": {"city": {"type": "string"}},
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def _ids() -> Any:
    n = itertools.count()
    return lambda: f"call_{next(n)}"


# -- sources ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object")),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA},
                }
            },
            StructuredOutput("json", SCHEMA),
        ),
        ({"structured_outputs": {"regex": "[0-9]+"}}, StructuredOutput("regex", "[0-9]+")),
        (
            {"structured_outputs": {"choice": ["a", "b"], "json": None}},
            StructuredOutput("choice", ["a", "b"]),
        ),
        ({"structured_outputs": {"json_object": True}}, StructuredOutput("json_object")),
        (
            {"structured_outputs": {"grammar": "root ::= 'x'", "disable_any_whitespace": True}},
            StructuredOutput("grammar", "root ::= 'x'", {"disable_any_whitespace": True}),
        ),
        ({"guided_json": json.dumps(SCHEMA)}, StructuredOutput("json", SCHEMA)),
        (
            {"guided_choice": ["x"], "guided_whitespace_pattern": " "},
            StructuredOutput("choice", ["x"], {"whitespace_pattern": " "}),
        ),
        (
            {"guided_regex": "a|b", "guided_decoding_backend": "xgrammar"},
            StructuredOutput("regex", "a|b"),
        ),
        # the same constraint twice is one constraint
        (
            {"guided_regex": "a", "structured_outputs": {"regex": "a"}},
            StructuredOutput("regex", "a"),
        ),
    ],
)
def test_each_source_reads_into_one_constraint(
    body: dict[str, Any], expected: StructuredOutput | None
) -> None:
    assert structured_output("chat", body) == expected
    assert structured_output("completions", body) == expected


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"guided_regex": "a", "guided_choice": ["b"]}, "structured_outputs", "only use one kind"),
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "structured_outputs",
            "json_object, regex",
        ),
        (
            {"guided_regex": "a", "structured_outputs": {"regex": "b"}},
            "guided_regex",
            "second, different regex",
        ),
        ({"response_format": {"type": "xml"}}, "response_format", "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "schema"),
        ({"response_format": "json"}, "response_format", "response_format.type"),
        ({"structured_outputs": {"regexp": "a"}}, "structured_outputs", "no field 'regexp'"),
        ({"structured_outputs": []}, "structured_outputs", "must be an object"),
        ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs", "boolean"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_json": [1]}, "guided_json", "must be an object"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"guided_regex": ""}, "guided_regex", "non-empty string"),
        (
            {"guided_whitespace_pattern": 3, "guided_regex": "a"},
            "guided_whitespace_pattern",
            "string",
        ),
        ({"tool_choice": "required"}, "tools", "`tools` must be set"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "'nope' has not been passed",
        ),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice", "name must be"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", "must be 'none'"),
    ],
)
def test_bad_sources_are_named(body: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(StructuredOutputError, match=words) as info:
        structured_output("chat", body)
    assert info.value.param == param


def test_a_forced_tool_choice_is_the_tools_schema_as_vllm_builds_it() -> None:
    body: dict[str, Any] = {"tools": [WEATHER, TIME], "tool_choice": "required"}
    assert forced_tool(body) == ("required", None)
    schema = forced_tool_schema(body)
    assert schema is not None and schema["minItems"] == 1 and "maxItems" not in schema
    weather, clock = schema["items"]["anyOf"]
    assert weather["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    assert "$defs" not in weather["properties"]["parameters"]  # moved to the top
    assert schema["$defs"] == {"city": {"type": "string"}}
    assert clock["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert forced_tool_schema({**body, "parallel_tool_calls": False})["maxItems"] == 1  # type: ignore[index]
    named = {
        "tools": [WEATHER, TIME],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    assert forced_tool(named) == ("named", "get_weather")
    assert forced_tool_schema(named) == WEATHER["function"]["parameters"]
    # the tools' schema replaces a json constraint (vLLM), chat only, and tools=False skips it
    both = {**named, "response_format": {"type": "json_object"}}
    assert structured_output("chat", both) == StructuredOutput("json", forced_tool_schema(named))
    assert structured_output("chat", both, tools=False) == StructuredOutput("json_object")
    assert structured_output("completions", both) == StructuredOutput("json_object")
    for choice in (None, "auto", "none"):
        assert forced_tool({"tools": [WEATHER], "tool_choice": choice}) is None
    assert structured_output("chat", {"tools": [WEATHER]}) is None


def test_the_wire_struct_refuses_what_no_engine_could_run() -> None:
    for kind, spec in (
        ("xml", "a"),
        ("json", "a"),
        ("regex", ""),
        ("choice", []),
        ("json_object", {}),
    ):
        with pytest.raises(ValueError):
            StructuredOutput(kind, spec)
    with pytest.raises(ValueError, match="unknown structured output options"):
        StructuredOutput("regex", "a", {"backend": "x"})


# -- the answers read back ----------------------------------------------------------------------


def test_required_calls_and_named_call_answers() -> None:
    text = (
        '[{"name": "get_weather", "parameters": {"city": "Paris"}},'
        ' {"name": "get_time", "parameters": {}}]'
    )
    content, calls = RequiredCallsParser(new_id=_ids()).extract(text)
    assert content is None
    got = [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    assert got == [("call_0", "get_weather", {"city": "Paris"}), ("call_1", "get_time", {})]
    # not an array (a worker that did not constrain): content, no calls
    assert RequiredCallsParser().extract("hello") == ("hello", [])
    assert RequiredCallsParser().extract("[]") == ("[]", [])
    named = NamedCallParser("get_weather", new_id=_ids())
    assert named.extract('{"city": "Paris"}') == (
        None,
        [{"id": "call_0", "type": "function",
          "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
    )  # fmt: skip
    assert named.extract("")[1][0]["function"]["arguments"] == ""  # still the call
    assert not NamedCallParser.finish_tool_calls and RequiredCallsParser.finish_tool_calls


def _streamed(stream: Any, text: str, cuts: list[int]) -> list[dict[str, Any]]:
    """The deltas of ``text`` fed in pieces cut at ``cuts``, then finished."""
    deltas: list[dict[str, Any]] = []
    last = 0
    for cut in [*sorted({c % (len(text) + 1) for c in cuts}), len(text)]:
        deltas += stream.feed(text[last:cut])
        last = cut
    return deltas + stream.finish()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3)
    ),
    max_leaves=6,
)
calls_st = st.lists(
    st.tuples(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
        st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=150, deadline=None)
@given(calls=calls_st, cuts=st.lists(st.integers(0, 400), max_size=8), spaced=st.booleans())
def test_required_calls_stream_as_they_extract_however_cut(
    calls: list[tuple[str, dict[str, Any]]], cuts: list[int], spaced: bool
) -> None:
    text = RequiredCallsParser.render(calls)
    if spaced:
        text = json.dumps([{"name": n, "parameters": a} for n, a in calls], indent=1)
    whole = RequiredCallsParser(new_id=_ids()).extract(text)
    assert whole[0] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole[1]] == [
        (n, a) for n, a in calls
    ]
    stream = RequiredCallsParser(new_id=_ids()).stream()
    assert assemble(_streamed(stream, text, cuts)) == whole
    assert stream.calls == len(calls) and not stream.broken


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60), cuts=st.lists(st.integers(0, 80), max_size=6))
def test_any_text_never_raises_and_streams_as_whole(text: str, cuts: list[int]) -> None:
    makers = (
        lambda: RequiredCallsParser(new_id=_ids()),
        lambda: NamedCallParser("f", new_id=_ids()),
    )
    for make in makers:
        whole = make().extract(text)
        stream = make().stream()
        deltas = _streamed(stream, text, cuts)
        if not stream.broken:
            assert assemble(deltas) == whole
