"""Fuzzing the media decoders and the content walk with hostile bytes.

The promise, as for the HTTP parsers: whatever the bytes (garbage, truncated, bit-flipped,
spliced valid files), a decoder returns a decoded item within the limits or raises
:class:`MediaError` (a 400) — never another exception, never an item past a limit. Seeds are
small valid files of each format, so mutations reach past the magic numbers into the real
parsers (BMP, TIFF, GIF, JPEG and WebP carry no checksums, unlike PNG's CRCs).
Examples are few and inputs small, so the whole file stays within a few seconds.
"""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lmgw.multimodal import MediaError, MediaLimits, find_media_parts
from lmgw.multimodal.audio import decode_audio
from lmgw.multimodal.fetch import decode_base64, decode_data_url
from lmgw.multimodal.hashing import ItemHasher
from lmgw.multimodal.image import decode_image
from lmgw.multimodal.video import decode_video

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = MediaLimits(
    max_image_pixels=256 * 256,
    max_audio_duration_s=5.0,
    max_video_frames=64,
    max_video_pixels=256 * 256,
    max_video_duration_s=10.0,
)
RNG = np.random.default_rng(7)
#: Pillow warns about corrupt EXIF and TIFF tags in mutated files; only exceptions matter here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _image(fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    arr = RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if fmt == "GIF":
        im = im.quantize(16)
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _audio(fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(
        buf, (RNG.random((800, 2)) - 0.5).astype(np.float32), 8000, format=fmt, subtype=subtype
    )
    return buf.getvalue()


def _video(fmt: str, codec: str) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=5)
        s.width, s.height, s.pix_fmt = 32, 16, "yuv420p"
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((16, 32, 3), i * 60, np.uint8), "rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


IMAGE_SEEDS = [
    _image("PNG"),
    _image("BMP"),
    _image("GIF"),
    _image("TIFF"),
    _image("JPEG", quality=80),
    _image("WEBP", lossless=True),
]
AUDIO_SEEDS = [_audio("WAV", "PCM_16"), _audio("FLAC", "PCM_16"), _audio("OGG", "VORBIS")]
VIDEO_SEEDS = [_video("mp4", "libx264"), _video("matroska", "mpeg4")]


def _flip(seed: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(seed)
    for pos, val in edits:
        out[pos % len(out)] = val
    return bytes(out)


def hostile(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Garbage, or a seed truncated, overwritten in a few places, or with garbage spliced in."""
    seed = st.sampled_from(seeds)
    byte_edits = st.lists(
        st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=12
    )
    return st.one_of(
        st.binary(max_size=512),
        st.tuples(seed, st.integers(0, 1 << 20)).map(lambda t: t[0][: t[1] % (len(t[0]) + 1)]),
        st.tuples(seed, byte_edits).map(lambda t: _flip(*t)),
        st.tuples(seed, st.integers(0, 1 << 20), st.binary(min_size=1, max_size=64)).map(
            lambda t: t[0][: t[1] % len(t[0])] + t[2] + t[0][t[1] % len(t[0]) :]
        ),
    )


@SETTINGS
@given(data=hostile(IMAGE_SEEDS))
def test_image_decoder_gives_an_image_or_a_400(data: bytes) -> None:
    try:
        out = decode_image(data, LIMITS)
    except MediaError as err:
        assert err.status == 400 and err.reason.startswith("image_")
        return
    i = out.info
    assert 0 < i.width * i.height <= LIMITS.max_image_pixels
    assert len(out.pixels) == i.width * i.height * 3


@SETTINGS
@given(data=hostile(AUDIO_SEEDS))
def test_audio_decoder_gives_samples_or_a_400(data: bytes) -> None:
    try:
        out = decode_audio(data, LIMITS)
    except MediaError as err:
        assert err.status == 400 and err.reason.startswith("audio_")
        return
    assert out.samples.dtype == np.float32 and out.samples.ndim == 1
    assert len(out.samples) == out.info.frames > 0
    assert out.info.duration_s <= LIMITS.max_audio_duration_s


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hostile(VIDEO_SEEDS))
def test_video_decoder_gives_frames_or_a_400(data: bytes) -> None:
    try:
        info, _ = decode_video(data, LIMITS, ItemHasher())
    except MediaError as err:
        assert err.status == 400 and err.reason.startswith("video_")
        return
    assert 1 <= info.frames <= LIMITS.max_video_frames
    assert info.width * info.height <= LIMITS.max_video_pixels


@SETTINGS
@given(payload=st.text(max_size=200), header=st.text(max_size=40))
def test_data_urls_and_base64_give_bytes_or_a_400(payload: str, header: str) -> None:
    for call in (
        lambda: decode_base64(payload, 64),
        lambda: decode_data_url(f"data:{header},{payload}", 64),
    ):
        try:
            out = call()
        except MediaError as err:
            assert err.status == 400
            continue
        data = out if isinstance(out, bytes) else out[0]
        assert len(data) <= 64


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
PART_KEYS = st.sampled_from(
    ["type", "image_url", "input_audio", "video_url", "audio_url", "uuid", "url", "data"]
)
PART = st.dictionaries(
    PART_KEYS, JSON | st.sampled_from(["image_url", "input_audio", "video_url"]), max_size=4
)


@SETTINGS
@given(
    content=st.lists(PART | JSON, max_size=5),
    role=JSON,
)
def test_content_walk_gives_parts_or_a_400(content: list, role: object) -> None:
    body = {"messages": [{"role": role, "content": content}, {"content": "text"}, 5]}
    try:
        parts = find_media_parts(body)
    except MediaError as err:
        assert err.status == 400 and err.param and err.param.startswith("messages[0].content[")
        return
    for p in parts:
        assert p.url is not None or p.data is not None or p.uuid is not None
