"""A regex constraint as a grammar expression (sans-IO), so a ``regex``-constrained answer (or
a JSON schema's string ``pattern``) can be continued through :mod:`.expr`'s derivatives.

The pattern is read with Python's own parser (``re._parser``) and must match the whole output,
as vLLM's regex constraints do. Only the regular core is modelled: literals, classes (``\\d``,
``\\w``, ``\\s`` as ASCII sets, as the engines' regex compilers read them), ``.`` (not a
newline), groups, alternation and greedy or lazy repetition (laziness does not change the
language). Anchors count only at the ends; backreferences, lookarounds, atomic groups and
inline flags are refused (:class:`~.expr.Unsupported`): a continuation that ignored them
would let the answer break the constraint.
"""

from __future__ import annotations

import re
import re._constants as _c  # the parse tree's opcodes (sre_constants)
import re._parser as _sre  # Python's regex parser (sre_parse)
import warnings
from typing import Any

from .expr import Arena, Unsupported

# A client's pattern may hold "[[", "--" and kin: Python's parser warns (attributed to whoever
# called it) that their meaning may change. The pattern is the client's, and a warning per
# replay would only fill the gateway's log; the message is specific to that parser check.
warnings.filterwarnings(
    "ignore", r"Possible (nested set|set (difference|intersection|symmetric difference|union))",
    FutureWarning,
)  # fmt: skip

__all__ = ["regex_expr"]

_DIGIT = ((0x30, 0x39),)
_WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_SPACE = ((0x09, 0x0D), (0x20, 0x20))
_CATEGORIES = {
    _c.CATEGORY_DIGIT: (_DIGIT, False),
    _c.CATEGORY_NOT_DIGIT: (_DIGIT, True),
    _c.CATEGORY_WORD: (_WORD, False),
    _c.CATEGORY_NOT_WORD: (_WORD, True),
    _c.CATEGORY_SPACE: (_SPACE, False),
    _c.CATEGORY_NOT_SPACE: (_SPACE, True),
}
_EDGES = {_c.AT_BEGINNING, _c.AT_BEGINNING_STRING, _c.AT_END, _c.AT_END_STRING}
_ALLOWED_FLAGS = re.UNICODE


def regex_expr(pattern: str, arena: Arena) -> int:
    """The expression for the strings ``pattern`` matches in full."""
    try:
        parsed = _sre.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise Unsupported(f"the regex does not compile: {exc}") from None
    if parsed.state.flags & ~_ALLOWED_FLAGS:
        raise Unsupported("regex flags (case folding, dot-all, ...) cannot be continued")
    items = list(parsed)
    while items and items[0][0] is _c.AT and items[0][1] in _EDGES:
        items.pop(0)
    while items and items[-1][0] is _c.AT and items[-1][1] in _EDGES:
        items.pop()
    return _seq(items, arena)


def _seq(items: Any, a: Arena) -> int:
    return a.seqs([_item(op, av, a) for op, av in items])


def _item(op: Any, av: Any, a: Arena) -> int:
    if op is _c.LITERAL:
        return a.lit(chr(av))
    if op is _c.NOT_LITERAL:
        return a.cls(((av, av),), neg=True)
    if op is _c.ANY:
        return a.cls(((0x0A, 0x0A),), neg=True)
    if op is _c.IN:
        return _class(av, a)
    if op is _c.BRANCH:
        return a.alt([_seq(branch, a) for branch in av[1]])
    if op is _c.SUBPATTERN:
        _group, add_flags, del_flags, sub = av
        if add_flags or del_flags:
            raise Unsupported("inline regex flags cannot be continued")
        return _seq(sub, a)
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
        lo, hi, sub = av
        return a.repeat(_seq(sub, a), lo, None if hi is _c.MAXREPEAT else hi)
    if op is _c.AT:
        raise Unsupported("a regex anchor inside the pattern cannot be continued")
    raise Unsupported(f"the regex construct {str(op).lower()} cannot be continued")


def _class(items: Any, a: Arena) -> int:
    neg = False
    ranges: list[tuple[int, int]] = []
    for i, (op, av) in enumerate(items):
        if op is _c.NEGATE and i == 0:
            neg = True
        elif op is _c.LITERAL:
            ranges.append((av, av))
        elif op is _c.RANGE:
            ranges.append(av)
        elif op is _c.CATEGORY and av in _CATEGORIES:
            cat, negated = _CATEGORIES[av]
            if negated:
                if len(items) != 1:
                    raise Unsupported("a negated class escape inside [...] cannot be continued")
                return a.cls(cat, neg=True)
            ranges.extend(cat)
        else:
            raise Unsupported(f"the regex class item {str(op).lower()} cannot be continued")
    return a.cls(ranges, neg)
