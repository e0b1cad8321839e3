"""Chat templates rendered by shape: a plain conversation's prompt as fixed text around its
contents, learned once per shape and then joined.

Why: jinja renders a short chat in about 20 µs, the largest single cost of a tokenizing
gateway's request beside the encode (issue 4's ``benchmarks/zmq_vs_http.py``). Most requests
are plain conversations (roles and string contents), and most templates only *print* a
message's content: then the prompt is the same literal text around the contents for every
conversation with the same roles in the same order (and the same tools, where there are
any). So each such shape is rendered once with sentinel contents, split at the sentinels into
a format string, and later requests of that shape are one ``str.format`` call (about 1 µs).

When that is exact, and what makes it so:

* :func:`analyze` reads the template's syntax tree for every use of a message's ``content``
  (and of the names and macro parameters it is bound to). Printing it, or a transformation of
  it that is printed, needs nothing. A predicate on it needs a *guard* that fixes its outcome
  for the contents admitted: ``'</think>' in content``, ``startswith``/``endswith``/``split``/
  ``replace`` with a literal (admitted: contents without that literal), ``trim``/``strip`` (no
  whitespace, or the stripped characters, at either end), truthiness (non-empty), type tests
  (fixed by the shape). Anything else (lengths, slices, comparisons with other values,
  predicates on transformed content, ``strftime_now`` with a computed format) leaves the
  template without shapes: every request renders in full.
* Each shape is learned from two renders through the full path: sentinel contents give the
  skeleton, and rich contents (quotes, backslashes, newlines, braces, markup, non-ASCII) must
  then give exactly the skeleton filled with them; a template that transforms what it prints
  (``tojson``, ``lower``, escaping) fails that and its shape renders in full.
* One in 256 shaped renders is also rendered in full and compared
  (:class:`lmgw.text.sampled_check.SampledCheck`); a difference turns shapes off for the
  template (logged, and counted in ``lmgw_chat_template_renders_total{path="mismatch"}``).

Templates that print ``strftime_now(<literal format>)`` (Llama 3's date) get the formatted
clock in the shape key, so a new day learns a new shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2.nodes as nodes
import msgspec

from .sampled_check import SampledCheck

__all__ = ["ContentUse", "ShapeRenderer", "analyze"]

ROLES = frozenset({"system", "user", "assistant"})
"""Roles a shaped conversation may have: the ones vLLM passes through untouched."""
MAX_MESSAGES = 256
MAX_SHAPES = 1024
MAX_TOOLS_BYTES = 1 << 16
"""A request's tools are part of its shape's key up to this size (as JSON)."""

_TYPE_TESTS = frozenset(
    {
        "string", "none", "defined", "undefined", "mapping", "iterable", "sequence", "number",
        "integer", "float", "boolean", "true", "false", "callable",
    }
)  # fmt: skip
# Filters whose printed result the rich probe tells apart from the content itself.
_PRINTED_TRANSFORMS = frozenset(
    {
        "tojson", "lower", "upper", "title", "capitalize", "escape", "e", "forceescape",
        "string", "safe", "indent", "replace", "striptags", "urlencode", "trim",
    }
)  # fmt: skip
_METHOD_TRANSFORMS = frozenset({"lower", "upper", "title", "capitalize", "casefold"})
_IMPURE_GLOBALS = frozenset({"lipsum"})  # (random text)
# strftime directives that change at most once a day (a shape is learned per value)
_DAILY = frozenset("%" + c for c in "aAbBdejmuUwWyYgGVCDFx%")
_DIRECTIVE = re.compile("%-?.")
_encode_json = msgspec.json.Encoder().encode
_SENTINEL = re.compile("\ue000([0-9]+)\ue001")


class Unshaped(Exception):
    """The template uses a content in a way shapes cannot reproduce."""


@dataclass(frozen=True, slots=True)
class ContentUse:
    """What a template does with contents, as the guards a content must pass."""

    literals: tuple[str, ...] = ()
    """Texts a content must not contain (the template tests for them)."""
    strip_space: bool = False
    """No whitespace at either end (the template trims)."""
    strip_chars: str = ""
    """Nor these characters (``strip('x')``)."""
    clock_formats: tuple[str, ...] = ()
    """``strftime_now`` formats the template prints (part of the shape key)."""

    def admits(self, content: str) -> bool:
        """Whether shapes render ``content`` exactly (a non-empty string that passes every
        guard)."""
        if not content:
            return False
        if self.strip_space and (content[0].isspace() or content[-1].isspace()):
            return False
        chars = self.strip_chars
        if chars and (content[0] in chars or content[-1] in chars):
            return False
        return not any(lit in content for lit in self.literals)


# -- the analysis --------------------------------------------------------------------------------


@dataclass
class _Analysis:
    parents: dict[int, nodes.Node]
    macros: dict[str, nodes.Macro]
    content_format: str = "string"
    # names (and namespace attributes) bound to a content, or to a transformed one
    bound: set[tuple[str, str | None, bool]] = field(default_factory=set)
    message_names: set[str] = field(default_factory=set)
    list_names: set[str] = field(default_factory=lambda: {"messages"})
    literals: set[str] = field(default_factory=set)
    strip_space: bool = False
    strip_chars: set[str] = field(default_factory=set)
    pending: list[tuple[str, str | None, bool]] = field(default_factory=list)


def _walk(root: nodes.Node) -> Iterator[tuple[nodes.Node, nodes.Node]]:
    stack = [root]
    while stack:
        node = stack.pop()
        for child in node.iter_child_nodes():
            yield child, node
            stack.append(child)


def _const_str(node: nodes.Node) -> str | None:
    if isinstance(node, nodes.Const) and isinstance(node.value, str):
        return node.value
    return None


def _const_strs(node: nodes.Node) -> list[str] | None:
    """A literal string, or a literal tuple/list of them."""
    one = _const_str(node)
    if one is not None:
        return [one]
    if isinstance(node, nodes.Tuple | nodes.List):
        items = [_const_str(i) for i in node.items]
        if all(i is not None for i in items):
            return items  # type: ignore[return-value]
    return None


def _int_const(node: nodes.Node | None) -> int | None:
    """A literal int (``-1`` parses as ``Neg(Const(1))``)."""
    sign = 1
    if isinstance(node, nodes.Neg):
        node, sign = node.node, -1
    if isinstance(node, nodes.Const) and type(node.value) is int:
        return sign * node.value
    return None


def _is_content_key(node: nodes.Node) -> bool:
    """``x.content``, ``x['content']`` or ``x.get('content')``: a content itself."""
    if isinstance(node, nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, nodes.Getitem):
        return _const_str(node.arg) == "content"
    if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr):
        return (
            node.node.attr == "get"
            and len(node.args) >= 1
            and _const_str(node.args[0]) == "content"
        )
    return False


def _refers_to_list(node: nodes.Node, lists: set[str]) -> bool:
    while isinstance(node, nodes.Filter | nodes.Getitem) and node.node is not None:
        if isinstance(node, nodes.Getitem) and not isinstance(node.arg, nodes.Slice):
            return False
        node = node.node
    return isinstance(node, nodes.Name) and node.name in lists


def analyze(ast: nodes.Template, content_format: str = "string") -> ContentUse:
    """The guards under which shapes render ``ast``'s template exactly (``content_format``:
    how contents reach it, "string" or "openai": a list of text parts).

    Raises:
        Unshaped: a use of contents no guard covers.
    """
    parents: dict[int, nodes.Node] = {}
    every: list[nodes.Node] = []
    for child, parent in _walk(ast):
        parents[id(child)] = parent
        every.append(child)
    macros = {m.name: m for m in every if isinstance(m, nodes.Macro)}
    a = _Analysis(parents, macros, content_format)
    formats: list[str] = []
    for node in every:
        if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Name):
            callee = node.node.name
            if callee in _IMPURE_GLOBALS:
                raise Unshaped(f"the template calls {callee}()")
            if callee == "strftime_now":
                fmt = _const_str(node.args[0]) if len(node.args) == 1 else None
                if fmt is None or node.kwargs or node.dyn_args or node.dyn_kwargs:
                    raise Unshaped("strftime_now with a computed format")
                if {d.replace("-", "") for d in _DIRECTIVE.findall(fmt)} - _DAILY:
                    raise Unshaped(f"strftime_now({fmt!r}) changes within a day")
                formats.append(fmt)
        if isinstance(node, nodes.Const) and node.value == "content":
            parent = parents[id(node)]
            if not _is_content_key(parent):
                raise Unshaped("a content reached by name ('content' as a value)")
    _message_names(a, every)
    for node in every:
        if _is_content_key(node):
            _climb(a, node, transformed=False)
    # names bound to contents: every load of them is a use too (to a fixed point)
    while a.pending:
        name, attr, transformed = a.pending.pop()
        for node in every:
            if attr is None:
                hit = isinstance(node, nodes.Name) and node.ctx == "load" and node.name == name
            else:
                hit = (
                    isinstance(node, nodes.Getattr)
                    and node.attr == attr
                    and isinstance(node.node, nodes.Name)
                    and node.node.name == name
                )
            if hit:
                _climb(a, node, transformed=transformed)
    for node in every:  # comparing whole messages compares their contents
        if isinstance(node, nodes.Compare):
            left, ops = node.expr, node.ops
            keyed = len(ops) == 1 and ops[0].op in ("in", "notin") and _const_str(left) is not None
            if _message_like(a, left) or (
                not keyed and any(_message_like(a, op.expr) for op in ops)
            ):
                raise Unshaped("a comparison of whole messages")  # ('key' in message is fine)
        if (
            isinstance(node, nodes.Getattr)
            and node.attr in ("items", "values")
            and _message_like(a, node.node)
        ):
            raise Unshaped("a message's values iterated")
        if (
            isinstance(node, nodes.Getattr)
            and node.attr in ("index", "count")
            and _refers_to_list(node.node, a.list_names)
        ):
            raise Unshaped("a search of the messages")
    return ContentUse(
        literals=tuple(sorted(lit for lit in a.literals)),
        strip_space=a.strip_space,
        strip_chars="".join(sorted(a.strip_chars)),
        clock_formats=tuple(dict.fromkeys(formats)),
    )


def _message_names(a: _Analysis, every: list[nodes.Node]) -> None:
    """Names that hold the messages list (aliases, slices) or one message (loop targets)."""
    changed = True
    while changed:
        changed = False
        for node in every:
            if isinstance(node, nodes.Assign):
                names, source = a.list_names, node.node
            elif isinstance(node, nodes.For):
                names, source = a.message_names, node.iter
            else:
                continue
            target = node.target
            if (
                isinstance(target, nodes.Name)
                and target.name not in names
                and _refers_to_list(source, a.list_names)
            ):
                names.add(target.name)
                changed = True


def _message_like(a: _Analysis, node: nodes.Node) -> bool:
    if isinstance(node, nodes.Name):
        return node.name in a.message_names
    if isinstance(node, nodes.Getitem) and _const_str(node.arg) is None:
        return _refers_to_list(node.node, a.list_names)
    return False


def _bind(a: _Analysis, target: nodes.Node, transformed: bool) -> None:
    if isinstance(target, nodes.Name):
        key: tuple[str, str | None, bool] = (target.name, None, transformed)
    elif isinstance(target, nodes.NSRef):
        key = (target.name, target.attr, transformed)
    else:
        raise Unshaped("a content unpacked into several names")
    if key not in a.bound:
        a.bound.add(key)
        a.pending.append(key)


def _bind_macro_arg(a: _Analysis, call: nodes.Call, arg: nodes.Node, transformed: bool) -> None:
    callee = call.node
    macro = a.macros.get(callee.name) if isinstance(callee, nodes.Name) else None
    if macro is None:
        raise Unshaped("a content passed to a function")
    if arg in call.args:
        i = call.args.index(arg)
        if i >= len(macro.args):
            raise Unshaped("a content passed as a macro's varargs")
        _bind(a, macro.args[i], transformed)
        return
    raise Unshaped("a content passed to a macro in an unexpected way")


def _guard_literals(a: _Analysis, args: list[nodes.Node], what: str) -> None:
    if not args:
        raise Unshaped(f"{what} without a literal")
    lits = _const_strs(args[0])
    if not lits or not all(lits):
        raise Unshaped(f"{what} with a computed or empty argument")
    a.literals.update(lits)


def _climb(a: _Analysis, node: nodes.Node, *, transformed: bool) -> None:
    """Follow one use of a content (``node``) up to where its value ends."""
    p = a.parents.get(id(node))
    if p is None:
        raise Unshaped("a content at the template's top")
    if isinstance(p, nodes.Output):
        return
    if isinstance(p, nodes.MarkSafe | nodes.MarkSafeIfAutoescape):
        return _climb(a, p, transformed=transformed)
    if isinstance(p, nodes.Add | nodes.Concat):  # (a test of a joined text is not guarded)
        return _climb(a, p, transformed=True)
    if isinstance(p, nodes.CondExpr):
        if node is p.test:
            if transformed:
                raise Unshaped("a test of a transformed content")
            return  # truthiness: contents are non-empty
        return _climb(a, p, transformed=transformed)
    if isinstance(p, nodes.If):
        if transformed:
            raise Unshaped("a test of a transformed content")
        return
    if isinstance(p, nodes.And | nodes.Or):
        if transformed:
            raise Unshaped("a test of a transformed content")
        return _climb(a, p, transformed=False)  # its value may be the content
    if isinstance(p, nodes.Not):
        if transformed:
            raise Unshaped("a test of a transformed content")
        return
    if isinstance(p, nodes.Test):
        if node is p.node and p.name in _TYPE_TESTS and not p.args and not transformed:
            return
        raise Unshaped(f"a content under the test {p.name!r}")
    if isinstance(p, nodes.Compare | nodes.Operand):
        return _compare(a, node, p, transformed)
    if isinstance(p, nodes.Getattr) and p.node is node:
        gp = a.parents.get(id(p))
        if isinstance(gp, nodes.Call) and gp.node is p:
            return _method(a, p.attr, gp, transformed)
        if p.attr in ("text", "content"):  # a part's text (the "openai" content format)
            return _climb(a, p, transformed=transformed)
        return  # any other attribute of a content is the same for every content
    if isinstance(p, nodes.Getitem) and p.node is node:
        key = _const_str(p.arg)
        if key is None:
            if _int_const(p.arg) is not None:  # one character (or one part): printed only
                return _climb(a, p, transformed=True)
            raise Unshaped("a content sliced or indexed by a computed value")
        if key in ("text", "content"):
            return _climb(a, p, transformed=transformed)
        return
    if isinstance(p, nodes.Filter) and p.node is node:
        return _filter(a, p, transformed)
    if isinstance(p, nodes.Assign) and p.node is node:
        return _bind(a, p.target, transformed)
    if isinstance(p, nodes.For) and p.iter is node:
        if transformed or a.content_format != "openai":
            # (over a string: its characters, a loop as long as the content)
            raise Unshaped("a loop over a content's characters")
        return _bind(a, p.target, False)  # (its parts: one per string content)
    if isinstance(p, nodes.Call) and node in p.args:
        callee = p.node
        if isinstance(callee, nodes.Name) and callee.name == "raise_exception":
            return
        return _bind_macro_arg(a, p, node, transformed)
    if isinstance(p, nodes.Keyword):
        call = a.parents.get(id(p))
        macro = (
            a.macros.get(call.node.name)
            if isinstance(call, nodes.Call) and isinstance(call.node, nodes.Name)
            else None
        )
        if macro is None or p.key not in {arg.name for arg in macro.args}:
            raise Unshaped("a content passed by keyword")
        return _bind(a, nodes.Name(p.key, "store"), transformed)
    raise Unshaped(f"a content used in a {type(p).__name__}")


def _compare(a: _Analysis, node: nodes.Node, p: nodes.Node, transformed: bool) -> None:
    if transformed:
        raise Unshaped("a comparison of a transformed content")
    compare = a.parents.get(id(p)) if isinstance(p, nodes.Operand) else p
    if not isinstance(compare, nodes.Compare):
        raise Unshaped("a content in an unexpected comparison")
    operands = [compare.expr] + [op.expr for op in compare.ops]
    ops = [op.op for op in compare.ops]
    if len(ops) != 1 or ops[0] not in ("eq", "ne", "in", "notin"):
        raise Unshaped("a content ordered or chained in a comparison")
    other = operands[1] if operands[0] is node else operands[0]
    if other is node:
        raise Unshaped("a content compared with itself")
    lits = _const_strs(other)
    if lits is None:
        if isinstance(other, nodes.Const) and other.value is None:
            return  # a string is never None
        raise Unshaped("a content compared with a computed value")
    if ops[0] in ("in", "notin") and operands[0] is node and _const_str(other) is not None:
        raise Unshaped("a content looked for in a literal")  # (a substring of it)
    # ``lit in content``, ``content == lit``, ``content in [lits]``: false for every content
    # that does not contain lit (the empty literal: contents are non-empty, never equal to it)
    a.literals.update(lit for lit in lits if lit)


def _method(a: _Analysis, name: str, call: nodes.Call, transformed: bool) -> None:
    if call.kwargs or call.dyn_args or call.dyn_kwargs:
        raise Unshaped(f"content.{name}() with keyword arguments")
    args = call.args
    if name in _METHOD_TRANSFORMS and not args:
        return _climb(a, call, transformed=True)
    if transformed:
        raise Unshaped(f"content.{name}() of a transformed content")
    if name in ("strip", "lstrip", "rstrip"):
        if not args:
            a.strip_space = True
        else:
            chars = _const_str(args[0]) if len(args) == 1 else None
            if chars is None:
                raise Unshaped(f"content.{name}() with a computed argument")
            a.strip_chars.update(chars)
        return _climb(a, call, transformed=False)
    if name in ("startswith", "endswith"):
        _guard_literals(a, args, f"content.{name}()")
        return  # a bool: false for admitted contents
    if name in ("split", "rsplit"):
        _guard_literals(a, args, f"content.{name}()")
        gp = a.parents.get(id(call))
        index = gp.arg if isinstance(gp, nodes.Getitem) and gp.node is call else None
        if _int_const(index) not in (0, -1):
            raise Unshaped(f"content.{name}() used other than by [0] or [-1]")
        return _climb(a, gp, transformed=False)  # the content itself, when admitted
    if name == "replace":
        if len(args) != 2:
            raise Unshaped("content.replace() with a count")
        _guard_literals(a, args, "content.replace()")
        return _climb(a, call, transformed=False)
    if name == "get":
        key = _const_str(args[0]) if args else None
        if key is None:
            raise Unshaped("part.get() with a computed key")
        if key in ("text", "content"):
            return _climb(a, call, transformed=False)
        return
    raise Unshaped(f"content.{name}()")


def _filter(a: _Analysis, f: nodes.Filter, transformed: bool) -> None:
    name = f.name
    if f.dyn_args or f.dyn_kwargs:
        raise Unshaped(f"content | {name} with computed arguments")
    if name == "trim" and not transformed:
        if f.args or f.kwargs:
            chars = _const_str(f.args[0]) if len(f.args) == 1 and not f.kwargs else None
            if chars is None:
                raise Unshaped("content | trim with a computed argument")
            a.strip_chars.update(chars)
        else:
            a.strip_space = True
        return _climb(a, f, transformed=False)
    if name in ("default", "d") and not f.args[1:] and not f.kwargs:
        return _climb(a, f, transformed=transformed)  # a non-empty string is its own default
    if name == "replace" and not transformed and len(f.args) == 2 and not f.kwargs:
        _guard_literals(a, f.args, "content | replace")
        return _climb(a, f, transformed=False)
    if name in _PRINTED_TRANSFORMS:
        return _climb(a, f, transformed=True)
    raise Unshaped(f"content | {name}")


# -- rendering by shape --------------------------------------------------------------------------


def _probe_contents(n: int, use: ContentUse) -> list[str]:
    """Contents that exercise what a template could do to printed text, minus the guards'
    literals."""
    out = []
    for i in range(n):
        text = (
            f"Probe {i}: \"quoted\" 'single' back\\slash {{braces}} {{{{double}}}} <b a='1'>x</b>"
            f" &amp; café 日本語 😀 MiXeD CaSe\n\nline two\twith a tab\r\n  indented line\n"
            f"%s %(k)s $x {i} end{i}"
        )
        for _ in range(4):
            for lit in use.literals:
                text = text.replace(lit, "")
        out.append(text)
    return out


@dataclass(slots=True)
class ShapeStats:
    """Counters since start."""

    shaped: int = 0
    full: int = 0


class ShapeRenderer:
    """One template's shapes.

    Args:
        use: the template's guards (:func:`analyze`).
        full: renders ``(messages, add_generation_prompt, tools)`` through the full path (the
            reference; raises for a conversation the template refuses).
        name: for log lines.
    """

    def __init__(
        self, use: ContentUse, full: Callable[[list[dict[str, str]], bool, Any], str], name: str
    ) -> None:
        self.use = use
        self._full = full
        self.name = name
        self._shapes: dict[tuple, str | None] = {}
        self._admits = use.admits
        self._clock = use.clock_formats
        self.stats = ShapeStats()
        self.check = SampledCheck(f"chat template {name}: rendering by shape")

    @property
    def learned(self) -> int:
        """Shapes known now (those refused by their probe included)."""
        return len(self._shapes)

    def render(self, messages: Any, add_generation_prompt: bool, tools: Any = None) -> str | None:
        """The prompt of a plain conversation (``tools``: the request's, part of the shape);
        None for any other (render it in full)."""
        if self.check.off is not None or type(messages) is not list or len(messages) > MAX_MESSAGES:
            return None
        admits = self._admits
        roles = []
        contents = []
        for m in messages:
            if type(m) is not dict or len(m) != 2:
                return None
            role = m.get("role")
            content = m.get("content")
            if type(role) is not str or type(content) is not str or role not in ROLES:
                return None
            if not admits(content):
                return None
            roles.append(role)
            contents.append(content)
        if not roles:
            return None
        tools_key = b""
        if tools is not None:  # (an agent's first turn: the same tools, request after request)
            try:
                tools_key = _encode_json(tools)
            except (TypeError, ValueError, OverflowError):
                return None
            if len(tools_key) > MAX_TOOLS_BYTES:
                return None
        key = (tuple(roles), add_generation_prompt, tools_key, *self._clock_key())
        shapes = self._shapes
        fmt = shapes.get(key, "")
        if fmt == "":
            fmt = self._learn(key, roles, add_generation_prompt, tools)
        if fmt is None:
            return None
        out = fmt.format(*contents)
        self.stats.shaped += 1
        if self.check.due():
            self._verify(messages, add_generation_prompt, tools, out)
        return out

    def _clock_key(self) -> tuple[str, ...]:
        if not self._clock:
            return ()
        now = datetime.now()
        return tuple(now.strftime(f) for f in self._clock)

    def _learn(
        self, key: tuple, roles: list[str], add_generation_prompt: bool, tools: Any
    ) -> str | None:
        shapes = self._shapes
        fmt = self._skeleton(roles, add_generation_prompt, tools)
        if key[3:] != self._clock_key():
            return fmt  # the clock moved while learning: use it once, keep nothing
        if len(shapes) >= MAX_SHAPES:
            del shapes[next(iter(shapes))]
        shapes[key] = fmt
        return fmt

    def _skeleton(self, roles: list[str], add_generation_prompt: bool, tools: Any) -> str | None:
        """The shape's format string from sentinel contents, checked with rich ones."""
        n = len(roles)
        sentinels = [f"\ue000{i}\ue001" for i in range(n)]
        rich = _probe_contents(n, self.use)
        if not all(self._admits(c) for c in sentinels + rich):
            return None
        try:
            text = self._full(
                [{"role": r, "content": c} for r, c in zip(roles, sentinels, strict=True)],
                add_generation_prompt,
                tools,
            )
            want = self._full(
                [{"role": r, "content": c} for r, c in zip(roles, rich, strict=True)],
                add_generation_prompt,
                tools,
            )
        except Exception:  # (the full path raises the request's own error)
            return None
        pieces = _SENTINEL.split(text)
        fmt = []
        for i, piece in enumerate(pieces):
            if i % 2:
                slot = int(piece)
                if slot >= n:
                    return None
                fmt.append(f"{{{slot}}}")
            else:
                fmt.append(piece.replace("{", "{{").replace("}", "}}"))
        out = "".join(fmt)
        try:
            if out.format(*rich) != want:
                return None  # the template changes what it prints
        except (IndexError, KeyError, ValueError):
            return None
        return out

    def _verify(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, tools: Any, got: str
    ) -> None:
        try:
            want = self._full(messages, add_generation_prompt, tools)
        except Exception as exc:
            want = f"<raises {type(exc).__name__}>"
        if want != got:
            self._shapes.clear()
            self.check.failed(
                f"a shaped prompt differed from the full render ({len(messages)} messages)"
            )
