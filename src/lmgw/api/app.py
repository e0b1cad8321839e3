"""The request router: path and method to handler, with OpenAI-shaped 404 and 405 answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from ..admission import Admission
from ..errors import GatewayError
from ..http.types import Request, Responder
from .admin import PREFIX as ADMIN_WORKERS
from .admin import AdminAPI
from .openai import OpenAIAPI, send_error
from .ops import OpsAPI

Endpoint = Callable[[Request, Responder], Awaitable[None]]


class App:
    """The handler both servers run. Exact-path routes in a dict: one lookup per request."""

    def __init__(self, gateway) -> None:
        self.openai = OpenAIAPI(gateway)
        self.ops = OpsAPI(gateway)
        self.admin = AdminAPI(gateway)
        limits = gateway.config.limits
        #: limits.max_concurrent_requests and its queue (lmgw.admission)
        self.admission = self.openai.admission = Admission(
            limits.max_concurrent_requests,
            limits.queue_size,
            limits.queue_timeout_s,
            gateway.metrics,
        )
        self.routes: dict[str, dict[str, Endpoint]] = {
            # partials, not the chat()/completions() wrappers: one coroutine frame fewer
            "/v1/chat/completions": {
                "POST": partial(self.openai.generate, endpoint="chat", path="/v1/chat/completions")
            },
            "/v1/completions": {
                "POST": partial(
                    self.openai.generate, endpoint="completions", path="/v1/completions"
                )
            },
            # SGLang's native API (sgl-router serves it too): same relay, SGLang body shape
            "/generate": {
                "POST": partial(self.openai.generate, endpoint="generate", path="/generate")
            },
            "/v1/models": {"GET": self.openai.models},
            "/health": {"GET": self.ops.health},
            "/metrics": {"GET": self.ops.metrics},
            # /admin/workers/{id}[/drain|/undrain] are matched by prefix in __call__
            ADMIN_WORKERS: {"GET": self.admin.workers, "POST": self.admin.workers},
        }

    async def on_timeout(self, req: Request, responder: Responder) -> None:
        """The server's deadline hook (see :data:`lmgw.http.types.TimeoutHandler`)."""
        await self.openai.on_timeout(req, responder)

    def route(self, path: str, methods: dict[str, Endpoint]) -> None:
        """Add or extend a route (used by later API modules and SDK extensions)."""
        self.routes.setdefault(path, {}).update(methods)

    async def __call__(self, req: Request, responder: Responder) -> None:
        methods = self.routes.get(req.path)
        if methods is None:
            if req.path.startswith("/v1/models/") and req.method in ("GET", "HEAD"):
                await self.openai.model(req, responder, req.path[len("/v1/models/") :])
                return
            if req.path.startswith(ADMIN_WORKERS + "/"):
                await self.admin.worker(req, responder)
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
