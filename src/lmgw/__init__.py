"""lmgw: a low-latency gateway for disaggregated LLM serving.

The public SDK surface (``docs/sdk.md``)::

    lmgw.Client          async HTTP client of a running gateway (anyio: trio or asyncio)
    lmgw.Gateway         the whole gateway in-process (trio)
    lmgw.aio.Gateway     the same, for asyncio programs (trio on a dedicated thread)
    lmgw.APIError ...    typed errors, shared by all three
    lmgw.ChatResult ...  typed results and stream events
    lmgw.GatewayConfig   the configuration (lmgw.config)

Everything loads on first use (module ``__getattr__``), so ``import lmgw`` imports neither
trio, httptools nor numpy: ``python -X importtime -c "import lmgw"`` shows only this module.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SDK_NAMES = (
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AuthenticationError",
    "BadGateway",
    "BadRequest",
    "ChatChoice",
    "ChatMessage",
    "ChatResult",
    "Client",
    "CompletionChoice",
    "CompletionResult",
    "Conflict",
    "ContentDelta",
    "Embedding",
    "EmbeddingResult",
    "Finish",
    "FunctionCall",
    "Gateway",
    "GatewayClosed",
    "GatewayTimeout",
    "InternalServerError",
    "Middleware",
    "ModelInfo",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ReasoningDelta",
    "RequestTooLarge",
    "ServiceUnavailable",
    "StreamEvent",
    "TokenizeResult",
    "ToolCall",
    "ToolCallDelta",
    "UnprocessableEntity",
    "Usage",
    "UsageEvent",
    "register_dialect",
    "register_tool",
    "tool",
)
#: public name -> module that defines it; ``aio`` is a submodule
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(_SDK_NAMES, "lmgw.sdk"),
    "GatewayConfig": "lmgw.config",
    "ConfigError": "lmgw.config",
    "Policy": "lmgw.routing.policy",
    "RouteContext": "lmgw.routing.policy",
}
_SUBMODULES = frozenset({"aio", "sdk"})

__all__ = sorted([*_EXPORTS, *_SUBMODULES])

TYPE_CHECKING = False  # not typing's: importing typing costs ~2 ms here
if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ does the loading
    from . import aio as aio
    from .config import ConfigError as ConfigError
    from .config import GatewayConfig as GatewayConfig
    from .routing.policy import Policy as Policy
    from .routing.policy import RouteContext as RouteContext
    from .sdk.client import Client as Client
    from .sdk.errors import APIError as APIError
    from .sdk.inprocess import Gateway as Gateway


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # next time: a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
