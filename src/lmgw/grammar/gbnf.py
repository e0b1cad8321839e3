"""GBNF, the EBNF dialect of llama.cpp and xgrammar (vLLM's default structured-output backend,
and SGLang's ``ebnf``): parse a grammar into an :class:`~.expr.Grammar` and print an
expression back (sans-IO).

Why both directions: a client's own ``grammar`` constraint is parsed to continue it elsewhere,
and every continuation (whatever its first form: schema, regex, choice, grammar) goes to the
next worker as a GBNF grammar, the one form every vLLM backend and SGLang compile.

Supported: ``name ::= expr`` rules (a rule runs until the next ``name ::=``), ``"..."``
literals, ``[...]``/``[^...]`` classes with ranges, ``.``, grouping, ``|``, ``*``, ``+``,
``?``, ``{m}``, ``{m,}``, ``{m,n}``, ``#`` comments, and the escapes ``\\n \\r \\t \\\\ \\"
\\xHH \\uHHHH \\UHHHHHHHH``. xgrammar's lookahead assertions ``(= ...)`` and Lark grammars
are refused (:class:`~.expr.Unsupported`).
"""

from __future__ import annotations

import re

from .expr import EPS, FAIL, Arena, Grammar, Unsupported, children

__all__ = ["parse", "render"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_RULE_START = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*[ \t]*::=")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "'": "'", "[": "[",
            "]": "]", "-": "-", "^": "^", "/": "/", "0": "\0"}  # fmt: skip
_HEX = {"x": 2, "u": 4, "U": 8}


class _Parser:
    def __init__(self, text: str, arena: Arena) -> None:
        self.s = text
        self.i = 0
        self.a = arena

    def error(self, why: str) -> Unsupported:
        line = self.s.count("\n", 0, self.i) + 1
        return Unsupported(f"grammar line {line}: {why}")

    def skip(self, newlines: bool = True) -> None:
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c == "#":
                end = s.find("\n", self.i)
                self.i = len(s) if end < 0 else end
            elif c in " \t\r" or (newlines and c == "\n"):
                self.i += 1
            else:
                return

    def rules(self) -> dict[str, int]:
        rules: dict[str, int] = {}
        while True:
            self.skip()
            if self.i >= len(self.s):
                return rules
            m = _RULE_START.match(self.s, self.i)
            if m is None:
                raise self.error("expected 'name ::='")
            name = _NAME.match(self.s, self.i).group()  # type: ignore[union-attr]
            if name in rules:
                raise self.error(f"rule {name!r} is defined twice")
            self.i = m.end()
            rules[name] = self.alternatives()

    def alternatives(self) -> int:
        options = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.sequence())
        return self.a.alt(options)

    def peek(self) -> str:
        self.skip()
        return self.s[self.i] if self.i < len(self.s) else ""

    def sequence(self) -> int:
        parts: list[int] = []
        while True:
            self.skip()
            if self.i >= len(self.s) or self.s[self.i] in "|)" or _RULE_START.match(self.s, self.i):
                return self.a.seqs(parts)
            parts.append(self.postfix(self.atom()))

    def atom(self) -> int:
        s, a = self.s, self.a
        c = s[self.i]
        if c == '"':
            self.i += 1
            out: list[str] = []
            while True:
                if self.i >= len(s):
                    raise self.error("unterminated string")
                c = s[self.i]
                if c == '"':
                    self.i += 1
                    return a.lit("".join(out))
                out.append(self.char())
        if c == "[":
            return self.char_class()
        if c == "(":
            self.i += 1
            if s.startswith("=", self.i) or s.startswith("?", self.i):
                raise self.error("lookahead assertions are not supported")
            inner = self.alternatives()
            if self.peek() != ")":
                raise self.error("expected ')'")
            self.i += 1
            return inner
        if c == ".":
            self.i += 1
            return a.cls((), neg=True)
        m = _NAME.match(s, self.i)
        if m is None:
            raise self.error(f"unexpected {c!r}")
        self.i = m.end()
        return a.ref(m.group())

    def char(self) -> str:
        s = self.s
        c = s[self.i]
        if c != "\\":
            self.i += 1
            return c
        if self.i + 1 >= len(s):
            raise self.error("a lone backslash")
        e = s[self.i + 1]
        if e in _HEX:
            digits = s[self.i + 2 : self.i + 2 + _HEX[e]]
            if len(digits) != _HEX[e] or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"bad \\{e} escape")
            self.i += 2 + _HEX[e]
            cp = int(digits, 16)
            if cp > 0x10FFFF:
                raise self.error("escape beyond Unicode")
            return chr(cp)
        if e not in _ESCAPES:
            raise self.error(f"unknown escape \\{e}")
        self.i += 2
        return _ESCAPES[e]

    def char_class(self) -> int:
        s = self.s
        self.i += 1
        neg = s.startswith("^", self.i)
        if neg:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        while True:
            if self.i >= len(s):
                raise self.error("unterminated character class")
            if s[self.i] == "]":
                self.i += 1
                return self.a.cls(ranges, neg)
            lo = ord(self.char())
            hi = lo
            if s.startswith("-", self.i) and not s.startswith("-]", self.i):
                self.i += 1
                hi = ord(self.char())
                if hi < lo:
                    raise self.error("a range runs backwards")
            ranges.append((lo, hi))

    def postfix(self, x: int) -> int:
        s, a = self.s, self.a
        while True:
            self.skip(newlines=False)
            c = s[self.i] if self.i < len(s) else ""
            if c == "*":
                x = a.star(x)
            elif c == "+":
                x = a.plus(x)
            elif c == "?":
                x = a.opt(x)
            elif c == "{":
                m = re.compile(r"\{\s*(\d+)\s*(,\s*(\d*)\s*)?\}").match(s, self.i)
                if m is None:
                    raise self.error("bad repetition")
                lo = int(m.group(1))
                hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
                self.i = m.end() - 1
                x = a.repeat(x, lo, hi)
            else:
                return x
            self.i += 1


