"""Tool-call and reasoning parsers under every way of cutting a model's output into chunks.

The promises checked (docs/tools.md):

- for a well-formed output (content, calls in the format, more content), the streamed deltas
  add up to exactly the non-streamed answer, which holds the calls' names and the canonical
  ``json.dumps(arguments, ensure_ascii=False)`` text;
- plain text goes through unchanged, in order, and is held back at most the length of a
  partial marker (plus, for the two formats recognised only at the start, leading spaces);
- any text at all (marker fragments, broken JSON) never raises, gives the same answer however
  it is chunked, equals the non-streamed answer unless a begun call broke, and is all content
  when no call came out of it.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmgw.tools import TOOL_PARSERS, ReasoningParser, assemble, get_tool_parser
from lmgw.tools._json import canonical_json
from lmgw.tools.parsers import deepseek_v3, hermes, llama3_json, mistral, qwen3_coder

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = sorted(TOOL_PARSERS)
MARKERS: dict[str, tuple[str, ...]] = {
    "hermes": (hermes.START,),
    "llama3_json": (llama3_json.PYTHON_TAG,),
    "mistral": (mistral.TOOL_CALLS,),
    "qwen3_coder": (qwen3_coder.TOOL_CALL, qwen3_coder.FUNCTION),
    "pythonic": (),
    "deepseek_v3": (deepseek_v3.CALLS_BEGIN,),
}
MAX_HOLD = {name: max((len(m) - 1 for m in marks), default=0) for name, marks in MARKERS.items()}
AT_START_ONLY = {"llama3_json": "{", "pythonic": "["}
"""Formats whose calls may also be bare at the start of the output, and how such a start looks."""


def _ids() -> Any:
    n = iter(range(10**9))
    return lambda: f"id{next(n)}"


# -- strategies --------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=8,
)
identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
keywords = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
json_args = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
py_args = st.dictionaries(keywords, json_values, max_size=4)
# Qwen3-Coder values are text typed by the schema: strings must not read as null nor hold tags.
qwen_strings = st.text(max_size=16).filter(lambda s: s.lower() != "null" and "<" not in s)
qwen_values = (
    qwen_strings
    | st.integers(-(10**9), 10**9)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.lists(json_values, max_size=3)
    | st.dictionaries(st.text(max_size=6), json_values, max_size=3)
)
qwen_args = st.dictionaries(keywords, qwen_values, max_size=4)
words = st.from_regex(r"[A-Za-z][A-Za-z0-9 .,!?]{0,20}", fullmatch=True)


def _schema_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _qwen_expected(args: dict[str, Any]) -> dict[str, Any]:
    """What the schema types turn each value back into (integral numbers become integers)."""
    out = {}
    for k, v in args.items():
        if isinstance(v, float) and not isinstance(v, bool) and v - int(v) == 0:
            v = int(v)
        out[k] = v
    return out


@st.composite
def model_outputs(draw: st.DrawFn, name: str) -> tuple[str, dict[str, Any], str | None, list]:
    """(text, request, expected content, expected [(name, arguments text)])."""
    parser = TOOL_PARSERS[name]
    arg_strategy = {"pythonic": py_args, "qwen3_coder": qwen_args}.get(name, json_args)
    unique = (lambda c: c[0]) if name == "qwen3_coder" else None  # schemas are per name
    calls = draw(
        st.lists(st.tuples(identifiers, arg_strategy), min_size=1, max_size=3, unique_by=unique)
    )
    marks = MARKERS[name]
    prefix = "" if name in AT_START_ONLY else draw(st.text(max_size=30))
    if any(m in prefix for m in marks):
        prefix = ""
    suffix = draw(st.none() | words)
    text = prefix + parser.render(calls)
    if suffix is not None:
        text += draw(st.sampled_from((" ", "\n", "\n\n"))) + suffix
    content = prefix + (suffix or "")
    request: dict[str, Any] = {}
    if name == "qwen3_coder":
        request = {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": fn,
                        "parameters": {
                            "type": "object",
                            "properties": {k: {"type": _schema_type(v)} for k, v in args.items()},
                        },
                    },
                }
                for fn, args in calls
            ]
        }
        calls = [(fn, _qwen_expected(args)) for fn, args in calls]
    expected = [(fn, canonical_json(args)) for fn, args in calls]
    return text, request, content or None, expected


def chunked(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=24))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def stream_all(name: str, chunks: list[str], request: dict[str, Any] | None = None) -> tuple:
    stream = get_tool_parser(name, new_id=_ids()).stream(request)
    deltas: list[dict[str, Any]] = []
    for chunk in chunks:
        deltas += stream.feed(chunk)
    deltas += stream.finish()
    return deltas, stream


def _check_delta_shapes(deltas: list[dict[str, Any]]) -> None:
    """First delta of a call: index, id, type, name; afterwards only arguments; in order."""
    seen: set[int] = set()
    for d in deltas:
        assert set(d) <= {"content", "tool_calls"} and d
        for tc in d.get("tool_calls", ()):
            fn = tc["function"]
            if tc["index"] not in seen:
                assert tc["index"] == len(seen)
                assert tc["type"] == "function" and tc["id"] and fn["name"]
                seen.add(tc["index"])
            else:
                assert set(tc) == {"index", "function"} and set(fn) == {"arguments"}
                assert tc["index"] == len(seen) - 1


# -- well-formed outputs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_streamed_equals_whole_for_any_split(name: str, data: st.DataObject) -> None:
    text, request, content, expected = data.draw(model_outputs(name))
    whole_content, whole_calls = get_tool_parser(name, new_id=_ids()).extract(text, request)
    assert whole_content == content
    got = [(c["function"]["name"], c["function"]["arguments"]) for c in whole_calls]
    assert got == expected
    for fn, arguments in got:
        json.loads(arguments)  # always valid JSON
        assert fn
    deltas, stream = stream_all(name, chunked(data.draw, text), request)
    assert not stream.broken and stream.calls == len(expected)
    _check_delta_shapes(deltas)
    streamed_content, streamed_calls = assemble(deltas)
    assert streamed_content == whole_content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in streamed_calls] == got


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_one_character_at_a_time(name: str, data: st.DataObject) -> None:
    text, request, _content, expected = data.draw(model_outputs(name))
    deltas, _ = stream_all(name, list(text), request)
    _, calls = assemble(deltas)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == expected


# -- plain text ----------------------------------------------------------------------------------

plain_alphabet = st.characters(codec="utf-8") | st.sampled_from(list("<[{|>]}=\n \uff5c\u2581"))


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_plain_text_passes_through_with_bounded_holdback(name: str, data: st.DataObject) -> None:
    text = data.draw(st.text(plain_alphabet, max_size=80))
    marks = MARKERS[name]
    lead = AT_START_ONLY.get(name)
    if any(m in text for m in marks) or (lead and text.lstrip().startswith(lead)):
        return
    stream = get_tool_parser(name).stream()
    fed = emitted = ""
    for chunk in chunked(data.draw, text):
        fed += chunk
        for d in stream.feed(chunk):
            assert set(d) == {"content"}
            emitted += d["content"]
        assert fed.startswith(emitted)  # unchanged and in order
        held = len(fed) - len(emitted)
        assert held <= MAX_HOLD[name] or (lead is not None and not fed.strip())
    for d in stream.finish():
        emitted += d["content"]
    assert emitted == text and stream.calls == 0


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_characters="<[{"), max_size=40))
def test_text_without_marker_characters_is_never_held(name: str, text: str) -> None:
    stream = get_tool_parser(name).stream()
    if name in AT_START_ONLY:
        stream.feed("x")  # past the start, where these formats wait for a first character
    for ch in text:
        assert stream.feed(ch) == [{"content": ch}]


# -- anything at all -----------------------------------------------------------------------------

FRAGMENTS = [
    *(m for marks in MARKERS.values() for m in marks),
    *(m[: len(m) // 2] for marks in MARKERS.values() for m in marks),
    hermes.END, mistral.ARGS, deepseek_v3.CALL_BEGIN, deepseek_v3.CALL_END, deepseek_v3.SEP,
    deepseek_v3.CALLS_END, qwen3_coder.PARAMETER, qwen3_coder.PARAMETER_END,
    qwen3_coder.FUNCTION_END, qwen3_coder.TOOL_CALL_END, "```json\n", "```",
    '{"name": "f", "arguments": ', '{"name": "g", "parameters": {"a": 1}}', '"name"', "null",
    '"x"', "{", "}", "[", "]", "(", ")", ":", ",", ";", "=", "\n", " ", "\\", '"', "1", "-",
    "1e5", "f(", "a=", "'s'", "True", "\\u00e9", "\\ud83d", "\\ude00", "function", "get_x",
]  # fmt: skip
soup = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3), max_size=24).map("".join)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_text_is_chunking_invariant(name: str, data: st.DataObject) -> None:
    text = data.draw(soup)
    once, one_stream = stream_all(name, [text])
    split, _ = stream_all(name, chunked(data.draw, text))
    _check_delta_shapes(split)
    assert assemble(split) == assemble(once)
    content, calls = get_tool_parser(name, new_id=_ids()).extract(text)
    if not one_stream.broken:
        assert (content, calls) == assemble(once)
    if not calls:
        assert content == text  # nothing that is not a call is ever lost
    for call in calls:
        json.loads(call["function"]["arguments"])


# -- reasoning -----------------------------------------------------------------------------------


def _reference_split(text: str, opened: bool) -> tuple[str | None, str | None]:
    """What the reasoning split should be, written the obvious way over the whole text."""
    stripped = text.lstrip()
    if stripped.startswith("<think>"):
        body = stripped[len("<think>") :]
    elif opened:
        body = text
    else:
        return None, text or None
    thought, found, answer = body.partition("</think>")
    return thought or None, (answer if found else "") or None


reasoning_soup = st.lists(
    st.sampled_from(["<think>", "</think>", "<th", "</thi", " ", "\n", "a", "é"])
    | st.text(plain_alphabet, max_size=4),
    max_size=16,
).map("".join)


@pytest.mark.parametrize("opened", [False, True])
@SETTINGS
@given(data=st.data())
def test_reasoning_split_for_any_chunking(opened: bool, data: st.DataObject) -> None:
    text = data.draw(reasoning_soup)
    parser = ReasoningParser(opened=opened)
    want = _reference_split(text, opened)
    assert parser.extract(text) == want
    stream = parser.stream()
    parts = {"reasoning_content": "", "content": ""}
    for chunk in chunked(data.draw, text):
        for d in stream.feed(chunk):
            ((k, v),) = d.items()
            parts[k] += v
    for d in stream.finish():
        ((k, v),) = d.items()
        parts[k] += v
    assert (parts["reasoning_content"] or None, parts["content"] or None) == want


def test_arguments_that_break_after_streaming_began_read_the_same_split_or_not() -> None:
    """Found by the chunking property: arguments that begin (``[``) and then break. Split after
    the ``[``, the stream had already sent it; whole, the parser used to drop it."""
    text = '{"name": "f", "arguments": [TOOL_'
    once, _ = stream_all("llama3_json", [text])
    split, _ = stream_all("llama3_json", [text[:28], text[28:]])
    assert assemble(split) == assemble(once)
    assert assemble(once)[1][0]["function"]["arguments"] == "["
