"""The request router: path and method to handler, with OpenAI-shaped 404 and 405 answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from ..admission import Admission
from ..errors import GatewayError
from ..http.types import Request, Responder
from .admin import PREFIX as ADMIN_WORKERS
from .admin import AdminAPI
from .lora import LoraAPI
from .model_routes import ModelRoutesAPI
from .openai import OpenAIAPI, send_error
from .openapi import openapi_json
from .ops import OpsAPI
from .passthru import PassThroughAPI

Endpoint = Callable[[Request, Responder], Awaitable[None]]
#: ``async def middleware(request, responder, call_next)``: runs around the generation endpoints
#: (chat, completions, /generate); ``await call_next(request, responder)`` runs the rest of the
#: chain. It may edit the request, answer itself, or pass a wrapping responder to see or change
#: the answer (streams are pushed through the responder, so there is no response to return).
Middleware = Callable[[Request, Responder, Endpoint], Awaitable[None]]

#: the generation routes that middleware wraps: path -> endpoint name of OpenAIAPI.generate
GENERATE_ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/generate": "generate",
}


class _Link:
    """One middleware bound to the rest of its chain (a callable, not a closure: no frame of
    ours between the server and the middleware)."""

    __slots__ = ("middleware", "rest")

    def __init__(self, middleware: Middleware, rest: Endpoint) -> None:
        self.middleware = middleware
        self.rest = rest

    def __call__(self, req: Request, responder: Responder) -> Awaitable[None]:
        return self.middleware(req, responder, self.rest)


def with_middleware(handler: Endpoint, middleware: Sequence[Middleware]) -> Endpoint:
    """``handler`` wrapped in ``middleware`` (the first one is the outermost)."""
    for mw in reversed(middleware):
        handler = _Link(mw, handler)
    return handler


class App:
    """The handler both servers run. Exact-path routes in a dict: one lookup per request."""

    def __init__(self, gateway) -> None:
        self.openai = OpenAIAPI(gateway)
        self.ops = OpsAPI(gateway)
        self.admin = AdminAPI(gateway)
        self.lora = LoraAPI(gateway, self.admin)
        self.model_routes = ModelRoutesAPI(gateway, self.admin)
        limits = gateway.config.limits
        #: limits.max_concurrent_requests and its queue (lmgw.admission)
        self.admission = self.openai.admission = Admission(
            limits.max_concurrent_requests,
            limits.queue_size,
            limits.queue_timeout_s,
            gateway.metrics,
            policy=limits.queue_policy,
            aging_s=limits.priority_aging_s,
            cost=limits.fair_share_cost,
            tenant_header=limits.tenant_header,
        )
        #: see :data:`Middleware`; add with :meth:`add_middleware` (none: nothing wraps, the
        #: routes call the partials below directly, so an empty list costs nothing)
        self.middleware: list[Middleware] = []
        # partials, not the chat()/completions() wrappers: one coroutine frame fewer.
        # /generate is SGLang's native API (sgl-router serves it too): same relay.
        self._generate: dict[str, Endpoint] = {
            path: partial(self.openai.generate, endpoint=endpoint, path=path)
            for path, endpoint in GENERATE_ROUTES.items()
        }
        self.routes: dict[str, dict[str, Endpoint]] = {
            **{path: {"POST": handler} for path, handler in self._generate.items()},
            "/v1/models": {"GET": self.openai.models},
            "/health": {"GET": self.ops.health},
            "/metrics": {"GET": self.ops.metrics},
            "/openapi.json": {"GET": openapi_json},
            # /admin/workers/{id}[/drain|/undrain] are matched by prefix in __call__
            ADMIN_WORKERS: {"GET": self.admin.workers, "POST": self.admin.workers},
            "/admin/planner": {"GET": self.admin.planner},
        }
        #: (prefix, handler): paths under a prefix with an id in them, matched in order only
        #: when no exact route matches (see :meth:`route_prefix`)
        self.prefixes: list[tuple[str, Endpoint]] = []
        #: embeddings, pooling, rerank, Anthropic messages, the Responses API, /version, ...
        #: relayed to merged workers (api/passthru.py)
        self.passthru = PassThroughAPI(gateway, self.openai)
        self.passthru.install(self)
        self.lora.install(self)  # /admin/lora_adapters, vLLM's /v1/(un)load_lora_adapter
        self.model_routes.install(self)  # /admin/model_routes
        streams = getattr(gateway, "streams", None)
        if streams is not None:  # resumable answers: the outermost middleware (lmgw.streams)
            from ..streams import PREFIX

            self.add_middleware(streams.middleware)
            self.route_prefix(PREFIX, streams.endpoint)
        #: path -> ``async def hook(request, lmgw.http.websocket.WebSocketUpgrade)``: requests
        #: that ask for a WebSocket (both servers call :meth:`upgrade`)
        self.upgrades: dict[str, Callable[[Request, Any], Awaitable[None]]] = {}

    async def upgrade(self, req: Request, upgrade: Any) -> None:
        """A request asking for a WebSocket (see :attr:`upgrades`); 404 for other paths."""
        hook = self.upgrades.get(req.path)
        if hook is None:
            await upgrade.reject(
                404,
                [(b"content-type", b"application/json")],
                GatewayError(404, f"no WebSocket at {req.path}").body(),
            )
            return
        await hook(req, upgrade)

    async def on_timeout(self, req: Request, responder: Responder) -> None:
        """The server's deadline hook (see :data:`lmgw.http.types.TimeoutHandler`)."""
        await self.openai.on_timeout(req, responder)

    def route(self, path: str, methods: dict[str, Endpoint]) -> None:
        """Add or extend a route (used by later API modules and SDK extensions)."""
        self.routes.setdefault(path, {}).update(methods)

    def route_prefix(self, prefix: str, handler: Endpoint) -> None:
        """Route every path under ``prefix`` (any method) to ``handler``, which parses the
        rest of the path and answers 404/405 itself."""
        self.prefixes.append((prefix, handler))

    def add_middleware(self, middleware: Middleware) -> None:
        """Wrap the generation routes in ``middleware`` too (innermost so far: added last, runs
        last). The chains are built here, once, not looked up per request."""
        self.middleware.append(middleware)
        for path, handler in self._generate.items():
            self.routes[path]["POST"] = with_middleware(handler, self.middleware)

    def generate_handler(self, path: str) -> Endpoint:
        """The handler of a generation route, middleware included (the SDK's in-process path)."""
        return self.routes[path]["POST"]

    async def __call__(self, req: Request, responder: Responder) -> None:
        methods = self.routes.get(req.path)
        if methods is None:
            if req.path.startswith("/v1/models/") and req.method in ("GET", "HEAD"):
                await self.openai.model(req, responder, req.path[len("/v1/models/") :])
                return
            if req.path.startswith(ADMIN_WORKERS + "/"):
                await self.admin.worker(req, responder)
                return
            for prefix, handler in self.prefixes:
                if req.path.startswith(prefix):
                    await handler(req, responder)
                    return
            await send_error(responder, GatewayError(404, f"no route for {req.method} {req.path}"))
            return
        handler = methods.get(req.method) or (methods.get("GET") if req.method == "HEAD" else None)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            await responder.send_full(
                405,
                [(b"content-type", b"application/json"), (b"allow", allowed.encode())],
                GatewayError(
                    405, f"method {req.method} not allowed on {req.path}; use {allowed}"
                ).body(),
            )
            return
        await handler(req, responder)
