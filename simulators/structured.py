"""Structured outputs for the mock model (sans-IO): text that satisfies a request's
:class:`~lmgw.protocol.StructuredOutput`, as a real vLLM worker's constrained decoding would
produce it.

Why: a client that asks for JSON (``response_format``, ``structured_outputs``, the ``guided_*``
fields) parses the answer; free mock text would make every such test fail at the client, and a
gateway bug that drops the constraint would go unnoticed. So the simulator draws a value from
the constraint itself (a JSON document valid against the schema, a string the regex matches,
one of the choices, a string of a GBNF grammar: :mod:`.grammar_text`), deterministically from
the completion key, and refuses (:class:`Unsimulated`) what it cannot produce rather than
answering text that breaks the constraint.

Whitespace options (``disable_any_whitespace``, ``whitespace_pattern``) are ignored: the JSON
is compact, which every whitespace setting accepts.
"""

from __future__ import annotations

import math
import random
import re
import re._constants as _sre_c  # the parse tree's opcodes (sre_constants)
import re._parser as _sre  # Python's own regex parser (sre_parse), so the syntax is Python's
import string
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

import msgspec

from lmgw.protocol import StructuredOutput

__all__ = ["Unsimulated", "constrained_text", "regex_text", "schema_value"]

MAX_SCHEMA_DEPTH = 4
"""Below this nesting depth, optional properties and array items are left out (bounded output)."""
_HARD_DEPTH = MAX_SCHEMA_DEPTH + 12
"""A schema that still requires nested values this deep recurses forever (a required
self-reference): refused."""
_MAX_REFS = 64
"""``$ref`` hops resolved for one value before the chain counts as a cycle."""
_REGEX_TRIES = 16
"""Draws before a regex whose constructs interact (anchors mid-pattern, case folding) is
refused: each draw is checked with ``re.fullmatch``, so a bad one never leaves."""


class Unsimulated(ValueError):
    """A constraint the simulator cannot produce output for (a structural tag, a regex
    backreference): the HTTP layer answers 400, the native engine ``bad_request``, instead of
    unconstrained text a client would fail to parse."""


def constrained_text(c: StructuredOutput, rng: random.Random, words: Sequence[str]) -> str:
    """Text that satisfies ``c``, a pure function of ``c`` and ``rng``'s state (``words``: the
    model's output words, for strings and keys).

    Raises:
        Unsimulated: a structural tag, a GBNF grammar that does not parse or has no finite
            string, or a schema/regex construct not simulated.
    """
    kind = c.kind
    if kind == "json":
        return msgspec.json.encode(schema_value(c.spec, rng, words)).decode()
    if kind == "json_object":
        keys = sorted({_pick(rng, words) for _ in range(rng.randint(1, 2))})
        return msgspec.json.encode({k: _words(rng, words) for k in keys}).decode()
    if kind == "choice":
        return c.spec[rng.randrange(len(c.spec))]
    if kind == "regex":
        return regex_text(c.spec, rng)
    if kind == "grammar":
        from .grammar_text import grammar_text  # imports this module (Unsimulated)

        return grammar_text(c.spec, rng, words)
    raise Unsimulated(f"the simulator does not simulate {kind}-constrained output")


# ------------------------------------------------------------------------------------------------
# JSON schemas
# ------------------------------------------------------------------------------------------------


def schema_value(
    schema: Any,
    rng: random.Random,
    words: Sequence[str],
    depth: int = 0,
    root: Any = None,
) -> Any:
    """A value valid against a JSON schema, drawn from ``rng``: type (lists too: the first
    non-null), enum, const, properties + required, items, prefixItems, min/max bounds and
    lengths, multipleOf (integers), pattern, a few formats, anyOf/oneOf (the first
    alternative, merged with the keywords beside it), allOf (merged), local ``$ref``
    (``#/$defs/...``, ``#/definitions/...``, against ``root``: by default ``schema`` itself).
    Optional object properties are included about half the time; additionalProperties is
    ignored (no extra keys are drawn).

    Raises:
        Unsimulated: a non-local or dangling ``$ref``, a schema that nests without end, or a
            pattern the regex generator refuses.
    """
    if root is None:
        root = schema
    if depth > _HARD_DEPTH:
        raise Unsimulated("the JSON schema requires values nested deeper than the simulator draws")
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[rng.randrange(len(enum))]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:  # the first, with the keywords beside it
            rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
            return schema_value(_merge(rest, _resolve(options[0], root)), rng, words, depth, root)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "null":
        return None
    if kind == "boolean":
        return rng.random() < 0.5
    if kind in ("integer", "number"):
        return _number(schema, kind, rng)
    if kind == "array":
        return _array(schema, rng, words, depth, root)
    if kind == "object":
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        required = schema.get("required")
        required = set(required) if isinstance(required, list) else set()
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if name in required or (depth < MAX_SCHEMA_DEPTH and rng.random() < 0.5):
                out[name] = schema_value(sub, rng, words, depth + 1, root)
        for name in sorted(n for n in required if n not in props and isinstance(n, str)):
            out[name] = _words(rng, words)  # required but not described: any value will do
        return out
    return _string(schema, rng, words)  # a string (and any type this subset does not know)


