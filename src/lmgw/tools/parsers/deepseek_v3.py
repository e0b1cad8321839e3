# ruff: noqa: RUF002  (the docstrings show the real markers)
"""DeepSeek V3 / R1 calls: vLLM's ``deepseek_v3`` parser, plus the V3.1 form.

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

V3.1 drops the type and the code fence (``<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{...}
<｜tool▁call▁end｜>``); the two are told apart by what follows the separator (a JSON object or
list: V3.1). Text before ``<｜tool▁calls▁begin｜>`` is content. The markers are special tokens of
DeepSeek's tokenizer: the worker must send them (``skip_special_tokens`` false), as vLLM needs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .._json import JsonValue, canonical_json
from .base import FAIL, HOLD, ToolParser, ToolStream, read_until, skip_ws

__all__ = ["DeepSeekV3Parser"]

# The markers use U+FF5C (fullwidth vertical line) and U+2581 (lower one eighth block).
CALLS_BEGIN = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
CALLS_END = "<\uff5ctool\u2581calls\u2581end\uff5c>"
CALL_BEGIN = "<\uff5ctool\u2581call\u2581begin\uff5c>"
CALL_END = "<\uff5ctool\u2581call\u2581end\uff5c>"
SEP = "<\uff5ctool\u2581sep\uff5c>"
FENCE_OPEN = "```json"
FENCE_CLOSE = "```"
_NAME = re.compile(r"[A-Za-z0-9_.\-]*")
(_TEXT, _CALLS, _HEAD, _AFTER_SEP, _NAME_LINE, _FENCE, _ARGS, _FENCE_END, _CALL_END,
 _LSTRIP) = range(10)  # fmt: skip


class DeepSeekV3Stream(ToolStream):
    __slots__ = ("_head", "_mode", "_v31", "_value")

    def __init__(self, new_id: Any) -> None:
        super().__init__(new_id, "<")
        self._mode = _TEXT
        self._head = ""
        self._v31 = False
        self._value: JsonValue | None = None

    def _expect(self, buf: str, token: str, final: bool) -> int:
        """After spaces, ``token``: the index after it, HOLD, or FAIL (``-3 - j``: at j)."""
        j = skip_ws(buf)
        if buf.startswith(token, j):
            return j + len(token)
        if not final and token.startswith(buf[j:]):
            return HOLD
        return -3 - j

    def _run(self, final: bool) -> None:
        buf = self._buf
        while True:
            mode = self._mode
            if mode == _TEXT:
                found, buf = self._until_marker(buf, CALLS_BEGIN, final)
                if not found:
                    break
                self._start_call(CALLS_BEGIN)
                self._mode = _CALLS
            elif mode == _CALLS:
                j = skip_ws(buf)
                if buf.startswith(CALL_BEGIN, j):
                    self._start_call(buf[: j + len(CALL_BEGIN)])
                    buf = buf[j + len(CALL_BEGIN) :]
                    self._mode = _HEAD
                elif buf.startswith(CALLS_END, j) and self._raw is None:
                    buf = buf[j + len(CALLS_END) :]
                    self._mode = _LSTRIP
                elif not final and (
                    CALL_BEGIN.startswith(buf[j:]) or CALLS_END.startswith(buf[j:])
                ):
                    self._record(buf[:j])
                    buf = buf[j:]
                    break
                elif j == len(buf) and self._raw is None:  # the output ended after a call
                    buf = ""
                    break
                else:
                    buf = self._fail(buf, j)
                    self._mode = _TEXT
            elif mode == _HEAD:
                at = read_until(buf, SEP, _NAME, final)
                if at == HOLD:
                    break
                if at == FAIL:
                    buf = self._fail(buf, 0)
                    self._mode = _TEXT
                    continue
                self._head = buf[:at]
                self._record(buf[: at + len(SEP)])
                buf = buf[at + len(SEP) :]
                self._mode = _AFTER_SEP
            elif mode == _AFTER_SEP:
                if not buf and not final:
                    break
                if buf[:1] in ("{", "["):  # V3.1: the head was the name
                    self._v31 = True
                    self._committed()
                    self._begin(self._head)
                    self._value = JsonValue()
                    self._mode = _ARGS
                else:
                    self._v31 = False
                    self._mode = _NAME_LINE
            elif mode == _NAME_LINE:
                at = read_until(buf, "\n", _NAME, final)
                if at == HOLD:
                    break
                if at == FAIL:
                    buf = self._fail(buf, 0)
                    self._mode = _TEXT
                    continue
                self._committed()
                self._begin(buf[:at])
                buf = buf[at + 1 :]
                self._mode = _FENCE
            elif mode == _FENCE:
                k = self._expect(buf, FENCE_OPEN, final)
                if k == HOLD:
                    break
                if k < 0:
                    buf = self._fail(buf, -3 - k, in_call=True)
                    self._mode = _TEXT
                    continue
                buf = buf[k:]
                self._value = JsonValue()
                self._mode = _ARGS
            elif mode == _ARGS:
                assert self._value is not None
                buf, done = self._feed_value(self._value, buf, final)
                if done:
                    self._value = None
                    self._mode = _CALL_END if self._v31 else _FENCE_END
                elif self._text:
                    self._value = None
                    self._mode = _TEXT
                else:
                    break
            elif mode in (_FENCE_END, _CALL_END):
                token = FENCE_CLOSE if mode == _FENCE_END else CALL_END
                k = self._expect(buf, token, final)
                if k == HOLD:
                    break
                buf = buf[k:] if k >= 0 else buf[-3 - k :]  # a missing one is tolerated
                self._mode = _CALL_END if mode == _FENCE_END else _CALLS
            else:  # _LSTRIP
                buf = buf[skip_ws(buf) :]
                if not buf:
                    break
                self._mode = _TEXT
                self._text = True
        self._buf = buf


class DeepSeekV3Parser(ToolParser):
    """``<｜tool▁calls▁begin｜>`` ... ``<｜tool▁calls▁end｜>`` (V3, R1 and V3.1 forms)."""

    name = "deepseek_v3"

    def stream(self, request: Mapping[str, Any] | None = None) -> ToolStream:
        return DeepSeekV3Stream(self.new_id)

    @staticmethod
    def render(calls: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
        body = "".join(
            f"{CALL_BEGIN}function{SEP}{name}\n{FENCE_OPEN}\n{canonical_json(dict(args))}\n"
            f"{FENCE_CLOSE}{CALL_END}"
            for name, args in calls
        )
        return f"{CALLS_BEGIN}{body}{CALLS_END}"
