"""vLLM's Responses API, simulated: ``POST /v1/responses`` (JSON or a stream of ``event:``/
``data:`` events, ``response.created`` ... ``response.completed``), ``GET /v1/responses/{id}``
(also ``?stream=true&starting_after=N``, replaying the stored events) and
``POST /v1/responses/{id}/cancel``.

As in vLLM, stored responses live in this worker's memory only (a bounded LRU here), so a
``previous_response_id`` that another worker created is a 404: exactly what the gateway's
response affinity must avoid. ``previous_response_id`` continues the stored conversation (its
messages and its answer, then the new input); ``instructions`` apply to the one request.
``background: true`` (needs ``store``) answers ``queued`` at once; the response is
``in_progress`` for the time the timing model gives its tokens, then ``completed`` (or
``cancelled`` when cancelled before that). Text only: other input items are a 400.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import msgspec

from lmgw.http.types import Request, Responder

from .apikit import (
    SSE,
    bad,
    chat_ids,
    decode,
    encode,
    generate,
    message_text,
    pause,
    prefill_s,
    reply,
    token_s,
)
from .app import ApiError

if TYPE_CHECKING:
    from .app import SimWorker

STORE_ENTRIES = 4096
"""Responses a worker keeps (vLLM keeps them all; a test fleet needs far fewer)."""
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
PREFIX = "/v1/responses/"


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    input: Any = None
    instructions: str | None = None
    previous_response_id: str | None = None
    stream: bool | None = False
    store: bool | None = True
    background: bool | None = False
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


_decoder = msgspec.json.Decoder(ResponsesRequest)


@dataclass(slots=True)
class Stored:
    """One stored response: its conversation (input messages and answer), its final object,
    and when a background one finishes (monotonic)."""

    messages: list[dict[str, Any]]
    final: dict[str, Any]
    done_at: float
    background: bool
    cancelled: bool = False

    def current(self) -> dict[str, Any]:
        """The response as it stands now (a background one may still be running)."""
        if self.cancelled:
            return {**self.final, "status": "cancelled", "output": [], "usage": None}
        if time.monotonic() < self.done_at:
            return {**self.final, "status": "in_progress", "output": [], "usage": None}
        return self.final


class ResponseStore:
    """A worker's stored responses (least recently used dropped first)."""

    def __init__(self) -> None:
        self.entries: OrderedDict[str, Stored] = OrderedDict()

    def get(self, response_id: str) -> Stored:
        stored = self.entries.get(response_id)
        if stored is None:
            raise ApiError(404, f"Response with id '{response_id}' not found.")
        self.entries.move_to_end(response_id)
        return stored

    def put(self, response_id: str, stored: Stored) -> None:
        self.entries[response_id] = stored
        while len(self.entries) > STORE_ENTRIES:
            self.entries.popitem(last=False)


def _stores(sim: SimWorker) -> ResponseStore:
    return sim.response_store  # type: ignore[attr-defined]


def _input_messages(value: Any) -> list[dict[str, Any]]:
    """``input`` as chat messages: a string is one user message; a list holds message items
    (``{"role", "content"}``, ``type`` ``message`` or absent)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad("input must be a string or a non-empty list of input items", "input")
    out = []
    for item in value:
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise bad("input: only message items are simulated", "input")
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise bad(f"input: unknown role {role!r}", "input")
        text = message_text(item.get("content"), "input", _TEXT_PARTS)
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


def _response(
    response_id: str,
    req: ResponsesRequest,
    model: str,
    status: str,
    message: dict[str, Any] | None,
    usage: dict[str, Any] | None,
    created: int,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "model": model,
        "status": status,
        "output": [] if message is None else [message],
        "usage": usage,
        "background": bool(req.background),
        "error": None,
        "incomplete_details": ({"reason": "max_output_tokens"} if status == "incomplete" else None),
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata,
        "parallel_tool_calls": True,
        "previous_response_id": req.previous_response_id,
        "reasoning": None,
        "service_tier": "auto",
        "store": bool(req.store),
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": "disabled",
        "user": req.user,
    }


def _message(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _events(final: dict[str, Any], pieces: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The stream of a finished response, as vLLM sends it (``sequence_number`` from 0)."""
    opening = {**final, "status": "in_progress", "output": [], "usage": None}
    out: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": opening}),
        ("response.in_progress", {"response": opening}),
    ]
    if final["output"]:
        msg = final["output"][0]
        item_id, text = msg["id"], msg["content"][0]["text"]
        at = {"item_id": item_id, "output_index": 0, "content_index": 0}
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        out.append(
            (
                "response.output_item.added",
                {"output_index": 0, "item": {**msg, "status": "in_progress", "content": []}},
            )
        )
        out.append(("response.content_part.added", {**at, "part": empty}))
        out += [
            ("response.output_text.delta", {**at, "delta": p, "logprobs": []}) for p in pieces if p
        ]
        out.append(("response.output_text.done", {**at, "text": text, "logprobs": []}))
        out.append(("response.content_part.done", {**at, "part": msg["content"][0]}))
        out.append(("response.output_item.done", {"output_index": 0, "item": msg}))
    done = "response.completed" if final["status"] == "completed" else "response.incomplete"
    out.append((done, {"response": final}))
    return out


