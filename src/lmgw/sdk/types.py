"""What the SDK returns: typed results and stream events, and the one decoder of both.

The HTTP :class:`~lmgw.sdk.client.Client` and the in-process
:class:`~lmgw.sdk.inprocess.Gateway` receive the same bytes (the in-process responder gets what
the HTTP server would have written) and decode them here, so they return equal objects for equal
answers. Unknown fields are skipped (engines add their own); a result keeps the ones most
callers read.

Stream events (one per thing that happened, not one per SSE chunk):

* :class:`ContentDelta`: text of choice ``index`` (``content`` of a chat, ``text`` of a
  completion); empty deltas (the role chunk, the finish chunk) are not reported.
* :class:`ReasoningDelta`: ``reasoning_content`` (or vLLM's newer ``reasoning``) text.
* :class:`ToolCallDelta`: a piece of tool call ``call_index`` of choice ``index``; ``id`` and
  ``name`` come with its first piece, ``arguments`` is a JSON fragment to concatenate.
* :class:`Finish`: choice ``index`` ended (``reason``: stop, length, tool_calls...).
* :class:`UsageEvent`: token counts (with ``stream_options.include_usage``).

An error event in the middle of a stream becomes the matching :class:`~lmgw.sdk.errors.APIError`,
raised after the events before it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from ..errors import DECODE_ERRORS
from ..transport.sse import split_complete
from .errors import APIError, _ErrorFields, error_from_payload, error_from_response

__all__ = [
    "ChatChoice",
    "ChatMessage",
    "ChatResult",
    "CompletionChoice",
    "CompletionResult",
    "ContentDelta",
    "Embedding",
    "EmbeddingResult",
    "Finish",
    "FunctionCall",
    "ModelInfo",
    "PromptTokensDetails",
    "ReasoningDelta",
    "SSEDecoder",
    "StreamEvent",
    "TokenizeResult",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    "UsageEvent",
    "decode_result",
    "encode_request",
]


# -- results --------------------------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct, frozen=True, gc=False):
    cached_tokens: int | None = None


class Usage(msgspec.Struct, frozen=True, gc=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class FunctionCall(msgspec.Struct, frozen=True):
    name: str = ""
    arguments: str = ""


class ToolCall(msgspec.Struct, frozen=True):
    id: str = ""
    type: str = "function"
    function: FunctionCall = FunctionCall()


class ChatMessage(msgspec.Struct, frozen=True):
    role: str = "assistant"
    content: str | None = None
    #: the model's reasoning when the server parses it out (vLLM ``--reasoning-parser``)
    reasoning_content: str | None = None
    #: the same under vLLM's newer field name
    reasoning: str | None = None
    tool_calls: list[ToolCall] = []


class ChatChoice(msgspec.Struct, frozen=True):
    index: int = 0
    message: ChatMessage = ChatMessage()
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: Any = None


class ChatResult(msgspec.Struct, frozen=True):
    """A ``/v1/chat/completions`` answer."""

    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[ChatChoice] = []
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """The first choice's content ("" when it has none)."""
        return (self.choices[0].message.content or "") if self.choices else ""


class CompletionChoice(msgspec.Struct, frozen=True):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: Any = None


class CompletionResult(msgspec.Struct, frozen=True):
    """A ``/v1/completions`` answer."""

    id: str = ""
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice] = []
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text if self.choices else ""


class ModelInfo(msgspec.Struct, frozen=True):
    """One entry of ``/v1/models``."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = ""
    root: str | None = None
    parent: str | None = None


class TokenizeResult(msgspec.Struct, frozen=True):
    """vLLM's ``/tokenize`` answer."""

    count: int = 0
    max_model_len: int | None = None
    tokens: list[int] = []
    token_strs: list[str] | None = None


class Embedding(msgspec.Struct, frozen=True):
    index: int = 0
    #: the vector, or its base64 float32 bytes with ``encoding_format="base64"``
    embedding: list[float] | str = []


class EmbeddingResult(msgspec.Struct, frozen=True):
    """A ``/v1/embeddings`` answer."""

    id: str = ""
    object: str = "list"
    created: int = 0
    model: str = ""
    data: list[Embedding] = []
    usage: Usage | None = None

    @property
    def vectors(self) -> list[list[float] | str]:
        """Every input's embedding, in input order."""
        return [d.embedding for d in sorted(self.data, key=lambda d: d.index)]


class _ModelList(msgspec.Struct):
    data: list[ModelInfo] = []


_encode = msgspec.json.encode
_RESULT_DECODERS: dict[str, msgspec.json.Decoder] = {
    "chat": msgspec.json.Decoder(ChatResult),
    "completions": msgspec.json.Decoder(CompletionResult),
    "models": msgspec.json.Decoder(_ModelList),
    "tokenize": msgspec.json.Decoder(TokenizeResult),
    "embeddings": msgspec.json.Decoder(EmbeddingResult),
    "json": msgspec.json.Decoder(),
}


def encode_request(
    model: str | None, params: Mapping[str, Any], *, stream: bool = False, **fields: Any
) -> bytes:
    """A request body: ``model`` (left out when None: a one-model gateway picks it), the
    endpoint's own fields, then the caller's parameters as given."""
    if "stream" in params:
        raise TypeError("use chat_stream()/complete_stream() for streamed answers")
    obj: dict[str, Any] = {} if model is None else {"model": model}
    obj.update(fields)
    obj.update(params)
    if stream:
        obj["stream"] = True
    return _encode(obj)


def response_path(response_id: str) -> str:
    """The path of a stored Responses API response."""
    from urllib.parse import quote

    return "/v1/responses/" + quote(response_id, safe="")


