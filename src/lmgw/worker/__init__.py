"""The Disagg Worker side: serve the native ZeroMQ protocol around an :class:`Engine`.

* :mod:`.engine`: the engine interface and its engine-neutral results.
* :mod:`.server`: :class:`WorkerServer`, the ROUTER that serves an engine.
* :mod:`.announce`: how a worker announces itself to gateways (``--gateway``).
* :mod:`.sim`: :class:`SimEngine`, the simulator's mock engine (imported on first use).
* :mod:`.vllm`: :class:`VllmEngine`, vLLM's ``AsyncLLM`` (imported on first use; vLLM is not a
  dependency of lmgw).

Run one with ``python -m lmgw.worker --role pd --bind tcp://127.0.0.1:0`` (see :mod:`.cli`).
"""

from __future__ import annotations

from typing import Any

from .announce import Announce, advertised_endpoint, decode_announce, encode_announce
from .engine import (
    EncodeResult,
    Engine,
    EngineError,
    EngineRequest,
    GenerateOutput,
    PrefillResult,
    role_name,
)
from .server import WorkerServer, control_endpoint_for

__all__ = [
    "Announce",
    "EncodeResult",
    "Engine",
    "EngineError",
    "EngineRequest",
    "GenerateOutput",
    "PrefillResult",
    "SimEngine",
    "VllmEngine",
    "WorkerServer",
    "advertised_endpoint",
    "control_endpoint_for",
    "decode_announce",
    "encode_announce",
    "role_name",
]


def __getattr__(name: str) -> Any:
    # Lazy: the simulator imports the HTTP stack (and may one day import this package), and
    # vLLM's adapter must not be imported unless asked for.
    if name == "SimEngine":
        from .sim import SimEngine

        return SimEngine
    if name == "VllmEngine":
        from .vllm import VllmEngine

        return VllmEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
