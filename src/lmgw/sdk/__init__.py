"""The SDK: :class:`Client` (HTTP, anyio: trio or asyncio), :class:`Gateway` (the gateway
in-process, trio) and :mod:`lmgw.aio` (that gateway's asyncio face), with the typed results,
stream events and errors they share. ``docs/sdk.md`` is the guide.

Names load on first use (module ``__getattr__``), as in :mod:`lmgw`: importing this package
costs nothing until a class is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> defining module (relative to this package)
_EXPORTS: dict[str, str] = {
    "Client": ".client",
    "Gateway": ".inprocess",
    "build_config": ".inprocess",
    "EventSink": ".inprocess",
    **{
        name: ".errors"
        for name in (
            "APIConnectionError",
            "APIError",
            "APITimeoutError",
            "AuthenticationError",
            "BadGateway",
            "BadRequest",
            "Conflict",
            "GatewayClosed",
            "GatewayTimeout",
            "InternalServerError",
            "NotFound",
            "PermissionDenied",
            "RateLimited",
            "RequestTooLarge",
            "ServiceUnavailable",
            "UnprocessableEntity",
        )
    },
    **{
        name: ".types"
        for name in (
            "ChatChoice",
            "ChatMessage",
            "ChatResult",
            "CompletionChoice",
            "CompletionResult",
            "ContentDelta",
            "Embedding",
            "EmbeddingResult",
            "Finish",
            "FunctionCall",
            "ModelInfo",
            "ReasoningDelta",
            "StreamEvent",
            "TokenizeResult",
            "ToolCall",
            "ToolCallDelta",
            "Usage",
            "UsageEvent",
        )
    },
    "Middleware": "..api.app",
    "register_dialect": ".extensions",
    "register_tool": ".extensions",
    "tool": ".extensions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # next time: a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
