"""The HTTP face of a simulated vLLM worker: vLLM's OpenAI-compatible API, /health, /metrics,
/tokenize, /detokenize, plus /sim/* controls for tests.

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

Routing fidelity: prefill takes time in proportion to the prompt tokens the prefix cache does
not hold (a bounded LRU of chained block hashes, :class:`.engine.PrefixCache`); requests over
``max_num_seqs`` wait, and with ``serial_prefill`` prefills compute one at a time, so a busy
worker queues and a cache hit frees capacity. With ``kv_events`` the worker publishes its prefix
cache's changes as vLLM does (:mod:`.kv_events`); ``GET /sim/prefix_cache`` lists what it holds.

``SimWorker`` is a handler in the contract of :mod:`lmgw.http.types`; any server that speaks that
contract (the native trio server, the ASGI adapter, a fake responder in tests) can serve it. The
engine logic lives in :mod:`.engine` (sans-IO); this module only parses, validates, sleeps per the
timing model and writes vLLM-shaped bytes.

Hot path (the simulator is the "direct" baseline of the gateway-overhead benchmarks, run at
``speed=inf``): requests are decoded by typed msgspec structs, the constant parts of every SSE
event are encoded once per request, output pieces are pre-encoded in the vocabulary, and each
decode step is one write.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import msgspec
import trio

from lmgw.http.types import Headers, Request, Responder
from lmgw.tools import TOOL_PARSERS
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
    MediaItem,
    PromptError,
    RenderedPrompt,
    ReplyPlan,
    SamplingSpec,
    Ticket,
    TimingModel,
    ToolPlan,
    choice_sampling,
    plan_tool_call,
    tool_results_reply,
)
from .faults import DropConnection, FaultInjector, Faults
from .kv_events import KvEventPublisher
from .metrics import render_metrics

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
    seed: int = 0
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
    tool_format: str = DEFAULT_TOOL_FORMAT
    """How the model writes tool calls (a parser name of :mod:`lmgw.tools`) when a chat request
    carries ``tools``: the worker answers with that raw text, like a vLLM worker started without
    ``--enable-auto-tool-choice``, and leaves the parsing to the gateway (docs/tools.md)."""

    @property
    def served_names(self) -> tuple[str, ...]:
        return self.served_model_names or (self.model,)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            seed=self.seed,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            kv_blocks=self.kv_blocks,
            block_size=self.block_size,
            timing=TimingModel(speed=self.speed),
            model_dir=self.model_dir,
            serial_prefill=self.serial_prefill,
        )


# ------------------------------------------------------------------------------------------------
# Request bodies (typed views; unknown fields are ignored, as vLLM ignores extra fields)
# ------------------------------------------------------------------------------------------------


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class _GenRequest(msgspec.Struct, kw_only=True):
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
    kv_transfer_params: dict[str, Any] | None = None
    bootstrap_host: str | list[str] | None = None
    bootstrap_port: int | list[int | None] | None = None
    bootstrap_room: int | list[int] | None = None


_NULL = msgspec.Raw(b"null")

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


class CompletionRequest(_GenRequest, kw_only=True):
    prompt: Any = None
    echo: bool | None = False
    add_special_tokens: bool = True


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


_chat_decoder = msgspec.json.Decoder(ChatRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_tokenize_decoder = msgspec.json.Decoder(TokenizeRequest)
_detokenize_decoder = msgspec.json.Decoder(DetokenizeRequest)
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

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> bytes:
        err_type = self.TYPES.get(self.status, "InternalServerError")
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

    kind: str  # "chat" | "completion"
    request_id: str
    model: str
    prompts: list[Sequence[int]]
    choices: list[Completion]
    stream: bool
    include_usage: bool
    continuous_usage: bool
    echo_texts: list[str] | None = None  # completions with echo: prompt text per choice
    cached_tokens: int = 0  # known after prefill
    external_cached: int = 0  # prompt tokens whose KV came from a prefill worker
    extra_prefill_s: float = 0.0  # e.g. the encoder's per-item time
    after_prefill: Callable[[], None] | None = None  # publishes a hand-off once "computed"
    publish: Callable[[], Awaitable[None]] | None = None  # the same, through the cache pool
    kv_transfer_params: dict[str, Any] | None = None  # the non-stream body's field

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)


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
    p2p_published: int = 0
    p2p_received: int = 0
    p2p_misrouted: int = 0
    pool_kv_published: int = 0
    pool_kv_taken: int = 0
    pool_embeddings_stored: int = 0
    pool_embeddings_found: int = 0
    pool_embeddings_missing: int = 0


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
        self.faults = FaultInjector(self.options.faults, seed=self.options.seed)
        self.engine.slow = self.faults.faults.slow
        self.stats = SimStats()
        self._slots = trio.Semaphore(max(1, self.options.max_num_seqs))
        self._prefill_lock = trio.Lock()  # FIFO: serial prefills queue in arrival order
        self.kv_events = KvEventPublisher(opts.kv_events) if opts.kv_events else None
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
            "/v1/models": (frozenset({"GET"}), self._models),
            "/health": (frozenset({"GET"}), self._health),
            "/metrics": (frozenset({"GET"}), self._metrics),
            "/version": (frozenset({"GET"}), self._version),
            "/tokenize": (frozenset({"POST"}), self._tokenize),
            "/detokenize": (frozenset({"POST"}), self._detokenize),
            "/sim/stats": (frozenset({"GET"}), self._sim_stats),
            "/sim/faults": (frozenset({"GET", "POST"}), self._sim_faults),
            "/sim/reset": (frozenset({"POST"}), self._sim_reset),
            "/sim/prefix_cache": (frozenset({"GET"}), self._sim_prefix_cache),
        }
        self._models_body = self._build_models_body()

    # -- dispatch ---------------------------------------------------------------------------------

    async def __call__(self, request: Request, responder: Responder) -> None:
        path = request.path
        entry = self._routes.get(path)
        if entry is None and path.startswith("/sim/kv/"):
            entry = (frozenset({"GET"}), self._sim_kv)
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

    def _check_model(self, model: str | None) -> str:
        if model is None:
            return self._default_model
        if model not in self._names:
            raise ApiError(404, f"The model `{model}` does not exist.", "model")
        return model

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
        choices = self._continuation(req, spec) if req.continue_final_message and n == 1 else None
        if choices is None:
            tool = self._tool_plan(req)
            choices = [self.engine.generate(ids, *choice_sampling(spec, i), tool) for i in range(n)]
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

    def _continuation(self, req: ChatRequest, spec: SamplingSpec) -> list[Completion] | None:
        """``continue_final_message`` on a partial answer of this model: the rest of the answer
        the messages before it would have got (rendered with ``add_generation_prompt``), so a
        stream continued on another worker (the gateway's mid-stream migration) ends exactly as
        the uninterrupted one. None when the final message is not a prefix of that answer (then
        the request is served as sent)."""
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
        choices = [
            self.engine.generate(ids, *choice_sampling(spec, i))
            for ids in prompts
            for i in range(n)
        ]
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
        )
        await self._prepare_leg(req, plan, ())
        await self._run(plan, responder, rid)

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
    def _token_list(p: list[Any]) -> list[int]:
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise _bad("token id lists must contain integers only", "prompt")
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
        writer = _StreamWriter(plan, self._created) if plan.stream else None
        generated = 0
        finished = False
        acquired = False
        computing = False  # holds the prefill lock (serial_prefill)
        try:
            if faults.hang:
                await trio.sleep_forever()
            ticket = engine.submit(plan.prompt_tokens, len(plan.choices))
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
            if writer is not None:
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
            if ticket is not None:
                if writer is not None:
                    generated = writer.tokens  # counts every choice's tokens
                self._close_ticket(ticket, plan, generated, finished, arrival)

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

    def _body(self, plan: _Plan) -> bytes:
        cached = plan.cached_tokens
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
                            "logprobs": None,
                            "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason,
                        }
                        for i, c in enumerate(plan.choices)
                    ],
                    "service_tier": None,
                    "system_fingerprint": None,
                    "usage": self._usage(plan, cached),
                    "prompt_logprobs": None,
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
                        "logprobs": None,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                        "prompt_logprobs": None,
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

    def _leg_max_tokens(self, req: _GenRequest, max_tokens: int | None) -> int | None:
        """A prefill worker in SGLang mode gets the client's body unchanged and stops after the
        first token (the decode worker produces the rest), as SGLang's prefill mode does."""
        if self.options.role == "p" and req.bootstrap_room is not None:
            params = req.kv_transfer_params
            if not (isinstance(params, dict) and params.get("do_remote_decode")):
                return 1
        return max_tokens

    async def _prepare_leg(
        self, req: _GenRequest, plan: _Plan, media: tuple[MediaItem, ...]
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

    def _prefill_leg(self, req: _GenRequest, plan: _Plan) -> None:
        params = req.kv_transfer_params
        nixl = isinstance(params, dict) and bool(params.get("do_remote_decode"))
        if not nixl and req.bootstrap_room is None:
            pair = self._pair_id(plan)
            if pair is not None:
                self._p2p_prefill_leg(pair, plan)
            elif self.lmcache is not None:
                self._lmcache_prefill_leg(plan)
            return  # otherwise a plain request: served like a merged worker
        if len(plan.prompts) != 1:
            raise _bad("a disaggregated prefill takes one prompt per request", "prompt")
        ids = plan.prompts[0]
        block_size = self.engine.config.block_size
        if nixl:
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

        else:
            key = f"room-{self._room(req)}"

            def publish() -> None:
                self.kv_store.put(key, ids, block_size, trio.current_time())
                self._published(key)

        plan.after_prefill = publish
        self._through_pool(plan, key, ids, block_size)

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
        self._through_pool(plan, pair.key, ids, block_size)

    def _through_pool(self, plan: _Plan, key: str, ids: Sequence[int], block_size: int) -> None:
        """With ``handoff="pool"``: the prompt's KV blocks go to the cache pool under
        ``kv:{key}`` (its prompt digest, then the blocks) instead of staying here for the side
        channel; the hand-off parameters the answer carries are unchanged."""
        pool = self.handoff_pool
        if pool is None:
            return

        async def put() -> None:
            data = prompt_digest(ids).encode() + b"".join(kv_block_payloads(ids, block_size))
            ok = await pool.put(f"kv:{key}", data, ttl_s=self.options.kv_ttl_s)
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

    @staticmethod
    def _room(req: _GenRequest) -> int:
        room = _single(req.bootstrap_room, "bootstrap_room")
        if not isinstance(room, int) or isinstance(room, bool) or room < 0:
            raise _bad("bootstrap_room must be a non-negative integer", "bootstrap_room")
        return room

    def _published(self, key: str) -> None:
        waiters = self._kv_waiters.pop(key, None)
        if waiters is not None:
            waiters.event.set()

    async def _decode_leg(self, req: _GenRequest, plan: _Plan) -> None:
        """Fetch the prompt's KV from the prefill worker and verify it, or refuse the request:
        a decode-only worker never computes a prompt on its own."""
        if len(plan.prompts) != 1:
            raise _bad("a disaggregated decode takes one prompt per request", "prompt")
        ids = plan.prompts[0]
        params = req.kv_transfer_params
        engine_id: str | None = None
        pair: PairId | None = None
        if isinstance(params, dict) and params.get("do_remote_prefill"):
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
        elif req.bootstrap_room is not None:
            room = self._room(req)
            host = _single(req.bootstrap_host, "bootstrap_host")
            port = _single(req.bootstrap_port, "bootstrap_port")
            if not isinstance(host, str) or not host:
                raise _bad("bootstrap_host must be the prefill worker's host", "bootstrap_host")
            if type(port) is not int:
                raise _bad(
                    "bootstrap_port must be the prefill worker's bootstrap port (for this "
                    "simulator: its HTTP port)",
                    "bootstrap_port",
                )
            wait = self.options.bootstrap_timeout_s
            path = f"/sim/kv/room-{room}?wait_s={wait:g}"
            timeout = wait + self.options.kv_fetch_timeout_s
            what = f"bootstrap_room {room}"
            pool_key, pool_wait = f"room-{room}", wait
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
            self._lmcache_decode_leg(ids, plan)
            return
        else:
            raise _bad(
                "this is a decode-only worker (role d): the request needs kv_transfer_params "
                "with do_remote_prefill=true (copied from the prefill response), SGLang's "
                "bootstrap_host/bootstrap_port/bootstrap_room, or a P2P NCCL pair id "
                "(X-Request-Id ___prefill_addr_..___decode_addr_.._<hex>)",
                "kv_transfer_params",
            )
        stats = self.stats
        if self.handoff_pool is not None:
            body, peer_engine, peer_digest = await self._take_kv(pool_key, pool_wait, what)
        else:
            body, peer_engine, peer_digest = await self._fetch_kv(host, port, path, timeout, what)
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
        if pair is not None:
            stats.p2p_received += 1
        bs = self.engine.config.block_size
        plan.external_cached = min(verified * bs, max(0, len(ids) - 1) // bs * bs)

    def _lmcache_decode_leg(self, ids: Sequence[int], plan: _Plan) -> None:
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

    async def _take_kv(
        self, key: str, wait_s: float, what: str
    ) -> tuple[bytes, str | None, str | None]:
        """The prompt's KV from the cache pool (``handoff="pool"``): waits up to ``wait_s`` for
        the prefill worker to put it (SGLang's legs run at once), takes it (deletes it), and
        returns (blocks, the producing engine's id, the prompt digest it was stored with)."""
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
        return data[32:], entry.meta.producer, data[:32].decode("latin-1")

    async def _fetch_kv(
        self, host: str, port: int, path: str, timeout_s: float, what: str
    ) -> tuple[bytes, str | None, str | None]:
        """GET the blocks from the prefill worker's side channel: (bytes, its engine id, its
        prompt digest). Every failure is a vLLM-shaped 500 naming the prefill worker."""
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
        return (
            body,
            None if peer_engine is None else peer_engine.decode("latin-1"),
            None if peer_digest is None else peer_digest.decode("latin-1"),
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
        opts = self.options
        data = [
            {
                "id": name,
                "object": "model",
                "created": self._created,
                "owned_by": "vllm",
                "root": opts.model,
                "parent": None,
                "max_model_len": self.engine.max_model_len,
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
            for name in opts.served_names
        ]
        return _encode({"object": "list", "data": data})

    async def _models(self, request: Request, responder: Responder, rid: bytes) -> None:
        await _send_json(responder, 200, self._models_body, rid)

    async def _health(self, request: Request, responder: Responder, rid: bytes) -> None:
        if self.faults.health_ok():
            await responder.send_full(200, [(b"x-request-id", rid)], b"")
        else:
            raise ApiError(503, "The simulated worker is unhealthy (fault).")

    async def _metrics(self, request: Request, responder: Responder, rid: bytes) -> None:
        body = render_metrics(self.engine, self._default_model, self._handoff_counters()).encode()
        await responder.send_full(200, [_TEXT, (b"x-request-id", rid)], body)

    async def _version(self, request: Request, responder: Responder, rid: bytes) -> None:
        await _send_json(responder, 200, b'{"version":"0.0.0+lmgw.sim"}', rid)

    async def _tokenize(self, request: Request, responder: Responder, rid: bytes) -> None:
        try:
            req = _tokenize_decoder.decode(request.body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _bad(str(exc)) from None
        self._check_model(req.model)
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
        self._check_model(req.model)
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
            "handoff": self._handoff_snapshot(),
            "kv_events": None if self.kv_events is None else self.kv_events.statistics(),
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
        """Clear counters, history and the prefix cache; restore the start-up faults."""
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


# ------------------------------------------------------------------------------------------------
# Streaming
# ------------------------------------------------------------------------------------------------


class _StreamWriter:
    """Builds the SSE bytes of one request; constant parts are encoded once."""

    __slots__ = ("_chat", "_head", "_plan", "_post", "_pre", "_simple", "_usage_each", "tokens")

    def __init__(self, plan: _Plan, created: int) -> None:
        self._plan = plan
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
        self._simple = len(plan.choices) == 1 and not self._usage_each
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

    def _event(self, i: int, text_json: bytes, completion_tokens: int) -> bytes:
        if not self._usage_each:
            return self._pre[i] + text_json + self._post
        close = b"}}" if self._chat else b"}"
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
            out.append(self._event(i, c.pieces_json[step], step + 1))
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


def _single(value: Any, name: str) -> Any:
    """SGLang's bootstrap fields are per batch element; this simulator takes one element."""
    if isinstance(value, list):
        if len(value) != 1:
            raise _bad(f"{name} must be a single value (batched hand-offs are not simulated)", name)
        return value[0]
    return value


__all__ = [
    "KV_CONNECTORS",
    "ROLES",
    "ApiError",
    "SimStats",
    "SimWorker",
    "WorkerOptions",
    "unsupported_role_message",
]