def _resolve(schema: Any, root: Any) -> dict[str, Any]:
    """``schema`` with its ``$ref`` (merged with the keywords beside it, as 2019-09 reads them)
    and ``allOf`` folded in, so the caller sees one flat schema."""
    if not isinstance(schema, dict):
        return {}
    for _ in range(_MAX_REFS):
        if "$ref" in schema:
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = _merge(_lookup(schema["$ref"], root), rest)
        elif isinstance(schema.get("allOf"), list):
            parts = schema["allOf"]
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in parts:
                merged = _merge(merged, _resolve(part, root))
            schema = merged
        else:
            return schema
    raise Unsimulated("the JSON schema's $refs form a cycle the simulator cannot unfold")


def _lookup(ref: Any, root: Any) -> dict[str, Any]:
    """The schema a local JSON pointer (``#``, ``#/$defs/name``...) names in ``root``."""
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        raise Unsimulated(f"the simulator resolves local $refs only (#/...), not {ref!r}")
    node = root
    for raw in ref[2:].split("/") if ref != "#" else ():
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise Unsimulated(f"$ref {ref!r} names nothing in the schema")
    return node if isinstance(node, dict) else {}


_LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two schemas a value must satisfy both of, as one (the keywords this subset reads):
    properties merged (a shared one must satisfy both), required united, bounds tightened,
    types and enums intersected; anything else, ``b``'s wins."""
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif key == "properties" and isinstance(value, dict) and isinstance(out[key], dict):
            props = dict(out[key])
            for name, sub in value.items():
                props[name] = {"allOf": [props[name], sub]} if name in props else sub
            out[key] = props
        elif key == "required" and isinstance(value, list) and isinstance(out[key], list):
            out[key] = [*out[key], *(r for r in value if r not in out[key])]
        elif key in _LOWER_BOUNDS and _is_num(value) and _is_num(out[key]):
            out[key] = max(out[key], value)
        elif key in _UPPER_BOUNDS and _is_num(value) and _is_num(out[key]):
            out[key] = min(out[key], value)
        elif key == "type":
            mine = out[key] if isinstance(out[key], list) else [out[key]]
            theirs = value if isinstance(value, list) else [value]
            both = [t for t in mine if t in theirs or (t == "integer" and "number" in theirs)]
            both += [t for t in theirs if t == "integer" and "number" in mine and t not in both]
            out[key] = both or value
        elif key == "enum" and isinstance(value, list) and isinstance(out[key], list):
            out[key] = [v for v in out[key] if v in value] or value
        else:
            out[key] = value
    return out


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _number(schema: dict[str, Any], kind: str, rng: random.Random) -> int | float:
    """A number within the schema's bounds (by default 0..100, or the 100 below a negative
    maximum)."""
    hi_given = schema.get("maximum", schema.get("exclusiveMaximum"))
    lo_default = 0 if not _is_num(hi_given) or hi_given > 0 else hi_given - 100
    lo = schema.get("minimum", schema.get("exclusiveMinimum", lo_default))
    hi = schema.get("maximum", schema.get("exclusiveMaximum", max(lo, 0) + 100))
    if kind == "integer":
        lo_i = math.ceil(lo) + (1 if "exclusiveMinimum" in schema and lo == int(lo) else 0)
        hi_i = math.floor(hi) - (1 if "exclusiveMaximum" in schema and hi == int(hi) else 0)
        step = schema.get("multipleOf")
        if isinstance(step, int) and not isinstance(step, bool) and step > 0:
            first, last = -(-lo_i // step), hi_i // step
            return step * rng.randint(first, max(first, last))
        return rng.randint(lo_i, max(lo_i, hi_i))
    if not hi > lo:
        return lo
    value = round(lo + (hi - lo) * rng.random(), 2)
    if not _in_bounds(value, schema):  # rounding crossed a bound that is not a round number
        value = (lo + hi) / 2
    return value


def _in_bounds(v: float, schema: dict[str, Any]) -> bool:
    return not (
        ("minimum" in schema and v < schema["minimum"])
        or ("maximum" in schema and v > schema["maximum"])
        or ("exclusiveMinimum" in schema and v <= schema["exclusiveMinimum"])
        or ("exclusiveMaximum" in schema and v >= schema["exclusiveMaximum"])
    )


def _array(
    schema: dict[str, Any], rng: random.Random, words: Sequence[str], depth: int, root: Any
) -> list[Any]:
    prefix = schema.get("prefixItems")
    prefix = prefix if isinstance(prefix, list) else []
    items = schema.get("items")
    if depth >= MAX_SCHEMA_DEPTH:  # as short as allowed
        count = int(schema.get("minItems", 0))
    else:
        cap = int(schema.get("maxItems", 3))
        low = int(schema.get("minItems", min(1, cap)))
        high = max(low, min(cap, 3))
        count = rng.randint(low, high)
        if prefix:
            count = max(count, min(len(prefix), int(schema.get("maxItems", len(prefix)))))
    if prefix and items is False:
        count = min(count, len(prefix))
    return [
        schema_value(prefix[i] if i < len(prefix) else items, rng, words, depth + 1, root)
        for i in range(count)
    ]


_FORMATS = {
    "date-time": lambda r: (
        f"20{r.randint(10, 29)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}T"
        f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}Z"
    ),
    "date": lambda r: f"20{r.randint(10, 29)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
    "time": lambda r: f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}Z",
    "uuid": lambda r: str(uuid.UUID(int=r.getrandbits(128), version=4)),
    "email": lambda r: f"user{r.randint(1, 999)}@example.com",
    "uri": lambda r: f"https://example.com/{r.randint(1, 999)}",
    "ipv4": lambda r: ".".join(str(r.randint(1, 254)) for _ in range(4)),
}


