"""The rest of vLLM's HTTP surface, relayed to merged workers: embeddings, pooling, scoring and
reranking, Anthropic messages, batched chat, audio, the Responses API, and ``GET /version``.

One table (:data:`ROUTES`) says, per path, where the model is named (the JSON body, or a
multipart form's ``model`` field) and whether the answer may stream. Every route then runs the
generation path's machinery: the request id, API keys (and their model lists), body bounds,
admission, the role's load-balancing policy, retries of undelivered requests on another worker,
the deadline, client-disconnect aborts, metrics (``endpoint`` label = the route's name), the
access log and OpenAI-shaped errors; the body goes to the worker byte for byte (the model name
rewritten when the client used an alias) and the answer comes back as bytes, streams included
(Anthropic's ``event:`` lines untouched).

These endpoints run on merged (``pd``) workers only: a disaggregated model's legs serve
generation, so a model with no merged worker answers 400 naming the endpoint and its flow.

**Responses API affinity.** vLLM keeps stored responses in the serving process's memory: the
worker that created a response is the only one that knows it. The answer's id is recorded
(:mod:`lmgw.routing.responses`), and ``previous_response_id``, ``GET /v1/responses/{id}`` and
``POST /v1/responses/{id}/cancel`` go to that worker, never elsewhere: when it left the fleet,
the client hears so (404), as it does when it drains (409; reads and cancels still reach a
draining worker) or is out of rotation (503, worth a retry).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs, unquote

import msgspec
import trio

from .. import __version__
from ..errors import DECODE_ERRORS, GatewayError
from ..http.types import Request, Responder
from ..pipeline.request import PassThroughRequest, Rewrite
from ..routing.responses import IdReader, ResponseAffinity, Stored
from ..transport.pool import UpstreamError
from ..workers.worker import Worker, WorkerState
from . import multipart
from .keys import UsageMeter
from .openai import send_error

if TYPE_CHECKING:
    from ..gateway import Gateway
    from .app import App
    from .openai import OpenAIAPI

_now = time.perf_counter
_JSON = [(b"content-type", b"application/json")]
RESPONSES = "/v1/responses"
#: the prefix of a stored response's routes (``/v1/responses/{id}`` and ``.../cancel``)
RESPONSE_PREFIX = RESPONSES + "/"


class Route(NamedTuple):
    """One pass-through path: its ``endpoint`` metrics label, whether the model is named in a
    multipart form (else the JSON body), whether the answer may stream (SSE when the request
    sets ``stream``), and whether it is the Responses API (ids recorded, follow-ups pinned)."""

    name: str
    form: bool = False
    streams: bool = False
    responses: bool = False


#: path -> route; the worker is asked on the same path
ROUTES: dict[str, Route] = {
    "/v1/embeddings": Route("embeddings"),
    "/v2/embed": Route("embed"),
    "/pooling": Route("pooling"),
    "/classify": Route("classify"),
    "/score": Route("score"),
    "/v1/score": Route("score"),
    "/rerank": Route("rerank"),
    "/v1/rerank": Route("rerank"),
    "/v2/rerank": Route("rerank"),
    "/v1/messages": Route("messages", streams=True),
    "/v1/messages/count_tokens": Route("count_tokens"),
    "/v1/chat/completions/batch": Route("chat_batch"),
    "/v1/audio/transcriptions": Route("transcriptions", form=True, streams=True),
    "/v1/audio/translations": Route("translations", form=True, streams=True),
    RESPONSES: Route("responses", streams=True, responses=True),
}
_RETRIEVE = Route("responses_retrieve", streams=True)
_CANCEL = Route("responses_cancel")
_FORM_FIELDS = frozenset({"model", "stream"})
_TRUE = frozenset({"true", "1", "yes", "on"})


class _View(msgspec.Struct):
    """The fields of a pass-through body the gateway needs (the rest is the engine's)."""

    model: str | None = None
    stream: bool | None = False
    user: str | None = None
    previous_response_id: str | None = None
    priority: int | None = None  # vLLM's (lower runs first): the admission queue's order too


_decode_view = msgspec.json.Decoder(_View).decode


class _Asked(NamedTuple):
    """What a request asks for: the model name it sent, whether it streams, the stored
    response it continues or reads (None: none), and the view (routing keys)."""

    model: str | None
    stream: bool
    response_id: str | None
    view: _View


class PassThroughAPI:
    """The routes of :data:`ROUTES`, the stored-response routes and ``GET /version``."""

    def __init__(self, gateway: Gateway, api: OpenAIAPI) -> None:
        self.gw = gateway
        self.api = api
        routing = gateway.config.routing
        #: response id -> the worker that stored it (shared with other replicas when on)
        self.affinity = ResponseAffinity(
            routing.response_affinity_entries, routing.response_affinity_ttl_s
        )
        self._versions: tuple[float, dict[str, str | None]] | None = None
        register_metrics(gateway.metrics, self.affinity)

    def install(self, app: App) -> None:
        for path, route in ROUTES.items():
            app.route(path, {"POST": partial(self.relay, route=route)})
        app.route("/version", {"GET": self.version})
        app.route_prefix(RESPONSE_PREFIX, self.stored_response)

    # -- the shared request path ---------------------------------------------------------------
    async def relay(self, req: Request, responder: Responder, *, route: Route) -> None:
        """A pass-through request: the route's model, then the pipeline on merged workers."""
        await self._serve(req, responder, route, None)

    async def stored_response(self, req: Request, responder: Responder) -> None:
        """``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel``: on the worker
        that stored the response."""
        rest = req.path[len(RESPONSE_PREFIX) :]
        rid, _, action = rest.partition("/")
        if not rid or action not in ("", "cancel"):
            await send_error(responder, GatewayError(404, f"no route for {req.method} {req.path}"))
            return
        want = "GET" if action == "" else "POST"
        if req.method != want:
            await responder.send_full(
                405,
                [*_JSON, (b"allow", want.encode())],
                GatewayError(
                    405, f"method {req.method} not allowed on {req.path}; use {want}"
                ).body(),
            )
            return
        await self._serve(req, responder, _RETRIEVE if want == "GET" else _CANCEL, unquote(rid))

    async def _serve(
        self, req: Request, responder: Responder, route: Route, stored_id: str | None
    ) -> None:
        """Everything a model-routed request gets (see the module); ``stored_id`` names the
        stored response a follow-up reads or cancels (None: a new request)."""
        api = self.api
        t0 = _now()
        rid, forward = api._identify(req)
        req.request_id = rid
        endpoint = route.name
        model = "-"
        status = 200
        trace = None if api.tracing is None else api.tracing.request(req, endpoint, rid)
        meter = None
        try:
            key = req.principal
            owner = key.name if key is not None else None
            stored: Stored | None = None
            order: tuple[str, ...] | None = None  # a model route's models, in order
            routes = self.gw.model_routes
            if stored_id is None:
                asked = self._read(req, route)
                mroute = routes.get(asked.model) if routes else None
                if mroute is not None and asked.response_id is None:
                    order = routes.order(mroute, api._split_key(req, asked.view, mroute))
                    model = mroute.name
                else:
                    model = api._resolve_model(asked.model)
                    if asked.response_id is not None:  # continues a stored response
                        stored = self._stored(asked.response_id, owner, model)
                        if stored is not None and mroute is not None:
                            model = stored.model  # a route's follow-up: the stored one's
            else:
                stream = parse_qs(req.query).get("stream", [""])[-1].lower() in _TRUE
                asked = _Asked(None, stream, stored_id, _View())
                stored = self._stored(stored_id, owner, None)
                assert stored is not None  # follow-ups need the record
                model = stored.model
            if key is not None:  # API keys: the model allow-list (403), the usage meter
                self.gw.keys.check_model(key, model, asked.model)
                priority = asked.view.priority
                if priority is not None and key.min_priority is not None:
                    self.gw.keys.check_priority(key, priority)
                if key.tpm:
                    responder = meter = UsageMeter(responder)
            if order is None:
                await self._attempt(req, responder, route, asked, model, stored, stored_id,
                                    rid, forward, t0, trace, owner)  # fmt: skip
            else:  # a model route: its models in order while they cannot serve it
                assert mroute is not None
                served = [model]

                async def attempt(target: str) -> None:
                    await self._attempt(req, responder, route, asked, target, None, None,
                                        rid, forward, t0, trace, owner)  # fmt: skip

                try:
                    await api.try_in_order(mroute, order, responder, served, attempt, rid)
                finally:
                    model = served[0]
        except GatewayError as exc:
            status = await api.answer_error(exc, responder, rid, model, endpoint)
        except (trio.Cancelled, trio.BrokenResourceError, trio.ClosedResourceError):
            status = api.abandoned(req, rid, model, endpoint)
            raise
        finally:
            api.account(req, endpoint, model, status, t0, trace, meter)

    async def _attempt(
        self,
        req: Request,
        responder: Responder,
        route: Route,
        asked: Any,
        model: str,
        stored: Stored | None,
        stored_id: str | None,
        rid: str,
        forward: list[tuple[bytes, bytes]],
        t0: float,
        trace: Any,
        owner: str | None,
    ) -> None:
        """Relay the request to a worker of ``model`` (the stored response's for follow-ups):
        the body as sent, but naming ``model`` when the client named an alias or a route."""
        api = self.api
        endpoint = route.name
        body = req.body
        if asked.model is not None and model != asked.model:
            body = self._renamed(req, route, model)  # workers know the canonical name
        pinned = None
        if stored is not None:
            pinned = self._worker_of(asked.response_id or "", stored, stored_id is None)
        else:
            self._check_merged(model, req.path)
        if route.form:  # the worker reads the form by its boundary
            forward[0] = (b"content-type", req.header(b"content-type") or b"")
        path = f"{req.path}?{req.query}" if req.query else req.path
        greq = PassThroughRequest(
            endpoint, path, model, asked.stream, body, rid, forward, t0,
            tap=self._recorder(model, owner) if route.responses else None,
        )  # fmt: skip
        greq.trace = trace
        if self.gw.pipeline.route_keys and pinned is None:
            greq.route = api._route_context(req, greq, asked.view, None)
        await api.admit(req, asked.view)  # its priority, key (tenant), cost
        try:
            if pinned is None:
                await self.gw.pipeline.run(greq, responder)
            else:
                await self.gw.pipeline.run_pinned(greq, responder, pinned, req.method)
        finally:
            api.admission.leave(t0)

    # -- reading the request ---------------------------------------------------------------------
    def _read(self, req: Request, route: Route) -> _Asked:
        """The model, stream flag and stored response a request names; a 400 when the body is
        not what the route takes."""
        body = req.body
        if not body:
            raise GatewayError(400, "request body is empty")
        if route.form:
            try:
                fields = multipart.form_fields(body, req.header(b"content-type"), _FORM_FIELDS)
            except multipart.FormError as exc:
                raise GatewayError(400, f"invalid form: {exc}") from None
            model = fields["model"].value if "model" in fields else None
            stream = "stream" in fields and fields["stream"].value.strip().lower() in _TRUE
            return _Asked(model, stream, None, _View(model=model))
        self.api.request_limits.check_body(body)  # limits.max_json_depth
        try:
            view = _decode_view(body)
        except msgspec.ValidationError as exc:
            raise GatewayError(400, f"invalid request: {exc}") from None
        except DECODE_ERRORS as exc:
            raise GatewayError(400, f"request body is not valid JSON: {exc}") from None
        stream = bool(view.stream) and route.streams
        previous = view.previous_response_id if route.responses else None
        return _Asked(view.model, stream, previous or None, view)

    def _renamed(self, req: Request, route: Route, model: str) -> bytes:
        """The body naming the canonical ``model`` instead of the alias the client sent."""
        if route.form:
            fields = multipart.form_fields(req.body, req.header(b"content-type"), _FORM_FIELDS)
            return multipart.replace_value(req.body, fields["model"], model)
        obj = msgspec.json.decode(req.body)
        obj["model"] = model
        return msgspec.json.encode(obj)

    def _check_merged(self, model: str, path: str) -> None:
        """A 400 unless ``model`` has merged workers (this path is not generation)."""
        gw = self.gw
        if gw.pipeline.native.handles(model):
            raise GatewayError(
                400,
                f"{path} is not available for model {model!r}: its workers speak lmgw's native"
                " protocol, which carries generation only",
                param="model",
            )
        flow = gw.flow_of(model)
        if flow != "pd" and not any(w.role == "pd" and w.serves(model) for w in gw.registry):
            raise GatewayError(
                400,
                f"{path} is not available for model {model!r}: its flow is {flow!r}"
                " (disaggregated) and it has no merged (pd) worker to serve it",
                param="model",
            )

    # -- the Responses API's affinity ------------------------------------------------------------
    def _stored(self, response_id: str, owner: str | None, model: str | None) -> Stored | None:
        """Where ``response_id`` lives. Unknown (or another key's): a 404, except that a new
        request whose model has exactly one merged worker goes there anyway (the only worker
        that can hold it, e.g. after the gateway restarted): then None."""
        stored = self.affinity.lookup(response_id)
        if stored is not None and stored.owner == owner:
            self.affinity.counts["hit"] += 1
            return stored
        self.affinity.counts["unknown"] += 1
        if (
            stored is None
            and model is not None
            and len(self.gw.registry.candidates(model, "pd")) == 1
        ):
            return None
        raise GatewayError(
            404,
            f"Response with id '{response_id}' not found: the gateway has no record of the"
            " worker that stored it (an unknown id, one older than"
            f" routing.response_affinity_ttl_s = {self.affinity.ttl_s:g} s, or one created"
            " through another gateway replica without [replicas])",
            param="previous_response_id" if model is not None else None,
        )

    def _worker_of(self, response_id: str, stored: Stored, new: bool) -> Worker:
        """The worker that stored a response, if it can be asked: a new generation needs it
        healthy; reads and cancels also reach it while it drains."""
        worker = self.gw.registry.get(stored.worker_id)
        param = "previous_response_id" if new else None
        if worker is None:
            self.affinity.counts["gone"] += 1
            raise GatewayError(
                404,
                f"Response with id '{response_id}' is gone: worker {stored.worker_id}, which"
                " stored it in its memory, has left the fleet",
                param=param,
            )
        state = worker.state
        if state is WorkerState.HEALTHY or (state is WorkerState.DRAINING and not new):
            return worker
        self.affinity.counts["gone"] += 1
        if state is WorkerState.DRAINING:
            raise GatewayError(
                409,
                f"Response with id '{response_id}' lives on worker {worker.id}, which is"
                " draining and takes no new requests: start a new conversation (without"
                " previous_response_id)",
                param=param,
            )
        raise GatewayError(
            503,
            f"Response with id '{response_id}' lives on worker {worker.id}, which is"
            f" {state.value} right now ({worker.last_error or 'no reason given'}): retry later",
            param=param,
        )

    def _recorder(self, model: str, owner: str | None) -> Callable[[Worker], Rewrite]:
        """The tap that records the id of the response the chosen worker answers with."""
        record = self.affinity.record

        def bind(worker: Worker) -> Rewrite:
            reader = IdReader(lambda rid: record(rid, worker.id, model, owner))
            return Rewrite(reader.body, reader.events)

        return bind

    # -- GET /version ----------------------------------------------------------------------------
    async def version(self, req: Request, responder: Responder) -> None:
        """The gateway's version, and each HTTP worker's ``/version`` (null when it does not
        answer within a second), asked at most every 10 s."""
        now = time.monotonic()
        cached = self._versions
        if cached is None or now - cached[0] > 10.0:
            cached = self._versions = (now, await self._worker_versions())
        body = {"version": __version__, "server": "lmgw", "workers": cached[1]}
        await responder.send_full(200, _JSON, msgspec.json.encode(body))

    async def _worker_versions(self) -> dict[str, str | None]:
        from ..pipeline.native import NativeWorker

        workers = [
            w
            for w in self.gw.registry
            if not isinstance(w, NativeWorker) and w.state is not WorkerState.GONE
        ]
        out: dict[str, str | None] = dict.fromkeys(sorted(w.id for w in workers))

        async def ask(worker: Worker) -> None:
            with trio.move_on_after(1.0):
                try:
                    resp = await self.gw.pool.request(
                        worker.origin, "GET", "/version", [], response_timeout_s=1.0
                    )
                    try:
                        body = await resp.read_all(4096) if resp.status == 200 else b""
                    finally:
                        resp.release()
                    version = msgspec.json.decode(body).get("version") if body else None
                    out[worker.id] = version if isinstance(version, str) else None
                except (
                    UpstreamError,
                    msgspec.DecodeError,
                    AttributeError,
                    UnicodeDecodeError,
                    RecursionError,
                ):
                    pass

        async with trio.open_nursery() as nursery:
            for worker in workers:
                nursery.start_soon(ask, worker)
        return out


def register_metrics(metrics: Any, affinity: ResponseAffinity) -> None:
    """The Responses API affinity metrics (every gateway exports them)."""
    from ..metrics import Counter, Gauge

    def size() -> list[tuple[tuple[str, ...], float]]:
        return [((), float(len(affinity)))]

    def outcomes() -> list[tuple[tuple[str, ...], float]]:
        return [((k,), float(v)) for k, v in sorted(affinity.counts.items())]

    metrics.add(
        Gauge(
            "lmgw_response_affinity_entries",
            "Responses API ids whose storing worker the gateway remembers"
            " (routing.response_affinity_entries at most).",
            collect=size,
        )
    )
    metrics.add(
        Counter(
            "lmgw_response_affinity_total",
            "Responses API affinity events: recorded (a new response id), hit (a follow-up"
            " routed to its worker), unknown (no record), gone (its worker left or is out of"
            " rotation).",
            ("outcome",),
            collect=outcomes,
        )
    )
