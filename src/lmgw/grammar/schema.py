"""JSON schemas as grammars: the language xgrammar generates from them (sans-IO).

Why: an answer constrained by a JSON schema (OpenAI ``response_format: json_schema``, vLLM
``structured_outputs.json`` / ``guided_json``, ``json_object``) that breaks mid-stream is
continued on another worker under the derivative of the schema's grammar by the text already
sent (:mod:`.expr`). That grammar must be the language vLLM's default backend generated,
xgrammar's ``Grammar.from_json_schema(schema, strict_mode=True)``: the first worker's prefix
must be accepted, and what is accepted must be what that worker could have produced. So this
mirrors xgrammar 0.2.8 (checked against it), quirks included, and refuses
(:class:`~.expr.Unsupported`, naming the keyword and its JSON pointer) what xgrammar ignores or
loosens, and what is not modelled exactly.

Mirrored: ``[ \\n\\r\\t]*`` between tokens, none around the root (``any_whitespace=False``:
``", "`` / ``": "`` or ``separators``; the builtin any-value rules keep ``", "``); properties in
schema order, optional ones skippable, others only after them and only with
``additionalProperties`` (keys unlike the literal names); items beyond ``prefixItems`` only
with ``items``; a bare ``{"type": "object"}`` / ``{"type": "array"}`` as any object / array,
but not behind ``$ref`` or a one-member ``allOf`` (xgrammar's rule cache, visiting order
included); ``enum`` / ``const`` as compact picojson text (``%.17g`` floats); length-bounded
strings as ``[^"\\\\\\r\\n]{m,n}`` (no escapes); exact integer ranges and integer
``multipleOf``; formats ``date``, ``time``, ``date-time``, ``duration``, ``uuid``, ``ipv4``,
``hostname`` (formats xgrammar does not know stay annotations); ``pattern`` as a full match
(:mod:`.regex`) over the raw text less ``"``, ``\\`` and control characters.

Refused, among others: ``not``, ``if``, several-member ``allOf``, ``oneOf`` not provably
disjoint, constraints beside ``$ref`` / ``anyOf`` / ``oneOf`` / ``allOf`` / ``const`` /
``enum``, number bounds, ``patternProperties``, ``propertyNames``, ``min``/``maxProperties``,
``contains``, ``uniqueItems``, other known formats, external ``$ref``, left recursion, and
schemas xgrammar's cache would conflate (equal but for keys named like annotations, e.g. two
objects with a property ``title`` of different types).
"""

from __future__ import annotations

import math
from typing import Any

from .expr import EPS, FAIL, Arena, Grammar, Unsupported, children

__all__ = ["json_object_grammar", "schema_grammar"]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Keywords xgrammar skips in its schema cache key (and never reads).
_ANNOTATIONS = _words(
    "title default description examples deprecated readOnly writeOnly $comment $schema"
)
_NEVER = ("not", "if", "then", "else", "$dynamicRef", "$recursiveRef")
_NUMERIC = _words("minimum maximum exclusiveMinimum exclusiveMaximum multipleOf")
_OBJECT = _words(
    "properties required additionalProperties unevaluatedProperties patternProperties "
    "propertyNames minProperties maxProperties dependentRequired dependentSchemas dependencies"
)
_ARRAY = _words(
    "items prefixItems additionalItems unevaluatedItems minItems maxItems uniqueItems contains "
    "minContains maxContains"
)
_BY_KIND: dict[str, frozenset[str]] = {
    "integer": _NUMERIC,
    "number": _NUMERIC,
    "string": _words("minLength maxLength pattern format"),
    "object": _OBJECT,
    "array": _ARRAY,
    "boolean": frozenset(),
    "null": frozenset(),
}
_GENERIC = _words("type enum const $ref anyOf oneOf allOf") | set(_NEVER)
_CONSTRAINING = _GENERIC.union(*_BY_KIND.values()) - {"format"}  # format: an annotation
# Where a schema holds schemas, for telling a property called "title" from the annotation.
_SUB_SCHEMAS = _words(
    "items additionalProperties unevaluatedProperties not if then else contains propertyNames "
    "unevaluatedItems additionalItems contentSchema anyOf oneOf allOf prefixItems"
)
_SCHEMA_MAPS = _words(
    "properties patternProperties $defs definitions dependentSchemas dependencies"
)
_XG_FORMATS = _words(
    "email date time date-time duration ipv4 ipv6 hostname uuid uri uri-reference uri-template "
    "json-pointer relative-json-pointer"
)
_INT64 = (-(2**63), 2**63 - 1)
_INT32_MAX = 2**31 - 1
_MULTIPLE_OF_MAX = 1024  # xgrammar ignores a bigger integer multipleOf
_MULTIPLE_OF_RANGE_MAX = 10000  # ... and one over a wider bounded range
_WS = ((0x20, 0x20), (0x0A, 0x0A), (0x0D, 0x0D), (0x09, 0x09))
_JSON_UNSAFE = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C))  # escaped in a JSON string
_ALL_KINDS = _words("null boolean number string array object")


def schema_grammar(
    schema: dict[str, Any] | bool,
    arena: Arena | None = None,
    *,
    any_whitespace: bool = True,
    additional_properties: bool = False,
    separators: tuple[str, str] | None = None,
) -> Grammar:
    """The grammar xgrammar 0.2.8 builds for ``schema`` (start rule ``root``).

    ``additional_properties=True`` mirrors xgrammar's ``strict_mode=False`` (objects and arrays
    admit what the schema does not rule out); ``separators`` mirrors its argument of that name
    (recent vLLM passes ``(",", ":")`` with ``any_whitespace=False``). Raises
    :class:`~.expr.Unsupported`, naming the keyword and its JSON pointer, for what xgrammar
    ignores, loosens or refuses, and for what is not modelled."""
    b = _Builder(arena or Arena(), schema, any_whitespace, not additional_properties, separators)
    return b.grammar()


