"""The admin API: list, add, remove, drain and undrain workers at run time.

Routes (all JSON, errors OpenAI-shaped):

* ``GET /admin/workers``: every worker, as ``Worker.describe()`` plus its ``source``.
* ``POST /admin/workers``: add one; the body is a ``[[workers]]`` table as JSON (201, 409 if the
  id exists, 400 with the config error's message).
* ``GET /admin/workers/{id}``: one worker.
* ``DELETE /admin/workers/{id}``: remove at once; ``?grace_s=N`` drains first and answers once
  the worker is idle or N seconds have passed, then removes it.
* ``POST /admin/workers/{id}/drain``: no new requests; those in flight finish.
* ``POST /admin/workers/{id}/undrain``: back to starting, probed once, healthy if it answers.
* ``GET /admin/planner``: the planner's recommended worker count per role (lmgw.planner).

Ids travel percent-encoded in the path (an id defaults to the worker's URL). The API is guarded
by ``admin.token``, a bearer token separate from any API key and compared in constant time;
without one it answers 403 (never open by default), unless ``admin.allow_unauthenticated_
localhost`` lets loopback clients in. Nothing here is on the request path of ``/v1/*``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
from urllib.parse import parse_qsl, unquote

import msgspec

from ..config import WorkerConfig
from ..errors import DECODE_ERRORS, GatewayError, error_body
from ..http.types import Request, Responder
from ..workers.registry import WorkerExists
from ..workers.worker import Worker, WorkerState
from .limits import check_json_depth

PREFIX = "/admin/workers"
_JSON = (b"content-type", b"application/json")
_PARAM_RE = re.compile(r"at `(?:\$\.)?([A-Za-z0-9_]+)")
_FIELD_RE = re.compile(r"field `([^`]+)`")
ENABLE_HINT = (
    "the admin API is disabled: set a token with `[admin] token` in the config file,"
    " the LMGW_ADMIN_TOKEN environment variable or `lmgw serve --admin-token`, and send it as"
    " `Authorization: Bearer <token>`"
)


def _digest(secret: bytes) -> bytes:
    # Comparing fixed-size digests keeps the comparison constant-time in the token's length too.
    return hashlib.sha256(secret).digest()


def _is_loopback(client: str) -> bool:
    host = client.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminAPI:
    """Handlers of ``/admin/workers...``; see the module docstring."""

    def __init__(self, gateway) -> None:  # gateway: lmgw.gateway.Gateway (avoid import cycle)
        self.gw = gateway
        cfg = gateway.config.admin
        self._token = _digest(cfg.token.encode()) if cfg.token else None
        self._localhost_ok = cfg.allow_unauthenticated_localhost
        self._request_timeout_s = gateway.config.limits.request_timeout_s

    # -- auth -------------------------------------------------------------------------------
    def authorize(self, req: Request) -> None:
        """Raise 403 when no token is configured, 401 when the bearer token is missing or
        wrong; loopback clients pass without one when the config allows it."""
        if self._localhost_ok and _is_loopback(req.client):
            return
        if self._token is None:
            raise GatewayError(403, ENABLE_HINT)
        header = req.header(b"authorization") or b""
        scheme, _, credentials = header.strip().partition(b" ")
        ok = scheme.lower() == b"bearer" and hmac.compare_digest(
            _digest(credentials.strip()), self._token
        )
        if not ok:
            raise GatewayError(
                401,
                "missing or invalid admin token: send `Authorization: Bearer <admin.token>`",
            )

    async def answer(
        self, req: Request, responder: Responder, status: int, payload: object
    ) -> None:
        await responder.send_full(status, [_JSON], msgspec.json.encode(payload))

    async def fail(self, responder: Responder, exc: GatewayError) -> None:
        headers = [_JSON]
        if exc.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="lmgw-admin"'))
        body = error_body(exc.status, exc.message, param=exc.param, type=exc.type)
        await responder.send_full(exc.status, headers, body)

    # -- entry points (registered in App) ----------------------------------------------------
    async def workers(self, req: Request, responder: Responder) -> None:
        """``/admin/workers``: GET lists, POST adds."""
        try:
            self.authorize(req)
            if req.method == "POST":
                status, payload = self._add(req.body)
            else:
                status, payload = 200, {"object": "list", "data": self._describe_all()}
        except GatewayError as exc:
            await self.fail(responder, exc)
            return
        await self.answer(req, responder, status, payload)

    async def planner(self, req: Request, responder: Responder) -> None:
        """``GET /admin/planner``: the recommended worker count of each role, and why
        (:mod:`lmgw.planner`); 404 with ``planner.enabled = false``."""
        try:
            self.authorize(req)
            feed = self.gw.planner
            if feed is None:
                raise GatewayError(404, "the planner is off (planner.enabled = false)")
        except GatewayError as exc:
            await self.fail(responder, exc)
            return
        await self.answer(req, responder, 200, feed.describe())

    async def worker(self, req: Request, responder: Responder) -> None:
        """``/admin/workers/{id}[/drain|/undrain]`` (the App sends every path under it here)."""
        try:
            self.authorize(req)
            worker_id, action = self._parse_path(req.path)
            allowed = ("POST",) if action else ("DELETE", "GET", "HEAD")
            if req.method not in allowed:
                await self.not_allowed(req, responder, allowed)
                return
            worker = self.gw.registry.get(worker_id)
            if worker is None:
                raise GatewayError(404, f"no worker with id {worker_id!r}", param="id")
            if action == "drain":
                self.gw.drain_worker(worker_id, "drained by the admin API")
            elif action == "undrain":
                await self._undrain(worker)
            elif req.method == "DELETE":
                await self._remove(worker_id, req.query)
        except GatewayError as exc:
            await self.fail(responder, exc)
            return
        await self.answer(req, responder, 200, self._describe(worker))

    # -- the operations ---------------------------------------------------------------------
    def _describe(self, worker: Worker) -> dict:
        out = worker.describe()
        out["source"] = self.gw.source_of(worker.id)
        return out

    def _describe_all(self) -> list[dict]:
        return [self._describe(w) for w in self.gw.registry]

    def _add(self, body: bytes) -> tuple[int, dict]:
        check_json_depth(body, self.gw.config.limits.max_json_depth)
        try:
            obj = msgspec.json.decode(body) if body else None
        except DECODE_ERRORS as exc:
            raise GatewayError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise GatewayError(
                400,
                "expected a JSON object shaped like a [[workers]] table, e.g."
                ' {"url": "http://10.0.0.5:8000", "role": "pd", "id": "w5"}',
            )
        try:
            wc = msgspec.convert(obj, WorkerConfig)
        except msgspec.ValidationError as exc:
            msg = str(exc)
            m = _PARAM_RE.search(msg) or _FIELD_RE.search(msg)
            raise GatewayError(
                400, f"invalid worker: {msg}", param=m.group(1) if m else None
            ) from None
        try:  # the monitor probes new workers at once
            added = self.gw.add_entry(wc)
        except WorkerExists as exc:
            raise GatewayError(
                409, f"a worker with id {exc.worker_id!r} already exists", param="id"
            ) from None
        except ValueError as exc:  # a model's dialect cannot name it: every request would fail
            raise GatewayError(400, str(exc)) from None
        if len(added) == 1:
            return 201, self._describe(added[0])
        return 201, {"object": "list", "data": [self._describe(w) for w in added]}

    async def _undrain(self, worker: Worker) -> None:
        if worker.state is not WorkerState.DRAINING:
            return  # idempotent: healthy stays healthy, ejected waits for its probes
        self.gw.registry.set_state(worker, WorkerState.STARTING, "undrained by the admin API")
        # Probe now rather than at the next health round, so the answer says whether it is
        # routable again (healthy) or not (ejected, with the probe's error).
        await self.gw.monitor.probe(worker)

    async def _remove(self, worker_id: str, query: str) -> None:
        grace = None
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key != "grace_s":
                raise GatewayError(400, f"unknown query parameter {key!r}", param=key)
            try:
                grace = float(value)
            except ValueError:
                grace = -1.0
            if not (grace >= 0 and math.isfinite(grace)):
                raise GatewayError(
                    400, f"grace_s must be a number of seconds >= 0, got {value!r}", param="grace_s"
                )
        if grace is None:
            self.gw.remove_worker(worker_id)
            return
        deadline = self._request_timeout_s
        if deadline and grace >= deadline:
            raise GatewayError(
                400,
                f"grace_s must be below limits.request_timeout_s ({deadline:g} s), or this"
                " request times out before the worker is removed",
                param="grace_s",
            )
        # Waits here, in this request: if the caller goes away the worker stays draining.
        await self.gw.retire_worker(worker_id, grace)

    # -- routing helpers --------------------------------------------------------------------
    @staticmethod
    def _parse_path(path: str) -> tuple[str, str | None]:
        rest = path[len(PREFIX) + 1 :]
        action = None
        for suffix in ("/drain", "/undrain"):
            if rest.endswith(suffix) and len(rest) > len(suffix):
                rest, action = rest[: -len(suffix)], suffix[1:]
                break
        worker_id = unquote(rest)
        if not worker_id:
            raise GatewayError(404, f"no route for {path}")
        return worker_id, action

    async def not_allowed(
        self, req: Request, responder: Responder, allowed: tuple[str, ...]
    ) -> None:
        text = ", ".join(allowed)
        await responder.send_full(
            405,
            [_JSON, (b"allow", text.encode())],
            GatewayError(405, f"method {req.method} not allowed on {req.path}; use {text}").body(),
        )
