"""Grammar-constrained output for the mock model (sans-IO): a string of a GBNF grammar's
language, as a real vLLM worker's constrained decoding would produce it.

Why: the gateway continues a broken constrained stream on another worker by sending a GBNF
grammar, the derivative of the original constraint by the text already streamed (a tail that
typically starts mid-JSON, ``root ::= [^"\\\\]* "\\"" ws ":" ...``). The simulator must answer
such a request with text the grammar accepts, so a test can check that the stitched answer
meets the client's constraint.

How: the grammar is parsed with :func:`lmgw.grammar.gbnf.parse`, and every expression of its
arena gets a cost, the (length, rule expansions) of its cheapest finishing string: a fixpoint
over the rules, unproductive rules (no finite string) at infinity. Generation then walks the
expressions with an explicit stack (no Python recursion, however long a sequence or deep a
nesting): below a depth and length budget it draws alternatives and repetition counts (0-3,
biased small) from ``rng``; past it, and whenever an option would overrun the length budget,
it takes a cheapest alternative and no repetitions. Following cheapest choices strictly
lowers the pending rule expansions, so generation always terminates, and the text stays under
the budget (:data:`SHORT_LENGTH` for a ``short`` draw, :data:`MAX_LENGTH` otherwise) unless
the grammar's shortest string is longer.

Characters: a repeated character (``[^"\\\\]*``, a JSON string's ``char*``) is filled with
the model's ``words`` where the grammar allows their letters, so string contents read like the
model's text; a repeated whitespace character is mostly nothing, else one space (compact JSON);
a lone class prefers a letter of those words, then printable ASCII, then any code point it
allows.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from lmgw.grammar.expr import Grammar, Unsupported
from lmgw.grammar.gbnf import parse

from .structured import Unsimulated

__all__ = ["MAX_LENGTH", "SHORT_LENGTH", "grammar_text"]

MAX_LENGTH = 1000
"""Length budget: no option or repetition that would take the text past it is drawn."""
SHORT_LENGTH = 240
"""The length budget of a ``short`` draw (the tail of an answer)."""
_MAX_DEPTH = {True: 6, False: 12}
"""Rule-expansion depth past which only cheapest choices are made (``short``: a tail)."""
_STAR_WEIGHTS = {True: (5, 3, 1, 0), False: (3, 3, 2, 1)}
"""Weights of 0, 1, 2, 3 repetitions of a ``*`` below the budget."""
_CHEAP = {True: 0.5, False: 0.2}
"""Probability at depth 0 of taking a cheapest alternative; it rises to 1 at the depth limit."""
_WORDS = {True: (1, 2), False: (1, 3)}
"""How many words fill a repeated character."""
_PRINTABLE = tuple(chr(c) for c in range(0x20, 0x7F))
_INF = (math.inf, math.inf)

Cost = tuple[float, float]  # (min length, rule expansions of that cheapest derivation)


def grammar_text(text: str, rng: random.Random, words: Sequence[str], *, short: bool = True) -> str:
    """A string of the GBNF grammar ``text``'s language, a pure function of ``text`` and
    ``rng``'s state (``words``: the model's output words, for the contents of strings).

    ``short`` (the default) draws close to a cheapest completion, as befits the tail of an
    answer the gateway continues; ``short=False`` draws a fuller answer (more repetitions,
    alternatives taken uniformly near the top).

    Raises:
        Unsimulated: a grammar the parser refuses (its message), or one with no finite string.
    """
    try:
        g = parse(text)
    except Unsupported as exc:
        raise Unsimulated(f"the simulator cannot parse the grammar: {exc}") from None
    except RecursionError:
        raise Unsimulated("the simulator cannot parse the grammar: nested too deeply") from None
    return _Generator(g, rng, words, short).run()


def _costs(g: Grammar) -> tuple[list[Cost], dict[str, Cost]]:
    """The cost of every arena node and rule: a fixpoint from infinity. Children are interned
    before their parents, so one pass in id order sees every child's cost of this round."""
    nodes = g.arena.nodes
    rules: dict[str, Cost] = dict.fromkeys(g.rules, _INF)
    while True:
        cost: list[Cost] = []
        for n in nodes:
            k = n[0]
            if k == "eps" or k == "star":
                c: Cost = (0, 0)
            elif k == "fail":
                c = _INF
            elif k == "lit":
                c = (len(n[1]), 0)
            elif k == "cls":
                c = (1, 0) if _any_char(n[1], n[2]) is not None else _INF
            elif k == "seq":
                a, b = cost[n[1]], cost[n[2]]
                c = (a[0] + b[0], a[1] + b[1])
            elif k == "alt":
                c = min(cost[o] for o in n[1])
            else:  # ref
                r = rules[n[1]]
                c = (r[0], r[1] + 1)
            cost.append(c)
        changed = False
        for name, body in g.rules.items():
            if cost[body] < rules[name]:
                rules[name] = cost[body]
                changed = True
        if not changed:
            return cost, rules