def _string(schema: dict[str, Any], rng: random.Random, words: Sequence[str]) -> str:
    low = int(schema.get("minLength", 0))
    high = schema.get("maxLength")
    pattern = schema.get("pattern")
    name = schema.get("format")
    fmt = _FORMATS.get(name) if isinstance(name, str) else None
    if isinstance(pattern, str) or fmt is not None:
        for _ in range(_REGEX_TRIES):
            text = regex_text(pattern, rng) if isinstance(pattern, str) else fmt(rng)  # type: ignore[misc]
            if low <= len(text) and (not isinstance(high, int) or len(text) <= high):
                return text
        raise Unsimulated("the simulator found no string that fits both the pattern and lengths")
    text = _words(rng, words)
    text = text.ljust(low, "x")
    return text[: int(high)] if isinstance(high, int) else text


def _pick(rng: random.Random, words: Sequence[str]) -> str:
    return words[rng.randrange(len(words))]


def _words(rng: random.Random, words: Sequence[str]) -> str:
    return " ".join(_pick(rng, words) for _ in range(rng.randint(1, 3)))


# ------------------------------------------------------------------------------------------------
# Regular expressions
# ------------------------------------------------------------------------------------------------

_PRINTABLE = tuple(chr(c) for c in range(0x20, 0x7F))
"""What ``.`` and negated classes draw from: printable ASCII (so the text stays readable)."""
_CATEGORIES: dict[Any, str] = {
    _sre_c.CATEGORY_DIGIT: string.digits,
    _sre_c.CATEGORY_WORD: string.ascii_letters + string.digits + "_",
    _sre_c.CATEGORY_SPACE: " \t\n",
    _sre_c.CATEGORY_LINEBREAK: "\n",
}
_NEGATED_CATEGORIES = {
    _sre_c.CATEGORY_NOT_DIGIT: _sre_c.CATEGORY_DIGIT,
    _sre_c.CATEGORY_NOT_WORD: _sre_c.CATEGORY_WORD,
    _sre_c.CATEGORY_NOT_SPACE: _sre_c.CATEGORY_SPACE,
    _sre_c.CATEGORY_NOT_LINEBREAK: _sre_c.CATEGORY_LINEBREAK,
}
_REFUSED = {
    _sre_c.GROUPREF: "backreferences",
    _sre_c.GROUPREF_EXISTS: "conditional groups",
    _sre_c.ASSERT: "lookarounds",
    _sre_c.ASSERT_NOT: "lookarounds",
    _sre_c.ATOMIC_GROUP: "atomic groups",
    _sre_c.POSSESSIVE_REPEAT: "possessive repeats",
}


def regex_text(pattern: str, rng: random.Random) -> str:
    """A string that ``re.fullmatch``-es ``pattern`` (Python's syntax), drawn from ``rng`` by
    walking the pattern's parse tree: literals, ``.``, classes (ranges, negation, ``\\d \\w \\s``
    and their negations), repeats (unbounded ones at most 3 over their minimum), groups,
    alternation; anchors emit nothing. Each draw is checked, so the text always matches.

    Raises:
        Unsimulated: an invalid pattern, a backreference, lookaround or other construct not
            simulated, or a pattern no draw matched (e.g. an anchor mid-pattern).
    """
    try:
        tree = _sre.parse(pattern)
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise Unsimulated(f"invalid regex {pattern!r}: {exc}") from None
    _check(tree)  # refuse by construct, not by draw: the same request always fails the same way
    fold = bool(tree.state.flags & re.IGNORECASE)
    for _ in range(_REGEX_TRIES):
        out: list[str] = []
        _emit(tree, rng, out, fold)
        text = "".join(out)
        if compiled.fullmatch(text):
            return text
    raise Unsimulated(f"the simulator found no text that matches the regex {pattern!r}")


