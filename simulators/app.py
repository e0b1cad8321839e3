"""The HTTP face of a simulated vLLM worker: vLLM's OpenAI-compatible API, SGLang's native
``/generate``, /health, /metrics, /tokenize, /detokenize, plus /sim/* controls for tests.

Logprobs (:mod:`.logprobs`) are a deterministic function of (prompt, seed, position), like the
text: chat ``logprobs`` + ``top_logprobs``, completions ``logprobs``, ``prompt_logprobs``, in
vLLM's shapes (streamed events carry their token's); ``/generate`` answers ``return_logprob``
with SGLang's ``meta_info.input_token_logprobs`` / ``output_token_logprobs`` (and the top ones
with ``top_logprobs_num``). A prefill worker answers the prompt's, a decode worker only the
output's (it computed no prompt position), so a gateway's merge of the two is visible.

Roles: ``pd`` (merged prefill+decode), and the disaggregated ``e`` (encoder: writes each media
item's embedding to a shared ``ec_dir``), ``p`` (prefill: publishes the prompt's KV blocks and
answers vLLM NIXL's ``kv_transfer_params``, or publishes under an SGLang ``bootstrap_room`` or a
vLLM P2P NCCL pair id) and ``d`` (decode: fetches those blocks over the prefill worker's side
channel, ``GET /sim/kv/<key>`` on its HTTP port and on its KV port, verifies them and generates
exactly what a ``pd`` worker would). With ``kv_connector="lmcache"`` the p/d pair instead moves
KV chunks through a shared directory standing in for LMCache's store. The artefacts themselves
are in :mod:`.disagg` (sans-IO).

Which hand-off a request uses is read from the request itself, in this order: NIXL
``kv_transfer_params``, SGLang ``bootstrap_*`` fields, a P2P NCCL pair id in ``X-Request-Id``
(``kv_connector="auto"`` only), LMCache (``kv_connector="lmcache"``); a decode worker with none
of these refuses the request, since a decode-only worker never computes a prompt on its own.

Prompts are tokenized as a vLLM worker given the same model folder would (``model_dir``; see
:mod:`.engine`): ``/tokenize`` and ``/detokenize`` answer in vLLM's shapes, and ``usage`` counts
the same tokens, so the gateway's tokenization parity self-test passes against this worker.

Tool mode: a chat request with ``tools`` gets the model-style text of a call in the worker's
``tool_format`` (``hermes`` unless configured) when ``tool_choice`` names a function, is
``"required"``, or is ``"auto"`` and the user's final message names a tool; arguments are drawn
from the function's JSON schema, deterministically. The text is answered raw, with
``finish_reason: "stop"`` and no ``tool_calls``: a vLLM worker without
``--enable-auto-tool-choice``, whose output the gateway parses (docs/tools.md says where the
simulator and real vLLM differ). A conversation that ends with tool results (and makes no call)
gets ``Tool results: <r1> | <r2>``, so an agent loop's tests see what reached the model.

Structured outputs: ``response_format``, ``structured_outputs`` and the ``guided_*`` fields of a
chat or completions request are read by :mod:`lmgw.structured` (vLLM's rules, its 400s), and the
answer is text that satisfies the constraint (:mod:`.structured`: JSON valid against the schema,
a string the regex matches, one of the choices), deterministic like any answer; a constraint the
simulator cannot produce (a grammar, a regex backreference) is a 400 naming its field. A tool
call wins over a constraint (the simulator's tool mode handles ``tool_choice`` itself).

Routing fidelity: prefill takes time in proportion to the prompt tokens the prefix cache does
not hold (a bounded LRU of chained block hashes, :class:`.engine.PrefixCache`); requests over
``max_num_seqs`` wait, and with ``serial_prefill`` prefills compute one at a time, so a busy
worker queues and a cache hit frees capacity. With ``kv_events`` the worker publishes its prefix
cache's changes as vLLM does (:mod:`.kv_events`); ``GET /sim/prefix_cache`` lists what it holds.

``SimWorker`` is a handler in the contract of :mod:`lmgw.http.types`; any server that speaks that
contract (the native trio server, the ASGI adapter, a fake responder in tests) can serve it. The
engine logic lives in :mod:`.engine` (sans-IO); this module only parses, validates, sleeps per the
timing model and writes vLLM-shaped bytes.

LoRA (``enable_lora``, or adapters given at start with ``lora_modules``): vLLM's runtime adapter
routes (``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter``, as vLLM mounts them with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``), adapters listed in ``/v1/models`` after the base model and
accepted as ``model`` by every route that checks it; their bookkeeping is :mod:`.lora`. With
``max_loras`` (vLLM's ``--max-loras``) only that many adapters run at once: another adapter's
request waits for a slot (:class:`.lora.LoraSlots`); ``/metrics`` has ``vllm:lora_requests_info``.

Hot path (the simulator is the "direct" baseline of the gateway-overhead benchmarks, run at
``speed=inf``): requests are decoded by typed msgspec structs, the constant parts of every SSE
event are encoded once per request, output pieces are pre-encoded in the vocabulary, and each
decode step is one write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import msgspec
import trio

from lmgw.http.types import Headers, Request, Responder
from lmgw.structured import StructuredOutputError, structured_output
from lmgw.tools import TOOL_PARSERS
from lmgw.transport.openai_synth import token_id_name
from lmgw.transport.pool import ConnectionPool, Origin, UpstreamError

from .disagg import (
    KV_BLOCK_BYTES,
    LMCACHE_CHUNK_TOKENS,
    EmbeddingError,
    EmbeddingStore,
    KVStore,
    KVUnknownBlocks,
    KVVerifyError,
    LMCacheStore,
    PairId,
    derive_embedding,
    kv_block_payloads,
    parse_pair_id,
    prompt_digest,
    same_address,
    verify_kv_blocks,
)
from .engine import (
    DEFAULT_TOOL_FORMAT,
    Completion,
    Engine,
    EngineConfig,
    LoraKey,
    MediaItem,
    PromptError,
    RenderedPrompt,
    ReplyPlan,
    SamplingSpec,
    StructuredPlan,
    Ticket,
    TimingModel,
    ToolPlan,
    choice_sampling,
    plan_tool_call,
    tool_results_reply,
)
from .faults import DropConnection, FaultInjector, Faults
from .kv_events import KvEventPublisher
from .logprobs import (
    MAX_TOP_LOGPROBS,
    TokenLogprob,
    chat_entry,
    chat_logprobs,
    completion_logprobs,
    prompt_logprobs,
    sglang_tokens,
    sglang_top,
)
from .lora import LoraAdapters, LoraError, LoraSlots
from .metrics import render_lora_info, render_metrics
from .structured import Unsimulated

BEST_OF_MESSAGE = (
    "best_of > 1 is not supported (vLLM V1 removed it): ask for n choices with logprobs and"
    " pick one"
)
"""The 400 for ``best_of > 1``, worded as the gateway's native path words it."""

RECENT = 256
"""How many aborted requests and request ids /sim/stats remembers."""

ROLES = ("e", "p", "d", "pd")
"""Roles a simulated worker can take: encode, prefill, decode, merged prefill+decode."""
KV_CONNECTORS = ("auto", "lmcache")
HANDOFFS = ("direct", "pool")
POOL_POLL_S = 0.005
"""How often a decode worker looks for KV not yet in the pool (SGLang's concurrent legs)."""
"""``direct``: the side channel and ``ec_dir``; ``pool``: the cache pool (``lmgw.cache``)."""
"""``auto``: NIXL, SGLang or P2P NCCL, as each request asks; ``lmcache``: LMCache's shared store."""
MAX_KV_WAIT_S = 600.0
"""Upper bound on how long the side channel holds a fetch open for a KV not yet published."""


@dataclass(slots=True)
class WorkerOptions:
    """Configuration of one simulated worker (the CLI flags of ``python -m lmgw.simulators``)."""

    model: str = "sim-model"
    served_model_names: tuple[str, ...] = ()
    role: str = "pd"
    host: str = "127.0.0.1"
    port: int = 0
    speed: float = 1.0
    #: timing model coefficients to set, e.g. (("c", 0.002), ("d", 0.004)) (``--timing``)
    timing: tuple[tuple[str, float], ...] = ()
    seed: int = 0
    #: the fault RNG's seed (None: ``seed``): a fleet gives each worker its own, so that their
    #: error and stall draws are independent while their answers stay the same
    fault_seed: int | None = None
    max_num_seqs: int = 256
    kv_blocks: int = 8192
    block_size: int = 16
    max_model_len: int | None = None
    """The context length; None: the model folder's (``config.json``)."""
    model_dir: str | None = None
    """The model folder the worker tokenizes with (``tokenizer.json``, chat template), as vLLM's
    model path; None: the sim-model built in the per-user cache (``~/.cache/lmgw``)."""
    api_key: str | None = None
    faults: Faults = field(default_factory=Faults)
    exit_on_crash: bool = False
    """True only when the worker is its own process: ``crash_at_token`` then exits it."""
    engine_id: str | None = None
    """The KV engine id a prefill worker reports as ``remote_engine_id`` (a uuid4 if unset)."""
    ec_dir: str | None = None
    """Shared encoder-cache directory: ``e`` writes embeddings there, ``p``/``pd`` require them."""
    kv_ttl_s: float = 480.0
    """How long a prefill worker keeps unfetched KV (vLLM's NIXL abort timeout)."""
    kv_store_entries: int = 4096
    """At most this many requests' KV held by a prefill worker (oldest evicted)."""
    kv_fetch_timeout_s: float = 10.0
    """A decode worker's bound on one KV fetch from its prefill worker."""
    zone: str | None = None
    """This worker's KV-transfer domain (a node, an NVLink island, a rack): a decode worker
    takes a prefill worker's KV at ``kv_gbps_same_zone`` from a peer of its own zone and at
    ``kv_gbps_cross_zone`` from any other (None and None are the same zone; None and a named
    zone are not). A prefill worker announces it to decode workers with its hand-offs."""
    kv_bytes_per_token: int = 0
    """The modelled KV size of one prompt token (131072: Llama-3-8B fp16; 327680: Llama-3-70B);
    a decode worker sleeps ``tokens * kv_bytes_per_token / (GB/s * 1e9)`` per hand-off before
    its first token. 0: transfers take no modelled time."""
    kv_gbps_same_zone: float = 100.0
    """KV transfer bandwidth from a prefill worker of the same zone, in GB/s (gigabytes)."""
    kv_gbps_cross_zone: float = 12.5
    """KV transfer bandwidth from a prefill worker of another zone, in GB/s (gigabytes)."""
    bootstrap_timeout_s: float = 30.0
    """How long a decode worker waits for KV not yet published: an SGLang room's, or a P2P NCCL
    pair's (sequential legs normally publish before D asks; the wait only covers a race)."""
    kv_port: int | None = None
    """The P2P NCCL KV listener (``kv_port`` of vLLM's KV transfer config): a second port serving
    this same handler, so the side channel is reachable there; 0 picks a free port, None: none.
    ``host:kv_port`` is the worker's KV address, the one pair ids name."""
    kv_connector: str = "auto"
    """One of :data:`KV_CONNECTORS`."""
    lmcache_dir: str | None = None
    """LMCache's store, simulated by a directory shared by the p and d workers."""
    lmcache_strict: bool = True
    """Decode with chunks missing from LMCache: a 500 (True) or recompute the prompt (False, what
    real LMCache does silently)."""
    lmcache_chunk_size: int = LMCACHE_CHUNK_TOKENS
    """Tokens per LMCache chunk (its ``chunk_size``); p and d must agree."""
    stream_head: str = "arrival"
    """When a streamed answer's 200 and event-stream head goes out: ``arrival`` (at once,
    before queueing and prefill, as vLLM's OpenAI server does: uvicorn writes a
    StreamingResponse's head when it starts) or ``first_token`` (after the prefill, with the
    first event, as the simulators did before)."""
    serial_prefill: bool = False
    """Prefills compute one at a time, FIFO (:attr:`EngineConfig.serial_prefill`): a busy worker
    queues, so time to first token grows with load and cache hits raise capacity."""
    handoff: str = "direct"
    """How hand-offs travel: ``direct`` (KV blocks over the prefill worker's side channel,
    encoder outputs in ``ec_dir``) or ``pool`` (both through the cache pool, :data:`pool_tiers`:
    E puts each embedding, P puts the prompt's KV blocks, D takes them; verified byte for byte
    as ever)."""
    pool_tiers: tuple[str, ...] = ("shm",)
    """The hand-off pool's tiers (``shm``: one host; ``redis``: across hosts)."""
    pool_redis_url: str | None = None
    pool_shm_name: str = "lmgw-handoff"
    pool_ttl_s: float = 600.0
    """How long a hand-off stays in the pool if nobody takes it (encoder outputs stay cached)."""
    kv_events: str | None = None
    """Bind a ZMQ publisher of vLLM-shaped KV events here (``tcp://127.0.0.1:0``: a free port;
    :mod:`.kv_events`); None: no events."""
    local_prefill: bool = False
    """A decode worker that also serves a request carrying no hand-off, prefilling it itself
    (a vLLM decode instance is a whole engine: the gateway's conditional disaggregation sends
    it short prompts). False: such a request is refused, which is how tests catch a decode leg
    sent without its prefill's hand-off."""
    dp_rank: int | None = None
    """This engine is data-parallel rank r of a server run with ``--data-parallel-size``
    (:mod:`.dp`): its metrics carry ``engine="r"`` and its KV event batches name the rank."""
    tool_format: str = DEFAULT_TOOL_FORMAT
    """How the model writes tool calls (a parser name of :mod:`lmgw.tools`) when a chat request
    carries ``tools``: the worker answers with that raw text, like a vLLM worker started without
    ``--enable-auto-tool-choice``, and leaves the parsing to the gateway (docs/tools.md)."""
    enable_lora: bool = False
    """Serve LoRA adapters and mount vLLM's runtime load/unload routes (``--enable-lora``)."""
    lora_modules: tuple[tuple[str, str], ...] = ()
    """``(name, path)`` adapters loaded at start (``--lora-modules``); implies ``enable_lora``."""
    max_loras: int | None = None
    """Adapters active in the running batch at once (vLLM's ``--max-loras``): a request whose
    adapter finds no slot waits, as in vLLM's scheduler; None: unlimited, no waiting."""
    lora_load_s: float = 0.02
    """Activating an adapter in a slot (loading its weights onto the GPU), at speed 1; only with
    ``max_loras``."""

    def __post_init__(self) -> None:
        zone = self.zone
        if zone is not None and not (
            zone and zone.isascii() and zone.isprintable() and zone.split() == [zone]
        ):
            raise ValueError(f"zone {zone!r}: expected a printable ASCII name without spaces")
        if self.kv_bytes_per_token < 0:
            raise ValueError("kv_bytes_per_token must be >= 0")
        if self.stream_head not in ("first_token", "arrival"):
            raise ValueError(f"stream_head {self.stream_head!r}: expected first_token or arrival")
        if not (self.kv_gbps_same_zone > 0 and self.kv_gbps_cross_zone > 0):
            raise ValueError("kv_gbps_same_zone and kv_gbps_cross_zone must be > 0 (GB/s)")

    @property
    def served_names(self) -> tuple[str, ...]:
        return self.served_model_names or (self.model,)

    @property
    def lora_enabled(self) -> bool:
        """Whether the LoRA routes exist: asked for, or implied by start-up adapters."""
        return self.enable_lora or bool(self.lora_modules)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            seed=self.seed,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            kv_blocks=self.kv_blocks,
            block_size=self.block_size,
            timing=TimingModel(speed=self.speed, **dict(self.timing)),
            model_dir=self.model_dir,
            serial_prefill=self.serial_prefill,
        )


