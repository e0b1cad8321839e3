"""Simulated inference workers: vLLM-compatible HTTP servers backed by a mock engine.

They stand in for GPU workers in lmgw's tests, demo and benchmarks: output is a deterministic
function of the prompt (so tests assert exact text through any route), and so are logprobs
(:mod:`.logprobs`: vLLM's and SGLang's shapes, equal through any route), latency follows a timing
model shaped like a 7-8B model on one GPU (``speed`` divides it; ``inf`` removes it), a prefix cache
makes ``cached_tokens`` and the vLLM metrics behave like the real thing, and faults (errors, hangs,
crashes, dropped streams, stalls, flapping health) are injected per worker, and LoRA adapters load
and unload at run time as vLLM's do. Roles: ``pd`` (merged),
``e``/``p``/``d`` (encode, prefill, decode) moving real bytes between them (vLLM NIXL P/D,
SGLang bootstrap, vLLM EPD's shared encoder cache).

Layout: :mod:`.engine` (sans-IO core), :mod:`.disagg` (sans-IO hand-off artefacts),
:mod:`.logprobs` (sans-IO logprobs and their shapes), :mod:`.faults`, :mod:`.lora` (sans-IO
adapter bookkeeping), :mod:`.app` (HTTP
handler: vLLM's OpenAI routes and SGLang's ``/generate``),
:mod:`.metrics` (Prometheus text), :mod:`.worker` (the ``python -m lmgw.simulators`` process),
:mod:`.fleet` (in-process workers and process fleets).
"""

from .app import ROLES, SimWorker, WorkerOptions
from .engine import (
    Completion,
    Engine,
    EngineConfig,
    PrefixCache,
    SamplingSpec,
    TimingModel,
    Tokenizer,
    render_chat,
)
from .faults import DropConnection, FaultInjector, Faults
from .fleet import (
    Fleet,
    FleetError,
    FleetMember,
    open_fleet,
    run_fleet,
    serve_worker_inprocess,
)

__all__ = [
    "ROLES",
    "Completion",
    "DropConnection",
    "Engine",
    "EngineConfig",
    "FaultInjector",
    "Faults",
    "Fleet",
    "FleetError",
    "FleetMember",
    "PrefixCache",
    "SamplingSpec",
    "SimWorker",
    "TimingModel",
    "Tokenizer",
    "WorkerOptions",
    "open_fleet",
    "render_chat",
    "run_fleet",
    "serve_worker_inprocess",
]