def _any_char(ranges: tuple[tuple[int, int], ...], neg: bool) -> int | None:
    """Some code point of the class (outside the surrogates where it can), or None."""
    if not neg:
        for lo, hi in ranges:
            for cp in (lo, hi):
                if not 0xD800 <= cp <= 0xDFFF:
                    return cp
            if lo < 0xD800 and hi > 0xDFFF:
                return 0xE000
        return ranges[0][0] if ranges else None
    cp = 0
    for lo, hi in ranges:  # sorted and merged: the first gap
        if cp < lo:
            return cp
        cp = max(cp, hi + 1)
    return cp if cp <= 0x10FFFF else None


def _in(ranges: tuple[tuple[int, int], ...], cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


class _Generator:
    def __init__(self, g: Grammar, rng: random.Random, words: Sequence[str], short: bool) -> None:
        self.g = g
        self.nodes = g.arena.nodes
        self.rng = rng
        self.words = [w for w in words if w] or ["text"]
        self.short = short
        self.max_depth = _MAX_DEPTH[short]
        self.max_length = SHORT_LENGTH if short else MAX_LENGTH
        self.cost, self.rule_cost = _costs(g)
        self.out: list[str] = []
        self.length = 0  # characters in out
        self.pending = 0  # minimum length of what the stack still has to produce
        self._printable: dict[int, tuple[str, ...]] = {}
        self._takes: dict[tuple[int, str], bool] = {}

    def run(self) -> str:
        root = self.g.rules[self.g.start]
        if self.cost[root][0] == math.inf:
            raise Unsimulated(
                f"the grammar's rule {self.g.start!r} has no finite string to generate"
            )
        nodes, cost = self.nodes, self.cost
        stack: list[tuple[int, int]] = [(root, 0)]  # (node, rule depth), top last
        self.pending = int(cost[root][0])
        while stack:
            i, depth = stack.pop()
            self.pending -= int(cost[i][0])
            n = nodes[i]
            k = n[0]
            if k == "lit":
                self._emit(n[1])
            elif k == "cls":
                self._emit(self._class_char(i, n[1], n[2]))
            elif k == "seq":
                a, b = n[1], n[2]
                if nodes[b][0] == "star" and nodes[b][1] == a and self._free(depth):
                    # x+ (x x*): one or more repeated characters, filled with words
                    filled = self._fill(a, need=1)
                    if filled is not None:
                        self._emit(filled)
                        continue
                self._push(stack, b, depth)
                self._push(stack, a, depth)
            elif k == "alt":
                self._push(stack, self._choose(n[1], cost[i], depth), depth)
            elif k == "star":
                self._star(stack, n[1], depth)
            elif k == "ref":
                self._push(stack, self.g.rules[n[1]], depth + 1)
            # eps: nothing; fail is never pushed (its cost is infinite)
        return "".join(self.out)

    # -- budget ------------------------------------------------------------------------------

    def _push(self, stack: list[tuple[int, int]], i: int, depth: int) -> None:
        self.pending += int(self.cost[i][0])
        stack.append((i, depth))

    def _emit(self, s: str) -> None:
        self.out.append(s)
        self.length += len(s)

    def _fits(self, extra: float) -> bool:
        return self.length + self.pending + extra <= self.max_length

    def _free(self, depth: int) -> bool:
        """Whether choices may be drawn at all here (below the depth and length budgets)."""
        return depth < self.max_depth and self._fits(0)

    # -- choices -----------------------------------------------------------------------------

    def _choose(self, options: tuple[int, ...], best: Cost, depth: int) -> int:
        cost, rng = self.cost, self.rng
        cheapest = [o for o in options if cost[o] == best]
        if self._free(depth):
            base = _CHEAP[self.short]
            p_cheap = base + (1 - base) * depth / self.max_depth
            if rng.random() >= p_cheap:
                extra = [o for o in options if cost[o] != best and self._fits(cost[o][0] - best[0])]
                if extra:
                    return extra[rng.randrange(len(extra))]
        return cheapest[rng.randrange(len(cheapest))]

    def _star(self, stack: list[tuple[int, int]], child: int, depth: int) -> None:
        size = self.cost[child][0]
        if size == math.inf or not self._free(depth):
            return
        rng = self.rng
        filled = self._fill(child, need=0)
        if filled is not None:
            self._emit(filled)
            return
        if self._takes_char(child, " "):  # whitespace: mostly none, else one space
            if rng.random() < 0.25 and self._fits(1):
                self._emit(" ")
            return
        weights = _STAR_WEIGHTS[self.short]
        count = rng.choices(range(len(weights)), weights)[0]
        while count and not self._fits(count * size):
            count -= 1
        for _ in range(count):
            self._push(stack, child, depth)

    def _fill(self, child: int, need: int) -> str | None:
        """Words for ``child*`` (``need``: the fewest characters) where ``child`` is one
        character of their letters, else None (the repetition is drawn as usual: whitespace,
        digits). Mostly but not always words: an empty string stays possible."""
        rng = self.rng
        lo, hi = _WORDS[self.short]
        picked = [self.words[rng.randrange(len(self.words))] for _ in range(rng.randint(lo, hi))]
        sep = " " if self._takes_char(child, " ") else ""
        text = "".join(ch for ch in sep.join(picked) if self._takes_char(child, ch)).strip(sep)
        if not text.strip():
            return None
        if need == 0 and rng.random() < 0.1:
            return ""
        while len(text) > need and not self._fits(len(text)):
            text = text[: max(need, len(text) // 2)]
        return text if len(text) >= need and self._fits(len(text)) else None

    def _takes_char(self, i: int, ch: str) -> bool:
        """Whether ``ch`` alone is a string of expression ``i``."""
        key = (i, ch)
        hit = self._takes.get(key)
        if hit is None:
            try:
                hit = self.g.accepts(ch, i)
            except (Unsupported, RecursionError):
                hit = False
            self._takes[key] = hit
        return hit

    def _class_char(self, i: int, ranges: tuple[tuple[int, int], ...], neg: bool) -> str:
        pool = self._printable.get(i)
        if pool is None:
            pool = self._printable[i] = tuple(c for c in _PRINTABLE if _in(ranges, ord(c)) != neg)
        rng = self.rng
        if pool:
            word = self.words[rng.randrange(len(self.words))]
            ch = word[rng.randrange(len(word))]
            if ch in pool and rng.random() < 0.7:
                return ch
            return pool[rng.randrange(len(pool))]
        cp = _any_char(ranges, neg)
        assert cp is not None  # an empty class costs infinity and is never drawn
        return chr(cp)
