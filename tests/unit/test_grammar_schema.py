"""lmgw.grammar.schema: a JSON schema as the grammar xgrammar (vLLM's default structured-output
backend) builds from it. Values generated from each schema in the form xgrammar emits
(properties in schema order, optional ones dropped at random, compact or with whitespace
between tokens) are accepted and valid (jsonschema); mutations (a required key dropped, a wrong
type, an extra key, a truncation) are rejected; every split of an accepted text continues
through the derivative and through the GBNF it prints; what is not modelled is refused with its
keyword and JSON pointer. Where xgrammar is installed, random walks compare the two
character by character."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from datetime import UTC, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmgw.grammar import gbnf
from lmgw.grammar.expr import FAIL, Unsupported
from lmgw.grammar.schema import json_object_grammar, schema_grammar

PERSON = {
    "$defs": {
        "Address": {
            "type": "object",
            "title": "Address",
            "properties": {
                "street": {"type": "string", "title": "Street"},
                "city": {"type": "string", "minLength": 1, "maxLength": 12},
                "zip": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
            },
            "required": ["street", "city"],
        },
        "Role": {"enum": ["admin", "user", "guest"], "title": "Role", "type": "string"},
    },
    "type": "object",
    "title": "Person",
    "properties": {
        "name": {"type": "string", "description": "full name"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {"$ref": "#/$defs/Address"},
        "role": {"$ref": "#/$defs/Role", "description": "what they may do"},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "address"],
}
TREE = {
    "$defs": {
        "Node": {
            "type": "object",
            "properties": {
                "value": {"type": "integer"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
            },
            "required": ["value"],
        }
    },
    "$ref": "#/$defs/Node",
}
LINKED = {  # recursion through "#"
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
    },
    "required": ["name"],
}
SHAPES = {  # a discriminated union
    "type": "object",
    "properties": {
        "shapes": {
            "type": "array",
            "items": {
                "oneOf": [
                    {
                        "type": "object",
                        "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
                        "required": ["kind", "r"],
                    },
                    {
                        "type": "object",
                        "properties": {
                            "kind": {"const": "rect", "type": "string"},
                            "w": {"type": "integer", "exclusiveMinimum": 0},
                            "h": {"type": "integer", "exclusiveMinimum": 0},
                        },
                        "required": ["kind", "w"],
                    },
                ],
                "discriminator": {"propertyName": "kind"},
            },
        }
    },
    "required": ["shapes"],
}
PYDANTIC_V1 = {  # draft-7 style: definitions, a description beside $ref wrapped in allOf
    "title": "Order",
    "type": "object",
    "properties": {
        "id": {"title": "Id", "type": "integer", "minimum": 1},
        "items": {"type": "array", "items": {"$ref": "#/definitions/Item"}, "minItems": 1},
        "status": {"allOf": [{"$ref": "#/definitions/Status"}], "description": "status"},
        "note": {"title": "Note", "type": ["string", "null"]},
    },
    "required": ["id", "items", "status"],
    "definitions": {
        "Item": {
            "title": "Item",
            "type": "object",
            "properties": {
                "sku": {"type": "string", "format": "uuid"},
                "qty": {"type": "integer", "minimum": 1, "maximum": 99},
            },
            "required": ["sku", "qty"],
        },
        "Status": {"title": "Status", "enum": ["new", "paid", "shipped"], "type": "string"},
    },
}
MISC = {
    "type": "object",
    "properties": {
        "pair": {
            "type": "array",
            "prefixItems": [{"type": "integer"}, {"type": "string", "format": "date"}],
            "minItems": 1,
        },
        "head": {
            "type": "array",
            "prefixItems": [{"type": "boolean"}],
            "items": {"type": "null"},
            "maxItems": 3,
        },
        "neg": {"type": ["integer", "null"], "maximum": -10},
        "range": {"type": "integer", "exclusiveMinimum": -100, "maximum": 1234},
        "step": {"type": "integer", "multipleOf": 7},
        "when": {"type": "string", "format": "date-time"},
        "const": {"const": {"x": [1, 2.5, "a/b"], "y": None}},
        "pick": {"enum": [1, "two", True, None, [3]]},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "blob": {"type": "object"},
        "list": {"type": "array"},
        "anything": {},
        "short": {"type": "string", "minLength": 2, "maxLength": 4},
    },
    "required": ["pair"],
    "additionalProperties": {"type": "string", "maxLength": 3},
}
CASES = {
    "person": PERSON,
    "tree": TREE,
    "linked": LINKED,
    "shapes": SHAPES,
    "pydantic_v1": PYDANTIC_V1,
    "misc": MISC,
}
GRAMMARS = {name: schema_grammar(s) for name, s in CASES.items()}

# ------------------------------------------------------------------------------------------------
# values from a schema, in xgrammar's form: ("obj", [(key, doc)], required, closed),
# ("arr", [doc]), ("lit", value, kinds) printed compactly, ("any", value) printed like the grammar
# ------------------------------------------------------------------------------------------------

MAX_DEPTH = 3
_PLAIN = st.characters(blacklist_characters='"\\', blacklist_categories=("Cs", "Cc"))
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)


def _resolve(root: dict, ref: str) -> Any:
    node: Any = root
    for part in ref[2:].split("/") if ref != "#" else []:
        node = node[part]
    return node


def _kinds(s: Any) -> frozenset[str] | None:
    """The JSON kinds a position admits, where plain (None: unknown, not mutated)."""
    if not isinstance(s, dict):
        return None
    if "anyOf" in s:
        parts = [_kinds(o) for o in s["anyOf"]]
        return None if None in parts else frozenset().union(*parts)  # type: ignore[arg-type]
    t = s.get("type")
    if set(s) - {"type", "title", "description", "minimum", "maximum", "minLength", "maxLength"}:
        return None
    types = {t} if isinstance(t, str) else set(t or ())
    if not types or types & {"object", "array"}:
        return None
    return frozenset(types | ({"integer"} if "number" in types else set()))


_ZONES = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
)


def docs(s: Any, root: dict, depth: int = 0) -> st.SearchStrategy:
    if s is True or s == {}:
        return _JSON.map(lambda v: ("any", v))
    if s in ({"type": "object"}, {"type": "array"}):  # xgrammar: any object, any array
        return _JSON.filter(lambda v: isinstance(v, dict if s["type"] == "object" else list)).map(
            lambda v: ("any", v)
        )
    if "$ref" in s:
        return docs(_resolve(root, s["$ref"]), root, depth + 1)
    if "const" in s:
        return st.just(("lit", s["const"], None))
    if "enum" in s:
        return st.sampled_from(s["enum"]).map(lambda v: ("lit", v, None))
    for kw in ("anyOf", "oneOf"):
        if kw in s:
            options = s[kw]
            if depth >= MAX_DEPTH:
                options = [o for o in options if "$ref" not in o] or options
            return st.one_of([_with_kinds(docs(o, root, depth), s) for o in options])
    if "allOf" in s:
        return docs(s["allOf"][0], root, depth)
    t = s.get("type", "object" if "properties" in s else None)
    if isinstance(t, list):
        return _with_kinds(st.one_of([docs({**s, "type": x}, root, depth) for x in t]), s)
    if t == "object":
        return _object(s, root, depth)
    if t == "array":
        return _array(s, root, depth)
    return _with_kinds(_scalar(s, t), s)


def _with_kinds(strategy: st.SearchStrategy, s: Any) -> st.SearchStrategy:
    kinds = _kinds(s)
    return strategy.map(lambda d: ("lit", d[1], kinds) if d[0] == "lit" else d)


def _scalar(s: dict, t: str) -> st.SearchStrategy:
    if t == "integer":
        if "multipleOf" in s:
            return st.integers(-(10**9), 10**9).map(lambda v: ("lit", v * s["multipleOf"], None))
        lo = s.get("minimum", s.get("exclusiveMinimum", -(2**63) - 1) + 1)
        hi = s.get("maximum", s.get("exclusiveMaximum", 2**63) - 1)
        value = st.integers(lo, hi)
    elif t == "number":
        value = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53)
    elif t == "string":
        fmt = s.get("format")
        if fmt == "date":
            value = st.dates().map(lambda d: d.isoformat())
        elif fmt == "date-time":
            value = st.datetimes(timezones=_ZONES).map(lambda d: d.isoformat())
        elif fmt == "uuid":
            value = st.uuids().map(str)
        elif "minLength" in s or "maxLength" in s:  # xgrammar: no escapes in these
            value = st.text(_PLAIN, min_size=s.get("minLength", 0), max_size=s.get("maxLength"))
        else:
            value = st.text()
    elif t == "boolean":
        value = st.booleans()
    else:
        value = st.none()
    return value.map(lambda v: ("lit", v, None))


def _object(s: dict, root: dict, depth: int) -> st.SearchStrategy:
    props = s.get("properties", {})
    required = frozenset(s.get("required", ()))
    fields = []
    for name, sub in props.items():
        if name in required:
            fields.append(docs(sub, root, depth + 1).map(lambda d, n=name: (n, d)))
        elif depth < MAX_DEPTH:
            fields.append(st.none() | docs(sub, root, depth + 1).map(lambda d, n=name: (n, d)))
    add = s.get("additionalProperties", False)
    extra = st.just({})
    if add is not False and depth < MAX_DEPTH:
        keys = st.text(max_size=4).filter(lambda k: k not in props)
        extra = st.dictionaries(keys, docs(add, root, depth + 1), max_size=2)
    return st.tuples(st.tuples(*fields), extra).map(
        lambda fe: (
            "obj",
            [f for f in fe[0] if f is not None] + list(fe[1].items()),
            required,
            add is False,
        )
    )


def _array(s: dict, root: dict, depth: int) -> st.SearchStrategy:
    prefix = [docs(p, root, depth + 1) for p in s.get("prefixItems", [])]
    lo, hi = s.get("minItems", 0), s.get("maxItems")
    items = s.get("items", False)
    if prefix:
        n = len(prefix)
        head = st.integers(min(lo, n), n).flatmap(lambda k: st.tuples(*prefix[:k]).map(list))
        if items is False:
            return head.map(lambda h: ("arr", h))
        more = st.lists(docs(items, root, depth + 1), max_size=2 if hi is None else hi - n)
        return st.tuples(head, more).map(
            lambda hm: ("arr", hm[0] + (hm[1] if len(hm[0]) == n else []))
        )
    if items is False or (depth >= MAX_DEPTH and lo == 0):
        return st.just(("arr", []))
    size = min(3, hi) if hi is not None else 3
    return st.lists(docs(items, root, depth + 1), min_size=lo, max_size=max(lo, size)).map(
        lambda xs: ("arr", xs)
    )


def value(d: Any) -> Any:
    if d[0] == "obj":
        return {k: value(v) for k, v in d[1]}
    if d[0] == "arr":
        return [value(v) for v in d[1]]
    return d[1]


def _enc(v: Any) -> str:
    return msgspec.json.encode(v).decode()


def render(d: Any, ws: Any = lambda: "", comma: str = ",", colon: str = ":") -> str:
    """``d`` printed with ``ws()`` between tokens and the given separators."""
    if d[0] == "any" and isinstance(d[1], dict):
        d = ("obj", [(k, ("any", v)) for k, v in d[1].items()], frozenset(), False)
    elif d[0] == "any" and isinstance(d[1], list):
        d = ("arr", [("any", v) for v in d[1]])
    if d[0] in ("lit", "any"):
        return _enc(d[1])
    if d[0] == "obj":
        parts = [_enc(k) + ws() + colon + ws() + render(v, ws, comma, colon) for k, v in d[1]]
        open_, close = "{", "}"
    else:
        parts = [render(v, ws, comma, colon) for v in d[1]]
        open_, close = "[", "]"
    if not parts:
        return open_ + ws() + close
    body = parts[0]
    for p in parts[1:]:
        body += ws() + comma + ws() + p
    return open_ + ws() + body + ws() + close


def _spaces(rnd: random.Random) -> Any:
    return lambda: "".join(rnd.choice(" \n\r\t") for _ in range(rnd.choice((0, 0, 1, 2))))


def _sites(d: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    out = [(path, d)]
    if d[0] == "obj":
        for i, (_, v) in enumerate(d[1]):
            out += _sites(v, (*path, i))
    elif d[0] == "arr":
        for i, v in enumerate(d[1]):
            out += _sites(v, (*path, i))
    return out


def _replace(d: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    i, rest = path[0], path[1:]
    if d[0] == "obj":
        items = list(d[1])
        items[i] = (items[i][0], _replace(items[i][1], rest, new))
        return ("obj", items, d[2], d[3])
    items = list(d[1])
    items[i] = _replace(items[i], rest, new)
    return ("arr", items)


_WRONG = {"string": "zz", "integer": 7, "boolean": True, "null": None, "array": [], "object": {}}


def _mutations(d: Any) -> list[tuple[str, Any]]:
    out = []
    for path, node in _sites(d):
        if node[0] == "obj":
            for i, (k, _) in enumerate(node[1]):
                if k in node[2]:
                    dropped = ("obj", node[1][:i] + node[1][i + 1 :], node[2], node[3])
                    out.append(("drop", _replace(d, path, dropped)))
            if node[3]:
                extra = ("obj", [*node[1], ("zz_extra", ("lit", 1, None))], node[2], node[3])
                out.append(("extra", _replace(d, path, extra)))
        elif node[0] == "lit" and node[2]:
            for kind, wrong in _WRONG.items():
                if kind not in node[2]:
                    out.append(("type", _replace(d, path, ("lit", wrong, None))))
                    break
    return out


# ------------------------------------------------------------------------------------------------
# generated values
# ------------------------------------------------------------------------------------------------

_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", sorted(CASES))
@_SETTINGS
@given(data=st.data())
def test_values_in_xgrammars_form_are_accepted_and_valid(name: str, data: Any) -> None:
    schema, g = CASES[name], GRAMMARS[name]
    d = data.draw(docs(schema, schema))
    rnd = data.draw(st.randoms(use_true_random=False))
    jsonschema.validate(value(d), schema)
    compact = render(d)
    assert compact == _enc(value(d))  # msgspec's compact encoding
    assert g.accepts(compact), compact
    spaced = render(d, _spaces(rnd))
    assert g.accepts(spaced), spaced


@pytest.mark.parametrize("name", sorted(CASES))
@_SETTINGS
@given(data=st.data())
def test_mutations_are_rejected(name: str, data: Any) -> None:
    schema, g = CASES[name], GRAMMARS[name]
    d = data.draw(docs(schema, schema))
    text = render(d)
    assert not g.accepts(text[:-1])
    assert not g.accepts(text + "}")
    mutations = _mutations(d)
    for kind, m in data.draw(st.lists(st.sampled_from(mutations), max_size=4)) if mutations else []:
        bad = render(m)
        assert not g.accepts(bad), (kind, bad)
        if kind != "extra":  # strict mode is stricter than the schema about extra keys
            assert not jsonschema.Draft202012Validator(schema).is_valid(value(m)), (kind, bad)


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_split_continues_through_the_derivative_and_its_gbnf(name: str, data: Any) -> None:
    schema, g = CASES[name], GRAMMARS[name]
    text = render(data.draw(docs(schema, schema)), _spaces(data.draw(st.randoms())))
    root = g.root()
    for k in range(len(text) + 1):
        assert g.accepts(text[k:], g.derive_text(root, text[:k]))
    for k in data.draw(st.lists(st.integers(0, len(text)), min_size=1, max_size=2)):
        rest = g.derive_text(root, text[:k])
        assert rest != FAIL
        again = gbnf.parse(gbnf.render(g, rest))
        assert again.accepts(text[k:]), (text[:k], text[k:])
        assert not again.accepts(text[k:] + "x")


def test_any_whitespace_false_takes_the_default_separators() -> None:
    g = schema_grammar(PERSON, any_whitespace=False)
    d = (
        "obj",
        [
            ("name", ("lit", "Ann", None)),
            ("age", ("lit", 41, None)),
            ("tags", ("arr", [("lit", "a", None), ("lit", "b", None)])),
            ("address", ("obj", [("street", ("lit", "x", None)), ("city", ("lit", "y", None))])),
        ],
    )
    text = render(d, comma=", ", colon=": ")
    assert text.startswith('{"name": "Ann", "age": 41, "tags": ["a", "b"]')
    assert g.accepts(text)
    assert not g.accepts(render(d))  # compact
    assert not g.accepts(text.replace(": ", ":  ", 1))
    assert not g.accepts(text.replace("{", "{ ", 1))
    assert schema_grammar({"type": "object", "properties": {}}, any_whitespace=False).accepts("{}")
    assert not schema_grammar({"type": "object", "properties": {}}, any_whitespace=False).accepts(
        "{ }"
    )


def test_compact_separators_leave_the_builtin_any_rules_with_comma_space() -> None:
    """xgrammar 0.2.8's quirk (vLLM passes (",", ":") with any_whitespace off)."""
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {}}, "b": {}}}
    g = schema_grammar(schema, any_whitespace=False, separators=(",", ":"))
    assert g.accepts('{"a":[1,2],"b":{"x":1, "y":[1, 2]}}')
    assert not g.accepts('{"a":[1,2],"b":{"x":1,"y":[1,2]}}')
    assert not g.accepts('{"a":[1, 2]}')


