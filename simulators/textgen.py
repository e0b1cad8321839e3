"""vLLM's other text-generating APIs, simulated from the same engine as chat: Anthropic's
``/v1/messages`` (JSON, or its ``event:``/``data:`` stream ending with ``data: [DONE]`` as
vLLM's converter does) and ``/v1/messages/count_tokens``; ``/v1/chat/completions/batch`` (one
choice per conversation, no streaming); ``/v1/audio/transcriptions`` and ``/translations``
(a multipart form; the "transcript" is generated from a hash of the file, so it is
deterministic per file).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import msgspec

from lmgw.api import multipart
from lmgw.http.types import Request, Responder

from .apikit import (
    SSE,
    bad,
    chat_ids,
    decode,
    encode,
    generate,
    message_text,
    new_id,
    now,
    pause,
    prefill_s,
    reply,
    token_s,
)

if TYPE_CHECKING:
    from .app import SimWorker

_BLOCKS = frozenset({"text"})
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


class MessagesRequest(msgspec.Struct, kw_only=True):
    """Anthropic's Messages request (the fields the simulator reads)."""

    model: str
    messages: list[Any]
    max_tokens: int
    system: Any = None
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: Any = None


class CountTokensRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[Any]
    system: Any = None


class BatchChatRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    messages: list[list[Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool | None = False


_messages = msgspec.json.Decoder(MessagesRequest)
_count = msgspec.json.Decoder(CountTokensRequest)
_batch = msgspec.json.Decoder(BatchChatRequest)


def _chat_messages(system: Any, messages: list[Any]) -> list[dict[str, Any]]:
    """Anthropic's system and messages as chat messages (text blocks only)."""
    out: list[dict[str, Any]] = []
    if system is not None:
        out.append({"role": "system", "content": message_text(system, "system", _BLOCKS)})
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad("messages: each message needs a role, user or assistant", "messages")
        out.append(
            {"role": m["role"], "content": message_text(m.get("content"), "messages", _BLOCKS)}
        )
    if not out or out[-1]["role"] == "system":
        raise bad("messages must not be empty", "messages")
    return out


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + encode({"type": kind, **payload}) + b"\n\n"


async def messages(sim: SimWorker, request: Request, responder: Responder, rid: bytes) -> None:
    req = decode(_messages, request.body)
    model = sim._check_model(req.model)
    ids = chat_ids(sim, _chat_messages(req.system, req.messages), req.max_tokens)
    out = generate(sim, ids, req.max_tokens, req.stop_sequences or ())
    msg_id = f"chatcmpl-{rid.decode('latin-1')}"
    stop_reason = _STOP_REASONS.get(out.finish_reason, "end_turn")
    usage = {"input_tokens": len(ids), "output_tokens": out.num_tokens}
    if not req.stream:
        await pause(prefill_s(sim, len(ids)) + token_s(sim) * out.num_tokens)
        body = {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": out.text}] if out.text else [],
            "model": model,
            "stop_reason": stop_reason,
            "usage": usage,
        }
        await reply(responder, body, rid)
        return
    await responder.start(200, [SSE, (b"x-request-id", rid)])
    await pause(prefill_s(sim, len(ids)))
    start = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": model,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": len(ids), "output_tokens": 0},
    }
    await responder.send(_event("message_start", {"message": start}))
    opened = False
    step = token_s(sim)
    for piece in out.pieces:
        await pause(step)
        if not piece:
            continue
        chunk = b""
        if not opened:
            opened = True
            chunk = _event(
                "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
            )
        delta = {"index": 0, "delta": {"type": "text_delta", "text": piece}}
        await responder.send(chunk + _event("content_block_delta", delta))
    tail = _event("content_block_stop", {"index": 0}) if opened else b""
    tail += _event("message_delta", {"delta": {"stop_reason": stop_reason}, "usage": usage})
    tail += _event("message_stop", {}) + b"data: [DONE]\n\n"
    await responder.end(tail)


