"""Grammar-constrained output in the simulators (``lmgw.simulators.grammar_text``): whatever
GBNF grammar and seed, the text is a string of the grammar (``gbnf.parse(g).accepts``) and
passes an independent check where one exists: ``json.loads`` (+ ``jsonschema``) for JSON
grammars, ``re.fullmatch`` for grammars written beside an equivalent Python regex, the stitched
answer for a derivative grammar (what the gateway sends to continue a broken stream). It is a
pure function of the seed, terminates on recursive grammars, stays small, and refuses
(``Unsimulated``) a grammar it cannot parse or one with no finite string."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.grammar import gbnf
from lmgw.protocol import StructuredOutput
from lmgw.simulators.grammar_text import MAX_LENGTH, SHORT_LENGTH, grammar_text
from lmgw.simulators.structured import Unsimulated, constrained_text

WORDS = ["alpha", "beta", "gamma", "delta", "echo", "Zürich", "it's"]
FAST = settings(max_examples=60, deadline=None)
SEEDS = st.integers(0, 2**32)


def _check(text: str, seed: int, short: bool = True) -> str:
    out = grammar_text(text, random.Random(seed), WORDS, short=short)
    assert gbnf.parse(text).accepts(out), (text, out)
    assert len(out) <= MAX_LENGTH
    return out


# -- JSON grammars ---------------------------------------------------------------------------------

JSON_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws     ::= | " " | "\n" [ \t]{0,20}
"""

PET_GBNF = r"""
root   ::= "{" ws "\"name\"" ws ":" ws string "," ws "\"age\"" ws ":" ws int tags? ws "}"
tags   ::= "," ws "\"tags\"" ws ":" ws "[" ws ( string ( "," ws string )* )? ws "]"
string ::= "\"" [^"\\\x00-\x1F]* "\""
int    ::= "0" | "-"? [1-9] [0-9]{0,5}
ws     ::= [ \t\n]*
"""
PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}

# a list of numbers, nested lists, or strings without end: only depth and length budgets stop it
NESTED_GBNF = r"""
root ::= arr
arr  ::= "[" (item ("," item)*)? "]"
item ::= arr | "0" | [1-9] [0-9]* | "\"" [a-z ]* "\""
"""


@FAST
@given(SEEDS, st.booleans())
def test_json_grammar_gives_json(seed: int, short: bool) -> None:
    out = _check(JSON_GBNF, seed, short)
    assert isinstance(json.loads(out), dict)


@FAST
@given(SEEDS, st.booleans())
def test_schema_grammar_gives_valid_documents(seed: int, short: bool) -> None:
    jsonschema.validate(json.loads(_check(PET_GBNF, seed, short)), PET_SCHEMA)


@FAST
@given(SEEDS, st.booleans())
def test_recursive_grammars_terminate(seed: int, short: bool) -> None:
    assert isinstance(json.loads(_check(NESTED_GBNF, seed, short)), list)
    out = _check('root ::= arr\narr ::= "[" (arr ("," arr)*)? "]"', seed, short)
    assert json.loads(out) is not None


@FAST
@given(SEEDS, st.integers(1, 10_000))
def test_derivative_grammar_completes_the_answer(seed: int, cut: int) -> None:
    """The gateway's continuation: the original grammar derived by a streamed prefix, printed
    back as GBNF; the simulator's tail completes the prefix into an answer of the original."""
    full = grammar_text(JSON_GBNF, random.Random(seed), WORDS, short=False)
    prefix = full[: cut % (len(full) + 1)]
    g = gbnf.parse(JSON_GBNF)
    tail_gbnf = gbnf.render(g, g.derive_text(g.root(), prefix))
    tail = _check(tail_gbnf, seed + 1)
    assert g.accepts(prefix + tail)
    assert isinstance(json.loads(prefix + tail), dict)


def test_mid_string_tail_is_short_and_wordy() -> None:
    tail_gbnf = r"""root ::= [^"\\]* "\"" ws ":" ws value ("," ws member)* "}"
member ::= "\"" [^"\\]* "\"" ws ":" ws value
value ::= "\"" [^"\\]* "\"" | "0" | [1-9] [0-9]* | "true" | "false" | "null"
ws ::= [ \t\n]*
"""
    outs = [_check(tail_gbnf, seed) for seed in range(30)]
    for out in outs:
        json.loads('{"k' + out)
    assert sum(len(o) for o in outs) / len(outs) < 80  # the tail of an answer: finished quickly
    assert any(w in o for o in outs for w in WORDS)  # string contents are the model's words


# -- regex-equivalent grammars -------------------------------------------------------------------

# (GBNF, Python regex) pairs: the same language written twice
PAIRS = [
    (r'root ::= "a" [b-d]* "e"', r"a[b-d]*e"),
    (r'root ::= ("ab" | "c")+ "!"?', r"(?:ab|c)+!?"),
    (r'root ::= [0-9]{3} "-" [0-9]{2,4}', r"[0-9]{3}-[0-9]{2,4}"),
    (r'root ::= x ("." x)*' + "\n" + r"x ::= [a-z]+", r"[a-z]+(?:\.[a-z]+)*"),
    (r'root ::= "\"" [^"\\]* "\""', r'"[^"\\]*"'),
    (r"root ::= [^a-zA-Z0-9]{1,3}", r"[^a-zA-Z0-9]{1,3}"),
    (r"root ::= . .?", r"(?s:.).?"),
    (r"root ::= [\x00-\x08]+", r"[\x00-\x08]+"),  # no printable character: any it allows
    (r"root ::= [^\x00-\x7E]", r"[^\x00-\x7E]"),
    (r'root ::= "(" root ")" | "x"', r"\(*x\)*"),  # balanced, but a regex checks the shape
    (r'root ::= "ab"{400} "c"{0,150}', r"(?:ab){400}c{0,150}"),  # 800 characters at least
]