def _check(seq: Any) -> None:
    """Raise :class:`Unsimulated` for the first construct of ``seq`` the generator lacks."""
    for op, av in seq:
        if op is _sre_c.IN:
            for item, arg in av:
                if not (
                    item in (_sre_c.NEGATE, _sre_c.LITERAL, _sre_c.RANGE)
                    or (
                        item is _sre_c.CATEGORY
                        and (arg in _CATEGORIES or arg in _NEGATED_CATEGORIES)
                    )
                ):
                    raise Unsimulated(
                        f"the simulator does not simulate the regex class item {item}"
                    )
        elif op is _sre_c.MAX_REPEAT or op is _sre_c.MIN_REPEAT:
            _check(av[2])
        elif op is _sre_c.SUBPATTERN:
            _check(av[3])
        elif op is _sre_c.BRANCH:
            for alt in av[1]:
                _check(alt)
        elif op not in (_sre_c.LITERAL, _sre_c.NOT_LITERAL, _sre_c.ANY, _sre_c.AT):
            what = _REFUSED.get(op, f"the regex construct {op}")
            raise Unsimulated(f"the simulator does not simulate {what} in regex-constrained output")


def _emit(seq: Any, rng: random.Random, out: list[str], fold: bool) -> None:
    """Append a draw of the parse-tree sequence ``seq`` to ``out``."""
    for op, av in seq:
        if op is _sre_c.LITERAL:
            out.append(chr(av))
        elif op is _sre_c.NOT_LITERAL:
            out.append(_other_than(rng, lambda ch, av=av: _same(ch, chr(av), fold)))
        elif op is _sre_c.ANY:
            out.append(rng.choice(_PRINTABLE))
        elif op is _sre_c.IN:
            out.append(_class_char(av, rng, fold))
        elif op is _sre_c.MAX_REPEAT or op is _sre_c.MIN_REPEAT:
            low, high, sub = av
            for _ in range(rng.randint(low, min(high, low + 3))):
                _emit(sub, rng, out, fold)
        elif op is _sre_c.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            sub_fold = (fold or bool(add_flags & re.IGNORECASE)) and not del_flags & re.IGNORECASE
            _emit(sub, rng, out, sub_fold)
        elif op is _sre_c.BRANCH:
            _emit(av[1][rng.randrange(len(av[1]))], rng, out, fold)
        # AT (anchors) emit nothing; _check refused every other op


def _same(ch: str, other: str, fold: bool) -> bool:
    return ch == other or (fold and ch.lower() == other.lower())


def _other_than(rng: random.Random, excluded: Any) -> str:
    """A printable ASCII character ``excluded`` rejects (a negated class)."""
    pool = [c for c in _PRINTABLE if not excluded(c)]
    if not pool:
        raise Unsimulated("a negated regex class excludes every printable ASCII character")
    return rng.choice(pool)


def _class_char(items: list[tuple[Any, Any]], rng: random.Random, fold: bool) -> str:
    """A character of the class ``items`` (``[...]``, ``\\d`` and kin)."""
    if items and items[0][0] is _sre_c.NEGATE:
        rest = items[1:]
        return _other_than(rng, lambda ch: _in_class(ch, rest, fold))
    op, av = items[rng.randrange(len(items))]
    if op is _sre_c.LITERAL:
        return chr(av)
    if op is _sre_c.RANGE:
        return chr(rng.randint(av[0], av[1]))
    if op is _sre_c.CATEGORY:
        if av in _CATEGORIES:
            return rng.choice(_CATEGORIES[av])
        chars = _CATEGORIES[_NEGATED_CATEGORIES[av]]
        return _other_than(rng, lambda ch: ch in chars)
    raise AssertionError(f"unchecked regex class item {op}")  # _check refused it


def _in_class(ch: str, items: list[tuple[Any, Any]], fold: bool) -> bool:
    """Whether ``ch`` (printable ASCII) is in the class ``items`` (a negated class's rest)."""
    cands = {ch, ch.lower(), ch.upper()} if fold else {ch}
    for op, av in items:
        for c in cands:
            if op is _sre_c.LITERAL and ord(c) == av:
                return True
            if op is _sre_c.RANGE and av[0] <= ord(c) <= av[1]:
                return True
            if op is _sre_c.CATEGORY:
                if av in _CATEGORIES and c in _CATEGORIES[av]:
                    return True
                neg = _NEGATED_CATEGORIES.get(av)
                if neg is not None and c not in _CATEGORIES[neg]:
                    return True
    return False
