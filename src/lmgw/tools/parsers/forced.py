"""The answers to a forced tool choice, for workers whose output the gateway constrained.

A native worker takes token ids, so vLLM's OpenAI layer is not there to turn a forced tool
choice into calls: the gateway constrains the output to the tools' JSON schema
(:func:`lmgw.structured.forced_tool_schema`) and reads it back here, as vLLM's serving code
does:

- ``tool_choice: {"type": "function", "function": {"name": N}}``: the whole output is N's
  arguments (one call; ``finish_reason`` stays ``"stop"``);
- ``tool_choice: "required"``: the output is ``[{"name": ..., "parameters": {...}}, ...]``, one
  call per item (``finish_reason: "tool_calls"``).

Not in the registry of model formats (``models[].tool_parser``): the request picks these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._json import Envelope, canonical_json
from .base import ToolParser, ToolStream, skip_ws

__all__ = ["NamedCallParser", "RequiredCallsParser"]


class NamedCallStream(ToolStream):
    """Every character is the named call's arguments; the call begins with the first one."""

    __slots__ = ("_name",)

    def __init__(self, new_id: Callable[[], str], name: str) -> None:
        super().__init__(new_id, "")
        self._name = name
        self._text = False

    def _run(self, final: bool) -> None:
        if self._buf and not self.calls:
            self._begin(self._name)
        self._args(self._buf)
        self._buf = ""
        if final and not self.calls:  # an empty output is still the call vLLM answers
            self._begin(self._name)


class NamedCallParser(ToolParser):
    """The output is the arguments of ``function`` (``tool_choice`` names it)."""

    name = "forced_named"
    finish_tool_calls = False  # vLLM and OpenAI answer a named choice with "stop"

    def __init__(self, function: str, *, new_id: Callable[[], str] | None = None) -> None:
        super().__init__(new_id=new_id)
        self.function = function

    def stream(self, request: Mapping[str, Any] | None = None) -> ToolStream:
        return NamedCallStream(self.new_id, self.function)

    @staticmethod
    def render(calls: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
        return canonical_json(dict(calls[0][1])) if calls else "{}"


_OPEN, _ITEM, _CALL, _SEP, _END = range(5)


class RequiredCallsStream(ToolStream):
    """A JSON array of ``{"name", "parameters"}`` objects, each streamed as a call once its
    name is known. Text that is not such an array (a worker that did not constrain) is
    content, as far as no call began."""

    __slots__ = ("_mode",)

    def __init__(self, new_id: Callable[[], str]) -> None:
        super().__init__(new_id, "")
        self._mode = _OPEN
        self._text = False

    def _run(self, final: bool) -> None:
        buf = self._buf
        while buf or final:
            mode = self._mode
            if self._text:  # gave up on the array: the rest is content
                self._content(buf)
                buf = ""
                break
            j = skip_ws(buf) if mode != _CALL else 0
            if j == len(buf) and mode != _CALL:
                if final and mode != _END:
                    buf = self._fail(buf, len(buf), in_call=mode != _OPEN)
                    continue
                buf = "" if mode == _END else buf
                break
            if mode == _OPEN:
                if buf[j] != "[":
                    buf = self._fail(buf, 0)
                    continue
                self._start_call(buf[: j + 1])
                self._mode = _ITEM
                buf = buf[j + 1 :]
            elif mode == _ITEM:
                if buf[j] == "{":
                    self._start_call(buf[:j])  # each item commits as a call of its own
                    self._env = Envelope()
                    self._mode = _CALL
                    buf = buf[j:]
                else:
                    buf = self._fail(buf, j)
            elif mode == _CALL:
                buf, done = self._feed_envelope(buf, final)
                if done:
                    self._mode = _SEP
                elif self._text:
                    continue
                else:
                    break
            elif mode == _SEP:
                if buf[j] == ",":
                    self._mode = _ITEM
                    buf = buf[j + 1 :]
                elif buf[j] == "]":
                    self._mode = _END
                    buf = buf[j + 1 :]
                else:
                    buf = self._fail(buf, j)
            else:  # _END: trailing spaces only; anything else is content
                self._text = True
                buf = buf[j:]
        self._buf = buf


class RequiredCallsParser(ToolParser):
    """``tool_choice: "required"``: the output is a JSON array of calls."""

    name = "forced_required"

    def stream(self, request: Mapping[str, Any] | None = None) -> ToolStream:
        return RequiredCallsStream(self.new_id)

    @staticmethod
    def render(calls: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
        return canonical_json([{"name": n, "parameters": dict(a)} for n, a in calls])
