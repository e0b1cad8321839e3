"""Find the media parts of an OpenAI chat request, with the path of each (``param``).

Accepted shapes (OpenAI's, plus vLLM's extensions):

* ``{"type": "image_url", "image_url": {"url": "..."}}`` (also ``"image_url": "..."``),
* ``{"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}}``,
* ``{"type": "audio_url", "audio_url": {"url": "..."}}`` and ``video_url`` likewise,
* vLLM's untyped form ``{"image_url": "..."}`` (the media key names the type),
* any of these with ``"uuid": "..."``, where the media may be ``null`` (vLLM: the uuid is
  expected to hit the engine's cache).

This is a pure function of the decoded body: no I/O, no decoding. A malformed media part is a
400 naming where it is (``messages[2].content[1].image_url.url``), so the client can fix it.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from .limits import MediaError

Kind = Literal["image", "audio", "video"]

#: content-part type -> media kind
MEDIA_TYPES: dict[str, Kind] = {
    "image_url": "image",
    "input_audio": "audio",
    "audio_url": "audio",
    "video_url": "video",
}


class MediaPart(msgspec.Struct, frozen=True):
    """One media content part as the client sent it, not yet loaded."""

    kind: Kind
    #: the content part's type (``image_url``, ``input_audio``, ``audio_url``, ``video_url``)
    type: str
    #: where it is: ``messages[i].content[j]``
    param: str
    message: int
    index: int
    #: a URL (data:, file://, http(s)://); None for ``input_audio`` and omitted media
    url: str | None
    #: ``input_audio``: the base64 payload and its declared format
    data: str | None = None
    format: str | None = None
    #: the client's stable id for the item (vLLM uses it as the multimodal hash)
    uuid: str | None = None


def _bad(message: str, param: str) -> MediaError:
    return MediaError(message, reason="bad_content_part", param=param)


def _part_type(part: dict[str, Any]) -> str | None:
    ptype = part.get("type")
    if ptype is not None:
        return ptype if isinstance(ptype, str) else None
    keys = [k for k in MEDIA_TYPES if k in part]
    return keys[0] if len(keys) == 1 else None


def _url_part(
    ptype: str, kind: Kind, part: dict[str, Any], param: str, m: int, i: int, uuid: str | None
) -> MediaPart:
    value = part.get(ptype)
    where = f"{param}.{ptype}"
    if isinstance(value, dict):
        where += ".url"
        value = value.get("url")
    if value is None:
        if uuid is None:
            raise _bad(f"{ptype} has no url (give one, or a uuid of a cached item)", where)
        return MediaPart(kind, ptype, param, m, i, None, uuid=uuid)
    if not isinstance(value, str) or not value:
        raise _bad(f"{ptype} url must be a non-empty string", where)
    return MediaPart(kind, ptype, param, m, i, value, uuid=uuid)


def _audio_part(part: dict[str, Any], param: str, m: int, i: int, uuid: str | None) -> MediaPart:
    value = part.get("input_audio")
    where = f"{param}.input_audio"
    if value is None and uuid is not None:
        return MediaPart("audio", "input_audio", param, m, i, None, uuid=uuid)
    if not isinstance(value, dict):
        raise _bad("input_audio must be an object with `data` and `format`", where)
    data, fmt = value.get("data"), value.get("format")
    if not isinstance(data, str) or not data:
        raise _bad("input_audio.data must be a non-empty base64 string", f"{where}.data")
    if fmt is not None and not isinstance(fmt, str):
        raise _bad("input_audio.format must be a string such as 'wav' or 'mp3'", f"{where}.format")
    return MediaPart("audio", "input_audio", param, m, i, None, data=data, format=fmt, uuid=uuid)


def find_media_parts(body: Any) -> list[MediaPart]:
    """The media parts of a chat body, in message order.

    Text parts, string contents and unknown part types are left alone (the engine validates
    them); only media parts are checked here, because the gateway is about to act on them.

    Raises:
        MediaError: a media part is malformed (wrong types, no url and no uuid).
    """
    if not isinstance(body, dict):
        return []
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    found: list[MediaPart] = []
    for m, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        for i, part in enumerate(content):
            if not isinstance(part, dict):
                continue
            ptype = _part_type(part)
            kind = MEDIA_TYPES.get(ptype) if ptype is not None else None
            if kind is None:
                continue
            param = f"messages[{m}].content[{i}]"
            uuid = part.get("uuid")
            if uuid is not None and (not isinstance(uuid, str) or not uuid):
                raise _bad("uuid must be a non-empty string", f"{param}.uuid")
            if ptype == "input_audio":
                found.append(_audio_part(part, param, m, i, uuid))
            else:
                found.append(_url_part(ptype, kind, part, param, m, i, uuid))
    return found
