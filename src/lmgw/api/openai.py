"""OpenAI-compatible endpoints: chat completions, completions, models (and SGLang's native
``/generate``, relayed the same way).

The body is decoded into a small *view* struct with only what the gateway needs (model, stream,
the fields it validates); the original bytes are forwarded, so unknown engine-specific fields
pass through untouched (STYLE.md §4, "decode only what you use").
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Annotated, Any
from urllib.parse import unquote

import msgspec
import trio

from ..admission import Admission, Rejected
from ..config import FLOW_ROLES
from ..errors import DECODE_ERRORS, GatewayError, sse_error_event
from ..fairqueue import Waiter
from ..http.types import Request, Responder, accepted_request_id
from ..metrics import Counter
from ..model_routes import ModelRoute
from ..pipeline.express import run_express
from ..pipeline.request import GatewayRequest
from ..routing.policy import RouteContext, session_key_of
from .keepalive import run_stream
from .keys import UsageMeter
from .limits import RequestLimits

_log = logging.getLogger("lmgw.api")
#: how vLLM (and the gateway's own context check) says a request does not fit the model
_CONTEXT_TOO_LONG = "maximum context length is"
#: the endpoints whose answers hold KV cache (limits.kv_accounting)
GENERATION_ENDPOINTS = frozenset(("chat", "completions", "generate"))

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _Common(msgspec.Struct):
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: NonNegInt | None = None
    n: PosInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # bounded by limits.* (decoded only when present)
    best_of: PosInt | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's request priority (lower runs first): the admission queue's order; passed on as is
    priority: int | None = None


class _Sampling(msgspec.Struct):
    """The fields of SGLang's ``sampling_params`` that limits.* bound."""

    max_new_tokens: NonNegInt | None = None
    n: PosInt | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None


class ChatView(_Common):
    # kept raw: the worker validates message contents; decoding them here would cost per token
    messages: list[msgspec.Raw] = msgspec.field(default_factory=list)
    max_completion_tokens: NonNegInt | None = None
    # the gateway-side tool loop switch (lmgw.tools.loop): read here, in the decode the view
    # costs anyway, so requests without it pay no search of the body; checked by the loop
    lmgw_tool_loop: Any = msgspec.UNSET


class CompletionView(_Common):
    # str, list of str, list of token ids or list of token-id lists: checked by the worker
    prompt: str | list | None = None


class GenerateView(msgspec.Struct):
    """SGLang's native ``/generate``: no ``model`` field as a rule (the gateway's only model),
    sampling parameters nested; checked by the worker."""

    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    text: str | list | None = None
    input_ids: list | None = None
    input_embeds: list | None = None
    # one table, or one per prompt of a batch
    sampling_params: _Sampling | list[_Sampling] | None = None
    # read with vLLM's meaning (lower runs first) for the admission queue; passed on as is
    priority: int | None = None


_decoders = {
    "chat": msgspec.json.Decoder(ChatView),
    "completions": msgspec.json.Decoder(CompletionView),
    "generate": msgspec.json.Decoder(GenerateView),
}
_JSON_CT = (b"content-type", b"application/json")
_now = time.perf_counter
#: client headers passed on to workers besides the request id and authorization
_FORWARDED = frozenset({b"traceparent", b"tracestate", b"x-data-parallel-rank"})
#: a chat body that may carry media (checked on the raw bytes: text-only requests skip the rest)
_MEDIA_MARK = re.compile(rb'"(?:image_url|input_audio|audio_url|video_url)"')
_PARAM_RE = re.compile(r"at `\$\.([A-Za-z0-9_]+)")
_MISSING_RE = re.compile(r"missing required field `([^`]+)`")


_NO_LIMITS = RequestLimits()


