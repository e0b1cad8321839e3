"""CORS (``server.cors_allow_origins``): browser pages on other origins may call the API.

Off by default, and then nothing here runs. On, a request that carries an ``Origin`` the config
allows gets ``Access-Control-Allow-Origin`` on its answer (whatever answers it: the API, an
error, a stream), and a preflight (``OPTIONS`` with ``Access-Control-Request-Method``) is
answered here with 204. Credentials are never allowed: the API authenticates with bearer keys,
which a page sends explicitly, not with cookies.
"""

from __future__ import annotations

from typing import Any

from ..config import ServerConfig
from ..http.types import Headers, Request, Responder

#: response headers a page may read (request id, stage timings, back-off hints, routing)
_EXPOSED = b"x-request-id, server-timing, retry-after, x-lmgw-route, x-lmgw-stream-id"


class Cors:
    """The allowed origins and the headers that say so (built once from the config)."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.any = "*" in cfg.cors_allow_origins
        self.origins = frozenset(o.encode() for o in cfg.cors_allow_origins)
        self.preflight_extra: Headers = [
            (b"access-control-allow-methods", ", ".join(cfg.cors_allow_methods).encode()),
            (b"access-control-allow-headers", ", ".join(cfg.cors_allow_headers).encode()),
            (b"access-control-max-age", str(cfg.cors_max_age_s).encode()),
        ]

    def allow(self, req: Request) -> bytes | None:
        """The ``Access-Control-Allow-Origin`` value for ``req``, or None (no Origin, or one
        not allowed: the browser then keeps the answer from the page)."""
        origin = None
        for k, v in req.headers:
            if k == b"origin":
                origin = v
                break
        if origin is None:
            return None
        if self.any:
            return b"*"
        return origin if origin in self.origins else None

    def headers(self, allowed: bytes) -> Headers:
        out = [
            (b"access-control-allow-origin", allowed),
            (b"access-control-expose-headers", _EXPOSED),
        ]
        if allowed != b"*":
            out.append((b"vary", b"origin"))  # caches must not serve it to another origin
        return out

    @staticmethod
    def is_preflight(req: Request) -> bool:
        return req.method == "OPTIONS" and any(
            k == b"access-control-request-method" for k, _ in req.headers
        )

    async def preflight(self, req: Request, responder: Responder, allowed: bytes) -> None:
        await responder.send_full(204, [*self.headers(allowed), *self.preflight_extra], b"")


class CorsResponder:
    """A responder that adds the CORS headers to whatever answer goes through it."""

    __slots__ = ("_extra", "_inner")

    def __init__(self, inner: Responder, extra: Headers) -> None:
        self._inner = inner
        self._extra = extra

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        await self._inner.send_full(status, [*headers, *self._extra], body)

    async def start(self, status: int, headers: Headers) -> None:
        await self._inner.start(status, [*headers, *self._extra])

    def send(self, data: bytes) -> Any:
        return self._inner.send(data)

    def end(self, data: bytes = b"") -> Any:
        return self._inner.end(data)

    def __getattr__(self, name: str) -> Any:  # started, finished, broken, ...: the server's
        return getattr(self._inner, name)


class CorsHandler:
    """The servers' handler behind CORS: outermost, so a preflight is answered before the key
    check (browsers send no credentials on it) and every answer, errors and the deadline's
    included, carries the headers."""

    __slots__ = ("cors", "inner")

    def __init__(self, inner: Any, cors: Cors) -> None:
        self.inner = inner
        self.cors = cors

    def _wrap(self, req: Request, responder: Responder) -> Responder:
        allowed = self.cors.allow(req)
        if allowed is None:
            return responder
        return CorsResponder(responder, self.cors.headers(allowed))  # type: ignore[return-value]

    async def on_timeout(self, req: Request, responder: Responder) -> None:
        await self.inner.on_timeout(req, self._wrap(req, responder))

    async def upgrade(self, req: Request, upgrade: Any) -> None:
        await self.inner.upgrade(req, upgrade)  # WebSockets check their origin themselves

    async def __call__(self, req: Request, responder: Responder) -> None:
        cors = self.cors
        if cors.is_preflight(req):
            allowed = cors.allow(req)
            if allowed is not None:
                await cors.preflight(req, responder, allowed)
                return
        await self.inner(req, self._wrap(req, responder))