def parse(text: str, arena: Arena | None = None, start: str = "root") -> Grammar:
    """A GBNF grammar; raises :class:`~.expr.Unsupported` with the line of what it refuses."""
    if re.search(r"^\s*\??[A-Za-z_][\w.]*\s*:(?!:=)", text, re.M) and "::=" not in text:
        raise Unsupported("a Lark grammar (use GBNF, 'name ::= ...') cannot be continued")
    arena = arena or Arena()
    return Grammar(arena, _Parser(text, arena).rules(), start)


# ------------------------------------------------------------------------------------------------
# printing
# ------------------------------------------------------------------------------------------------


def _lit_char(ch: str, in_class: bool) -> str:
    cp = ord(ch)
    if ch == "\\":
        return "\\\\"
    if not in_class and ch == '"':
        return '\\"'
    if in_class and ch in "]-^[":
        return "\\" + ch
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    if 0x20 <= cp < 0x7F:
        return ch
    if cp <= 0xFF:
        return f"\\x{cp:02X}"
    if cp <= 0xFFFF:
        return f"\\u{cp:04X}"
    return f"\\U{cp:08X}"


class _Printer:
    def __init__(self, g: Grammar, names: dict[str, str]) -> None:
        self.g = g
        self.nodes = g.arena.nodes
        self.names = names  # original rule -> printed name
        self.shared: dict[int, str] = {}

    def count(self, root: int) -> None:
        """Name every compound node reached twice (printed once, as a rule of its own)."""
        seen: set[int] = set()
        stack = [root]
        while stack:
            i = stack.pop()
            n = self.nodes[i]
            if i in seen:
                if n[0] in ("seq", "alt", "star") and i not in self.shared:
                    self.shared[i] = f"s{len(self.shared)}"
                continue
            seen.add(i)
            stack += children(n)

    def expr(self, i: int, prec: int = 0, top: bool = False) -> str:
        """``prec``: 0 alternatives allowed bare, 1 inside a sequence, 2 under a postfix."""
        if not top and i in self.shared:
            return self.shared[i]
        n = self.nodes[i]
        k = n[0]
        if k == "eps":
            return '""'
        if k == "fail":
            return "[^\\x00-\\U0010FFFF]"  # a class no character is in
        if k == "lit":
            body = '"' + "".join(_lit_char(c, False) for c in n[1]) + '"'
            return body
        if k == "cls":
            inner = "".join(
                _lit_char(chr(lo), True) + ("" if lo == hi else "-" + _lit_char(chr(hi), True))
                for lo, hi in n[1]
            )
            if n[2] and not inner:
                return "[\\x00-\\U0010FFFF]"  # any character
            return "[" + ("^" if n[2] else "") + inner + "]"
        if k == "ref":
            return self.names[n[1]]
        if k == "star":
            return self.expr(n[1], 2) + "*"
        if k == "seq":
            parts = []
            while k == "seq":
                parts.append(self.expr(n[1], 1))
                i = n[2]
                if i in self.shared:
                    break
                n = self.nodes[i]
                k = n[0]
            parts.append(self.expr(i, 1))
            out = " ".join(parts)
            return f"({out})" if prec >= 2 else out
        options = n[1]
        if EPS in options:
            rest = [o for o in options if o != EPS]
            inner = self.expr(rest[0], 2) if len(rest) == 1 else "(" + self._alts(rest) + ")"
            return inner + "?"
        out = self._alts(options)
        return f"({out})" if prec >= 1 else out

    def _alts(self, options: tuple[int, ...] | list[int]) -> str:
        return " | ".join(self.expr(o, 1) for o in options)


def render(g: Grammar, root: int) -> str:
    """GBNF text for expression ``root`` of ``g`` as the start rule ``root``, with the rules of
    ``g`` it reaches (renamed where a name would clash) and shared subexpressions as rules."""
    if root == FAIL:
        raise Unsupported("no string can follow")
    nodes = g.arena.nodes
    reached = g.reached([root])
    taken = {"root"} | {f"s{k}" for k in range(len(nodes))}
    names: dict[str, str] = {}
    for name in sorted(reached):
        new = name if name not in taken else f"{name}_r"
        while new in taken or new in names.values():
            new += "_"
        names[name] = new
    p = _Printer(g, names)
    p.count(root)
    for name in reached:
        p.count(g.rules[name])
    lines = [f"root ::= {p.expr(root, top=True)}"]
    lines += [f"{names[r]} ::= {p.expr(g.rules[r], top=True)}" for r in sorted(reached)]
    done: set[int] = set()
    while len(done) < len(p.shared):  # shared nodes may reveal more shared nodes
        for i, nm in sorted(p.shared.items(), key=lambda kv: kv[1]):
            if i not in done:
                done.add(i)
                lines.append(f"{nm} ::= {p.expr(i, top=True)}")
    return "\n".join(lines) + "\n"