def json_object_grammar(
    arena: Arena | None = None,
    *,
    any_whitespace: bool = True,
    separators: tuple[str, str] | None = None,
) -> Grammar:
    """Any JSON object: vLLM's ``json_object`` (xgrammar compiles ``{"type": "object"}``)."""
    return schema_grammar(
        {"type": "object"}, arena, any_whitespace=any_whitespace, separators=separators
    )


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _refuse(keyword: str, path: str, why: str) -> Unsupported:
    return Unsupported(f"JSON schema keyword {keyword!r} at {path}: {why}")


def _ptr(path: str, *parts: object) -> str:
    for p in parts:
        path += "/" + str(p).replace("~", "~0").replace("/", "~1")
    return path


_PJ_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
               "\t": "\\t"}  # fmt: skip


def _pj_str(s: str) -> str:
    """A string as picojson (xgrammar's JSON library) prints it: non-ASCII raw, ``/`` bare."""
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch in _PJ_ESCAPES:
            out.append(_PJ_ESCAPES[ch])
        elif cp < 0x20 or cp == 0x7F:
            out.append(f"\\u{cp:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _pj_number(v: float) -> str:
    if isinstance(v, int) and _INT64[0] <= v <= _INT64[1]:
        return str(v)
    f = float(v)
    if not math.isfinite(f):
        raise Unsupported(f"the number {v!r} is not JSON")
    # picojson prints a double with "%.f" when whole and below 2**53, else with "%.17g"
    return format(f, ".0f") if f.is_integer() and abs(f) < 2**53 else format(f, ".17g")


def _pj_dump(v: Any) -> str:
    """Compact JSON as picojson serialises it (object keys in their order)."""
    if v is None or isinstance(v, bool):
        return "null" if v is None else "true" if v else "false"
    if isinstance(v, (int, float)):
        return _pj_number(v)
    if isinstance(v, str):
        return _pj_str(v)
    if isinstance(v, list):
        return "[" + ",".join(_pj_dump(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(_pj_str(k) + ":" + _pj_dump(x) for k, x in v.items()) + "}"
    raise Unsupported(f"{type(v).__name__} is not a JSON value")


def _xkey(v: Any) -> Any:
    """xgrammar's schema cache key: keys sorted, the annotation-named ones dropped everywhere."""
    if isinstance(v, dict):
        return ("o", tuple(sorted((k, _xkey(x)) for k, x in v.items() if k not in _ANNOTATIONS)))
    if isinstance(v, list):
        return ("a", tuple(_xkey(x) for x in v))
    return ("s", _pj_dump(v))


def _skey(v: Any, pos: str = "schema") -> Any:
    """The same key with annotations dropped only where they are annotations (``pos``: what
    ``v`` is, a schema, a map of schemas, or data)."""
    if isinstance(v, dict):
        if pos == "schema":
            items = [(k, _skey(x, _pos(k))) for k, x in v.items() if k not in _ANNOTATIONS]
        else:
            items = [(k, _skey(x, "schema" if pos == "map" else "data")) for k, x in v.items()]
        return ("o", tuple(sorted(items)))
    if isinstance(v, list):
        return ("a", tuple(_skey(x, "schema" if pos == "schema" else "data") for x in v))
    return ("s", _pj_dump(v))


def _pos(keyword: str) -> str:
    return "map" if keyword in _SCHEMA_MAPS else "schema" if keyword in _SUB_SCHEMAS else "data"


def _canon(v: Any) -> Any:
    """A JSON value up to JSON Schema equality (1 == 1.0); distinct values may merge."""
    if v is None or isinstance(v, bool):
        return ("null",) if v is None else ("boolean", v)
    if isinstance(v, (int, float)):
        return ("number", float(v))
    if isinstance(v, str):
        return ("string", v)
    if isinstance(v, list):
        return ("array", tuple(_canon(x) for x in v))
    if isinstance(v, dict):
        return ("object", tuple(sorted((k, _canon(x)) for k, x in v.items())))
    raise Unsupported(f"{type(v).__name__} is not a JSON value")


def _value_kinds(v: Any) -> set[str]:
    if v is None or isinstance(v, bool):
        return {"null"} if v is None else {"boolean"}
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        return {"integer", "number"}
    if isinstance(v, float):
        return {"number"}
    return {"string" if isinstance(v, str) else "array" if isinstance(v, list) else "object"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _rule_name(hint: str, taken: dict[str, int]) -> str:
    base = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in hint)
    base = base.strip("_") or "ref"
    if not (base[0].isalpha() or base[0] == "_"):
        base = "r_" + base
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _subtract(ranges: tuple[tuple[int, int], ...], cut: tuple[tuple[int, int], ...]) -> list:
    out = []
    for lo, hi in ranges:
        pieces = [(lo, hi)]
        for clo, chi in cut:
            pieces = [
                p
                for plo, phi in pieces
                for p in ((plo, min(phi, clo - 1)), (max(plo, chi + 1), phi))
                if p[0] <= p[1]
            ]
        out += pieces
    return out


class _Summary:
    """An over-approximation of a schema's valid values, to prove ``oneOf`` branches disjoint:
    the kinds of value, the values themselves if finitely many, and for objects the finite
    values of required properties (discriminators)."""

    __slots__ = ("discriminators", "kinds", "values")

    def __init__(
        self,
        kinds: frozenset[str],
        values: frozenset[Any] | None = None,
        discriminators: dict[str, frozenset[Any]] | None = None,
    ) -> None:
        self.kinds = kinds
        self.values = values
        self.discriminators = discriminators or {}

    def disjoint(self, other: _Summary) -> bool:
        if not self.kinds & other.kinds:
            return True
        if self.values is not None and other.values is not None:
            return not self.values & other.values
        if self.values is not None:
            return all(v[0] not in other.kinds for v in self.values)
        if other.values is not None:
            return all(v[0] not in self.kinds for v in other.values)
        common = self.discriminators.keys() & other.discriminators.keys()
        return any(not self.discriminators[k] & other.discriminators[k] for k in common)


# ------------------------------------------------------------------------------------------------
# the builder: xgrammar's SchemaParser + JSONSchemaConverter, visiting in the same order
# ------------------------------------------------------------------------------------------------


class _Builder:
    def __init__(
        self,
        arena: Arena,
        root: dict[str, Any] | bool,
        any_ws: bool,
        strict: bool,
        separators: tuple[str, str] | None,
    ) -> None:
        a = self.a = arena
        self.root = root
        self.strict = strict
        basics = ("basic_any", "basic_array", "basic_object")
        self.rules: dict[str, int] = dict.fromkeys(("root", *basics), EPS)  # names reserved
        self.rule_paths: dict[str, str] = {"root": "#"}
        self.uri_rule: dict[str, str] = {"#": "root"}
        self.dfa: dict[int, list[str]] = {}  # multipleOf -> its remainder rules
        self.keys: dict[Any, Any] = {}  # xgrammar cache key -> the schema's own key
        self.keys_of: dict[int, tuple[Any, Any]] = {}  # id(schema) -> (schema, xgrammar key)
        self.ws = ws = a.star(a.cls(_WS)) if any_ws else EPS
        comma, colon = separators or ((",", ":") if any_ws else (", ", ": "))
        self.comma, self.colon = self.sep(comma), self.sep(colon)
        self.basic_comma = self.sep("," if any_ws else ", ")
        self.empty_object = a.seqs([a.lit("{"), ws, a.lit("}")])
        self.empty_array = a.seqs([a.lit("["), ws, a.lit("]")])
        self.digit, self.nonzero = self.c("09"), self.c("19")
        self._scalars()
        self.any = a.ref("basic_any")
        # xgrammar's rule cache: the basic keys; the root's and each $ref target's join later
        self.cache: dict[Any, int] = {_xkey({}): self.any}
        basic = [self.integer, self.number, self.string, self.boolean, self.null]
        basic += [a.ref("basic_array"), a.ref("basic_object")]
        for t, expr in zip(
            ("integer", "number", "string", "boolean", "null", "array", "object"),
            basic,
            strict=True,
        ):
            self.cache[_xkey({"type": t})] = expr

    def sep(self, s: str) -> int:
        return self.a.seqs([self.ws, self.a.lit(s), self.ws])

    def c(self, *ranges: str) -> int:
        """A character class from ranges written "az" ("a" to "z") or "x" (just "x")."""
        return self.a.cls([(ord(r[0]), ord(r[-1])) for r in ranges])

    def _scalars(self) -> None:
        a, d = self.a, self.digit
        self.escape = a.alt(
            [self.c(*'"\\/bfnrt'), a.seqs([a.lit("u"), *[self.c("09", "AF", "af")] * 4])]
        )
        plain = a.cls(_JSON_UNSAFE, neg=True)
        chars = a.star(a.alt([plain, a.seq(a.lit("\\"), self.escape)]))
        self.string_sub = a.seq(chars, a.lit('"'))  # a string after its opening quote
        self.string = a.seq(a.lit('"'), self.string_sub)
        sign = a.opt(a.lit("-"))
        self.integer = a.alt([a.lit("0"), a.seqs([sign, self.nonzero, a.star(d)])])
        whole = a.alt([a.lit("0"), a.seq(self.nonzero, a.star(d))])
        fraction = a.opt(a.seq(a.lit("."), a.plus(d)))
        exponent = a.opt(a.seqs([self.c("e", "E"), a.opt(self.c("+", "-")), a.plus(d)]))
        self.number = a.seqs([sign, whole, fraction, exponent])
        self.boolean = a.alt([a.lit("true"), a.lit("false")])
        self.null = a.lit("null")

    # -- the whole grammar ------------------------------------------------------------------------

    def grammar(self) -> Grammar:
        a, ws, bc = self.a, self.ws, self.basic_comma
        key = self._register(self.root, "#")
        if key in self.cache:
            self.rules["root"] = self.cache[key]
        else:
            self.cache[key] = a.ref("root")
            self.rules["root"] = self.gen(self.root, "#")
        self.rules["basic_any"] = a.alt(
            [self.number, self.string, self.boolean, self.null, a.ref("basic_array"),
             a.ref("basic_object")]
        )  # fmt: skip
        items = a.seqs([self.any, a.star(a.seq(bc, self.any))])
        self.rules["basic_array"] = a.alt(
            [a.seqs([a.lit("["), ws, items, ws, a.lit("]")]), self.empty_array]
        )
        member = a.seqs([self.string, self.colon, self.any])
        members = a.seq(member, a.star(a.seq(bc, member)))
        self.rules["basic_object"] = a.alt(
            [a.seqs([a.lit("{"), ws, members, ws, a.lit("}")]), self.empty_object]
        )
        g = Grammar(a, self.rules, "root")
        self._check_left_recursion(g)
        return g

    def _check_left_recursion(self, g: Grammar) -> None:
        first = {name: self._first_refs(g, body) for name, body in self.rules.items()}
        state: dict[str, int] = {}

        def visit(r: str) -> None:
            state[r] = 1
            for s in first[r]:
                if state.get(s) == 1:
                    raise _refuse(
                        "$ref", self.rule_paths.get(s, "#"), "the schema is left-recursive"
                    )
                if s not in state:
                    visit(s)
            state[r] = 2

        for r in first:
            if r not in state:
                visit(r)

    def _first_refs(self, g: Grammar, body: int) -> set[str]:
        """The rules ``body`` may enter before reading a character."""
        nodes, out, seen, stack = self.a.nodes, set(), set(), [body]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            n = nodes[i]
            if n[0] == "ref":
                out.add(n[1])
            elif n[0] == "seq" and not g.nullable(n[1]):
                stack.append(n[1])  # what follows a non-empty head is not at the start
            else:
                stack += children(n)
        return out

    # -- dispatch (xgrammar's SchemaParser::Parse order) ------------------------------------------

    def _register(self, s: Any, path: str) -> Any:
        """The schema's xgrammar cache key. xgrammar's parser hands the first schema parsed
        under a key to every later one: refuse where that would swap in a different schema."""
        known = self.keys_of.get(id(s))
        if known is not None and known[0] is s:
            return known[1]
        xk = _xkey(s)
        self.keys_of[id(s)] = (s, xk)  # holds s, so its id is not reused
        if isinstance(s, dict) and self.keys.setdefault(xk, _skey(s)) != _skey(s):
            kw = next((k for k in s if k in _SCHEMA_MAPS or k in ("const", "enum")), "type")
            why = "xgrammar's schema cache conflates this schema with another that differs only "
            raise _refuse(kw, path, why + "in keys named like annotations (title, default, ...)")
        return xk

    def create(self, s: Any, path: str) -> int:
        """xgrammar's CreateRule: the cached rule of the schema's key, else a fresh one."""
        hit = self.cache.get(self._register(s, path))
        return hit if hit is not None else self.gen(s, path)

    def gen(self, s: Any, path: str) -> int:
        """xgrammar's GenerateFromSpec(Parse(s))."""
        if s is True:
            return self.any
        if s is False:
            raise _refuse("false", path, "xgrammar refuses the schema false")
        if not isinstance(s, dict):
            raise _refuse("type", path, "a schema must be an object or a boolean")
        self._register(s, path)
        for kw in _NEVER:
            if kw in s:
                raise _refuse(kw, path, "xgrammar ignores it")
        if "$id" in s and s is not self.root:
            raise _refuse("$id", path, "xgrammar does not rebase $ref on a nested $id")
        if "$ref" in s:
            self._no_siblings(s, path, "$ref")
            return self._ref(s["$ref"], path)
        if "const" in s:
            return self._finite([s["const"]], s, path, "const")
        if "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise _refuse("enum", path, "enum must be a non-empty array")
            return self._finite(s["enum"], s, path, "enum")
        for kw in ("anyOf", "oneOf", "allOf"):
            if kw in s:
                self._no_siblings(s, path, kw)
                return self._combined(kw, s[kw], path)
        if "type" in s:
            return self._typed(s, path)
        if any(k in s for k in ("properties", "additionalProperties", "unevaluatedProperties")):
            return self._object(s, path)
        if any(k in s for k in ("items", "prefixItems", "unevaluatedItems")):
            return self._array(s, path)
        for kw in s:
            if kw in _CONSTRAINING:
                raise _refuse(kw, path, "xgrammar ignores it in a schema without a type")
        return self.any

    def _no_siblings(self, s: dict[str, Any], path: str, keyword: str) -> None:
        for kw in s:
            if kw != keyword and kw in _CONSTRAINING:
                raise _refuse(kw, path, f"xgrammar ignores it beside {keyword}")

    def _typed(self, s: dict[str, Any], path: str) -> int:
        t = s["type"]
        if isinstance(t, list):
            if not t or not all(isinstance(x, str) and x in _BY_KIND for x in t):
                raise _refuse("type", path, "type must be a non-empty list of JSON types")
            return self.a.alt([self.create({**s, "type": x}, path) for x in t])
        if not isinstance(t, str) or t not in _BY_KIND:
            raise _refuse("type", path, f"unknown type {t!r}")
        if t == "number":
            for kw in _NUMERIC:
                if kw in s:
                    raise _refuse(kw, path, "number bounds are not modelled")
            return self.number
        handler = {"integer": self._integer, "string": self._string, "object": self._object,
                   "array": self._array}.get(t)  # fmt: skip
        if handler is not None:
            return handler(s, path)
        return self.boolean if t == "boolean" else self.null

    # -- $ref, const, enum, anyOf, oneOf, allOf ---------------------------------------------------

    def _ref(self, uri: Any, path: str) -> int:
        if not isinstance(uri, str):
            raise _refuse("$ref", path, "$ref must be a string")
        if uri in self.uri_rule:
            return self.a.ref(self.uri_rule[uri])
        target = self._resolve(uri, path)
        parts = [p for p in uri[2:].split("/") if p]
        name = self.uri_rule[uri] = _rule_name("_".join(parts), self.rules)
        self.rules[name] = EPS  # the name taken while the body is built
        target_path = self.rule_paths[name] = "#/" + "/".join(parts)
        self.rules[name] = self.gen(target, target_path)  # no cache look-up here
        self.cache[self._register(target, target_path)] = self.a.ref(name)  # cached late
        return self.a.ref(name)

    def _resolve(self, uri: str, path: str) -> Any:
        if not uri.startswith("#/"):
            raise _refuse("$ref", path, f"only '#' and '#/...' references resolve, not {uri!r}")
        if "~" in uri or "%" in uri:
            raise _refuse("$ref", path, "xgrammar does not unescape JSON pointers")
        cur: Any = self.root
        for part in (p for p in uri[2:].split("/") if p):
            if not isinstance(cur, dict) or part not in cur:
                raise _refuse("$ref", path, f"{uri!r} does not resolve")
            cur = cur[part]
        return cur

    def _finite(self, values: list[Any], s: dict[str, Any], path: str, keyword: str) -> int:
        kinds = set().union(*(_value_kinds(v) for v in values))
        for kw in s:
            if kw == keyword or kw not in _CONSTRAINING:
                continue
            if kw == "type":
                t = s["type"]
                types = t if isinstance(t, list) else [t]
                if all(isinstance(x, str) for x in types) and all(
                    _value_kinds(v) & set(types) for v in values
                ):
                    continue
            elif not any(kw in _BY_KIND[k] for k in kinds):
                continue  # a keyword for other types constrains none of these values
            raise _refuse(kw, path, f"xgrammar ignores it beside {keyword}")
        try:
            return self.a.alt([self.a.lit(_pj_dump(v)) for v in values])
        except Unsupported as e:
            raise _refuse(keyword, path, str(e)) from None

    def _combined(self, keyword: str, options: Any, path: str) -> int:
        if not isinstance(options, list) or not options:
            raise _refuse(keyword, path, f"{keyword} must be a non-empty array")
        if keyword == "allOf":
            if len(options) != 1:
                raise _refuse(keyword, path, "xgrammar reads allOf of several members as any value")
            return self.gen(options[0], _ptr(path, keyword, 0))  # no cache look-up here
        out = self.a.alt([self.create(o, _ptr(path, keyword, i)) for i, o in enumerate(options)])
        if keyword == "oneOf":  # xgrammar: the union, whether or not it proves disjointness
            sums = [self._summary(o, 8) for o in options]
            for i, x in enumerate(sums):
                if not all(x.disjoint(y) for y in sums[i + 1 :]):
                    raise _refuse(keyword, path, "branches not provably disjoint (xgrammar: anyOf)")
        return out

    def _summary(self, s: Any, depth: int) -> _Summary:
        if not isinstance(s, dict) or depth == 0:
            return _Summary(_ALL_KINDS)
        if "$ref" in s:
            try:
                return self._summary(self._resolve(s["$ref"], "#"), depth - 1)
            except (Unsupported, TypeError, AttributeError):
                return _Summary(_ALL_KINDS)
        if "const" in s or "enum" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            canon = frozenset(_canon(v) for v in values)
            return _Summary(frozenset(v[0] for v in canon), canon)
        for kw in ("anyOf", "oneOf", "allOf"):
            if kw in s:
                if not isinstance(s[kw], list) or not s[kw] or (kw == "allOf" and len(s[kw]) > 1):
                    return _Summary(_ALL_KINDS)
                parts = [self._summary(o, depth - 1) for o in s[kw]]
                kinds = frozenset().union(*(p.kinds for p in parts))
                finite = all(p.values is not None for p in parts)
                values = frozenset().union(*(p.values or () for p in parts)) if finite else None
                return parts[0] if len(parts) == 1 else _Summary(kinds, values)
        t = s.get("type")
        types = [t] if isinstance(t, str) else t
        if not isinstance(types, list) or not all(isinstance(x, str) for x in types):
            return _Summary(_ALL_KINDS)
        kinds = frozenset("number" if x == "integer" else x for x in types)
        props, required, found = s.get("properties"), s.get("required"), {}
        if kinds == {"object"} and isinstance(props, dict) and isinstance(required, list):
            for name in required:
                values = self._summary(props.get(name), depth - 1).values
                if values is not None:
                    found[name] = values
        return _Summary(kinds, None, found)

    # -- integers ---------------------------------------------------------------------------------

    def _integer(self, s: dict[str, Any], path: str) -> int:
        lo, hi = self._int_bounds(s, path)
        if "multipleOf" in s:
            return self._multiple_of(s["multipleOf"], lo, hi, path)
        if lo is None and hi is None:
            return self.integer
        return self._int_range(lo, hi)

    def _int_bounds(self, s: dict[str, Any], path: str) -> tuple[int | None, int | None]:
        def bound(kw: str) -> int | None:
            v = s.get(kw)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _refuse(kw, path, "an integer bound must be a number")
            if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
                raise _refuse(kw, path, "an integer bound must be a whole number")
            if not _INT64[0] < v < _INT64[1]:
                raise _refuse(kw, path, "an integer bound must lie inside 64 bits")
            return int(v)

        lo, hi = bound("minimum"), bound("maximum")
        xlo, xhi = bound("exclusiveMinimum"), bound("exclusiveMaximum")
        if xlo is not None:
            lo = xlo + 1 if lo is None else max(lo, xlo + 1)
        if xhi is not None:
            hi = xhi - 1 if hi is None else min(hi, xhi - 1)
        if lo is not None and hi is not None and lo > hi:
            raise _refuse("minimum", path, "no integer lies in the range")
        return lo, hi

    def _multiple_of(self, m: Any, lo: int | None, hi: int | None, path: str) -> int:
        a = self.a
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
            raise _refuse("multipleOf", path, "multipleOf must be a positive number")
        if (isinstance(m, float) and not m.is_integer()) or m > _MULTIPLE_OF_MAX:
            raise _refuse("multipleOf", path, "xgrammar ignores it unless whole and <= 1024")
        m = int(m)
        if lo is None and hi is None:
            return self._mod_dfa(m)
        if lo is None or hi is None or hi - lo + 1 > _MULTIPLE_OF_RANGE_MAX:
            raise _refuse("multipleOf", path, "xgrammar ignores it with a half-open or wide range")
        first = lo + (-lo) % m
        if first > hi:
            raise _refuse("multipleOf", path, "no multiple lies in the range")
        return a.alt([a.lit(str(v)) for v in range(first, hi + 1, m)])

    def _mod_dfa(self, m: int) -> int:
        """Decimal integers divisible by ``m``: a rule per remainder (xgrammar's DFA)."""
        a = self.a
        names = self.dfa.get(m)
        if names is None:
            names = self.dfa[m] = []
            for k in range(m):
                names.append(_rule_name(f"multiple_of_{m}_mod_{k}", self.rules))
                self.rules[names[-1]] = EPS
            for k, name in enumerate(names):
                steps = [a.seq(a.lit(str(d)), a.ref(names[(10 * k + d) % m])) for d in range(10)]
                self.rules[name] = a.alt([EPS, *steps] if k == 0 else steps)
        starts = [a.seq(a.lit(str(d)), a.ref(names[d % m])) for d in range(1, 10)]
        return a.alt([a.lit("0"), a.seq(a.opt(a.lit("-")), a.alt(starts))])

    def _int_range(self, lo: int | None, hi: int | None) -> int:
        """The canonical decimal integers in [lo, hi] (None: unbounded on that side)."""
        a = self.a
        parts = []
        if lo is None or lo < 0:
            least = 1 if hi is None else max(1, -hi)
            parts.append(a.seq(a.lit("-"), self._magnitudes(least, None if lo is None else -lo)))
        if (lo is None or lo <= 0) and (hi is None or hi >= 0):
            parts.append(a.lit("0"))
        if hi is None or hi > 0:
            parts.append(self._magnitudes(1 if lo is None else max(1, lo), hi))
        return a.alt(parts)

    def _magnitudes(self, lo: int, hi: int | None) -> int:
        """Decimal numbers without leading zeros in [lo, hi], lo >= 1."""
        a = self.a
        if hi is not None and lo > hi:
            return FAIL
        low = str(lo)
        top = len(low) if hi is None else len(str(hi))
        parts = []
        for n in range(len(low), top + 1):
            start = low if n == len(low) else "1" + "0" * (n - 1)
            end = str(hi) if hi is not None and n == top else "9" * n
            parts.append(self._same_length(start, end))
        if hi is None:
            parts.append(a.seq(self.nonzero, a.repeat(self.digit, len(low), None)))
        return a.alt(parts)

    def _same_length(self, x: str, y: str) -> int:
        """Digit strings t with len(t) == len(x) == len(y) and x <= t <= y."""
        a = self.a
        if x == y:
            return a.lit(x)
        n = len(x)
        if n == 1:
            return self.c(x + y)
        if x[0] == y[0]:
            return a.seq(a.lit(x[0]), self._same_length(x[1:], y[1:]))
        free = a.repeat(self.digit, n - 1, n - 1)
        if x[1:] == "0" * (n - 1) and y[1:] == "9" * (n - 1):
            return a.seq(self.c(x[0] + y[0]), free)
        parts = [a.seq(a.lit(x[0]), self._same_length(x[1:], "9" * (n - 1)))]
        if ord(y[0]) - ord(x[0]) >= 2:
            parts.append(a.seq(self.c(chr(ord(x[0]) + 1) + chr(ord(y[0]) - 1)), free))
        parts.append(a.seq(a.lit(y[0]), self._same_length("0" * (n - 1), y[1:])))
        return a.alt(parts)

    # -- strings ----------------------------------------------------------------------------------

    def _string(self, s: dict[str, Any], path: str) -> int:
        a = self.a
        quote = a.lit('"')
        fmt = s.get("format")
        if fmt is not None and not isinstance(fmt, str):
            raise _refuse("format", path, "format must be a string")
        if fmt in _XG_FORMATS:
            for kw in ("pattern", "minLength", "maxLength"):
                if kw in s:
                    raise _refuse(kw, path, "xgrammar ignores it beside format")
            return a.seqs([quote, self._format(fmt, path), quote])
        if "pattern" in s:
            for kw in ("minLength", "maxLength"):
                if kw in s:
                    raise _refuse(kw, path, "xgrammar ignores it beside pattern")
            return a.seqs([quote, self._pattern(s["pattern"], path), quote])
        lo, hi = self._lengths(s, path)
        if lo == 0 and hi is None:
            return self.string
        chars = a.cls([(0x22, 0x22), (0x5C, 0x5C), (0x0D, 0x0D), (0x0A, 0x0A)], neg=True)
        try:
            return a.seqs([quote, a.repeat(chars, lo, hi), quote])
        except Unsupported as e:
            raise _refuse("maxLength" if "maxLength" in s else "minLength", path, str(e)) from None

    def _lengths(self, s: dict[str, Any], path: str) -> tuple[int, int | None]:
        lo, hi = s.get("minLength", 0), s.get("maxLength")
        if not _is_int(lo) or not 0 <= lo <= _INT32_MAX:
            raise _refuse("minLength", path, "minLength must be a non-negative 32-bit integer")
        if hi is not None and (not _is_int(hi) or hi < 0):
            raise _refuse("maxLength", path, "maxLength must be a non-negative integer")
        if hi is not None and hi > _INT32_MAX:
            hi = None  # xgrammar: unbounded
        if hi is not None and lo > hi:
            raise _refuse("minLength", path, "minLength is greater than maxLength")
        return lo, hi

    def _pattern(self, pattern: Any, path: str) -> int:
        if not isinstance(pattern, str):
            raise _refuse("pattern", path, "pattern must be a string")
        if not all(0x20 <= ord(c) <= 0x7E for c in pattern):
            why = "xgrammar reads a pattern of other than printable ASCII letting JSON escapes in"
            raise _refuse("pattern", path, why)
        from .regex import regex_expr  # loaded for patterns only

        try:
            expr = regex_expr(pattern, self.a)
        except Unsupported as e:
            raise _refuse("pattern", path, str(e)) from None
        out = self._json_chars(expr, {})
        if out == FAIL:
            why = "no string without JSON escapes matches (xgrammar then lets raw quotes in)"
            raise _refuse("pattern", path, why)
        return out

    def _json_chars(self, i: int, memo: dict[int, int]) -> int:
        """Expression ``i`` less the characters a JSON string escapes: xgrammar matches a
        pattern over a string's raw text and excludes them from every character match."""
        hit = memo.get(i)
        if hit is not None:
            return hit
        a = self.a
        n = a.nodes[i]
        k = n[0]
        if k in ("eps", "fail"):
            out = i
        elif k == "lit":
            out = FAIL if any(c in '"\\' or ord(c) < 0x20 for c in n[1]) else i
        elif k == "cls":
            out = a.cls(_JSON_UNSAFE + n[1], True) if n[2] else a.cls(_subtract(n[1], _JSON_UNSAFE))
        elif k == "seq":
            out = a.seq(self._json_chars(n[1], memo), self._json_chars(n[2], memo))
        elif k == "alt":
            out = a.alt([self._json_chars(o, memo) for o in n[1]])
        elif k == "star":
            out = a.star(self._json_chars(n[1], memo))
        else:
            raise Unsupported("a regex expression refers to a rule")
        memo[i] = out
        return out

    def _format(self, fmt: str, path: str) -> int:
        """xgrammar's regexes for the formats it knows (over the raw string text)."""
        a, d, c, lit = self.a, self.digit, self.c, self.a.lit
        month = a.alt([a.seq(lit("0"), c("19")), a.seq(lit("1"), c("02"))])
        day = a.alt([a.seq(lit("0"), c("19")), a.seq(c("12"), d), a.seq(lit("3"), c("01"))])
        date = a.seqs([a.repeat(d, 4, 4), lit("-"), month, lit("-"), day])
        hour = a.alt([a.seq(c("01"), d), a.seq(lit("2"), c("03"))])
        minute = a.seq(c("05"), d)
        offset = a.alt([lit("Z"), a.seqs([c("+", "-"), hour, lit(":"), minute])])
        fraction = a.opt(a.seq(lit("."), a.plus(d)))
        second = a.alt([minute, lit("60")])
        time = a.seqs([hour, lit(":"), minute, lit(":"), second, fraction, offset])
        if fmt in ("date", "time", "date-time"):
            return {"date": date, "time": time, "date-time": a.seqs([date, lit("T"), time])}[fmt]
        if fmt == "uuid":
            h = c("09", "AF", "af")
            groups = [a.repeat(h, k, k) for k in (8, 4, 4, 4, 12)]
            return a.seqs([groups[0], *(x for g in groups[1:] for x in (lit("-"), g))])
        if fmt == "ipv4":
            low = a.seqs([a.opt(c("01")), a.opt(d), d])
            byte = a.alt([a.seq(lit("25"), c("05")), a.seqs([lit("2"), c("04"), d]), low])
            return a.seq(a.repeat(a.seq(byte, lit(".")), 3, 3), byte)
        if fmt == "hostname":
            an = c("az", "09")
            label = a.seq(an, a.opt(a.seq(a.star(c("az", "09", "-")), an)))
            return a.seq(label, a.star(a.seq(lit("."), label)))
        if fmt == "duration":
            return self._duration()
        raise _refuse("format", path, f"format {fmt!r} is not modelled")

    def _duration(self) -> int:
        a, lit = self.a, self.a.lit

        def n(unit: str) -> int:
            return a.seq(a.plus(self.digit), lit(unit))

        ymd = a.seq(n("Y"), a.opt(a.seq(n("M"), a.opt(n("D")))))
        date = a.alt([n("D"), a.seq(n("M"), a.opt(n("D"))), ymd])
        hms = a.seq(n("H"), a.opt(a.seq(n("M"), a.opt(n("S")))))
        time = a.seq(lit("T"), a.alt([n("S"), a.seq(n("M"), a.opt(n("S"))), hms]))
        return a.seq(lit("P"), a.alt([a.seq(date, a.opt(time)), time, n("W")]))

    # -- objects ----------------------------------------------------------------------------------

    def _object(self, s: dict[str, Any], path: str) -> int:
        a = self.a
        for kw in ("patternProperties", "propertyNames", "maxProperties", "dependentRequired",
                   "dependentSchemas", "dependencies"):  # fmt: skip
            if kw in s:
                raise _refuse(kw, path, "not modelled")
        if "minProperties" in s and not (_is_int(s["minProperties"]) and s["minProperties"] == 0):
            raise _refuse("minProperties", path, "not modelled")
        props = s.get("properties", {})
        if not isinstance(props, dict):
            raise _refuse("properties", path, "properties must be an object")
        required = self._required(s, props, path)
        extra, extra_path = self._additional(s, path)
        names = list(props)
        pats = [
            a.seqs([a.lit(_pj_str(k)), self.colon, self.create(v, _ptr(path, "properties", k))])
            for k, v in props.items()
        ]
        addl = None
        if extra is not None:
            value = self.create(extra, extra_path)
            addl = a.seqs([self._other_key(names, path), self.colon, value])
        if pats:
            content = self._members(names, pats, required, addl)
        elif addl is not None:
            content = a.seqs([self.ws, addl, a.star(a.seq(self.comma, addl)), self.ws])
        else:
            return self.empty_object
        full = a.seqs([a.lit("{"), content, a.lit("}")])
        return full if required else a.alt([full, self.empty_object])

    def _required(self, s: dict[str, Any], props: dict[str, Any], path: str) -> set[str]:
        req = s.get("required", [])
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            raise _refuse("required", path, "required must be an array of strings")
        for r in req:
            if r not in props:
                raise _refuse("required", path, f"xgrammar ignores {r!r}, not in properties")
        return set(req)

    def _additional(self, s: dict[str, Any], path: str) -> tuple[Any, str]:
        """The schema of keys beyond ``properties`` as xgrammar picks it (None: no such key)."""
        allow_add, add_schema = not self.strict, None
        allow_uneval, uneval_schema = True, None
        if "additionalProperties" in s:
            ap = s["additionalProperties"]
            allow_add, add_schema = (ap, None) if isinstance(ap, bool) else (True, ap)
            allow_uneval = allow_add
        elif "unevaluatedProperties" in s:
            up = s["unevaluatedProperties"]
            allow_uneval, uneval_schema = (up, None) if isinstance(up, bool) else (True, up)
        elif self.strict:
            allow_uneval = False
        if allow_add and add_schema is not None:
            return add_schema, _ptr(path, "additionalProperties")
        if allow_uneval and uneval_schema is not None:
            return uneval_schema, _ptr(path, "unevaluatedProperties")
        return (True if allow_add or allow_uneval else None), _ptr(path, "additionalProperties")

    def _members(
        self, names: list[str], pats: list[int], required: set[str], addl: int | None
    ) -> int:
        """Named properties in order (optional ones skippable), then additional ones."""
        a, n = self.a, len(pats)
        tails = [EPS] * n
        if addl is not None:
            tails[-1] = a.star(a.seq(self.comma, addl))
        for i in range(n - 2, -1, -1):
            with_next = a.seqs([self.comma, pats[i + 1], tails[i + 1]])
            tails[i] = with_next if names[i + 1] in required else a.alt([tails[i + 1], with_next])
        choices = []
        for i in range(n):
            choices.append(a.seq(pats[i], tails[i]))
            if names[i] in required:
                break
        if addl is not None and not required:
            choices.append(a.seq(addl, tails[-1]))
        return a.seqs([self.ws, a.alt(choices), self.ws])

    def _other_key(self, names: list[str], path: str) -> int:
        """A key other than the literal spelling of ``names`` (xgrammar's key trie)."""
        if not names:
            return self.string
        for k in names:
            if not all(0x20 <= ord(c) <= 0x7E and c not in '"\\' for c in k):
                why = "beside a property name not plain printable ASCII (xgrammar's trie is bytes)"
                raise _refuse("additionalProperties", path, why)
        trie: dict[str, Any] = {}
        for k in names:
            node = trie
            for ch in k:
                node = node.setdefault(ch, {})
            node[""] = {}  # a name ends here
        return self.a.seq(self.a.lit('"'), self._trie(trie))

    def _trie(self, node: dict[str, Any]) -> int:
        a = self.a
        kids = [ch for ch in node if ch]
        choices = [] if "" in node else [a.lit('"')]
        other = a.cls([*_JSON_UNSAFE, *((ord(ch), ord(ch)) for ch in kids)], neg=True)
        choices.append(a.seq(other, self.string_sub))
        choices.append(a.seqs([a.lit("\\"), self.escape, self.string_sub]))
        choices += [a.seq(a.lit(ch), self._trie(node[ch])) for ch in kids]
        return a.alt(choices)

    # -- arrays -----------------------------------------------------------------------------------

    def _array(self, s: dict[str, Any], path: str) -> int:
        a, ws = self.a, self.ws
        for kw in ("additionalItems", "contains", "minContains", "maxContains"):
            if kw in s:
                raise _refuse(kw, path, "not modelled")
        if s.get("uniqueItems", False) is not False:
            raise _refuse("uniqueItems", path, "xgrammar ignores it")
        prefix = s.get("prefixItems", [])
        if not isinstance(prefix, list) or not all(isinstance(p, dict) for p in prefix):
            raise _refuse("prefixItems", path, "xgrammar takes only an array of object schemas")
        extra, extra_path = self._items(s, path)
        lo, hi = self._counts(s, path, len(prefix), extra is not None)
        items = [self.create(p, _ptr(path, "prefixItems", i)) for i, p in enumerate(prefix)]
        add = self.create(extra, extra_path) if extra is not None else None
        try:
            if items:
                body = self._positional(items, add, lo, hi)
                return a.seqs([a.lit("["), ws, body, ws, a.lit("]")])
            if add is None or hi == 0:
                return self.empty_array
            more = a.repeat(a.seq(self.comma, add), max(lo - 1, 0), None if hi is None else hi - 1)
            full = a.seqs([a.lit("["), ws, add, more, ws, a.lit("]")])
            return full if lo else a.alt([full, self.empty_array])
        except Unsupported as e:
            raise _refuse("maxItems" if "maxItems" in s else "minItems", path, str(e)) from None

    def _positional(self, items: list[int], add: int | None, lo: int, hi: int | None) -> int:
        """prefixItems: the first min(lo, n) items, then each next one optional in turn, then
        additional items only after the whole prefix."""
        a, n = self.a, len(items)
        mandatory = min(lo, n)
        head: list[int] = []
        for i in range(mandatory):
            head += [self.comma, items[i]] if i else [items[i]]
        suffix = EPS
        if add is not None:
            suffix = a.repeat(
                a.seq(self.comma, add), max(0, lo - n), None if hi is None else hi - n
            )
        for k in range(n - 1, max(mandatory, 1) - 1, -1):
            suffix = a.opt(a.seqs([self.comma, items[k], suffix]))
        if mandatory == 0:
            suffix = a.opt(a.seq(items[0], suffix))
        return a.seqs([*head, suffix])

    def _items(self, s: dict[str, Any], path: str) -> tuple[Any, str]:
        for kw in ("items", "unevaluatedItems"):
            if kw in s:
                v = s[kw]
                if not isinstance(v, (bool, dict)):
                    raise _refuse(kw, path, f"{kw} must be a boolean or an object")
                return (None if v is False else v), _ptr(path, kw)
        return (None if self.strict else True), _ptr(path, "items")

    def _counts(self, s: dict[str, Any], path: str, n: int, extra: bool) -> tuple[int, int | None]:
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        if not _is_int(lo) or lo > _INT32_MAX:
            raise _refuse("minItems", path, "minItems must be a 32-bit integer")
        lo = max(0, lo)
        if hi is not None and (not _is_int(hi) or hi < 0):
            raise _refuse("maxItems", path, "maxItems must be a non-negative integer")
        if hi is not None and hi > _INT32_MAX:
            hi = None  # xgrammar: unbounded
        if hi is not None and lo > hi:
            raise _refuse("minItems", path, "minItems is greater than maxItems")
        if hi is not None and hi < n:
            raise _refuse("maxItems", path, "maxItems is less than the number of prefixItems")
        if not extra and n < lo:
            raise _refuse("minItems", path, "more items than prefixItems, and no others allowed")
        return lo, hi
