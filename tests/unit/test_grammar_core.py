"""Grammar expressions, derivatives, GBNF and regexes (lmgw.grammar), checked against Python's
own regex engine as the independent reference."""

from __future__ import annotations

import pytest
import regex
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from lmgw.grammar import gbnf
from lmgw.grammar.expr import EPS, FAIL, Arena, Grammar, Unsupported
from lmgw.grammar.regex import regex_expr

ALPHABET = 'ab-"\\é\n'

# -- a strategy for regexes over a small alphabet (Python syntax) --------------------------------

_atoms = st.sampled_from(["a", "b", "-", "é", r"\"", r"\\", "[ab]", "[^a]", r"\d", ".", "[a-c]",
                          r"\n", "[-é]"])  # fmt: skip


def _regexes() -> st.SearchStrategy[str]:
    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map(lambda p: f"(?:{p[0]}|{p[1]})"),
            inner.map(lambda r: f"(?:{r})*"),
            inner.map(lambda r: f"(?:{r})+"),
            inner.map(lambda r: f"(?:{r})?"),
            st.tuples(inner, st.integers(0, 3), st.integers(0, 2)).map(
                lambda p: f"(?:{p[0]}){{{p[1]},{p[1] + p[2]}}}"
            ),
        )

    return st.recursive(_atoms, extend, max_leaves=8)


_texts = st.text(alphabet=ALPHABET + "0c", max_size=8)


def fullmatch(pattern: str, text: str) -> bool:
    """Python's answer, from the ``regex`` module (the same backtracking semantics as ``re``
    for these patterns) with a time limit: nested quantifiers can make a backtracking engine
    exponential (``re`` once ran for minutes on a generated pattern), and such an example
    says nothing about the grammar, so it is dropped."""
    try:
        return regex.fullmatch(pattern, text, timeout=0.5) is not None
    except TimeoutError:
        reject()


def _grammar(pattern: str) -> Grammar:
    a = Arena()
    return Grammar(a, {"root": regex_expr(pattern, a)})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_regexes(), _texts)
def test_a_regex_grammar_accepts_what_python_matches(pattern: str, text: str) -> None:
    g = _grammar(pattern)
    assert g.accepts(text) == fullmatch(pattern, text), (pattern, text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_regexes(), _texts, _texts)
def test_the_derivative_by_a_prefix_accepts_exactly_the_rests(
    pattern: str, prefix: str, rest: str
) -> None:
    g = _grammar(pattern)
    d = g.derive_text(g.root(), prefix)
    whole = fullmatch(pattern, prefix + rest)
    assert g.accepts(rest, d) == whole
    if d == FAIL:  # no string of the language starts with the prefix
        assert not any(fullmatch(pattern, prefix + s) for s in ("", "a", "b", "ab", "-"))
        return
    # printed as GBNF and parsed back: the same language
    printed = gbnf.render(g, d)
    assert gbnf.parse(printed).accepts(rest) == whole, printed


def test_gbnf_parses_rules_classes_repetition_and_comments() -> None:
    g = gbnf.parse(
        r"""
        # a list of numbers
        root ::= "[" ws (num (ws "," ws num)*)? ws "]"
        num  ::= "-"? ([0-9] | [1-9] [0-9]+) ("." [0-9]{1,3})?
        ws   ::= [ \t\n]*   # whitespace
        """
    )
    assert g.accepts("[1, -20,3.125]")
    assert g.accepts("[ ]")
    assert not g.accepts("[1,]")
    assert not g.accepts("[1.2345]")
    assert not g.accepts("[01]")


def test_gbnf_escapes_and_any_character() -> None:
    g = gbnf.parse(r'root ::= "\x41\u00e9\"" [^\]\\] . "\n"')
    assert g.accepts('Aé"x\u4e16\n')
    assert not g.accepts('Aé"]\u4e16\n')
    assert not g.accepts('Aé"\\x\n')


def test_rendering_renames_a_clashing_root_and_shares_subterms() -> None:
    g = gbnf.parse('root ::= "(" root ")" | "x"')
    d = g.derive_text(g.root(), "((")
    text = gbnf.render(g, d)
    back = gbnf.parse(text)
    assert back.accepts("x))") and back.accepts("(x)))")
    assert not back.accepts("x)") and not back.accepts("x)))")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('root ::= root "a" | "b"', "left-recursive"),
        ("root ::= other", "undefined rule"),
        ('start: "a"', "Lark"),
        ('root ::= "a" (= "b")', "lookahead"),
        ('root ::= "a', "unterminated"),
        ("root ::= [z-a]", "backwards"),
        ('root ::= "a"{2000}', "above"),
    ],
)
def test_grammars_it_cannot_continue_are_refused_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(Unsupported, match=why):
        g = gbnf.parse(text)
        g.derive_text(g.root(), "b")


@pytest.mark.parametrize(
    "pattern", [r"(a)\1", r"a(?=b)", r"(?i)ab", r"a$b", r"(?>a)", r"[\Da]"]
)  # fmt: skip
def test_regex_constructs_it_cannot_continue_are_refused(pattern: str) -> None:
    with pytest.raises(Unsupported):
        _grammar(pattern)


def test_anchors_at_the_ends_are_allowed() -> None:
    assert _grammar(r"^\d+$").accepts("42")


def test_interning_makes_equal_expressions_one_node() -> None:
    a = Arena()
    x = a.seq(a.lit("ab"), a.star(a.cls([(48, 57)])))
    y = a.seq(a.lit("a"), a.seq(a.lit("b"), a.star(a.cls([(48, 57)]))))
    assert x == y
    assert a.alt([x, FAIL, y]) == x
    assert a.seq(EPS, x) == x and a.seq(x, FAIL) == FAIL


def test_a_long_prefix_derives_in_bounded_space() -> None:
    g = gbnf.parse(r'root ::= "[" ("1" ("," "1")*)? "]"')
    prefix = "[" + ",".join("1" * 1 for _ in range(5000))
    before = len(g.arena.nodes)
    d = g.derive_text(g.root(), prefix)
    assert g.accepts("]", d)
    assert len(g.arena.nodes) - before < 50  # the derivative reaches a fixed point
