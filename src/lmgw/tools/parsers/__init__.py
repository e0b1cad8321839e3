"""Tool-call parsers, one module per model family, looked up by the name a model's config
gives (``tool_parser = "hermes"``); the names are vLLM's ``--tool-call-parser`` names."""

from __future__ import annotations

from collections.abc import Callable

from .base import Delta, ToolCall, ToolParser, ToolStream, assemble
from .deepseek_v3 import DeepSeekV3Parser
from .hermes import HermesParser
from .llama3_json import Llama3JsonParser
from .mistral import MistralParser
from .pythonic import PythonicParser
from .qwen3_coder import Qwen3CoderParser

__all__ = [
    "TOOL_PARSERS",
    "Delta",
    "ToolCall",
    "ToolParser",
    "ToolStream",
    "assemble",
    "get_tool_parser",
]

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls
    for cls in (
        HermesParser,
        Llama3JsonParser,
        MistralParser,
        Qwen3CoderParser,
        PythonicParser,
        DeepSeekV3Parser,
    )
}
"""Every parser by its config name."""


def get_tool_parser(name: str, *, new_id: Callable[[], str] | None = None) -> ToolParser:
    """The parser a model's config names.

    Raises:
        ValueError: no parser of that name (the message lists them).
    """
    cls = TOOL_PARSERS.get(name)
    if cls is None:
        raise ValueError(
            f"unknown tool parser {name!r}: expected one of {', '.join(sorted(TOOL_PARSERS))}"
        )
    return cls(new_id=new_id)
