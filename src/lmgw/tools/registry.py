"""Native tools: Python functions the gateway calls for a model (docs/tools.md, "Gateway tools").

A :class:`Tool` is a function (sync or async) plus what the model is told about it: a name, a
description and a JSON schema of its arguments. The schema is derived from the type hints when
not given (msgspec builds both the schema and the converter that checks a call's arguments), the
description from the docstring, each parameter's description from a Google-style ``Args:``
section.

Where tools come from, gathered by :func:`collect_tools` when a gateway is built:

- :func:`register_tool` (``lmgw.sdk.register_tool``): process-wide, usable as a decorator;
- ``tools=[...]`` of the gateway (:class:`lmgw.sdk.Gateway`);
- the ``lmgw.tools`` entry-point group of installed packages (``tools.entry_points``): an entry
  point names a :class:`Tool`, a function (the tool takes the entry point's name) or a list.

Two tools of one name are an error naming both origins; nothing is silently replaced.
"""

from __future__ import annotations

import functools
import inspect
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import msgspec

from ..config import TOOL_NAME

__all__ = [
    "ENTRY_POINT_GROUP",
    "Tool",
    "ToolError",
    "collect_tools",
    "load_entry_points",
    "register_tool",
    "registered_tools",
    "tool",
    "unregister_tool",
]

#: The entry-point group packages declare their tools under.
ENTRY_POINT_GROUP = "lmgw.tools"


class ToolError(ValueError):
    """A tool that cannot be registered: a bad name or schema, a name taken, a broken entry
    point. The message names the tool and where it came from."""


