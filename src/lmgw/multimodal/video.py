"""Video: validate from the container, decode every frame to RGB, hash frame by frame.

Why PyAV: it wraps FFmpeg in a self-contained wheel (no system ffmpeg, no OpenCV with its GUI
dependencies), decodes every common codec, exposes the container's metadata (size, frame count,
duration) before decoding, and lets us pass FFmpeg's own guards: ``format_whitelist`` (only
the demuxers in ``video_demuxers``: no playlists or concat lists that would open other files or
URLs) and the decoder's ``max_pixels``.

Every frame is decoded, because the hash covers every frame and a frame count in the header
can lie; the limits bound that work (``max_video_frames``, ``max_video_duration_s``,
``max_video_pixels``). Frames stream into the hasher one at a time, so memory stays at one
frame. Tensors for native encoders (a uniform sample of ``MediaProfile.video_frames`` frames)
are kept during the same pass when the container declares its frame count, else taken by a
second decode (:func:`sample_frames`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import av
import msgspec
import numpy as np

from .hashing import ItemHasher
from .limits import MediaError, MediaLimits


class VideoInfo(msgspec.Struct, frozen=True):
    format: str  #: demuxer name (e.g. "mov,mp4,m4a,3gp,3g2,mj2")
    codec: str
    width: int
    height: int
    frames: int  #: frames decoded
    duration_s: float  #: last frame's end, else the container's duration
    fps: float | None


def _unreadable(why: str = "corrupt or unsupported data") -> MediaError:
    return MediaError(f"cannot decode the video: {why}", reason="video_unreadable")


def _too_many_pixels(width: int, height: int, limits: MediaLimits) -> MediaError:
    return MediaError(
        f"video frames are {width}x{height} = {width * height} pixels; at most "
        f"{limits.max_video_pixels} are allowed (max_video_pixels)",
        reason="video_too_many_pixels",
    )


def _too_many_frames(limits: MediaLimits) -> MediaError:
    return MediaError(
        f"video has more than {limits.max_video_frames} frames (max_video_frames)",
        reason="video_too_many_frames",
    )


def _too_long(seconds: float, limits: MediaLimits) -> MediaError:
    return MediaError(
        f"video is {seconds:.1f}s long; at most {limits.max_video_duration_s:g}s is allowed "
        "(max_video_duration_s)",
        reason="video_too_long",
    )


def sample_indices(total: int, num: int) -> np.ndarray:
    """vLLM's uniform frame sampling: ``linspace(0, total - 1, num)`` truncated to ints."""
    if total <= num:
        return np.arange(total)
    return np.linspace(0, total - 1, num, dtype=int)


class _Opened:
    """A container opened under the limits, its video stream, and what it declared."""

    def __init__(self, data: bytes, limits: MediaLimits) -> None:
        options = {"format_whitelist": ",".join(limits.video_demuxers)}
        self.container = av.open(io.BytesIO(data), options=options, metadata_errors="ignore")
        try:
            if not self.container.streams.video:
                raise MediaError("no video stream found", reason="video_unreadable")
            self.stream = stream = self.container.streams.video[0]
            cc = stream.codec_context
            width, height = int(cc.width or 0), int(cc.height or 0)
            if width * height > limits.max_video_pixels:
                raise _too_many_pixels(width, height, limits)
            # FFmpeg refuses frames above this itself, before allocating them
            cc.options = {"max_pixels": str(limits.max_video_pixels)}
            self.declared_frames = max(int(stream.frames or 0), 0)
            if self.declared_frames > limits.max_video_frames:
                raise _too_many_frames(limits)
            duration = 0.0
            if stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            elif self.container.duration:
                duration = self.container.duration / av.time_base
            if duration > limits.max_video_duration_s:
                raise _too_long(duration, limits)
            self.declared_duration = duration
            self.fps = float(stream.average_rate) if stream.average_rate else None
        except BaseException:
            self.container.close()
            raise

    def frames(self, limits: MediaLimits) -> Iterator[av.VideoFrame]:
        """Decoded frames, each checked against the limits before it is converted."""
        for n, frame in enumerate(self.container.decode(self.stream), 1):
            if n > limits.max_video_frames:
                raise _too_many_frames(limits)
            if frame.width * frame.height > limits.max_video_pixels:
                raise _too_many_pixels(frame.width, frame.height, limits)
            t = frame.time
            if t is not None and t > limits.max_video_duration_s:
                raise _too_long(t, limits)
            yield frame

    def close(self) -> None:
        self.container.close()


def decode_video(
    data: bytes, limits: MediaLimits, hasher: ItemHasher | None, *, keep_frames: int = 0
) -> tuple[VideoInfo, np.ndarray | None]:
    """Decode and hash every frame (as ``video.<i>`` RGB arrays, see :mod:`.hashing`).

    Args:
        hasher: receives the frames; None to only validate.
        keep_frames: when > 0 and the container declares its frame count, also return that
            many uniformly sampled frames as a (T, H, W, 3) uint8 array (None otherwise).

    Raises:
        MediaError: unreadable, no video stream, or past a limit.
    """
    try:
        opened = _Opened(data, limits)
    except MediaError:
        raise
    except Exception:
        raise _unreadable() from None
    try:
        wanted: set[int] = set()
        if keep_frames and opened.declared_frames:
            wanted = set(sample_indices(opened.declared_frames, keep_frames).tolist())
        kept: list[np.ndarray] = []
        n, last_end = 0, 0.0
        width = height = 0
        for frame in opened.frames(limits):
            rgb = frame.to_ndarray(format="rgb24")
            if n == 0:
                height, width = rgb.shape[:2]
            if hasher is not None:
                hasher.update(f"video.{n}", rgb)
            if n in wanted and rgb.shape[:2] == (height, width):
                kept.append(rgb)
            if frame.time is not None:
                step = 1.0 / opened.fps if opened.fps else 0.0
                last_end = max(last_end, frame.time + step)
            n += 1
        codec = opened.stream.codec_context.name
        fmt = opened.container.format.name
    except MediaError:
        raise
    except Exception:
        raise _unreadable() from None
    finally:
        opened.close()
    if n == 0:
        raise _unreadable("no frames")
    duration = last_end or opened.declared_duration
    info = VideoInfo(fmt, codec, width, height, n, duration, opened.fps)
    frames = None
    if wanted and n == opened.declared_frames and len(kept) == len(wanted):
        frames = np.stack(kept)
    return info, frames


def sample_frames(data: bytes, limits: MediaLimits, total: int, num: int) -> np.ndarray:
    """``num`` uniformly sampled frames of a video known to have ``total`` frames, as
    (T, H, W, 3) uint8, every frame at the first frame's size (a second decode)."""
    wanted = set(sample_indices(total, num).tolist())
    opened = _Opened(data, limits)
    kept: list[np.ndarray] = []
    size: tuple[int, int] | None = None
    try:
        for i, frame in enumerate(opened.frames(limits)):
            if size is None:
                size = (frame.width, frame.height)
            if i in wanted:
                if (frame.width, frame.height) != size:
                    frame = frame.reformat(width=size[0], height=size[1])
                kept.append(frame.to_ndarray(format="rgb24"))
    finally:
        opened.close()
    if not kept:
        raise _unreadable("no frames")
    return np.stack(kept)
