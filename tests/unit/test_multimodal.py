"""The multimodal preprocessor: content walk, each media kind, each limit (the right 400 and
param), the hash rule (stable across lossless encodings, sensitive to pixels, uuid honoured,
the exact vLLM byte layout), the address policy, and tensors for native encoders.

All media are generated here: Pillow images, numpy -> soundfile audio, PyAV-encoded videos.
"""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import os
import struct
import zlib
from pathlib import Path

import av
import msgspec
import numpy as np
import pytest
import soundfile as sf
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from lmgw.errors import GatewayError
from lmgw.multimodal import (
    ImageSpec,
    MediaError,
    MediaLimits,
    MediaProfile,
    find_media_parts,
    hash_value,
    preprocess,
    uuid_hash,
)
from lmgw.multimodal.fetch import AddressPolicy, decode_data_url, fetch_url
from lmgw.multimodal.image import fit_size

RNG = np.random.default_rng(1234)
PIXELS = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)


# -- media factories ---------------------------------------------------------------------------


def encode_image(arr: np.ndarray, fmt: str, mode: str | None = None, **kw: object) -> bytes:
    im = Image.fromarray(arr)
    if mode is not None:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def encode_audio(samples: np.ndarray, rate: int, fmt: str, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def encode_video(
    frames: int = 12, size: tuple[int, int] = (64, 48), fmt: str = "mp4", codec: str = "libx264"
) -> bytes:
    w, h = size
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            arr = np.full((h, w, 3), (i * 20) % 256, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` with (almost) no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def data_url(data: bytes, media_type: str = "application/octet-stream") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def image_part(url: str | None, **extra: object) -> dict:
    return {"type": "image_url", "image_url": {"url": url} if url is not None else None, **extra}


def chat(*parts: dict, **extra: object) -> dict:
    content = [{"type": "text", "text": "describe"}, *parts]
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


STEREO = (RNG.random((4000, 2), dtype=np.float32) - 0.5).astype(np.float32)
WAV = encode_audio(STEREO, 16000, "WAV")
FLAC = encode_audio(sf.read(io.BytesIO(WAV), dtype="int16")[0], 16000, "FLAC")


@pytest.fixture(scope="module")
def mp4() -> bytes:
    return encode_video()


async def run(body: dict, **limits: object) -> list:
    return await preprocess(body, MediaLimits(**limits), model_id="org/model")


async def refused(body: dict, **limits: object) -> MediaError:
    with pytest.raises(MediaError) as info:
        await run(body, **limits)
    err = info.value
    assert isinstance(err, GatewayError)
    assert err.status == 400
    return err


# -- the content walk --------------------------------------------------------------------------


def test_find_media_parts_paths_and_shapes() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "plain text"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "x"},
                    {"type": "image_url", "image_url": {"url": "https://a/b.png"}},
                    {"image_url": "https://a/c.png"},  # vLLM's untyped, string form
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                    {"type": "video_url", "video_url": {"url": "https://a/v.mp4"}, "uuid": "v1"},
                    {"type": "audio_url", "audio_url": None, "uuid": "a1"},
                ],
            },
        ]
    }
    parts = find_media_parts(body)
    assert [(p.kind, p.type, p.param) for p in parts] == [
        ("image", "image_url", "messages[1].content[1]"),
        ("image", "image_url", "messages[1].content[2]"),
        ("audio", "input_audio", "messages[1].content[3]"),
        ("video", "video_url", "messages[1].content[4]"),
        ("audio", "audio_url", "messages[1].content[5]"),
    ]
    assert parts[1].url == "https://a/c.png"
    assert (parts[2].data, parts[2].format) == ("AAAA", "wav")
    assert parts[3].uuid == "v1"
    assert parts[4].url is None and parts[4].uuid == "a1"
    assert find_media_parts({"prompt": "no messages"}) == []
    assert find_media_parts([1, 2]) == []


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "image_url", "image_url": {"url": 7}}, "messages[0].content[1].image_url.url"),
        ({"type": "image_url", "image_url": {}}, "messages[0].content[1].image_url.url"),
        ({"type": "image_url", "image_url": ""}, "messages[0].content[1].image_url"),
        ({"type": "input_audio", "input_audio": "AAAA"}, "messages[0].content[1].input_audio"),
        (
            {"type": "input_audio", "input_audio": {"data": 5}},
            "messages[0].content[1].input_audio.data",
        ),
        (
            {"type": "image_url", "image_url": {"url": "data:,"}, "uuid": 3},
            "messages[0].content[1].uuid",
        ),
    ],
)
async def test_malformed_part_is_a_400_naming_the_field(part: dict, param: str) -> None:
    err = await refused(chat(part))
    assert err.reason == "bad_content_part"
    assert err.param == param
    body = msgspec.json.decode(err.body())
    assert body["error"]["param"] == param and body["error"]["code"] == 400
    assert body["error"]["type"] == "BadRequestError"


# -- images and the hash rule ------------------------------------------------------------------


async def test_same_pixels_same_hash_across_lossless_encodings() -> None:
    encodings = [
        encode_image(PIXELS, "PNG"),
        encode_image(PIXELS, "WEBP", lossless=True),
        encode_image(PIXELS, "BMP"),
        encode_image(PIXELS, "TIFF"),
        encode_image(PIXELS, "PNG", mode="RGBA"),  # opaque alpha composites to the same RGB
    ]
    items = await run(chat(*(image_part(data_url(e)) for e in encodings)))
    assert len({it.hash for it in items}) == 1
    assert [it.format for it in items] == ["PNG", "WEBP", "BMP", "TIFF", "PNG"]
    assert all(
        (it.width, it.height, it.kind, it.source) == (32, 24, "image", "data") for it in items
    )
    assert [it.nbytes for it in items] == [len(e) for e in encodings]


async def test_palette_image_hashes_like_its_rgb_pixels() -> None:
    few = PIXELS // 128 * 128  # 8 colours: a palette holds them exactly
    pal = Image.fromarray(few).quantize(colors=8)
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    a, b = await run(
        chat(image_part(data_url(buf.getvalue())), image_part(data_url(encode_image(few, "PNG"))))
    )
    assert a.hash == b.hash


async def test_any_pixel_change_changes_the_hash() -> None:
    other = PIXELS.copy()
    other[5, 7, 1] ^= 1
    transposed = np.ascontiguousarray(PIXELS.reshape(32, 24, 3))  # same bytes, other shape
    items = await run(
        chat(
            image_part(data_url(encode_image(PIXELS, "PNG"))),
            image_part(data_url(encode_image(other, "PNG"))),
            image_part(data_url(encode_image(transposed, "PNG"))),
        )
    )
    assert len({it.hash for it in items}) == 3


async def test_hash_depends_on_model_and_processor_kwargs() -> None:
    body = chat(image_part(data_url(encode_image(PIXELS, "PNG"))))
    limits = MediaLimits()
    (a,) = await preprocess(body, limits, model_id="m1")
    (b,) = await preprocess(body, limits, model_id="m2")
    (c,) = await preprocess(
        {**body, "mm_processor_kwargs": {"max_pixels": 1024}}, limits, model_id="m1"
    )
    assert len({a.hash, b.hash, c.hash}) == 3


async def test_deep_processor_kwargs_are_refused() -> None:
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    body = chat(image_part(data_url(encode_image(PIXELS, "PNG"))), mm_processor_kwargs={"x": deep})
    err = await refused(body)
    assert (err.reason, err.param) == ("bad_processor_kwargs", "mm_processor_kwargs")


def _expected_image_hash(model_id: str, arr: np.ndarray, kwargs: list[tuple[bytes, bytes]]) -> str:
    """vLLM's layout written out by hand (hash_kwargs(model_id=..., image=<RGB PIL image>))."""
    h = hashlib.sha256()
    for part in (b"model_id", model_id.encode(), b"image", b"image.mode", b"RGB", b"image.data"):
        h.update(part)
    h.update(b"ndarray.dtype")
    h.update(b"|u1")
    for i, n in enumerate(arr.shape):
        h.update(b"ndarray.shape.%d" % i)
        h.update(struct.pack("<q", n))
    h.update(b"ndarray.data")
    h.update(arr.tobytes())
    for k, v in kwargs:
        h.update(k)
        h.update(v)
    return h.hexdigest()


async def test_image_hash_is_vllms_byte_layout() -> None:
    arr = np.array([[[1, 2, 3], [250, 251, 252]]], np.uint8)  # 1 x 2
    body = chat(image_part(data_url(encode_image(arr, "PNG"))))
    (item,) = await run(body)
    assert item.hash == _expected_image_hash("org/model", arr, [])
    body["mm_processor_kwargs"] = {"fps": 2, "do_resize": True, "scale": 0.5, "name": "x"}
    (item,) = await run(body)
    kwargs = [
        (b"fps", struct.pack("<q", 2)),
        (b"do_resize", b"\x01"),
        (b"scale", struct.pack("<d", 0.5)),
        (b"name", b"x"),
    ]
    assert item.hash == _expected_image_hash("org/model", arr, kwargs)


async def test_rgba_is_composited_over_white_before_hashing() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)  # fully transparent black
    (item,) = await run(chat(image_part(data_url(encode_image(rgba, "PNG")))))
    assert item.hash == _expected_image_hash("org/model", np.full((2, 2, 3), 255, np.uint8), [])


async def test_jpeg_and_animated_gif_first_frame() -> None:
    frames = [Image.fromarray(np.full((8, 8, 3), c, np.uint8)) for c in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    gif = buf.getvalue()
    jpeg = encode_image(PIXELS, "JPEG", quality=90)
    g, j = await run(chat(image_part(data_url(gif)), image_part(data_url(jpeg))))
    assert (g.format, j.format) == ("GIF", "JPEG")
    assert g.hash == _expected_image_hash("org/model", np.zeros((8, 8, 3), np.uint8), [])


# -- uuid --------------------------------------------------------------------------------------


async def test_uuid_is_the_hash_and_media_is_still_validated() -> None:
    png = encode_image(PIXELS, "PNG")
    items = await run(
        chat(
            image_part(data_url(png), uuid="img-1"),
            image_part(None, uuid="img-2"),
            {"type": "input_audio", "input_audio": None, "uuid": "aud-1"},
        )
    )
    assert [(it.hash, it.uuid, it.source) for it in items] == [
        ("img-1", "img-1", "data"),
        ("img-2", "img-2", "uuid"),
        ("aud-1", "aud-1", "uuid"),
    ]
    assert items[1].data is None and items[1].nbytes == 0
    with pytest.raises(ValueError):
        items[1].array()
    err = await refused(chat(image_part(data_url(b"not an image"), uuid="img-1")))
    assert err.reason == "image_unreadable"


async def test_uuid_with_processor_kwargs_is_hashed_with_them() -> None:
    body = chat(image_part(None, uuid="img-1"), mm_processor_kwargs={"fps": 2})
    (item,) = await run(body)
    h = hashlib.sha256()
    for part in (b"model_id", b"org/model", b"image", b"img-1", b"fps", struct.pack("<q", 2)):
        h.update(part)
    assert item.hash == h.hexdigest() != "img-1"
    kw = {"fps": 2}
    assert (
        uuid_hash("img-1", "image", model_id="org/model", processor_kwargs=kw, algorithm="sha256")
        == item.hash
    )
    assert uuid_hash("u", "image", model_id="x", processor_kwargs=None, algorithm="sha256") == "u"


async def test_missing_media_without_uuid_is_refused() -> None:
    err = await refused(chat(image_part(None)))
    assert err.param == "messages[0].content[1].image_url"


# -- audio -------------------------------------------------------------------------------------


async def test_audio_wav_and_flac_of_same_samples_hash_alike() -> None:
    b64 = base64.b64encode(WAV).decode()
    items = await run(
        chat(
            {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
            {"type": "audio_url", "audio_url": {"url": data_url(FLAC, "audio/flac")}},
            {
                "type": "audio_url",
                "audio_url": {"url": data_url(encode_audio(STEREO * 0.5, 16000, "WAV"))},
            },
        )
    )
    wav, flac, quieter = items
    assert wav.hash == flac.hash != quieter.hash
    assert (wav.source, wav.media_type, wav.format) == ("input_audio", "audio/wav", "WAV")
    assert (flac.format, flac.sample_rate, flac.channels, flac.frames) == ("FLAC", 16000, 2, 4000)
    assert flac.duration_s == pytest.approx(0.25)
    mono = wav.array()
    assert mono.dtype == np.float32 and mono.shape == (4000,)
    expected = sf.read(io.BytesIO(WAV), dtype="float32")[0].mean(axis=1, dtype=np.float32)
    np.testing.assert_array_equal(mono, expected)


async def test_audio_and_video_hash_layouts(mp4: bytes) -> None:
    mono = np.array([0, 16384, -32768, 32767], np.int16)
    wav = encode_audio(mono, 8000, "WAV")
    (item,) = await run(chat({"type": "audio_url", "audio_url": {"url": data_url(wav)}}))
    samples = mono.astype(np.float32) / 32768
    h = hashlib.sha256()
    for part in (b"model_id", b"org/model", b"audio.0", b"ndarray.dtype", b"<f4"):
        h.update(part)
    h.update(b"ndarray.shape.0" + struct.pack("<q", 4) + b"ndarray.data" + samples.tobytes())
    h.update(b"audio.1" + struct.pack("<q", 8000))
    assert item.hash == h.hexdigest()
    with av.open(io.BytesIO(mp4)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    (vid,) = await run(chat({"type": "video_url", "video_url": {"url": data_url(mp4)}}))
    assert vid.hash == hash_value("video", frames, model_id="org/model")


async def test_mp3_decodes() -> None:
    mp3 = encode_audio(STEREO[:, 0], 16000, "MP3", subtype="MPEG_LAYER_III")
    (item,) = await run(
        chat(
            {
                "type": "input_audio",
                "input_audio": {"data": base64.b64encode(mp3).decode(), "format": "mp3"},
            }
        )
    )
    assert item.format == "MP3" and item.sample_rate == 16000 and item.frames > 0


async def test_aac_in_mp4_goes_through_pyav() -> None:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000, layout="mono")
        samples = (np.sin(np.arange(16000) / 10) * 0.3).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = 16000
        for fr in av.AudioResampler(format="fltp", layout="mono", rate=16000).resample(frame):
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    (item,) = await run(chat({"type": "audio_url", "audio_url": {"url": data_url(buf.getvalue())}}))
    assert item.format.startswith("mov") and item.sample_rate == 16000 and item.channels == 1
    assert item.frames > 10000


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        ({"max_audio_duration_s": 0.1}, "audio_too_long"),
        ({"max_audio_channels": 1}, "audio_too_many_channels"),
        ({"min_audio_sample_rate": 22050}, "audio_bad_sample_rate"),
        ({"max_audio_samples": 1000}, "audio_too_many_samples"),
    ],
)
async def test_audio_limits(limits: dict, reason: str) -> None:
    err = await refused(chat({"type": "audio_url", "audio_url": {"url": data_url(WAV)}}), **limits)
    assert err.reason == reason
    assert err.param == "messages[0].content[1]"


async def test_corrupt_audio_is_refused() -> None:
    err = await refused(
        chat({"type": "audio_url", "audio_url": {"url": data_url(b"RIFF" + bytes(40))}})
    )
    assert err.reason == "audio_unreadable"


# -- video -------------------------------------------------------------------------------------


async def test_video_decodes_and_hashes_every_frame(mp4: bytes) -> None:
    (item,) = await run(chat({"type": "video_url", "video_url": {"url": data_url(mp4)}}))
    assert (item.kind, item.width, item.height, item.frames) == ("video", 64, 48, 12)
    assert item.duration_s == pytest.approx(1.2)
    other = encode_video(frames=11)
    (item2,) = await run(chat({"type": "video_url", "video_url": {"url": data_url(other)}}))
    assert item2.hash != item.hash
    (again,) = await run(chat({"type": "video_url", "video_url": {"url": data_url(mp4)}}))
    assert again.hash == item.hash


async def test_video_in_matroska_without_a_frame_count_is_bounded_while_decoding() -> None:
    mkv = encode_video(frames=12, fmt="matroska", codec="mpeg4")
    (item,) = await run(chat({"type": "video_url", "video_url": {"url": data_url(mkv)}}))
    assert item.frames == 12
    err = await refused(
        chat({"type": "video_url", "video_url": {"url": data_url(mkv)}}), max_video_frames=5
    )
    assert err.reason == "video_too_many_frames"


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        ({"max_video_frames": 5}, "video_too_many_frames"),
        ({"max_video_duration_s": 0.5}, "video_too_long"),
        ({"max_video_pixels": 1000}, "video_too_many_pixels"),
        ({"video_demuxers": ("matroska", "webm")}, "video_unreadable"),
    ],
)
async def test_video_limits(mp4: bytes, limits: dict, reason: str) -> None:
    body = chat({"type": "video_url", "video_url": {"url": data_url(mp4)}})
    err = await refused(body, **limits)
    assert err.reason == reason
    assert err.param == "messages[0].content[1]"


async def test_not_a_video_is_refused() -> None:
    # a WAV file: FFmpeg could read it, but its demuxer is not on the video list
    err = await refused(chat({"type": "video_url", "video_url": {"url": data_url(WAV)}}))
    assert err.reason == "video_unreadable"


# -- image limits ------------------------------------------------------------------------------


async def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    bomb = png_header(5000, 5000)  # 25M pixels claimed in ~80 bytes
    err = await refused(chat(image_part(data_url(bomb))), max_image_pixels=1_000_000)
    assert err.reason == "image_too_many_pixels"
    assert "5000x5000" in err.message and "max_image_pixels" in err.message
    # past Pillow's own guard (2 x MAX_IMAGE_PIXELS) Pillow refuses in open(): same answer
    err = await refused(chat(image_part(data_url(png_header(40000, 40000)))))
    assert err.reason == "image_too_many_pixels"


async def test_edge_limit() -> None:
    err = await refused(chat(image_part(data_url(png_header(3000, 2)))), max_image_edge=2048)
    assert err.reason == "image_too_large_edge"


async def test_corrupt_and_unaccepted_images() -> None:
    png = encode_image(PIXELS, "PNG")
    err = await refused(chat(image_part(data_url(png[: len(png) // 2]))))
    assert err.reason == "image_unreadable"
    gif = encode_image(PIXELS, "GIF")
    err = await refused(chat(image_part(data_url(gif))), image_formats=("PNG", "JPEG"))
    assert err.reason == "image_unreadable" and "PNG, JPEG" in err.message


# -- counts and bytes --------------------------------------------------------------------------


async def test_count_limits_name_the_first_item_over() -> None:
    url = data_url(encode_image(PIXELS, "PNG"))
    err = await refused(chat(*[image_part(url)] * 3), max_items=2)
    assert (err.reason, err.param) == ("too_many_items", "messages[0].content[3]")
    err = await refused(chat(*[image_part(url)] * 3), max_images=1)
    assert (err.reason, err.param) == ("too_many_images", "messages[0].content[2]")
    audio = {"type": "audio_url", "audio_url": {"url": data_url(WAV)}}
    err = await refused(chat(image_part(url), audio, audio), max_audios=1)
    assert (err.reason, err.param) == ("too_many_audios", "messages[0].content[3]")
    video = {"type": "video_url", "video_url": {"url": "data:,"}}
    err = await refused(chat(video), max_videos=0)
    assert (err.reason, err.param) == ("too_many_videos", "messages[0].content[1]")


async def test_byte_limits() -> None:
    png = encode_image(PIXELS, "PNG")
    err = await refused(chat(image_part(data_url(png))), max_item_bytes=len(png) - 1)
    assert err.reason == "item_too_large"
    assert err.param == "messages[0].content[1]"
    err = await refused(
        chat(image_part(data_url(png)), image_part(data_url(png))), max_request_bytes=len(png) + 10
    )
    assert err.reason == "request_too_large"


async def test_bad_base64_and_schemes() -> None:
    err = await refused(chat(image_part("data:image/png;base64,@@@@")))
    assert err.reason == "bad_base64"
    err = await refused(chat(image_part("ftp://example.com/a.png")))
    assert err.reason == "unsupported_scheme"
    err = await refused(chat(image_part("data:image/png;base64")))
    assert err.reason == "bad_url"
    err = await refused(chat(image_part("https://example.com/a.png")), allow_remote=False)
    assert err.reason == "unsupported_scheme"


def test_percent_encoded_data_url() -> None:
    assert decode_data_url("data:text/plain,a%20b%FF", 10) == (b"a b\xff", "text/plain")
    with pytest.raises(MediaError):
        decode_data_url("data:,abcdef", 3)


async def test_one_failure_fails_the_request_with_its_param() -> None:
    good = image_part(data_url(encode_image(PIXELS, "PNG")))
    bad = image_part(data_url(b"garbage"))
    err = await refused(chat(good, good, bad, good))
    assert err.param == "messages[0].content[3]"


async def test_items_come_back_in_request_order_with_offloaded_decodes() -> None:
    urls = [
        data_url(encode_image(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8), "PNG"))
        for _ in range(6)
    ]
    limiter = trio.CapacityLimiter(2)
    items = await preprocess(
        chat(*(image_part(u) for u in urls)),
        MediaLimits(offload_bytes=0, max_concurrency=3),
        cpu_limiter=limiter,
    )
    assert [it.index for it in items] == [1, 2, 3, 4, 5, 6]
    assert len({it.hash for it in items}) == 6


# -- file:// -----------------------------------------------------------------------------------


async def test_file_urls_only_below_the_root(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    png = encode_image(PIXELS, "PNG")
    (root / "a b.png").write_bytes(png)
    (tmp_path / "secret.png").write_bytes(png)
    os.symlink(tmp_path / "secret.png", root / "link.png")
    ok_url = f"file://{root}/a%20b.png"

    err = await refused(chat(image_part(ok_url)))
    assert err.reason == "file_disabled"
    (item,) = await run(chat(image_part(ok_url)), allowed_local_root=str(root))
    assert (item.source, item.nbytes) == ("file", len(png))
    for url, reason in [
        (f"file://{root}/../secret.png", "file_outside_root"),
        (f"file://{root}/link.png", "file_outside_root"),
        (f"file://{root}/missing.png", "file_not_found"),
        (f"file://{root}", "file_unreadable"),
        (f"file://otherhost{root}/a.png", "bad_url"),
    ]:
        err = await refused(chat(image_part(url)), allowed_local_root=str(root))
        assert err.reason == reason, url


# -- the address policy and URL vetting (no network) -------------------------------------------


@pytest.mark.parametrize(
    "addr",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "169.254.170.2",
        "100.64.0.1",
        "100.100.100.200",
        "168.63.129.16",
        "0.0.0.0",
        "224.0.0.1",
        "239.1.2.3",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.5",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::1",
        "64:ff9b::a00:1",
        "fec0::1",
        "2001:db8::1",
    ],
)
def test_non_public_addresses_are_refused(addr: str) -> None:
    assert AddressPolicy().refusal(ipaddress.ip_address(addr)) is not None


@pytest.mark.parametrize(
    "addr", ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_pass(addr: str) -> None:
    assert AddressPolicy().refusal(ipaddress.ip_address(addr)) is None


def test_allowed_networks_and_metadata_exactness() -> None:
    policy = AddressPolicy(("10.0.0.0/8", "169.254.0.0/16", "::1/128"))
    assert policy.refusal(ipaddress.ip_address("10.9.8.7")) is None
    assert policy.refusal(ipaddress.ip_address("::1")) is None
    assert policy.refusal(ipaddress.ip_address("169.254.1.1")) is None
    assert policy.refusal(ipaddress.ip_address("169.254.169.254")) == "a cloud metadata address"
    assert policy.refusal(ipaddress.ip_address("192.168.0.1")) is not None
    exact = AddressPolicy(("169.254.169.254/32",))
    assert exact.refusal(ipaddress.ip_address("169.254.169.254")) is None


class RecordingResolver:
    def __init__(self, *addrs: str) -> None:
        self.addrs = addrs
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list:
        self.calls.append(host)
        out = []
        for a in self.addrs:
            ip = ipaddress.ip_address(a)
            family = 10 if ip.version == 6 else 2
            out.append((family, (a, port, 0, 0) if ip.version == 6 else (a, port)))
        return out


@pytest.mark.parametrize(
    ("url", "limits", "reason"),
    [
        ("http://user:pw@example.com/a.png", {}, "bad_url"),
        ("http://example.com:99999/a.png", {}, "bad_url"),
        ("http://exa mple.com/a.png", {}, "bad_url"),
        ("http://example.com/a.png", {"allow_plain_http": False}, "unsupported_scheme"),
        (
            "https://evil.com/a.png",
            {"allowed_domains": ("example.com", ".cdn.net")},
            "domain_not_allowed",
        ),
        (
            "https://x.example.com/a.png",
            {"allowed_domains": ("example.com",)},
            "domain_not_allowed",
        ),
        ("http://127.0.0.1/a.png", {}, "blocked_address"),
        ("http://[::1]:8080/a.png", {}, "blocked_address"),
        (
            "http://169.254.169.254/latest/meta-data/",
            {"allowed_networks": ("169.254.0.0/16",)},
            "blocked_address",
        ),
    ],
)
async def test_urls_refused_before_any_connection(url: str, limits: dict, reason: str) -> None:
    resolver = RecordingResolver("8.8.8.8")
    with pytest.raises(MediaError) as info:
        await fetch_url(url, MediaLimits(**limits), resolver=resolver)
    assert info.value.reason == reason
    assert resolver.calls == []  # refused from the URL alone


async def test_any_private_answer_refuses_the_host() -> None:
    resolver = RecordingResolver("93.184.216.34", "10.0.0.5")  # one public, one private
    with pytest.raises(MediaError) as info:
        await fetch_url("https://cdn.example.com/a.png", MediaLimits(), resolver=resolver)
    assert info.value.reason == "blocked_address"
    assert "10.0.0.5" not in info.value.message  # internal DNS is not echoed
    assert resolver.calls == ["cdn.example.com"]
    resolver = RecordingResolver("::ffff:169.254.169.254")
    with pytest.raises(MediaError) as info:
        await fetch_url(
            "https://x.cdn.net/a", MediaLimits(allowed_domains=(".cdn.net",)), resolver=resolver
        )
    assert info.value.reason == "blocked_address"


# -- configuration -----------------------------------------------------------------------------


def test_limits_validate() -> None:
    cfg = msgspec.convert({"max_images": 3, "allowed_networks": ["10.0.0.0/8"]}, MediaLimits)
    assert cfg.max_images == 3 and cfg.allowed_networks == ("10.0.0.0/8",)
    hash(cfg)  # hashable: derived state is cached per limits object
    for bad in (
        {"max_image_pixels": 0},
        {"allowed_networks": ["10.0.0.0/33"]},
        {"allowed_local_root": "relative/dir"},
        {"image_formats": ["PNGG"]},
        {"fetch_timeout_s": 0},
        {"max_imagez": 1},
        {"hash_algorithm": "md5"},
    ):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, MediaLimits)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"mean": [0.5, 0.5, 0.5]}, ImageSpec)


# -- tensors for native encoders ---------------------------------------------------------------


def test_fit_size() -> None:
    spec = ImageSpec(max_pixels=28 * 28 * 4, multiple_of=28)
    w, h = fit_size(1000, 500, spec)
    assert w % 28 == 0 and h % 28 == 0 and w * h <= 28 * 28 * 4 and w >= h
    assert fit_size(10, 10, ImageSpec(min_pixels=400)) == (20, 20)
    assert fit_size(33, 17, ImageSpec()) == (33, 17)


async def test_arrays_for_native_encoders(mp4: bytes) -> None:
    profile = MediaProfile(
        image=ImageSpec(
            max_pixels=16 * 16,
            multiple_of=8,
            dtype="float32",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            channels_first=True,
        ),
        video_frames=4,
        audio_sample_rate=8000,
    )
    body = chat(
        image_part(data_url(encode_image(PIXELS, "PNG"))),
        {"type": "audio_url", "audio_url": {"url": data_url(WAV)}},
        {"type": "video_url", "video_url": {"url": data_url(mp4)}},
    )
    img, aud, vid = await preprocess(body, MediaLimits(), profile=profile)
    x = img.array(profile)
    assert x.dtype == np.float32 and x.shape[0] == 3 and x.shape[1] % 8 == 0
    assert x.shape[1] * x.shape[2] <= 256 and x.min() >= -1.0 and x.max() <= 1.0
    assert img.array().shape == (24, 32, 3)  # default profile: the decoded pixels
    a = aud.array(profile)
    assert a.dtype == np.float32 and abs(len(a) - 2000) <= 64
    v = vid.array(profile)
    assert v.shape == (4, 48, 64, 3)
    # frames 0, 3, 7, 11 (vLLM's linspace sampling) were grey levels i * 20, lossy-coded
    np.testing.assert_allclose([f.mean() for f in v], [0, 60, 140, 220], atol=4)
    # without a profile at preprocess time the same tensors come from a second decode
    (vid2,) = await preprocess(
        chat({"type": "video_url", "video_url": {"url": data_url(mp4)}}), MediaLimits()
    )
    np.testing.assert_array_equal(vid2.array(profile), v)


# -- a property: lossless round trips never change the hash ------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arr=hnp.arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12), st.just(3))),
    fmt=st.sampled_from(["BMP", "TIFF", "WEBP"]),
)
def test_property_lossless_encodings_agree(arr: np.ndarray, fmt: str) -> None:
    kw = {"lossless": True} if fmt == "WEBP" else {}

    async def both() -> list:
        return await run(
            chat(
                image_part(data_url(encode_image(arr, "PNG"))),
                image_part(data_url(encode_image(arr, fmt, **kw))),
            )
        )

    a, b = trio.run(both)
    assert a.hash == b.hash == _expected_image_hash("org/model", arr, [])
