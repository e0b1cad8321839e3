"""The LoRA adapter API: load, list and unload adapters on the whole fleet (workers/lora.py).

Routes, under the admin token (``admin.token``, as ``/admin/workers``: loading code onto every
GPU is an operator's act, not an API key holder's):

* ``GET /admin/lora_adapters``: the managed adapters, where each is loaded, where it failed.
* ``POST /admin/lora_adapters``: ``{"lora_name", "lora_path", "model"?, "load_inplace"?}``
  loads it on every healthy worker (of base model ``model`` when given); 200 with the outcome
  per worker once at least one took it.
* ``DELETE /admin/lora_adapters/{name}``: unload everywhere, forget.
* ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``: vLLM's own paths and
  bodies, so the scripts that manage one vLLM manage the fleet unchanged.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import msgspec

from ..errors import DECODE_ERRORS, GatewayError
from ..http.types import Request, Responder
from .admin import AdminAPI
from .limits import check_json_depth

PREFIX = "/admin/lora_adapters"
VLLM_LOAD = "/v1/load_lora_adapter"
VLLM_UNLOAD = "/v1/unload_lora_adapter"


class _LoadBody(msgspec.Struct, forbid_unknown_fields=False):
    lora_name: str | None = None
    lora_path: str | None = None
    model: str | None = None
    load_inplace: bool = False


class LoraAPI:
    """Handlers of the routes above; authorization and answers as the admin API's."""

    def __init__(self, gateway: Any, admin: AdminAPI) -> None:
        self.gw = gateway
        self.admin = admin

    def install(self, app: Any) -> None:
        app.route(PREFIX, {"GET": self.collection, "POST": self.collection})
        app.route(VLLM_LOAD, {"POST": self.load})
        app.route(VLLM_UNLOAD, {"POST": self.unload})
        app.route_prefix(PREFIX + "/", self.item)

    async def collection(self, req: Request, responder: Responder) -> None:
        """``/admin/lora_adapters``: GET lists, POST loads."""
        if req.method == "POST":
            await self.load(req, responder)
            return
        await self._run(req, responder, self._list)

    async def load(self, req: Request, responder: Responder) -> None:
        await self._run(req, responder, self._load)

    async def unload(self, req: Request, responder: Responder) -> None:
        await self._run(req, responder, self._unload_body)

    async def item(self, req: Request, responder: Responder) -> None:
        """``/admin/lora_adapters/{name}``: GET one, DELETE unloads."""
        if req.method not in ("GET", "HEAD", "DELETE"):
            await self.admin.not_allowed(req, responder, ("DELETE", "GET", "HEAD"))
            return
        await self._run(req, responder, self._item)

    # -- the operations ---------------------------------------------------------------------
    async def _run(self, req: Request, responder: Responder, op: Any) -> None:
        try:
            self.admin.authorize(req)
            payload = await op(req)
        except GatewayError as exc:
            await self.admin.fail(responder, exc)
            return
        await self.admin.answer(req, responder, 200, payload)

    async def _list(self, req: Request) -> dict:
        return {"object": "list", "data": self.gw.adapters.describe()}

    async def _load(self, req: Request) -> dict:
        body = self._decode(req)
        name, path = body.lora_name, body.lora_path
        if not name or not path:
            raise GatewayError(400, "Both 'lora_name' and 'lora_path' must be provided.")
        if self.gw.config.model(name) is not None:
            raise GatewayError(
                400, f"`{name}` is a model of the gateway's config", param="lora_name"
            )
        return await self.gw.adapters.load(name, path, body.model, body.load_inplace)

    async def _unload_body(self, req: Request) -> dict:
        name = self._decode(req).lora_name
        if not name:
            raise GatewayError(400, "'lora_name' must be provided.", param="lora_name")
        return await self.gw.adapters.unload(name)

    async def _item(self, req: Request) -> dict:
        name = unquote(req.path[len(PREFIX) + 1 :])
        if req.method == "DELETE":
            return await self.gw.adapters.unload(name)
        for entry in self.gw.adapters.describe():
            if entry["lora_name"] == name:
                return entry
        raise GatewayError(404, f"no LoRA adapter `{name}` was loaded through the gateway")

    def _decode(self, req: Request) -> _LoadBody:
        check_json_depth(req.body, self.gw.config.limits.max_json_depth)
        try:
            return msgspec.json.decode(req.body or b"{}", type=_LoadBody)
        except DECODE_ERRORS as exc:
            raise GatewayError(400, f"invalid request body: {exc}") from None
