"""OpenAI's Files and Batch APIs (``lmgw.batch``), as the official client calls them:

* ``POST /v1/files`` (a multipart form: ``file``, ``purpose``), ``GET /v1/files``
  (``?purpose=``), ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``,
  ``DELETE /v1/files/{id}``;
* ``POST /v1/batches`` (``input_file_id``, ``endpoint``, ``completion_window``,
  ``metadata``), ``GET /v1/batches``, ``GET /v1/batches/{id}``,
  ``POST /v1/batches/{id}/cancel``.

Under the API keys like the rest of ``/v1``; a key sees only its own files and batches (another
key's are 404s).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import msgspec

from ..batch import BatchService
from ..batch.files import FileError
from ..errors import DECODE_ERRORS, GatewayError
from ..http.types import Request, Responder
from . import multipart
from .limits import check_json_depth
from .openai import send_error

FILES = "/v1/files"
BATCHES = "/v1/batches"
_JSON = (b"content-type", b"application/json")
#: purposes an upload may have (the gateway makes "batch_output" files itself)
_PURPOSES = ("batch",)


class _CreateBatch(msgspec.Struct, forbid_unknown_fields=True):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


class BatchesAPI:
    """Handlers of the routes above."""

    def __init__(self, service: BatchService, max_json_depth: int) -> None:
        self.service = service
        self.max_json_depth = max_json_depth

    def install(self, app: Any) -> None:
        app.route(FILES, {"GET": self.files, "POST": self.files})
        app.route(BATCHES, {"GET": self.batches, "POST": self.batches})
        app.route_prefix(FILES + "/", self.file_item)
        app.route_prefix(BATCHES + "/", self.batch_item)

    async def _answer(self, responder: Responder, op: Any, *args: Any) -> None:
        try:
            status, payload = op(*args)
        except GatewayError as exc:
            await send_error(responder, exc)
            return
        if isinstance(payload, bytes):
            await responder.send_full(
                status, [(b"content-type", b"application/octet-stream")], payload
            )
        else:
            await responder.send_full(status, [_JSON], msgspec.json.encode(payload))

    # -- files ----------------------------------------------------------------------------------
    async def files(self, req: Request, responder: Responder) -> None:
        op = self._upload if req.method == "POST" else self._list_files
        await self._answer(responder, op, req)

    def _upload(self, req: Request) -> tuple[int, Any]:
        try:
            spans = multipart.form_spans(
                req.body, req.header(b"content-type"), frozenset(("file", "purpose"))
            )
            fields = multipart.form_fields(
                req.body, req.header(b"content-type"), frozenset(("purpose",))
            )
        except multipart.FormError as exc:
            raise GatewayError(400, f"invalid form: {exc}") from None
        if "file" not in spans:
            raise GatewayError(400, "the form has no `file`", param="file")
        purpose = fields["purpose"].value if "purpose" in fields else ""
        if purpose not in _PURPOSES:
            raise GatewayError(
                400, f"purpose must be one of {', '.join(_PURPOSES)}, got {purpose!r}",
                param="purpose",
            )  # fmt: skip
        span = spans["file"]
        filename = multipart.part_filename(req.body, span) or "upload.jsonl"
        service = self.service
        try:
            f = service.files.add(_owner(req), filename, purpose, req.body[span], service.now())
        except FileError as exc:
            raise GatewayError(exc.status, str(exc), param="file") from None
        return 200, f.describe()

    def _list_files(self, req: Request) -> tuple[int, Any]:
        purpose = _query(req, "purpose")
        data = [f.describe() for f in self.service.files.owned(_owner(req), purpose)]
        return 200, {"object": "list", "data": data, "has_more": False}

    async def file_item(self, req: Request, responder: Responder) -> None:
        """``/v1/files/{id}`` (GET, DELETE) and ``/v1/files/{id}/content`` (GET)."""
        rest = req.path[len(FILES) + 1 :]
        file_id, _, tail = rest.partition("/")
        if tail not in ("", "content"):
            await send_error(responder, GatewayError(404, f"no route for {req.path}"))
            return
        allowed = ("GET", "HEAD") if tail else ("GET", "HEAD", "DELETE")
        if req.method not in allowed:
            await _not_allowed(req, responder, allowed)
            return
        await self._answer(responder, self._file, req, file_id, tail)

    def _file(self, req: Request, file_id: str, tail: str) -> tuple[int, Any]:
        files = self.service.files
        owner = _owner(req)
        f = files.get(file_id, owner)
        if f is None:
            raise GatewayError(404, f"No such File object: {file_id}", param="file_id")
        if tail == "content":
            return 200, f.data
        if req.method == "DELETE":
            files.delete(file_id, owner)
            return 200, {"id": file_id, "object": "file", "deleted": True}
        return 200, f.describe()

    # -- batches --------------------------------------------------------------------------------
    async def batches(self, req: Request, responder: Responder) -> None:
        op = self._create if req.method == "POST" else self._list_batches
        await self._answer(responder, op, req)

    def _create(self, req: Request) -> tuple[int, Any]:
        check_json_depth(req.body, self.max_json_depth)
        try:
            body = msgspec.json.decode(req.body or b"{}", type=_CreateBatch)
        except DECODE_ERRORS as exc:
            raise GatewayError(400, f"invalid request body: {exc}") from None
        try:
            job = self.service.create(
                req.principal, body.input_file_id, body.endpoint, body.completion_window,
                body.metadata,
            )  # fmt: skip
        except LookupError as exc:
            raise GatewayError(404, str(exc), param="input_file_id") from None
        except ValueError as exc:
            raise GatewayError(400, str(exc)) from None
        except RuntimeError as exc:
            raise GatewayError(503, str(exc)) from None
        return 200, job.describe()

    def _list_batches(self, req: Request) -> tuple[int, Any]:
        data = [job.describe() for job in self.service.owned(_owner(req))]
        return 200, {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": False,
        }

    async def batch_item(self, req: Request, responder: Responder) -> None:
        """``/v1/batches/{id}`` (GET) and ``/v1/batches/{id}/cancel`` (POST)."""
        rest = req.path[len(BATCHES) + 1 :]
        batch_id, _, tail = rest.partition("/")
        if tail not in ("", "cancel"):
            await send_error(responder, GatewayError(404, f"no route for {req.path}"))
            return
        allowed = ("POST",) if tail else ("GET", "HEAD")
        if req.method not in allowed:
            await _not_allowed(req, responder, allowed)
            return
        await self._answer(responder, self._batch, req, batch_id, tail)

    def _batch(self, req: Request, batch_id: str, tail: str) -> tuple[int, Any]:
        job = self.service.get(batch_id, _owner(req))
        if job is None:
            raise GatewayError(404, f"No such Batch object: {batch_id}", param="batch_id")
        if tail == "cancel":
            self.service.cancel(job)
        return 200, job.describe()


def _owner(req: Request) -> str | None:
    return req.principal.name if req.principal is not None else None


def _query(req: Request, name: str) -> str | None:
    values = parse_qs(req.query).get(name)
    return values[-1] if values else None


async def _not_allowed(req: Request, responder: Responder, allowed: tuple[str, ...]) -> None:
    text = ", ".join(allowed)
    await responder.send_full(
        405,
        [_JSON, (b"allow", text.encode())],
        GatewayError(405, f"method {req.method} not allowed on {req.path}; use {text}").body(),
    )