def decode_view(
    endpoint: str, body: bytes, limits: RequestLimits = _NO_LIMITS
) -> ChatView | CompletionView | GenerateView:
    """Validate the fields the gateway relies on, and the bounds of ``limits.*``; a 400 names
    the offending parameter."""
    if not body:
        raise GatewayError(400, "request body is empty; expected a JSON object")
    brackets = limits.check_body(body)
    try:
        view = _decoders[endpoint].decode(body)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = _PARAM_RE.search(msg) or _MISSING_RE.search(msg)
        raise GatewayError(
            400, f"invalid request: {msg}", param=m.group(1) if m else None
        ) from None
    except DECODE_ERRORS as exc:
        raise GatewayError(400, f"request body is not valid JSON: {exc}") from None
    if view.stream_options is not None and not view.stream:
        raise GatewayError(
            400, "stream_options can only be set when stream is true", param="stream_options"
        )
    if isinstance(view, ChatView):
        if not view.messages:
            raise GatewayError(400, "messages must be a non-empty list", param="messages")
        limits.check_chat(body, len(view.messages), brackets)
        if view.max_completion_tokens is not None:
            limits.check_sampling(
                max_tokens=view.max_completion_tokens, max_tokens_param="max_completion_tokens"
            )
    elif isinstance(view, GenerateView):
        if view.text is None and view.input_ids is None and view.input_embeds is None:
            raise GatewayError(400, "one of text, input_ids or input_embeds is required")
        params = view.sampling_params
        for p in params if isinstance(params, list) else () if params is None else (params,):
            limits.check_sampling(
                max_tokens=p.max_new_tokens,
                max_tokens_param="max_new_tokens",
                n=p.n,
                stop=p.stop,
                logit_bias=p.logit_bias,
            )
        return view
    batch = 0
    if isinstance(view, CompletionView):
        prompt = view.prompt
        if prompt is None:
            raise GatewayError(400, "prompt is required", param="prompt")
        # a batch (a list of strings or of token-id lists, not one token-id list)
        if type(prompt) is list and len(prompt) > 1 and type(prompt[0]) is not int:
            batch = len(prompt)
    if (  # the usual request sets none of these: no keyword call on the hot path
        limits.max_output_tokens
        or view.n is not None
        or view.best_of is not None
        or view.stop is not None
        or view.logit_bias is not None
    ):
        limits.check_sampling(
            max_tokens=view.max_tokens,
            n=view.n,
            best_of=view.best_of,
            stop=view.stop,
            logit_bias=view.logit_bias,
        )
    if batch or view.n is not None:  # prompts x n choices (the native path's fan-out)
        limits.check_choices(batch or 1, view.n)
    return view


