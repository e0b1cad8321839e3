"""Images: validate from the header, decode with Pillow, convert to RGB like the engine, hash.

Why Pillow: it is what vLLM and the HF processors decode with, so "the same pixels" means the
same thing on both sides, and it reads the header (format, size) without decoding, which is
where the pixel limits are enforced: a 50 KB PNG that claims 40000x40000 is refused before a
byte of it is inflated. Pillow's own bomb guard (``Image.MAX_IMAGE_PIXELS``) is left as it is
(a process-wide setting); our per-request limit sits below it.

Synchronous and CPU-bound: :mod:`.preprocess` runs it in a worker thread for larger items.
Only the first frame of an animated image is used, as the engine does.
"""

from __future__ import annotations

import io
import math
from typing import Any

import msgspec
import numpy as np
from PIL import Image

from .hashing import ItemHasher
from .limits import ImageSpec, MediaError, MediaLimits

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageInfo(msgspec.Struct, frozen=True):
    """What the header said, and what decoding found."""

    format: str  #: Pillow's format name (PNG, JPEG, ...)
    width: int
    height: int
    mode: str  #: the file's own mode (RGB, RGBA, P, L, CMYK, ...) before conversion


def open_image(data: bytes, limits: MediaLimits) -> tuple[Image.Image, ImageInfo]:
    """Parse the header only, and enforce the format and pixel limits before any decoding.

    Raises:
        MediaError: not an accepted image format, or too many pixels / too long an edge.
    """
    try:
        im = Image.open(io.BytesIO(data), formats=limits.image_formats)
    except Image.DecompressionBombError:
        raise MediaError(
            f"image has more pixels than {limits.max_image_pixels} (max_image_pixels)",
            reason="image_too_many_pixels",
        ) from None
    except Exception:  # Pillow's parsers raise many types on hostile headers
        names = ", ".join(limits.image_formats)
        raise MediaError(
            f"cannot read the image: not a valid image in an accepted format ({names})",
            reason="image_unreadable",
        ) from None
    try:
        info = _check(im, limits)
    except BaseException:
        im.close()
        raise
    return im, info


def _check(im: Image.Image, limits: MediaLimits) -> ImageInfo:
    width, height = im.size
    # Frames of an animated image are not counted: for GIF that means walking the whole file.
    info = ImageInfo(im.format or "?", width, height, im.mode)
    if width <= 0 or height <= 0:
        raise MediaError("image has no pixels", reason="image_unreadable")
    if width * height > limits.max_image_pixels:
        raise MediaError(
            f"image is {width}x{height} = {width * height} pixels; at most "
            f"{limits.max_image_pixels} are allowed (max_image_pixels)",
            reason="image_too_many_pixels",
        )
    if max(width, height) > limits.max_image_edge:
        raise MediaError(
            f"image is {width}x{height}; edges of at most {limits.max_image_edge} pixels are "
            "allowed (max_image_edge)",
            reason="image_too_large_edge",
        )
    return info


def to_rgb(im: Image.Image) -> Image.Image:
    """The engine's conversion (vLLM ``convert_image_mode(image, "RGB")``): RGBA is composited
    over white; every other mode goes through Pillow's ``convert("RGB")``."""
    if im.mode == "RGB":
        return im
    if im.mode == "RGBA":
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(im, mask=im.getchannel("A"))
        return out
    return im.convert("RGB")


class DecodedImage(msgspec.Struct, frozen=True):
    info: ImageInfo
    #: RGB pixels, row-major, 3 bytes per pixel (``Image.tobytes()``)
    pixels: bytes


def decode_image(data: bytes, limits: MediaLimits) -> DecodedImage:
    """Header checks, then a full decode of the first frame, converted to RGB.

    Raises:
        MediaError: see :func:`open_image`; or the image data is corrupt or truncated.
    """
    return finish_image(*open_image(data, limits))


def finish_image(im: Image.Image, info: ImageInfo) -> DecodedImage:
    """Decode an image :func:`open_image` has vetted (closes it)."""
    try:
        with im:
            im.load()
            rgb = to_rgb(im)
            pixels = rgb.tobytes()
    except MediaError:
        raise
    except Exception:
        raise MediaError(
            "cannot decode the image: corrupt or truncated data", reason="image_unreadable"
        ) from None
    if len(pixels) != info.width * info.height * 3:  # defensive: a plugin lied about its size
        raise MediaError("cannot decode the image: inconsistent size", reason="image_unreadable")
    return DecodedImage(info, pixels)


def hash_image(decoded: DecodedImage, hasher: ItemHasher) -> None:
    """Write the image into ``hasher`` as vLLM serialises an RGB PIL image."""
    i = decoded.info
    hasher.update_image("image", "RGB", decoded.pixels, (i.height, i.width, 3))


def rgb_array(decoded: DecodedImage) -> np.ndarray:
    """The pixels as an (H, W, 3) uint8 array, without copying."""
    i = decoded.info
    return np.frombuffer(decoded.pixels, dtype=np.uint8).reshape(i.height, i.width, 3)


def fit_size(width: int, height: int, spec: ImageSpec) -> tuple[int, int]:
    """The output size for ``spec``: aspect kept, pixels within [min, max], edges rounded to
    ``multiple_of`` (at least one multiple each)."""
    m = spec.multiple_of
    w, h = float(width), float(height)
    pixels = w * h
    if spec.max_pixels is not None and pixels > spec.max_pixels:
        scale = math.sqrt(spec.max_pixels / pixels)
        w, h = w * scale, h * scale
    elif spec.min_pixels is not None and pixels < spec.min_pixels:
        scale = math.sqrt(spec.min_pixels / pixels)
        w, h = w * scale, h * scale
    out_w, out_h = max(m, round(w / m) * m), max(m, round(h / m) * m)
    if spec.max_pixels is not None:  # rounding up may have crossed the bound again
        while out_w * out_h > spec.max_pixels and (out_w > m or out_h > m):
            if out_w >= out_h:
                out_w -= m
            else:
                out_h -= m
    return out_w, out_h


def apply_spec(rgb: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Resize and normalise one (H, W, 3) uint8 image for a model (the ZeroMQ tensor path)."""
    height, width = rgb.shape[:2]
    out_w, out_h = fit_size(width, height, spec)
    if (out_w, out_h) != (width, height):
        im = Image.fromarray(rgb, "RGB").resize((out_w, out_h), _RESAMPLE[spec.resample])
        rgb = np.asarray(im)
    if spec.dtype == "uint8":
        return np.ascontiguousarray(rgb)
    out: Any = rgb.astype(np.float32) / np.float32(255.0)
    if spec.mean is not None and spec.std is not None:
        out = (out - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if spec.channels_first:
        out = out.transpose(2, 0, 1)
    return np.ascontiguousarray(out, dtype=np.float32)
