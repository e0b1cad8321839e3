"""The simulator's structured outputs (``lmgw.simulators.structured``), by property: whatever
regex of the supported constructs, its text ``re.fullmatch``-es it; whatever JSON schema of
the supported subset (``$defs`` + ``$ref`` included), its document validates with the
``jsonschema`` package; a choice is one of the choices; constructs the generator lacks are
refused (``Unsimulated``) instead of answered with text that breaks the constraint."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.protocol import StructuredOutput
from lmgw.simulators.structured import Unsimulated, constrained_text, regex_text, schema_value

WORDS = ["alpha", "beta", "gamma", "delta", "echo"]
FAST = settings(max_examples=150, deadline=None)

# -- regexes --------------------------------------------------------------------------------------

_LITERALS = st.sampled_from("abcxyzAZ019 -_.+*?()[]{}|^$\\/").map(re.escape)
# fmt: off
_CLASSES = st.sampled_from(
    [".", r"\d", r"\w", r"\s", r"\D", r"\W", r"\S", "[a-f]", "[^xyz]", "[0-9a-c_]", r"[^\d\s]",
     r"[.\-]", r"[\w.]", r"[^\W_]", "[A-Z]", "[^a]"]
)
# fmt: on
_REPEATS = st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "{2,}", "{0,1}", "*?", "+?", "??"])


def _extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.lists(inner, min_size=2, max_size=4).map("".join),
        st.lists(inner, min_size=2, max_size=3).map(lambda xs: "(?:" + "|".join(xs) + ")"),
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: "(" + "|".join(xs) + ")"),
        st.tuples(inner, _REPEATS).map(lambda t: f"(?:{t[0]}){t[1]}"),
    )


REGEXES = st.recursive(_LITERALS | _CLASSES, _extend, max_leaves=12).flatmap(
    lambda r: st.sampled_from([r, f"^{r}$", rf"\A{r}\Z", f"(?i){r}"])
)
# fmt: off
UNSUPPORTED = st.sampled_from(
    [r"(a)\1", r"(?P<n>a)(?P=n)", r"(?=a)a", r"(?!b)a", r"(?<=a)b", r"(?<!a)b",
     r"(a)?(?(1)b|c)", r"(?>ab)", r"a*+", r"(?:x|(?=y)y)"]
)
# fmt: on


@FAST
@given(REGEXES, st.integers(0, 2**32))
def test_regex_text_fullmatches(pattern: str, seed: int) -> None:
    text = regex_text(pattern, random.Random(seed))
    assert re.fullmatch(pattern, text), (pattern, text)
    assert regex_text(pattern, random.Random(seed)) == text  # deterministic per rng state


@FAST
@given(REGEXES, UNSUPPORTED, st.integers(0, 2**32))
def test_unsupported_regex_constructs_are_refused(prefix: str, bad: str, seed: int) -> None:
    with pytest.raises(Unsimulated):
        regex_text(prefix + bad, random.Random(seed))
    with pytest.raises(Unsimulated):
        pattern = f"{bad}(?:{prefix})"  # grouped: "\\1" + "0" would read as an octal escape
        constrained_text(StructuredOutput("regex", pattern), random.Random(seed), WORDS)


def test_invalid_and_unmatchable_regexes_are_refused() -> None:
    for pattern in ("a(", "[z-a]", "a$b"):
        with pytest.raises(Unsimulated):
            regex_text(pattern, random.Random(0))


# -- JSON schemas ---------------------------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-1000, 1000), st.text("abcxyz", max_size=4)
)


@st.composite
def _string(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "string"}
    if draw(st.booleans()):
        return {**out, "pattern": draw(REGEXES)}
    lo = draw(st.none() | st.integers(0, 12))
    hi = draw(st.none() | st.integers(lo or 0, 20))
    if lo is not None:
        out["minLength"] = lo
    if hi is not None:
        out["maxLength"] = hi
    return out


@st.composite
def _integer(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "integer"}
    a, b = sorted(draw(st.lists(st.integers(-500, 500), min_size=2, max_size=2)))
    if draw(st.booleans()):
        out["exclusiveMinimum" if draw(st.booleans()) else "minimum"] = a - 1
    if draw(st.booleans()):
        out["exclusiveMaximum" if draw(st.booleans()) else "maximum"] = b + 1
    return out


@st.composite
def _number(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "number"}
    a = draw(st.floats(-1e6, 1e6, allow_nan=False))
    b = a + draw(st.floats(0.001, 1e3))
    if draw(st.booleans()):
        out["exclusiveMinimum" if draw(st.booleans()) else "minimum"] = a
    if draw(st.booleans()):
        out["exclusiveMaximum" if draw(st.booleans()) else "maximum"] = b
    return out


_LEAVES = st.one_of(
    _string(),
    _integer(),
    _number(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.just({"type": ["string", "null"]}),
    st.lists(_SCALARS, min_size=1, max_size=4, unique_by=json.dumps).map(lambda e: {"enum": e}),
    _SCALARS.map(lambda c: {"const": c}),
)
_NAMES = st.text("abcdefgh_", min_size=1, max_size=5)


@st.composite
def _object(draw: st.DrawFn, inner: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    props = draw(st.dictionaries(_NAMES, inner, max_size=4))
    required = draw(st.lists(st.sampled_from(sorted(props)), unique=True)) if props else []
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    if draw(st.booleans()):
        out["additionalProperties"] = False
    return out


@st.composite
def _array(draw: st.DrawFn, inner: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "array", "items": draw(inner)}
    lo = draw(st.none() | st.integers(0, 2))
    hi = draw(st.none() | st.integers(lo or 0, 4))
    if lo is not None:
        out["minItems"] = lo
    if hi is not None:
        out["maxItems"] = hi
    return out


def _tree(leaves: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    def extend(inner: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
        any_of = st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"anyOf": xs})
        return _object(inner) | _array(inner) | any_of

    return st.recursive(leaves, extend, max_leaves=10)


@st.composite
def schemas(draw: st.DrawFn) -> dict[str, Any]:
    """A schema of the subset; with ``$defs`` (under either name) that parts of it ``$ref``."""
    defs = draw(st.dictionaries(_NAMES, _tree(_LEAVES), max_size=3))
    if not defs:
        return draw(_tree(_LEAVES))
    where = draw(st.sampled_from(["$defs", "definitions"]))
    refs = st.sampled_from(sorted(defs)).map(lambda n: {"$ref": f"#/{where}/{n}"})
    return {**draw(_tree(_LEAVES | refs)), where: defs}


@FAST
@given(schemas(), st.integers(0, 2**32))
def test_json_output_validates_against_the_schema(schema: dict[str, Any], seed: int) -> None:
    text = constrained_text(StructuredOutput("json", schema), random.Random(seed), WORDS)
    jsonschema.Draft202012Validator(schema).validate(json.loads(text))
    assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)


def test_refs_allof_prefix_items_and_patterns() -> None:
    """The keywords beyond the property test's subset: a recursive ``$ref``, ``allOf`` (merged),
    ``prefixItems`` with no further items, a pattern, a format, a nullable type list."""
    schema = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "pattern": "^n-[0-9]{2}$"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["id"],
            }
        },
        "allOf": [
            {"$ref": "#/$defs/node"},
            {
                "properties": {"size": {"type": "integer", "minimum": 3, "maximum": 4}},
                "required": ["size"],
            },
        ],
        "properties": {
            "pair": {
                "type": "array",
                "prefixItems": [{"const": 1}, {"type": "boolean"}],
                "items": False,
            },
            "when": {"type": ["string", "null"], "format": "date"},
        },
        "required": ["pair", "when"],
    }
    for seed in range(50):
        value = json.loads(
            constrained_text(StructuredOutput("json", schema), random.Random(seed), WORDS)
        )
        jsonschema.Draft202012Validator(schema).validate(value)
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", value["when"])


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "https://example.com/schema.json"},
        {"$ref": "#/$defs/missing"},
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        {
            "$defs": {"n": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/n"}}},
            "$ref": "#/$defs/n",
        },
        {"type": "string", "pattern": "(a)\\1"},
    ],
)
def test_schemas_the_simulator_cannot_satisfy_are_refused(schema: dict[str, Any]) -> None:
    with pytest.raises(Unsimulated):
        schema_value(schema, random.Random(0), WORDS)


# -- the other kinds ------------------------------------------------------------------------------


@FAST
@given(st.lists(st.text(max_size=8), min_size=1, max_size=6), st.integers(0, 2**32))
def test_choice_is_one_of_the_choices(choices: list[str], seed: int) -> None:
    text = constrained_text(StructuredOutput("choice", choices), random.Random(seed), WORDS)
    assert text in choices


@FAST
@given(st.integers(0, 2**32))
def test_json_object_is_a_small_object(seed: int) -> None:
    value = json.loads(
        constrained_text(StructuredOutput("json_object"), random.Random(seed), WORDS)
    )
    assert isinstance(value, dict) and 1 <= len(value) <= 2
    assert all(k in WORDS and isinstance(v, str) for k, v in value.items())


@pytest.mark.parametrize(
    ("kind", "spec", "says"),
    [
        ("grammar", 'root ::= "a" root', "no finite string"),  # nothing to finish with
        ("grammar", "root ::= 'a'", "cannot parse"),  # GBNF strings are double-quoted
        ("structural_tag", '{"type":"x"}', "does not simulate structural_tag"),
    ],
)
def test_unfinishable_grammars_and_structural_tags_are_refused(
    kind: str, spec: str, says: str
) -> None:
    with pytest.raises(Unsimulated, match=says):
        constrained_text(StructuredOutput(kind, spec), random.Random(0), WORDS)