def test_properties_keep_schema_order_and_strict_mode_closes_objects() -> None:
    g = GRAMMARS["person"]
    ok = '{"name":"a","age":1,"address":{"street":"s","city":"c"}}'
    assert g.accepts(ok)
    assert not g.accepts('{"age":1,"name":"a","address":{"street":"s","city":"c"}}')
    assert not g.accepts(ok[:-1] + ',"x":1}')
    assert not g.accepts(" " + ok) and not g.accepts(ok + " ")  # no whitespace around the root
    loose = schema_grammar(PERSON, additional_properties=True)  # xgrammar's strict_mode=False
    assert loose.accepts(ok[:-1] + ',"x":[1]}')
    assert loose.accepts('{"name":"a","age":1,"address":{"street":"s","city":"c","k":2}}')


def test_additional_keys_differ_from_the_literal_names() -> None:
    schema = {
        "type": "object",
        "properties": {"ab": {"type": "integer"}, "b": {"type": "string"}},
        "additionalProperties": {"type": "boolean"},
    }
    g = schema_grammar(schema)
    assert g.accepts('{"ab":1,"a":true,"abc":false}')
    assert g.accepts('{"c":false}') and g.accepts("{}")
    assert not g.accepts('{"ab":1,"ab":true}')
    assert not g.accepts('{"c":false,"ab":1}')  # named ones come first
    assert g.accepts('{"ab":1,"\\u0061b":true}')  # xgrammar checks the literal spelling only