# ------------------------------------------------------------------------------------------------
# Request bodies (typed views; unknown fields are ignored, as vLLM ignores extra fields)
# ------------------------------------------------------------------------------------------------


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class _HandOffFields(msgspec.Struct, kw_only=True):
    """What names a disaggregated request's hand-off (any generation route)."""

    kv_transfer_params: dict[str, Any] | None = None
    bootstrap_host: str | list[str] | None = None
    bootstrap_port: int | list[int | None] | None = None
    bootstrap_room: int | list[int] | None = None


_NULL = msgspec.Raw(b"null")


class _GenRequest(_HandOffFields, kw_only=True):
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    n: int | None = 1
    best_of: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    temperature: float | None = None
    top_p: float | None = None
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool | None = None
    # structured outputs (lmgw.structured reads them): raw, decoded only when sent
    response_format: msgspec.Raw = _NULL
    structured_outputs: msgspec.Raw = _NULL
    guided_json: msgspec.Raw = _NULL
    guided_regex: msgspec.Raw = _NULL
    guided_choice: msgspec.Raw = _NULL
    guided_grammar: msgspec.Raw = _NULL
    guided_whitespace_pattern: msgspec.Raw = _NULL


_STRUCTURED_FIELDS = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_whitespace_pattern",
)

# What shapes a chat prompt (messages, tools, documents, chat_template_kwargs) stays raw JSON:
# the bytes key the tokenizer's prompt cache and are decoded only on a miss (the simulator is
# the overhead benchmarks' baseline).


class ChatRequest(_GenRequest, kw_only=True):
    messages: msgspec.Raw
    tools: msgspec.Raw = _NULL
    tool_choice: msgspec.Raw = _NULL
    documents: msgspec.Raw = _NULL
    chat_template_kwargs: msgspec.Raw = _NULL
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None


class CompletionRequest(_GenRequest, kw_only=True):
    prompt: Any = None
    echo: bool | None = False
    add_special_tokens: bool = True
    logprobs: int | None = None


class SglangSampling(msgspec.Struct, kw_only=True):
    """SGLang's ``sampling_params`` (the fields that change the simulator's output)."""

    max_new_tokens: int | None = 128
    min_new_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    no_stop_trim: bool = False
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    sampling_seed: int | None = None


class GenerateRequest(_HandOffFields, kw_only=True):
    """SGLang's native ``/generate`` (``GenerateReqInput``): a prompt or a batch of them;
    the per-prompt fields may be lists (one per prompt)."""

    model: str | None = None
    text: str | list[str] | None = None
    input_ids: list[Any] | None = None  # one prompt's ids, or a list of them
    sampling_params: SglangSampling | list[SglangSampling] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """vLLM's TokenizeChatRequest (``messages``) or TokenizeCompletionRequest (``prompt``)."""

    model: str | None = None
    prompt: str | None = None
    messages: msgspec.Raw = _NULL
    tools: msgspec.Raw = _NULL
    documents: msgspec.Raw = _NULL
    chat_template_kwargs: msgspec.Raw = _NULL
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None  # vLLM: False for chats, True for prompts
    return_token_strs: bool | None = False


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


class LoadLoraRequest(msgspec.Struct, kw_only=True):
    """vLLM's ``LoadLoRAAdapterRequest``: both fields required (absent: a 400 from decoding,
    as vLLM's validation answers; empty: vLLM's own 400)."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoraRequest(msgspec.Struct, kw_only=True):
    """vLLM's ``UnloadLoRAAdapterRequest`` (``lora_int_id`` is accepted and ignored)."""

    lora_name: str
    lora_int_id: int | None = None


