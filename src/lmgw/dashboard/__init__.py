"""``GET /dashboard``: a live page of the gateway (workers, rates, latencies, routing, caches,
errors), fed over a WebSocket.

Routes (see docs/observability.md, "Dashboard"):

* ``GET /dashboard``: the page (``static/index.html``; its script and style under
  ``/dashboard/static/``, shipped in the package: no CDN).
* ``GET /dashboard/ws``: the WebSocket; a snapshot (JSON) at once and then every
  ``dashboard.interval_s``.
* ``GET /dashboard/snapshot``: one snapshot as JSON (scripts, curl).

With ``admin.token`` set, every route needs it: ``Authorization: Bearer``, or for a browser
``/dashboard?token=...`` once, which sets an HttpOnly, SameSite=Strict cookie scoped to
``/dashboard`` and redirects to the bare URL (the token leaves the address bar and history).
Without a token the dashboard is open, like ``/metrics``; ``dashboard.enabled = false`` turns
it off.
"""

from __future__ import annotations

import hashlib
import hmac
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from ..errors import GatewayError, error_body
from ..http.types import Request, Responder
from .feed import Feed

if TYPE_CHECKING:
    from ..gateway import Gateway
    from ..http.websocket import WebSocketUpgrade

__all__ = ["COOKIE", "Dashboard"]

COOKIE = "lmgw_dashboard"
PREFIX = "/dashboard"
_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}
_CSP = (
    b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:;"
    b" style-src 'self'; script-src 'self'; frame-ancestors 'none'"
)
_JSON = (b"content-type", b"application/json")


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def load_assets() -> dict[str, tuple[bytes, bytes]]:
    """name -> (content type, bytes) of every file in ``static/`` (read once, at start)."""
    out = {}
    for entry in resources.files(__package__).joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            out[entry.name] = (_TYPES[suffix], entry.read_bytes())
    return out


class Dashboard:
    """The page, its assets, the snapshot endpoint and the WebSocket feed."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.feed = Feed(gateway, gateway.config.dashboard)
        token = gateway.config.admin.token
        self._token = _digest(token.encode()) if token else None
        self.assets = load_assets()

    def install(self, app) -> None:  # app: lmgw.api.app.App
        app.route(PREFIX, {"GET": self.page})
        app.route(PREFIX + "/", {"GET": self.page})
        app.route(PREFIX + "/snapshot", {"GET": self.snapshot})
        app.route(PREFIX + "/ws", {"GET": self.ws_over_plain_http})
        for name in self.assets:
            app.route(f"{PREFIX}/static/{name}", {"GET": self.asset})
        app.upgrades[PREFIX + "/ws"] = self.ws

    # -- auth ---------------------------------------------------------------------------------
    def _presented(self, req: Request) -> tuple[bytes | None, bool]:
        """The token the client presented, and whether it came in the query string."""
        header = req.header(b"authorization")
        if header:
            scheme, _, credentials = header.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return credentials.strip(), False
        if req.query:
            for key, value in parse_qsl(req.query):
                if key == "token":
                    return value.encode(), True
        for raw in (v for k, v in req.headers if k == b"cookie"):
            for part in raw.split(b";"):
                name, _, value = part.strip().partition(b"=")
                if name == COOKIE.encode():
                    return value, False
        return None, False

    def _authorized(self, req: Request) -> tuple[bool, bool]:
        """(allowed, token came in the query string)."""
        if self._token is None:
            return True, False
        presented, in_query = self._presented(req)
        if presented is None:
            return False, False
        return hmac.compare_digest(_digest(presented), self._token), in_query

    async def _deny(self, responder: Responder) -> None:
        await responder.send_full(
            401,
            [_JSON, (b"www-authenticate", b"Bearer")],
            error_body(
                401,
                "the dashboard needs the admin token: open /dashboard?token=<admin.token> once"
                " (a cookie keeps it), or send Authorization: Bearer <admin.token>",
            ),
        )

    # -- HTTP routes --------------------------------------------------------------------------
    async def page(self, req: Request, responder: Responder) -> None:
        ok, in_query = self._authorized(req)
        if not ok:
            await self._deny(responder)
            return
        if in_query:  # keep it in a cookie and take it out of the address bar
            _presented, _ = self._presented(req)
            cookie = (
                COOKIE.encode() + b"=" + (_presented or b"") + b"; Path=" + PREFIX.encode()
                + b"; HttpOnly; SameSite=Strict"
            )  # fmt: skip
            await responder.send_full(
                303, [(b"location", PREFIX.encode()), (b"set-cookie", cookie)], b""
            )
            return
        ctype, body = self.assets["index.html"]
        await responder.send_full(
            200,
            [
                (b"content-type", ctype),
                (b"content-security-policy", _CSP),
                (b"cache-control", b"no-store"),
                (b"x-content-type-options", b"nosniff"),
            ],
            body,
        )

    async def asset(self, req: Request, responder: Responder) -> None:
        if not self._authorized(req)[0]:
            await self._deny(responder)
            return
        name = req.path.rpartition("/")[2]
        ctype, body = self.assets[name]
        await responder.send_full(
            200,
            [(b"content-type", ctype), (b"cache-control", b"no-cache"),
             (b"x-content-type-options", b"nosniff")],
            body,
        )  # fmt: skip

    async def snapshot(self, req: Request, responder: Responder) -> None:
        if not self._authorized(req)[0]:
            await self._deny(responder)
            return
        await responder.send_full(
            200, [_JSON, (b"cache-control", b"no-store")], self.feed.snapshot_text().encode()
        )

    async def ws_over_plain_http(self, req: Request, responder: Responder) -> None:
        await responder.send_full(
            426,
            [_JSON, (b"upgrade", b"websocket")],
            GatewayError(426, "this is a WebSocket endpoint (Upgrade: websocket)").body(),
        )

    # -- the WebSocket ------------------------------------------------------------------------
    async def ws(self, req: Request, upgrade: WebSocketUpgrade) -> None:
        from ..http.websocket import same_origin

        problem = upgrade.problem()
        if problem is not None:
            await upgrade.reject(400, [_JSON], error_body(400, problem))
            return
        if not same_origin(req):
            await upgrade.reject(403, [_JSON], error_body(403, "cross-origin WebSocket refused"))
            return
        if not self._authorized(req)[0]:
            await upgrade.reject(
                401, [_JSON], error_body(401, "the dashboard feed needs the admin token")
            )
            return
        ws = await upgrade.accept()
        await self.feed.serve(ws)
