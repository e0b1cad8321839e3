"""Tool calls and reasoning parsed out of a model's text, in the gateway (sans-IO).

Why here and not on the worker: a worker started without vLLM's ``--enable-auto-tool-choice``
sends the model's raw text; parsing in the gateway keeps workers interchangeable and lets one
fleet serve models of several tool formats (see ``docs/tools.md``).

- :func:`get_tool_parser` (by the config name: ``hermes``, ``llama3_json``, ``mistral``,
  ``qwen3_coder``, ``pythonic``, ``deepseek_v3``) gives a :class:`ToolParser`: share it per model.
- :meth:`ToolParser.extract` answers a whole output; :meth:`ToolParser.stream` makes a per-choice
  :class:`ToolStream` whose ``feed(delta_text)`` / ``finish()`` return OpenAI ``delta`` dicts.
- :class:`ReasoningParser` splits ``<think>`` reasoning; :class:`OutputStream` and
  :func:`parse_output` chain the two (reasoning first, tools in the content).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .ids import mistral_tool_call_id, tool_call_id
from .parsers import TOOL_PARSERS, get_tool_parser
from .parsers.base import Delta, ToolCall, ToolParser, ToolStream, assemble
from .reasoning import ReasoningParser, ReasoningStream

__all__ = [
    "TOOL_PARSERS",
    "Delta",
    "OutputStream",
    "ParsedOutput",
    "ReasoningParser",
    "ReasoningStream",
    "ToolCall",
    "ToolParser",
    "ToolStream",
    "assemble",
    "finish_reason",
    "get_tool_parser",
    "mistral_tool_call_id",
    "parse_output",
    "tool_call_id",
    "wants_tool_parsing",
]


def wants_tool_parsing(request: Mapping[str, Any]) -> bool:
    """Whether a chat request's output should go through the tool parser: it offers tools and
    ``tool_choice`` is not ``"none"`` (OpenAI's default with tools is ``"auto"``)."""
    tools = request.get("tools")
    return isinstance(tools, list) and bool(tools) and request.get("tool_choice") != "none"


def finish_reason(upstream: str | None, tool_calls: int) -> str | None:
    """The client's ``finish_reason``: ``"tool_calls"`` when the worker stopped on its own
    (``"stop"``) after at least one call was made; otherwise the worker's. A ``"length"`` stays
    ``"length"`` (the last call's arguments may be cut short; vLLM says ``tool_calls`` there)."""
    if tool_calls and upstream == "stop":
        return "tool_calls"
    return upstream


class OutputStream:
    """One choice's streamed output through a reasoning split and a tool parser, either one
    optional: reasoning deltas pass through, content deltas go to the tool stream."""

    __slots__ = ("reasoning", "tools")

    def __init__(self, tools: ToolStream | None, reasoning: ReasoningStream | None) -> None:
        self.tools = tools
        self.reasoning = reasoning

    @property
    def calls(self) -> int:
        """Tool calls begun so far (for :func:`finish_reason`)."""
        return 0 if self.tools is None else self.tools.calls

    def feed(self, text: str) -> list[Delta]:
        """The deltas ``text`` (the next piece of the model's output) makes certain."""
        if self.reasoning is None:
            if self.tools is None:
                return [{"content": text}] if text else []
            return self.tools.feed(text)
        return self._route(self.reasoning.feed(text), False)

    def finish(self) -> list[Delta]:
        """The held-back rest, at the end of the output."""
        if self.reasoning is None:
            return [] if self.tools is None else self.tools.finish()
        return self._route(self.reasoning.finish(), True)

    def _route(self, deltas: list[Delta], final: bool) -> list[Delta]:
        tools = self.tools
        if tools is None:
            return deltas
        out: list[Delta] = []
        for d in deltas:
            content = d.get("content")
            if content is None:
                out.append(d)
            else:
                out += tools.feed(content)
        if final:
            out += tools.finish()
        return out


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    """A whole output parsed: what goes into the answer's ``message``."""

    content: str | None
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


def parse_output(
    text: str,
    *,
    tools: ToolParser | None = None,
    reasoning: ReasoningParser | None = None,
    request: Mapping[str, Any] | None = None,
) -> ParsedOutput:
    """A non-streamed output: reasoning split off first, then tool calls from the content."""
    thought: str | None = None
    content: str | None = text
    if reasoning is not None:
        thought, content = reasoning.extract(text)
    if tools is None or content is None:
        return ParsedOutput(content, thought)
    content, calls = tools.extract(content, request)
    return ParsedOutput(content, thought, calls)