_chat_decoder = msgspec.json.Decoder(ChatRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_tokenize_decoder = msgspec.json.Decoder(TokenizeRequest)
_detokenize_decoder = msgspec.json.Decoder(DetokenizeRequest)
_generate_decoder = msgspec.json.Decoder(GenerateRequest)
_load_lora_decoder = msgspec.json.Decoder(LoadLoraRequest)
_unload_lora_decoder = msgspec.json.Decoder(UnloadLoraRequest)
_encode = msgspec.json.encode


class ApiError(Exception):
    """An error answered with vLLM's error body ``{"error": {message, type, param, code}}``."""

    TYPES = {
        400: "BadRequestError",
        401: "AuthenticationError",
        404: "NotFoundError",
        500: "InternalServerError",
        503: "ServiceUnavailableError",
    }

    def __init__(
        self, status: int, message: str, param: str | None = None, *, err_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.err_type = err_type
        """The error ``type`` where vLLM names one of its own (default: by status)."""

    def body(self) -> bytes:
        err_type = self.err_type or self.TYPES.get(self.status, "InternalServerError")
        return _encode(
            {
                "error": {
                    "message": self.message,
                    "type": err_type,
                    "param": self.param,
                    "code": self.status,
                }
            }
        )


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


# ------------------------------------------------------------------------------------------------
# Per-request plan
# ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    """What one generation request will do: prompts, the precomputed choices, output shape."""

    kind: str  # "chat" | "completion" | "generate" (SGLang's native route)
    request_id: str
    model: str
    prompts: list[Sequence[int]]
    choices: list[Completion]
    stream: bool
    include_usage: bool
    continuous_usage: bool
    echo_texts: list[str] | None = None  # completions with echo: prompt text per choice
    cached_tokens: int = 0  # known after prefill
    cached_per_prompt: list[int] = field(default_factory=list)  # the same, per prompt
    external_cached: int | list[int] = 0  # prompt tokens whose KV came from a prefill worker
    extra_prefill_s: float = 0.0  # e.g. the encoder's per-item time
    after_prefill: Callable[[], None] | None = None  # publishes a hand-off once "computed"
    publish: Callable[[], Awaitable[None]] | None = None  # the same, through the cache pool
    kv_transfer_params: dict[str, Any] | None = None  # the non-stream body's field
    logprobs: int | None = None  # OpenAI routes: top logprobs per output token; None: not asked
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs; None: not asked
    sglang: _SglangOptions | None = None  # /generate: its per-prompt options
    output_logprobs: list[list[TokenLogprob]] | None = None  # per choice, computed once
    token_ids_as_names: bool = False  # vLLM's return_tokens_as_token_ids: "token_id:N"

    @property
    def n(self) -> int:
        """Choices per prompt."""
        return max(1, len(self.choices) // max(1, len(self.prompts)))

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)


@dataclass(slots=True)
class _SglangOptions:
    """A ``/generate`` request's per-prompt options (lists of the batch's length)."""

    batch: bool  # the answer is a list (a batch, or n > 1), else one object
    rids: list[str]  # meta_info.id per choice
    return_logprob: list[bool]
    start: list[int]  # logprob_start_len, resolved (-1: the last prompt token)
    top: list[int]  # top_logprobs_num
    with_text: bool  # return_text_in_logprobs


def _sampling(req: _GenRequest, max_tokens: int | None) -> SamplingSpec:
    stop = req.stop
    stops: tuple[str, ...] = (
        () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    )
    return SamplingSpec(
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        stop=stops,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        include_stop_str_in_output=req.include_stop_str_in_output,
        seed=req.seed,
    )


def _validate_sampling(req: _GenRequest, max_tokens: int | None) -> int:
    """vLLM's checks (messages as in ``SamplingParams._verify_args``); returns n."""
    n = 1 if req.n is None else req.n
    if n < 1:
        raise _bad(f"n must be at least 1, got {n}.", "n")
    if req.best_of not in (None, 1):  # vLLM V1 refused it, then dropped the field
        raise _bad(BEST_OF_MESSAGE, "best_of")
    if max_tokens is not None and max_tokens < 1:
        raise _bad(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    if req.min_tokens < 0:
        raise _bad(
            f"min_tokens must be greater than or equal to 0, got {req.min_tokens}.", "min_tokens"
        )
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise _bad(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
            f"got {req.min_tokens}.",
            "min_tokens",
        )
    if req.temperature is not None and req.temperature < 0:
        raise _bad(f"temperature must be non-negative, got {req.temperature}.", "temperature")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise _bad(f"top_p must be in (0, 1], got {req.top_p}.", "top_p")
    if req.stream_options is not None and not req.stream:
        raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
    return n


def _validate_sglang_sampling(sp: SglangSampling) -> None:
    """SGLang's ``SamplingParams.verify`` checks (the ones that concern the simulator)."""
    if sp.max_new_tokens is not None and sp.max_new_tokens < 0:
        raise _bad(
            f"max_new_tokens must be at least 0, got {sp.max_new_tokens}.", "sampling_params"
        )
    if sp.min_new_tokens < 0:
        raise _bad(
            f"min_new_tokens must be at least 0, got {sp.min_new_tokens}.", "sampling_params"
        )
    if sp.temperature is not None and sp.temperature < 0:
        raise _bad(f"temperature must be non-negative, got {sp.temperature}.", "sampling_params")
    if sp.top_p is not None and not 0.0 < sp.top_p <= 1.0:
        raise _bad(f"top_p must be in (0, 1], got {sp.top_p}.", "sampling_params")


def _per_prompt(value: Any, default: Any, count: int, n: int, name: str) -> list[Any]:
    """A ``/generate`` field given once or per prompt, as one value per prompt."""
    if value is None:
        return [default] * count
    if not isinstance(value, list):
        return [value] * count
    if n > 1:
        raise _bad(f"Cannot use list {name} with parallel_sample_num > 1", name)
    if len(value) != count:
        raise _bad(f"{name} must have one entry per prompt ({count})", name)
    return list(value)


def _logprob_start(start: int, prompt_len: int) -> int:
    """``logprob_start_len`` resolved: -1 is the prompt's last token (SGLang's default)."""
    if start == -1:
        return prompt_len - 1
    if not 0 <= start < prompt_len:
        raise _bad(
            f"logprob_start_len ({start}) is higher than the number of input tokens "
            f"({prompt_len}). Request with a lower logprob_start_len.",
            "logprob_start_len",
        )
    return start


def _sglang_rids(rid: Any, request_id: str, count: int, single: bool) -> list[str]:
    """Each answer's ``meta_info.id``: the ``rid`` given (``{rid}_{k}`` for a batch from one
    string), else the request's id."""
    if isinstance(rid, list):
        if len(rid) != count:
            raise _bad("The specified rids length mismatch with the batch_size.", "rid")
        return [str(r) for r in rid]
    base = rid if isinstance(rid, str) else request_id
    return [base] if single else [f"{base}_{k}" for k in range(count)]


def _max_logprobs(k: int, what: str, param: str) -> int:
    if k > MAX_TOP_LOGPROBS:
        raise _bad(
            f"Requested {what} logprobs of {k}, which is greater than max allowed: "
            f"{MAX_TOP_LOGPROBS}",
            param,
        )
    return k


def _chat_logprobs(req: ChatRequest) -> int | None:
    """The top logprobs a chat asks for per token (None: no logprobs); vLLM's checks."""
    top = req.top_logprobs
    if top is not None:
        if top < 0:
            raise _bad("`top_logprobs` must be a positive value.", "top_logprobs")
        if top > 0 and not req.logprobs:
            raise _bad("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
    if not req.logprobs:
        return None
    return _max_logprobs(top or 0, "sample", "top_logprobs")


def _completion_logprobs(req: CompletionRequest) -> int | None:
    k = req.logprobs
    if k is None:
        return None
    if k < 0:
        raise _bad("`logprobs` must be a positive value.", "logprobs")
    return _max_logprobs(k, "sample", "logprobs")


def _prompt_logprobs(req: _GenRequest) -> int | None:
    k = req.prompt_logprobs
    if k is None:
        return None
    if req.stream and k > 0:
        raise _bad("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
    if k < 0:
        raise _bad("`prompt_logprobs` must be a positive value.", "prompt_logprobs")
    return _max_logprobs(k, "prompt", "prompt_logprobs")


# ------------------------------------------------------------------------------------------------
# The worker
# ------------------------------------------------------------------------------------------------

_JSON = (b"content-type", b"application/json")
_SSE = (b"content-type", b"text/event-stream; charset=utf-8")
_TEXT = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
_DONE = b"data: [DONE]\n\n"

Route = Callable[[Request, Responder, bytes], Awaitable[None]]


@dataclass(slots=True)
class SimStats:
    """Simulator-only bookkeeping behind GET /sim/stats (tests read it)."""

    requests_total: int = 0
    in_flight: int = 0
    aborted_total: int = 0
    dropped_total: int = 0
    errors_injected: int = 0
    aborted: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))
    request_ids: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT))
    last_headers: Headers = field(default_factory=list)
    kv_blocks_fetched: int = 0
    kv_blocks_verified: int = 0
    kv_fetch_failures: int = 0
    kv_verify_failures: int = 0
    kv_transfer_seconds_total: float = 0.0
    """Modelled KV transfer time slept by this decode worker (``kv_bytes_per_token``)."""
    kv_transfers_same_zone: int = 0
    kv_transfers_cross_zone: int = 0
    local_prefills: int = 0
    """Requests this decode worker prefilled itself (``local_prefill``: no hand-off came)."""
    p2p_published: int = 0
    p2p_received: int = 0
    p2p_misrouted: int = 0
    pool_kv_published: int = 0
    pool_kv_taken: int = 0
    pool_embeddings_stored: int = 0
    pool_embeddings_found: int = 0
    pool_embeddings_missing: int = 0
    lora_requests: dict[str, int] = field(default_factory=dict)
    """Requests per LoRA adapter: those that named it as ``model`` and passed the model check."""


class _Waiters:
    """Fetches parked on a KV key not yet published (SGLang sends both legs at once)."""

    __slots__ = ("count", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.count = 0


class SimWorker:
    """A simulated vLLM worker of one role (see the module docstring) as an HTTP handler.

    Args:
        options: the worker's configuration; ``options.faults`` are the start-up faults.
        engine: an engine to share (tests); a fresh one is built from ``options`` otherwise.
    """

    def __init__(self, options: WorkerOptions | None = None, *, engine: Engine | None = None):
        self.options = options or WorkerOptions()
        opts = self.options
        if opts.role not in ROLES:
            raise ValueError(unsupported_role_message(opts.role))
        if opts.handoff not in HANDOFFS:
            raise ValueError(f"unknown handoff {opts.handoff!r}: expected one of {HANDOFFS}")
        if opts.role == "e" and not opts.ec_dir and opts.handoff != "pool":
            raise ValueError("an encode worker (role e) needs ec_dir (--ec-dir) or handoff pool")
        if opts.tool_format not in TOOL_PARSERS:
            raise ValueError(
                f"unknown tool_format {opts.tool_format!r}: expected one of "
                f"{', '.join(sorted(TOOL_PARSERS))}"
            )
        if opts.kv_connector not in KV_CONNECTORS:
            raise ValueError(
                f"unknown kv_connector {opts.kv_connector!r}: expected one of "
                f"{', '.join(KV_CONNECTORS)}"
            )
        lmcache = opts.kv_connector == "lmcache" and opts.role in ("p", "d")
        if lmcache and not opts.lmcache_dir:
            raise ValueError("kv_connector lmcache needs lmcache_dir (--lmcache-dir)")
        self.lmcache = (
            LMCacheStore(opts.lmcache_dir, model=opts.model, chunk_size=opts.lmcache_chunk_size)
            if lmcache and opts.lmcache_dir
            else None
        )
        """The LMCache store of an lmcache p or d worker (None otherwise)."""
        self.engine_id = opts.engine_id or str(uuid.uuid4())
        self.kv_store = KVStore(max_entries=opts.kv_store_entries, ttl_s=opts.kv_ttl_s)
        self.ec_store = (
            EmbeddingStore(opts.ec_dir)
            if opts.ec_dir and opts.role != "d" and opts.handoff != "pool"
            else None
        )
        self.handoff_pool = None
        """The cache pool hand-offs go through (``handoff="pool"``), else None."""
        if opts.handoff == "pool":
            from lmgw.cache import CacheConfig, build_pool

            self.handoff_pool = build_pool(
                CacheConfig(
                    tiers=list(opts.pool_tiers),
                    redis_url=opts.pool_redis_url,
                    shm_name=opts.pool_shm_name,
                    ttl_s=opts.pool_ttl_s,
                ),
                producer=self.engine_id,
                role=opts.role,
            )
        self.bound_port: int | None = None
        """The port the server bound (set by :func:`serve_worker_inprocess`): the side channel."""
        self.kv_bound_port: int | None = None
        """The KV listener's bound port (set by :func:`serve_worker_inprocess`)."""
        self._kv_waiters: dict[str, _Waiters] = {}
        self._pool = ConnectionPool(connect_timeout_s=min(5.0, opts.kv_fetch_timeout_s))
        self._origins: dict[tuple[str, int], Origin] = {}
        self.engine = engine or Engine(self.options.engine_config())
        fault_seed = self.options.fault_seed
        self.faults = FaultInjector(
            self.options.faults, seed=self.options.seed if fault_seed is None else fault_seed
        )
        self.engine.slow = self.faults.faults.slow
        self.stats = SimStats()
        self._slots = trio.Semaphore(max(1, self.options.max_num_seqs))
        self._prefill_lock = trio.Lock()  # FIFO: serial prefills queue in arrival order
        self._lora_slots = LoraSlots(opts.max_loras)
        self._lora_freed = trio.lowlevel.ParkingLot()  # requests waiting for a LoRA slot
        self.kv_events = (
            KvEventPublisher(opts.kv_events, rank=opts.dp_rank) if opts.kv_events else None
        )
        """The KV event publisher (``options.kv_events``); run by serve_worker_inprocess."""
        if self.kv_events is not None:
            self.engine.cache.listener = self.kv_events.add
        self._names = frozenset(self.options.served_names)
        self._default_model = self.options.served_names[0]
        self._created = int(time.time())
        key = self.options.api_key
        self._auth = f"Bearer {key}".encode() if key else None
        self._routes: dict[str, tuple[frozenset[str], Route]] = {
            "/v1/chat/completions": (frozenset({"POST"}), self._chat),
            "/v1/completions": (frozenset({"POST"}), self._completions),
            "/generate": (frozenset({"POST"}), self._generate),
            "/v1/models": (frozenset({"GET"}), self._models),
            "/health": (frozenset({"GET"}), self._health),
            "/metrics": (frozenset({"GET"}), self._metrics),
            "/version": (frozenset({"GET"}), self._version),
            # SGLang's (the older name, and the newer): its P/D mode and bootstrap port
            "/get_server_info": (frozenset({"GET"}), self._server_info),
            "/server_info": (frozenset({"GET"}), self._server_info),
            "/tokenize": (frozenset({"POST"}), self._tokenize),
            "/detokenize": (frozenset({"POST"}), self._detokenize),
            "/sim/stats": (frozenset({"GET"}), self._sim_stats),
            "/sim/faults": (frozenset({"GET", "POST"}), self._sim_faults),
            "/sim/reset": (frozenset({"POST"}), self._sim_reset),
            "/sim/prefix_cache": (frozenset({"GET"}), self._sim_prefix_cache),
        }
        self.lora = LoraAdapters(opts.lora_modules)
        """The LoRA adapters served (none unless ``options.lora_enabled``)."""
        if opts.lora_enabled:
            self._routes["/v1/load_lora_adapter"] = (frozenset({"POST"}), self._load_lora)
            self._routes["/v1/unload_lora_adapter"] = (frozenset({"POST"}), self._unload_lora)
        self._models_body = self._build_models_body()
        from .passthru import install  # pooling, Responses, Anthropic, audio (not generation)

        self._prefix_routes: list[tuple[str, tuple[frozenset[str], Route]]] = []
        install(self)

    # -- dispatch ---------------------------------------------------------------------------------

    async def __call__(self, request: Request, responder: Responder) -> None:
        path = request.path
        entry = self._routes.get(path)
        if entry is None and path.startswith("/sim/kv/"):
            entry = (frozenset({"GET"}), self._sim_kv)
        elif entry is None:
            entry = next((e for p, e in self._prefix_routes if path.startswith(p)), None)
        rid = request.header(b"x-request-id")
        if rid is None:
            rid = uuid.uuid4().hex.encode()
        elif path != "/health" and path != "/metrics" and not path.startswith("/sim/"):
            self.stats.request_ids.append(rid.decode("latin-1"))
        if entry is None:
            await _send_json(responder, 404, b'{"detail":"Not Found"}', rid)
            return
        methods, route = entry
        if request.method not in methods:
            await _send_json(responder, 405, b'{"detail":"Method Not Allowed"}', rid)
            return
        try:
            if not path.startswith("/sim/"):
                if path != "/health" and path != "/metrics":
                    self.stats.last_headers = request.headers  # decoded only when asked
                if self.faults.faults.refuse:
                    raise ApiError(503, "The simulated worker refuses requests (fault: refuse).")
                if (
                    self._auth is not None
                    and path.startswith("/v1/")
                    and request.header(b"authorization") != self._auth
                ):
                    await _send_json(responder, 401, b'{"error":"Unauthorized"}', rid)
                    return
            await route(request, responder, rid)
        except ApiError as exc:
            if responder.started:
                raise
            await _send_json(responder, exc.status, exc.body(), rid)

    def _resolve_model(self, model: str | None) -> str:
        """The served name ``model`` asks for (a base name first, then an adapter, as vLLM
        checks), or vLLM's 404."""
        if model is None:
            return self._default_model
        if model not in self._names and model not in self.lora:
            raise ApiError(404, f"The model `{model}` does not exist.", "model")
        return model

    def _check_model(self, model: str | None) -> str:
        """:meth:`_resolve_model` for a request that runs the model: one naming an adapter is
        counted in ``stats.lora_requests`` (what tests of adapter routing read)."""
        name = self._resolve_model(model)
        if name not in self._names:
            counts = self.stats.lora_requests
            counts[name] = counts.get(name, 0) + 1
        return name

    def _lora_key(self, plan: _Plan) -> LoraKey | None:
        """The adapter a plan runs, for the prefix cache to keep its blocks apart (vLLM hashes
        the adapter into every block); None for a base model name, the common case."""
        name = plan.model
        if name in self._names:
            return None
        return LoraKey.of(name, self.lora.lora_id(name))

    # -- generation -------------------------------------------------------------------------------

    async def _chat(self, request: Request, responder: Responder, rid: bytes) -> None:
        try:
            req = _chat_decoder.decode(request.body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _bad(str(exc)) from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        n = _validate_sampling(req, max_tokens)
        model = self._check_model(req.model)
        rendered = self._render_chat(req, req.add_special_tokens)
        self._check_length(len(rendered.token_ids), max_tokens, "messages")
        spec = _sampling(req, self._leg_max_tokens(req, max_tokens))
        ids = rendered.token_ids
        structured = self._structured(req, "chat")
        constraint = structured[0] if structured is not None else None
        try:
            choices = (
                self._continuation(req, spec, constraint)
                if req.continue_final_message and n == 1
                else None
            )
            if choices is None:
                tool = self._output_plan(req, constraint)
                choices = [
                    self.engine.generate(ids, *choice_sampling(spec, i), tool) for i in range(n)
                ]
        except Unsimulated as exc:
            raise _bad(str(exc), structured[1] if structured else None) from None
        stream = bool(req.stream)
        so = req.stream_options
        plan = _Plan(
            "chat",
            rid.decode("latin-1"),
            model,
            [ids],
            choices,
            stream,
            bool(stream and so is not None and so.include_usage),
            bool(stream and so is not None and so.continuous_usage_stats),
            logprobs=_chat_logprobs(req),
            prompt_logprobs=_prompt_logprobs(req),
            token_ids_as_names=bool(req.return_tokens_as_token_ids),
        )
        await self._prepare_leg(req, plan, rendered.media)
        await self._run(plan, responder, rid)

    def _render_chat(
        self, req: ChatRequest | TokenizeRequest, add_special_tokens: bool
    ) -> RenderedPrompt:
        """A chat request's prompt, as vLLM builds it (the template, then the tokenizer), from
        the tokenizer's cache when the same raw JSON was rendered before."""
        tok = self.engine.tokenizer
        media = self.engine.config.media
        raw = (
            bytes(req.messages),
            bytes(req.tools),
            bytes(req.documents),
            bytes(req.chat_template_kwargs),
        )
        agp, cfm = req.add_generation_prompt, req.continue_final_message
        key = ("chat-json", *raw, agp, cfm, add_special_tokens, media)
        hit = tok.cached(key)
        if hit is not None:
            return hit
        try:
            messages, tools, documents, kwargs = (msgspec.json.decode(r) for r in raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _bad(str(exc)) from None
        try:
            return tok.render_chat(
                messages,
                add_generation_prompt=agp,
                continue_final_message=cfm,
                tools=tools,
                documents=documents,
                chat_template_kwargs=kwargs,
                add_special_tokens=add_special_tokens,
                media=media,
                cache_key=key,
                cache_chars=sum(map(len, raw)),
            )
        except PromptError as exc:
            raise _bad(str(exc), exc.param) from None

    def _structured(self, req: _GenRequest, endpoint: str) -> tuple[StructuredPlan, str] | None:
        """The request's structured-output constraint (read by :mod:`lmgw.structured`, as the
        gateway reads it) as a plan, with the body field it came from (a 400 for output the
        simulator cannot produce names it); None without one. A request that sends none of
        the fields costs seven bytes comparisons (the overhead benchmarks' hot path)."""
        sent = {
            name: msgspec.json.decode(raw)  # valid JSON: the body decoder checked it
            for name in _STRUCTURED_FIELDS
            if (raw := bytes(getattr(req, name))) != b"null"
        }
        if not sent:
            return None
        try:
            c = structured_output(endpoint, sent, tools=False)
        except StructuredOutputError as exc:
            raise _bad(str(exc), exc.param) from None
        except ValueError as exc:  # the constraint itself refused it (StructuredOutput's checks)
            raise _bad(str(exc), "structured_outputs") from None
        if c is None:
            return None
        return StructuredPlan.of(c), _constraint_field(c.kind, sent)

    def _output_plan(
        self, req: ChatRequest, structured: StructuredPlan | None, messages: Any = None
    ) -> ToolPlan | ReplyPlan | StructuredPlan | None:
        """What shapes a chat answer: a tool call (tool mode wins, as the simulator's tool mode
        handles ``tool_choice`` itself), else the request's constraint, else the quote of the
        tool results the conversation ends with, else nothing (plain text)."""
        tool = self._tool_plan(req, messages)
        if structured is not None and not isinstance(tool, ToolPlan):
            return structured
        return tool

    def _tool_plan(self, req: ChatRequest, messages: Any = None) -> ToolPlan | ReplyPlan | None:
        """The function the model calls for this request (tool mode), the quote of the tool
        results the conversation ends with, or None: requests without ``tools`` and without a
        tool message never get here past two bytes comparisons, so their output is the plain
        deterministic text. ``messages``: already decoded ones, if the caller has them."""
        raw_tools = bytes(req.tools)
        if raw_tools == b"null":
            if b'"tool"' not in bytes(req.messages):
                return None
            if messages is None:
                try:
                    messages = msgspec.json.decode(bytes(req.messages))
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                    raise _bad(str(exc)) from None
            return tool_results_reply(messages)
        try:
            tools = msgspec.json.decode(raw_tools)
            choice = msgspec.json.decode(bytes(req.tool_choice))
            if messages is None:
                messages = msgspec.json.decode(bytes(req.messages))
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _bad(str(exc)) from None
        if not isinstance(tools, list):
            raise _bad("tools must be a list", "tools")
        try:
            return plan_tool_call(tools, choice, messages, self.options.tool_format)
        except PromptError as exc:
            raise _bad(str(exc), exc.param) from None

    def _continuation(
        self, req: ChatRequest, spec: SamplingSpec, structured: StructuredPlan | None = None
    ) -> list[Completion] | None:
        """``continue_final_message`` on a partial answer of this model: the rest of the answer
        the messages before it would have got (rendered with ``add_generation_prompt``), so a
        stream continued on another worker (the gateway's mid-stream migration) ends exactly as
        the uninterrupted one. None when the final message is not a prefix of that answer (then
        the request is served as sent). A constrained continuation is served as sent, as a
        real engine serves it: its grammar matcher starts at the first new token, so only a
        constraint on the *rest* of the answer (what the gateway sends) completes it."""
        if structured is not None:
            return None
        msgs = msgspec.json.decode(req.messages)
        last = msgs[-1] if isinstance(msgs, list) and len(msgs) > 1 else None
        if not (isinstance(last, dict) and last.get("role") == "assistant"):
            return None
        partial = last.get("content")
        if not isinstance(partial, str):
            return None
        try:
            orig = self.engine.tokenizer.render_chat(
                msgs[:-1],
                add_generation_prompt=True,
                tools=msgspec.json.decode(req.tools),
                documents=msgspec.json.decode(req.documents),
                chat_template_kwargs=msgspec.json.decode(req.chat_template_kwargs),
                add_special_tokens=req.add_special_tokens,
                media=self.engine.config.media,
            ).token_ids
        except PromptError:
            return None
        tool = self._tool_plan(req, msgs[:-1])
        full = self.engine.generate(orig, dataclasses.replace(spec, max_tokens=None), 0, tool)
        k, seen = 0, ""
        while len(seen) < len(partial) and k < len(full.pieces):
            seen += full.pieces[k]
            k += 1
        if seen != partial:
            return None
        budget = None if spec.max_tokens is None else spec.max_tokens + k
        whole = self.engine.generate(orig, dataclasses.replace(spec, max_tokens=budget), 0, tool)
        pieces = whole.pieces[k:]
        return [
            Completion(
                whole.token_ids[k:],
                pieces,
                "".join(pieces),
                whole.finish_reason,
                whole.stop_reason,
                whole.pieces_json[k:],
                whole.key,
                k,
            )
        ]

    async def _completions(self, request: Request, responder: Responder, rid: bytes) -> None:
        try:
            req = _completion_decoder.decode(request.body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _bad(str(exc)) from None
        n = _validate_sampling(req, req.max_tokens)
        model = self._check_model(req.model)
        texts, prompts = self._completion_prompts(req.prompt, req.add_special_tokens)
        for ids in prompts:
            self._check_length(len(ids), req.max_tokens, "prompt")
        spec = _sampling(req, self._leg_max_tokens(req, req.max_tokens))
        structured = self._structured(req, "completion")
        constraint = structured[0] if structured is not None else None
        try:
            choices = [
                self.engine.generate(ids, *choice_sampling(spec, i), constraint)
                for ids in prompts
                for i in range(n)
            ]
        except Unsimulated as exc:
            raise _bad(str(exc), structured[1] if structured else None) from None
        echo = None
        if req.echo:  # vLLM echoes a text prompt as sent, a token prompt decoded
            tok = self.engine.tokenizer
            echo = [
                text if text is not None else tok.decode(ids)
                for text, ids in zip(texts, prompts, strict=True)
                for _ in range(n)
            ]
        stream = bool(req.stream)
        so = req.stream_options
        plan = _Plan(
            "completion",
            rid.decode("latin-1"),
            model,
            prompts,
            choices,
            stream,
            bool(stream and so is not None and so.include_usage),
            bool(stream and so is not None and so.continuous_usage_stats),
            echo,
            logprobs=_completion_logprobs(req),
            prompt_logprobs=_prompt_logprobs(req),
            token_ids_as_names=bool(req.return_tokens_as_token_ids),
        )
        await self._prepare_leg(req, plan, ())
        await self._run(plan, responder, rid)

    async def _generate(self, request: Request, responder: Responder, rid: bytes) -> None:
        """SGLang's native ``/generate``: a prompt (``text`` or ``input_ids``) or a batch, each
        sampled ``sampling_params.n`` times; logprobs with ``return_logprob``. The same
        completions as ``/v1/completions`` for the same prompt ids and options."""
        try:
            req = _generate_decoder.decode(request.body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _bad(str(exc)) from None
        single, prompts = self._generate_prompts(req)
        count = len(prompts)
        params = req.sampling_params
        if params is None:
            per_prompt = [SglangSampling()] * count
        elif isinstance(params, list):
            if len(params) != count:
                raise _bad(
                    "sampling_params must be one table, or one per prompt", "sampling_params"
                )
            per_prompt = params
        else:
            per_prompt = [params] * count
        n = per_prompt[0].n
        if any(p.n != n for p in per_prompt):
            raise _bad(
                "The parallel_sample_num should be the same for all samples in sample params.",
                "sampling_params",
            )
        if n < 1:
            raise _bad(f"n must be at least 1, got {n}.", "sampling_params")
        specs = []
        for ids, sp in zip(prompts, per_prompt, strict=True):
            _validate_sglang_sampling(sp)
            self._check_length(len(ids), sp.max_new_tokens or None, "prompt")
            specs.append(self._sglang_spec(req, sp))
        choices = [
            self.engine.generate(ids, *choice_sampling(spec, j))
            for ids, spec in zip(prompts, specs, strict=True)
            for j in range(n)
        ]
        request_id = rid.decode("latin-1")
        options = _SglangOptions(
            batch=not single or n > 1,
            rids=_sglang_rids(req.rid, request_id, len(choices), single and n == 1),
            return_logprob=_per_prompt(req.return_logprob, False, count, n, "return_logprob"),
            start=_per_prompt(req.logprob_start_len, -1, count, n, "logprob_start_len"),
            top=_per_prompt(req.top_logprobs_num, 0, count, n, "top_logprobs_num"),
            with_text=req.return_text_in_logprobs,
        )
        for i, ids in enumerate(prompts):
            options.start[i] = _logprob_start(options.start[i], len(ids))
            top = options.top[i]
            if not 0 <= top <= MAX_TOP_LOGPROBS:
                raise _bad(
                    f"top_logprobs_num must be between 0 and {MAX_TOP_LOGPROBS}, got {top}",
                    "top_logprobs_num",
                )
        plan = _Plan(
            "generate", request_id, self._default_model, prompts, choices, req.stream, False, False
        )
        plan.sglang = options
        await self._prepare_leg(req, plan, ())
        await self._run(plan, responder, rid)

    def _generate_prompts(self, req: GenerateRequest) -> tuple[bool, list[Sequence[int]]]:
        """(a single prompt?, each prompt's ids): ``text`` encoded as SGLang's tokenizer
        manager does (special tokens added, as completions), or ``input_ids`` as given."""
        if (req.text is None) == (req.input_ids is None):
            raise _bad("Either text, input_ids or input_embeds should be provided.", "text")
        tok = self.engine.tokenizer
        if req.text is not None:
            single = isinstance(req.text, str)
            texts = [req.text] if isinstance(req.text, str) else req.text
            if not texts:
                raise _bad("text must not be an empty list", "text")
            prompts: list[Sequence[int]] = [tok.encode(t) for t in texts]
        else:
            ids = req.input_ids
            if not ids:
                raise _bad("input_ids cannot be empty.", "input_ids")
            single = not isinstance(ids[0], list)
            raw = [ids] if single else ids
            prompts = [self._token_list(p, "input_ids") for p in raw]
        for p in prompts:
            if not p:
                raise _bad("The decoder prompt cannot be empty", "text")
            try:
                tok.check_ids(p, "input_ids")
            except PromptError as exc:
                raise _bad(str(exc), exc.param) from None
        return single, prompts

    def _sglang_spec(self, req: GenerateRequest, sp: SglangSampling) -> SamplingSpec:
        stop = sp.stop
        return SamplingSpec(
            max_tokens=self._leg_max_tokens(req, sp.max_new_tokens),
            min_tokens=sp.min_new_tokens,
            ignore_eos=sp.ignore_eos,
            stop=() if stop is None else (stop,) if isinstance(stop, str) else tuple(stop),
            stop_token_ids=tuple(sp.stop_token_ids or ()),
            include_stop_str_in_output=sp.no_stop_trim,
            seed=sp.sampling_seed,
        )

    def _generate_choice(self, plan: _Plan, c: int, upto: int | None = None) -> dict[str, Any]:
        """One ``/generate`` answer object for choice ``c`` (its first ``upto`` tokens while
        streaming: text, ids and output logprobs cumulative, ``finish_reason`` only at the
        end), in SGLang's shape."""
        opts = plan.sglang
        assert opts is not None
        completion = plan.choices[c]
        i = c // plan.n
        ids = plan.prompts[i]
        done = upto is None or upto >= completion.num_tokens
        count = completion.num_tokens if upto is None else min(upto, completion.num_tokens)
        out_ids = completion.token_ids[:count]
        cached = plan.cached_per_prompt[i] if i < len(plan.cached_per_prompt) else 0
        meta: dict[str, Any] = {
            "id": opts.rids[c],
            "finish_reason": self._sglang_finish(completion) if done else None,
            "prompt_tokens": len(ids),
            "completion_tokens": count,
            "cached_tokens": cached,
        }
        if opts.return_logprob[i]:
            src = self.engine.logprobs
            text = src.text if opts.with_text else None
            if self.options.role == "d":
                inputs: list[TokenLogprob | None] = []  # KV from P: no prompt position computed
                input_ids: Sequence[int] = ()
            else:
                inputs = src.prompt(ids, opts.start[i])
                inputs[0] = None  # SGLang pads the first position it reports with None
                input_ids = ids[opts.start[i] :]
            outputs = self._output_logprobs(plan)[c][:count]
            meta["input_token_logprobs"] = sglang_tokens(inputs, input_ids, text)
            meta["output_token_logprobs"] = sglang_tokens(outputs, out_ids, text)
            top = opts.top[i]
            if top > 0:
                meta["input_top_logprobs"] = sglang_top(inputs, top, text)
                meta["output_top_logprobs"] = sglang_top(outputs, top, text)
        body: dict[str, Any] = {
            "text": "".join(completion.pieces[:count]),
            "output_ids": list(out_ids),
            "meta_info": meta,
        }
        if opts.batch:
            body["index"] = c
        return body

    def _sglang_finish(self, c: Completion) -> dict[str, Any]:
        if c.finish_reason == "length":
            return {"type": "length", "length": c.num_tokens}
        matched = c.stop_reason
        if matched is None:
            matched = self.engine.tokenizer.model.eos_token_id
        return {"type": "stop", "matched": matched}

    def _generate_body(self, plan: _Plan) -> Any:
        opts = plan.sglang
        assert opts is not None
        answers = [self._generate_choice(plan, c) for c in range(len(plan.choices))]
        return answers if opts.batch else answers[0]

    def _completion_prompts(
        self, prompt: Any, add_special_tokens: bool
    ) -> tuple[list[str | None], list[Sequence[int]]]:
        """str | list[str] | list[int] | list[list[int]] -> (each prompt's text, None for token
        prompts; its token ids), vLLM's forms. Text is encoded with ``add_special_tokens`` (a
        BOS for the sim-model, as vLLM's completions do)."""
        tok = self.engine.tokenizer
        texts: list[str | None]
        prompts: list[Sequence[int]]
        if isinstance(prompt, str) and prompt:
            texts = [prompt]
        elif isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                texts = list(prompt)
            elif all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
                texts, prompts = [None], [list(prompt)]
            elif all(isinstance(p, list) for p in prompt):
                texts, prompts = [None] * len(prompt), [self._token_list(p) for p in prompt]
            else:
                raise _bad(
                    "prompt must be a string, a list of strings, a list of token ids "
                    "or a list of token id lists",
                    "prompt",
                )
        else:
            raise _bad("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
        if texts[0] is not None:
            prompts = [tok.encode(t or "", add_special_tokens=add_special_tokens) for t in texts]
        for ids in prompts:
            if not ids:
                raise _bad("The decoder prompt cannot be empty", "prompt")
            try:
                tok.check_ids(ids, "prompt")
            except PromptError as exc:
                raise _bad(str(exc), exc.param) from None
        return texts, prompts

    @staticmethod
    def _token_list(p: Any, param: str = "prompt") -> list[int]:
        if not isinstance(p, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in p
        ):
            raise _bad("token id lists must contain integers only", param)
        return p

    def _check_length(self, prompt_len: int, max_tokens: int | None, what: str) -> None:
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise _bad(
                f"This model's maximum context length is {limit} tokens. However, your request "
                f"has {prompt_len} input tokens. Please reduce the length of the input {what}."
            )
        if max_tokens is not None and prompt_len + max_tokens > limit:
            raise _bad(
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
                f"model's maximum context length is {limit} tokens and your request has "
                f"{prompt_len} input tokens ({max_tokens} > {limit} - {prompt_len})."
            )

    async def _run(self, plan: _Plan, responder: Responder, rid: bytes) -> None:
        """Queue, prefill, decode and answer one request, under the faults and timing model."""
        stats = self.stats
        stats.requests_total += 1
        faults = self.faults.faults
        if self.faults.should_error():
            stats.errors_injected += 1
            raise ApiError(500, "Simulated engine failure (fault: error_rate).")
        engine = self.engine
        arrival = trio.current_time()
        stats.in_flight += 1
        ticket: Ticket | None = None
        writer = self._writer(plan) if plan.stream else None
        generated = 0
        finished = False
        acquired = False
        computing = False  # holds the prefill lock (serial_prefill)
        lora_held: str | None = None  # the adapter whose LoRA slot this request holds
        try:
            if writer is not None and self.options.stream_head == "arrival":
                await responder.start(200, [_SSE, (b"x-request-id", rid)])
                flush = getattr(responder, "flush", None)  # (the native server's: on the wire)
                if flush is not None:
                    await flush()
            if faults.hang:
                await trio.sleep_forever()
            stall = self.faults.stall_s()
            if stall:
                await trio.sleep(stall)
            ticket = engine.submit(plan.prompt_tokens, len(plan.choices), self._lora_key(plan))
            if plan.model not in self._names:  # an adapter: vLLM schedules it only in a slot
                load_s = await self._acquire_lora(plan.model)
                lora_held = plan.model
                if load_s > 0:
                    await trio.sleep(load_s)
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                await self._slots.acquire()
            acquired = True
            if engine.config.serial_prefill and not engine.config.timing.instant:
                await self._prefill_lock.acquire()  # still "waiting" until its prefill starts
                computing = True
            ticket.admit(plan.completion_tokens)
            delay = ticket.prefill(plan.prompts, plan.external_cached) + plan.extra_prefill_s
            plan.cached_tokens = ticket.cached_tokens
            plan.cached_per_prompt = ticket.cached_per_prompt
            clock = arrival
            if delay > 0:
                clock = trio.current_time() + delay
                await trio.sleep_until(clock)
            if computing:
                computing = False
                self._prefill_lock.release()
            if plan.after_prefill is not None:
                plan.after_prefill()
            if plan.publish is not None:
                await plan.publish()
            ticket.begin_decode()
            if writer is not None and not responder.started:
                await responder.start(200, [_SSE, (b"x-request-id", rid)])
            steps = max(c.num_tokens for c in plan.choices)
            timed = not engine.config.timing.instant
            faulty = faults.crash_at_token is not None or faults.drop_at_token is not None
            if writer is not None or timed or faulty:
                for step in range(steps):
                    if faulty:
                        await self._token_faults(step, plan, responder, rid, writer)
                    if step == 0:
                        engine.stats.ttft.observe(trio.current_time() - arrival)
                    elif timed:
                        # Deadline-driven steps (no drift), but never more than 50 ms of catch-up.
                        clock = max(clock, trio.current_time() - 0.05) + ticket.decode_step_s()
                        await trio.sleep_until(clock)
                    if writer is not None:
                        await responder.send(writer.step(step))
                    generated = step + 1
                if faulty:
                    await self._token_faults(steps, plan, responder, rid, writer)
            else:
                engine.stats.ttft.observe(trio.current_time() - arrival)
            generated = steps
            if writer is not None:
                await responder.send(writer.finish())
                await responder.end()
            else:
                await responder.send_full(200, [_JSON, (b"x-request-id", rid)], self._body(plan))
            finished = True
        except (trio.Cancelled, trio.BrokenResourceError, trio.ClosedResourceError):
            # The client went away: the server cancelled us, or a write found the socket closed.
            stats.aborted_total += 1
            stats.aborted.append(
                {
                    "request_id": plan.request_id,
                    "at_monotonic": time.monotonic(),
                    "tokens_sent": 0 if writer is None else writer.tokens,
                }
            )
            raise
        except DropConnection:
            stats.dropped_total += 1
            raise
        finally:
            stats.in_flight -= 1
            if computing:
                self._prefill_lock.release()
            if acquired:
                self._slots.release()
            if lora_held is not None and self._lora_slots.release(lora_held):
                self._lora_freed.unpark_all()  # an idle adapter may be swapped out now
            if ticket is not None:
                if writer is not None:
                    generated = writer.tokens  # counts every choice's tokens
                self._close_ticket(ticket, plan, generated, finished, arrival)

    async def _acquire_lora(self, name: str) -> float:
        """Take a LoRA slot for one request of ``name``, waiting (counted in vLLM's waiting
        adapters) while every slot is busy; the seconds its activation then takes (0 when the
        adapter was active already, or without ``max_loras``)."""
        slots = self._lora_slots
        loads = slots.needs_load(name)
        if not slots.try_acquire(name)[0]:
            slots.wait(name)
            try:
                while True:
                    await self._lora_freed.park()
                    loads = slots.needs_load(name)
                    if slots.try_acquire(name)[0]:
                        break
            finally:
                slots.unwait(name)
            self._lora_freed.unpark_all()  # waiters for this adapter may join it now
        if not loads or slots.max_loras is None:
            return 0.0
        timing = self.engine.config.timing
        return 0.0 if timing.instant else self.options.lora_load_s * self.engine.slow / timing.speed

    def _close_ticket(
        self, ticket: Ticket, plan: _Plan, generated: int, finished: bool, arrival: float
    ) -> None:
        if not finished:
            ticket.emitted(generated)
            ticket.close(aborted=True)
            return
        ticket.emitted(plan.completion_tokens)
        ticket.close(plan.choices)
        self.engine.stats.e2e.observe(trio.current_time() - arrival)

    async def _token_faults(
        self,
        emitted: int,
        plan: _Plan,
        responder: Responder,
        rid: bytes,
        writer: _StreamWriter | None,
    ) -> None:
        """Act on crash_at_token / drop_at_token once ``emitted`` tokens went out."""
        faults = self.faults.faults
        if faults.crash_at_token == emitted:
            if self.options.exit_on_crash:
                os._exit(1)
            raise DropConnection(f"crash at token {emitted} (in-process: connection dropped)")
        if faults.drop_at_token == emitted:
            if writer is None:
                # Non-streamed: start the response and cut the body in half, so the client sees
                # a truncated message rather than a clean error.
                body = self._body(plan)
                await responder.start(200, [_JSON, (b"x-request-id", rid)])
                await responder.send(body[: max(1, len(body) // 2)])
            raise DropConnection(f"drop at token {emitted}")

    def _usage(self, plan: _Plan, cached: int) -> dict[str, Any]:
        prompt = plan.prompt_tokens
        completion = plan.completion_tokens
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _writer(self, plan: _Plan) -> _StreamWriter | _GenerateStreamWriter:
        if plan.kind == "generate":
            return _GenerateStreamWriter(plan, self._generate_choice)
        return _StreamWriter(plan, self._created, self._stream_logprobs(plan))

    def _stream_logprobs(self, plan: _Plan) -> Callable[[int, int], bytes] | None:
        """``(choice, step) -> ,"logprobs":{...}`` for a stream's token events (vLLM's chunk
        shapes: the step's token only; completions' ``text_offset`` counts the text streamed
        before it, echo included), or None when not asked."""
        k = plan.logprobs
        if k is None:
            return None
        entries = self._output_logprobs(plan)
        text = token_id_name if plan.token_ids_as_names else self.engine.logprobs.text
        if plan.kind == "chat":
            return lambda i, step: (
                b',"logprobs":' + _encode({"content": [chat_entry(entries[i][step], k, text)]})
            )
        echo = plan.echo_texts
        offsets: list[list[int]] = []
        for i, c in enumerate(plan.choices):
            at = 0 if echo is None else len(echo[i])
            row = []
            for piece in c.pieces:
                row.append(at)
                at += len(piece)
            offsets.append(row)
        return lambda i, step: (
            b',"logprobs":'
            + _encode(completion_logprobs([entries[i][step]], k, text, offsets[i][step]))
        )

    def _output_logprobs(self, plan: _Plan) -> list[list[TokenLogprob]]:
        """Each choice's output logprobs (computed once per request, only when asked)."""
        if plan.output_logprobs is None:
            src = self.engine.logprobs
            plan.output_logprobs = [src.output(c.key, c.token_ids, c.offset) for c in plan.choices]
        return plan.output_logprobs

    def _choice_logprobs(self, plan: _Plan, i: int) -> Any:
        """Choice ``i``'s ``logprobs`` object in vLLM's shape, or None when not asked."""
        k = plan.logprobs
        if k is None:
            return None
        entries = self._output_logprobs(plan)[i]
        text = token_id_name if plan.token_ids_as_names else self.engine.logprobs.text
        if plan.kind == "chat":
            return chat_logprobs(entries, k, text)
        echo = plan.echo_texts
        return completion_logprobs(entries, k, text, 0 if echo is None else len(echo[i]))

    def _prompt_logprobs_of(self, plan: _Plan, prompt: int) -> Any:
        k = plan.prompt_logprobs
        if k is None:
            return None
        src = self.engine.logprobs
        return prompt_logprobs(src.prompt(plan.prompts[prompt]), k, src.text)

    def _body(self, plan: _Plan) -> bytes:
        cached = plan.cached_tokens
        if plan.kind == "generate":
            return _encode(self._generate_body(plan))
        if plan.kind == "chat":
            return _encode(
                {
                    "id": f"chatcmpl-{plan.request_id}",
                    "object": "chat.completion",
                    "created": self._created,
                    "model": plan.model,
                    "choices": [
                        {
                            "index": i,
                            "message": {
                                "role": "assistant",
                                "content": c.text,
                                "refusal": None,
                                "annotations": None,
                                "audio": None,
                                "function_call": None,
                                "tool_calls": [],
                                "reasoning_content": None,
                            },
                            "logprobs": self._choice_logprobs(plan, i),
                            "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason,
                        }
                        for i, c in enumerate(plan.choices)
                    ],
                    "service_tier": None,
                    "system_fingerprint": None,
                    "usage": self._usage(plan, cached),
                    "prompt_logprobs": self._prompt_logprobs_of(plan, 0),
                    "kv_transfer_params": plan.kv_transfer_params,
                }
            )
        echo = plan.echo_texts
        return _encode(
            {
                "id": f"cmpl-{plan.request_id}",
                "object": "text_completion",
                "created": self._created,
                "model": plan.model,
                "choices": [
                    {
                        "index": i,
                        "text": c.text if echo is None else echo[i] + c.text,
                        "logprobs": self._choice_logprobs(plan, i),
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                        "prompt_logprobs": self._prompt_logprobs_of(plan, i // plan.n),
                    }
                    for i, c in enumerate(plan.choices)
                ],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": self._usage(plan, cached),
                "kv_transfer_params": plan.kv_transfer_params,
            }
        )

    # -- disaggregated roles ----------------------------------------------------------------------

    @property
    def side_host(self) -> str:
        """The host a decode worker reaches this worker's side channel on."""
        host = self.options.host
        return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)

    @property
    def side_port(self) -> int:
        """The side channel's port: the HTTP port (also the SGLang bootstrap port)."""
        return self.bound_port if self.bound_port is not None else self.options.port

    @property
    def kv_address(self) -> str | None:
        """``host:kv_port``, the P2P NCCL address pair ids name; None without a KV listener."""
        port = self.kv_bound_port
        if port is None:
            port = self.options.kv_port or None  # 0 means "not bound yet"
        return None if port is None else f"{self.side_host}:{port}"

    def _leg_max_tokens(self, req: _HandOffFields, max_tokens: int | None) -> int | None:
        """A prefill worker in SGLang mode gets the client's body unchanged and stops after the
        first token (the decode worker produces the rest), as SGLang's prefill mode does."""
        if self.options.role == "p" and req.bootstrap_room is not None:
            params = req.kv_transfer_params
            if not (isinstance(params, dict) and params.get("do_remote_decode")):
                return 1
        return max_tokens

    async def _prepare_leg(
        self, req: _HandOffFields, plan: _Plan, media: tuple[MediaItem, ...]
    ) -> None:
        """The role's part of a request before it runs: check or arrange its hand-offs."""
        role = self.options.role
        if role == "e":
            self._encode_leg(plan, media)
            return
        if role == "d":
            await self._decode_leg(req, plan)
            return
        if self.ec_store is not None:
            for item in media:
                try:
                    self.ec_store.require(item.content_hash, item.kind, item.length)
                except EmbeddingError as exc:
                    raise ApiError(500, f"Encoder cache: {exc}", "messages") from None
        elif self.handoff_pool is not None and media:
            await self._pooled_embeddings(plan, media)
        if role == "p":
            self._prefill_leg(req, plan)

    async def _pooled_embeddings(self, plan: _Plan, media: tuple[MediaItem, ...]) -> None:
        """Every item's encoder output from the pool (``ec:{model}:{item key}``), verified."""
        from lmgw.cache.encoder import encoder_key

        pool = self.handoff_pool
        assert pool is not None
        keys = [encoder_key(plan.model, item.item_key) for item in media]
        found = await pool.get_many(keys)
        stats = self.stats
        for item, key in zip(media, keys, strict=True):
            data = found.get(key)
            short = f"{item.kind} item {item.item_key[:16]}..."
            if data is None or len(data) == 0:
                stats.pool_embeddings_missing += 1
                why = (
                    "only the gateway's note that an encoder has it (the encoder does not hand"
                    " off through the pool)"
                    if data is not None
                    else "nothing (the encode leg must finish first)"
                )
                raise ApiError(500, f"Encoder cache: the pool holds {why} for {short}", "messages")
            if data != derive_embedding(item.content_hash, item.kind, item.length):
                raise ApiError(
                    500,
                    f"Encoder cache: the encoder output of {short} in the pool is corrupted "
                    "(does not match the item)",
                    "messages",
                )
            stats.pool_embeddings_found += 1

    def _encode_leg(self, plan: _Plan, media: tuple[MediaItem, ...]) -> None:
        if len(media) != 1:
            raise _bad(
                "an encode worker (role e) takes exactly one media item per request, "
                f"got {len(media)}",
                "messages",
            )
        (item,) = media
        engine = self.engine
        plan.extra_prefill_s = engine.config.timing.encode_s(1, engine.slow)
        pool = self.handoff_pool
        if pool is not None:
            from lmgw.cache.encoder import encoder_key

            async def put() -> None:
                data = derive_embedding(item.content_hash, item.kind, item.length)
                if not await pool.put(encoder_key(plan.model, item.item_key), data):
                    raise ApiError(500, "Encoder cache: the cache pool refused the output")
                self.stats.pool_embeddings_stored += 1

            plan.publish = put
            return
        store = self.ec_store
        assert store is not None  # checked in __init__

        def publish() -> None:
            store.put(
                item.content_hash, derive_embedding(item.content_hash, item.kind, item.length)
            )

        plan.after_prefill = publish

    def _pair_id(self, plan: _Plan) -> PairId | None:
        """The P2P NCCL pair in the request id (``kv_connector="auto"`` only: a vLLM instance
        with another connector does not read ids)."""
        if self.options.kv_connector != "auto" or "___prefill_addr_" not in plan.request_id:
            return None
        return parse_pair_id(plan.request_id)

    def _prefill_leg(self, req: _HandOffFields, plan: _Plan) -> None:
        params = req.kv_transfer_params
        nixl = isinstance(params, dict) and bool(params.get("do_remote_decode"))
        if not nixl and req.bootstrap_room is None:
            pair = self._pair_id(plan)
            if pair is not None:
                self._p2p_prefill_leg(pair, plan)
            elif self.lmcache is not None:
                self._lmcache_prefill_leg(plan)
            return  # otherwise a plain request: served like a merged worker
        block_size = self.engine.config.block_size
        if not nixl:
            self._sglang_prefill_leg(req, plan, block_size)
            return
        if len(plan.prompts) != 1:
            raise _bad("a disaggregated prefill takes one prompt per request", "prompt")
        ids = plan.prompts[0]
        if plan.stream:
            return  # vLLM returns kv_transfer_params only in a non-streamed body
        key = f"{plan.request_id}-{uuid.uuid4().hex[:12]}"

        def publish() -> None:
            entry = self.kv_store.put(key, ids, block_size, trio.current_time())
            plan.kv_transfer_params = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_engine_id": self.engine_id,
                "remote_block_ids": entry.block_ids,
                "remote_host": self.side_host,
                "remote_port": self.side_port,
                "remote_request_id": key,
                "tp_size": 1,
            }
            self._published(key)

        plan.after_prefill = publish
        self._through_pool(plan, [(key, ids)], block_size)

    def _sglang_prefill_leg(self, req: _HandOffFields, plan: _Plan, block_size: int) -> None:
        """SGLang's prefill: every sequence's KV published under its room once computed."""
        keyed = [(f"room-{seq.room}", seq.ids) for seq in _sglang_sequences(req, plan)]

        def publish() -> None:
            now = trio.current_time()
            for key, ids in keyed:
                self.kv_store.put(key, ids, block_size, now)
                self._published(key)

        plan.after_prefill = publish
        self._through_pool(plan, keyed, block_size)

    def _p2p_prefill_leg(self, pair: PairId, plan: _Plan) -> None:
        """vLLM P2P NCCL's producer: the id must name this worker as the prefill; the prompt's KV
        is published under the pair id (the simulator's stand-in for P pushing the tensors to
        the decode address: D pulls them from this worker's KV port instead)."""
        own = self.kv_address
        if own is None or not same_address(pair.prefill_addr, own):
            self.stats.p2p_misrouted += 1
            raise ApiError(
                500,
                f"P2P NCCL: the request id names prefill {pair.prefill_addr}, but this worker's "
                f"KV address is {own or 'unset (no --kv-port)'}",
            )
        if len(plan.prompts) != 1:
            raise _bad("a disaggregated prefill takes one prompt per request", "prompt")
        ids = plan.prompts[0]
        block_size = self.engine.config.block_size

        def publish() -> None:
            self.kv_store.put(pair.key, ids, block_size, trio.current_time())
            self.stats.p2p_published += 1
            self._published(pair.key)

        plan.after_prefill = publish
        self._through_pool(plan, [(pair.key, ids)], block_size)

    def _through_pool(
        self, plan: _Plan, keyed: Sequence[tuple[str, Sequence[int]]], block_size: int
    ) -> None:
        """With ``handoff="pool"``: each prompt's KV blocks go to the cache pool under
        ``kv:{key}`` (its prompt digest, then the blocks) instead of staying here for the side
        channel; the hand-off parameters the answer carries are unchanged."""
        pool = self.handoff_pool
        if pool is None:
            return

        # The pool's entry metadata has no free field: the producer's zone rides in ``role``
        # (``p@zone``; plain ``p`` for no zone), which the pool itself never reads.
        zone = self.options.zone
        role = self.options.role if zone is None else f"{self.options.role}@{zone}"

        async def put() -> None:
            for key, ids in keyed:
                data = prompt_digest(ids).encode() + b"".join(kv_block_payloads(ids, block_size))
                ok = await pool.put(f"kv:{key}", data, role=role, ttl_s=self.options.kv_ttl_s)
                self.kv_store.discard(key)
                if not ok:
                    raise ApiError(500, "KV transfer: the cache pool refused the prompt's blocks")
                self.stats.pool_kv_published += 1

        plan.publish = put

    def _lmcache_prefill_leg(self, plan: _Plan) -> None:
        """LMCache's producer: every prompt's chunks go to the shared store once computed."""
        store = self.lmcache
        assert store is not None
        prompts = plan.prompts

        def publish() -> None:
            for ids in prompts:
                store.put(ids)

        plan.after_prefill = publish

    def _published(self, key: str) -> None:
        waiters = self._kv_waiters.pop(key, None)
        if waiters is not None:
            waiters.event.set()

    async def _decode_leg(self, req: _HandOffFields, plan: _Plan) -> None:
        """Fetch the prompt's KV from the prefill worker and verify it, or refuse the request:
        a decode-only worker never computes a prompt on its own."""
        params = req.kv_transfer_params
        nixl = isinstance(params, dict) and bool(params.get("do_remote_prefill"))
        if not nixl and req.bootstrap_room is not None:
            await self._sglang_decode_leg(req, plan)
            return
        if len(plan.prompts) != 1:
            raise _bad("a disaggregated decode takes one prompt per request", "prompt")
        ids = plan.prompts[0]
        engine_id: str | None = None
        pair: PairId | None = None
        if nixl:
            assert isinstance(params, dict)
            host = _kv_param(params, "remote_host", str)
            port = _kv_param(params, "remote_port", int)
            key = _kv_param(params, "remote_request_id", str)
            blocks = params.get("remote_block_ids")
            if blocks is not None and not (
                isinstance(blocks, list) and all(type(b) is int for b in blocks)
            ):
                raise _bad(
                    "kv_transfer_params.remote_block_ids must be a list of integers",
                    "kv_transfer_params",
                )
            raw_engine = params.get("remote_engine_id")
            engine_id = raw_engine if isinstance(raw_engine, str) else None
            query = "" if blocks is None else "?blocks=" + ",".join(map(str, blocks))
            path = f"/sim/kv/{quote(key, safe='')}{query}"
            timeout = self.options.kv_fetch_timeout_s
            what = f"remote_request_id {key!r}"
            pool_key, pool_wait = key, self.options.kv_fetch_timeout_s
        elif (pair := self._pair_id(plan)) is not None:
            own = self.kv_address
            if own is None or not same_address(pair.decode_addr, own):
                self.stats.p2p_misrouted += 1
                raise ApiError(
                    500,
                    f"P2P NCCL: the KV was pushed to {pair.decode_addr}, this worker is "
                    f"{own or 'without a KV address (no --kv-port)'}: the request id names "
                    f"another decode worker (prefill {pair.prefill_addr})",
                )
            host, _, port_text = pair.prefill_addr.rpartition(":")
            host, port = host.strip("[]"), int(port_text)
            wait = self.options.bootstrap_timeout_s
            path = f"/sim/kv/{quote(pair.key, safe='')}?wait_s={wait:g}"
            timeout = wait + self.options.kv_fetch_timeout_s
            what = f"P2P NCCL request {pair.key!r}"
            pool_key, pool_wait = pair.key, wait
        elif self.lmcache is not None:
            await self._lmcache_decode_leg(ids, plan)
            return
        elif self.options.local_prefill:  # no hand-off: a whole engine prefills it here
            self.stats.local_prefills += 1
            return
        else:
            raise _bad(
                "this is a decode-only worker (role d): the request needs kv_transfer_params "
                "with do_remote_prefill=true (copied from the prefill response), SGLang's "
                "bootstrap_host/bootstrap_port/bootstrap_room, or a P2P NCCL pair id "
                "(X-Request-Id ___prefill_addr_..___decode_addr_.._<hex>)",
                "kv_transfer_params",
            )
        verified = await self._fetch_verified(
            host, port, path, timeout, what, pool_key, pool_wait, ids, engine_id
        )
        if pair is not None:
            self.stats.p2p_received += 1
        plan.external_cached = self._external(verified, ids)

    async def _sglang_decode_leg(self, req: _HandOffFields, plan: _Plan) -> None:
        """SGLang's decode: each sequence's KV from its room on its prefill worker, verified
        against that sequence's prompt (a room paired with another prompt fails loudly)."""
        wait = self.options.bootstrap_timeout_s
        external = [len(ids) for ids in plan.prompts]
        n = plan.n
        for c, seq in enumerate(_sglang_sequences(req, plan)):
            if not isinstance(seq.host, str) or not seq.host:
                raise _bad("bootstrap_host must be the prefill worker's host", "bootstrap_host")
            if type(seq.port) is not int:
                raise _bad(
                    "bootstrap_port must be the prefill worker's bootstrap port (for this "
                    "simulator: its HTTP port)",
                    "bootstrap_port",
                )
            key = f"room-{seq.room}"
            verified = await self._fetch_verified(
                seq.host,
                seq.port,
                f"/sim/kv/{key}?wait_s={wait:g}",
                wait + self.options.kv_fetch_timeout_s,
                f"bootstrap_room {seq.room}",
                key,
                wait,
                seq.ids,
                None,
            )
            i = c // n
            external[i] = min(external[i], self._external(verified, seq.ids))
        plan.external_cached = external[0] if len(external) == 1 else external

    def _external(self, verified_blocks: int, ids: Sequence[int]) -> int:
        """Prompt tokens counted as cached for ``verified_blocks`` arrived blocks (the last
        token is always computed, as vLLM does)."""
        bs = self.engine.config.block_size
        return min(verified_blocks * bs, max(0, len(ids) - 1) // bs * bs)

    async def _fetch_verified(
        self,
        host: str,
        port: int,
        path: str,
        timeout: float,
        what: str,
        pool_key: str,
        pool_wait: float,
        ids: Sequence[int],
        engine_id: str | None,
    ) -> int:
        """One hand-off's KV blocks (side channel or pool), verified against ``ids``; returns
        the blocks verified. Every failure is a 500 naming the hand-off."""
        stats = self.stats
        if self.handoff_pool is not None:
            body, peer_engine, peer_digest, peer_zone = await self._take_kv(
                pool_key, pool_wait, what
            )
        else:
            body, peer_engine, peer_digest, peer_zone = await self._fetch_kv(
                host, port, path, timeout, what
            )
        stats.kv_blocks_fetched += len(body) // KV_BLOCK_BYTES
        try:
            if engine_id is not None and peer_engine != engine_id:
                raise KVVerifyError(
                    f"the side channel at {host}:{port} belongs to engine {peer_engine!r}, "
                    f"not remote_engine_id {engine_id!r}"
                )
            if peer_digest != prompt_digest(ids):
                raise KVVerifyError(
                    "the prefill worker computed KV for a different prompt than this request's"
                )
            verified = verify_kv_blocks(ids, self.engine.config.block_size, body)
        except KVVerifyError as exc:
            stats.kv_verify_failures += 1
            raise ApiError(500, f"KV transfer for {what} failed verification: {exc}") from None
        stats.kv_blocks_verified += verified
        # Only full blocks move (kv_block_payloads): the tokens the transfer covered.
        await self._kv_transfer(verified * self.engine.config.block_size, peer_zone)
        return verified

    async def _kv_transfer(self, tokens: int, peer_zone: str | None) -> None:
        """The modelled time of moving ``tokens`` tokens' KV here from a prefill worker in
        ``peer_zone``: ``tokens * kv_bytes_per_token / (GB/s * 1e9)``, at the same-zone or the
        cross-zone bandwidth, divided by ``speed`` and multiplied by the ``slow`` fault as
        prefill time is (none at speed inf, none with ``kv_bytes_per_token`` 0). Slept before
        the request runs, so it is part of the time to first token the client sees; the
        request holds no batch slot meanwhile (vLLM's WAITING_FOR_REMOTE_KVS)."""
        opts, stats = self.options, self.stats
        same = peer_zone == opts.zone
        if same:
            stats.kv_transfers_same_zone += 1
        else:
            stats.kv_transfers_cross_zone += 1
        timing = self.engine.config.timing
        if opts.kv_bytes_per_token <= 0 or tokens <= 0 or timing.instant:
            return
        gbps = opts.kv_gbps_same_zone if same else opts.kv_gbps_cross_zone
        transfer_s = tokens * opts.kv_bytes_per_token / (gbps * 1e9)
        transfer_s *= self.engine.slow / timing.speed
        stats.kv_transfer_seconds_total += transfer_s
        await trio.sleep(transfer_s)

    async def _lmcache_decode_leg(self, ids: Sequence[int], plan: _Plan) -> None:
        """LMCache's consumer: the prompt's chunks must all be in the store (verified).

        Real LMCache recomputes whatever it misses, silently; this simulator answers 500
        instead (unless ``lmcache_strict`` is off), so a decode leg sent before its prefill
        finished, or a prefill of another prompt, fails loudly rather than costing only time.
        """
        store = self.lmcache
        assert store is not None
        try:
            hit = store.lookup(ids)
        except KVVerifyError as exc:
            self.stats.kv_verify_failures += 1
            raise ApiError(500, f"LMCache KV failed verification: {exc}") from None
        if hit < len(ids) and self.options.lmcache_strict:
            raise ApiError(
                500,
                f"LMCache holds KV for {hit} of this prompt's {len(ids)} tokens in "
                f"{str(store.root)!r}: the prefill leg did not run first (real LMCache would "
                "silently recompute the prompt; this simulator is strict)",
            )
        # A full hit still recomputes the last prompt token (vLLM's LMCache connector).
        plan.external_cached = min(hit, len(ids) - 1)
        # The KV comes from LMCache's shared store, not from a peer this worker learns of: the
        # store counts as this worker's own zone (a same-zone transfer of the hit tokens).
        if hit:
            await self._kv_transfer(hit, self.options.zone)

    async def _take_kv(
        self, key: str, wait_s: float, what: str
    ) -> tuple[bytes, str | None, str | None, str | None]:
        """The prompt's KV from the cache pool (``handoff="pool"``): waits up to ``wait_s`` for
        the prefill worker to put it (SGLang's legs run at once), takes it (deletes it), and
        returns (blocks, the producing engine's id, the prompt digest it was stored with, the
        producer's zone: the ``@zone`` suffix of the entry's role, see :meth:`_through_pool`)."""
        pool = self.handoff_pool
        assert pool is not None
        deadline = trio.current_time() + wait_s
        while (entry := await pool.get_entry(f"kv:{key}")) is None:
            if trio.current_time() >= deadline:
                self.stats.kv_fetch_failures += 1
                raise ApiError(
                    500,
                    f"KV transfer for {what} failed: not in the cache pool within {wait_s:g} s "
                    "(the prefill leg did not run, or its worker hands off elsewhere)",
                )
            await trio.sleep(POOL_POLL_S)
        await pool.delete(f"kv:{key}")
        data = entry.value
        if not isinstance(data, bytes) or len(data) < 32:
            self.stats.kv_fetch_failures += 1
            raise ApiError(500, f"KV transfer for {what} failed: a malformed pool entry")
        self.stats.pool_kv_taken += 1
        _, at, zone = entry.meta.role.partition("@")
        return data[32:], entry.meta.producer, data[:32].decode("latin-1"), zone if at else None

    async def _fetch_kv(
        self, host: str, port: int, path: str, timeout_s: float, what: str
    ) -> tuple[bytes, str | None, str | None, str | None]:
        """GET the blocks from the prefill worker's side channel: (bytes, its engine id, its
        prompt digest, its zone: ``x-sim-zone``, absent for none). Every failure is a
        vLLM-shaped 500 naming the prefill worker."""
        origin = self._origins.get((host, port))
        if origin is None:
            origin = self._origins[(host, port)] = Origin(host, port)
        where = f"prefill worker {host}:{port}"
        try:
            with trio.fail_after(timeout_s):
                resp = await self._pool.request(origin, "GET", path, [])
                try:
                    body = await resp.read_all()
                finally:
                    resp.release()
        except UpstreamError as exc:
            self.stats.kv_fetch_failures += 1
            raise ApiError(500, f"KV transfer for {what} failed: {where}: {exc.message}") from None
        except trio.TooSlowError:
            self.stats.kv_fetch_failures += 1
            raise ApiError(
                500, f"KV transfer for {what} failed: {where} gave no KV within {timeout_s:g} s"
            ) from None
        if resp.status != 200:
            self.stats.kv_fetch_failures += 1
            try:
                detail = msgspec.json.decode(body)["error"]["message"]
            except (msgspec.DecodeError, KeyError, TypeError, UnicodeDecodeError):
                detail = body[:200].decode("utf-8", "replace")
            raise ApiError(
                500, f"KV transfer for {what} failed: {where} answered {resp.status}: {detail}"
            )
        peer_engine = resp.header(b"x-sim-engine-id")
        peer_digest = resp.header(b"x-sim-prompt-digest")
        peer_zone = resp.header(b"x-sim-zone")
        return (
            body,
            None if peer_engine is None else peer_engine.decode("latin-1"),
            None if peer_digest is None else peer_digest.decode("latin-1"),
            None if peer_zone is None else peer_zone.decode("latin-1"),
        )

    async def _sim_kv(self, request: Request, responder: Responder, rid: bytes) -> None:
        """The KV side channel: ``GET /sim/kv/<key>[?blocks=1,2,3][&wait_s=S]`` answers the
        blocks (concatenated, in the order asked) and releases them; ``wait_s`` parks the fetch
        until the key is published (SGLang's decode leg may arrive first)."""
        key = unquote(request.path[len("/sim/kv/") :])
        q = parse_qs(request.query, keep_blank_values=True)
        blocks: list[int] | None = None
        try:
            if "blocks" in q:
                raw = q["blocks"][0]
                blocks = [int(b) for b in raw.split(",")] if raw else []
            wait_s = min(MAX_KV_WAIT_S, max(0.0, float(q.get("wait_s", ["0"])[0])))
        except ValueError:
            raise _bad("blocks must be comma-separated integers and wait_s a number") from None
        store = self.kv_store
        if wait_s > 0 and store.get(key, trio.current_time()) is None:
            await self._wait_published(key, wait_s)
        try:
            entry, body = store.take(key, blocks, trio.current_time())
        except KVUnknownBlocks as exc:
            raise ApiError(404, f"engine {self.engine_id}: {exc}", "blocks") from None
        except KeyError:
            raise ApiError(
                404,
                f"engine {self.engine_id} holds no KV for {key!r} (never published, already "
                f"fetched, or expired after {store.ttl_s:g} s)",
            ) from None
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"x-request-id", rid),
            (b"x-sim-engine-id", self.engine_id.encode()),
            (b"x-sim-prompt-digest", entry.digest.encode()),
            (b"x-sim-num-tokens", str(entry.num_tokens).encode()),
        ]
        if self.options.zone is not None:  # the decode worker's KV transfer model reads it
            headers.append((b"x-sim-zone", self.options.zone.encode("ascii")))
        await responder.send_full(200, headers, body)

    async def _wait_published(self, key: str, wait_s: float) -> None:
        waiters = self._kv_waiters.get(key)
        if waiters is None:
            waiters = self._kv_waiters[key] = _Waiters()
        waiters.count += 1
        try:
            with trio.move_on_after(wait_s):
                await waiters.event.wait()
        finally:
            waiters.count -= 1
            if waiters.count == 0 and self._kv_waiters.get(key) is waiters:
                del self._kv_waiters[key]

    def _handoff_snapshot(self) -> dict[str, Any]:
        kv, ec, lm, s = self.kv_store, self.ec_store, self.lmcache, self.stats
        return {
            "kv_entries_held": len(kv),
            "kv_entries_published": kv.published,
            "kv_entries_released": kv.released,
            "kv_entries_expired": kv.expired,
            "kv_entries_evicted": kv.evicted,
            "kv_blocks_served": kv.blocks_served,
            "kv_blocks_fetched": s.kv_blocks_fetched,
            "kv_blocks_verified": s.kv_blocks_verified,
            "kv_fetch_failures": s.kv_fetch_failures,
            "kv_verify_failures": s.kv_verify_failures,
            "zone": self.options.zone,
            "kv_transfer_seconds_total": s.kv_transfer_seconds_total,
            "kv_transfers_same_zone": s.kv_transfers_same_zone,
            "kv_transfers_cross_zone": s.kv_transfers_cross_zone,
            "local_prefills": s.local_prefills,
            "p2p_published": s.p2p_published,
            "p2p_received": s.p2p_received,
            "p2p_misrouted": s.p2p_misrouted,
            "lmcache_dir": None if lm is None else str(lm.root),
            "lmcache_chunks_stored": 0 if lm is None else lm.chunks_stored,
            "lmcache_chunks_hit": 0 if lm is None else lm.chunks_hit,
            "lmcache_hit_tokens": 0 if lm is None else lm.hit_tokens,
            "lmcache_hits": 0 if lm is None else lm.hits,
            "lmcache_misses": 0 if lm is None else lm.misses,
            "handoff_mode": self.options.handoff,
            "pool_kv_published": s.pool_kv_published,
            "pool_kv_taken": s.pool_kv_taken,
            "pool_embeddings_stored": s.pool_embeddings_stored,
            "pool_embeddings_found": s.pool_embeddings_found,
            "pool_embeddings_missing": s.pool_embeddings_missing,
            "ec_dir": self.options.ec_dir,
            "embeddings_stored": 0 if ec is None else ec.stored,
            "embeddings_found": 0 if ec is None else ec.found,
            "embeddings_missing": 0 if ec is None else ec.missing,
        }

    def _handoff_counters(self) -> list[tuple[str, str, float]]:
        """Simulator-only series for /metrics (``lmgw_sim:`` prefix: not vLLM names)."""
        snap = self._handoff_snapshot()
        return [
            ("lmgw_sim:kv_blocks_served_total", "KV blocks served to decode workers.",
             snap["kv_blocks_served"]),
            ("lmgw_sim:kv_blocks_fetched_total", "KV blocks fetched from prefill workers.",
             snap["kv_blocks_fetched"]),
            ("lmgw_sim:kv_blocks_verified_total", "Fetched KV blocks that matched the prompt.",
             snap["kv_blocks_verified"]),
            ("lmgw_sim:kv_transfer_failures_total", "KV fetches that failed or did not verify.",
             snap["kv_fetch_failures"] + snap["kv_verify_failures"]),
            ("lmgw_sim:kv_transfer_seconds_total",
             "Modelled KV transfer time slept before decoding (kv_bytes_per_token).",
             snap["kv_transfer_seconds_total"]),
            ("lmgw_sim:kv_transfers_same_zone_total",
             "KV hand-offs taken from a prefill worker of this worker's zone.",
             snap["kv_transfers_same_zone"]),
            ("lmgw_sim:kv_transfers_cross_zone_total",
             "KV hand-offs taken from a prefill worker of another zone.",
             snap["kv_transfers_cross_zone"]),
            ("lmgw_sim:p2p_misrouted_total",
             "P2P NCCL requests whose pair id names another worker's KV address.",
             snap["p2p_misrouted"]),
            ("lmgw_sim:lmcache_chunks_stored_total", "KV chunks written to the LMCache store.",
             snap["lmcache_chunks_stored"]),
            ("lmgw_sim:lmcache_hits_total", "Decode lookups that found the whole prompt.",
             snap["lmcache_hits"]),
            ("lmgw_sim:lmcache_misses_total", "Decode lookups with chunks missing from LMCache.",
             snap["lmcache_misses"]),
            ("lmgw_sim:lmcache_hit_tokens_total", "Prompt tokens whose KV was found in LMCache.",
             snap["lmcache_hit_tokens"]),
            ("lmgw_sim:embeddings_stored_total", "Encoder outputs written to the EC directory.",
             snap["embeddings_stored"]),
            ("lmgw_sim:embeddings_found_total", "Encoder outputs found for requests' media.",
             snap["embeddings_found"]),
            ("lmgw_sim:embeddings_missing_total", "Media items whose encoder output was missing.",
             snap["embeddings_missing"]),
        ]  # fmt: skip

    def close(self) -> None:
        """Close the side-channel client's idle connections (the server closes the rest) and
        the hand-off pool (its shared-memory entries go)."""
        self._pool.close()
        if self.handoff_pool is not None:
            self.handoff_pool.close()

    # -- other vLLM routes ------------------------------------------------------------------------

    def _build_models_body(self) -> bytes:
        """The /v1/models body, built once and again whenever the adapters change: the base
        model's names, then each adapter (its path as ``root``, the first name as ``parent``,
        no ``max_model_len``), as vLLM lists them."""
        opts = self.options
        max_len = self.engine.max_model_len
        data = [self._model_card(name, opts.model, None, max_len) for name in opts.served_names]
        parent = self._default_model
        data += [self._model_card(name, path, parent, None) for name, path in self.lora]
        return _encode({"object": "list", "data": data})

    def _model_card(
        self, name: str, root: str, parent: str | None, max_model_len: int | None
    ) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": self._created,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{uuid.uuid4().hex}",
                    "object": "model_permission",
                    "created": self._created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }

    async def _models(self, request: Request, responder: Responder, rid: bytes) -> None:
        await _send_json(responder, 200, self._models_body, rid)

    async def _load_lora(self, request: Request, responder: Responder, rid: bytes) -> None:
        """vLLM's ``POST /v1/load_lora_adapter``: plain-text success, vLLM's error bodies."""
        try:
            req = _load_lora_decoder.decode(request.body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _bad(str(exc)) from None
        with _lora_errors():
            text = self.lora.load(req.lora_name, req.lora_path, inplace=req.load_inplace)
        await self._lora_changed(responder, text, rid)

    async def _unload_lora(self, request: Request, responder: Responder, rid: bytes) -> None:
        """vLLM's ``POST /v1/unload_lora_adapter``."""
        try:
            req = _unload_lora_decoder.decode(request.body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _bad(str(exc)) from None
        with _lora_errors():
            text = self.lora.unload(req.lora_name)
        await self._lora_changed(responder, text, rid)

    async def _lora_changed(self, responder: Responder, text: str, rid: bytes) -> None:
        self._models_body = self._build_models_body()
        # vLLM answers the bare string (a Starlette Response without a media type): no
        # content-type header, which is what a client of the real server sees
        await responder.send_full(200, [(b"x-request-id", rid)], text.encode())

    async def _health(self, request: Request, responder: Responder, rid: bytes) -> None:
        if self.faults.health_ok():
            await responder.send_full(200, [(b"x-request-id", rid)], b"")
        else:
            raise ApiError(503, "The simulated worker is unhealthy (fault).")

    async def _metrics(self, request: Request, responder: Responder, rid: bytes) -> None:
        body = self.metrics_text().encode()
        await responder.send_full(200, [_TEXT, (b"x-request-id", rid)], body)

    def metrics_text(self) -> str:
        """The /metrics body (vLLM's names; ``engine`` labels this engine's rank)."""
        text = render_metrics(
            self.engine,
            self._default_model,
            self._handoff_counters(),
            engine_index=self.options.dp_rank or 0,
        )
        if self.options.lora_enabled:
            text += render_lora_info(
                self._lora_slots.running(), self._lora_slots.waiting(), self._max_lora_label()
            )
        return text

    def _max_lora_label(self) -> int:
        """vLLM's ``max_lora`` label: ``max_loras``, or without a limit the adapters served
        (at least 1), since all of them may run at once (a router reads it as capacity)."""
        limit = self.options.max_loras
        return limit if limit is not None else max(1, len(self.lora))

    async def _version(self, request: Request, responder: Responder, rid: bytes) -> None:
        await _send_json(responder, 200, b'{"version":"0.0.0+lmgw.sim"}', rid)

    async def _server_info(self, request: Request, responder: Responder, rid: bytes) -> None:
        """SGLang's server arguments, the ones a router reads: the P/D mode and, for a
        prefill worker, its bootstrap port (this simulator's: its HTTP port)."""
        role = self.options.role
        mode = {"p": "prefill", "d": "decode"}.get(role, "null")
        info = {
            "model_path": self._default_model,
            "served_model_name": self._default_model,
            "disaggregation_mode": mode,
            "disaggregation_bootstrap_port": self.side_port if role == "p" else 8998,
            "dp_size": 1,
            "tp_size": 1,
            "version": "0.0.0+lmgw.sim",
        }
        await _send_json(responder, 200, msgspec.json.encode(info), rid)

    async def _tokenize(self, request: Request, responder: Responder, rid: bytes) -> None:
        try:
            req = _tokenize_decoder.decode(request.body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _bad(str(exc)) from None
        self._resolve_model(req.model)
        tok = self.engine.tokenizer
        special = req.add_special_tokens
        ids: Sequence[int]
        if bytes(req.messages) != b"null":  # a chat: rendered and encoded as for generation
            ids = self._render_chat(req, bool(special)).token_ids
        elif req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=special is not False)
        else:
            raise _bad("Either prompt or messages must be provided.")
        strs = tok.token_strs(ids) if req.return_token_strs else None
        body = {
            "count": len(ids),
            "max_model_len": self.engine.max_model_len,
            "tokens": ids,
            "token_strs": strs,
        }
        await _send_json(responder, 200, _encode(body), rid)

    async def _detokenize(self, request: Request, responder: Responder, rid: bytes) -> None:
        try:
            req = _detokenize_decoder.decode(request.body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _bad(str(exc)) from None
        self._resolve_model(req.model)
        tok = self.engine.tokenizer
        try:
            tok.check_ids(req.tokens, "tokens")
        except PromptError as exc:
            raise _bad(str(exc), exc.param) from None
        text = tok.decode(req.tokens)
        await _send_json(responder, 200, _encode({"prompt": text}), rid)

    # -- simulator controls -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What GET /sim/stats answers (also handy for in-process tests)."""
        s = self.stats
        e = self.engine
        return {
            "role": self.options.role,
            "model": self._default_model,
            "requests_total": s.requests_total,
            "in_flight": s.in_flight,
            "aborted_total": s.aborted_total,
            "dropped_total": s.dropped_total,
            "errors_injected": s.errors_injected,
            "aborted": list(s.aborted),
            "request_ids": list(s.request_ids),
            "last_headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in s.last_headers},
            "running": e.running,
            "waiting": e.waiting,
            "kv_cache_usage": e.kv_cache_usage,
            "prefix_cache": {
                "blocks": len(e.cache),
                "capacity_blocks": e.cache.capacity_blocks,
                "queries": e.cache.queries,
                "hits": e.cache.hits,
                "evictions": e.cache.evictions,
            },
            "prompt_tokens_total": e.stats.prompt_tokens,
            "generation_tokens_total": e.stats.generation_tokens,
            "faults": self.faults.as_dict(),
            "engine_id": self.engine_id,
            "side_channel": {"host": self.side_host, "port": self.side_port},
            "kv_address": self.kv_address,
            "kv_connector": self.options.kv_connector,
            "stream_head": self.options.stream_head,
            "handoff": self._handoff_snapshot(),
            "kv_events": None if self.kv_events is None else self.kv_events.statistics(),
            "lora_adapters": self.lora.as_dict(),
            "lora_requests": dict(s.lora_requests),
            "lora_slots": {
                "max_loras": self.options.max_loras,
                "active": self._lora_slots.active(),
                "waiting": self._lora_slots.waiting(),
            },
        }

    async def _sim_stats(self, request: Request, responder: Responder, rid: bytes) -> None:
        await _send_json(responder, 200, _encode(self.snapshot()), rid)

    async def _sim_prefix_cache(self, request: Request, responder: Responder, rid: bytes) -> None:
        """The prefix cache's block hashes, least recently used first (what KV events told)."""
        cache = self.engine.cache
        body = {"block_size": cache.block_size, "blocks": cache.block_hashes()}
        await _send_json(responder, 200, _encode(body), rid)

    async def _sim_faults(self, request: Request, responder: Responder, rid: bytes) -> None:
        if request.method == "POST":
            try:
                patch = msgspec.json.decode(request.body) if request.body else {}
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                raise _bad(str(exc)) from None
            if not isinstance(patch, dict):
                raise _bad("the body must be a JSON object of fault settings")
            try:
                self.faults.update(patch)
            except ValueError as exc:
                raise _bad(str(exc)) from None
            self.engine.slow = self.faults.faults.slow
        await _send_json(responder, 200, _encode(self.faults.as_dict()), rid)

    async def _sim_reset(self, request: Request, responder: Responder, rid: bytes) -> None:
        self.reset()
        await _send_json(responder, 200, b"{}", rid)

    def reset(self) -> None:
        """Clear counters, history and the prefix cache; restore the start-up faults and LoRA
        adapters."""
        in_flight = self.stats.in_flight
        self.stats = SimStats(in_flight=in_flight)
        self.kv_store.clear()
        if self.ec_store is not None:
            self.ec_store.stored = self.ec_store.found = self.ec_store.missing = 0
        if self.lmcache is not None:
            self.lmcache.reset_counters()  # the shared directory is not this worker's to clear
        self.engine.reset()
        self.faults.reset()
        self.engine.slow = self.faults.faults.slow
        self.lora.reset()  # as a restarted engine: only the start-up adapters
        self._lora_slots.clear_idle()
        self._lora_freed.unpark_all()
        self._models_body = self._build_models_body()


# ------------------------------------------------------------------------------------------------
# Streaming
# ------------------------------------------------------------------------------------------------


class _StreamWriter:
    """Builds the SSE bytes of one request; constant parts are encoded once."""

    __slots__ = (
        "_chat",
        "_head",
        "_logprobs",
        "_plan",
        "_post",
        "_pre",
        "_simple",
        "_usage_each",
        "tokens",
    )

    def __init__(
        self,
        plan: _Plan,
        created: int,
        logprobs: Callable[[int, int], bytes] | None = None,
    ) -> None:
        self._plan = plan
        self._logprobs = logprobs
        self._chat = plan.kind == "chat"
        obj = "chat.completion.chunk" if self._chat else "text_completion"
        prefix = "chatcmpl-" if self._chat else "cmpl-"
        self._head = (
            b'data: {"id":'
            + _encode(prefix + plan.request_id)
            + b',"object":"'
            + obj.encode()
            + b'","created":'
            + str(created).encode()
            + b',"model":'
            + _encode(plan.model)
            + b',"choices":['
        )
        self._usage_each = plan.continuous_usage
        # Per-choice prefix up to the token text, and what follows it.
        field_ = b'"delta":{"content":' if self._chat else b'"text":'
        self._pre = [
            self._head + b'{"index":' + str(i).encode() + b"," + field_
            for i in range(len(plan.choices))
        ]
        self._post = b"}}]}\n\n" if self._chat else b"}]}\n\n"
        self._simple = len(plan.choices) == 1 and not self._usage_each and logprobs is None
        self.tokens = 0

    def _tail(self, completion_tokens: int) -> bytes:
        if not self._usage_each:
            return b"]}\n\n"
        p = self._plan.prompt_tokens
        return b'],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}}\n\n' % (
            p,
            p + completion_tokens,
            completion_tokens,
        )

    def _event(self, i: int, text_json: bytes, completion_tokens: int, lp: bytes = b"") -> bytes:
        if not self._usage_each and not lp:
            return self._pre[i] + text_json + self._post
        close = b"}" + lp + b"}" if self._chat else lp + b"}"
        return self._pre[i] + text_json + close + self._tail(completion_tokens)

    def step(self, step: int) -> bytes:
        """The events of decode step ``step``: one per choice that still has a token (plus, at
        step 0, the chat role chunk or the echoed prompt)."""
        if step and self._simple:  # the hot path: one choice, no per-chunk usage
            self.tokens += 1
            return self._pre[0] + self._plan.choices[0].pieces_json[step] + self._post
        out: list[bytes] = []
        for i, c in enumerate(self._plan.choices):
            if step >= c.num_tokens:
                continue
            if step == 0:
                out.append(self._opening(i))
            self.tokens += 1
            lp = b"" if self._logprobs is None else self._logprobs(i, step)
            out.append(self._event(i, c.pieces_json[step], step + 1, lp))
        return b"".join(out)

    def _opening(self, i: int) -> bytes:
        if self._chat:
            return (
                self._head
                + b'{"index":'
                + str(i).encode()
                + b',"delta":{"role":"assistant","content":""}}'
                + self._tail(0)
            )
        echo = self._plan.echo_texts
        return b"" if echo is None else self._event(i, _encode(echo[i]), 0)

    def finish(self) -> bytes:
        """Final chunk per choice (finish_reason), the usage chunk if asked, then [DONE]."""
        plan = self._plan
        out: list[bytes] = []
        for i, c in enumerate(plan.choices):
            if c.num_tokens == 0:
                out.append(self._opening(i))
            body = b'{"index":%d,' % i
            body += b'"delta":{"content":""}' if self._chat else b'"text":""'
            body += b',"finish_reason":' + _encode(c.finish_reason)
            if c.stop_reason is not None:
                body += b',"stop_reason":' + _encode(c.stop_reason)
            out.append(self._head + body + b"}" + self._tail(c.num_tokens))
        if plan.include_usage:
            p, n = plan.prompt_tokens, plan.completion_tokens
            usage = {
                "prompt_tokens": p,
                "total_tokens": p + n,
                "completion_tokens": n,
                "prompt_tokens_details": {"cached_tokens": plan.cached_tokens},
            }
            out.append(self._head + b'],"usage":' + _encode(usage) + b"}\n\n")
        out.append(_DONE)
        return b"".join(out)


class _GenerateStreamWriter:
    """The SSE bytes of a streamed ``/generate``: per decode step one event per choice that has
    a token, with text, ids and logprobs so far (SGLang's default, cumulative) and the
    ``finish_reason`` on a choice's last event; ``index`` when the answer is a batch."""

    __slots__ = ("_choice", "_plan", "tokens")

    def __init__(
        self, plan: _Plan, choice: Callable[[_Plan, int, int | None], dict[str, Any]]
    ) -> None:
        self._plan = plan
        self._choice = choice
        self.tokens = 0

    def _event(self, c: int, upto: int) -> bytes:
        return b"data: " + _encode(self._choice(self._plan, c, upto)) + b"\n\n"

    def step(self, step: int) -> bytes:
        out: list[bytes] = []
        for c, completion in enumerate(self._plan.choices):
            if step < completion.num_tokens:
                self.tokens += 1
                out.append(self._event(c, step + 1))
        return b"".join(out)

    def finish(self) -> bytes:
        """Choices that said nothing get their (final) event; then ``[DONE]``."""
        out = [self._event(c, 0) for c, x in enumerate(self._plan.choices) if x.num_tokens == 0]
        out.append(_DONE)
        return b"".join(out)


def _constraint_field(kind: str, sent: dict[str, Any]) -> str:
    """The body field a constraint of ``kind`` came from (one kind per request, so one field
    states it, besides ``guided_whitespace_pattern``)."""
    rf = sent.get("response_format")
    if kind in ("json", "json_object", "structural_tag") and isinstance(rf, dict):
        return "response_format"
    so = sent.get("structured_outputs")
    if isinstance(so, dict) and so.get(kind) not in (None, False):
        return "structured_outputs"
    legacy = "guided_" + kind
    return legacy if legacy in sent else "structured_outputs"


@contextlib.contextmanager
def _lora_errors() -> Iterator[None]:
    """A refused adapter load or unload as vLLM's error body (its status and error type)."""
    try:
        yield
    except LoraError as exc:
        raise ApiError(exc.status, exc.message, err_type=exc.err_type) from None


async def _send_json(responder: Responder, status: int, body: bytes, rid: bytes) -> None:
    await responder.send_full(status, [_JSON, (b"x-request-id", rid)], body)


def unsupported_role_message(role: str) -> str:
    return f"unknown worker role {role!r}: expected one of {', '.join(ROLES)}"


def _kv_param(params: dict[str, Any], name: str, kind: type) -> Any:
    value = params.get(name)
    if type(value) is not kind or (kind is str and not value):
        raise _bad(
            f"kv_transfer_params.{name} must be a {kind.__name__} (copy the prefill response's "
            "kv_transfer_params verbatim)",
            "kv_transfer_params",
        )
    return value


@dataclass(frozen=True, slots=True)
class _Sequence:
    """One sequence of an SGLang request (a prompt's sample): its bootstrap fields and ids."""

    room: int
    host: Any
    port: Any
    ids: Sequence[int]


def _sglang_sequences(req: _HandOffFields, plan: _Plan) -> list[_Sequence]:
    """The request's sequences in answer order (prompt ``i``'s sample ``j`` is ``i * n + j``),
    each with its bootstrap fields. SGLang expands a batch of P prompts sampled n times in
    sample-major order (element ``j * P + i``): a list of P * n rooms is read in that order, one
    room is expanded to ``room + k``, as SGLang expands it. Rooms must be distinct: two
    sequences in one room would take each other's KV."""
    count = len(plan.prompts)
    n = plan.n
    total = count * n
    rooms = _expand(req.bootstrap_room, count, n, "bootstrap_room", rooms=True)
    for room in rooms:
        if not isinstance(room, int) or isinstance(room, bool) or room < 0:
            raise _bad("bootstrap_room must be a non-negative integer", "bootstrap_room")
    if len(set(rooms)) != total:
        raise _bad("bootstrap_room: each sequence needs a room of its own", "bootstrap_room")
    hosts = _expand(req.bootstrap_host, count, n, "bootstrap_host")
    ports = _expand(req.bootstrap_port, count, n, "bootstrap_port")
    return [_Sequence(rooms[c], hosts[c], ports[c], plan.prompts[c // n]) for c in range(total)]


def _expand(value: Any, count: int, n: int, name: str, *, rooms: bool = False) -> list[Any]:
    """A bootstrap field as one value per sequence, in answer order (see
    :func:`_sglang_sequences`): a scalar for all (a room: ``room + k``), a list of one per
    sequence in SGLang's expanded order, or (not for rooms) one per prompt."""
    total = count * n
    if not isinstance(value, list):
        if rooms and total > 1 and isinstance(value, int) and not isinstance(value, bool):
            return [value + (c % n) * count + c // n for c in range(total)]
        return [value] * total
    if len(value) == total:
        return [value[(c % n) * count + c // n] for c in range(total)]
    if len(value) == count and not rooms:
        return [value[c // n] for c in range(total)]
    what = f"{count} prompt(s) x n={n}"
    raise _bad(
        f"{name} has {len(value)} entries for {total} sequences ({what}): SGLang pairs one "
        f"room with each (prompt, sample); give {total}"
        + ("" if rooms else f", {count} (one per prompt)")
        + " or one value",
        name,
    )


__all__ = [
    "KV_CONNECTORS",
    "ROLES",
    "ApiError",
    "SimStats",
    "SimWorker",
    "WorkerOptions",
    "unsupported_role_message",
]