@FAST
@given(st.sampled_from(PAIRS), SEEDS, st.booleans())
def test_regex_equivalent_grammars_fullmatch(pair: tuple[str, str], seed: int, short: bool) -> None:
    text, pattern = pair
    out = _check(text, seed, short)
    assert re.fullmatch(pattern, out, re.DOTALL), (text, out)
    if pattern == r"\(*x\)*":
        assert out.count("(") == out.count(")")


_LIT = st.text(alphabet='ab-."\\ x', min_size=1, max_size=3)
_CLASSES = st.sampled_from(
    [("[a-c]", "[a-c]"), ("[^a-c]", "[^a-c]"), ("[0-9]", "[0-9]"), (".", "."),
     ('[^"\\\\]', r'[^"\\]'), ("[ \\t]", "[ \t]"), ("[a-zA-Z]", "[a-zA-Z]")]
)  # fmt: skip
_POSTFIX = st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "{0,2}", "{2,}"])


def _lit(s: str) -> tuple[str, str]:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"', re.escape(s)


def _compound(inner: st.SearchStrategy[tuple[str, str]]) -> st.SearchStrategy[tuple[str, str]]:
    def seq(xs: list[tuple[str, str]]) -> tuple[str, str]:
        return "(" + " ".join(g for g, _ in xs) + ")", "(?:" + "".join(r for _, r in xs) + ")"

    def alt(xs: list[tuple[str, str]]) -> tuple[str, str]:
        return "(" + " | ".join(g for g, _ in xs) + ")", "(?:" + "|".join(r for _, r in xs) + ")"

    return st.one_of(
        st.lists(inner, min_size=2, max_size=3).map(seq),
        st.lists(inner, min_size=2, max_size=3).map(alt),
        st.tuples(inner, _POSTFIX).map(lambda t: (f"({t[0][0]}){t[1]}", f"(?:{t[0][1]}){t[1]}")),
    )


EXPRS = st.recursive(_LIT.map(_lit) | _CLASSES, _compound, max_leaves=10)


def test_cheapest_choice_leaves_loops() -> None:
    """A loop that produces nothing costs as little as the way out: the rule expansions break
    the tie (this grammar is left-recursive, so only the regex checks it)."""
    for seed in range(50):
        out = grammar_text('root ::= a\na ::= b | "x" | a "y"\nb ::= a', random.Random(seed), WORDS)
        assert re.fullmatch("xy*", out)


@settings(max_examples=150, deadline=None)
@given(EXPRS, SEEDS, st.booleans())
def test_random_grammars_fullmatch_their_regex(
    expr: tuple[str, str], seed: int, short: bool
) -> None:
    text = f"root ::= {expr[0]}\n"
    out = _check(text, seed, short)
    assert re.fullmatch(expr[1], out, re.DOTALL), (text, expr[1], out)


# -- determinism, refusals, the constrained_text path --------------------------------------------


@FAST
@given(st.sampled_from([JSON_GBNF, PET_GBNF, NESTED_GBNF]), SEEDS, st.booleans())
def test_same_seed_same_text(text: str, seed: int, short: bool) -> None:
    a = grammar_text(text, random.Random(seed), WORDS, short=short)
    assert grammar_text(text, random.Random(seed), WORDS, short=short) == a


@pytest.mark.parametrize("short", [True, False])
def test_seeds_vary_the_text(short: bool) -> None:
    outs = {grammar_text(JSON_GBNF, random.Random(s), WORDS, short=short) for s in range(40)}
    assert len(outs) > 10
    assert max(len(o) for o in outs) <= (SHORT_LENGTH if short else MAX_LENGTH)


@pytest.mark.parametrize(
    "text",
    ['root ::= "a" root', 'root ::= x\nx ::= "(" x ")"', 'root ::= "a" [^\\x00-\\U0010FFFF]'],
)
def test_grammar_without_finite_strings_is_refused(text: str) -> None:
    with pytest.raises(Unsimulated, match="no finite string"):
        grammar_text(text, random.Random(0), WORDS)


@pytest.mark.parametrize(
    "text",
    ["root ::= 'a'", "root ::= (= \"a\") \"a\"", "root ::= undefined", "start: \"a\"",
     'other ::= "a"', 'root ::= "a'],
)  # fmt: skip
def test_unparsable_grammar_is_refused(text: str) -> None:
    with pytest.raises(Unsimulated, match="cannot parse"):
        grammar_text(text, random.Random(0), WORDS)


@FAST
@given(SEEDS)
def test_constrained_text_serves_grammars(seed: int) -> None:
    c = StructuredOutput("grammar", PET_GBNF)
    out = constrained_text(c, random.Random(seed), WORDS)
    assert out == grammar_text(PET_GBNF, random.Random(seed), WORDS)
    jsonschema.validate(json.loads(out), PET_SCHEMA)
    with pytest.raises(Unsimulated):
        constrained_text(StructuredOutput("grammar", 'root ::= "a" root'), random.Random(0), WORDS)
