"""The model routes' admin API and metrics (``lmgw.model_routes``).

Routes, under the admin token (as ``/admin/workers``: moving traffic between models is an
operator's act):

* ``GET /admin/model_routes``: every route, with its targets' weights and shares, fallbacks,
  split and the requests each target was given since the route was last set.
* ``GET /admin/model_routes/{name}``: one route.
* ``PUT /admin/model_routes/{name}``: ``{"targets": [{"model", "weight"}], "fallbacks"?,
  "split"?}`` adds or replaces it, at once (the next request is split the new way): a canary's
  weight moved without a restart. Not written back to the config file; each gateway replica
  is set on its own.
* ``DELETE /admin/model_routes/{name}``: the name stops being a route (a served model of that
  name is reached directly again).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import msgspec

from ..config import ConfigError, ModelRouteConfig, RouteTargetConfig
from ..errors import DECODE_ERRORS, GatewayError
from ..http.types import Request, Responder
from ..metrics import Counter, Metrics
from ..model_routes import ModelRoute, ModelRoutes, Target
from .admin import AdminAPI
from .limits import check_json_depth

PREFIX = "/admin/model_routes"


class _RouteBody(msgspec.Struct, forbid_unknown_fields=True):
    targets: list[RouteTargetConfig]
    fallbacks: list[str] = []
    split: str = "request"
    mirror: str | None = None
    mirror_share: float = 1.0
    model: str | None = None  # when given, the name in the path


def route_from_config(cfg: ModelRouteConfig) -> ModelRoute:
    return ModelRoute(
        cfg.model,
        [Target(t.model, t.weight) for t in cfg.targets],
        cfg.fallbacks,
        cfg.split,
        cfg.mirror,
        cfg.mirror_share,
    )


def register_route_metrics(metrics: Metrics, routes: ModelRoutes) -> None:
    """Counters read from ``routes`` at scrape time (nothing added per request)."""
    metrics.add(
        Counter(
            "lmgw_model_route_requests_total",
            "Requests sent to a model route, by the target the split gave each first.",
            ("route", "target"),
            collect=lambda: sorted(routes.chosen.items()),
        )
    )
    metrics.add(
        Counter(
            "lmgw_model_route_fallbacks_total",
            "Requests of a model route that fell back from a model that could not serve them"
            " (from) to the next (to).",
            ("route", "from", "to"),
            collect=lambda: sorted(routes.fallen.items()),
        )
    )


class ModelRoutesAPI:
    """Handlers of the routes above; authorization and answers as the admin API's."""

    def __init__(self, gateway: Any, admin: AdminAPI) -> None:
        self.gw = gateway
        self.admin = admin

    def install(self, app: Any) -> None:
        app.route(PREFIX, {"GET": self.collection})
        app.route_prefix(PREFIX + "/", self.item)

    async def collection(self, req: Request, responder: Responder) -> None:
        try:
            self.admin.authorize(req)
        except GatewayError as exc:
            await self.admin.fail(responder, exc)
            return
        data = [route.describe() for route in self.gw.model_routes]
        await self.admin.answer(req, responder, 200, {"object": "list", "data": data})

    async def item(self, req: Request, responder: Responder) -> None:
        """``/admin/model_routes/{name}``: GET one, PUT sets, DELETE removes."""
        if req.method not in ("GET", "HEAD", "PUT", "DELETE"):
            await self.admin.not_allowed(req, responder, ("DELETE", "GET", "HEAD", "PUT"))
            return
        try:
            self.admin.authorize(req)
            name = unquote(req.path[len(PREFIX) + 1 :])
            status, payload = self._apply(req, name)
        except GatewayError as exc:
            await self.admin.fail(responder, exc)
            return
        await self.admin.answer(req, responder, status, payload)

    def _apply(self, req: Request, name: str) -> tuple[int, dict[str, Any]]:
        routes = self.gw.model_routes
        if req.method == "PUT":
            try:
                route, replaced = self.gw.set_model_route(self._decode(req, name))
            except ValueError as exc:
                raise GatewayError(400, str(exc)) from None
            return (200 if replaced else 201), route.describe()
        if req.method == "DELETE":
            if not routes.remove(name):
                raise GatewayError(404, f"no model route `{name}`", param="model")
            return 200, {"model": name, "deleted": True}
        route = routes.get(name)
        if route is None:
            raise GatewayError(404, f"no model route `{name}`", param="model")
        return 200, route.describe()

    def _decode(self, req: Request, name: str) -> ModelRouteConfig:
        check_json_depth(req.body, self.gw.config.limits.max_json_depth)
        try:
            body = msgspec.json.decode(req.body or b"{}", type=_RouteBody)
        except DECODE_ERRORS as exc:
            raise GatewayError(400, f"invalid request body: {exc}") from None
        if body.model is not None and body.model != name:
            raise GatewayError(
                400, f"the body names route `{body.model}`, the path `{name}`", param="model"
            )
        try:
            cfg = ModelRouteConfig(
                model=name, targets=body.targets, fallbacks=body.fallbacks,
                split=body.split,  # type: ignore[arg-type]
                mirror=body.mirror, mirror_share=body.mirror_share,
            )  # fmt: skip
        except ConfigError as exc:
            raise GatewayError(400, f"invalid model route: {exc.reason}") from None
        return cfg
