"""The multimodal preprocessor: from a chat body to validated, hashed :class:`MediaItem`\\ s.

One call per request, before routing: the hashes feed encoder-cache-aware routing, and every
limit is enforced here so that a bad item is a 400 naming its ``param`` rather than an engine
error after an encoder already ran. Items are loaded and decoded concurrently (at most
``max_concurrency`` per request); decoding that could hold the loop for more than about a
millisecond runs in a worker thread under the caller's CPU limiter, shared by all requests.
The first failure cancels the request's other items.

The HTTP path forwards the client's original content, so only the hash and the facts are used;
the ZeroMQ path asks each item for its tensor (:meth:`MediaItem.array`).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import trio

from . import audio as _audio
from . import image as _image
from . import video as _video
from .content import Kind, MediaPart, find_media_parts
from .fetch import Loaded, Resolver, decode_base64, decode_data_url, fetch_url, read_local_file
from .fetch import url_scheme as _scheme
from .hashing import start_item_hash, uuid_hash
from .limits import MediaError, MediaLimits, MediaProfile

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class MediaItem:
    """One media item of a request: where it is, what it is, and its content hash."""

    kind: Kind
    #: the content part's type (``image_url``, ``input_audio``, ``audio_url``, ``video_url``)
    type: str
    #: where it is in the request, ``messages[i].content[j]`` (error ``param``)
    param: str
    message: int
    index: int
    #: "data", "file", "http", "https", "input_audio", or "uuid" (media omitted)
    source: str
    #: the routing and encoder-cache key (docs/multimodal.md, "The hash")
    hash: str
    #: the client's uuid, when given (then ``hash`` derives from it, not from the content)
    uuid: str | None
    #: encoded bytes (0 for uuid-only items)
    nbytes: int
    #: the declared media type (data URL, Content-Type, input_audio format); never trusted
    media_type: str | None = None
    #: what the decoder found: Pillow format, libsndfile format, FFmpeg demuxer
    format: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    duration_s: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    #: the original encoded bytes (what the HTTP path would inline); None for uuid-only items
    data: bytes | None = field(default=None, repr=False)
    _limits: MediaLimits | None = field(default=None, repr=False)
    #: decoded content kept from the hashing pass when a profile asked for it
    _decoded: Any = field(default=None, repr=False)

    def array(self, profile: MediaProfile | None = None) -> np.ndarray:
        """The tensor for a native encoder, shaped by ``profile``: image (H, W, 3) uint8 or
        float32 per :class:`ImageSpec`, audio (N,) float32 mono, video (T, H, W, 3).

        CPU-bound and synchronous (it may decode again): call it through
        ``trio.to_thread.run_sync`` with a limiter for anything but small images.

        Raises:
            ValueError: the item was named by uuid only and has no media.
        """
        if self.data is None or self._limits is None:
            raise ValueError(f"{self.param}: no media to decode (named by uuid only)")
        profile = profile or MediaProfile()
        limits = self._limits
        if self.kind == "image":
            decoded = self._decoded or _image.decode_image(self.data, limits)
            return _image.apply_spec(_image.rgb_array(decoded), profile.image)
        if self.kind == "audio":
            samples = self._decoded
            if samples is None:
                samples = _audio.decode_audio(self.data, limits).samples
            target = profile.audio_sample_rate
            rate = self.sample_rate or 0
            return samples if target is None else _audio.resample(samples, rate, target)
        frames = self._decoded
        want = min(profile.video_frames, self.frames or 0)
        if frames is None or len(frames) != want:
            frames = _video.sample_frames(self.data, limits, self.frames or 0, profile.video_frames)
        spec = profile.video
        if spec == _TRIVIAL_SPEC:
            return frames
        return np.stack([_image.apply_spec(f, spec) for f in frames])


_TRIVIAL_SPEC = MediaProfile().video


@dataclass(slots=True)
class _Ctx:
    limits: MediaLimits
    model_id: str
    processor_kwargs: Mapping[str, Any] | None
    cpu_limiter: trio.CapacityLimiter | None
    ssl_context: ssl.SSLContext | None
    resolver: Resolver | None
    profile: MediaProfile | None
    used_bytes: int = 0


async def _cpu(ctx: _Ctx, offload: bool, fn: Callable[..., T], *args: Any) -> T:
    if not offload:
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args, limiter=ctx.cpu_limiter)


async def _load(part: MediaPart, ctx: _Ctx) -> Loaded:
    limits = ctx.limits
    big = limits.offload_bytes
    if part.data is not None:  # input_audio: bare base64
        data = await _cpu(
            ctx, len(part.data) >= big, decode_base64, part.data, limits.max_item_bytes
        )
        fmt = part.format.lower() if part.format else None
        return Loaded(data, "input_audio", f"audio/{fmt}" if fmt else None)
    url = part.url or ""
    scheme = _scheme(url)
    if scheme == "data":
        data, media_type = await _cpu(
            ctx, len(url) >= big, decode_data_url, url, limits.max_item_bytes
        )
        return Loaded(data, "data", media_type)
    if scheme == "file":
        return Loaded(await read_local_file(url, limits), "file", None)
    if scheme in ("http", "https"):
        return await fetch_url(url, limits, ssl_context=ctx.ssl_context, resolver=ctx.resolver)
    raise MediaError(
        "media URL must be a data:, http(s):// or file:// URL", reason="unsupported_scheme"
    )


def _decode_image(im: Any, info: _image.ImageInfo, ctx: _Ctx, item: MediaItem) -> MediaItem:
    decoded = _image.finish_image(im, info)
    if item.uuid is None:
        h = start_item_hash(ctx.model_id, ctx.limits.hash_algorithm)
        _image.hash_image(decoded, h)
        h.update_kwargs(ctx.processor_kwargs)
        item.hash = h.hexdigest()
    item.format, item.width, item.height = info.format, info.width, info.height
    if ctx.profile is not None:
        item._decoded = decoded
    return item


def _open_and_decode_image(data: bytes, ctx: _Ctx, item: MediaItem) -> MediaItem:
    im, info = _image.open_image(data, ctx.limits)
    with im:
        return _decode_image(im, info, ctx, item)


def _decode_audio(data: bytes, ctx: _Ctx, item: MediaItem) -> MediaItem:
    decoded = _audio.decode_audio(data, ctx.limits)
    info = decoded.info
    if item.uuid is None:
        h = start_item_hash(ctx.model_id, ctx.limits.hash_algorithm)
        h.update("audio", (decoded.samples, info.sample_rate))
        h.update_kwargs(ctx.processor_kwargs)
        item.hash = h.hexdigest()
    item.format, item.sample_rate, item.channels = info.format, info.sample_rate, info.channels
    item.frames, item.duration_s = info.frames, info.duration_s
    if ctx.profile is not None:
        item._decoded = decoded.samples
    return item


def _decode_video(data: bytes, ctx: _Ctx, item: MediaItem) -> MediaItem:
    h = None
    if item.uuid is None:
        h = start_item_hash(ctx.model_id, ctx.limits.hash_algorithm)
    keep = ctx.profile.video_frames if ctx.profile is not None else 0
    info, frames = _video.decode_video(data, ctx.limits, h, keep_frames=keep)
    if h is not None:
        h.update_kwargs(ctx.processor_kwargs)
        item.hash = h.hexdigest()
    item.format, item.width, item.height = info.format, info.width, info.height
    item.frames, item.duration_s = info.frames, info.duration_s
    item._decoded = frames
    return item


async def _process(part: MediaPart, ctx: _Ctx) -> MediaItem:
    limits = ctx.limits
    from_uuid = None
    if part.uuid is not None:
        from_uuid = uuid_hash(
            part.uuid,
            part.kind,
            model_id=ctx.model_id,
            processor_kwargs=ctx.processor_kwargs,
            algorithm=limits.hash_algorithm,
        )
    item = MediaItem(
        part.kind,
        part.type,
        part.param,
        part.message,
        part.index,
        "uuid",
        from_uuid or "",
        part.uuid,
        0,
    )
    if part.url is None and part.data is None:  # named by uuid only: expected in the cache
        return item
    loaded = await _load(part, ctx)
    ctx.used_bytes += len(loaded.data)
    if ctx.used_bytes > limits.max_request_bytes:
        raise MediaError(
            f"the request's media add up to more than {limits.max_request_bytes} bytes "
            "(max_request_bytes)",
            reason="request_too_large",
        )
    item.source, item.nbytes, item.media_type = loaded.source, len(loaded.data), loaded.media_type
    item.data, item._limits = loaded.data, limits
    if part.kind == "image":
        if len(loaded.data) >= limits.offload_bytes:  # header parsing included
            return await _cpu(ctx, True, _open_and_decode_image, loaded.data, ctx, item)
        im, info = _image.open_image(loaded.data, limits)  # small file: header on the loop
        offload = info.width * info.height >= limits.offload_pixels
        try:
            return await _cpu(ctx, offload, _decode_image, im, info, ctx, item)
        finally:
            im.close()
    if part.kind == "audio":
        return await _cpu(ctx, True, _decode_audio, loaded.data, ctx, item)
    return await _cpu(ctx, True, _decode_video, loaded.data, ctx, item)


#: processor arguments are hashed recursively; real ones are a level or two deep
_MAX_KWARGS_DEPTH = 16


def _depth(value: object) -> int:
    """Nesting depth of a JSON value, without recursion (a hostile body may be deep)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if d > _MAX_KWARGS_DEPTH:
            break
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def _check_counts(parts: list[MediaPart], limits: MediaLimits) -> None:
    if len(parts) > limits.max_items:
        raise MediaError(
            f"the request has {len(parts)} media items; at most {limits.max_items} are allowed "
            "(max_items)",
            reason="too_many_items",
            param=parts[limits.max_items].param,
        )
    caps = {
        "image": ("max_images", limits.max_images),
        "audio": ("max_audios", limits.max_audios),
        "video": ("max_videos", limits.max_videos),
    }
    seen = {"image": 0, "audio": 0, "video": 0}
    for part in parts:
        seen[part.kind] += 1
        name, cap = caps[part.kind]
        if seen[part.kind] > cap:
            raise MediaError(
                f"the request has more than {cap} {part.kind} items ({name})",
                reason=f"too_many_{part.kind}s",
                param=part.param,
            )