def decode_result(
    kind: str, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> Any:
    """A whole answer as the typed result of ``kind`` (chat, completions, models, tokenize,
    embeddings, json), or the typed error for an error status."""
    if status >= 400:
        raise error_from_response(status, body, headers)
    try:
        result = _RESULT_DECODERS[kind].decode(body)
    except DECODE_ERRORS as exc:
        raise APIError(status, f"unexpected {kind} answer: {exc}: {body[:200]!r}") from None
    return result.data if kind == "models" else result


# -- stream events --------------------------------------------------------------------------------


class StreamEvent(msgspec.Struct, frozen=True, gc=False, kw_only=True, tag_field="type"):
    """Base of the stream events; ``index`` is the choice the event belongs to."""

    index: int = 0


class ContentDelta(StreamEvent, tag="content"):
    text: str


class ReasoningDelta(StreamEvent, tag="reasoning"):
    text: str


class ToolCallDelta(StreamEvent, tag="tool_call"):
    call_index: int = 0
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Finish(StreamEvent, tag="finish"):
    reason: str | None
    stop_reason: int | str | None = None


class UsageEvent(StreamEvent, tag="usage"):
    usage: Usage


# the wire shape of one SSE chunk (chat and completions in one struct: decode once)
class _FnDelta(msgspec.Struct, gc=False):
    name: str | None = None
    arguments: str | None = None


class _ToolDelta(msgspec.Struct, gc=False):
    index: int = 0
    id: str | None = None
    function: _FnDelta | None = None


class _Delta(msgspec.Struct, gc=False):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolDelta] | None = None


class _ChunkChoice(msgspec.Struct, gc=False):
    index: int = 0
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class _Chunk(msgspec.Struct, gc=False):
    choices: list[_ChunkChoice] = []
    usage: Usage | None = None
    error: _ErrorFields | str | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


class SSEDecoder:
    """Turns SSE bytes (any cut: whole events, or a network read) into stream events.

    :meth:`feed` returns the events of the complete SSE events received so far. An error event
    does not raise (the in-process responder runs inside the gateway's handler, which must not
    see client-side exceptions): it sets :attr:`error`, and the caller raises it after handing
    out the events before it. :attr:`done` is set by ``data: [DONE]``.
    """

    __slots__ = ("_pending", "done", "error", "last_id")

    def __init__(self) -> None:
        self._pending = b""
        self.done = False
        self.error: APIError | None = None
        #: the ``id:`` of the last complete event that had one (a resumable answer's)
        self.last_id: bytes | None = None

    def drop_partial(self) -> None:
        """Forget an event cut short (its connection broke): a resumed answer sends it again."""
        self._pending = b""

    def feed(self, data: bytes) -> list[StreamEvent]:
        if self._pending:
            data = self._pending + data
        if data.endswith(b"\n\n"):  # the usual case: the relay cuts at event boundaries
            self._pending = b""
        else:
            cut = split_complete(data)
            self._pending = data[cut:]
            data = data[:cut]
            if not data:
                return []
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        out: list[StreamEvent] = []
        for block in data[:-2].split(b"\n\n"):
            if block.startswith(b"data: ") and b"\n" not in block:
                payload = block[6:]
            else:
                if block.startswith(b"id:"):
                    self.last_id = block[3 : block.find(b"\n")].strip()
                payload = _data_of(block)
                if payload is None:
                    continue  # a comment or an event without data
            if payload == b"[DONE]":
                self.done = True
                continue
            if self.error is not None:
                continue  # after an error only [DONE] is expected
            self._chunk(payload, out)
        return out

    def _chunk(self, payload: bytes, out: list[StreamEvent]) -> None:
        try:
            chunk = _decode_chunk(payload)
        except DECODE_ERRORS as exc:
            self.error = APIError(502, f"undecodable stream event: {exc}: {payload[:200]!r}")
            return
        if chunk.error is not None:
            err = chunk.error
            if isinstance(err, str):
                err = _ErrorFields(err)
            status = err.code if isinstance(err.code, int) and err.code >= 400 else 500
            self.error = error_from_payload(status, err)
            return
        for c in chunk.choices:
            delta = c.delta
            if delta is not None:
                if delta.reasoning_content:
                    out.append(ReasoningDelta(index=c.index, text=delta.reasoning_content))
                elif delta.reasoning:
                    out.append(ReasoningDelta(index=c.index, text=delta.reasoning))
                if delta.content:
                    out.append(ContentDelta(index=c.index, text=delta.content))
                if delta.tool_calls:
                    for t in delta.tool_calls:
                        fn = t.function
                        out.append(
                            ToolCallDelta(
                                index=c.index,
                                call_index=t.index,
                                id=t.id,
                                name=fn.name if fn is not None else None,
                                arguments=(fn.arguments or "") if fn is not None else "",
                            )
                        )
            elif c.text:
                out.append(ContentDelta(index=c.index, text=c.text))
            if c.finish_reason is not None:
                out.append(Finish(index=c.index, reason=c.finish_reason, stop_reason=c.stop_reason))
        if chunk.usage is not None:
            out.append(UsageEvent(usage=chunk.usage))

    def feed_eof(self) -> list[StreamEvent]:
        """The stream ended: a trailing event without its blank line still counts."""
        rest, self._pending = self._pending, b""
        return self.feed(rest + b"\n\n") if rest.strip() else []


def _data_of(block: bytes) -> bytes | None:
    """The data of an SSE event block with several lines (``event:``, ``id:``, comments)."""
    parts = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None