class _Body:
    """The client's body for the steps that edit it (alias, media pins, max_tokens, tool
    flags): decoded at most once, whichever step needs the object first, and encoded at most
    once at the end, only when a step changed it. A plain request never decodes it here."""

    __slots__ = ("_obj", "changed", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._obj: dict[str, Any] | None = None
        self.changed = False

    @property
    def obj(self) -> dict[str, Any]:
        if self._obj is None:
            try:
                obj = msgspec.json.decode(self.raw)
            except DECODE_ERRORS as exc:
                raise GatewayError(400, f"request body is not valid JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise GatewayError(400, "request body must be a JSON object")
            self._obj = obj
        return self._obj

    def final(self) -> bytes:
        """What goes to the workers: the client's bytes unless a step changed the object."""
        if self.changed:
            self.raw = msgspec.json.encode(self._obj)
            self.changed = False
        return self.raw


def _heaviest(route: ModelRoute) -> str:
    """What /v1/models gives as a model route's ``root``: its target with the most weight."""
    return max(route.targets, key=lambda t: t.weight).model


def falls_back(exc: GatewayError) -> bool:
    """Whether a model route's request may go to its next model after ``exc``: the model
    could not serve it (no routable worker, its workers failed, overloaded or did not know
    it, or its context is too short for the request: vLLM's words, from the gateway's check
    or the worker), not the request (other 4xx) nor the gateway as a whole (its admission
    queue)."""
    if isinstance(exc, Rejected):
        return exc.reason == "worker_capacity"  # that model's workers are full
    if exc.status == 400:
        return _CONTEXT_TOO_LONG in exc.message  # a longer-context model may take it
    return exc.status in (404, 429, 500, 502, 503)


class OpenAIAPI:
    """Handlers for ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``."""

    #: the gateway's admission control (limits.max_concurrent_requests), set by ``App``
    admission: Admission

    def __init__(self, gateway) -> None:  # gateway: lmgw.gateway.Gateway (avoid import cycle)
        self.gw = gateway
        self.metrics = gateway.metrics
        self.request_timeout_s = gateway.config.limits.request_timeout_s or None
        self.upstream_auth = (
            b"Bearer " + gateway.config.upstream.api_key.encode()
            if gateway.config.upstream.api_key
            else None
        )
        # With gateway API keys the client's Authorization is the gateway's secret: never
        # forwarded to workers. Without them it is passed on (a vLLM started with --api-key).
        self.forward_client_auth = not gateway.config.auth.has_keys
        self._rid_prefix = gateway.request_id_prefix
        self._rid_counter = 0
        self._models: dict[str, str] = {}
        self._models_generation = -1
        self.media_limits = gateway.config.media
        self._media_cpu: trio.CapacityLimiter | None = None
        #: the per-request bounds of limits.* (depth, messages, parts, n, stop, ...)
        self.request_limits = RequestLimits.from_config(gateway.config.limits)
        self._media_ssl = None
        #: the gateway-side tool loop (lmgw.tools.loop.ToolLoop) when the gateway has tools
        self.tool_loop = gateway.tool_loop
        #: limits.sse_keepalive_s: comments while a stream waits for its first event (0: off)
        self.sse_keepalive_s = gateway.config.limits.sse_keepalive_s
        #: lmgw.tracing.Tracing when tracing.enabled, lmgw.logs.AccessLog when
        #: logging.access_log: None otherwise (one ``is None`` test per request each)
        self.tracing = gateway.tracing
        self.access_log = gateway.access_log
        #: the dashboard's ring of recent errors (written on the error path only)
        self.recent_errors = gateway.recent_errors
        limits = gateway.config.limits
        #: limits.kv_accounting (or fair share by KV): a meter on every generation's answer
        self.kv_accounting = limits.kv_accounting or limits.fair_share_cost == "kv_seconds"
        self.kv_seconds = Counter(
            "lmgw_tenant_kv_token_seconds_total",
            "KV-cache occupancy of finished generations, in token-seconds (prompt and output"
            " tokens held, times how long; estimated from usage and timing), by tenant: the API"
            " key's name, '-' without keys (limits.kv_accounting).",
            ("tenant",),
        )
        gateway.metrics.add(self.kv_seconds)

    def _identify(self, req: Request) -> tuple[str, list[tuple[bytes, bytes]]]:
        """The request id (the client's ``X-Request-Id`` when it is printable ASCII of at most
        256 characters, else a new one) and the headers every stage request carries, in one
        pass over the client's headers."""
        rid = None
        auth = self.upstream_auth
        client_auth = None
        trace: list[tuple[bytes, bytes]] | None = None
        for k, v in req.headers:
            if k == b"x-request-id":
                if rid is None:  # forwarded/echoed as sent
                    rid = accepted_request_id(v)
            elif k == b"authorization":
                if self.forward_client_auth:
                    client_auth = v
            elif k in _FORWARDED:
                (trace := trace or []).append((k, v))
        if rid is None:
            self._rid_counter += 1
            rid = f"{self._rid_prefix}-{self._rid_counter:x}"
        out = [_JSON_CT, (b"x-request-id", rid.encode())]
        if auth or client_auth:
            out.append((b"authorization", auth or client_auth))
        if trace:
            out.extend(trace)
        return rid, out

    def _resolve_model(self, model: str | None, route: str | None = None) -> str:
        """The canonical name of the model a request asks for (an alias's model; a model
        route's target, chosen by its split); 404 for a name nobody serves. ``route``: the
        route ``model`` is a target of (it then names a model, never a route)."""
        gw = self.gw
        if model is None:
            served = gw.served_models()
            if len(served) == 1:
                return next(iter(served))
            raise GatewayError(
                400, "model is required when the gateway serves several models", param="model"
            )
        if route is None and gw.model_routes.by_name:
            found = gw.model_routes.by_name.get(model)
            if found is not None:  # endpoints without fallbacks: the split's choice
                return self._resolve_model(gw.model_routes.choose(found), route=found.name)
        # asked on every request: answers cached until the fleet changes
        cache = self._models
        if self._models_generation != gw.registry.generation:
            cache.clear()
            self._models_generation = gw.registry.generation
        canonical = cache.get(model)
        if canonical is None:
            canonical = gw.model_aliases.get(model, model)
            if not gw.knows_model(canonical):
                if route is not None:  # the client's name exists: the fleet lacks its model
                    raise GatewayError(
                        503, f"model route `{route}`: no worker serves its model `{model}`"
                    )
                raise GatewayError(404, f"The model `{model}` does not exist.", param="model")
            if len(cache) < 4096:  # bounded: names come from clients
                cache[model] = canonical
        return canonical

    async def chat(self, req: Request, responder: Responder) -> None:
        await self.generate(req, responder, endpoint="chat", path="/v1/chat/completions")

    async def completions(self, req: Request, responder: Responder) -> None:
        await self.generate(req, responder, endpoint="completions", path="/v1/completions")

    async def generate(
        self, req: Request, responder: Responder, *, endpoint: str, path: str
    ) -> None:
        """Chat or completion (``endpoint``), relayed to the worker's ``path``."""
        t0 = _now()
        rid, forward = self._identify(req)
        req.request_id = rid
        model = "-"
        status = 200
        trace = None if self.tracing is None else self.tracing.request(req, endpoint, rid)
        key = req.principal
        meter = None
        try:
            view = decode_view(endpoint, req.body, self.request_limits)
            routes = self.gw.model_routes.by_name
            route = routes.get(view.model) if routes else None
            model = self._resolve_model(view.model) if route is None else route.name
            if key is not None:  # API keys: the model allow-list (403)
                self.gw.keys.check_model(key, model, view.model)
                if view.priority is not None and key.min_priority is not None:
                    self.gw.keys.check_priority(key, view.priority)
            if self.kv_accounting or (key is not None and key.tpm):  # usage and timing
                responder = meter = UsageMeter(responder)
            elif (  # a plain request: the express lane
                route is None
                and trace is None
                and not view.stream
                and self._express(model, view.model, req.body, endpoint)
            ):
                # (a slot to wait for first: the express lane after the wait all the same; the
                # general path cost a standing queue's requests 88 µs each against 49)
                queued = not self.admission.enter()
                if queued:
                    await self.queue(req, view)
                await self._run_express(
                    req, responder, view, model, endpoint, path, rid, forward, t0, queued
                )
                return
            served = [model]  # a model route's: the model tried last (for the metrics)
            if route is None:
                serve = partial(self._serve_model, req, view, model, endpoint, path, rid,
                                forward, t0, trace, meter=meter)  # fmt: skip
            else:  # split between models, falling back (lmgw.model_routes)
                serve = partial(self._run_route, req, view, route, served, endpoint, path, rid,
                                forward, t0, trace, meter=meter)  # fmt: skip
            try:
                if not view.stream:
                    await serve(responder)
                elif await run_stream(req, responder, serve, self.sse_keepalive_s,
                                      counted=self.metrics.keepalives.inc):  # fmt: skip
                    status = self.abandoned(req, rid, model, endpoint)  # (the deadline's)
            finally:
                model = served[0]
        except GatewayError as exc:
            status = await self.answer_error(exc, responder, rid, model, endpoint)
        except (trio.Cancelled, trio.BrokenResourceError, trio.ClosedResourceError):
            status = self.abandoned(req, rid, model, endpoint)
            raise
        finally:
            self.account(req, endpoint, model, status, t0, trace, meter)

    def _express(
        self, model: str, asked: str | None, body: bytes, endpoint: str, lane: bool = False
    ) -> bool:
        """Whether this non-streamed request is plain (:mod:`lmgw.pipeline.express`): what
        :meth:`_serve_model` would do to it before the pipeline, it would not do (no alias to
        rename, media, tool loop, output parsing or context check), and the pipeline has the
        lane for the model (``lane``: the compiled lane, :meth:`Pipeline.lane_for`, which
        renames an alias, parses the output and checks the context itself). Decided per
        request: tokenizers and fleets change at run time."""
        gw = self.gw
        pipe = gw.pipeline
        if not (pipe.lane_for(model) if lane else pipe.express_for(model)):
            return False
        if asked != model and not lane:  # (the compiled lane renames an alias itself:
            return False  # LaneApp.on_request; no model named: the one served, as it is)
        if endpoint == "chat":
            if self.tool_loop is not None:
                return False
            parsers = gw.output_parsers.get(model)
            if parsers is not None and not lane:  # (the compiled lane parses the output itself)
                tools, reasoning = parsers
                # the tool parser reads only answers to requests that offer tools
                if reasoning is not None or (tools is not None and b'"tools"' in body):
                    return False
            if _MEDIA_MARK.search(body):
                if self._checks_media(model) or "e" in FLOW_ROLES[gw.flow_of(model)]:
                    return False
            elif "e" in FLOW_ROLES[gw.flow_of(model)] and b"\\u" in body:
                return False  # (a media type could hide behind an escape: the E stage decides)
        if lane:  # (the compiled lane checks the context itself: LaneApp.on_request)
            return True
        text = gw.text_for(model)
        return text is None or not text.validate_context

    async def _run_express(
        self,
        req: Request,
        responder: Responder,
        view: Any,
        model: str,
        endpoint: str,
        path: str,
        rid: str,
        forward: list[tuple[bytes, bytes]],
        t0: float,
        queued: bool = False,
    ) -> None:
        """A plain request on the express lane, holding the admission slot taken already
        (``queued``: after a wait in the queue, which observed its time); the routing keys
        (the prompt's bytes, the session) when a policy routes on them."""
        admission = self.admission
        try:
            if admission.cap and not queued:
                self.metrics.queue_time.observe((), 0.0)
            body = req.body
            pipe = self.gw.pipeline
            route = (
                self._route_keys(req, model, rid, endpoint, body, view, None)
                if pipe.route_keys
                else None
            )
            await run_express(
                pipe, responder, model, path, body, rid, forward,
                partial(GatewayRequest, endpoint, path, model, False, body, rid, forward, t0),
                route,
            )  # fmt: skip
        finally:
            admission.leave(t0)

    async def _serve_model(
        self,
        req: Request,
        view: Any,
        model: str,
        endpoint: str,
        path: str,
        rid: str,
        forward: list[tuple[bytes, bytes]],
        t0: float,
        trace: Any,
        responder: Responder,
        admit: bool = True,
        meter: UsageMeter | None = None,
    ) -> None:
        """Serve the request with ``model`` (the canonical name). First the request as its
        workers get it: the name itself (an alias or a route's target), media pins, the
        context check and max_tokens, output parsing, routing keys, the tool loop's plan.

        Then admission (limits.max_concurrent_requests), and the pipeline or the tool loop.
        Admission is a counter when a slot is free or the cap is off; else a wait in the
        queue's order (priority, tenant) that raises Rejected (429). No checkpoint between
        getting the slot and the try that gives it back. The deadline
        (limits.request_timeout_s) is the server's: it cancels the handler and calls
        on_timeout() to answer (no cancel scope per request)."""
        body = _Body(req.body)
        if model != view.model and view.model is not None:
            body.obj["model"] = model  # an alias: workers know the canonical name
            body.changed = True
        items = None
        if endpoint == "chat" and _MEDIA_MARK.search(req.body) and self._checks_media(model):
            items = await self._preprocess_media(body, model)
        loop = None
        if self.tool_loop is not None and endpoint == "chat":  # the gateway has tools
            loop = self.tool_loop.plan(model, body, view)
        text = self.gw.text_for(model)  # an adapter's: its base model's
        prompt_ids = None
        if text is not None and text.validate_context and endpoint != "generate":
            # a 400 when it cannot fit; max_tokens filled in when absent
            filled, prompt_ids = await text.validate(endpoint, body.obj)
            body.changed |= filled
        output = None
        if endpoint == "chat" and (self.gw.output_parsers or self._native(model)):
            output = self._output_parsing(body, model)
        greq = GatewayRequest(
            endpoint,
            path,
            model,
            bool(view.stream),
            body.final(),
            rid,
            forward,
            t0,
        )
        greq.media = items
        greq.output = output
        greq.obj = body._obj
        greq.prompt_ids = prompt_ids
        greq.trace = trace
        if prompt_ids is not None and not view.stream:
            greq.usage_fill = partial(text.fill_usage, len(prompt_ids))
        if self.gw.pipeline.route_keys:  # a policy routes on the prompt or the session
            greq.route = self._route_context(req, greq, view, prompt_ids)
        if not admit:  # a mirror's copy: its own bound (lmgw.mirrors), no tools run twice
            await self.gw.pipeline.run(greq, responder)
            return
        granted = await self.admit(req, view)
        try:
            if loop is None:
                await self.gw.pipeline.run(greq, responder)
            else:
                await self.tool_loop.run(loop, greq, responder, self._next_round(req, view, greq))
        finally:
            self.admission.leave(t0)
            if granted is not None and meter is not None and self.admission.by_kv:
                self.admission.settle(granted, meter.kv_token_seconds(len(req.body)))

    async def _run_route(
        self,
        req: Request,
        view: Any,
        route: ModelRoute,
        served: list[str],
        endpoint: str,
        path: str,
        rid: str,
        forward: list[tuple[bytes, bytes]],
        t0: float,
        trace: Any,
        responder: Responder,
        meter: UsageMeter | None = None,
    ) -> None:
        """A chat or completion request for a model route (see :meth:`try_in_order`)."""

        async def attempt(model: str) -> None:
            await self._serve_model(
                req, view, model, endpoint, path, rid, forward, t0, trace, responder,
                meter=meter,
            )  # fmt: skip

        order = self.gw.model_routes.order(route, self._split_key(req, view, route))
        if route.mirror_due():  # a copy to the mirror model, answer dropped
            self._mirror(req, view, route, endpoint, path, rid, forward)
        await self.try_in_order(route, order, responder, served, attempt, rid)

    def _mirror(
        self,
        req: Request,
        view: Any,
        route: ModelRoute,
        endpoint: str,
        path: str,
        rid: str,
        forward: list[tuple[bytes, bytes]],
    ) -> None:
        """Send a copy of the request to the route's mirror model in the background
        (:mod:`lmgw.mirrors`): as the model's own clients would send it, under its own
        request id, its answer read and dropped."""
        assert route.mirror is not None
        mirror_rid = rid + "-mirror"
        headers = [(k, mirror_rid.encode()) if k == b"x-request-id" else (k, v) for k, v in forward]

        async def run(sink: Responder) -> None:
            model = self._resolve_model(route.mirror, route=route.name)
            await self._serve_model(
                req, view, model, endpoint, path, mirror_rid, headers, _now(), None, sink,
                admit=False,
            )  # fmt: skip

        self.gw.mirrors.submit(route.name, route.mirror, run)

    async def try_in_order(
        self,
        route: ModelRoute,
        order: tuple[str, ...],
        responder: Responder,
        served: list[str],
        attempt: Callable[[str], Awaitable[None]],
        rid: str,
    ) -> None:
        """Run ``attempt(model)`` for the route's models in ``order`` (its split's target, then
        its fallbacks), going on to the next while the model tried could not serve the request
        (:func:`falls_back`) and nothing reached the client; the last one's error is the
        answer. ``served[0]``: the model tried last (the request's metrics label)."""
        routes = self.gw.model_routes
        for i, target in enumerate(order):
            served[0] = target
            try:
                await attempt(self._resolve_model(target, route=route.name))
                return
            except GatewayError as exc:
                if i + 1 == len(order) or responder.started or not falls_back(exc):
                    raise
                routes.fell_back(route, target, order[i + 1])
                _log.info(
                    "request %s: model route %r: %s could not serve it (%d %s); trying %s",
                    rid, route.name, target, exc.status, exc.message, order[i + 1],
                )  # fmt: skip

    def _split_key(self, req: Request, view: Any, route: ModelRoute) -> str | None:
        """What keeps a client on one target of a ``"session"`` route: the routing session
        header, else the body's ``user``, else the API key's name; None for ``"request"``."""
        if route.split != "session":
            return None
        session = None
        header = self.gw.config.routing.session_header
        if header:
            wanted = header.lower().encode()
            session = next((v for k, v in req.headers if k == wanted), None)
        key = session_key_of(session, getattr(view, "user", None))
        if key is None and req.principal is not None:
            key = "key:" + req.principal.name
        return key

    async def admit(self, req: Request, view: Any) -> Waiter | None:
        """Take an admission slot: at once when one is free or the cap is off (no checkpoint:
        the caller's ``try`` that gives it back follows directly), else in the queue (then
        the waiter it was granted as, for :meth:`lmgw.admission.Admission.settle`)."""
        admission = self.admission
        if not admission.enter():
            return await self.queue(req, view)
        if admission.cap:
            self.metrics.queue_time.observe((), 0.0)
        return None

    # -- the steps every model-routed endpoint shares (generation and pass-through) ----------
    async def queue(self, req: Request | None = None, view: Any = None) -> Waiter:
        """Wait in the admission queue (limits.max_concurrent_requests is reached); ``req``
        and ``view`` (the decoded body) give its place in the queue's order: priority, tenant
        (the API key), cost (see :meth:`lmgw.admission.Admission.waiter`)."""
        t_queued = _now()
        w = await self.admission.wait(req, view)
        self.metrics.queue_time.observe((), _now() - t_queued)
        return w

    async def answer_error(
        self, exc: GatewayError, responder: Responder, rid: str, model: str, endpoint: str
    ) -> int:
        """Answer a request that failed with ``exc`` (an SSE error event and the stream's end
        when it had started); returns the status to account."""
        self.recent_errors.add(exc.status, exc.message, rid, model, endpoint)
        if responder.started:
            await responder.send(sse_error_event(exc.status, exc.message))
            await responder.end()
        elif isinstance(exc, Rejected):  # 429/503 for capacity: with Retry-After
            await exc.send(responder, rid)
        else:
            await send_error(responder, exc, rid)
        return exc.status

    def abandoned(self, req: Request, rid: str, model: str, endpoint: str) -> int:
        """A request cancelled (the client went away, or the deadline passed: the server
        answers that one through on_timeout) or whose write to the client failed: the status
        to account, 504 or 499."""
        if req.deadline_exceeded:
            self.recent_errors.add(504, "request deadline exceeded", rid, model, endpoint)
            return 504
        self.metrics.disconnects.inc((endpoint,))
        return 499

    def account(
        self,
        req: Request,
        endpoint: str,
        model: str,
        status: int,
        t0: float,
        trace: Any,
        meter: UsageMeter | None,
    ) -> None:
        """The request's metrics, span end, access log line, (keys with a token budget)
        usage charge and (limits.kv_accounting) KV-cache occupancy."""
        if meter is not None:
            key = req.principal
            if key is not None and key.tpm:
                meter.charge(key, len(req.body))
            if self.kv_accounting and endpoint in GENERATION_ENDPOINTS:
                tenant = key.name if key is not None else "-"
                self.kv_seconds.inc((tenant,), meter.kv_token_seconds(len(req.body)))
        flow = self.gw.flow_of(model) if model != "-" else "-"
        self.metrics.requests.inc((endpoint, model, flow, str(status)))
        elapsed = _now() - t0
        self.metrics.e2e.observe((endpoint, model), elapsed)
        if trace is not None:
            trace.end(status, model, flow)
        if self.access_log is not None:
            rid = req.request_id or "-"
            self.access_log.record(
                req.client, req.method, req.path, status, rid, model, flow, elapsed
            )

    def _route_context(
        self, req: Request, greq: GatewayRequest, view: Any, prompt_ids: list[int] | None
    ) -> RouteContext:
        """:meth:`_route_keys` of ``greq``."""
        return self._route_keys(
            req, greq.model, greq.request_id, greq.endpoint, greq.body, view, prompt_ids
        )

    def _route_keys(
        self,
        req: Request,
        model: str,
        rid: str,
        endpoint: str,
        body: bytes,
        view: Any,
        prompt_ids: list[int] | None,
    ) -> RouteContext:
        """The routing keys of this request, for policies that use them: the prompt's token
        ids when the model's tokenizer agrees with its workers (else the raw prompt bytes, so
        prefix locality still works), and the session key (header, else ``user``)."""
        gw = self.gw
        parity = gw.parity
        if (
            prompt_ids is not None
            and parity is not None
            and not parity.token_routing_safe.get(gw.base_of(model), True)
        ):
            prompt_ids = None
        text_key = None
        if prompt_ids is None:
            at = body.find(b'"messages"' if endpoint == "chat" else b'"prompt"')
            text_key = body[at:] if at >= 0 else body
        session = None
        header = gw.config.routing.session_header
        if header:
            wanted = header.lower().encode()
            session = next((v for k, v in req.headers if k == wanted), None)
        return RouteContext(
            model,
            rid,
            session_key=session_key_of(session, getattr(view, "user", None)),
            tokens=prompt_ids,
            text_key=text_key,
            lora=model if gw.is_lora(model) else None,
        )

    def _next_round(
        self, req: Request, view: ChatView, first: GatewayRequest
    ) -> Callable[[dict[str, Any]], Awaitable[GatewayRequest]]:
        """How the tool loop builds a later round's request from its body object: the steps
        of :meth:`generate` that depend on the messages (context check, output parsing,
        routing keys) run again; the media stay pinned as in the first round."""
        gw = self.gw

        async def build(obj: dict[str, Any]) -> GatewayRequest:
            body = _Body(b"")
            body._obj = obj
            body.changed = True
            model = first.model
            text = gw.text_for(model)
            prompt_ids = None
            if text is not None and text.validate_context:
                prompt_ids = (await text.validate("chat", obj))[1]
            output = (
                self._output_parsing(body, model)
                if gw.output_parsers or self._native(model)
                else None
            )
            greq = GatewayRequest(
                "chat", first.path, model, first.stream, body.final(), first.request_id,
                first.forward_headers, _now(),
            )  # fmt: skip
            greq.media = first.media
            greq.output = output
            greq.obj = obj
            greq.prompt_ids = prompt_ids
            greq.trace = first.trace  # every round's legs under the request's span
            if prompt_ids is not None and not first.stream:
                greq.usage_fill = partial(text.fill_usage, len(prompt_ids))
            if gw.pipeline.route_keys:
                greq.route = self._route_context(req, greq, view, prompt_ids)
            return greq

        return build

    def _output_parsing(self, body: _Body, model: str) -> Any:
        """The model's tool-call parser (requests that offer tools) and reasoning split on the
        answer (a ``tools.relay.OutputRewriter``, or None); tool markers are special tokens,
        so the worker must keep them."""
        from ..tools import wants_tool_parsing
        from ..tools.relay import OutputRewriter

        tools, reasoning = self.gw.output_parsers.get(model) or (None, None)
        obj = body.obj
        if self._native(model) and "tool_choice" in obj:
            forced = _forced_tool_parser(obj)
            if forced is not None:  # the gateway constrains the output: it reads it back
                return OutputRewriter(obj, forced, reasoning)
        if tools is not None and not wants_tool_parsing(obj):
            tools = None
        if tools is None and reasoning is None:
            return None
        rewriter = OutputRewriter(obj, tools, reasoning)
        if tools is None:
            return rewriter
        if "skip_special_tokens" not in obj:
            obj["skip_special_tokens"] = False
            body.changed = True
        # a vLLM worker started without --enable-auto-tool-choice refuses "auto" with a 400:
        # it is told "none" (the tools are still rendered) and the gateway parses the calls
        if self.gw.worker_tool_choice.get(model) == "none" and obj.get("tool_choice") in (
            None,
            "auto",
        ):
            obj["tool_choice"] = "none"
            body.changed = True
        return rewriter

    def _native(self, model: str) -> bool:
        """Whether ``model`` is served by native workers (the gateway builds its answers)."""
        native = self.gw.pipeline.native
        return bool(native.models or native.default) and native.handles(model)

    def _checks_media(self, model: str) -> bool:
        mode = self.media_limits.preprocess
        if mode == "auto":  # the hash keys encoder routing and the encoder cache
            return "e" in FLOW_ROLES[self.gw.flow_of(model)]
        return mode == "always"

    async def _preprocess_media(self, body: _Body, model: str) -> list:
        """Load, check and hash the request's media (a 400 naming the part on any limit), and
        pin each item by its hash as the part's ``uuid`` (a client's own uuid is kept): every
        leg, E, P and D, then keys the item exactly as the gateway did, so encoder affinity and
        the skip-E cache rest on the engine's own key."""
        from ..multimodal import preprocess
        from ..multimodal.fetch import default_ssl_context

        if self._media_cpu is None:
            self._media_cpu = trio.CapacityLimiter(os.cpu_count() or 1)
            self._media_ssl = default_ssl_context()
        obj = body.obj
        items = await preprocess(
            obj,
            self.media_limits,
            model_id=model,
            cpu_limiter=self._media_cpu,
            ssl_context=self._media_ssl,
        )
        for item in items:
            if item.uuid is None:
                obj["messages"][item.message]["content"][item.index]["uuid"] = item.hash
                body.changed = True
        return items

    async def on_timeout(self, req: Request, responder: Responder) -> None:
        """Answer a request the server cancelled at the deadline: 504, or an SSE error event
        and ``[DONE]`` when the stream had already started."""
        msg = (
            f"request {req.request_id or ''} exceeded the gateway deadline"
            f" of {self.request_timeout_s:g} s"
        )
        if responder.started:
            await responder.send(sse_error_event(504, msg))
            await responder.end()
        else:
            await send_error(responder, GatewayError(504, msg), req.request_id)

    def _visible_models(self, req: Request) -> set[str]:
        """The served models and model routes, less those the request's API key may not
        use."""
        names = self.gw.served_models() | {r.name for r in self.gw.model_routes}
        key = req.principal
        if key is not None and key.models is not None:
            aliases = self.gw.model_aliases
            names = {
                n
                for n in names
                if n in key.models or any(a in key.models for a, m in aliases.items() if m == n)
            }
        return names

    async def models(self, req: Request, responder: Responder) -> None:
        created = int(self.gw.started_at)
        adapters = self.gw.adapters.adapters
        data = []
        routes = self.gw.model_routes
        for name in sorted(self._visible_models(req)):
            lora = adapters.get(name)  # as vLLM lists an adapter: root its path, parent its base
            route = routes.get(name)  # a model route: root its heaviest target
            root = name if lora is None else lora.path
            if route is not None:
                root = _heaviest(route)
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "lmgw",
                    "root": root,
                    "parent": None if lora is None else lora.base,
                }
            )
        await responder.send_full(
            200,
            [(b"content-type", b"application/json")],
            msgspec.json.encode({"object": "list", "data": data}),
        )

    async def model(self, req: Request, responder: Responder, name: str) -> None:
        name = unquote(name)  # clients send a Hugging Face name's slash as %2F
        route = self.gw.model_routes.get(name)
        canonical = name if route is not None else self.gw.model_aliases.get(name, name)
        if canonical not in self._visible_models(req):
            await send_error(
                responder, GatewayError(404, f"The model `{name}` does not exist.", param="model")
            )
            return
        body = {
            "id": name,
            "object": "model",
            "created": int(self.gw.started_at),
            "owned_by": "lmgw",
            "root": canonical if route is None else _heaviest(route),
            "parent": None,
        }
        await responder.send_full(
            200, [(b"content-type", b"application/json")], msgspec.json.encode(body)
        )


async def send_error(
    responder: Responder, exc: GatewayError, request_id: str | None = None
) -> None:
    headers = [(b"content-type", b"application/json")]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    await responder.send_full(exc.status, headers, exc.body())


def _forced_tool_parser(obj: Mapping[str, Any]) -> Any:
    """The reader of a forced tool choice's constrained output (``tools.parsers.forced``), or
    None when the request does not force one. Raises GatewayError(400) for a tool choice that
    cannot be honoured (no tools, an unknown function)."""
    from ..structured import StructuredOutputError, forced_tool
    from ..tools.parsers.forced import NamedCallParser, RequiredCallsParser

    try:
        forced = forced_tool(obj)
    except StructuredOutputError as exc:
        raise GatewayError(400, str(exc), param=exc.param) from None
    if forced is None:
        return None
    return RequiredCallsParser() if forced[1] is None else NamedCallParser(forced[1])
