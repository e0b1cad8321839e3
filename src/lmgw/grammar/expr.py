"""Grammars as hash-consed expressions, with Brzozowski derivatives (sans-IO).

Why derivatives: to continue a constrained answer on another worker, the gateway needs the
constraint *that the rest of the answer must meet* given the text the client already has. For
a grammar G and a prefix w, that is the derivative D_w(G) = {s : w + s in G}; taking it one
character at a time over an expression is a few dictionary look-ups per character, and the
result is again an expression over G's own rules, so it prints back as a grammar an engine
compiles (:mod:`.gbnf`).

Expressions live in an :class:`Arena` as small tuples of ints and strings, interned, so two
equal expressions are one int: memo tables key on ints (O(1) hashing however deep the
expression is) and simplification compares ints. Node kinds:

``eps`` (the empty string), ``fail`` (no string), ``lit`` (a non-empty literal), ``cls`` (one
character of a set of code point ranges, possibly negated), ``seq`` (a then b), ``alt`` (any of
a sorted tuple of alternatives), ``star`` (zero or more), ``ref`` (a rule by name).

Rules may be recursive but not left-recursive at a point where a derivative unfolds them
(:class:`Unsupported`); grammars from JSON schemas and regexes never are.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["EPS", "FAIL", "Arena", "Grammar", "Unsupported", "children"]

EPS = 0
FAIL = 1

Node = tuple  # ("eps",) | ("fail",) | ("lit", str) | ("cls", ranges, neg) | ("seq", a, b) | ...
Ranges = tuple[tuple[int, int], ...]

MAX_REPEAT = 1000
"""Bound of ``x{m,n}`` expansions: a bigger count is refused rather than built (a bounded
repetition becomes m copies and n-m nested options)."""


class Unsupported(ValueError):
    """A grammar or constraint the gateway cannot take the derivative of (left recursion, a
    construct it does not model): the stream is not continued rather than continued wrongly."""


class Arena:
    """Interned expression nodes; every constructor simplifies (``fail`` absorbs a sequence,
    ``eps`` vanishes from one, alternatives are flattened, deduplicated and sorted)."""

    def __init__(self) -> None:
        self.nodes: list[Node] = [("eps",), ("fail",)]
        self._index: dict[Node, int] = {("eps",): EPS, ("fail",): FAIL}

    def _intern(self, node: Node) -> int:
        i = self._index.get(node)
        if i is None:
            i = self._index[node] = len(self.nodes)
            self.nodes.append(node)
        return i

    def lit(self, text: str) -> int:
        return self._intern(("lit", text)) if text else EPS

    def cls(self, ranges: Iterable[tuple[int, int]], neg: bool = False) -> int:
        merged = _merge(ranges)
        if not merged and not neg:
            return FAIL
        if not neg and len(merged) == 1 and merged[0][0] == merged[0][1]:
            return self.lit(chr(merged[0][0]))
        return self._intern(("cls", merged, neg))

    def char(self, ch: str) -> int:
        return self.lit(ch)

    def seq(self, a: int, b: int) -> int:
        if a == FAIL or b == FAIL:
            return FAIL
        if a == EPS:
            return b
        if b == EPS:
            return a
        na = self.nodes[a]
        if na[0] == "seq":  # right-associate: (x y) b == x (y b), one canonical form
            return self.seq(na[1], self.seq(na[2], b))
        if na[0] == "lit":  # "ab" "c" == "abc"
            nb = self.nodes[b]
            if nb[0] == "lit":
                return self.lit(na[1] + nb[1])
            if nb[0] == "seq" and self.nodes[nb[1]][0] == "lit":
                return self.seq(self.lit(na[1] + self.nodes[nb[1]][1]), nb[2])
        return self._intern(("seq", a, b))

    def seqs(self, parts: Sequence[int]) -> int:
        out = EPS
        for p in reversed(parts):
            out = self.seq(p, out)
        return out

    def alt(self, options: Iterable[int]) -> int:
        found: set[int] = set()
        for o in options:
            if o == FAIL:
                continue
            n = self.nodes[o]
            if n[0] == "alt":
                found.update(n[1])
            else:
                found.add(o)
        if not found:
            return FAIL
        if len(found) == 1:
            return found.pop()
        return self._intern(("alt", tuple(sorted(found))))

    def opt(self, a: int) -> int:
        return self.alt((EPS, a))

    def star(self, a: int) -> int:
        if a in (EPS, FAIL):
            return EPS
        if self.nodes[a][0] == "star":
            return a
        return self._intern(("star", a))

    def plus(self, a: int) -> int:
        return self.seq(a, self.star(a))

    def repeat(self, a: int, lo: int, hi: int | None) -> int:
        """``a{lo,hi}`` (``hi`` None: unbounded) as copies and nested options."""
        if lo < 0 or (hi is not None and hi < lo):
            raise Unsupported(f"a repetition {{{lo},{hi}}} is not a valid range")
        if lo > MAX_REPEAT or (hi is not None and hi > MAX_REPEAT):
            raise Unsupported(f"a repetition above {MAX_REPEAT} is not expanded")
        tail = self.star(a) if hi is None else EPS
        if hi is not None:
            for _ in range(hi - lo):
                tail = self.opt(self.seq(a, tail))
        return self.seq(self.seqs([a] * lo), tail)

    def ref(self, name: str) -> int:
        return self._intern(("ref", name))


def _merge(ranges: Iterable[tuple[int, int]]) -> Ranges:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if lo > hi:
            continue
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def children(node: Node) -> tuple[int, ...]:
    """The sub-expressions of a node (a ``ref`` has none: its rule is the grammar's)."""
    k = node[0]
    if k == "seq":
        return (node[1], node[2])
    if k == "alt":
        return node[1]
    if k == "star":
        return (node[1],)
    return ()


def _in(ranges: Ranges, cp: int) -> bool:
    for lo, hi in ranges:
        if cp < lo:
            return False
        if cp <= hi:
            return True
    return False


class Grammar:
    """Rules over one arena, a start rule, and the derivative machinery.

    ``rules`` maps a name to its expression; ``start`` names the rule a string must match."""

    def __init__(self, arena: Arena, rules: dict[str, int], start: str = "root") -> None:
        if start not in rules:
            raise Unsupported(f"the grammar has no rule {start!r}")
        self.arena = arena
        self.rules = rules
        self.start = start
        for name in self._refs():
            if name not in rules:
                raise Unsupported(f"the grammar uses the undefined rule {name!r}")
        self._nullable_rule = self._rule_nullability()
        self._nullable: dict[int, bool] = {}
        self._derived: dict[tuple[int, str], int] = {}
        self._unfolding: set[str] = set()

    def _refs(self) -> set[str]:
        return set(self.reached(self.rules.values(), into_rules=False))

    def reached(self, roots: Iterable[int], *, into_rules: bool = True) -> list[str]:
        """The rules the expressions ``roots`` name, in the order first met; ``into_rules``:
        and those their bodies name, transitively."""
        seen: set[int] = set()
        names: dict[str, None] = {}
        stack = list(roots)
        nodes = self.arena.nodes
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            n = nodes[i]
            if n[0] == "ref":
                if n[1] not in names:
                    names[n[1]] = None
                    if into_rules:
                        stack.append(self.rules[n[1]])
            else:
                stack += children(n)
        return list(names)

    def _rule_nullability(self) -> dict[str, bool]:
        known = dict.fromkeys(self.rules, False)
        changed = True
        while changed:
            changed = False
            memo: dict[int, bool] = {}
            for name, body in self.rules.items():
                if not known[name] and self._null(body, known, memo):
                    known[name] = changed = True
        return known

    def _null(self, i: int, rules: dict[str, bool], memo: dict[int, bool]) -> bool:
        hit = memo.get(i)
        if hit is not None:
            return hit
        n = self.arena.nodes[i]
        k = n[0]
        if k in ("eps", "star"):
            out = True
        elif k in ("fail", "lit", "cls"):
            out = False
        elif k == "seq":
            out = self._null(n[1], rules, memo) and self._null(n[2], rules, memo)
        elif k == "alt":
            out = any(self._null(o, rules, memo) for o in n[1])
        else:
            out = rules[n[1]]
        memo[i] = out
        return out

    def nullable(self, i: int) -> bool:
        """Whether expression ``i`` matches the empty string."""
        return self._null(i, self._nullable_rule, self._nullable)

    def root(self) -> int:
        return self.arena.ref(self.start)

    def derive(self, i: int, ch: str) -> int:
        """D_ch(i): what may follow ``ch`` in a string of ``i``."""
        key = (i, ch)
        hit = self._derived.get(key)
        if hit is not None:
            return hit
        a = self.arena
        n = a.nodes[i]
        k = n[0]
        if k in ("eps", "fail"):
            out = FAIL
        elif k == "lit":
            out = a.lit(n[1][1:]) if n[1][0] == ch else FAIL
        elif k == "cls":
            out = EPS if _in(n[1], ord(ch)) != n[2] else FAIL
        elif k == "seq":
            out = a.seq(self.derive(n[1], ch), n[2])
            if self.nullable(n[1]):
                out = a.alt((out, self.derive(n[2], ch)))
        elif k == "alt":
            out = a.alt([self.derive(o, ch) for o in n[1]])
        elif k == "star":
            out = a.seq(self.derive(n[1], ch), i)
        else:
            name = n[1]
            if name in self._unfolding:
                raise Unsupported(f"rule {name!r} is left-recursive")
            self._unfolding.add(name)
            try:
                out = self.derive(self.rules[name], ch)
            finally:
                self._unfolding.discard(name)
        self._derived[key] = out
        return out

    def derive_text(self, i: int, text: str) -> int:
        """D_text(i); FAIL as soon as no string of ``i`` starts with ``text``."""
        for ch in text:
            i = self.derive(i, ch)
            if i == FAIL:
                return FAIL
        return i

    def accepts(self, text: str, i: int | None = None) -> bool:
        """Whether ``text`` is a whole string of expression ``i`` (default: the start rule)."""
        return self.nullable(self.derive_text(self.root() if i is None else i, text))
