"""Every flow over lmgw's native ZeroMQ protocol (models whose dialect is ``lmgw-native``).

Native workers take token ids, not OpenAI bodies, so the gateway does what vLLM's OpenAI server
would: it renders the chat template and tokenizes with the model's :class:`ModelText` (exactly
as vLLM does), translates the body's sampling fields to our :class:`SamplingParams`, and builds
the OpenAI answer from the worker's ``Delta``/``Finish`` events (:mod:`lmgw.transport.
openai_synth`). The stages:

* ``pd``: ``Generate`` on a merged worker;
* ``p/d``: ``Prefill`` on P, then ``Generate`` on D with ``PrefillDone.kv_transfer_params``
  relayed verbatim (the hand-off), and the KV itself when P sent it through the gateway
  (``PrefillDone.tensors``: the frames go on to D zero-copy, named by ``Generate.kv_tensors``);
* ``e+pd`` / ``e+p+d``: first one ``Encode`` per media item (the decoded pixels, samples or
  frames as tensor frames, never base64) on the encoder its hash routes to; then the rest,
  with the items named by hash (the encoder's shared storage holds their outputs), or by hash
  and tensor when the encoder sent its output back (``EncodeDone.tensors``).

``n > 1`` and batched completion prompts run one child request per choice after the media
stage, merged into one answer (:mod:`.fanout`).

Failure semantics are the HTTP flows' (docs/protocols.md, "Failure semantics"): a leg that
fails before anything reached the client is retried on another worker when the worker cannot
have started it (``RpcError.sent`` False) or the failure says nothing about the request
(retryable codes); a decode that fails before its first token is retried once with the same
hand-off (a fresh one when the KV stayed on P and the decode may have pulled it); a stage
that still fails is a 502 naming it (a worker's ``bad_request`` is the request's fault: a 400
with its message). A stream that breaks after its first byte is continued on another worker
with the prompt plus the text so far (:mod:`.migration`'s rules), or ended with an SSE error
event and ``[DONE]``.

Cancellation is structured: every leg runs in the request's scope, and a leg that ends early
(client gone, deadline, error) makes :class:`RpcChannel` send ``Abort`` to its worker.

:class:`NativeChannels` (owned by the Gateway) keeps one :class:`RpcChannel` per native worker;
the channel's state drives the worker's through the registry.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import lru_cache, partial
from secrets import token_hex
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from ..config import (
    FLOW_ROLES,
    NATIVE_DIALECT,
    ROLE_NAMES,
    ConfigError,
    GatewayConfig,
    HealthConfig,
    WorkerConfig,
    is_native_url,
    native_endpoint,
    normalize_role,
)
from ..errors import DECODE_ERRORS, GatewayError
from ..http.types import Responder
from ..protocol.messages import (
    CAPABILITIES,
    Delta,
    Drain,
    Encode,
    EncodeDone,
    Exit,
    FailureCode,
    Finish,
    Generate,
    Prefill,
    PrefillDone,
    SamplingParams,
    TensorRef,
)
from ..protocol.messages import MediaItem as WireMedia
from ..routing.placement import in_zone_of
from ..routing.policy import RouteContext
from ..structured import FIELDS as STRUCTURED_FIELDS
from ..structured import StructuredOutputError, structured_output
from ..transport.openai_synth import OpenAISynth, token_id_name
from ..transport.shm_host import DEFAULT_THRESHOLD as SHM_THRESHOLD
from ..transport.zmq.channel import ChannelState, RpcChannel, RpcError
from ..workers.registry import Candidates, Registry
from ..workers.worker import Worker, WorkerState
from . import migration
from .fanout import BEST_OF_MESSAGE, Fanout, child_params, child_request, leaf_of
from .handoff import Pins, bytes_by_path, for_peer, relay_tensors
from .request import GatewayRequest

if TYPE_CHECKING:
    from ..text.service import ModelText
    from .runner import Pipeline

__all__ = [
    "NativeChannels",
    "NativeRunner",
    "NativeWorker",
    "choices",
    "native_models",
    "sampling_params",
]

log = logging.getLogger("lmgw.pipeline")
_now = time.perf_counter

STAGE_NAMES = {"e": "encode", "p": "prefill", "d": "decode", "pd": "merged"}
_JSON = (b"content-type", b"application/json")
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


# -- workers and their channels -----------------------------------------------------------------


#: the route-scratch key of the worker a native P/D request's prefill ran on
PREFILLED_ON = ("native", "prefilled_on")


class NativeWorker(Worker):
    """A worker reached over the native protocol: a channel instead of an HTTP origin.

    ``Worker`` parses an HTTP origin from its URL; a native worker has none, so it gets one
    that refuses at once (port 0) should anything try HTTP on it."""

    __slots__ = ("channel", "curve_server_key", "endpoint", "notice_drained", "scope")

    def __init__(self, wc: WorkerConfig) -> None:
        super().__init__(
            wc.worker_id,
            "http://0.0.0.0:0",
            wc.role,
            frozenset(wc.models) if wc.models else None,
            wc.bootstrap_port,
            wc.kv_address,
        )
        self.url = wc.url
        #: the ZeroMQ endpoint the channel connects to (``tcp://h:p``, ``ipc://path``)
        self.endpoint = native_endpoint(wc.url)
        #: the worker's CURVE public key file (``workers[].curve_server_key``), or None
        self.curve_server_key: str | None = getattr(wc, "curve_server_key", None)
        #: set by :meth:`NativeChannels.open`
        self.channel: RpcChannel | None = None
        #: DRAINING because the worker said Drain (not an operator): a new session undoes it
        self.notice_drained = False
        self.scope = trio.CancelScope()


class NativeChannels:
    """One :class:`RpcChannel` per native worker, each a child of :meth:`run`'s nursery (a
    task of the Gateway's nursery), opened when the worker is added and closed when removed.

    Channel state drives worker state, written through the registry: a session (READY) makes
    the worker healthy (and tells its models); LOST (silent past the heartbeat timeout, or
    Exit) and INCOMPATIBLE eject it; a Drain notice drains it; Exit calls ``on_exit`` (the
    Gateway removes discovered workers; static ones stay ejected until they register again,
    so a restarted worker comes back). A passively ejected worker (failed requests) returns
    once its backoff has passed and its channel is up: the HTTP health monitor skips native
    workers, their liveness is the channel's heartbeat."""

    def __init__(
        self,
        registry: Registry,
        health: HealthConfig,
        reply_timeout_s: float,
        on_exit: Callable[[Worker], None] | None = None,
        curve_secret_key_file: str | None = None,
        shm_threshold_bytes: int = SHM_THRESHOLD,
    ) -> None:
        self.registry = registry
        self.health = health
        self.reply_timeout_s = reply_timeout_s
        self.on_exit = on_exit
        #: this gateway's CURVE key pair (``native.curve_secret_key_file``), for workers with
        #: ``curve_server_key``
        self.curve_secret_key_file = curve_secret_key_file
        #: tensors of at least this size go by shared memory to a worker on this host (0: never)
        self.shm_threshold_bytes = shm_threshold_bytes
        self._client_id = f"lmgw-{os.getpid()}"
        self._nursery: trio.Nursery | None = None
        self._pending: list[NativeWorker] = []
        self._wake = trio.Event()

    def prepare(self, worker: NativeWorker) -> None:
        """Give ``worker`` its channel (not started: :meth:`start`). Raises ValueError
        (CurveError) for CURVE key files that cannot be used."""
        curve = None
        if worker.curve_server_key is not None:
            from ..transport.zmq.curve import CurveClient

            if self.curve_secret_key_file is None:
                raise ValueError(
                    f"worker {worker.id} has curve_server_key: set native.curve_secret_key_file"
                )
            curve = CurveClient.from_files(self.curve_secret_key_file, worker.curve_server_key)
        worker.channel = RpcChannel(
            worker.endpoint,
            client_id=self._client_id,
            reply_timeout_s=self.reply_timeout_s,
            heartbeat_interval_s=self.health.native_heartbeat_interval_s,
            heartbeat_timeout_s=self.health.native_heartbeat_timeout_s,
            on_state=partial(self._on_state, worker),
            on_notice=partial(self._on_notice, worker),
            curve=curve,
            capabilities=CAPABILITIES if self.shm_threshold_bytes else _NO_SHM,
        )

    def start(self, worker: NativeWorker) -> None:
        """Run the prepared channel of ``worker``: now, or when :meth:`run` starts."""
        if self._nursery is None:
            self._pending.append(worker)
        else:
            self._nursery.start_soon(self._serve, worker)

    def close(self, worker: Worker) -> None:
        """Close a removed worker's channel once the requests on it ended (as an HTTP worker's
        requests finish on their own connections), within ``reply_timeout_s``."""
        if not isinstance(worker, NativeWorker):
            return
        if worker.in_flight == 0 or self._nursery is None:
            worker.scope.cancel()
        else:
            self._nursery.start_soon(self._close_when_idle, worker)

    async def _close_when_idle(self, worker: NativeWorker) -> None:
        with trio.move_on_after(self.reply_timeout_s):
            while worker.in_flight > 0:
                await trio.sleep(0.05)
        worker.scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the channels until cancelled. Reports started once every worker configured at
        start registered, or ``health.timeout_s`` passed (as the monitor's first round)."""
        self.registry.subscribe(self._on_change)
        if self.shm_threshold_bytes:
            from ..transport.shm import sweep_stale_segments

            sweep_stale_segments()  # what gateways that died on this host left in /dev/shm
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            first, self._pending = self._pending, []
            for worker in first:
                nursery.start_soon(self._serve, worker)
            with trio.move_on_after(self.health.timeout_s):
                for worker in first:
                    if worker.channel is not None and worker.state is not WorkerState.GONE:
                        try:
                            await worker.channel.wait_ready()
                        except RpcError:
                            pass
            task_status.started()
            await self._supervise()

    async def _serve(self, worker: NativeWorker) -> None:
        assert worker.channel is not None
        with worker.scope:
            await worker.channel.run()

    async def _supervise(self) -> None:
        """Bring back workers whose channel is up: after a passive ejection's backoff, and
        those set STARTING (re-announced, undrained)."""
        period = self.health.native_heartbeat_interval_s
        while True:
            with trio.move_on_after(period):
                await self._wake.wait()
            self._wake = trio.Event()
            now = time.monotonic()
            for worker in self.registry:
                if (
                    isinstance(worker, NativeWorker)
                    and worker.state in (WorkerState.STARTING, WorkerState.EJECTED)
                    and worker.channel is not None
                    and worker.channel.state is ChannelState.READY
                    and now >= worker.ejected_until
                ):
                    worker.consecutive_failures = 0
                    self.registry.set_state(worker, WorkerState.HEALTHY, "channel ready")

    def _on_change(self, worker: Worker) -> None:
        if isinstance(worker, NativeWorker) and worker.state is WorkerState.STARTING:
            self._wake.set()

    def _on_state(self, worker: NativeWorker, state: ChannelState, reason: str) -> None:
        registry = self.registry
        if worker.state is WorkerState.GONE or state is ChannelState.CLOSED:
            return
        if worker.state is WorkerState.DRAINING and not worker.notice_drained:
            return  # an operator's drain stands whatever the channel does
        if state is ChannelState.READY:
            chan = worker.channel
            session = chan.session if chan is not None else None
            if session is not None:
                problem = _role_problem(worker, session.roles)
                if problem is not None:
                    registry.set_state(worker, WorkerState.EJECTED, problem)
                    return
                if session.models and worker.static_models is None:
                    registry.set_models(worker, frozenset(session.models))
            worker.notice_drained = False
            if worker.state is WorkerState.DRAINING:
                registry.set_state(worker, WorkerState.STARTING, "registered again")
            if time.monotonic() >= worker.ejected_until:
                worker.consecutive_failures = 0
                registry.set_state(worker, WorkerState.HEALTHY, "registered")
        elif state in (ChannelState.LOST, ChannelState.INCOMPATIBLE):
            registry.set_state(worker, WorkerState.EJECTED, reason)

    def _on_notice(self, worker: NativeWorker, notice: Drain | Exit) -> None:
        if worker.state is WorkerState.GONE:
            return
        if isinstance(notice, Drain):
            if worker.state is not WorkerState.DRAINING:
                worker.notice_drained = True
                self.registry.set_state(
                    worker, WorkerState.DRAINING, f"worker draining: {notice.reason}"
                )
        elif self.on_exit is not None:
            self.on_exit(worker)


def _role_problem(worker: Worker, roles: Sequence[str]) -> str | None:
    """Why a worker whose session reports ``roles`` cannot serve its configured role."""
    served = set()
    for r in roles:
        try:
            served.add(normalize_role(r))
        except ConfigError:
            continue
    if roles and worker.role not in served:
        return (
            f"the worker serves {', '.join(roles)}, but is configured as {ROLE_NAMES[worker.role]}"
        )
    return None


def native_models(cfg: GatewayConfig) -> tuple[frozenset[str], bool]:
    """(the models served over the native protocol, whether models not in [[models]] are).

    A model is native when its dialect is ``lmgw-native``, or when it is left at the default
    (``openai``) and every configured worker is native; the same rule with
    ``routing.dialect`` decides for unlisted models.

    Raises:
        ValueError: a native model without ``models[].tokenizer`` (the gateway must tokenize:
            native workers take token ids), or a worker whose URL and models disagree.
    """
    all_native = bool(cfg.workers) and all(is_native_url(w.url) for w in cfg.workers)
    names = set()
    for m in cfg.models:
        if m.dialect == NATIVE_DIALECT or (m.dialect == "openai" and all_native):
            if m.tokenizer is None:
                raise ValueError(
                    f"model {m.name!r} is served by native (zmq+) workers, which take token ids:"
                    " set models[].tokenizer to its tokenizer folder so that the gateway renders"
                    " and tokenizes prompts as vLLM would"
                )
            names.add(m.name)
    rd = cfg.routing.dialect
    default = rd == NATIVE_DIALECT or (rd == "openai" and all_native)
    if default and not cfg.models:
        raise ValueError(
            "native (zmq+) workers take token ids: list their models in [[models]] with a"
            " tokenizer (models[].tokenizer) so that the gateway can render and tokenize prompts"
        )
    for wc in cfg.workers:
        for model in wc.models:
            native = model in names or (default and model not in {m.name for m in cfg.models})
            if native != is_native_url(wc.url):
                kind = "a native (zmq+)" if is_native_url(wc.url) else "an HTTP"
                raise ValueError(
                    f"worker {wc.worker_id} is {kind} worker but serves model {model!r}, whose"
                    f" dialect is {'lmgw-native' if native else 'not lmgw-native'}"
                )
    return frozenset(names), default


# -- translation --------------------------------------------------------------------------------

#: body keys that are not sampling settings: not passed on in ``SamplingParams.extra``
_NOT_SAMPLING = frozenset(
    {
        "model", "messages", "prompt", "stream", "stream_options", "n", "best_of", "user",
        "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "documents",
        "chat_template", "chat_template_kwargs", "add_generation_prompt",
        "continue_final_message", "add_special_tokens", "echo", "mm_processor_kwargs",
        "request_id", "priority", "kv_transfer_params", "max_tokens", "max_completion_tokens",
        "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
        "min_tokens", "logprobs", "top_logprobs", "metadata", "store", "service_tier",
        "modalities", "audio", "prediction", "web_search_options", "return_tokens_as_token_ids",
        "prompt_logprobs", "truncate_prompt_tokens", *STRUCTURED_FIELDS,
    }
)  # fmt: skip


def _int(obj: Mapping[str, Any], key: str, low: int = 0) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not int or value < low:
        raise GatewayError(400, f"{key} must be an integer >= {low}", param=key)
    return value


def _integer(obj: Mapping[str, Any], key: str) -> int | None:
    """An integer of any sign (the caller words the range check as vLLM does)."""
    value = obj.get(key)
    if value is not None and type(value) is not int:
        raise GatewayError(400, f"{key} must be an integer", param=key)
    return value


def _num(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) not in (int, float):
        raise GatewayError(400, f"{key} must be a number", param=key)
    return float(value)


def choices(obj: Mapping[str, Any]) -> int:
    """The body's ``n`` (choices per prompt; :mod:`.fanout` runs one Generate per choice).
    ``best_of > 1`` is a 400: vLLM V1 refused it, then removed it."""
    n = obj.get("n")
    if n is None:
        n = 1
    elif type(n) is not int or n < 1:
        raise GatewayError(400, "n must be an integer >= 1", param="n")
    if obj.get("best_of") not in (None, 1):
        raise GatewayError(400, BEST_OF_MESSAGE, param="best_of")
    return n


_UNREAD = frozenset(
    {
        "model", "messages", "prompt", "user", "stream_options", "n", "best_of", "documents",
        "chat_template", "chat_template_kwargs", "add_generation_prompt",
        "continue_final_message", "add_special_tokens", "echo", "mm_processor_kwargs",
        "request_id", "priority", "kv_transfer_params", "metadata", "store", "service_tier",
        "modalities", "audio", "prediction", "web_search_options", "return_tokens_as_token_ids",
        "truncate_prompt_tokens",
    }
)  # fmt: skip
"""Body keys :func:`sampling_params` never reads (all of them in ``_NOT_SAMPLING``)."""

_SCALARS = frozenset({str, int, float, bool, type(None)})
_MEMO_SIZE = 256
_memo: dict[tuple[Any, ...], SamplingParams] = {}


def sampling_params(endpoint: str, obj: Mapping[str, Any]) -> SamplingParams:
    """An OpenAI chat/completions body's sampling fields as our :class:`SamplingParams`:
    the fields it has, and the other sampling keys (vLLM's ``repetition_penalty``,
    ``min_p``, ``response_format``...) in ``extra`` (``n`` is :func:`choices`'). Raises
    GatewayError(400).

    A fleet's clients send a few settings over and over: a body whose other keys all hold
    scalars is looked up by them (each value with its type: ``1``, ``1.0`` and ``true`` are
    different answers) before it is built (~0.4 µs instead of ~2)."""
    key: list[Any] = [endpoint]
    for name, value in obj.items():
        if name in _UNREAD:
            continue
        kind = type(value)
        if kind not in _SCALARS:
            return _sampling_params(endpoint, obj)
        key.append((name, kind, value))
    memo_key = tuple(key)
    params = _memo.get(memo_key)
    if params is None:
        params = _sampling_params(endpoint, obj)  # (a bad one raises: nothing kept)
        if len(_memo) >= _MEMO_SIZE:
            _memo.clear()
        _memo[memo_key] = params
    return params


def _sampling_params(endpoint: str, obj: Mapping[str, Any]) -> SamplingParams:
    if endpoint == "chat":
        max_tokens = _int(obj, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _int(obj, "max_tokens")
    else:
        max_tokens = _int(obj, "max_tokens")
    logprobs, prompt_logprobs = logprob_counts(endpoint, obj)
    stop = obj.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = stop
    else:
        raise GatewayError(400, "stop must be a string or a list of strings", param="stop")
    stop_ids = obj.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(type(t) is int for t in stop_ids):
        raise GatewayError(400, "stop_token_ids must be a list of integers", param="stop_token_ids")
    seed = obj.get("seed")
    if seed is not None and type(seed) is not int:
        raise GatewayError(400, "seed must be an integer", param="seed")
    top_k = obj.get("top_k")
    if top_k is not None and type(top_k) is not int:
        raise GatewayError(400, "top_k must be an integer", param="top_k")
    try:
        structured = structured_output(endpoint, obj)
    except StructuredOutputError as exc:
        raise GatewayError(400, str(exc), param=exc.param) from None
    extra = {k: v for k, v in obj.items() if k not in _NOT_SAMPLING and v is not None}
    if "logit_bias" in extra and (bias := _logit_bias(extra.pop("logit_bias"))):
        extra["logit_bias"] = bias
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_num(obj, "temperature"),
        top_p=_num(obj, "top_p"),
        top_k=top_k,
        min_tokens=_int(obj, "min_tokens"),
        seed=seed,
        stop=stops,
        stop_token_ids=stop_ids,
        ignore_eos=bool(obj.get("ignore_eos", False)),
        logprobs=logprobs,
        extra=extra or None,
        prompt_logprobs=prompt_logprobs,
        structured=structured,
    )


def _logit_bias(bias: Any) -> dict[int, float] | None:
    """OpenAI's ``logit_bias`` (token ids as JSON keys, so strings) as an engine takes it:
    int keys, each bias clamped to [-100, 100], as vLLM's OpenAI layer does."""
    if not isinstance(bias, dict):
        raise GatewayError(400, "logit_bias must be an object", param="logit_bias")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise GatewayError(400, f"logit_bias: {key!r} is not a token id",
                               param="logit_bias") from None  # fmt: skip
        if type(value) not in (int, float):
            raise GatewayError(400, "logit_bias values must be numbers", param="logit_bias")
        out[token] = min(100.0, max(-100.0, float(value)))
    return out or None


def logprob_counts(endpoint: str, obj: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(alternatives per output token, per prompt position) a body asks for (None: no
    logprobs), with vLLM's checks and messages (the most a worker allows, vLLM's
    ``max_logprobs``, is the worker's to check). A stream's ``prompt_logprobs: 0`` asks for
    nothing: streams carry no prompt logprobs (vLLM refuses more than 0)."""
    if endpoint == "chat":
        top = _integer(obj, "top_logprobs")
        if top is not None:
            if top < 0:
                raise GatewayError(400, "`top_logprobs` must be a positive value.",
                                   param="top_logprobs")  # fmt: skip
            if top > 0 and not obj.get("logprobs"):
                raise GatewayError(
                    400,
                    "when using `top_logprobs`, `logprobs` must be set to true.",
                    param="top_logprobs",
                )
        logprobs = (top or 0) if obj.get("logprobs") else None
    else:
        logprobs = _integer(obj, "logprobs")
        if logprobs is not None and logprobs < 0:
            raise GatewayError(400, "`logprobs` must be a positive value.", param="logprobs")
    prompt = _integer(obj, "prompt_logprobs")
    if prompt is not None:
        if obj.get("stream"):
            if prompt > 0:
                raise GatewayError(400, "`prompt_logprobs` are not available when `stream=True`.",
                                   param="prompt_logprobs")  # fmt: skip
            prompt = None
        elif prompt < 0:
            raise GatewayError(400, "`prompt_logprobs` must be a positive value.",
                               param="prompt_logprobs")  # fmt: skip
    return logprobs, prompt


def _client_error(role: str, worker: Worker, exc: RpcError) -> GatewayError:
    """What the client hears when a stage failed on ``worker``: a worker's ``bad_request`` is
    the request's fault (400, its message); anything else names the stage."""
    if exc.code is FailureCode.BAD_REQUEST:
        return GatewayError(400, exc.message)
    status = 504 if exc.code is FailureCode.TIMEOUT else 502
    return GatewayError(
        status, f"{STAGE_NAMES[role]} stage failed: worker {worker.id}: {exc.code}: {exc.message}"
    )


class _Broken(Exception):
    """The client-facing leg broke after part of its stream reached the client."""

    def __init__(self, worker: Worker, error: RpcError) -> None:
        super().__init__(str(error))
        self.worker = worker
        self.error = error


class _Job:
    """One request as the native legs need it."""

    __slots__ = ("created", "media", "obj", "params", "payload", "pins", "prompt", "tensors")

    def __init__(self, obj: dict[str, Any], prompt: list[int], params: SamplingParams) -> None:
        self.obj = obj
        self.prompt = prompt
        self.params = params
        self.created = int(time.time())
        #: the media as P, D and PD get them: by hash after an E stage, else as tensors
        self.media: list[WireMedia] = []
        self.tensors: list[Any] = []
        self.payload: list[Any] = []
        #: the shared-memory hand-offs this request relays, held until it ends; shared with
        #: fan-out children
        self.pins = Pins()


# -- the runner ---------------------------------------------------------------------------------


class NativeRunner:
    """Runs the requests of native models on behalf of :class:`Pipeline` (see module doc)."""

    def __init__(self, pipeline: Pipeline, cfg: GatewayConfig) -> None:
        self.p = pipeline
        self.models, self.default = native_models(cfg)
        #: the models' text services (set by the Gateway once loaded)
        self.texts: Mapping[str, ModelText] = {}
        self.media_limits = cfg.media
        self.media_profiles = {m.name: m.media_profile for m in cfg.models if m.media_profile}
        self.request_timeout_s = cfg.limits.request_timeout_s or None
        self.first_timeout_s = cfg.upstream.response_timeout_s
        self.stall_s = cfg.upstream.stream_stall_timeout_s or math.inf
        self.shm_threshold = cfg.native.shm_threshold_bytes
        self._cpu: trio.CapacityLimiter | None = None
        self._ssl: Any = None
        self._names: dict[str, tuple[Any, Callable[[int], str]]] = {}

    def _token_text(self, model: str, tok: Any) -> Callable[[int], str]:
        """``model``'s token names for logprobs: an id decoded alone (vLLM's
        ``decoded_token``), remembered (an answer with 20 alternatives per token names the
        same few thousand ids again and again); "" for an id outside the tokenizer's vocabulary
        (a model's padded logits)."""
        entry = self._names.get(model)
        if entry is None or entry[0] is not tok:

            def name(token_id: int) -> str:
                try:
                    return tok.decode([token_id])
                except GatewayError:  # TokenIdError: not in the vocabulary
                    return ""

            entry = (tok, lru_cache(maxsize=1 << 16)(name))
            self._names[model] = entry
        return entry[1]

    def handles(self, model: str) -> bool:
        """Whether ``model``'s requests run here."""
        return model in self.models or (self.default and model not in self.p.flows)

    @property
    def cpu(self) -> trio.CapacityLimiter:
        if self._cpu is None:
            self._cpu = trio.CapacityLimiter(os.cpu_count() or 1)
        return self._cpu

    async def run(self, greq: GatewayRequest, responder: Responder) -> None:
        """Run one request of a native model and answer the client."""
        text = self.texts.get(greq.model)
        if text is None:
            raise GatewayError(
                500, f"model {greq.model!r} is served by native workers but has no tokenizer"
            )
        if greq.endpoint not in ("chat", "completions"):
            raise GatewayError(
                400, "native workers serve /v1/chat/completions and /v1/completions only"
            )
        obj = greq.obj  # decoded by the API already (context check, aliases, media)?
        if obj is None:
            try:
                obj = msgspec.json.decode(greq.body)
            except DECODE_ERRORS as exc:
                raise GatewayError(400, f"request body is not valid JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise GatewayError(400, "the request body must be a JSON object")
        n = choices(obj)  # before tokenizing: a cheap 400 first
        params = sampling_params(greq.endpoint, obj)
        prompt = greq.prompt_ids  # tokenized by the API's context check: not twice
        prompts = [prompt] if prompt is not None else await self._prompts(greq.endpoint, obj, text)
        job = _Job(obj, prompts[0], params)
        flow = self.p.flows.get(greq.model, self.p.default_flow)
        roles = FLOW_ROLES[flow]
        try:
            await self._media(greq, job, roles, obj)
            if n > 1 or len(prompts) > 1:
                await self._fan_out(greq, responder, job, prompts, n, roles, text)
                return
            route = self._route(greq, greq.request_id, job.prompt)
            synth = self._synth(greq, job, text, obj)
            await self._answer(greq, responder, job, roles, route, synth, text)
        finally:
            job.pins.release()

    async def _fan_out(
        self,
        greq: GatewayRequest,
        responder: Responder,
        job: _Job,
        prompts: Sequence[list[int]],
        n: int,
        roles: tuple[str, ...],
        text: ModelText,
    ) -> None:
        """``n > 1`` or a batch of prompts: one child request per choice, run concurrently
        in this request's scope, merged into one answer (:mod:`.fanout`)."""
        batch = len(prompts) > 1
        items = job.obj.get("prompt") if batch else None
        jobs: list[_Job] = []
        synths: list[OpenAISynth] = []
        for i, ids in enumerate(prompts):
            for sample in range(n):
                child = _Job(job.obj, ids, child_params(job.params, sample))
                child.created, child.media = job.created, job.media
                child.tensors, child.payload, child.pins = job.tensors, job.payload, job.pins
                k = len(jobs)
                jobs.append(child)
                source = items[i] if isinstance(items, list) else None
                synths.append(self._synth(greq, child, text, job.obj, k, source))
        fan = Fanout(responder, synths, n)

        async def one(k: int) -> None:
            cgreq = child_request(greq, k)
            route = self._route(greq, cgreq.request_id, jobs[k].prompt)
            try:
                await self._generate(cgreq, fan.sink(k), jobs[k], roles, route, synths[k],
                                     jobs[k].prompt, jobs[k].params, (), 0, child=True)  # fmt: skip
            except _Broken as broken:
                fan.fail(GatewayError(
                    502, f"worker stream failed and was not continued: choice {k}: worker"
                    f" {broken.worker.id}: {broken.error.code}: {broken.error.message}",
                ))  # fmt: skip
            except GatewayError as exc:
                fan.fail(exc)

        async def legs() -> None:
            try:
                async with trio.open_nursery() as nursery:
                    fan.scope = nursery.cancel_scope
                    for k in range(len(jobs)):
                        nursery.start_soon(one, k)
                if greq.stream and fan.error is None:
                    await fan.put(synths[0].tail(*fan.usage()))
            finally:
                if greq.stream:
                    fan.close()  # the writer drains what is queued, then stops

        def first() -> None:
            self.p.metrics.ttft.observe((greq.model,), _now() - greq.t_start)

        try:
            if greq.stream:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(legs)
                    await fan.pump(partial(self._headers, greq, _SSE), first)
            else:
                await legs()
        except BaseExceptionGroup as group:
            raise leaf_of(group) from None
        if fan.error is not None:
            raise fan.error
        if not greq.stream:
            await responder.send_full(200, self._headers(greq, [_JSON]), fan.merged())

    def _route(self, greq: GatewayRequest, request_id: str, prompt: list[int]) -> RouteContext:
        """A request's (or a fanned-out choice's) routing context: the keys the API found
        (the session), with the prompt's token ids, which native workers take as they are."""
        keys = greq.route
        return RouteContext(
            greq.model,
            request_id,
            session_key=keys.session_key if keys is not None else None,
            tokens=prompt,
            lora=keys.lora if keys is not None else None,
        )

    # -- preparation ----------------------------------------------------------------------------
    @staticmethod
    async def _prompts(endpoint: str, obj: Mapping[str, Any], text: ModelText) -> list[list[int]]:
        """Each prompt's ids: a chat's one, or a completions batch's (vLLM's forms)."""
        if endpoint == "chat":
            return [await text.chat_ids(obj)]
        return await text.completion_ids(obj)

    async def _prompt(self, endpoint: str, obj: Mapping[str, Any], text: ModelText) -> list[int]:
        """The one prompt of a continuation (a stream continued on another worker)."""
        prompts = await self._prompts(endpoint, obj, text)
        if len(prompts) != 1:
            raise GatewayError(400, "a continuation has one prompt", param="prompt")
        return prompts[0]

    def _synth(
        self,
        greq: GatewayRequest,
        job: _Job,
        text: ModelText,
        obj: Mapping[str, Any],
        index: int | None = None,
        source: Any = None,
    ) -> OpenAISynth:
        """The answer's builder; ``index``: choice ``index`` of a fanned-out request (no
        ``[DONE]`` of its own), ``source``: its prompt as a batch gave it (echo)."""
        so = obj.get("stream_options") if greq.stream else None
        so = so if isinstance(so, dict) else {}
        echo = None
        if greq.endpoint == "completions" and obj.get("echo"):
            prompt = obj.get("prompt") if source is None else source
            echo = prompt if isinstance(prompt, str) else text.tokenizer.decode(job.prompt)
        tok = text.tokenizer
        params = job.params
        names = prompt_names = None
        if params.logprobs is not None or params.prompt_logprobs is not None:
            names = prompt_names = self._token_text(greq.model, tok)
            if obj.get("return_tokens_as_token_ids"):  # vLLM's: ids, not decoded text
                names = token_id_name
        return OpenAISynth(
            "chat" if greq.endpoint == "chat" else "completion",
            greq.request_id,
            greq.model,
            job.created,
            include_usage=bool(so.get("include_usage")),
            continuous_usage=bool(so.get("continuous_usage_stats")),
            prompt_tokens=len(job.prompt),
            echo=echo,
            logprobs=params.logprobs is not None,
            token_text=names,
            prompt_token_text=prompt_names,
            index=index or 0,
            last=index is None,
        )

    async def _media(
        self, greq: GatewayRequest, job: _Job, roles: tuple[str, ...], obj: dict[str, Any]
    ) -> None:
        """The request's media: checked and hashed (by the API already when the flow has an
        encoder), encoded on E (tensors as payload frames) or handed to the first prompt
        stage as tensors."""
        items = greq.media
        if items is None and greq.endpoint == "chat" and _has_media(obj):
            from ..multimodal import MediaProfile, preprocess
            from ..multimodal.fetch import default_ssl_context

            if self._ssl is None:
                self._ssl = default_ssl_context()
            items = await preprocess(
                obj,
                self.media_limits,
                model_id=greq.model,
                cpu_limiter=self.cpu,
                ssl_context=self._ssl,
                profile=self.media_profiles.get(greq.model) or MediaProfile(),
            )
        if not items:
            return
        if "e" in roles:
            outputs, held = await self._encode(greq, items)
            job.media = [WireMedia(item.kind, hash=item.hash) for item in items]
            cache = self.p.disagg.encoded
            keeps = cache.keeps_outputs  # the cache pool: outputs are kept for repeats
            for i, (refs, payload) in sorted(outputs.items()):  # sent back: the item's tensor
                _pin(refs, job.pins, "an encoder's output")
                (index,) = relay_tensors(job.tensors, job.payload, refs, payload)
                job.media[i] = WireMedia(items[i].kind, hash=items[i].hash, tensor=index)
                if keeps:
                    output = _output_array(refs[0], payload, job.pins)
                    await cache.keep(greq.model, items[i].hash, output, "gateway")
            if held and keeps:  # repeats: the outputs kept from an earlier request
                from ..transport.tensors import pack_tensors

                kept = await cache.outputs(greq.model, [items[i].hash for i in held])
                for i in held:
                    output = kept.get(items[i].hash)
                    if output is not None:
                        refs, frames = pack_tensors([output])
                        (index,) = relay_tensors(job.tensors, job.payload, refs, frames)
                        job.media[i] = WireMedia(items[i].kind, hash=items[i].hash, tensor=index)
            return
        # no encoder stage: the prompt's first worker encodes the raw media itself (no hash:
        # a hashed item with a tensor would claim to be an encoder output)
        arrays = [await self._array(item, greq.model) for item in items]
        from ..transport.tensors import pack_tensors

        job.tensors, job.payload = pack_tensors(arrays)
        job.media = [WireMedia(item.kind, tensor=i) for i, item in enumerate(items)]

    async def _array(self, item: Any, model: str | None = None) -> Any:
        profile = self.media_profiles.get(model) if model else None
        try:
            return await trio.to_thread.run_sync(item.array, profile, limiter=self.cpu)
        except ValueError as exc:  # named by uuid only: no media to send
            raise GatewayError(400, str(exc), param=getattr(item, "param", None)) from None

    # -- legs -----------------------------------------------------------------------------------
    def _timeout_s(self, greq: GatewayRequest) -> float | None:
        """The time the request has left: the worker's deadline (no synchronized clocks)."""
        if self.request_timeout_s is None:
            return None
        return max(0.001, greq.t_start + self.request_timeout_s - _now())

    def _pick(
        self,
        model: str,
        role: str,
        route: RouteContext,
        tried: tuple[Worker, ...] = (),
        near: Worker | None = None,
    ) -> Worker | None:
        """The role's policy's choice among the routable native workers not ``tried``;
        ``near``: with joint placement, among those in that worker's zone when there are any
        (a decode worker for the prefill that holds the KV)."""
        candidates: Sequence[Worker] = self.p.registry.candidates(model, role)
        native = getattr(candidates, "native_only", None)
        if native is None:  # (once per fleet change: the registry keeps the tuple till then)
            native = all(type(w) is NativeWorker for w in candidates)
            if type(candidates) is Candidates:
                candidates.native_only = native
        if tried or not native:
            candidates = [w for w in candidates if type(w) is NativeWorker and w not in tried]
        if not candidates:
            return None
        if near is not None and self.p.placement is not None:
            candidates = in_zone_of(candidates, near)
        if not tried:
            self.p.picks[role] += 1
        return self.p.policies[role].choose(candidates, route)

    def _first(self, model: str, role: str, route: RouteContext) -> NativeWorker:
        worker = self._pick(model, role, route)
        if worker is None:
            raise GatewayError(
                503, f"no healthy {ROLE_NAMES[role]} worker available for model {model!r}"
            )
        return worker  # type: ignore[return-value]

    async def _call(
        self,
        greq: GatewayRequest,
        worker: Worker,
        role: str,
        route: RouteContext,
        msg: Any,
        payload: Sequence[Any] = (),
        pins: Pins | None = None,
    ) -> tuple[Any, list[Any]]:
        """One intermediate leg (Encode, Prefill): its answer and the answer's payload frames,
        accounted like a dispatch."""
        chan = worker.channel  # type: ignore[attr-defined]
        if msg.tensors:
            msg, payload = await self._fit(chan, msg, payload, pins)
        t0 = self.leg_start(worker, role, route)
        ok = False
        try:
            for wire in _wire_ids(msg):
                try:
                    answer = await chan.call_with_payload(
                        wire, payload=payload, timeout=self.first_timeout_s
                    )
                    break
                except ValueError:  # refused before sending: the id is in flight there
                    continue
            ok = True
            return answer
        except RpcError as exc:
            self.failed(worker, role, exc)
            raise
        finally:
            self.leg_done(greq, worker, role, route, t0, ok)

    def leg_done(
        self, greq: GatewayRequest, worker: Worker, role: str, route: RouteContext, t0: float,
        ok: bool,
    ) -> None:  # fmt: skip
        """An intermediate leg (Encode, Prefill) is over: :meth:`leg_end`, and its time in
        the answer's Server-Timing."""
        elapsed = self.leg_end(worker, role, route, t0, ok)
        if greq.timings is None:
            greq.timings = []
        greq.timings.append((STAGE_NAMES[role], elapsed))

    async def _fit(
        self, chan: RpcChannel, msg: Any, payload: Sequence[Any], pins: Pins | None = None
    ) -> tuple[Any, Any]:
        """``msg`` and ``payload`` with their tensors as the worker of ``chan`` reads them
        (:func:`.handoff.for_peer`). A hand-off segment that is gone (and not held in
        ``pins``) is a 502."""
        from ..transport.shm import ShmError  # numpy: loaded with the first tensor

        session = chan.session
        try:
            fitted = await for_peer(
                msg.tensors,
                payload,
                shm=session is not None and session.shm,
                threshold=self.shm_threshold,
                pins=pins,
            )
        except ShmError as exc:
            raise GatewayError(502, f"a hand-off in shared memory was lost: {exc}") from None
        if fitted is None:
            return msg, payload
        refs, frames = fitted
        return msgspec.structs.replace(msg, tensors=refs), frames

    def _count_handoff(self, kind: str, refs: Sequence[TensorRef], frames: Sequence[Any]) -> None:
        for via, nbytes in bytes_by_path(refs, frames).items():
            if nbytes:
                self.p.metrics.handoff_bytes.inc((kind, via), nbytes)

    def leg_start(self, worker: Worker, role: str, route: RouteContext) -> float:
        """A leg leaves for ``worker``: its load accounting (every leg's, the compiled
        lane's too); returns when."""
        self.p.registry.acquire(worker)
        self.p.policies[role].on_dispatch(worker, route)
        return _now()

    def leg_end(self, worker: Worker, role: str, route: RouteContext, t0: float, ok: bool) -> float:
        """The leg that left at ``t0`` is over: its time (returned), load and health."""
        p = self.p
        elapsed = _now() - t0
        p.metrics.stage.observe((role, worker.id), elapsed)
        p.policies[role].on_finish(worker, route, ok)
        p.registry.release(worker)
        if ok:
            p.registry.record_success(worker)
        return elapsed

    def failed(self, worker: Worker, role: str, exc: RpcError) -> None:
        kind = "timeout" if exc.code is FailureCode.TIMEOUT else "transport"
        self.p.metrics.upstream_errors.inc((role, worker.id, kind))
        if exc.code not in (FailureCode.BAD_REQUEST, FailureCode.ABORTED):
            self.p.registry.record_failure(worker, str(exc), eject=False)

    async def _with_retries(
        self,
        greq: GatewayRequest,
        role: str,
        route: RouteContext,
        leg: Callable[[Worker], Any],
        retry_sent: bool = False,
        *,
        tried: tuple[Worker, ...] = (),
    ) -> Any:
        """Run ``leg(worker)`` on the role's choice; on a failure that cannot have started
        work (or a retryable one, or any but a bad request when ``retry_sent``), again on
        another worker, up to ``upstream.max_attempts`` times in all."""
        p = self.p
        if tried:  # (the compiled lane's first attempt failed on these)
            other = self._pick(greq.model, role, route, tried)
            if other is None:
                raise GatewayError(
                    503, f"no healthy {ROLE_NAMES[role]} worker available for {greq.model!r}"
                )
            worker: Worker = other
        else:
            worker = self._first(greq.model, role, route)
        for attempt in range(len(tried), p.max_attempts):
            try:
                return await leg(worker)
            except RpcError as exc:
                tried += (worker,)
                last = attempt + 1 >= p.max_attempts
                worker = self.next_worker(greq, role, route, worker, exc, tried, last, retry_sent)
                await p.backoff(attempt)
        raise AssertionError("unreachable")

    def next_worker(
        self,
        greq: GatewayRequest,
        role: str,
        route: RouteContext,
        worker: Worker,
        exc: RpcError,
        tried: tuple[Worker, ...],
        last: bool,
        retry_sent: bool = False,
    ) -> Worker:
        """After ``exc`` on ``worker``: the worker for the next attempt (not ``tried``), or the
        client's error raised. Retried: a failure that cannot have started work, or a
        retryable one (``retry_sent``: any but a bad request), unless ``last``."""
        again = not exc.sent or exc.retryable
        if retry_sent:
            again = exc.code not in (FailureCode.BAD_REQUEST, FailureCode.ABORTED)
        other = None if last or not again else self._pick(greq.model, role, route, tried)
        if other is None:
            raise _client_error(role, worker, exc) from None
        self.p.metrics.retries.inc((role,))
        log.info("request %s: %s retried on %s after %s",
                 greq.request_id, STAGE_NAMES[role], other.id, exc,
                 extra={"request_id": greq.request_id, "worker": other.id})  # fmt: skip
        return other

    async def _encode(
        self, greq: GatewayRequest, items: Sequence[Any]
    ) -> tuple[dict[int, tuple[list[TensorRef], list[Any]]], list[int]]:
        """One Encode per item not recently encoded, concurrently; each on the encoder its
        hash routes to, with the item's tensor as a payload frame. Returns the outputs the
        encoders sent back (item index -> refs and frames) and the indexes of the items that
        skipped E. An item's output kept by its encoder (shared storage) is remembered, so a
        repeat skips E; one sent back is remembered only where the gateway keeps a copy (the
        cache pool: :meth:`PooledEncodedItems.keep`)."""
        from ..transport.tensors import pack_tensors

        outputs: dict[int, tuple[list[TensorRef], list[Any]]] = {}

        cache = self.p.disagg.encoded
        held = await cache.holding(greq.model, [item.hash for item in items])
        todo = [
            (i, item)
            for i, item in enumerate(items)
            if item.source != "uuid" and item.hash not in held
        ]
        hits = len(items) - len(todo)
        self.p.metrics.encoder_cache_lookups.inc((greq.model,), len(items))
        if hits:
            self.p.metrics.encoder_cache_hits.inc((greq.model,), hits)

        async def one(i: int, item: Any) -> None:
            array = await self._array(item, greq.model)
            refs, frames = pack_tensors([array])
            msg = Encode(
                f"{greq.request_id}:e{i}",
                greq.model,
                [WireMedia(item.kind, hash=item.hash, tensor=0)],
                self._timeout_s(greq),
                refs,
            )
            route = RouteContext(greq.model, greq.request_id, session_key=item.hash)
            encoder: list[str] = []

            def leg(w: Worker) -> Any:
                encoder[:] = [w.id]
                return self._call(greq, w, "e", route, msg, frames)

            done, payload = await self._with_retries(greq, "e", route, leg)
            if not isinstance(done, EncodeDone):
                raise RpcError(FailureCode.PROTOCOL, f"a {type(done).__name__} answered Encode")
            if done.tensors:
                if len(done.tensors) != 1:
                    raise RpcError(
                        FailureCode.PROTOCOL,
                        f"an encoder sent {len(done.tensors)} outputs for one media item",
                    )
                outputs[i] = (done.tensors, payload)
                self._count_handoff("embeddings", done.tensors, payload)
            else:
                await cache.remember(greq.model, item.hash, encoder[0] if encoder else "")

        if len(todo) == 1:
            await one(*todo[0])
        elif todo:
            async with trio.open_nursery() as nursery:
                for i, item in todo:
                    nursery.start_soon(one, i, item)
        skipped = {i for i, _ in todo}
        return outputs, [i for i in range(len(items)) if i not in skipped]

    async def _prefill(
        self,
        greq: GatewayRequest,
        job: _Job,
        route: RouteContext,
        prompt: list[int],
        params: SamplingParams,
        tried: tuple[Worker, ...] = (),
    ) -> _HandOff:
        msg = Prefill(
            greq.request_id,
            greq.model,
            prompt_token_ids=prompt,
            params=params,
            media=job.media,
            timeout_s=self._timeout_s(greq),
            tensors=job.tensors,
        )

        async def leg(worker: Worker) -> _HandOff:
            done, payload = await self._call(greq, worker, "p", route, msg, job.payload, job.pins)
            return self.handed(job, route, worker, done, payload)

        return await self._with_retries(greq, "p", route, leg, tried=tried)

    def handed(
        self, job: _Job, route: RouteContext, worker: Worker, done: Any, payload: Sequence[Any]
    ) -> _HandOff:
        """A prefill leg's answer as the decode leg takes it (its KV pinned when it came
        through the gateway); raises RpcError for a wrong answer or a lost segment."""
        if not isinstance(done, PrefillDone):
            raise RpcError(FailureCode.PROTOCOL, f"a {type(done).__name__} answered Prefill")
        route.memo()[PREFILLED_ON] = worker  # its decode is picked near it
        if done.tensors:
            self._count_handoff("kv", done.tensors, payload)
            try:
                _pin(done.tensors, job.pins, "the prefill's KV")
            except GatewayError as exc:  # the worker's segment is gone: try another
                raise RpcError(FailureCode.ENGINE_ERROR, exc.message) from None
        return _HandOff(done.kv_transfer_params, done.tensors, list(payload))

    # -- the client-facing leg ------------------------------------------------------------------
    async def _answer(
        self,
        greq: GatewayRequest,
        responder: Responder,
        job: _Job,
        roles: tuple[str, ...],
        route: RouteContext,
        synth: OpenAISynth,
        text: ModelText,
        broken: _Broken | None = None,
        *,
        handoff: _HandOff | None = None,
        prefill_tried: tuple[Worker, ...] = (),
    ) -> None:
        """Generate (after P, for split flows) and answer; continue a broken stream
        (``broken``: the compiled lane's stream that broke, to continue from the start;
        ``handoff``, ``prefill_tried``: its prefill leg's, see :meth:`lane_prefill`)."""
        p = self.p
        role = "d" if "d" in roles else "pd"
        prompt, params = job.prompt, job.params
        tried: tuple[Worker, ...] = ()
        done_tokens = 0  # tokens the client got from legs that broke
        for migration_left in range(p.migrations if greq.stream else 0, -1, -1):
            try:
                if broken is not None:
                    raise broken  # (the lane's leg: judged as this loop's own)
                given, failed_on = handoff, prefill_tried  # (the first leg's only)
                handoff, prefill_tried = None, ()
                await self._generate(
                    greq, responder, job, roles, route, synth, prompt, params, tried, done_tokens,
                    handoff=given, prefill_tried=failed_on,
                )  # fmt: skip
                if tried:
                    p.metrics.migrations.inc((role, "continued"))
                return
            except _Broken as exc:
                broken = None
                tried += (exc.worker,)
                reason = f"{exc.error.code}: {exc.error.message}"
                if not migration_left:
                    if p.migrations:
                        reason = f"the stream broke {p.migrations + 1} times ({reason})"
                    break
                progress = migration.Progress(
                    synth.text, synth.tokens, finished=False,
                    replayable=job.params.logprobs is None,
                )  # fmt: skip
                body, why = await p.next_leg(greq.endpoint, job.obj, progress, aliases=False)
                if why is None and self._pick(greq.model, role, route, tried) is None:
                    why = "no other worker"
                if why is not None or body is None:
                    reason = why or reason
                    break
                obj = msgspec.json.decode(body)
                prompt = await self._prompt(greq.endpoint, obj, text)
                params = sampling_params(greq.endpoint, obj)
                done_tokens = synth.tokens
                log.warning("request %s: stream broke after %d tokens (%s); continuing",
                            greq.request_id, synth.tokens, exc.error,
                            extra={"request_id": greq.request_id})  # fmt: skip
        await p.end_broken_stream(responder, role, reason)

    async def _generate(
        self,
        greq: GatewayRequest,
        responder: Responder,
        job: _Job,
        roles: tuple[str, ...],
        route: RouteContext,
        synth: OpenAISynth,
        prompt: list[int],
        params: SamplingParams,
        tried: tuple[Worker, ...],
        done_tokens: int,
        *,
        child: bool = False,
        first_attempt: int = 0,
        worker: Worker | None = None,
        handoff: _HandOff | None = None,
        prefill_tried: tuple[Worker, ...] = (),
    ) -> None:
        """P (split flows) then the client-facing Generate; a decode that failed before its
        first byte is retried once on another decode worker with the same hand-off (a fresh
        prefill instead when the KV stayed on P and the failed decode got the request: it may
        have pulled it), a merged leg like any leg. ``child``: one choice of a fanned-out
        request (the request's time to first token is the fan-out's). The compiled lane's
        requests after its first leg: ``first_attempt`` and ``worker`` (:meth:`lane_retry`),
        ``handoff`` (its prefill's, for the first decode attempt) or ``prefill_tried`` (the
        prefill workers that failed it)."""
        p = self.p
        continued = child or (bool(tried) and not first_attempt)
        role = "d" if "p" in roles else "pd"
        given = handoff

        async def generate() -> tuple[Generate, Sequence[Any]]:
            """The client-facing leg's message (after the prefill, in split flows)."""
            nonlocal given
            tensors, payload, kv_params, kv_tensors = job.tensors, job.payload, None, []
            if role == "d":
                handoff, given = given, None
                if handoff is None:
                    handoff = await self._prefill(greq, job, route, prompt, params, prefill_tried)
                kv_params = handoff.params
                if handoff.refs:  # the KV itself came through: on to D with the media tensors
                    tensors, payload = list(tensors), list(payload)
                    kv_tensors = relay_tensors(tensors, payload, handoff.refs, handoff.payload)
            msg = Generate(
                greq.request_id,
                greq.model,
                prompt_token_ids=prompt,
                params=params,
                media=job.media,
                kv_transfer_params=kv_params,
                timeout_s=self._timeout_s(greq),
                tensors=tensors,
                stream=greq.stream,
                kv_tensors=kv_tensors,
            )
            return msg, payload

        msg, payload = await generate()
        near = route.scratch.get(PREFILLED_ON) if route.scratch is not None else None
        if worker is None:
            worker = self._pick(greq.model, role, route, tried, near)
        if worker is None:
            raise GatewayError(
                503, f"no healthy {ROLE_NAMES[role]} worker available for model {greq.model!r}"
            )
        attempts = 2 if role == "d" else p.max_attempts
        for attempt in range(first_attempt, attempts):
            try:
                await self._final(greq, responder, worker, role, route, msg, payload, synth,
                                  continued, done_tokens, job.pins)  # fmt: skip
                return
            except RpcError as exc:
                tried += (worker,)
                # (a decode worker: any can take the hand-off, renewed below)
                last = attempt + 1 >= attempts
                worker = self.next_worker(greq, role, route, worker, exc, tried, last, role == "d")
                await p.backoff(attempt)
                if role == "d" and exc.sent and msg.kv_transfer_params and not msg.kv_tensors:
                    # the KV stayed on P, named by the params, and the decode that got them
                    # may have pulled it (NIXL: P frees blocks once read): a fresh prefill
                    msg, payload = await generate()

    async def lane_retry(
        self,
        greq: GatewayRequest,
        responder: Responder,
        job: _Job,
        route: RouteContext,
        synth: OpenAISynth,
        worker: Worker,
        exc: RpcError,
        role: str = "pd",
        handoff: _HandOff | None = None,
    ) -> None:
        """The compiled lane's client-facing Generate (merged, or a decode leg after
        ``handoff``) failed on ``worker`` before its answer (the lane's first attempt): the
        attempts after it, as :meth:`_generate` makes them (a decode worker that got the
        hand-off may have pulled the KV: a fresh prefill then)."""
        p = self.p
        tried = (worker,)
        attempts = 2 if role == "d" else p.max_attempts
        other = self.next_worker(greq, role, route, worker, exc, tried, attempts <= 1, role == "d")
        if handoff is not None and exc.sent and handoff.params and not handoff.refs:
            handoff = None
        await p.backoff(0)
        roles = ("p", "d") if role == "d" else ("pd",)
        await self._generate(greq, responder, job, roles, route, synth, job.prompt, job.params,
                             tried, 0, first_attempt=1, worker=other, handoff=handoff)  # fmt: skip

    async def lane_prefill(
        self,
        greq: GatewayRequest,
        responder: Responder,
        job: _Job,
        route: RouteContext,
        synth: OpenAISynth,
        worker: Worker | None = None,
        exc: RpcError | None = None,
        handoff: _HandOff | None = None,
    ) -> None:
        """The rest of the compiled lane's P/D request on the server: after its prefill leg
        failed on ``worker`` (``exc``: the prefill's next attempts, then the decode), or
        with its prefill's ``handoff`` (KV that came through the gateway: the decode leg)."""
        tried: tuple[Worker, ...] = ()
        if worker is not None and exc is not None:
            tried = (worker,)
            self.next_worker(greq, "p", route, worker, exc, tried, self.p.max_attempts <= 1)
            await self.p.backoff(0)
        await self._answer(greq, responder, job, ("p", "d"), route, synth, self.texts[greq.model],
                           handoff=handoff, prefill_tried=tried)  # fmt: skip

    async def lane_broken(
        self,
        greq: GatewayRequest,
        responder: Responder,
        job: _Job,
        route: RouteContext,
        synth: OpenAISynth,
        worker: Worker,
        exc: RpcError,
        roles: tuple[str, ...] = ("pd",),
    ) -> None:
        """The compiled lane's stream broke on ``worker`` after its first events: its
        continuation on another worker, or its error event, as :meth:`_answer` does."""
        text = self.texts[greq.model]
        await self._answer(greq, responder, job, roles, route, synth, text, _Broken(worker, exc))

    async def _final(
        self,
        greq: GatewayRequest,
        responder: Responder,
        worker: Worker,
        role: str,
        route: RouteContext,
        msg: Generate,
        payload: Sequence[Any],
        synth: OpenAISynth,
        continued: bool,
        done_tokens: int,
        pins: Pins | None = None,
    ) -> None:
        """Send the Generate and answer the client from its events. Raises RpcError when it
        failed before anything reached the client, :class:`_Broken` after."""
        chan: RpcChannel = worker.channel  # type: ignore[attr-defined]
        check_generate(chan, worker, msg)
        if msg.tensors:  # (the common request has none: no call at all)
            msg, payload = await self._fit(chan, msg, payload, pins)
        t0 = self.leg_start(worker, role, route)
        ok = False
        try:
            for wire in _wire_ids(msg):
                entered = False
                try:
                    async with chan.stream(
                        wire, payload=payload, timeout=self.first_timeout_s
                    ) as a:
                        entered = True
                        if greq.stream:
                            await self._relay(greq, responder, a, synth, worker, role, t0,
                                              continued, done_tokens, route)  # fmt: skip
                        else:
                            await self._whole(greq, responder, a, synth)
                    break
                except ValueError:
                    if entered:
                        raise
            ok = True
        except RpcError as exc:
            self.failed(worker, role, exc)
            if responder.started:
                raise _Broken(worker, exc) from None
            raise
        finally:
            self.leg_end(worker, role, route, t0, ok)

    async def _relay(
        self,
        greq: GatewayRequest,
        responder: Responder,
        answers: Any,
        synth: OpenAISynth,
        worker: Worker,
        role: str,
        t0: float,
        continued: bool,
        done_tokens: int,
        route: RouteContext | None = None,
    ) -> None:
        """Stream the worker's events to the client as OpenAI SSE events. Events that are
        already queued when one is ready go out in one write (a worker faster than the loop
        sends bursts; one syscall each was the larger part of the relay's cost); a lone event
        is written at once, so coalescing never delays a token. The Deltas of a burst are taken
        together and built in one go (:meth:`OpenAISynth.deltas`), not one wake-up each."""
        metrics = self.p.metrics
        labels = (role, worker.id)
        t_first = 0.0
        events = 0
        held: list[bytes] = []
        held_n = 0  # events in ``held``
        output = greq.output  # tool-call / reasoning parsing (models[].tool_parser)
        async for event in answers:
            cls = type(event)
            n = 1
            if cls is Delta:
                burst = answers.deltas(_COALESCE_MAX - held_n) if answers.pending else None
                if burst:
                    burst.insert(0, event)
                    n = len(burst)
                    data = synth.deltas(burst)
                else:
                    data = synth.delta(event.text, event.token_ids, event.logprobs)
            elif cls is Finish:
                usage = event.usage
                prompt_tokens = usage.prompt_tokens
                if continued:  # as the HTTP splice: the continuation's prompt held them
                    prompt_tokens = max(0, prompt_tokens - done_tokens)
                last = finish_output(synth, event)
                data = last + synth.finish(
                    event.finish_reason,
                    event.stop_reason,
                    prompt_tokens,
                    usage.completion_tokens + done_tokens,
                    usage.cached_tokens,
                )
            else:
                raise RpcError(FailureCode.PROTOCOL, f"a {cls.__name__} in a stream")
            if output is not None:  # may hold text back (a tool call being parsed): b""
                data = output.events(data)
            if events == 0:
                if not responder.started:
                    await responder.start(200, self._headers(greq, _SSE))
                t_first = _now()
                if not continued:
                    metrics.ttft.observe((greq.model,), t_first - greq.t_start)
                metrics.stage_ttft.observe(labels, t_first - t0)
                if route is not None and role in self.p.first_token_roles:  # prefill is over
                    self.p.policies[role].on_first_token(worker, route)
                _stall(answers, self.stall_s)
            events += n
            if cls is Finish:
                if held:
                    held.append(data)
                    data = b"".join(held)
                await responder.end(data)
                if events > 1:
                    tpot = (_now() - t_first) / (events - 1)
                    metrics.stage_tpot.observe(labels, tpot)
                    if not continued:
                        metrics.tpot.observe((greq.model,), tpot)
                return
            if answers.pending and held_n + n <= _COALESCE_MAX:
                held.append(data)
                held_n += n
                continue
            if not data and not held:
                continue
            if held:
                held.append(data)
                data = b"".join(held)
                held.clear()
                held_n = 0
            await responder.send(data)
        raise RpcError(FailureCode.PROTOCOL, "the stream ended without Finish")

    async def _whole(
        self, greq: GatewayRequest, responder: Responder, answers: Any, synth: OpenAISynth
    ) -> None:
        """A non-streamed answer: the worker's (merged) deltas, then one JSON body."""
        answer = WholeAnswer()
        async for event in answers:
            if type(event) is Delta:
                answer.add(event)
                continue
            if type(event) is not Finish:
                raise RpcError(FailureCode.PROTOCOL, f"a {type(event).__name__} in a stream")
            body = answer.body(event, synth, greq.output)
            await responder.send_full(200, self._headers(greq, [_JSON]), body)
            return
        raise RpcError(FailureCode.PROTOCOL, "the stream ended without Finish")

    @staticmethod
    def _headers(greq: GatewayRequest, base: list[tuple[bytes, bytes]]) -> list:
        out = [*base, (b"x-request-id", greq.request_id.encode())]
        if greq.timings:
            out.append((b"server-timing", greq.server_timing()))
        return out


_NO_TOP_LOGPROBS = "does not send top logprobs or prompt logprobs (an older lmgw worker)"
_NO_STRUCTURED = (
    "does not constrain its output (response_format, structured outputs, a forced tool choice)"
)
_NO_KV_TENSORS = "does not take a prefill's KV as tensor frames"
_NO_SHM = CAPABILITIES - {"tensor_shm"}


def finish_output(synth: OpenAISynth, finish: Finish) -> bytes:
    """The event of the output a stream's Finish carries itself (``finish_output``: an lmgw
    worker folds only a non-streamed answer, but a peer may), else nothing."""
    if finish.text or finish.token_ids or finish.logprobs is not None:
        return synth.delta(finish.text, finish.token_ids, finish.logprobs)
    return b""


class WholeAnswer:
    """A non-streamed answer as its events come (sans-IO): the deltas' text, token ids and
    logprobs, then at the Finish the one JSON body. The trio path (``NativeRunner._whole``)
    and the compiled lane (:mod:`lmgw.api.lane_native`) build it alike."""

    __slots__ = ("ids", "logprobs", "parts")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.ids: list[int] = []
        self.logprobs: list[Any] | None = None

    def add(self, delta: Delta) -> None:
        self.parts.append(delta.text)
        self.ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)

    def body(self, finish: Finish, synth: OpenAISynth, output: Any = None) -> bytes:
        """The answer's body (``output``: the tool-call / reasoning rewriter, or None); the
        output a Finish carries itself (``finish_output``) is the answer's last."""
        parts = self.parts
        if not parts:  # no Delta came: the output is the Finish's own (or there is none)
            text, ids, logprobs = finish.text, finish.token_ids, finish.logprobs
        else:  # (a Finish without output adds nothing but an empty part)
            self.add(finish)  # type: ignore[arg-type]
            text, ids, logprobs = "".join(parts), self.ids, self.logprobs
        usage = finish.usage
        body = synth.response(
            text,
            finish.finish_reason,
            finish.stop_reason,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            ids,
            logprobs,
            prompt_lps=finish.prompt_logprobs,
        )
        return output.body(body) if output is not None else body


class _HandOff:
    """What a prefill handed to the decode stage: its ``kv_transfer_params`` and the tensors it
    sent through the gateway (refs and the payload frames they index)."""

    __slots__ = ("params", "payload", "refs")

    def __init__(
        self, params: dict[str, Any] | None, refs: Sequence[TensorRef], payload: Sequence[Any]
    ) -> None:
        self.params = params
        self.refs = refs
        self.payload = payload


def _output_array(ref: TensorRef, payload: Sequence[Any], pins: Pins) -> Any:
    """An encoder output the gateway relays, as an array the cache pool may keep: a view of
    its frame, or a copy of its shared-memory segment (a view would hold the segment, and its
    encoder could never reuse it)."""
    import numpy as np

    from ..transport.tensors import decode

    if ref.shm is None:
        return decode(ref.header, payload[ref.frame])
    buffer = pins.buffer(ref.shm)
    assert buffer is not None  # the caller pinned it
    return np.array(decode(ref.shm.header, buffer))


def _pin(refs: Sequence[TensorRef], pins: Pins, what: str) -> None:
    """:meth:`.handoff.Pins.add`; a segment already gone (its worker died) is a 502."""
    if not any(ref.shm is not None for ref in refs):
        return
    from ..transport.shm import ShmError

    try:
        pins.add(refs)
    except ShmError as exc:
        raise GatewayError(502, f"{what} in shared memory was lost: {exc}") from None


def check_generate(chan: RpcChannel, worker: Worker, msg: Generate) -> None:
    """A 400 naming what ``msg`` asks that ``worker``'s session lacks."""
    params = msg.params
    if params.logprobs or params.prompt_logprobs is not None:
        _check_capability(chan, worker, "top_logprobs", _NO_TOP_LOGPROBS)
    if params.structured is not None:
        _check_capability(chan, worker, "structured_outputs", _NO_STRUCTURED)
    if msg.kv_tensors:
        _check_capability(chan, worker, "kv_tensors", _NO_KV_TENSORS)


def _check_capability(chan: RpcChannel, worker: Worker, capability: str, lacks: str) -> None:
    """A request that needs ``capability`` goes only to a worker that agreed on it: alternatives
    and prompt logprobs (``top_logprobs``; an older worker answers the sampled tokens alone),
    a constraint (``structured_outputs``; an engine that ignored it would answer free text).
    Raised before anything is sent (another worker may take the request), and never counted
    against the worker."""
    session = chan.session
    if session is not None and capability not in session.capabilities:
        raise RpcError(
            FailureCode.UNSUPPORTED,
            f"worker {worker.id} {lacks} (capability {capability})",
            sent=False,
        )


def _wire_ids(msg: Any) -> Iterator[Any]:
    """The message, then the same with a suffixed id: a client may reuse an ``X-Request-Id``
    that is still in flight on the worker, and a channel refuses a second one (ValueError
    before anything is sent)."""
    yield msg
    yield msgspec.structs.replace(msg, request_id=f"{msg.request_id}~{token_hex(3)}")


#: SSE events joined into one client write at most (bounds the write size and the time a
#: burst holds the first of its events)
_COALESCE_MAX = 64


def _stall(answers: Any, stall_s: float) -> None:
    """After the first event, bound each wait by the stall timeout rather than the time to
    the first answer (``upstream.stream_stall_timeout_s``: a hung worker mid-stream)."""
    if stall_s != math.inf:
        answers.timeout = stall_s


def _has_media(obj: Mapping[str, Any]) -> bool:
    for msg in obj.get("messages") or ():
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list) and any(
            isinstance(part, dict) and part.get("type") not in (None, "text") for part in content
        ):
            return True
    return False
