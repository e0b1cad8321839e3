"""``lmgw.Gateway``: the whole gateway inside a trio program, no HTTP hop.

``async with Gateway(workers=[...]) as gw:`` builds the core :class:`lmgw.gateway.Gateway` and
runs its background tasks (health monitor, discovery, tokenizer parity) without a listening
socket (``run(serve=False)``); ``await gw.chat(...)`` then goes through the very handler the HTTP
server calls (``OpenAIAPI.generate`` behind the app's middleware: validation, admission, media,
routing, retries, stream migration) with an in-memory responder that receives the bytes the
server would have written, decoded by the same code as :class:`~lmgw.sdk.client.Client`. So
results, stream events and errors are equal to the HTTP API's. ``await gw.serve(port=0)`` (or
``serve=True``) also serves HTTP from the same object.

Resource handling: every task (the core's, a stream's producer, the HTTP server) lives in the
nursery owned by the ``async with``; leaving it runs the ``on_shutdown`` hooks, drains the HTTP
server if one runs (``server.graceful_shutdown_s``), then cancels the rest. A non-streamed
request runs in the caller's task. A stream runs its request in a producer task that hands
event batches to the caller's generator through a bounded memory channel (backpressure: a slow
reader slows the relay from the worker); leaving the loop early cancels the producer, which
aborts the worker's request, as a client disconnect does.

Error handling: error answers raise :class:`~lmgw.sdk.errors.APIError` subclasses; a handler
bug is logged and raised as :class:`~lmgw.sdk.errors.InternalServerError` (the HTTP server's
500), chained to the original exception.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any, Protocol

import msgspec
import trio

from ..api.app import Middleware
from ..config import (
    ROLES,
    ConfigError,
    GatewayConfig,
    ModelRouteConfig,
    WorkerConfig,
    config_from_mapping,
    normalize_role,
)
from ..errors import GatewayError
from ..gateway import Gateway as CoreGateway
from ..gateway import server_limits
from ..http.local import Collector, LocalRequest
from ..http.server import HTTPServer
from ..http.types import Headers
from ..model_routes import route_body
from ..routing.policy import Policy
from ..workers.registry import WorkerExists
from ..workers.worker import Worker, WorkerState
from .client import (
    BATCHES,
    FILES,
    _batch_body,
    _batch_path,
    _decode,
    _file_path,
    _multipart_form,
    _run_batch,
)
from .errors import (
    APIError,
    GatewayClosed,
    InternalServerError,
    _ErrorFields,
    error_from_payload,
    error_from_response,
)
from .types import (
    ChatResult,
    CompletionResult,
    EmbeddingResult,
    ModelInfo,
    SSEDecoder,
    StreamEvent,
    TokenizeResult,
    decode_result,
    encode_request,
    response_path,
)

__all__ = ["Gateway", "build_config"]

log = logging.getLogger("lmgw.sdk")
_encode = msgspec.json.encode
_JSON_CT = (b"content-type", b"application/json")

#: ``async def hook(gateway) -> None``: after start-up (first health round done) / before stop
Hook = Callable[["Gateway"], Awaitable[None]]
#: ``def hook(worker: dict) -> None``: a worker was added, removed or changed state (its
#: ``describe()``); called synchronously on the gateway's loop, so keep it short
WorkerHook = Callable[[dict[str, Any]], None]


# -- configuration ------------------------------------------------------------------------------


def build_config(
    config: GatewayConfig | Mapping[str, Any] | None = None, sections: Mapping[str, Any] = {}
) -> GatewayConfig:
    """A :class:`GatewayConfig` from a config, a mapping shaped like the TOML file, and/or
    sections given as keyword arguments (they win over ``config``'s, key by key).

    Shorthands: a worker may be a URL string (a merged ``pd`` worker), a model a name string.
    Raises :class:`lmgw.config.ConfigError` (a ValueError) naming the bad key.
    """
    if isinstance(config, GatewayConfig):
        if not sections:
            return config
        data: dict[str, Any] = msgspec.to_builtins(config)
    else:
        data = dict(msgspec.to_builtins(config or {}))
    for key, value in msgspec.to_builtins(dict(sections)).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    data["workers"] = [{"url": w} if isinstance(w, str) else w for w in data.get("workers", ())]
    data["models"] = [{"name": m} if isinstance(m, str) else m for m in data.get("models", ())]
    return config_from_mapping(data)


# -- in-memory requests and responders ----------------------------------------------------------


class EventSink(Protocol):
    """Where a streamed answer's event batches go: a trio memory channel, or the asyncio
    bridge's pipe. ``send`` gets a list of events or the exception that ends the stream and
    raises ``trio.BrokenResourceError`` once the reader is gone (the handler then takes the
    client as disconnected); ``close`` ends the stream (synchronous: safe when cancelled)."""

    async def send(self, item: list[StreamEvent] | BaseException) -> None: ...

    def close(self) -> None: ...


class _StreamResponder:
    """A responder that decodes SSE bytes into event batches for an :class:`EventSink`."""

    __slots__ = ("decoder", "failed", "finished", "sink", "started")

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self.decoder = SSEDecoder()
        self.started = False
        self.finished = False
        self.failed = False

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        self.finished = True
        if status >= 400:
            error: APIError = error_from_response(status, body, headers)
        else:
            error = APIError(status, f"expected an event stream, got {body[:200]!r}")
        self.failed = True
        await self.sink.send(error)

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True

    async def send(self, data: bytes) -> None:
        decoder = self.decoder
        events = decoder.feed(data)
        if events:
            await self.sink.send(events)
        if decoder.error is not None and not self.failed:
            self.failed = True
            await self.sink.send(decoder.error)

    async def end(self, data: bytes = b"") -> None:
        if data:
            await self.send(data)
        events = self.decoder.feed_eof()
        if events:
            await self.sink.send(events)
        self.finished = True


class _ChannelSink:
    """The trio face of :class:`EventSink`: a bounded memory channel."""

    __slots__ = ("channel", "finished")

    def __init__(self, channel: trio.MemorySendChannel) -> None:
        self.channel = channel
        self.finished = False

    async def send(self, item: list[StreamEvent] | BaseException) -> None:
        await self.channel.send(item)

    def close(self) -> None:
        self.channel.close()


def _typed(exc: GatewayError) -> APIError:
    return error_from_payload(exc.status, _ErrorFields(exc.message, exc.type, exc.param))


def _headers(request_id: str | None, extra: Mapping[str, str] | None) -> Headers:
    headers: Headers = [_JSON_CT]
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode()))
    for k, v in (extra or {}).items():
        headers.append((k.lower().encode(), v.encode()))
    return headers


_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


# -- the gateway --------------------------------------------------------------------------------


class Gateway:
    """The gateway in-process (trio). See the module docstring; :mod:`lmgw.aio` is its asyncio
    face.

    Args:
        config: a :class:`~lmgw.config.GatewayConfig` or a mapping shaped like the TOML file.
        policies: routing policy objects (:class:`lmgw.routing.policy.Policy`): one for every
            role but encode, or ``{role: policy}``; they replace the configured ones.
        middleware: ``async def mw(request, responder, call_next)`` around the generation
            endpoints (:data:`lmgw.api.app.Middleware`), in-process and over HTTP alike.
        on_startup, on_shutdown: ``async def hook(gateway)``, run after the start (workers
            probed once) and before the stop.
        on_worker_change: ``def hook(worker: dict)`` on every membership or state change.
        tools: native tools the gateway may run (functions, sync or async, or
            :func:`lmgw.sdk.tool` objects), besides :func:`lmgw.sdk.register_tool`'s and the
            ``lmgw.tools`` entry points' (docs/tools.md, "Gateway tools"). A mapping is the
            ``[tools]`` config section instead (like the other ``sections``).
        serve: also serve HTTP on ``server.host:server.port`` from the start.
        stream_buffer: event batches a stream may hold before the relay waits for its reader.
        tracer_provider: an OpenTelemetry ``TracerProvider`` to trace requests into (spans per
            request and stage, ``traceparent`` to the workers); else ``tracing.*`` decides.
        sections: config sections as keywords, e.g. ``workers=["http://127.0.0.1:8001"]``,
            ``routing={"policy": "least_load"}``, ``limits={...}``.
    """

    def __init__(
        self,
        config: GatewayConfig | Mapping[str, Any] | None = None,
        *,
        policies: Policy | Mapping[str, Policy] | None = None,
        middleware: Sequence[Middleware] = (),
        on_startup: Sequence[Hook] = (),
        on_shutdown: Sequence[Hook] = (),
        on_worker_change: Sequence[WorkerHook] = (),
        tools: Sequence[Callable[..., Any]] | Mapping[str, Any] = (),
        serve: bool = False,
        stream_buffer: int = 16,
        tracer_provider: Any = None,
        **sections: Any,
    ) -> None:
        if isinstance(tools, Mapping):  # the [tools] section, not tools
            sections["tools"], tools = tools, ()
        self.config = build_config(config, sections)
        #: the core gateway (registry, pool, pipeline, metrics, app) for advanced use
        self.core = CoreGateway(self.config, tools=tools, tracer_provider=tracer_provider)
        if policies is not None:
            self.set_policies(policies)
        for mw in middleware:
            self.core.app.add_middleware(mw)
        self.on_startup: list[Hook] = list(on_startup)
        self.on_shutdown: list[Hook] = list(on_shutdown)
        self.on_worker_change: list[WorkerHook] = list(on_worker_change)
        self.core.registry.subscribe(self._worker_changed)
        self._serve_at_start = serve
        self._stream_buffer = stream_buffer
        self._timeout = self.config.limits.request_timeout_s or None
        self._nursery: trio.Nursery | None = None
        self._host = self.config.server.host
        self._cm: AbstractAsyncContextManager[Gateway] | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> Gateway:
        if self._cm is not None:
            raise RuntimeError("a Gateway runs once; make a new one")
        self._cm = self._running()
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._cm is not None
        return await self._cm.__aexit__(*exc_info)

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[Gateway]:
        body_error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(self.core.run, serve=self._serve_at_start))
            self._nursery = nursery
            try:
                for hook in self.on_startup:
                    await hook(self)
                yield self
            except BaseException as exc:
                # re-raised below, outside the nursery: the caller's own exception comes out
                # as itself, not wrapped in an ExceptionGroup by our nursery
                body_error = exc
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(self.config.server.graceful_shutdown_s):
                        for hook in self.on_shutdown:
                            await hook(self)
                        if body_error is None and self.core.server is not None:
                            await self.core.shutdown()  # drain the HTTP server
                self._nursery = None
                nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error

    @property
    def running(self) -> bool:
        return self._nursery is not None

    def _require_nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise GatewayClosed("the gateway is not running: use `async with Gateway(...)`")
        return self._nursery

    async def serve(self, port: int = 0, host: str | None = None) -> int:
        """Also serve the HTTP API (the native server) on ``host:port``; returns the port."""
        nursery = self._require_nursery()
        if self.core.server is not None:
            raise RuntimeError(f"already serving on port {self.core.port}")
        handler = self.core.handler  # the App behind the key check and CORS, as lmgw serve
        limits = server_limits(self.config)
        server = HTTPServer(
            handler, limits, handler.on_timeout, lane=self.core._lane_app(limits)
        )  # (the compiled lane too, as lmgw serve)
        self._host = host or self.config.server.host
        bound = await nursery.start(server.serve, self._host, port)
        if server.lane is not None:
            server.lane.install_metrics(self.core.metrics)
        self.core.server, self.core.port = server, bound
        return bound

    @property
    def port(self) -> int | None:
        """The HTTP port when serving, else None."""
        return self.core.port

    @property
    def url(self) -> str | None:
        """``http://host:port`` when serving, else None."""
        if self.core.port is None:
            return None
        host = self._host if ":" not in self._host else f"[{self._host}]"
        return f"http://{host}:{self.core.port}"

    # -- extension points -------------------------------------------------------------------
    def set_policies(self, policies: Policy | Mapping[str, Policy]) -> None:
        """Route with these policy objects: one for every role but encode (which keeps its
        media-affinity hash unless named), or ``{role: policy}`` in any role spelling."""
        if isinstance(policies, Policy):
            chosen = {role: policies for role in ROLES if role != "e"}
        else:
            chosen = {normalize_role(role): p for role, p in policies.items()}
        for role, policy in chosen.items():
            if not isinstance(policy, Policy):
                raise TypeError(f"policy for role {role!r} is not a lmgw Policy: {policy!r}")
        # the pipeline holds this same dict: the change applies to the next request
        self.core.policies.update(chosen)

    def add_middleware(self, middleware: Middleware) -> None:
        """Add ``middleware`` (innermost so far) to the generation endpoints."""
        self.core.app.add_middleware(middleware)

    def _worker_changed(self, worker: Worker) -> None:
        if not self.on_worker_change:
            return
        description = self._describe(worker)
        for hook in self.on_worker_change:
            try:
                hook(description)
            except Exception:  # a user hook must not break the registry's writer
                log.exception("on_worker_change hook %r failed", hook)

    # -- the OpenAI API ---------------------------------------------------------------------
    async def chat(
        self,
        *,
        messages: Sequence[Mapping[str, Any]],
        model: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        **params: Any,
    ) -> ChatResult:
        """A chat completion; ``params`` are the body's other fields (``max_tokens``...)."""
        body = encode_request(model, params, messages=messages)
        return await self._call("chat", body, _headers(request_id, headers))

    def chat_stream(
        self,
        *,
        messages: Sequence[Mapping[str, Any]],
        model: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        **params: Any,
    ) -> AsyncIterator[StreamEvent]:
        """A streamed chat completion: ``async for event in gw.chat_stream(...)``."""
        body = encode_request(model, params, messages=messages, stream=True)
        return self._stream("chat", body, _headers(request_id, headers))

    async def complete(
        self,
        *,
        prompt: Any,
        model: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        **params: Any,
    ) -> CompletionResult:
        """A completion (``/v1/completions``)."""
        body = encode_request(model, params, prompt=prompt)
        return await self._call("completions", body, _headers(request_id, headers))

    def complete_stream(
        self,
        *,
        prompt: Any,
        model: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        **params: Any,
    ) -> AsyncIterator[StreamEvent]:
        """A streamed completion."""
        body = encode_request(model, params, prompt=prompt, stream=True)
        return self._stream("completions", body, _headers(request_id, headers))

    async def models(self) -> list[ModelInfo]:
        """What ``GET /v1/models`` lists."""
        return await self._route("GET", "/v1/models", b"", "models")

    async def tokenize(self, *, model: str | None = None, **params: Any) -> TokenizeResult:
        """vLLM's ``/tokenize``: ``prompt=`` or ``messages=`` (answered by the gateway's
        tokenizer when the model has one, else relayed to a worker)."""
        body = encode_request(model, params)
        return await self._route("POST", "/tokenize", body, "tokenize")

    async def detokenize(self, tokens: Sequence[int], *, model: str | None = None) -> str:
        body = encode_request(model, {"tokens": list(tokens)})
        return (await self._route("POST", "/detokenize", body, "json"))["prompt"]

    async def embeddings(
        self, *, input: Any, model: str | None = None, **params: Any
    ) -> EmbeddingResult:
        """``/v1/embeddings`` on a merged worker of the model."""
        body = encode_request(model, params, input=input)
        return await self._route("POST", "/v1/embeddings", body, "embeddings")

    async def create_response(
        self, *, input: Any, model: str | None = None, **params: Any
    ) -> dict[str, Any]:
        """The Responses API (``previous_response_id=`` continues a stored response on the
        worker that holds it)."""
        body = encode_request(model, params, input=input)
        return await self._route("POST", "/v1/responses", body, "json")

    async def retrieve_response(self, response_id: str) -> dict[str, Any]:
        return await self._route("GET", response_path(response_id), b"", "json")

    async def cancel_response(self, response_id: str) -> dict[str, Any]:
        return await self._route("POST", response_path(response_id) + "/cancel", b"", "json")

    # -- files and batches (OpenAI's Batch API; docs/sdk.md, "Batches") -----------------------
    async def upload_batch_file(self, data: bytes, filename: str = "batch.jsonl") -> dict[str, Any]:
        """Upload a batch input file (JSONL); the file object (its ``id``)."""
        body, content_type = _multipart_form({"purpose": "batch"}, {"file": (filename, data)})
        headers: Headers = [(b"content-type", content_type)]
        return await self._route("POST", FILES, body, "json", headers)

    async def create_batch(
        self,
        input_file_id: str,
        endpoint: str = "/v1/chat/completions",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Run an uploaded file's requests on the fleet in the background; the batch."""
        body = _batch_body(input_file_id, endpoint, metadata)
        return await self._route("POST", BATCHES, body, "json")

    async def batch(self, batch_id: str) -> dict[str, Any]:
        """The batch: ``status``, ``request_counts``, ``output_file_id``, ``error_file_id``."""
        return await self._route("GET", _batch_path(batch_id), b"", "json")

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """Stop a batch: its requests in flight are aborted, the answers so far kept."""
        return await self._route("POST", _batch_path(batch_id) + "/cancel", b"", "json")

    async def file_content(self, file_id: str) -> bytes:
        """A file's bytes (an output or error file: JSONL records)."""
        return await self._route("GET", _file_path(file_id) + "/content", b"", "bytes")

    async def run_batch(
        self,
        requests: Sequence[Mapping[str, Any]],
        endpoint: str = "/v1/chat/completions",
        *,
        poll_s: float = 0.2,
        timeout_s: float | None = None,
    ) -> list[dict[str, Any]]:
        """Run request bodies as one batch and wait: one output record per request, in order
        (:func:`lmgw.sdk.client._run_batch`)."""
        return await _run_batch(self, requests, endpoint, poll_s, timeout_s, trio.sleep)

    async def _delete_file(self, file_id: str) -> dict[str, Any]:
        return await self._route("DELETE", _file_path(file_id), b"", "json")

    # -- fleet --------------------------------------------------------------------------------
    @property
    def workers(self) -> list[dict[str, Any]]:
        """Every worker's description (as ``GET /admin/workers`` lists them)."""
        return [self._describe(w) for w in self.core.registry]

    def worker(self, worker_id: str) -> dict[str, Any]:
        return self._describe(self._get(worker_id))

    def planner(self) -> dict[str, Any]:
        """The recommended worker count of each role, and why (as ``GET /admin/planner``).

        Raises NotFound with ``planner.enabled = false``."""
        feed = self.core.planner
        if feed is None:
            raise _typed(GatewayError(404, "the planner is off (planner.enabled = false)"))
        return feed.describe()

    def add_worker(
        self, url: str, role: str = "pd", *, id: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Add a worker (the fields of a ``[[workers]]`` table); the monitor probes it at once.

        Raises BadRequest for an invalid table, Conflict when the id exists."""
        table = {"url": url, "role": role, **fields}
        if id is not None:
            table["id"] = id
        try:
            wc = msgspec.convert(table, WorkerConfig)
        except (msgspec.ValidationError, ValueError) as exc:
            raise _typed(GatewayError(400, f"invalid worker: {exc}")) from None
        try:
            added = self.core.add_entry(wc)
        except WorkerExists as exc:
            msg = f"a worker with id {exc.worker_id!r} already exists"
            raise _typed(GatewayError(409, msg)) from None
        except ValueError as exc:
            raise _typed(GatewayError(400, str(exc))) from None
        if len(added) == 1:
            return self._describe(added[0])
        return {"object": "list", "data": [self._describe(w) for w in added]}

    async def drain(self, worker_id: str, grace_s: float | None = None) -> dict[str, Any]:
        """No new requests for the worker; with ``grace_s``, also wait up to that long for the
        ones in flight to end. The worker stays registered (see :meth:`remove_worker`)."""
        worker = self._get(worker_id)
        self.core.drain_worker(worker_id, "drained through the SDK")
        if grace_s:
            with trio.move_on_after(grace_s):
                while worker.in_flight > 0:
                    await trio.sleep(0.05)
        return self._describe(worker)

    async def undrain(self, worker_id: str) -> dict[str, Any]:
        """Back into rotation after one successful probe."""
        worker = self._get(worker_id)
        if worker.state is WorkerState.DRAINING:
            self.core.registry.set_state(worker, WorkerState.STARTING, "undrained through the SDK")
            await self.core.monitor.probe(worker)
        return self._describe(worker)

    async def remove_worker(self, worker_id: str, grace_s: float | None = None) -> dict[str, Any]:
        """Remove at once, or drain, wait up to ``grace_s`` for it to be idle, then remove."""
        self._get(worker_id)
        if grace_s is None:
            worker = self.core.remove_worker(worker_id)
        else:
            worker = await self.core.retire_worker(worker_id, grace_s)
        return self._describe(worker)

    @property
    def lora_adapters(self) -> list[dict[str, Any]]:
        """The LoRA adapters loaded through the gateway, and where (``GET
        /admin/lora_adapters``)."""
        return self.core.adapters.describe()

    async def load_lora_adapter(
        self, name: str, path: str, *, model: str | None = None, inplace: bool = False
    ) -> dict[str, Any]:
        """Load a LoRA adapter on every worker (of base ``model`` when given) and keep it
        loaded (docs/operations.md, "LoRA adapters"). Raises the API's errors, typed."""
        try:
            return await self.core.adapters.load(name, path, model, inplace)
        except GatewayError as exc:
            raise _typed(exc) from None

    async def unload_lora_adapter(self, name: str) -> dict[str, Any]:
        try:
            return await self.core.adapters.unload(name)
        except GatewayError as exc:
            raise _typed(exc) from None

    @property
    def model_routes(self) -> list[dict[str, Any]]:
        """Every model route, its targets' weights and shares, fallbacks, split and the
        requests each target was given (``GET /admin/model_routes``)."""
        return [route.describe() for route in self.core.model_routes]

    async def set_model_route(
        self,
        name: str,
        targets: Mapping[str, float] | Sequence[tuple[str, float]],
        *,
        fallbacks: Sequence[str] = (),
        split: str = "request",
        mirror: str | None = None,
        mirror_share: float = 1.0,
    ) -> dict[str, Any]:
        """Add or replace the route ``name`` (``{model: weight}``): the next request is split
        the new way; ``mirror`` also gets a copy of ``mirror_share`` of the requests. The
        route as set; BadRequest for a bad definition or a chained route."""
        table = {"model": name, **route_body(targets, fallbacks, split, mirror, mirror_share)}
        try:
            cfg = msgspec.convert(table, ModelRouteConfig)
        except msgspec.ValidationError as exc:
            # the HTTP API's words: the rule broken (ConfigError.reason), not msgspec's wrapping
            why = exc.__cause__.reason if isinstance(exc.__cause__, ConfigError) else exc
            raise _typed(GatewayError(400, f"invalid model route: {why}")) from None
        try:
            route, _ = self.core.set_model_route(cfg)
        except ValueError as exc:  # it would chain routes
            raise _typed(GatewayError(400, str(exc))) from None
        return route.describe()

    async def delete_model_route(self, name: str) -> dict[str, Any]:
        """The name stops being a route; NotFound when it is none."""
        if not self.core.model_routes.remove(name):
            raise _typed(GatewayError(404, f"no model route `{name}`", param="model"))
        return {"model": name, "deleted": True}

    def _get(self, worker_id: str) -> Worker:
        worker = self.core.registry.get(worker_id)
        if worker is None:
            raise _typed(GatewayError(404, f"no worker with id {worker_id!r}", param="id"))
        return worker

    def _describe(self, worker: Worker) -> dict[str, Any]:
        out = worker.describe()
        out["source"] = self.core.source_of(worker.id)
        return out

    # -- the request path ---------------------------------------------------------------------
    async def _invoke(self, path: str, req: LocalRequest, responder: Any) -> None:
        """Run the route's handler (middleware included) as the HTTP server would: within the
        request deadline (answered through the app's ``on_timeout``), handler bugs as 500."""
        app = self.core.app
        handler = app.generate_handler(path) if path in _PATHS.values() else app
        try:
            if self._timeout is None:
                await handler(req, responder)
                return
            with trio.CancelScope(deadline=trio.current_time() + self._timeout) as scope:
                req.deadline = scope.deadline
                await handler(req, responder)
            if scope.cancelled_caught:
                await app.on_timeout(req, responder)
        except (trio.Cancelled, trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception as exc:
            log.exception("handler failed on in-process %s %s", req.method, req.path)
            raise InternalServerError(500, "internal gateway error") from exc

    async def _call(self, endpoint: str, body: bytes, headers: Headers) -> Any:
        self._require_nursery()
        req = LocalRequest(_PATHS[endpoint], headers, body)
        out = Collector()
        await self._invoke(req.path, req, out)
        return decode_result(endpoint, out.status, out.body(), out.headers)

    async def _route(
        self, method: str, path: str, body: bytes, kind: str, headers: Headers | None = None
    ) -> Any:
        """Any other route, through the app's router (same answers as over HTTP); ``headers``
        replace the JSON content type (a form's), ``kind`` ``bytes`` is a raw answer's body."""
        self._require_nursery()
        req = LocalRequest(path, headers or [_JSON_CT], body, method)
        out = Collector()
        await self._invoke(path, req, out)
        return _decode(kind, out.status, out.body(), out.headers)

    async def run_stream(self, endpoint: str, body: bytes, headers: Headers, sink: Any) -> None:
        """Run one streamed request into ``sink`` (an :class:`EventSink` with a ``finished``
        flag), closing it at the end whatever happens. Used by :meth:`chat_stream` (in a
        producer task) and by :mod:`lmgw.aio` (in the bridge's task for the request)."""
        responder = _StreamResponder(sink)
        try:
            try:
                req = LocalRequest(_PATHS[endpoint], headers, body)
                await self._invoke(req.path, req, responder)
                error = None
                if not responder.finished:
                    log.error("handler returned without finishing in-process %s", req.path)
                    error = InternalServerError(500, "no response produced")
            except InternalServerError as exc:
                error = None if responder.failed else exc
            if error is not None:
                await sink.send(error)
            sink.finished = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the reader left: the handler saw it as a client disconnect
        finally:
            sink.close()

    async def _stream(
        self, endpoint: str, body: bytes, headers: Headers
    ) -> AsyncIterator[StreamEvent]:
        nursery = self._require_nursery()
        send, receive = trio.open_memory_channel[list[StreamEvent] | BaseException](
            self._stream_buffer
        )
        sink = _ChannelSink(send)
        scope = trio.CancelScope()

        async def produce() -> None:
            with scope:
                await self.run_stream(endpoint, body, headers, sink)

        nursery.start_soon(produce)
        try:
            with receive:
                async for item in receive:
                    if type(item) is list:
                        for event in item:
                            yield event
                    else:
                        raise item  # type: ignore[misc]
            if not sink.finished:
                raise GatewayClosed("the gateway stopped during the stream")
        finally:
            scope.cancel()
