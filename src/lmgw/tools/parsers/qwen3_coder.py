"""Qwen3-Coder's XML-style calls: vLLM's ``qwen3_coder`` parser.

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

Parameter values are text; like vLLM, one leading and one trailing newline are dropped, ``null``
(any case) is null, and the rest is typed by the tool's JSON schema (``request["tools"]``):
integers, numbers (integral ones as integers), booleans, objects and arrays (JSON, then Python
literal syntax), strings as written; parameters the schema does not declare stay strings.
String values stream character by character; other values go out when their parameter closes.
A missing ``</parameter>``, ``</function>`` or ``</tool_call>`` is tolerated (vLLM's regexes
accept them), so an output cut short still yields the call as far as it got.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .._json import canonical_json, escape_text
from .base import (
    FAIL,
    HOLD,
    ToolParser,
    ToolStream,
    held_prefix,
    read_until,
    skip_ws,
    tools_of,
)

__all__ = ["Qwen3CoderParser", "convert_parameter"]

TOOL_CALL = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
FUNCTION = "<function="
FUNCTION_END = "</function>"
PARAMETER = "<parameter="
PARAMETER_END = "</parameter>"
_VALUE_ENDS = (PARAMETER_END, PARAMETER, FUNCTION_END)
_NAME = re.compile(r"[^<>\n]*")
_STRING_TYPES = frozenset({"string", "str", "text", "varchar", "char", "enum"})
_LITERAL_ERRORS = (ValueError, SyntaxError, TypeError, MemoryError, RecursionError)
(_TEXT, _OPEN, _FNAME, _BODY, _PNAME, _PVALUE, _FEND, _LSTRIP) = range(8)


def _schema_type(spec: Any) -> str:
    """The declared type of one parameter, lower-cased ("string" when it declares none)."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if isinstance(kind, list):  # ["integer", "null"]
        kind = next((k for k in kind if k != "null"), "string")
    return "string" if kind is None else str(kind).strip().lower()


def _is_text(spec: Any) -> bool:
    """Whether a parameter's value is its text as written (undeclared ones are)."""
    return spec is None or _schema_type(spec) in _STRING_TYPES


def convert_parameter(value: str, spec: Any) -> Any:
    """One parameter's text typed as vLLM's ``qwen3_coder`` parser types it (``spec``: its JSON
    schema, None when the tool does not declare it). Never raises: unconvertible text stays a
    string."""
    if value.lower() == "null":
        return None
    if _is_text(spec):
        return value
    kind = _schema_type(spec)
    if kind.startswith(("int", "uint", "long", "short", "unsigned")):
        try:
            return int(value)
        except ValueError:
            return value
    if kind.startswith(("num", "float")):
        try:
            f = float(value)
            return f if f - int(f) != 0 else int(f)
        except (ValueError, OverflowError):
            return value
    if kind in ("boolean", "bool", "binary"):
        return value.lower() == "true"
    if kind in ("object", "array", "arr") or kind.startswith(("dict", "list")):
        try:
            return json.loads(value)
        except ValueError:
            pass
    try:
        parsed = ast.literal_eval(value)
        canonical_json(parsed)  # a set, bytes, a complex number... stay text
    except _LITERAL_ERRORS:
        return value
    return parsed


def _properties(tools: list[Any], name: str) -> Mapping[str, Any]:
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and fn.get("name") == name:
            params = fn.get("parameters")
            if isinstance(params, dict):
                props = params.get("properties")
                return props if isinstance(props, dict) else params
            return {}
    return {}


def _earliest(buf: str, markers: Sequence[str]) -> tuple[int, str]:
    best, which = -1, ""
    for m in markers:
        at = buf.find(m)
        if at >= 0 and (best < 0 or at < best):
            best, which = at, m
    return best, which