async def preprocess(
    body: Any,
    limits: MediaLimits,
    *,
    model_id: str = "",
    cpu_limiter: trio.CapacityLimiter | None = None,
    ssl_context: ssl.SSLContext | None = None,
    resolver: Resolver | None = None,
    profile: MediaProfile | None = None,
) -> list[MediaItem]:
    """Validate, load, decode and hash every media item of a chat body, in request order.

    Args:
        body: the decoded JSON body (a dict); anything without ``messages`` has no media.
        limits: the bounds and the source policy.
        model_id: the engine's model id (vLLM's ``--model``, not the served name): part of the
            hash, so that two models never share an encoder-cache entry.
        cpu_limiter: bounds decoding threads across all requests; None uses trio's default.
        ssl_context: trust for https fetches; None uses the system store.
        resolver: name resolution for fetches; None uses trio's ``getaddrinfo``.
        profile: when given (ZeroMQ path), decoded content is kept on each item so that
            :meth:`MediaItem.array` need not decode again.

    Raises:
        MediaError: (a 400 ``GatewayError``) the first item that breaks a rule, with ``param``
            naming it, e.g. ``messages[0].content[1]``.
    """
    parts = find_media_parts(body)
    if not parts:
        return []
    _check_counts(parts, limits)
    kwargs = body.get("mm_processor_kwargs")
    if isinstance(kwargs, dict) and _depth(kwargs) > _MAX_KWARGS_DEPTH:
        raise MediaError(
            f"mm_processor_kwargs is nested more than {_MAX_KWARGS_DEPTH} levels deep",
            reason="bad_processor_kwargs",
            param="mm_processor_kwargs",
        )
    ctx = _Ctx(
        limits,
        model_id,
        kwargs if isinstance(kwargs, dict) else None,
        cpu_limiter,
        ssl_context,
        resolver,
        profile,
    )
    if len(parts) == 1:
        try:
            return [await _process(parts[0], ctx)]
        except MediaError as exc:
            raise exc.at(parts[0].param) from None

    results: list[MediaItem | None] = [None] * len(parts)
    failure: list[MediaError] = []
    per_request = trio.CapacityLimiter(limits.max_concurrency)

    async def run_one(i: int, part: MediaPart, cancel: trio.CancelScope) -> None:
        try:
            async with per_request:
                results[i] = await _process(part, ctx)
        except MediaError as exc:
            if not failure:
                failure.append(exc.at(part.param))
            cancel.cancel()

    async with trio.open_nursery() as nursery:
        for i, part in enumerate(parts):
            nursery.start_soon(run_one, i, part, nursery.cancel_scope)
    if failure:
        raise failure[0]
    return [r for r in results if r is not None]