@dataclass(frozen=True, slots=True, eq=False)
class Tool:
    """A native tool. Calling it calls the function, so a decorated function stays usable."""

    name: str
    description: str
    #: JSON schema of the arguments object (what the model is shown)
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    is_async: bool
    #: converts and checks a call's arguments (None: the given schema is passed as keywords)
    args_type: type | None = field(default=None, repr=False)
    #: where it was registered, for clash messages
    origin: str = "the SDK"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def spec(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry offered to the model."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}

    def bind(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments of a call. Raises ValueError (a message for the model) when
        the arguments do not fit the schema."""
        if self.args_type is None:
            return dict(arguments)
        try:
            args = msgspec.convert(arguments, self.args_type, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid arguments: {exc}") from None
        return {f: getattr(args, f) for f in self.args_type.__struct_fields__}


# -- building a Tool from a function -------------------------------------------------------------

_ARGS_HEADER = re.compile(r"^\s*(Args|Arguments|Parameters):\s*$")
_ARG_LINE = re.compile(r"^\s*(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def _doc_parts(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """The docstring's description (text before any section) and its ``Args:`` entries."""
    doc = inspect.getdoc(fn) or ""
    lines = doc.splitlines()
    desc: list[str] = []
    args: dict[str, str] = {}
    i = 0
    while i < len(lines) and not re.match(r"^\s*[A-Z][A-Za-z ]*:\s*$", lines[i]):
        desc.append(lines[i])
        i += 1
    current: str | None = None
    indent = None
    in_args = False
    for line in lines[i:]:
        if re.match(r"^[A-Z][A-Za-z ]*:\s*$", line):  # a section header at column 0
            in_args = bool(_ARGS_HEADER.match(line))
            current = None
            continue
        if not in_args or not line.strip():
            continue
        level = len(line) - len(line.lstrip())
        m = _ARG_LINE.match(line)
        if m and (indent is None or level <= indent):
            indent = level
            current = m.group(1).lstrip("*")
            args[current] = m.group(2).strip()
        elif current is not None:
            args[current] = f"{args[current]} {line.strip()}".strip()
    return " ".join(" ".join(desc).split()), args


def _schema_of(struct: type, where: str) -> dict[str, Any]:
    """The inline object schema of an argument struct (``$defs`` kept at its root)."""
    try:
        schema = msgspec.json.schema(struct)
    except (TypeError, ValueError) as exc:
        raise ToolError(f"{where}: cannot derive a JSON schema: {exc}") from None
    defs = schema.get("$defs", {})
    ref = schema.get("$ref", "")
    root = dict(defs.pop(ref.rsplit("/", 1)[-1], schema)) if ref else dict(schema)
    root.pop("title", None)
    root.setdefault("properties", {})
    if defs:
        root["$defs"] = defs
    return root


def _derive(
    fn: Callable[..., Any], name: str, arg_docs: Mapping[str, str]
) -> tuple[dict[str, Any], type]:
    where = f"tool {name!r}"
    try:
        inner = fn.func if isinstance(fn, functools.partial) else fn
        hints = typing.get_type_hints(inner, include_extras=True)
    except Exception as exc:  # unresolvable forward references
        raise ToolError(f"{where}: cannot read the type hints: {exc}") from None
    fields: list[Any] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ToolError(
                f"{where}: parameter {p.name!r} cannot be passed by keyword; give the tool a"
                " `parameters` schema or only named parameters"
            )
        tp = hints.get(p.name, Any)
        fields.append((p.name, tp) if p.default is p.empty else (p.name, tp, p.default))
    try:
        struct = msgspec.defstruct(
            f"{name}_arguments", fields, kw_only=True, forbid_unknown_fields=True
        )
    except (TypeError, ValueError) as exc:
        raise ToolError(f"{where}: {exc}") from None
    schema = _schema_of(struct, where)
    for pname, text in arg_docs.items():
        prop = schema["properties"].get(pname)
        if isinstance(prop, dict) and text and "description" not in prop:
            prop["description"] = text
    return schema, struct


def _unwrap_callable(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` gives an awaitable (a coroutine function, or an object whose
    ``__call__`` is one)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - a callable object's method
    )


def make_tool(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    origin: str = "the SDK",
) -> Tool:
    """A :class:`Tool` from a function (see :func:`tool`). Raises :class:`ToolError`."""
    if isinstance(fn, Tool):
        return fn
    if not callable(fn):
        raise ToolError(f"{origin}: {fn!r} is not callable")
    inner = fn.func if isinstance(fn, functools.partial) else fn  # names, hints, docstring
    name = name or getattr(inner, "__name__", None) or type(fn).__name__
    if not TOOL_NAME.fullmatch(name):
        raise ToolError(f"{origin}: {name!r} is not a tool name (1-64 letters, digits, '_' or '-')")
    # a callable object is described by its __call__ (its signature, hints and docstring)
    plain = inspect.isroutine(fn) or isinstance(fn, functools.partial)
    target = fn if plain else fn.__call__
    doc, arg_docs = _doc_parts(inner if plain else target)
    if parameters is not None:
        schema = msgspec.to_builtins(dict(parameters))
        if schema.get("type", "object") != "object":
            raise ToolError(f"tool {name!r}: the parameters schema must describe an object")
        args_type = None
    else:
        schema, args_type = _derive(target, name, arg_docs)
    return Tool(
        name,
        doc if description is None else description,
        schema,
        fn,
        _unwrap_callable(fn),
        args_type,
        origin,
    )


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> Any:
    """Make a function a :class:`Tool`; usable bare (``@tool``) or with options
    (``@tool(name="weather")``). Not registered anywhere: pass it to ``Gateway(tools=[...])``,
    :func:`register_tool`, or name it in an entry point.

    Args:
        fn: the function, sync or async. Sync ones run in a worker thread.
        name: the name the model calls; default: the function's.
        description: what the model is told; default: the docstring's text before its sections.
        parameters: the JSON schema of the arguments; default: derived from the type hints
            (then the arguments are checked and converted before the call).
    """

    def wrap(f: Callable[..., Any]) -> Tool:
        return make_tool(f, name=name, description=description, parameters=parameters)

    return wrap if fn is None else wrap(fn)


# -- the process-wide registry (lmgw.sdk.register_tool) ------------------------------------------

_REGISTERED: dict[str, Tool] = {}


def register_tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> Any:
    """Register a tool for every gateway built afterwards in this process (like
    ``register_dialect``); usable as a decorator, bare or with options. Returns the
    :class:`Tool`. Raises :class:`ToolError` when the name is taken (``replace=True`` to
    override on purpose)."""

    def wrap(f: Callable[..., Any]) -> Tool:
        t = make_tool(
            f, name=name, description=description, parameters=parameters,
            origin="lmgw.sdk.register_tool",
        )  # fmt: skip
        if t.name in _REGISTERED and not replace and _REGISTERED[t.name].fn is not t.fn:
            raise ToolError(f"tool {t.name!r} is already registered")
        _REGISTERED[t.name] = t
        return t

    return wrap if fn is None else wrap(fn)


def unregister_tool(name: str) -> None:
    """Forget a tool registered with :func:`register_tool` (tests, plugins being unloaded)."""
    _REGISTERED.pop(name, None)


def registered_tools() -> list[Tool]:
    """The tools :func:`register_tool` holds, in registration order."""
    return list(_REGISTERED.values())


# -- entry points ----------------------------------------------------------------------------------


def _tools_of(obj: Any, default_name: str, origin: str) -> list[Tool]:
    if isinstance(obj, Tool):
        return [obj]
    if callable(obj):
        return [make_tool(obj, name=default_name, origin=origin)]
    if isinstance(obj, Iterable) and not isinstance(obj, str | bytes | Mapping):
        out: list[Tool] = []
        for item in obj:
            if isinstance(item, Tool):
                out.append(item)
            elif callable(item):
                out.append(make_tool(item, origin=origin))
            else:
                raise ToolError(f"{origin}: {item!r} is neither a Tool nor a function")
        return out
    raise ToolError(f"{origin}: {obj!r} is neither a Tool, a function nor a list of them")


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[Tool]:
    """The tools of the installed packages' ``group`` entry points. Raises :class:`ToolError`
    naming the entry point that cannot be loaded or gives no tool."""
    out: list[Tool] = []
    for ep in entry_points(group=group):
        origin = f"entry point {ep.name!r} ({ep.value}) of group {group!r}"
        try:
            obj = ep.load()
        except Exception as exc:
            raise ToolError(f"{origin} cannot be loaded: {type(exc).__name__}: {exc}") from exc
        try:
            found = _tools_of(obj, ep.name, origin)
        except ToolError as exc:
            msg = str(exc)
            raise ToolError(msg if origin in msg else f"{origin}: {msg}") from None
        for t in found:
            out.append(Tool(t.name, t.description, t.parameters, t.fn, t.is_async,
                            t.args_type, origin))  # fmt: skip
    return out


def collect_tools(
    extra: Iterable[Callable[..., Any] | Tool] = (), *, use_entry_points: bool = True
) -> dict[str, Tool]:
    """A gateway's native tools by name: :func:`register_tool`'s, then ``extra`` (the
    gateway's ``tools=``), then the entry points'. Raises :class:`ToolError` on a name given
    twice, naming both origins."""
    found: dict[str, Tool] = {}

    def add(t: Tool) -> None:
        other = found.get(t.name)
        if other is not None and other.fn is not t.fn:
            raise ToolError(
                f"two tools are named {t.name!r}: one from {other.origin}, one from {t.origin}"
            )
        found[t.name] = t

    for t in registered_tools():
        add(t)
    for item in extra:
        t = make_tool(item, origin="Gateway(tools=...)")
        if t.origin == "the SDK":
            t = Tool(t.name, t.description, t.parameters, t.fn, t.is_async, t.args_type,
                     "Gateway(tools=...)")  # fmt: skip
        add(t)
    if use_entry_points:
        for t in load_entry_points():
            add(t)
    return found
