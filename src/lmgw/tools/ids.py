"""Tool-call ids, in the shapes clients and chat templates expect.

Why two: OpenAI (and vLLM's ``qwen3_coder`` parser) use ``call_`` + 24 characters, but Mistral's
chat templates reject any id that is not exactly 9 alphanumerics when the conversation comes
back with the call in it, so vLLM's Mistral parser writes those instead.
"""

from __future__ import annotations

import os

__all__ = ["mistral_tool_call_id", "tool_call_id"]

_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def tool_call_id() -> str:
    """``call_`` + 24 random hex digits (96 bits)."""
    return "call_" + os.urandom(12).hex()


def mistral_tool_call_id() -> str:
    """9 random alphanumerics, the only id Mistral templates accept."""
    return "".join(_ALNUM[b % 62] for b in os.urandom(9))
