"""Llama 3.x JSON calls: vLLM's ``llama3_json`` parser.

    {"name": "get_weather", "parameters": {"city": "Paris"}}
    <|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {}}

A call is a JSON object with ``name`` and ``parameters`` (or ``arguments``); several are
separated by ``;``. It is recognised after ``<|python_tag|>`` anywhere, or as a bare object at
the very start of the output (leading whitespace aside). A bare leading object is held back until
it is known to be a call (its name and arguments seen) or not (then it is content, as written;
an object without ``parameters`` is not a call here): the one case of this format where
holdback is as long as an object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._json import Envelope, canonical_json
from .base import ToolParser, ToolStream, skip_ws

__all__ = ["Llama3JsonParser"]

PYTHON_TAG = "<|python_tag|>"
_START, _TEXT, _AFTER_TAG, _CALL, _SEP, _LSTRIP = range(6)


class Llama3JsonStream(ToolStream):
    __slots__ = ("_mode",)

    def __init__(self, new_id: Any) -> None:
        super().__init__(new_id, "<")
        self._mode = _START
        self._text = False

    def _open(self, buf: str, j: int, intro: str, *, bare: bool) -> str:
        self._start_call(intro)
        self._env = Envelope(require_args=bare)
        self._mode = _CALL
        return buf[j:]

    def _run(self, final: bool) -> None:
        buf = self._buf
        while True:
            mode = self._mode
            if mode == _START:
                j = skip_ws(buf)
                if j == len(buf):
                    if final:
                        self._content(buf)
                        buf = ""
                    break
                if buf[j] == "{":
                    buf = self._open(buf, j, buf[:j], bare=True)
                else:
                    self._mode = _TEXT
                    self._text = True
            elif mode == _TEXT:
                found, buf = self._until_marker(buf, PYTHON_TAG, final)
                if not found:
                    break
                self._start_call(PYTHON_TAG)
                self._mode = _AFTER_TAG
            elif mode == _AFTER_TAG:
                j = skip_ws(buf)
                if j == len(buf) and not final:
                    break
                if j < len(buf) and buf[j] == "{":
                    self._record(buf[:j])
                    self._env = Envelope()
                    self._mode = _CALL
                    buf = buf[j:]
                else:  # a python_tag without JSON (built-in tools, code): content
                    buf = self._fail(buf, j)
                    self._mode = _TEXT
            elif mode == _CALL:
                buf, done = self._feed_envelope(buf, final)
                if done:
                    self._mode = _SEP
                elif self._text:
                    self._mode = _TEXT
                else:
                    break
            elif mode == _SEP:
                j = skip_ws(buf)
                if j == len(buf):
                    buf = ""
                    break
                if buf[j] == ";":
                    k = skip_ws(buf, j + 1)
                    if k == len(buf) and not final:
                        buf = buf[j:]
                        break
                    if k < len(buf) and buf[k] == "{":
                        buf = self._open(buf, k, "", bare=False)
                        continue
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


class Llama3JsonParser(ToolParser):
    """``{"name": ..., "parameters": ...}`` objects, ``;``-separated, optionally after
    ``<|python_tag|>``."""

    name = "llama3_json"

    def stream(self, request: Mapping[str, Any] | None = None) -> ToolStream:
        return Llama3JsonStream(self.new_id)

    @staticmethod
    def render(calls: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
        return "; ".join(
            canonical_json({"name": name, "parameters": dict(args)}) for name, args in calls
        )
