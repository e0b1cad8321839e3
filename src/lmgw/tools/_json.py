"""Incremental JSON reading for the tool-call parsers (sans-IO, no partial-JSON library).

Why: a streamed tool call must send its ``arguments`` as they arrive, and the concatenated
fragments must equal what the non-streamed answer carries. vLLM's non-streamed parsers return
``json.dumps(arguments, ensure_ascii=False)``; :class:`JsonValue` writes exactly that canonical
text while it reads the model's JSON (any spacing, escapes, number spelling), one fragment per
call, so the streamed and whole-text answers agree whatever the chunking.

Determinism rule: a token is consumed only once it is complete (a number or literal when the
next character arrives, an escape once all its characters are there); otherwise ``feed`` stops
before it and the caller keeps the text. Decisions therefore depend on the text alone, never on
where a chunk ended. ``final=True`` says no more text will come.
"""

from __future__ import annotations

import json
import math
import re

__all__ = ["Envelope", "JsonError", "JsonValue", "canonical_json", "escape_text"]


class JsonError(ValueError):
    """The text is not the JSON expected; ``pos`` is the offending index in the fed string."""

    def __init__(self, message: str, pos: int) -> None:
        super().__init__(message)
        self.pos = pos


def canonical_json(value: object) -> str:
    """The arguments text vLLM writes: ``json.dumps(value, ensure_ascii=False)``."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


_WS = re.compile(r"[ \t\n\r]*")
_STR_RUN = re.compile(r'[^"\\\x00-\x1f]+')
_NUM_RUN = re.compile(r"[-+0-9.eE]+")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?\Z")
_LIT_RUN = re.compile(r"[a-zA-Z]+")
_LITERALS = ("true", "false", "null")
_HEX4 = re.compile(r"[0-9a-fA-F]{4}\Z")
# What may still become the low half of a surrogate pair (``\uDC00``..``\uDFFF``).
_LOW_PREFIX = re.compile(r"(?:\\(?:u(?:[dD](?:[c-fC-F][0-9a-fA-F]{0,2})?)?)?)?\Z")
_SIMPLE_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "/": "/",
    "b": "\\b",
    "f": "\\f",
    "n": "\\n",
    "r": "\\r",
    "t": "\\t",
}
_CHAR_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                 "\t": "\\t"}  # fmt: skip
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def _escape_char(c: str) -> str:
    """One decoded character as ``json.dumps(..., ensure_ascii=False)`` writes it."""
    esc = _CHAR_ESCAPES.get(c)
    if esc is not None:
        return esc
    return f"\\u{ord(c):04x}" if ord(c) < 0x20 else c


def escape_text(text: str) -> str:
    """``text`` as the inside of a canonical JSON string (no quotes). Per character, so the
    escapes of the pieces of a text concatenate to the escape of the whole."""
    if _NEEDS_ESCAPE.search(text) is None:
        return text
    return _NEEDS_ESCAPE.sub(lambda m: _escape_char(m.group()), text)


def _escape(s: str, i: int, final: bool, out: list[str]) -> int:
    """Read the escape at ``s[i] == "\\"``; append its canonical form; the index after it, or
    -1 when more text is needed to know what it is."""
    n = len(s)
    if i + 1 >= n:
        if final:
            raise JsonError("truncated escape", i)
        return -1
    e = s[i + 1]
    simple = _SIMPLE_ESCAPES.get(e)
    if simple is not None:
        out.append(simple)
        return i + 2
    if e != "u":
        raise JsonError(f"invalid escape \\{e}", i)
    if i + 6 > n:
        if final or not re.fullmatch(r"[0-9a-fA-F]*", s[i + 2 :]):
            raise JsonError("invalid \\u escape", i)
        return -1
    hex4 = s[i + 2 : i + 6]
    if _HEX4.match(hex4) is None:
        raise JsonError("invalid \\u escape", i)
    cp = int(hex4, 16)
    if 0xD800 <= cp < 0xDC00:  # high surrogate: json.loads pairs it with a following low one
        rest = s[i + 6 : i + 12]
        if len(rest) == 6:
            if rest[:2] == "\\u" and _HEX4.match(rest[2:]) is not None:
                low = int(rest[2:], 16)
                if 0xDC00 <= low < 0xE000:
                    out.append(chr(0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)))
                    return i + 12
        elif not final and _LOW_PREFIX.match(rest) is not None:
            return -1
        out.append(f"\\u{cp:04x}")  # a lone surrogate stays escaped (it has no UTF-8 form)
        return i + 6
    if 0xDC00 <= cp < 0xE000:
        out.append(f"\\u{cp:04x}")
        return i + 6
    out.append(_escape_char(chr(cp)))
    return i + 6


# JsonValue states
_VALUE, _OBJ_FIRST, _OBJ_KEY, _COLON, _AFTER, _ARR_FIRST, _STRING, _DONE = range(8)


class JsonValue:
    """Reads one JSON value incrementally and writes its canonical text into ``out``.

    Lenient in one way models need: raw control characters inside strings (a literal newline)
    are accepted and escaped. Everything else that ``json.loads`` rejects raises
    :class:`JsonError`, as do numbers that overflow to infinity.
    """

    __slots__ = ("_key", "_stack", "_state", "done", "out")

    def __init__(self) -> None:
        self.out: list[str] = []
        """Canonical fragments written since the last :meth:`take`."""
        self.done = False
        self._stack: list[str] = []
        self._state = _VALUE
        self._key = False

    def take(self) -> str:
        """The canonical text written since the last call."""
        out = self.out
        if not out:
            return ""
        text = out[0] if len(out) == 1 else "".join(out)
        out.clear()
        return text

    def _end_value(self) -> None:
        if self._stack:
            self._state = _AFTER
        else:
            self._state = _DONE
            self.done = True

    def feed(self, s: str, i: int, final: bool) -> int:
        """Consume ``s`` from ``i``; returns where it stopped (the value's end once ``done``).

        Raises:
            JsonError: the text cannot continue a JSON value (``pos`` is where).
        """
        n = len(s)
        out = self.out
        while i < n and not self.done:
            st = self._state
            if st == _STRING:
                m = _STR_RUN.match(s, i)
                if m is not None:
                    out.append(m.group())
                    i = m.end()
                    if i >= n:
                        break
                c = s[i]
                if c == '"':
                    out.append('"')
                    i += 1
                    if self._key:
                        self._state = _COLON
                    else:
                        self._end_value()
                elif c == "\\":
                    j = _escape(s, i, final, out)
                    if j < 0:
                        break
                    i = j
                else:  # a raw control character: invalid JSON, but models write them
                    out.append(_escape_char(c))
                    i += 1
                continue
            i = _WS.match(s, i).end()  # type: ignore[union-attr]
            if i >= n:
                break
            c = s[i]
            if st in (_VALUE, _ARR_FIRST):
                if c == '"':
                    out.append('"')
                    self._key = False
                    self._state = _STRING
                    i += 1
                elif c == "{":
                    out.append("{")
                    self._stack.append("{")
                    self._state = _OBJ_FIRST
                    i += 1
                elif c == "[":
                    out.append("[")
                    self._stack.append("[")
                    self._state = _ARR_FIRST
                    i += 1
                elif c == "]" and st == _ARR_FIRST:
                    out.append("]")
                    self._stack.pop()
                    i += 1
                    self._end_value()
                elif c == "-" or "0" <= c <= "9":
                    j = _NUM_RUN.match(s, i).end()  # type: ignore[union-attr]
                    if j >= n and not final:
                        break
                    tok = s[i:j]
                    if _NUMBER.match(tok) is None:
                        raise JsonError(f"invalid number {tok!r}", i)
                    value = json.loads(tok)
                    if isinstance(value, float) and not math.isfinite(value):
                        raise JsonError(f"number out of range {tok!r}", i)
                    out.append(json.dumps(value))
                    i = j
                    self._end_value()
                elif c == "t" or c == "f" or c == "n":
                    j = _LIT_RUN.match(s, i).end()  # type: ignore[union-attr]
                    tok = s[i:j]
                    if j >= n and not final:
                        if any(lit.startswith(tok) for lit in _LITERALS):
                            break
                        raise JsonError(f"invalid literal {tok!r}", i)
                    if tok not in _LITERALS:
                        raise JsonError(f"invalid literal {tok!r}", i)
                    out.append(tok)
                    i = j
                    self._end_value()
                else:
                    raise JsonError(f"unexpected {c!r} where a JSON value belongs", i)
            elif st in (_OBJ_FIRST, _OBJ_KEY):
                if c == '"':
                    out.append('"')
                    self._key = True
                    self._state = _STRING
                    i += 1
                elif c == "}" and st == _OBJ_FIRST:
                    out.append("}")
                    self._stack.pop()
                    i += 1
                    self._end_value()
                else:
                    raise JsonError(f"unexpected {c!r} where an object key belongs", i)
            elif st == _COLON:
                if c != ":":
                    raise JsonError(f"expected ':' after an object key, got {c!r}", i)
                out.append(": ")
                self._state = _VALUE
                i += 1
            else:  # _AFTER
                top = self._stack[-1]
                if c == ",":
                    out.append(", ")
                    self._state = _OBJ_KEY if top == "{" else _VALUE
                    i += 1
                elif (c == "}" and top == "{") or (c == "]" and top == "["):
                    out.append(c)
                    self._stack.pop()
                    i += 1
                    self._end_value()
                else:
                    raise JsonError(f"expected ',' or a closing bracket, got {c!r}", i)
        return i


# Envelope states
_E_OPEN, _E_KEY_OR_END, _E_KEY, _E_KEY_STR, _E_COLON, _E_VALUE, _E_AFTER, _E_DONE = range(8)
# What the value being read is for
_T_NAME, _T_ARGS, _T_ARGS_STR, _T_SKIP = range(4)
ARGUMENT_KEYS = ("arguments", "parameters")


class Envelope:
    """Reads one ``{"name": str, "arguments" | "parameters": value, ...}`` object.

    The call *commits* once its name is known and its arguments have begun (or the object
    closed without any: ``{}``); only then may a stream send the call's first delta, so text
    that merely looks like a call (``{"name": "Bob", "age": 3}``) is never half-sent as one.
    Until then, canonical argument text waits in the envelope. Other keys are skipped.
    Arguments written as a JSON string (``"arguments": "{\\"a\\": 1}"``) are decoded and
    re-written canonically when they hold JSON.

    Args:
        require_args: an object without arguments is not a call (for bare JSON that may just
            be content); otherwise it is a call with ``{}``.
    """

    __slots__ = ("_args", "_args_seen", "_require_args", "_state", "_sub", "_target", "done",
                 "name")  # fmt: skip

    def __init__(self, *, require_args: bool = False) -> None:
        self._require_args = require_args
        self.name: str | None = None
        self.done = False
        self._state = _E_OPEN
        self._sub: JsonValue | None = None
        self._target = _T_SKIP
        self._args: list[str] = []
        self._args_seen = False

    @property
    def committed(self) -> bool:
        return self.name is not None and (self._args_seen or self.done)

    def take_args(self) -> str:
        """Canonical argument text not yet taken ("" until committed)."""
        if not self._args or not self.committed:
            return ""
        text = "".join(self._args)
        self._args.clear()
        return text

    def feed(self, s: str, i: int, final: bool) -> int:
        """Consume ``s`` from ``i``; returns where it stopped (after ``}`` once ``done``).

        Raises:
            JsonError: not a call object (``pos`` is where that became clear).
        """
        n = len(s)
        while i < n and not self.done:
            st = self._state
            if st in (_E_KEY_STR, _E_VALUE):
                sub = self._sub
                if sub is None:  # a value starts: skip spaces, see what it is
                    i = _WS.match(s, i).end()  # type: ignore[union-attr]
                    if i >= n:
                        break
                    if self._target == _T_ARGS and s[i] == '"':
                        self._target = _T_ARGS_STR
                    sub = self._sub = JsonValue()
                try:
                    i = sub.feed(s, i, final)
                except JsonError:
                    if self._target == _T_ARGS and sub.out:  # streamed before the error, as
                        self._args.append(sub.take())  # it would be had the text been split
                    raise
                if self._target == _T_ARGS and sub.out:
                    self._args.append(sub.take())
                if not sub.done:
                    break
                self._sub = None
                self._finish_sub(sub, st, i)
                continue
            i = _WS.match(s, i).end()  # type: ignore[union-attr]
            if i >= n:
                break
            c = s[i]
            if st == _E_OPEN:
                if c != "{":
                    raise JsonError(f"expected a call object, got {c!r}", i)
                self._state = _E_KEY_OR_END
                i += 1
            elif st in (_E_KEY_OR_END, _E_KEY):
                if c == '"':
                    self._state = _E_KEY_STR
                elif c == "}" and st == _E_KEY_OR_END:
                    i = self._close(i)
                else:
                    raise JsonError(f"unexpected {c!r} where a key belongs", i)
            elif st == _E_COLON:
                if c != ":":
                    raise JsonError(f"expected ':', got {c!r}", i)
                self._state = _E_VALUE
                i += 1
            else:  # _E_AFTER
                if c == ",":
                    self._state = _E_KEY
                    i += 1
                elif c == "}":
                    i = self._close(i)
                else:
                    raise JsonError(f"expected ',' or '}}', got {c!r}", i)
        return i

    def _finish_sub(self, sub: JsonValue, st: int, i: int) -> None:
        if st == _E_KEY_STR:
            key = json.loads(sub.take())
            if key == "name" and self.name is None:
                self._target = _T_NAME
            elif key in ARGUMENT_KEYS and not self._args_seen:
                self._target = _T_ARGS
                self._args_seen = True
            else:
                self._target = _T_SKIP
            self._state = _E_COLON
            return
        target = self._target
        if target == _T_NAME:
            name = json.loads(sub.take())
            if not isinstance(name, str) or not name:
                raise JsonError("a tool call's name must be a non-empty string", i - 1)
            self.name = name
        elif target == _T_ARGS_STR:
            text = json.loads(sub.take())
            try:
                text = canonical_json(json.loads(text))
            except ValueError:
                pass  # not JSON inside: the string as written
            self._args.append(text)
        self._target = _T_SKIP
        self._state = _E_AFTER

    def _close(self, i: int) -> int:
        if self.name is None:
            raise JsonError("a call object without a name", i)
        if not self._args_seen:
            if self._require_args:
                raise JsonError("a call object without arguments", i)
            self._args.append("{}")
        self._state = _E_DONE
        self.done = True
        return i + 1