class Qwen3CoderStream(ToolStream):
    __slots__ = ("_mode", "_nparams", "_opened", "_param", "_props", "_seen", "_spec",
                 "_started", "_tools")  # fmt: skip

    def __init__(self, new_id: Any, tools: list[Any]) -> None:
        super().__init__(new_id, "<")
        self._mode = _TEXT
        self._tools = tools
        self._props: Mapping[str, Any] = {}
        self._nparams = 0
        self._param = ""
        self._spec: Any = None
        self._started = False
        self._opened = False
        self._seen: list[str] = []  # a typed value's text so far (linear buffering)

    def _key(self) -> str:
        sep = ", " if self._nparams else ""
        self._nparams += 1
        return f"{sep}{canonical_json(self._param)}: "

    def _end_value(self, tail: str) -> None:
        """The parameter's value ends with ``tail`` (not yet sent)."""
        if tail.endswith("\n"):
            tail = tail[:-1]
        if self._opened:
            self._args(escape_text(tail) + '"')
        else:
            value = convert_parameter(tail, self._spec)
            self._seen = []
            self._args(self._key() + canonical_json(value))

    def _run(self, final: bool) -> None:
        buf = self._buf
        while True:
            mode = self._mode
            if mode == _TEXT:
                at, which = _earliest(buf, (TOOL_CALL, FUNCTION))
                if at < 0:
                    keep = 0 if final else max(held_prefix(buf, TOOL_CALL),
                                               held_prefix(buf, FUNCTION))  # fmt: skip
                    cut = len(buf) - keep
                    self._content(buf[:cut])
                    buf = buf[cut:]
                    break
                self._content(buf[:at])
                buf = buf[at + len(which) :]
                self._start_call(which)
                self._mode = _OPEN if which == TOOL_CALL else _FNAME
            elif mode == _OPEN:
                j = skip_ws(buf)
                if buf.startswith(FUNCTION, j):
                    self._record(buf[: j + len(FUNCTION)])
                    buf = buf[j + len(FUNCTION) :]
                    self._mode = _FNAME
                elif not final and FUNCTION.startswith(buf[j:]):
                    break
                else:
                    buf = self._fail(buf, j)
                    self._mode = _TEXT
            elif mode == _FNAME:
                at = read_until(buf, ">", _NAME, final)
                if at == HOLD:
                    break
                name = buf[:at].strip() if at >= 0 else ""
                if not name:
                    buf = self._fail(buf, 0)
                    self._mode = _TEXT
                    continue
                self._committed()
                self._begin(name)
                self._args("{")
                self._props = _properties(self._tools, name)
                self._nparams = 0
                buf = buf[at + 1 :]
                self._mode = _BODY
            elif mode == _BODY:
                j = skip_ws(buf)
                if buf.startswith(PARAMETER, j):
                    buf = buf[j + len(PARAMETER) :]
                    self._mode = _PNAME
                elif buf.startswith(FUNCTION_END, j):
                    self._args("}")
                    buf = buf[j + len(FUNCTION_END) :]
                    self._mode = _FEND
                elif buf.startswith(TOOL_CALL_END, j) or (final and j == len(buf)):
                    self._args("}")  # no </function>: tolerated
                    buf = buf[j:]
                    self._mode = _FEND
                elif not final and any(m.startswith(buf[j:]) for m in
                                       (PARAMETER, FUNCTION_END, TOOL_CALL_END)):  # fmt: skip
                    buf = buf[j:]
                    break
                else:
                    buf = self._fail(buf, j, in_call=True)
                    self._mode = _TEXT
            elif mode == _PNAME:
                at = read_until(buf, ">", _NAME, final)
                if at == HOLD:
                    break
                if at == FAIL:
                    buf = self._fail(buf, 0, in_call=True)
                    self._mode = _TEXT
                    continue
                self._param = buf[:at].strip()
                self._spec = self._props.get(self._param)
                self._started = self._opened = False
                self._seen = []
                buf = buf[at + 1 :]
                self._mode = _PVALUE
            elif mode == _PVALUE:
                if not self._started:
                    if not buf and not final:
                        break
                    if buf.startswith("\n"):
                        buf = buf[1:]
                    self._started = True
                at, which = _earliest(buf, _VALUE_ENDS)
                if at >= 0 or final:
                    if at < 0:
                        at, which = len(buf), ""
                    self._end_value("".join(self._seen) + buf[:at])
                    buf = buf[at + len(which) :] if which == PARAMETER_END else buf[at:]
                    self._mode = _BODY
                    continue
                safe = len(buf) - max(held_prefix(buf, m) for m in _VALUE_ENDS)
                if not _is_text(self._spec):  # typed when complete; keep what is scanned
                    self._seen.append(buf[:safe])
                    buf = buf[safe:]
                else:  # stream the text, holding what may end it
                    if safe and buf[safe - 1] == "\n":
                        safe -= 1  # may be the newline before the end tag
                    if not self._opened:
                        if not safe or "null".startswith(buf[:safe].lower()):
                            break  # may still be null
                        self._args(self._key() + '"')
                        self._opened = True
                    self._args(escape_text(buf[:safe]))
                    buf = buf[safe:]
                break
            elif mode == _FEND:
                j = skip_ws(buf)
                if buf.startswith(TOOL_CALL_END, j):
                    buf = buf[j + len(TOOL_CALL_END) :]
                    self._mode = _LSTRIP
                elif buf.startswith(FUNCTION, j):  # another call in the same block
                    self._start_call(buf[: j + len(FUNCTION)])
                    buf = buf[j + len(FUNCTION) :]
                    self._mode = _FNAME
                elif not final and (
                    TOOL_CALL_END.startswith(buf[j:]) or FUNCTION.startswith(buf[j:])
                ):
                    buf = buf[j:]
                    break
                else:
                    buf = buf[j:]
                    self._mode = _TEXT
                    self._text = True
            else:  # _LSTRIP
                buf = buf[skip_ws(buf) :]
                if not buf:
                    break
                self._mode = _TEXT
                self._text = True
        self._buf = buf


class Qwen3CoderParser(ToolParser):
    """``<tool_call><function=name><parameter=p>value</parameter></function></tool_call>``,
    values typed by the request's tool schemas."""

    name = "qwen3_coder"

    def stream(self, request: Mapping[str, Any] | None = None) -> ToolStream:
        return Qwen3CoderStream(self.new_id, tools_of(request))

    @staticmethod
    def render(calls: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
        blocks = []
        for name, args in calls:
            params = "".join(
                f"{PARAMETER}{key}>\n"
                f"{value if isinstance(value, str) else canonical_json(value)}\n{PARAMETER_END}\n"
                for key, value in args.items()
            )
            blocks.append(
                f"{TOOL_CALL}\n{FUNCTION}{name}>\n{params}{FUNCTION_END}\n{TOOL_CALL_END}"
            )
        return "\n".join(blocks)
