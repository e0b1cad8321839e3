"""Fuzzing the replay of a broken constrained stream (``migration.next_leg`` and
``lmgw.grammar``): whatever constraint a client sent (random JSON schemas, regexes, GBNF
grammars, choice lists, malformed ones) and whatever partial text a worker streamed, the
gateway either builds a continuation whose grammar parses back, or says why it cannot; it never
raises. ``LMGW_FUZZ_EXAMPLES`` scales it (``make fuzz``)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from fuzz_support import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmgw.grammar import gbnf
from lmgw.pipeline import migration

SETTINGS = settings(
    max_examples=examples(150),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.text(max_size=8),
)  # fmt: skip
_keywords = st.sampled_from(
    ["type", "properties", "required", "items", "enum", "const", "anyOf", "oneOf", "allOf",
     "$ref", "$defs", "minimum", "maximum", "minLength", "maxLength", "pattern", "format",
     "additionalProperties", "prefixItems", "minItems", "maxItems", "not", "multipleOf", "title"]
)  # fmt: skip
_types = st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null"])


def _schema_values(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.dictionaries(_keywords, inner, max_size=4),
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=4), inner, max_size=3),
    )


schemas = st.one_of(
    st.fixed_dictionaries({"type": _types}),
    st.recursive(st.one_of(_scalars, _types), _schema_values, max_leaves=12),
)
regexes = st.one_of(
    st.text(alphabet="ab()[]{}|*+?.\\^$-0123,dws", max_size=16),
    st.sampled_from([r"\d{3}-\d{4}", r"(a|b)*c", r"[^x]{2,5}", r"(?:ab){0,1000}", r"((a*)*)*"]),
)
grammars = st.one_of(
    st.text(alphabet='root:=:" ab()[]|*+?{}^-\\\n#.x12', max_size=40),
    st.sampled_from(
        ['root ::= "a" root | "b"', 'root ::= x\nx ::= "(" x ")" | ""', 'root ::= [a-z]+ "!"']
    ),
)
constraints = st.one_of(
    schemas.map(lambda s: {"response_format": {"type": "json_schema",
                                               "json_schema": {"name": "x", "schema": s}}}),
    schemas.map(lambda s: {"guided_json": s}),
    regexes.map(lambda r: {"structured_outputs": {"regex": r}}),
    grammars.map(lambda g: {"guided_grammar": g}),
    st.lists(st.text(max_size=6), max_size=4).map(lambda c: {"guided_choice": c}),
    st.just({"response_format": {"type": "json_object"}}),
    st.dictionaries(st.sampled_from(["structured_outputs", "guided_regex", "response_format"]),
                    _scalars, max_size=2),
)  # fmt: skip
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(['{"a": 1, "b', "123-", "ab", '{"', "[", "aab", "(("]),
)


@SETTINGS
@given(constraints, texts, st.sampled_from(["chat", "completions"]), st.booleans())
def test_a_constrained_continuation_is_built_or_refused_never_raised(
    constraint: dict[str, Any], text: str, endpoint: str, aliases: bool
) -> None:
    obj: dict[str, Any] = {"model": "m", "max_tokens": 50, **constraint}
    obj.update({"messages": [{"role": "user", "content": "q"}]} if endpoint == "chat"
               else {"prompt": "q"})  # fmt: skip
    progress = migration.Progress(text=text, tokens=max(1, len(text)))
    body, reason = migration.next_leg(endpoint, obj, progress, aliases=aliases)
    assert (body is None) != (reason is None)
    if body is None:
        assert isinstance(reason, str) and reason
        return
    out = msgspec.json.decode(body)
    so = out.get("structured_outputs")
    grammar = (so.get("grammar") if isinstance(so, dict) else None) or out.get("guided_grammar")
    if grammar is not None and text:
        gbnf.parse(grammar)  # what the next worker gets compiles (as far as GBNF goes)
        assert json.dumps(out)  # and the body is plain JSON
