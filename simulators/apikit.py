"""What the simulator's APIs beyond chat and completions share (:mod:`.pooling`,
:mod:`.responses`, :mod:`.textgen`): the request bookkeeping and faults every route gets, body
decoding into vLLM's 400s, deterministic vectors, and text generation from a chat.

These routes answer from the same engine (tokenizer, deterministic output) as generation, but
without its queue and prefix cache: a prefill and per-token pause from the timing model (none
at ``speed=inf``) stands in for the work.
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import trio

from lmgw.http.types import Request, Responder

from .app import ApiError
from .engine import Completion, PromptError, SamplingSpec

if TYPE_CHECKING:
    from .app import SimWorker

T = TypeVar("T")
JSON = (b"content-type", b"application/json")
SSE = (b"content-type", b"text/event-stream; charset=utf-8")
EMBED_DIM = 256
"""The simulated embedding size (``dimensions`` may ask for fewer: Matryoshka truncation)."""

Handler = Callable[["SimWorker", Request, Responder, bytes], Awaitable[None]]
Route = Callable[[Request, Responder, bytes], Awaitable[None]]
encode = msgspec.json.encode


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """A typed request body, or vLLM's 400."""
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise bad(str(exc)) from None


def bound(sim: SimWorker, handler: Handler) -> Route:
    """``handler`` as a route of ``sim``: counted in /sim/stats, under the worker's faults
    (``error_rate`` answers 500, ``hang`` never answers; ``refuse`` is the dispatcher's)."""

    async def route(request: Request, responder: Responder, rid: bytes) -> None:
        stats = sim.stats
        stats.requests_total += 1
        if sim.faults.should_error():
            stats.errors_injected += 1
            raise ApiError(500, "Simulated engine failure (fault: error_rate).")
        stats.in_flight += 1
        try:
            if sim.faults.faults.hang:
                await trio.sleep_forever()
            await handler(sim, request, responder, rid)
        except (trio.Cancelled, trio.BrokenResourceError, trio.ClosedResourceError):
            stats.aborted_total += 1
            stats.aborted.append(
                {
                    "request_id": rid.decode("latin-1"),
                    "at_monotonic": time.monotonic(),
                    "tokens_sent": 0,
                }
            )
            raise
        finally:
            stats.in_flight -= 1

    return route


async def reply(responder: Responder, obj: Any, rid: bytes, status: int = 200) -> None:
    await responder.send_full(status, [JSON, (b"x-request-id", rid)], encode(obj))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# -- inputs and vectors ------------------------------------------------------------------------


def inputs(sim: SimWorker, value: Any, param: str) -> list[tuple[bytes, Sequence[int]]]:
    """A pooling input (str, list of str, token ids or lists of them) as (key, token ids) per
    item: the key (the text, or the ids' bytes) seeds the item's vector."""
    try:
        texts, prompts = sim._completion_prompts(value, True)
    except ApiError as exc:
        raise bad(exc.message.replace("prompt", param), param) from None
    return [
        ((text.encode() if text is not None else struct.pack(f"<{len(ids)}q", *ids)), ids)
        for text, ids in zip(texts, prompts, strict=True)
    ]


def texts(value: Any, param: str, *, allow_one: bool = True) -> list[str]:
    """A non-empty string, or a non-empty list of strings."""
    if allow_one and isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    kind = "a string or a non-empty list of strings" if allow_one else "a non-empty list of strings"
    raise bad(f"{param} must be {kind}", param)


def vector(key: bytes, dim: int = EMBED_DIM) -> list[float]:
    """A deterministic unit vector for ``key`` (BLAKE2b in counter mode, as signed 16-bit
    components, normalised)."""
    raw = bytearray()
    block = 0
    while len(raw) < 2 * dim:
        raw += hashlib.blake2b(key + block.to_bytes(4, "little"), digest_size=64).digest()
        block += 1
    comps = struct.unpack(f"<{dim}h", bytes(raw[: 2 * dim]))
    norm = math.sqrt(sum(c * c for c in comps)) or 1.0
    return [c / norm for c in comps]


def truncated(vec: list[float], dimensions: int | None) -> list[float]:
    """Matryoshka: the first ``dimensions`` components, normalised again."""
    if dimensions is None or dimensions == len(vec):
        return vec
    if not 1 <= dimensions <= len(vec):
        raise bad(
            f"dimensions must be between 1 and {len(vec)} for this model, got {dimensions}",
            "dimensions",
        )
    head = vec[:dimensions]
    norm = math.sqrt(sum(c * c for c in head)) or 1.0
    return [c / norm for c in head]


def as_base64(vec: list[float]) -> str:
    """OpenAI's ``encoding_format: base64``: little-endian float32 bytes."""
    import base64

    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()


def similarity(a: bytes, b: bytes) -> float:
    """A relevance score in [0, 1] from the two keys' vectors (1.0 for the same text)."""
    cos = sum(x * y for x, y in zip(vector(a), vector(b), strict=True))
    return max(0.0, min(1.0, (1.0 + cos) / 2.0))


# -- text generation -----------------------------------------------------------------------------


def chat_ids(sim: SimWorker, messages: list[dict[str, Any]], max_tokens: int | None) -> list[int]:
    """The prompt of ``messages`` as the worker's chat template renders it (a 400 when the
    template refuses them or the context is too long)."""
    try:
        rendered = sim.engine.tokenizer.render_chat(messages, add_generation_prompt=True)
    except PromptError as exc:
        raise bad(str(exc), exc.param) from None
    sim._check_length(len(rendered.token_ids), max_tokens, "messages")
    return list(rendered.token_ids)


def generate(
    sim: SimWorker, ids: Sequence[int], max_tokens: int | None, stop: Sequence[str] = ()
) -> Completion:
    if max_tokens is not None and max_tokens < 1:
        raise bad(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    return sim.engine.generate(ids, SamplingSpec(max_tokens=max_tokens, stop=tuple(stop)))


def prefill_s(sim: SimWorker, prompt_tokens: int) -> float:
    return sim.engine.config.timing.prefill_s(prompt_tokens, sim.faults.faults.slow)


def token_s(sim: SimWorker) -> float:
    return sim.engine.config.timing.decode_s(1, sim.faults.faults.slow)


async def pause(seconds: float) -> None:
    if seconds > 0:
        await trio.sleep(seconds)


def message_text(content: Any, param: str, kinds: frozenset[str]) -> str:
    """A message's content as text: a string, or a list of text parts (``kinds`` name the
    part types that carry text); anything else is a 400 (not simulated)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in kinds:
                raise bad(
                    f"{param}: only text content ({', '.join(sorted(kinds))}) is simulated",
                    param,
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise bad(f"{param}: a text part needs a string `text`", param)
            out.append(text)
        return "".join(out)
    raise bad(f"{param}: content must be a string or a list of parts", param)