def test_bare_object_and_array_types_are_any_except_behind_ref_or_allof() -> None:
    """xgrammar's rule cache: {"type": "object"} is its builtin any-object rule, but a $ref
    target or a one-member allOf is generated afresh, strictly (no properties: only {})."""
    defs = {"A": {"type": "object", "title": "A"}}
    g = schema_grammar({"$defs": defs, "$ref": "#/$defs/A"})
    assert g.accepts("{ }") and not g.accepts('{"a":1}')
    assert not schema_grammar({"allOf": [{"type": "array"}]}).accepts("[1]")
    assert schema_grammar({"type": ["array", "null"]}).accepts("[1,{}]")
    first_ref = {
        "type": "object",
        "properties": {"x": {"$ref": "#/$defs/A"}, "y": {"type": "object"}},
        "required": ["x", "y"],
        "$defs": defs,
    }
    assert not schema_grammar(first_ref).accepts('{"x":{},"y":{"a":1}}')  # y now hits A's rule
    first_plain = {**first_ref, "properties": {"y": {"type": "object"}, "x": {"$ref": "#/$defs/A"}}}
    assert schema_grammar(first_plain).accepts('{"y":{"a":1},"x":{}}')


@settings(max_examples=60, deadline=None)
@given(
    lo=st.none() | st.integers(-(10**4), 10**4),
    width=st.none() | st.integers(0, 3000),
    exclusive=st.booleans(),
)
def test_integer_bounds_are_exact(lo: int | None, width: int | None, exclusive: bool) -> None:
    hi = None if width is None else (width if lo is None else lo + width)
    schema: dict[str, Any] = {"type": "integer"}
    if lo is not None:
        schema["exclusiveMinimum" if exclusive else "minimum"] = lo - 1 if exclusive else lo
    if hi is not None:
        schema["maximum"] = hi
    g = schema_grammar(schema)
    centre = lo if lo is not None else (hi if hi is not None else 0)
    for v in [*range(centre - 40, centre + 40), *(x for x in (lo, hi) if x is not None)]:
        for x in (v - 1, v, v + 1, -v, 10 * v, v // 10):
            inside = (lo is None or x >= lo) and (hi is None or x <= hi)
            assert g.accepts(str(x)) == inside, (schema, x)
    for bad in ("-0", "00", "01", "+1", "1.0", "1e2", ""):
        assert not g.accepts(bad)


def test_integer_multiple_of() -> None:
    g = schema_grammar({"type": "integer", "multipleOf": 7})
    assert all(g.accepts(str(v)) == (v % 7 == 0) for v in range(-300, 300))
    assert not g.accepts("-0") and not g.accepts("07")
    g = schema_grammar({"type": "integer", "multipleOf": 5, "minimum": -12, "maximum": 33})
    assert [v for v in range(-40, 40) if g.accepts(str(v))] == [-10, -5, 0, 5, 10, 15, 20, 25, 30]


def test_enum_and_const_are_picojsons_text() -> None:
    g = schema_grammar({"enum": [0.1, 1.0, 1e100, -0.0, 2**70, "a/b\x7f\té", {"k": [None]}]})
    for text in ("0.10000000000000001", "1", "1e+100", "-0", "1.1805916207174113e+21",
                 '"a/b\\u007f\\té"', '{"k":[null]}'):  # fmt: skip
        assert g.accepts(text), text
    for text in ("0.1", "1.0", '"a\\/b\\u007f\\té"', '{"k": [null]}'):
        assert not g.accepts(text), text


def test_strings_with_lengths_take_no_escapes() -> None:
    g = schema_grammar({"type": "string", "minLength": 1, "maxLength": 2})
    assert g.accepts('"é😀"') and g.accepts('"\t"')  # raw control characters pass, as in xgrammar
    assert not g.accepts('""') and not g.accepts('"abc"') and not g.accepts('"\\n"')
    plain = schema_grammar({"type": "string"})
    assert plain.accepts('"\\n\\u00e9\\/"') and not plain.accepts('"\t"')


def test_formats() -> None:
    cases = {
        "date": (["2024-02-29", "0001-12-31"], ["2024-2-29", "2024-13-01", "2024-00-10"]),
        "time": (["23:59:60Z", "00:00:00.5+05:30"], ["24:00:00Z", "12:00:00"]),
        "date-time": (["2024-01-01T12:00:00-01:00"], ["2024-01-01 12:00:00Z"]),
        "uuid": (["123e4567-E89b-12d3-a456-426614174000"], ["123e4567e89b12d3a456426614174000"]),
        "ipv4": (["192.168.0.1", "0.0.0.0"], ["256.1.1.1", "1.2.3"]),
        "hostname": (["a.b-c.d9"], ["-a.b", "A.b", "a..b"]),
        "duration": (["P1Y2M3DT4H5M6S", "PT5M", "P3W"], ["P", "P1H", "PT"]),
        "not-a-format-xgrammar-knows": (["anything \\n"], []),
    }
    for fmt, (good, bad) in cases.items():
        g = schema_grammar({"type": "string", "format": fmt})
        assert all(g.accepts(f'"{t}"') for t in good), fmt
        assert not any(g.accepts(f'"{t}"') for t in bad), fmt


def test_pattern_is_a_full_match_without_json_escapes() -> None:
    pytest.importorskip("lmgw.grammar.regex")
    g = schema_grammar({"type": "string", "pattern": "^a.c$"})
    assert g.accepts('"abc"') and g.accepts('"aéc"')
    assert not g.accepts('"a\\"c"') and not g.accepts('"a\\\\c"') and not g.accepts('"xabc"')
    g = schema_grammar({"type": "string", "pattern": "[0-9]{3}-[a-z]+"})
    assert g.accepts('"123-ab"') and not g.accepts('"123-ab!"')


def test_json_object() -> None:
    g = json_object_grammar()
    assert g.accepts('{ "a" : [1, {"b": null}, "x"] }') and g.accepts("{}")
    assert not g.accepts("[]") and not g.accepts('"a"')
    assert json_object_grammar(any_whitespace=False).accepts('{"a": [1, 2]}')


def test_fifty_properties_build_quickly() -> None:
    kinds = [
        {"type": "string"},
        {"type": "integer", "minimum": 0},
        {"type": "array", "items": {"type": "number"}},
        {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
        {"enum": ["a", "b", "c"]},
    ]
    schema = {
        "type": "object",
        "properties": {f"p{i}": kinds[i % len(kinds)] for i in range(50)},
        "required": [f"p{i}" for i in range(0, 50, 3)],
    }
    best = min(_timed(lambda: schema_grammar(schema)) for _ in range(5))
    assert best < 0.02, best  # ~2 ms here; the bound leaves room for a slow runner


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------------
# refused
# ------------------------------------------------------------------------------------------------

REFUSED = [
    ({"not": {"type": "string"}}, "not", "#"),
    ({"type": "object", "properties": {"a": {"if": {}, "then": {}}}}, "if", "#/properties/a"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf", "#"),
    ({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}, "oneOf", "#"),
    ({"$ref": "#/$defs/A", "type": "object", "$defs": {"A": {}}}, "type", "#"),
    ({"anyOf": [{"type": "string"}], "minLength": 2}, "minLength", "#"),
    ({"type": "array", "items": {"type": "number", "minimum": 0}}, "minimum", "#/items"),
    ({"type": "object", "patternProperties": {"^a": {}}}, "patternProperties", "#"),
    ({"type": "object", "maxProperties": 2}, "maxProperties", "#"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required", "#"),
    ({"type": "array", "items": {}, "uniqueItems": True}, "uniqueItems", "#"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains", "#"),
    ({"type": "string", "format": "email"}, "format", "#"),
    ({"type": "string", "format": "date", "maxLength": 10}, "maxLength", "#"),
    ({"type": "string", "pattern": "^a+$", "minLength": 1}, "minLength", "#"),
    ({"type": "string", "pattern": "^é+$"}, "pattern", "#"),
    ({"$ref": "https://example.com/s.json"}, "$ref", "#"),
    ({"$ref": "#/$defs/a~1b", "$defs": {"a/b": {}}}, "$ref", "#"),
    ({"$ref": "#/$defs/missing"}, "$ref", "#"),
    ({"required": ["a"]}, "required", "#"),
    (False, "false", "#"),
    ({"type": "object", "properties": {"a~b/c": False}}, "false", "#/properties/a~0b~1c"),
    ({"type": "array", "minItems": 1}, "minItems", "#"),  # strict: no items allowed
    ({"anyOf": [{"$ref": "#"}, {"type": "null"}]}, "$ref", "#"),  # left-recursive
    ({"type": "integer", "multipleOf": 3, "minimum": 0}, "multipleOf", "#"),
    ({"type": "integer", "multipleOf": 2.5}, "multipleOf", "#"),
    ({"type": "integer", "minimum": 1.5}, "minimum", "#"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "minimum", "#"),
    ({"const": 1, "type": "string"}, "type", "#"),
    ({"enum": ["a", "bb"], "maxLength": 1}, "maxLength", "#"),
    (
        {"type": "object", "properties": {"é": {}}, "additionalProperties": True},
        "additionalProperties",
        "#",
    ),
    (
        {
            "type": "object",
            "properties": {
                "a": {"type": "object", "properties": {"title": {"type": "string"}}},
                "b": {"type": "object", "properties": {"title": {"type": "integer"}}},
            },
        },
        "properties",
        "#/properties/b",
    ),
    (
        {"type": "object", "properties": {"a": {"$id": "x", "type": "string"}}},
        "$id",
        "#/properties/a",
    ),
    ({"type": "frob"}, "type", "#"),
]


@pytest.mark.parametrize(("schema", "keyword", "path"), REFUSED)
def test_refused_with_keyword_and_pointer(schema: Any, keyword: str, path: str) -> None:
    with pytest.raises(Unsupported) as e:
        schema_grammar(schema)
    assert f"{keyword!r} at {path}:" in str(e.value)


def test_annotations_and_inert_keywords_are_fine() -> None:
    for schema in (
        {"type": "object", "properties": {"title": {"type": "string"}}, "$comment": "x"},
        {"enum": ["a", "bb"], "minimum": 1, "type": "string", "examples": ["a"]},
        {"const": 1, "type": ["integer", "null"]},
        {"type": "string", "format": "binary", "x-extension": True},
        {"format": "date"},
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": False},
        {"type": "object", "minProperties": 0},
        {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:x", "type": "null"},
    ):
        schema_grammar(schema)


# ------------------------------------------------------------------------------------------------
# against xgrammar itself (skipped where it is not installed)
# ------------------------------------------------------------------------------------------------

_ALPHABET = [chr(c) for c in range(0x20, 0x7F)] + ["\n", "\t", "\r", "\x01", "\x7f", "é", "😀"]
WALKS = 10  # random walks per schema and whitespace setting (xgrammar_crosscheck.py)


def test_matches_xgrammar_character_by_character() -> None:
    """Random walks through each schema's grammar (both whitespace settings), comparing at
    every step which characters lmgw's grammar and xgrammar's matcher accept, and whether each
    says the text is complete. xgrammar runs in a subprocess (``xgrammar_crosscheck.py``) with a
    stand-in for the torch it imports but the compiler never uses; ``make test`` installs it
    (without dependencies). Skipped where it is not installed."""
    here = Path(__file__).resolve().parent
    path = [str(here.parent / "xgrammar_stub"), str(here), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    out = subprocess.run(
        [sys.executable, str(here / "xgrammar_crosscheck.py")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if out.returncode == 77:
        pytest.skip(f"xgrammar is not importable: {out.stdout.strip()}")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["failures"] == [], report["failures"][:5]
    assert report["walks"] == len(CASES) * 2 * WALKS
