"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shapes.

Answered by the gateway from the model's tokenizer and chat template when ``models[].tokenizer``
is configured (no worker is busy for it); otherwise relayed to a worker of the model, which
answers as vLLM does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import DECODE_ERRORS, GatewayError
from ..http.types import Request, Responder
from ..transport import openai_http
from ..transport.pool import UpstreamError
from .openai import send_error

if TYPE_CHECKING:
    from ..gateway import Gateway

_JSON = [(b"content-type", b"application/json")]
#: roles asked, in order, when a worker must answer (a merged worker is the plain vLLM case)
_ROLES = ("pd", "p", "d", "e")


class TextAPI:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def install(self, app: Any) -> None:
        app.route("/tokenize", {"POST": self.tokenize})
        app.route("/detokenize", {"POST": self.detokenize})

    async def tokenize(self, req: Request, responder: Responder) -> None:
        await self._handle(req, responder, "/tokenize")

    async def detokenize(self, req: Request, responder: Responder) -> None:
        await self._handle(req, responder, "/detokenize")

    async def _handle(self, req: Request, responder: Responder, path: str) -> None:
        try:
            self.gw.app.openai.request_limits.check_body(req.body)  # limits.max_json_depth
            try:
                obj = msgspec.json.decode(req.body)
            except DECODE_ERRORS as exc:
                raise GatewayError(400, f"request body is not valid JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise GatewayError(400, "request body must be a JSON object")
            model = obj.get("model")
            asked = model if isinstance(model, str) else None
            name = self.gw.app.openai._resolve_model(asked)
            if req.principal is not None:  # API keys: the model allow-list
                self.gw.keys.check_model(req.principal, name, asked)
            text = self.gw.texts.get(name)
            if text is None:
                await self._relay(name, path, req, responder)
                return
            answer = await (text.tokenize(obj) if path == "/tokenize" else text.detokenize(obj))
            await responder.send_full(200, _JSON, msgspec.json.encode(answer))
        except GatewayError as exc:
            await send_error(responder, exc)

    async def _relay(self, model: str, path: str, req: Request, responder: Responder) -> None:
        gw = self.gw
        worker = None
        for role in _ROLES:
            found = gw.registry.candidates(model, role)
            if found:
                worker = found[0]
                break
        if worker is None:
            raise GatewayError(503, f"no healthy worker available for model {model!r}")
        try:
            resp = await gw.pool.request(worker.origin, "POST", path, _JSON, req.body)
            try:
                await openai_http.relay_json(resp, responder, [])
            finally:
                resp.release()
        except UpstreamError as exc:
            raise GatewayError(exc.status, f"worker {worker.id}: {exc.message}") from None