async def count_tokens(sim: SimWorker, request: Request, responder: Responder, rid: bytes) -> None:
    req = decode(_count, request.body)
    sim._check_model(req.model)
    ids = chat_ids(sim, _chat_messages(req.system, req.messages), None)
    await reply(responder, {"input_tokens": len(ids)}, rid)


async def chat_batch(sim: SimWorker, request: Request, responder: Responder, rid: bytes) -> None:
    """``/v1/chat/completions/batch``: ``messages`` is a list of conversations."""
    req = decode(_batch, request.body)
    model = sim._check_model(req.model)
    if req.stream:
        raise bad("Streaming is not supported for batched chat completions.", "stream")
    if not req.messages:
        raise bad("messages must be a non-empty list of conversations", "messages")
    max_tokens = req.max_completion_tokens or req.max_tokens
    choices = []
    prompt = completion = 0
    for i, conversation in enumerate(req.messages):
        if not all(isinstance(m, dict) for m in conversation) or not conversation:
            raise bad("each conversation must be a non-empty list of messages", "messages")
        ids = chat_ids(sim, conversation, max_tokens)
        out = generate(sim, ids, max_tokens)
        prompt += len(ids)
        completion += out.num_tokens
        choices.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": out.text, "reasoning": None},
                "logprobs": None,
                "finish_reason": out.finish_reason,
                "stop_reason": out.stop_reason,
            }
        )
    await pause(prefill_s(sim, prompt) + token_s(sim) * completion)
    body = {
        "id": f"chatcmpl-{rid.decode('latin-1')}",
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    await reply(responder, body, rid)


_AUDIO_FIELDS = frozenset({"file", "model", "stream", "response_format", "language"})


async def audio(sim: SimWorker, request: Request, responder: Responder, rid: bytes) -> None:
    """``/v1/audio/transcriptions`` and ``/translations``: a form with ``file`` and ``model``."""
    body = request.body
    try:
        spans = multipart.form_spans(body, request.header(b"content-type"), _AUDIO_FIELDS)
    except multipart.FormError as exc:
        raise bad(f"invalid form: {exc}") from None
    fields = {k: body[v].decode("utf-8", "replace") for k, v in spans.items() if k != "file"}
    if "file" not in spans or spans["file"].stop == spans["file"].start:
        raise bad("file is required", "file")
    model = sim._check_model(fields.get("model"))
    kind = "translate" if request.path.endswith("translations") else "transcribe"
    digest = hashlib.blake2b(body[spans["file"]], digest_size=8).hexdigest()
    ids = sim.engine.tokenizer.encode(f"{kind} audio {digest}")
    out = generate(sim, ids, 32)
    fmt = fields.get("response_format", "json")
    stream = fields.get("stream", "").strip().lower() in ("true", "1")
    if not stream:
        await pause(prefill_s(sim, len(ids)) + token_s(sim) * out.num_tokens)
        if fmt == "text":
            await responder.send_full(
                200, [(b"content-type", b"text/plain; charset=utf-8"), (b"x-request-id", rid)],
                out.text.encode(),
            )  # fmt: skip
            return
        if fmt not in ("json", "verbose_json"):
            raise bad(f"response_format {fmt!r} is not simulated (json, text)", "response_format")
        await reply(responder, {"text": out.text}, rid)
        return
    await responder.start(200, [SSE, (b"x-request-id", rid)])
    chunk_id, created = new_id("trsc"), now()
    step = token_s(sim)
    for i, piece in enumerate(out.pieces):
        await pause(step)
        last = i == len(out.pieces) - 1
        choice = {"delta": {"content": piece}, "finish_reason": out.finish_reason if last else None}
        event = {
            "id": chunk_id,
            "object": "transcription.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }
        await responder.send(b"data: " + encode(event) + b"\n\n")
    await responder.end(b"data: [DONE]\n\n")


ROUTES = {
    "/v1/messages": messages,
    "/v1/messages/count_tokens": count_tokens,
    "/v1/chat/completions/batch": chat_batch,
    "/v1/audio/transcriptions": audio,
    "/v1/audio/translations": audio,
}
"""path -> handler (every one a POST)."""
