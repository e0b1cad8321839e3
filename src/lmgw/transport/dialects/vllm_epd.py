"""vLLM encoder disaggregation (EPD): encoder fan-out, then NIXL P/D legs or one merged PD leg.

Encoders are addressed by content, not by id: each encoder request carries one media item, and
the P (or PD) worker that later sees the *same* item computes the same multimodal hash and loads
the encoder output instead of running the vision/audio tower. So the media must reach E and P
byte-identical: the P/D legs carry the client's original content, never a rewritten one.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import msgspec

from .base import (
    ClientBody,
    HandOff,
    HandOffError,
    StageContext,
    StageRequest,
    leg_headers,
    random_hex,
)
from .vllm_nixl import VllmNixl

#: content-part types that go through an encoder
MEDIA_TYPES = frozenset({"image_url", "input_audio", "audio_url", "video_url"})
#: request fields that change the multimodal hash, so E must see them as P does
_HASH_FIELDS = ("mm_processor_kwargs",)


class MediaItem(msgspec.Struct, frozen=True):
    """One media part of a chat request, where it is and what identifies it."""

    message: int  #: index in ``messages``
    index: int  #: index in that message's ``content``
    type: str
    part: dict[str, Any]  #: the content part itself, as the client sent it
    #: the URL (http(s), data URL, or ``input_audio`` as a data URL); None when omitted
    url: str | None
    #: the client's stable ``uuid`` for the item, when given (vLLM then hashes by it)
    uuid: str | None

    @property
    def sha256(self) -> str | None:
        """Content key: sha256 of the URL string (a data URL's bytes, or the remote URL)."""
        return None if self.url is None else hashlib.sha256(self.url.encode()).hexdigest()


def _media_url(ptype: str, part: dict[str, Any]) -> str | None:
    value = part.get(ptype)
    if ptype == "input_audio":
        if isinstance(value, dict) and isinstance(value.get("data"), str):
            fmt = value.get("format") if isinstance(value.get("format"), str) else "wav"
            return f"data:audio/{fmt};base64,{value['data']}"
        return None
    if isinstance(value, dict):
        value = value.get("url")
    return value if isinstance(value, str) and value else None


def find_media(obj: dict[str, Any]) -> list[MediaItem]:
    """Every media content part of a chat body, in message order. Malformed shapes (not a
    list, not a dict) are skipped: validating them is the engine's job."""
    items: list[MediaItem] = []
    messages = obj.get("messages")
    if not isinstance(messages, list):
        return items
    for m, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        for i, part in enumerate(content):
            if not isinstance(part, dict):
                continue
            ptype = part.get("type")
            if ptype not in MEDIA_TYPES:
                continue
            uuid = part.get("uuid")
            items.append(
                MediaItem(
                    m,
                    i,
                    ptype,
                    part,
                    _media_url(ptype, part),
                    uuid if isinstance(uuid, str) else None,
                )
            )
    return items


class VllmEpd(VllmNixl):
    """E then P/D (``e+p+d``: NIXL legs exactly as :class:`VllmNixl`) or E then one merged PD
    leg (``e+pd``: the client's body unchanged). ``ctx.prefill is None`` selects ``e+pd``."""

    name: ClassVar[str] = "vllm-epd"
    flows: ClassVar[frozenset[str]] = frozenset({"e+pd", "e+p+d"})

    def encode_requests(self, body: ClientBody, ctx: StageContext) -> list[StageRequest]:
        """One request per distinct media item that has content, with only that item:
        ``max_tokens=1``, ``stream=false``, child id ``{id}:{i}:{6 hex}``, ``key`` its uuid (the
        gateway pins every item by its content hash) or a hash of its URL. Items given only by
        ``uuid`` (media omitted) are expected in the cache already and have nothing to encode."""
        obj = body.obj
        common: dict[str, Any] = {}
        if "model" in obj:
            common["model"] = obj["model"]
        for key in _HASH_FIELDS:
            if key in obj:
                common[key] = obj[key]
        out: list[StageRequest] = []
        keys: set[str] = set()
        for item in find_media(obj):
            key = item.uuid or item.sha256
            if item.url is None or key in keys:  # omitted media, or an item seen already
                continue
            keys.add(key)  # type: ignore[arg-type]
            payload = {
                **common,
                "messages": [{"role": "user", "content": [item.part]}],
                "max_tokens": 1,
                "stream": False,
            }
            rid = f"{ctx.request_id}:{len(out)}:{random_hex(ctx.rng, 6)}"
            out.append(
                StageRequest(
                    "/v1/chat/completions",
                    leg_headers(ctx.headers, rid),
                    msgspec.json.encode(payload),
                    "encode",
                    key=key,
                )
            )
        return out

    def decode_request(
        self, body: ClientBody, handoff: HandOff | None, ctx: StageContext
    ) -> StageRequest:
        if ctx.prefill is None:  # e+pd: the merged worker loads the encoder outputs itself
            if handoff is not None:
                raise HandOffError("vllm-epd: the e+pd flow has no prefill hand-off")
            return StageRequest(ctx.path, leg_headers(ctx.headers, ctx.request_id), body.raw, "pd")
        return super().decode_request(body, handoff, ctx)
