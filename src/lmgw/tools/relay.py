"""The parsers applied to a worker's chat answer as the gateway relays it: tool calls and
reasoning split out of the model's raw text, in the OpenAI shapes.

:class:`OutputRewriter` plugs into the pipeline's ``Rewrite`` hook: ``events`` edits each group
of complete SSE events (one :class:`~lmgw.tools.OutputStream` per choice keeps the parse state
across groups, and across a mid-stream migration, whose continuation is spliced before this
runs), ``body`` edits a whole JSON answer. Chunks that carry no content (the role event, usage,
errors, ``[DONE]``) pass through; a content chunk becomes zero or more chunks with the deltas
the parser made certain; the chunk with ``finish_reason`` first flushes what the parser held
back, then says ``"tool_calls"`` when calls were made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from ..errors import DECODE_ERRORS
from . import OutputStream, finish_reason, parse_output
from .parsers.base import ToolParser
from .reasoning import ReasoningParser

_decode = msgspec.json.decode
_encode = msgspec.json.encode


class OutputRewriter:
    """Per client response: parses the chat output of one request (see the module doc)."""

    def __init__(
        self,
        request: Mapping[str, Any],
        tools: ToolParser | None,
        reasoning: ReasoningParser | None,
    ) -> None:
        self.request = request
        self.tools = tools
        self.reasoning = reasoning
        self._streams: dict[int, OutputStream] = {}
        self._calls_finish = tools is None or tools.finish_tool_calls

    def fresh(self) -> OutputRewriter:
        """A rewriter for another response to the same request, with no parse state (a
        request split into one response per choice: each parses its own)."""
        return OutputRewriter(self.request, self.tools, self.reasoning)

    # -- streamed -----------------------------------------------------------------------------
    def _stream(self, index: int) -> OutputStream:
        s = self._streams.get(index)
        if s is None:
            s = self._streams[index] = OutputStream(
                self.tools.stream(self.request) if self.tools is not None else None,
                self.reasoning.stream() if self.reasoning is not None else None,
            )
        return s

    def events(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for block in data.split(b"\n\n"):
            if not block.strip():
                continue
            out.extend(self._event(block))
        return b"".join(x + b"\n\n" for x in out)

    def _event(self, block: bytes) -> list[bytes]:
        if not block.startswith(b"data:"):
            return [block]
        payload = block[5:].strip()
        if payload == b"[DONE]":
            return [block]
        try:
            ev = _decode(payload)
        except DECODE_ERRORS:
            return [block]
        choices = ev.get("choices") if isinstance(ev, dict) else None
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            return [block]  # usage-only chunks, errors; n > 1 chunks carry one choice each too
        choice = choices[0]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return [block]
        index = choice.get("index", 0)
        if type(index) is not int:
            return [block]  # not an event this parser can place: passed on as it came
        stream = self._stream(index)
        content = delta.get("content")
        made = stream.feed(content) if isinstance(content, str) and content else []
        upstream = choice.get("finish_reason")
        if upstream is not None:
            made += stream.finish()
        rest = {k: v for k, v in delta.items() if k != "content"}
        events: list[dict[str, Any]] = []
        if rest or (content is None and upstream is None):  # e.g. the role event: kept
            events.append(self._chunk(ev, choice, rest, None))
        for d in made:
            events.append(self._chunk(ev, choice, d, None))
        if upstream is not None:
            reason = finish_reason(upstream, stream.calls if self._calls_finish else 0)
            if events and not events[-1]["choices"][0].get("finish_reason"):
                events[-1]["choices"][0]["finish_reason"] = reason
            else:
                events.append(self._chunk(ev, choice, {}, reason))
            if "usage" in ev and events:
                events[-1]["usage"] = ev["usage"]
        return [b"data: " + _encode(e) for e in events]

    @staticmethod
    def _chunk(
        ev: dict[str, Any], choice: dict[str, Any], delta: dict[str, Any], reason: str | None
    ) -> dict[str, Any]:
        out = {k: v for k, v in ev.items() if k not in ("choices", "usage")}
        c = {k: v for k, v in choice.items() if k not in ("delta", "finish_reason")}
        c["delta"] = delta
        c["finish_reason"] = reason
        out["choices"] = [c]
        return out

    # -- whole --------------------------------------------------------------------------------
    def body(self, data: bytes) -> bytes:
        try:
            obj = _decode(data)
        except DECODE_ERRORS:
            return data
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not isinstance(choices, list):
            return data
        for choice in choices:
            message = choice.get("message") if isinstance(choice, dict) else None
            text = message.get("content") if isinstance(message, dict) else None
            if not isinstance(text, str):
                continue
            parsed = parse_output(
                text, tools=self.tools, reasoning=self.reasoning, request=self.request
            )
            message["content"] = parsed.content
            if self.reasoning is not None:
                message[self.reasoning.field] = parsed.reasoning
            if parsed.tool_calls:
                message["tool_calls"] = parsed.tool_calls
            choice["finish_reason"] = finish_reason(
                choice.get("finish_reason"), len(parsed.tool_calls) if self._calls_finish else 0
            )
        return _encode(obj)
