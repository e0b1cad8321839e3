"""Hermes-style calls (NousResearch Hermes 2/3, Qwen2.5, Qwen3): vLLM's ``hermes`` parser.

    Let me check.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text before the first ``<tool_call>`` is content; whitespace after a call is dropped; other text
after a call is content too (vLLM drops it; we keep what the model said). A missing
``</tool_call>`` is tolerated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._json import Envelope, canonical_json
from .base import ToolParser, ToolStream, skip_ws

__all__ = ["HermesParser"]

START = "<tool_call>"
END = "</tool_call>"
_TEXT, _CALL, _CLOSE, _LSTRIP = range(4)


class HermesStream(ToolStream):
    __slots__ = ("_mode",)

    def __init__(self, new_id: Any) -> None:
        super().__init__(new_id, "<")
        self._mode = _TEXT

    def _run(self, final: bool) -> None:
        buf = self._buf
        while True:
            mode = self._mode
            if mode == _TEXT:
                found, buf = self._until_marker(buf, START, final)
                if not found:
                    break
                self._start_call(START)
                self._env = Envelope()
                self._mode = _CALL
            elif mode == _CALL:
                buf, done = self._feed_envelope(buf, final)
                if done:
                    self._mode = _CLOSE
                elif self._text:
                    self._mode = _TEXT
                else:
                    break
            elif mode == _CLOSE:
                j = skip_ws(buf)
                if buf.startswith(END, j):
                    buf = buf[j + len(END) :]
                    self._mode = _LSTRIP
                elif not final and END.startswith(buf[j:]):
                    buf = buf[j:]
                    break
                else:  # no closing tag: tolerated
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


class HermesParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, one block per call."""

    name = "hermes"

    def stream(self, request: Mapping[str, Any] | None = None) -> ToolStream:
        return HermesStream(self.new_id)

    @staticmethod
    def render(calls: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
        return "\n".join(
            f"{START}\n{canonical_json({'name': name, 'arguments': dict(args)})}\n{END}"
            for name, args in calls
        )
