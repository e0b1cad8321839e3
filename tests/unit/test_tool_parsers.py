"""Tool-call parsers, the reasoning split and their helpers on concrete model outputs.

Expected answers follow vLLM's parsers (``vllm/entrypoints/openai/tool_parsers``): arguments are
``json.dumps(arguments, ensure_ascii=False)``, content before the calls is kept, content is None
when only calls were made. Where lmgw differs on purpose (text after the calls is kept), the
test says so.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest

from lmgw.tools import (
    TOOL_PARSERS,
    OutputStream,
    ReasoningParser,
    assemble,
    finish_reason,
    get_tool_parser,
    mistral_tool_call_id,
    parse_output,
    tool_call_id,
    wants_tool_parsing,
)
from lmgw.tools._json import JsonError, JsonValue
from lmgw.tools.parsers.deepseek_v3 import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP
from lmgw.tools.parsers.qwen3_coder import convert_parameter


def ids() -> Any:
    n = itertools.count()
    return lambda: f"call_{next(n)}"


def parser(name: str) -> Any:
    return get_tool_parser(name, new_id=ids())


def calls_of(result: tuple[str | None, list[dict[str, Any]]]) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in result[1]]


def stream(name: str, chunks: list[str], request: dict[str, Any] | None = None) -> list[Any]:
    s = parser(name).stream(request)
    out: list[Any] = []
    for c in chunks:
        out += s.feed(c)
    return out + s.finish()


WEATHER = '{"location": "San Francisco, CA", "unit": "fahrenheit"}'

# -- registry and helpers --------------------------------------------------------------------


def test_registry_has_vllm_names_and_rejects_unknown() -> None:
    assert set(TOOL_PARSERS) == {
        "hermes",
        "llama3_json",
        "mistral",
        "qwen3_coder",
        "pythonic",
        "deepseek_v3",
    }
    for name, cls in TOOL_PARSERS.items():
        assert cls.name == name
        assert type(get_tool_parser(name)) is cls
    with pytest.raises(ValueError, match=r"unknown tool parser 'nope'.*hermes"):
        get_tool_parser("nope")


def test_default_ids_have_the_expected_shapes() -> None:
    assert re.fullmatch(r"call_[0-9a-f]{24}", tool_call_id())
    assert re.fullmatch(r"[A-Za-z0-9]{9}", mistral_tool_call_id())
    assert tool_call_id() != tool_call_id()
    text = "[TOOL_CALLS]f[ARGS]{}"
    (call,) = get_tool_parser("mistral").extract(text)[1]
    assert re.fullmatch(r"[A-Za-z0-9]{9}", call["id"])
    (call,) = get_tool_parser("hermes").extract('<tool_call>{"name": "f"}</tool_call>')[1]
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"])


@pytest.mark.parametrize(
    ("upstream", "calls", "want"),
    [
        ("stop", 1, "tool_calls"),
        ("stop", 0, "stop"),
        ("length", 2, "length"),
        (None, 1, None),
        ("abort", 1, "abort"),
    ],
)
def test_finish_reason(upstream: str | None, calls: int, want: str | None) -> None:
    assert finish_reason(upstream, calls) == want


def test_wants_tool_parsing() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert wants_tool_parsing({"tools": tools})
    assert wants_tool_parsing({"tools": tools, "tool_choice": "required"})
    assert wants_tool_parsing({"tools": tools, "tool_choice": {"function": {"name": "f"}}})
    assert not wants_tool_parsing({"tools": tools, "tool_choice": "none"})
    assert not wants_tool_parsing({"tools": []})
    assert not wants_tool_parsing({"messages": []})


# -- the canonical arguments text ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ('{"a":1,"b":[true,false,null]}', '{"a": 1, "b": [true, false, null]}'),
        ('{ "n" : 1E2 , "m": -0, "f": 1.50 }', '{"n": 100.0, "m": 0, "f": 1.5}'),
        ('"caf\\u00e9 \\/ \\"q\\""', '"café / \\"q\\""'),
        ('"\\ud83d\\ude00"', '"😀"'),
        ('"\\ud83d x"', '"\\ud83d x"'),  # a lone surrogate stays escaped
        ('"line\nbreak\t"', '"line\\nbreak\\t"'),  # raw control characters: escaped
        ("[]", "[]"),
        ("{}", "{}"),
        ("123456789012345678901234567890", "123456789012345678901234567890"),
    ],
)
def test_json_value_writes_what_json_dumps_writes(raw: str, canonical: str) -> None:
    for chunks in ([raw], list(raw)):
        v = JsonValue()
        text, pos = "", 0
        for c in chunks:
            pending = text[pos:] + c
            used = v.feed(pending, 0, False)
            text, pos = pending, used
        v.feed(text, pos, True)
        assert v.done
        assert "".join(v.out) == canonical
    if "\\ud83d x" not in raw and "\n" not in raw:
        assert canonical == json.dumps(json.loads(raw), ensure_ascii=False)


@pytest.mark.parametrize("bad", ["{'a': 1}", "[1,]", '{"a" 1}', "01", "1e999", "tru e", "{,}"])
def test_json_value_rejects_what_json_rejects(bad: str) -> None:
    with pytest.raises(JsonError):
        v = JsonValue()
        v.feed(bad, 0, True)
        if not v.done:
            raise JsonError("incomplete", len(bad))


# -- hermes ---------------------------------------------------------------------------------------


def test_hermes_vllm_example() -> None:
    text = f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>'
    content, calls = parser("hermes").extract(text)
    assert content is None
    assert calls == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": WEATHER},
        }
    ]


def test_hermes_stream_deltas_in_openai_shape() -> None:
    chunks = ["Sure.", " <tool", '_call>\n{"name": "get_', 'weather", "arguments": {"loc',
              'ation": "SF"}}\n</tool_call>']  # fmt: skip
    assert stream("hermes", chunks) == [
        {"content": "Sure."},
        {"content": " "},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"loc'},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ation": "SF"}'}}]},
    ]


def test_hermes_holds_only_a_possible_marker() -> None:
    s = parser("hermes").stream()
    assert s.feed("Hello <to") == [{"content": "Hello "}]
    assert s.holding == 3
    assert s.feed("ol> and <") == [{"content": "<tool> and "}]
    assert s.feed("b>") == [{"content": "<b>"}]
    assert s.holding == 0
    assert s.feed("x <tool_cal") == [{"content": "x "}]
    assert s.finish() == [{"content": "<tool_cal"}]
    assert s.finish() == []  # idempotent


def test_hermes_several_calls_and_text_after_them() -> None:
    text = (
        'I will call two.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"arguments": {}, "name": "b"}\n</tool_call>\nDone.'
    )
    result = parser("hermes").extract(text)
    # vLLM drops "Done."; lmgw keeps what the model said outside the calls.
    assert result[0] == "I will call two.\nDone."
    assert calls_of(result) == [("a", '{"x": 1}'), ("b", "{}")]


@pytest.mark.parametrize(
    "text",
    [
        "Hi <tool_call>not json</tool_call>",
        'Hi <tool_call>{"arguments": {}}</tool_call>',  # no name
        'Hi <tool_call>{"name": ""}</tool_call>',
        'Hi <tool_call>{"name": 5}</tool_call>',
        'Hi <tool_call>{"name": "f", "argu',  # cut before the call committed
    ],
)
def test_hermes_text_that_is_not_a_call_is_content_streamed_or_not(text: str) -> None:
    assert parser("hermes").extract(text) == (text, [])
    deltas = stream("hermes", list(text))
    assert assemble(deltas) == (text, [])


def test_hermes_call_broken_after_it_began() -> None:
    text = 'Hi <tool_call>{"name": "f", "arguments": {"a": [1, 2'
    assert parser("hermes").extract(text) == (text, [])  # vLLM: the whole text as content
    s = parser("hermes").stream()
    deltas = s.feed(text) + s.finish()
    assert s.broken
    assert deltas[1]["tool_calls"][0]["function"]["name"] == "f"  # already sent


def test_streams_of_one_parser_share_nothing() -> None:
    p = parser("hermes")
    a, b = p.stream(), p.stream()
    a.feed('<tool_call>{"name": "f", "arguments": {"x": ')
    assert b.feed("plain") == [{"content": "plain"}]
    assert b.finish() == []
    assert a.feed("1}}</tool_call>") == [{"tool_calls": [{"index": 0, "function":
                                                         {"arguments": "1}"}}]}]  # fmt: skip
    assert b.calls == 0 and a.calls == 1


# -- llama3_json ----------------------------------------------------------------------------------


def test_llama3_bare_json_and_python_tag() -> None:
    p = parser("llama3_json")
    text = f'{{"name": "get_weather", "parameters": {WEATHER}}}'
    assert calls_of(p.extract(text)) == [("get_weather", WEATHER)]
    assert p.extract("  " + text)[0] is None
    text = '<|python_tag|>{"name": "a", "arguments": {}}; {"name": "b", "parameters": {"k": "v"}}'
    assert calls_of(p.extract(text)) == [("a", "{}"), ("b", '{"k": "v"}')]
    assert p.extract("Let me look. " + text)[0] == "Let me look. "


@pytest.mark.parametrize(
    "text",
    ['{"answer": 42}', '{"name": "Bob", "age": 3}', "<|python_tag|>print(1)", "{not json", "{"],
)
def test_llama3_objects_that_are_not_calls_are_content(text: str) -> None:
    assert parser("llama3_json").extract(text) == (text, [])
    assert assemble(stream("llama3_json", list(text))) == (text, [])


def test_llama3_holds_a_leading_object_until_decided() -> None:
    s = parser("llama3_json").stream()
    assert s.feed("  ") == []
    assert s.feed('{"name": "f"') == []
    out = s.feed(', "parameters": {"a"')
    assert out[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a"'}
    s = parser("llama3_json").stream()
    assert s.feed("Plain {text}") == [{"content": "Plain {text}"}]


# -- mistral -----------------------------------------------------------------------------------


def test_mistral_both_forms() -> None:
    p = parser("mistral")
    old = '[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]'
    assert calls_of(p.extract(old)) == [("a", '{"x": 1}'), ("b", "{}")]
    new = '[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[ARGS]{}'
    assert calls_of(p.extract(new)) == [("a", '{"x": 1}'), ("b", "{}")]
    assert p.extract("Checking. " + new)[0] == "Checking. "
    # arguments written as a JSON string are unwrapped
    text = '[TOOL_CALLS][{"name": "a", "arguments": "{\\"x\\":1}"}]'
    assert calls_of(p.extract(text)) == [("a", '{"x": 1}')]


@pytest.mark.parametrize(
    "text", ["[TOOL_CALLS]bad name[ARGS]{}", "[TOOL_CALLS][1, 2]", "[TOOL_CALLS]", "[TOOL_CALLS][]"]
)
def test_mistral_non_calls_are_content(text: str) -> None:
    assert parser("mistral").extract(text) == (text, [])


def test_mistral_name_is_held_at_most_max_name() -> None:
    s = parser("mistral").stream()
    s.feed("[TOOL_CALLS]" + "a" * 256)
    assert s.holding == 256
    assert s.feed("a") == [{"content": "[TOOL_CALLS]" + "a" * 257}]


# -- qwen3_coder --------------------------------------------------------------------------------

QWEN_TOOLS = {
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "days": {"type": "integer"},
                        "scale": {"type": "number"},
                        "hourly": {"type": "boolean"},
                        "fields": {"type": "array"},
                        "opts": {"type": ["object", "null"]},
                    },
                },
            },
        }
    ]
}


def test_qwen3_coder_types_values_by_schema() -> None:
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n<parameter=scale>\n2.0\n</parameter>\n"
        "<parameter=hourly>\nTrue\n</parameter>\n<parameter=fields>\n['t', 'rain']\n</parameter>\n"
        '<parameter=opts>\n{"a": null}\n</parameter>\n<parameter=extra>\n7\n</parameter>\n'
        "</function>\n</tool_call>"
    )
    result = parser("qwen3_coder").extract(text, QWEN_TOOLS)
    assert result[0] is None
    assert calls_of(result) == [
        (
            "get_weather",
            '{"city": "San Francisco", "days": 3, "scale": 2, "hourly": true, '
            '"fields": ["t", "rain"], "opts": {"a": null}, "extra": "7"}',
        )
    ]


@pytest.mark.parametrize(
    ("value", "spec", "want"),
    [
        ("null", {"type": "integer"}, None),
        ("NULL", None, None),
        ("x", None, "x"),
        ("12", {"type": "integer"}, 12),
        ("twelve", {"type": "integer"}, "twelve"),
        ("1.5", {"type": "number"}, 1.5),
        ("3.0", {"type": "float"}, 3),
        ("inf", {"type": "number"}, "inf"),
        ("yes", {"type": "boolean"}, False),
        ("TRUE", {"type": "bool"}, True),
        ("[1, 2]", {"type": "array"}, [1, 2]),
        ("{'a': (1, 2)}", {"type": "object"}, {"a": (1, 2)}),
        ("{1, 2}", {"type": "object"}, "{1, 2}"),  # a set has no JSON form: stays text
        ("5", {"type": "enum"}, "5"),
        ("5", {}, "5"),
        ("5", {"type": ["integer", "null"]}, 5),
    ],
)
def test_qwen3_coder_conversion_table(value: str, spec: Any, want: Any) -> None:
    assert convert_parameter(value, spec) == want


def test_qwen3_coder_streams_string_values_as_they_come() -> None:
    s = parser("qwen3_coder").stream(QWEN_TOOLS)
    first = s.feed("<tool_call>\n<function=get_weather>\n<parameter=city>\nSan")
    (delta,) = first  # the call's first delta already carries what the arguments have so far
    assert delta["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "San',
    }
    assert s.feed(" Fran\n</para") == [
        {"tool_calls": [{"index": 0, "function": {"arguments": " Fran"}}]}
    ]
    assert s.feed("meter>\n<parameter=days>\n1") == [
        {"tool_calls": [{"index": 0, "function": {"arguments": '"'}}]}
    ]
    assert s.feed("4\n</parameter>\n</function>\n</tool_call>") == [
        {"tool_calls": [{"index": 0, "function": {"arguments": ', "days": 14}'}}]}
    ]
    # a value that may still be null is held
    s = parser("qwen3_coder").stream()
    s.feed("<function=f>\n<parameter=a>\nNu")
    assert s.holding == 2


def test_qwen3_coder_tolerates_missing_end_tags_like_vllm() -> None:
    p = parser("qwen3_coder")
    text = "<tool_call><function=f><parameter=a>\n1\n<parameter=b>\nx\n</function>"
    assert calls_of(p.extract(text)) == [("f", '{"a": "1", "b": "x"}')]
    assert calls_of(p.extract("<function=f>\n<parameter=a>\nhello wor")) == [
        ("f", '{"a": "hello wor"}')
    ]
    assert p.extract("<tool_call>\nno function</tool_call>") == (
        "<tool_call>\nno function</tool_call>",
        [],
    )


# -- pythonic -----------------------------------------------------------------------------------


def test_pythonic_calls() -> None:
    p = parser("pythonic")
    text = "[get_weather(city='San Francisco', metric=True, days=[1, 2]), noop()]"
    result = p.extract(text)
    assert result[0] is None
    assert calls_of(result) == [
        ("get_weather", '{"city": "San Francisco", "metric": true, "days": [1, 2]}'),
        ("noop", "{}"),
    ]
    # commas and parentheses inside strings and nested literals
    text = "[f(a=\"x, y)\", b={\"k\": (1, 2)}, c='''q\"''')] and then"
    result = p.extract(text)
    assert calls_of(result) == [("f", '{"a": "x, y)", "b": {"k": [1, 2]}, "c": "q\\""}')]
    assert result[0] == "and then"


@pytest.mark.parametrize("text", ["[1, 2, 3]", "[note] see above", "[]", "Sure: [f(a=1)]"])
def test_pythonic_lists_that_are_not_calls_are_content(text: str) -> None:
    assert parser("pythonic").extract(text) == (text, [])


@pytest.mark.parametrize("text", ["[f(1)]", "[f(a=)]", "[f(a={1, 2})]", "[f(a=1"])
def test_pythonic_broken_calls_answer_the_text(text: str) -> None:
    assert parser("pythonic").extract(text) == (text, [])


def test_pythonic_sends_the_name_at_the_parenthesis() -> None:
    s = parser("pythonic").stream()
    assert s.feed("[get_wea") == []
    (delta,) = s.feed("ther(")
    assert delta["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert s.feed("city='P") == []
    assert s.feed("aris', ") == [
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"'}}]}
    ]


# -- deepseek_v3 --------------------------------------------------------------------------------


def test_deepseek_v3_and_v31_forms() -> None:
    p = parser("deepseek_v3")
    v3 = (
        f"Let me check.{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n{WEATHER}\n"
        f"```{CALL_END}{CALL_BEGIN}function{SEP}noop\n```json\n{{}}\n```{CALL_END}{CALLS_END}"
    )
    result = p.extract(v3)
    assert result[0] == "Let me check."
    assert calls_of(result) == [("get_weather", WEATHER), ("noop", "{}")]
    v31 = f"{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}{WEATHER}{CALL_END}{CALLS_END}"
    assert p.extract(v31) == (None, [{"id": "call_2", "type": "function",
                                      "function": {"name": "get_weather",
                                                   "arguments": WEATHER}}])  # fmt: skip
    broken = f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}f\nnot a fence"
    assert p.extract(broken) == (broken, [])


# -- reasoning and the composition ----------------------------------------------------------------


def test_reasoning_variants() -> None:
    think = ReasoningParser()
    assert think.extract("<think>\nhmm\n</think>\n\nAnswer") == ("\nhmm\n", "\n\nAnswer")
    assert think.extract("Answer <think>x</think>") == (None, "Answer <think>x</think>")
    assert think.extract("<think>cut short") == ("cut short", None)
    opened = ReasoningParser(opened=True)
    assert opened.extract("hmm</think>Answer") == ("hmm", "Answer")
    assert opened.extract("<think>hmm</think>Answer") == ("hmm", "Answer")
    assert opened.extract("no end") == ("no end", None)
    assert ReasoningParser(field="reasoning").stream().feed("<think>a") == [{"reasoning": "a"}]
    with pytest.raises(ValueError):
        ReasoningParser(start="")


def test_reasoning_stream_holds_only_marker_prefixes() -> None:
    s = ReasoningParser().stream()
    assert s.feed("<th") == []
    assert s.feed("ink>abc</th") == [{"reasoning_content": "abc"}]
    assert s.feed("ink>\nAns") == [{"content": "\nAns"}]
    assert s.feed("wer") == [{"content": "wer"}]
    assert s.finish() == []


def test_output_stream_parses_tools_only_in_the_content() -> None:
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    text = f"<think>maybe {call}</think>ok {call}"
    out = OutputStream(parser("hermes").stream(), ReasoningParser().stream())
    deltas: list[Any] = []
    for ch in text:
        deltas += out.feed(ch)
    deltas += out.finish()
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert reasoning == f"maybe {call}"
    assert assemble([d for d in deltas if "reasoning_content" not in d]) == (
        "ok ",
        [{"id": "call_0", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    )
    assert out.calls == 1
    whole = parse_output(text, tools=parser("hermes"), reasoning=ReasoningParser())
    assert (whole.reasoning, whole.content) == (f"maybe {call}", "ok ")
    assert [c["function"]["name"] for c in whole.tool_calls] == ["f"]
    plain = OutputStream(None, None)
    assert plain.feed("x") == [{"content": "x"}] and plain.finish() == [] and plain.calls == 0
    assert parse_output("x").content == "x"


@pytest.mark.parametrize(
    ("name", "head", "request_"),
    [
        ("pythonic", "[f(code='", None),
        ("qwen3_coder", "<function=f>\n<parameter=a>\n[", {"tools": [{"type": "function",
         "function": {"name": "f", "parameters": {"properties": {"a": {"type": "array"}}}}}]}),
        ("hermes", '<tool_call>{"name": "f", "arguments": {"code": "', None),
    ],
)  # fmt: skip
def test_long_values_are_not_kept_in_the_stream_buffer(
    name: str, head: str, request_: dict[str, Any] | None
) -> None:
    """Values typed only when complete move out of the buffer as they are scanned, so a long
    argument costs linear time however finely it is chunked (h11's receive-buffer rule)."""
    s = parser(name).stream(request_)
    s.feed(head)
    for _ in range(2000):
        s.feed("1, ")
        assert s.holding <= 16
