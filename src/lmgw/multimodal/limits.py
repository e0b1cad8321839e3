"""What one request's media may cost the gateway, how it is reshaped for a model, and the error
raised when a limit is crossed.

Every limit is a field with a default and a reason (DESIGN.md §7). Defaults follow vLLM where
vLLM has one (fetch timeouts, ``--allowed-local-media-path``, ``--allowed-media-domains``, 32
video frames) and are otherwise sized so that one request cannot pin a core for seconds.
The structs are frozen and made of tuples, so they hash: derived state (parsed networks) is
cached per limits object instead of being rebuilt per request.

Validation raises :class:`ValueError` (msgspec reports it with the field's path) rather than
``lmgw.config.ConfigError``, so that ``config.py`` can embed these structs without an import
cycle.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Literal

import msgspec

from ..errors import GatewayError

MiB = 1024 * 1024

#: Pillow format names accepted by default: what browsers and phones produce ("JPEG" also opens
#: the multi-picture JPEGs of phone cameras, which Pillow reports as MPO). Exotic formats add
#: parser attack surface.
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
#: FFmpeg demuxers accepted for video (``format_whitelist``): MP4/MOV, Matroska/WebM, AVI.
#: Playlist and reference demuxers (hls, concat, image2...) can open other files or URLs.
DEFAULT_VIDEO_DEMUXERS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi")
#: FFmpeg demuxers for audio that libsndfile cannot read (AAC in MP4/M4A, WebM/Opus).
DEFAULT_AUDIO_DEMUXERS = ("mov", "mp4", "m4a", "3gp", "matroska", "webm", "aac", "ogg")

HashAlgorithm = Literal["sha256", "sha512", "blake3"]
_STRUCT_OPTS = {"forbid_unknown_fields": True, "kw_only": True, "frozen": True}


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{key}: must be >= {low}, got {value!r}")


class MediaError(GatewayError):
    """A media item the gateway refuses: always a 400 naming the offending ``param``.

    ``reason`` is a stable machine-readable tag (``image_too_many_pixels``, ``blocked_address``,
    ...) for metrics and tests; the message says what was wrong and which setting bounds it.
    Decoders raise it without ``param``; :func:`lmgw.multimodal.preprocess` fills it in.
    """

    def __init__(self, message: str, *, reason: str, param: str | None = None) -> None:
        super().__init__(400, message, param=param)
        self.reason = reason

    def at(self, param: str) -> MediaError:
        """This error, located at ``param`` (kept when it already names a deeper field)."""
        if self.param is None or not self.param.startswith(param):
            self.param = param
        return self


class MediaLimits(msgspec.Struct, **_STRUCT_OPTS):
    """Bounds on the media of one request, and the policy for where media may come from."""

    # -- counts and bytes --
    # Media items per request, all kinds together; vLLM's own per-prompt limit applies later.
    max_items: int = 16
    # Per kind, like vLLM's --limit-mm-per-prompt; video and audio cost far more per item.
    max_images: int = 16
    max_audios: int = 4
    max_videos: int = 2
    # Encoded bytes of one item (after base64 decoding, or as fetched); 20 MiB fits a phone photo
    # or a short clip.
    max_item_bytes: int = 20 * MiB
    # Encoded bytes of all items of one request: fetched URLs are not bounded by the body limit.
    max_request_bytes: int = 64 * MiB

    # -- images --
    # Decoded pixels of one image: 8K (7680x4320). Checked from the header before decoding;
    # keep it below Pillow's own bomb guard (Image.MAX_IMAGE_PIXELS, ~89.5M).
    max_image_pixels: int = 7680 * 4320
    # Longest edge: stops 1 x 30M strips that pass the pixel limit but choke resizers.
    max_image_edge: int = 16384
    # Pillow format names to accept.
    image_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS

    # -- audio --
    # Seconds of audio per item (from the header, and enforced while reading); 10 minutes.
    max_audio_duration_s: float = 600.0
    # Decoded mono samples per item (28.8M float32 = 115 MB, 10 minutes at 48 kHz): at a
    # 384 kHz rate the duration limit alone would let a tiny FLAC of silence inflate to ~1 GB.
    max_audio_samples: int = 48000 * 600
    max_audio_channels: int = 8
    # Sample-rate sanity range: outside it is a broken or hostile header.
    min_audio_sample_rate: int = 1000
    max_audio_sample_rate: int = 384000
    audio_demuxers: tuple[str, ...] = DEFAULT_AUDIO_DEMUXERS

    # -- video --
    # Decoded frames per video: every frame is decoded to validate and hash it, so this bounds
    # CPU (about 1 s per 1000 small frames here); 2048 is ~68 s at 30 fps.
    max_video_frames: int = 2048
    # Seconds of video (container metadata and frame timestamps).
    max_video_duration_s: float = 300.0
    # Pixels of one frame: 4K UHD. Also passed to FFmpeg's decoder as ``max_pixels``.
    max_video_pixels: int = 3840 * 2160
    video_demuxers: tuple[str, ...] = DEFAULT_VIDEO_DEMUXERS

    # -- where media may come from --
    # Directory that file:// URLs may read below (after resolving symlinks); None refuses
    # file:// altogether (vLLM's --allowed-local-media-path).
    allowed_local_root: str | None = None
    # Whether http(s):// URLs are fetched at all; off means data URLs (and files) only.
    allow_remote: bool = True
    # Whether plain http:// is allowed besides https://.
    allow_plain_http: bool = True
    # Host names that may be fetched; empty allows any public host. "example.com" matches that
    # host only, ".example.com" its subdomains too (vLLM's --allowed-media-domains).
    allowed_domains: tuple[str, ...] = ()
    # Networks (CIDR) exempt from the private-address guard, e.g. an internal media store.
    # Cloud metadata addresses stay refused unless listed as a single address (/32, /128).
    allowed_networks: tuple[str, ...] = ()
    # Whole fetch of one URL, redirects included (vLLM: 5 s images, 10 s audio, 30 s video).
    fetch_timeout_s: float = 10.0
    # Redirect hops followed; each hop's address is vetted again.
    max_redirects: int = 3

    # -- work --
    # Items of one request fetched/decoded at once.
    max_concurrency: int = 4
    # Items whose encoded size is at least this are decoded in a worker thread (under the
    # caller's limiter) instead of on the event loop: ~1 ms of decode per 100 KiB of PNG.
    offload_bytes: int = 64 * 1024
    # Images with at least this many pixels are decoded in a thread whatever their byte size
    # (a small PNG of one colour can hold millions of pixels); audio and video always are.
    offload_pixels: int = 512 * 512
    # Digest of the content hash; vLLM's VLLM_MM_HASHER_ALGORITHM (blake3 needs the `blake3`
    # package). sha256 uses the CPU's SHA extensions and needs nothing extra.
    hash_algorithm: HashAlgorithm = "sha256"

    # -- gateway use --
    # When the gateway loads, checks and hashes media: "auto" for models whose flow has an
    # encoder stage (the hash keys encoder routing and the cache), "always" (limits and the SSRF
    # guard for every model, at a decode per image), "never" (media pass to workers unchecked).
    preprocess: Literal["auto", "always", "never"] = "auto"
    # How long an item the gateway saw encoded counts as in the encoder cache, so a request
    # repeating it skips the E stage (vLLM's shared EC storage keeps it at least this long);
    # 0 always encodes.
    encoder_cache_ttl_s: float = 600.0
    # Items remembered as encoded (oldest forgotten first).
    encoder_cache_entries: int = 65536

    def __post_init__(self) -> None:
        for key in ("max_items", "max_item_bytes", "max_request_bytes", "max_image_pixels"):
            _at_least(key, getattr(self, key), 1)
        for key in ("max_images", "max_audios", "max_videos", "max_redirects"):
            _at_least(key, getattr(self, key), 0)
        for key in ("max_image_edge", "max_audio_channels", "max_audio_samples"):
            _at_least(key, getattr(self, key), 1)
        _at_least("max_video_frames", self.max_video_frames, 1)
        _at_least("max_video_pixels", self.max_video_pixels, 1)
        _at_least("max_concurrency", self.max_concurrency, 1)
        _at_least("encoder_cache_entries", self.encoder_cache_entries, 0)
        if not (self.encoder_cache_ttl_s >= 0 and math.isfinite(self.encoder_cache_ttl_s)):
            raise ValueError("encoder_cache_ttl_s: must be a finite number >= 0")
        _at_least("offload_bytes", self.offload_bytes, 0)
        _at_least("offload_pixels", self.offload_pixels, 0)
        _at_least("min_audio_sample_rate", self.min_audio_sample_rate, 1)
        _at_least("max_audio_sample_rate", self.max_audio_sample_rate, self.min_audio_sample_rate)
        for key in ("max_audio_duration_s", "max_video_duration_s", "fetch_timeout_s"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{key}: must be a positive finite number, got {value!r}")
        if self.allowed_local_root is not None and not self.allowed_local_root.startswith("/"):
            raise ValueError("allowed_local_root: must be an absolute path")
        for i, net in enumerate(self.allowed_networks):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"allowed_networks[{i}]: {net!r} is not a network") from None
        if self.hash_algorithm == "blake3":
            try:
                import blake3  # noqa: F401
            except ImportError:
                raise ValueError("hash_algorithm: 'blake3' needs the `blake3` package") from None
        if not set(self.image_formats) <= set(DEFAULT_IMAGE_FORMATS):
            self._check_image_formats()
        for i, dom in enumerate(self.allowed_domains):
            if not dom.strip(".") or "/" in dom or ":" in dom:
                raise ValueError(f"allowed_domains[{i}]: {dom!r} is not a host name")

    def _check_image_formats(self) -> None:
        """Formats beyond the defaults (Pillow built-ins, checked by a test) must be Pillow's:
        only then is Pillow loaded (~30 ms with its plugins), not at every start-up."""
        from PIL import Image

        Image.init()
        for i, fmt in enumerate(self.image_formats):
            if fmt not in Image.OPEN:
                known = ", ".join(sorted(Image.OPEN))
                raise ValueError(f"image_formats[{i}]: {fmt!r} is not a Pillow format ({known})")


class ImageSpec(msgspec.Struct, **_STRUCT_OPTS):
    """How a model wants image pixels when the gateway ships tensors (ZeroMQ path).

    The HTTP path sends the original bytes and ignores this; the content hash never depends on
    it (the engine hashes before its own processor, with ``mm_processor_kwargs`` mixed in).
    """

    # Resize so that width*height lies in [min_pixels, max_pixels], keeping the aspect ratio
    # (Qwen2-VL's "smart resize"); None leaves that side unbounded.
    max_pixels: int | None = None
    min_pixels: int | None = None
    # Round both edges to a multiple of this (the vision patch size times the merge size, e.g.
    # 28 for Qwen2-VL); 1 keeps them as they are.
    multiple_of: int = 1
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bicubic"
    # uint8 HWC (the cheapest wire form) or float32 after /255 and optional mean/std.
    dtype: Literal["uint8", "float32"] = "uint8"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # CHW instead of HWC (float32 only).
    channels_first: bool = False

    def __post_init__(self) -> None:
        _at_least("multiple_of", self.multiple_of, 1)
        if self.max_pixels is not None:
            _at_least("max_pixels", self.max_pixels, self.multiple_of**2)
        if self.min_pixels is not None:
            _at_least("min_pixels", self.min_pixels, 1)
            if self.max_pixels is not None and self.min_pixels > self.max_pixels:
                raise ValueError("min_pixels: must not exceed max_pixels")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean/std: give both or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("std: must be positive")
        if self.dtype == "uint8" and (self.mean is not None or self.channels_first):
            raise ValueError("mean/std and channels_first need dtype = 'float32'")


class MediaProfile(msgspec.Struct, **_STRUCT_OPTS):
    """A model's media preferences for tensors sent to native encoders (ZeroMQ)."""

    image: ImageSpec = ImageSpec()
    # Frames sampled uniformly from a video (vLLM's default num_frames is 32).
    video_frames: int = 32
    # Video frames are resized like images with this spec.
    video: ImageSpec = ImageSpec()
    # Resample audio to this rate (e.g. 16000 for Whisper-style encoders); None keeps it.
    audio_sample_rate: int | None = None

    def __post_init__(self) -> None:
        _at_least("video_frames", self.video_frames, 1)
        if self.audio_sample_rate is not None:
            _at_least("audio_sample_rate", self.audio_sample_rate, 1000)