def _sse(seq: int, kind: str, payload: dict[str, Any]) -> bytes:
    data = encode({"type": kind, "sequence_number": seq, **payload})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


async def create(sim: SimWorker, request: Request, responder: Responder, rid: bytes) -> None:
    req = decode(_decoder, request.body)
    model = sim._check_model(req.model)
    if req.background and not req.store:
        raise bad("background can only be used when `store` is true", "background")
    store = _stores(sim)
    messages: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        messages = list(store.get(req.previous_response_id).messages)
    messages += _input_messages(req.input)
    prompt = list(messages)
    if req.instructions:
        prompt.insert(0, {"role": "system", "content": req.instructions})
    ids = chat_ids(sim, prompt, req.max_output_tokens)
    out = generate(sim, ids, req.max_output_tokens)
    response_id = f"resp_{uuid.uuid4().hex}"
    status = "incomplete" if out.finish_reason == "length" else "completed"
    message = _message(f"msg_{uuid.uuid4().hex}", out.text, status)
    usage = {
        "input_tokens": len(ids),
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": out.num_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": len(ids) + out.num_tokens,
    }
    created = int(time.time())
    final = _response(response_id, req, model, status, message, usage, created)
    work_s = prefill_s(sim, len(ids)) + token_s(sim) * out.num_tokens
    conversation = [*messages, {"role": "assistant", "content": out.text}]
    stored = Stored(conversation, final, time.monotonic() + work_s, bool(req.background))
    if req.store:
        store.put(response_id, stored)
    if req.background:
        await reply(responder, {**final, "status": "queued", "output": [], "usage": None}, rid)
        return
    if not req.stream:
        await pause(work_s)
        await reply(responder, final, rid)
        return
    await responder.start(200, [SSE, (b"x-request-id", rid)])
    step = token_s(sim)
    events = _events(final, list(out.pieces))
    await pause(prefill_s(sim, len(ids)))
    for seq, (kind, payload) in enumerate(events):
        if kind == "response.output_text.delta":
            await pause(step)
        await responder.send(_sse(seq, kind, payload))
    await responder.end()


async def stored_route(sim: SimWorker, request: Request, responder: Responder, rid: bytes) -> None:
    """``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel``."""
    response_id, _, action = request.path[len(PREFIX) :].partition("/")
    if not response_id or action not in ("", "cancel"):
        await reply(responder, {"detail": "Not Found"}, rid, 404)
        return
    if request.method != ("GET" if action == "" else "POST"):
        await reply(responder, {"detail": "Method Not Allowed"}, rid, 405)
        return
    stored = _stores(sim).get(response_id)
    if action == "cancel":
        current = stored.current()
        if current["status"] not in ("queued", "in_progress"):
            raise bad("Cannot cancel a synchronous response.")
        stored.cancelled = True
        await reply(responder, stored.current(), rid)
        return
    query = parse_qs(request.query)
    if query.get("stream", [""])[-1].lower() not in ("true", "1"):
        await reply(responder, stored.current(), rid)
        return
    try:
        after = int(query.get("starting_after", ["-1"])[-1])
    except ValueError:
        raise bad("starting_after must be an integer", "starting_after") from None
    current = stored.current()
    if current is stored.final:
        text = current["output"][0]["content"][0]["text"] if current["output"] else ""
        events = _events(current, [text])
    else:
        events = _events(current, [])[:2]
    body = b"".join(_sse(seq, k, p) for seq, (k, p) in enumerate(events) if seq > after)
    await responder.send_full(200, [SSE, (b"x-request-id", rid)], body)
