"""Python-call-list outputs (Llama 3.2 and 4, ToolACE...): vLLM's ``pythonic`` parser.

    [get_weather(city="Paris", days=3), get_time(zone='CET')]

The output is a call list when, leading whitespace aside, it starts with ``[`` followed by
``name(``; until that ``(`` arrives the text is held (``[1, 2]`` or ``[note]`` turn out to be
content). Arguments are keyword arguments with Python literal values (strings, numbers,
True/False/None, lists, dicts, tuples), written out as JSON; each goes out when it is complete.
Text after the closing ``]`` is content.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .._json import canonical_json
from .base import MAX_NAME, ToolParser, ToolStream, skip_ws

__all__ = ["PythonicParser"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_KEYWORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LITERAL_ERRORS = (ValueError, SyntaxError, TypeError, MemoryError, RecursionError)
_START, _TEXT, _CALL, _ARGS, _VALUE, _AFTER, _LSTRIP = range(7)


class PythonicStream(ToolStream):
    __slots__ = ("_depth", "_kw", "_mode", "_nargs", "_quote", "_scan", "_seen")

    def __init__(self, new_id: Any) -> None:
        super().__init__(new_id, None)
        self._text = False
        self._mode = _START
        self._nargs = 0
        self._kw = ""
        self._scan = 0
        self._depth = 0
        self._quote = ""
        self._seen: list[str] = []  # a long value's text already scanned (linear buffering)

    def _value_end(self, buf: str, final: bool) -> int:
        """Index of the ``,`` or ``)`` that ends the keyword value at the start of ``buf``, or
        -1 (more text needed). Resumable: the scan state survives between chunks."""
        i, depth, quote = self._scan, self._depth, self._quote
        n = len(buf)
        end = -1
        while i < n:
            c = buf[i]
            if quote:
                if c == "\\":
                    if i + 1 >= n:
                        break
                    i += 2
                elif buf.startswith(quote, i):
                    i += len(quote)
                    quote = ""
                elif len(quote) == 3 and i + 3 > n and quote.startswith(buf[i:]) and not final:
                    break
                else:
                    i += 1
                continue
            if c == '"' or c == "'":
                if buf.startswith(c * 3, i):
                    quote = c * 3
                    i += 3
                elif i + 3 > n and (c * 3).startswith(buf[i:]) and not final:
                    break  # '' or the start of '''
                else:
                    quote = c
                    i += 1
                continue
            if c in "([{":
                depth += 1
            elif c in ")]}":
                if depth == 0:
                    end = i
                    break
                depth -= 1
            elif c == "," and depth == 0:
                end = i
                break
            i += 1
        self._scan, self._depth, self._quote = i, depth, quote
        return end

    def _run(self, final: bool) -> None:
        buf = self._buf
        while True:
            mode = self._mode
            if mode == _START:
                j = skip_ws(buf)
                if j == len(buf) and not final:
                    break
                if j < len(buf) and buf[j] == "[":
                    self._start_call(buf[: j + 1])
                    buf = buf[j + 1 :]
                    self._mode = _CALL
                else:
                    self._mode = _TEXT
                    self._text = True
            elif mode == _TEXT:
                self._content(buf)
                buf = ""
                break
            elif mode == _CALL:  # expecting ``name(``
                j = skip_ws(buf)
                m = _IDENT.match(buf, j)
                k = m.end() if m is not None else j
                if k - j > MAX_NAME:
                    buf = self._fail(buf, j)
                    self._mode = _TEXT
                    continue
                p = skip_ws(buf, k)
                if p == len(buf) and not final:
                    break
                if m is None or p == len(buf) or buf[p] != "(":
                    buf = self._fail(buf, j)
                    self._mode = _TEXT
                    continue
                self._committed()
                self._begin(m.group())
                self._nargs = 0
                buf = buf[p + 1 :]
                self._mode = _ARGS
            elif mode == _ARGS:
                j = skip_ws(buf)
                if j == len(buf) and not final:
                    break
                if j < len(buf) and buf[j] == ")":
                    self._args("}" if self._nargs else "{}")
                    buf = buf[j + 1 :]
                    self._mode = _AFTER
                    continue
                m = _KEYWORD.match(buf, j)
                k = m.end() if m is not None else j
                p = skip_ws(buf, k)
                if m is not None and p == len(buf) and not final and k - j <= MAX_NAME:
                    break
                if m is None or p == len(buf) or buf[p] != "=" or buf.startswith("==", p):
                    buf = self._fail(buf, j, in_call=True)  # positional or malformed
                    self._mode = _TEXT
                    continue
                self._kw = m.group()
                self._scan = self._depth = 0
                self._quote = ""
                self._seen = []
                buf = buf[p + 1 :]
                self._mode = _VALUE
            elif mode == _VALUE:
                end = self._value_end(buf, final)
                if end < 0:
                    if final:
                        buf = self._fail("".join(self._seen) + buf, 0, in_call=True)
                        self._mode = _TEXT
                    elif self._scan:  # keep only what is not scanned yet
                        self._seen.append(buf[: self._scan])
                        buf = buf[self._scan :]
                        self._scan = 0
                    break
                text = "".join(self._seen) + buf[:end]
                try:
                    value = canonical_json(ast.literal_eval(text.strip()))
                except _LITERAL_ERRORS:
                    buf = self._fail("".join(self._seen) + buf, 0, in_call=True)
                    self._mode = _TEXT
                    continue
                sep = ", " if self._nargs else "{"
                self._nargs += 1
                self._args(f"{sep}{canonical_json(self._kw)}: {value}")
                buf = buf[end + 1 :] if buf[end] == "," else buf[end:]
                self._mode = _ARGS
            elif mode == _AFTER:
                j = skip_ws(buf)
                if j == len(buf):
                    buf = ""
                    break
                if buf[j] == ",":
                    self._start_call("")
                    buf = buf[j + 1 :]
                    self._mode = _CALL
                elif buf[j] == "]":
                    buf = buf[j + 1 :]
                    self._mode = _LSTRIP
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


def _py(value: Any) -> str:
    """A JSON value as a Python literal."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_py(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    return repr(value)


class PythonicParser(ToolParser):
    """``[name(kw=literal, ...), ...]`` as the whole output."""

    name = "pythonic"

    def stream(self, request: Mapping[str, Any] | None = None) -> ToolStream:
        return PythonicStream(self.new_id)

    @staticmethod
    def render(calls: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
        inner = ", ".join(
            f"{name}({', '.join(f'{k}={_py(v)}' for k, v in args.items())})" for name, args in calls
        )
        return f"[{inner}]"
