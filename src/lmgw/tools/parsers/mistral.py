"""Mistral calls: vLLM's ``mistral`` parser, both generations of the format.

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]     (tokenizer < v11)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}                            (v11 and later)

Text before ``[TOOL_CALLS]`` is content. In the newer form each call repeats the marker. Ids are 9
alphanumerics (:func:`~lmgw.tools.ids.mistral_tool_call_id`): Mistral's chat templates reject
any other id when the conversation comes back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .._json import Envelope, JsonValue, canonical_json
from ..ids import mistral_tool_call_id
from .base import FAIL, HOLD, ToolParser, ToolStream, read_until, skip_ws

__all__ = ["MistralParser"]

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]*")
_TEXT, _MARK, _ITEM, _CALL, _ITEM_SEP, _FNAME, _FARGS, _LSTRIP = range(8)


class MistralStream(ToolStream):
    __slots__ = ("_mode", "_value")

    def __init__(self, new_id: Any) -> None:
        super().__init__(new_id, "[")
        self._mode = _TEXT
        self._value: JsonValue | None = None

    def _run(self, final: bool) -> None:
        buf = self._buf
        while True:
            mode = self._mode
            if mode == _TEXT:
                found, buf = self._until_marker(buf, TOOL_CALLS, final)
                if not found:
                    break
                self._start_call(TOOL_CALLS)
                self._mode = _MARK
            elif mode == _MARK:
                j = skip_ws(buf)
                if j == len(buf) and not final:
                    break
                if j < len(buf) and buf[j] == "[":  # the JSON-array form
                    self._record(buf[: j + 1])
                    buf = buf[j + 1 :]
                    self._mode = _ITEM
                else:
                    self._record(buf[:j])
                    buf = buf[j:]
                    self._mode = _FNAME
            elif mode == _ITEM:
                j = skip_ws(buf)
                if j == len(buf) and not final:
                    break
                if j < len(buf) and buf[j] == "{":
                    self._start_call(buf[:j])
                    self._env = Envelope()
                    buf = buf[j:]
                    self._mode = _CALL
                elif j < len(buf) and buf[j] == "]" and self._raw is None:
                    buf = buf[j + 1 :]  # a trailing comma before the end of the list
                    self._mode = _LSTRIP
                else:
                    buf = self._fail(buf, j)
                    self._mode = _TEXT
            elif mode == _CALL:
                buf, done = self._feed_envelope(buf, final)
                if done:
                    self._mode = _ITEM_SEP
                elif self._text:
                    self._mode = _TEXT
                else:
                    break
            elif mode == _ITEM_SEP:
                j = skip_ws(buf)
                if j == len(buf):
                    buf = ""
                    if final:
                        self._mode = _LSTRIP
                    break
                if buf[j] == ",":
                    buf = buf[j + 1 :]
                    self._mode = _ITEM
                elif buf[j] == "]":
                    buf = buf[j + 1 :]
                    self._mode = _LSTRIP
                else:
                    buf = buf[j:]
                    self._mode = _TEXT
                    self._text = True
            elif mode == _FNAME:
                at = read_until(buf, ARGS, _NAME, final)
                if at == HOLD:
                    break
                if at == FAIL:
                    buf = self._fail(buf, 0)
                    self._mode = _TEXT
                    continue
                self._committed()
                self._begin(buf[:at])
                buf = buf[at + len(ARGS) :]
                self._value = JsonValue()
                self._mode = _FARGS
            elif mode == _FARGS:
                assert self._value is not None
                buf, done = self._feed_value(self._value, buf, final)
                if done:
                    self._value = None
                    self._mode = _LSTRIP
                elif self._text:
                    self._value = None
                    self._mode = _TEXT
                else:
                    break
            else:  # _LSTRIP
                buf = buf[skip_ws(buf) :]
                if not buf:
                    break
                self._mode = _TEXT
                self._text = True
        self._buf = buf


class MistralParser(ToolParser):
    """``[TOOL_CALLS]`` followed by a JSON list of calls, or by ``name[ARGS]{...}``."""

    name = "mistral"
    default_new_id: ClassVar[Any] = staticmethod(mistral_tool_call_id)

    def stream(self, request: Mapping[str, Any] | None = None) -> ToolStream:
        return MistralStream(self.new_id)

    @staticmethod
    def render(calls: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
        return "".join(
            f"{TOOL_CALLS}{name}{ARGS}{canonical_json(dict(args))}" for name, args in calls
        )
