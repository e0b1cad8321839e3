"""Audio: validate from the header, decode to mono float32, hash.

Why these libraries: soundfile (libsndfile, bundled in its wheel) reads WAV, FLAC, OGG/Vorbis,
Opus and MP3, which covers OpenAI's ``input_audio`` formats (wav, mp3), gives the frame count
and rate from the header before decoding, and converts integer PCM to float32 exactly (so a
16-bit WAV and a 16-bit FLAC of the same samples decode to the same floats). What it cannot
read (AAC in MP4/M4A, WebM) goes to PyAV (FFmpeg, also a self-contained wheel) restricted to a
list of demuxers. Channels are averaged to mono, as vLLM's loader (librosa) does. PyAV's
resampler (libswresample) also serves the optional resampling for native encoders.

Memory is bounded while decoding: blocks are downmixed as they are read, and reading stops
past ``max_audio_duration_s`` whatever the header claimed.
"""

from __future__ import annotations

import io
import math

import av
import msgspec
import numpy as np
import soundfile as sf

from .limits import MediaError, MediaLimits

_BLOCK = 65536


class AudioInfo(msgspec.Struct, frozen=True):
    format: str  #: container/codec as the decoder names it (WAV, FLAC, MP3, OGG, mov,...)
    sample_rate: int
    channels: int
    frames: int  #: decoded frames (samples per channel)

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


class DecodedAudio(msgspec.Struct, frozen=True):
    info: AudioInfo
    #: mono float32 samples in [-1, 1]
    samples: np.ndarray


def _check_header(sample_rate: int, channels: int, frames: int, limits: MediaLimits) -> int:
    """Validate the declared shape; returns the most frames we will read."""
    if not limits.min_audio_sample_rate <= sample_rate <= limits.max_audio_sample_rate:
        raise MediaError(
            f"audio sample rate {sample_rate} Hz is outside {limits.min_audio_sample_rate}.."
            f"{limits.max_audio_sample_rate} Hz (min/max_audio_sample_rate)",
            reason="audio_bad_sample_rate",
        )
    if not 1 <= channels <= limits.max_audio_channels:
        raise MediaError(
            f"audio has {channels} channels; at most {limits.max_audio_channels} are allowed "
            "(max_audio_channels)",
            reason="audio_too_many_channels",
        )
    cap = min(math.floor(limits.max_audio_duration_s * sample_rate), limits.max_audio_samples)
    if frames > cap:
        _too_long(frames, sample_rate, limits)
    return cap


def _too_long(frames: int, sample_rate: int, limits: MediaLimits) -> None:
    seconds = frames / sample_rate
    if seconds > limits.max_audio_duration_s:
        raise MediaError(
            f"audio is {seconds:.1f}s long; at most {limits.max_audio_duration_s:g}s is allowed "
            "(max_audio_duration_s)",
            reason="audio_too_long",
        )
    raise MediaError(
        f"audio has more than {limits.max_audio_samples} samples (max_audio_samples)",
        reason="audio_too_many_samples",
    )


def _mono(block: np.ndarray) -> np.ndarray:
    """(frames, channels) -> (frames,) by averaging, in float32."""
    if block.shape[1] == 1:
        return block[:, 0]
    return block.mean(axis=1, dtype=np.float32)


def _decode_soundfile(f: sf.SoundFile, limits: MediaLimits) -> DecodedAudio:
    sr, channels = int(f.samplerate), int(f.channels)
    cap = _check_header(sr, channels, max(int(f.frames), 0), limits)
    parts: list[np.ndarray] = []
    total = 0
    while True:
        block = f.read(_BLOCK, dtype="float32", always_2d=True)
        if not len(block):
            break
        total += len(block)
        if total > cap:
            _too_long(total, sr, limits)
        parts.append(_mono(block))
    if not total:
        raise MediaError("audio has no samples", reason="audio_unreadable")
    samples = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return DecodedAudio(AudioInfo(str(f.format), sr, channels, total), samples)


def _decode_pyav(data: bytes, limits: MediaLimits) -> DecodedAudio:
    options = {"format_whitelist": ",".join(limits.audio_demuxers)}
    with av.open(io.BytesIO(data), options=options, metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise MediaError("no audio stream found", reason="audio_unreadable")
        stream = container.streams.audio[0]
        cc = stream.codec_context
        sr, channels = int(cc.sample_rate or 0), int(cc.channels or 0)
        declared = 0
        if stream.duration and stream.time_base:
            declared = int(stream.duration * stream.time_base * sr)
        cap = _check_header(sr, channels, declared, limits)
        planar = av.AudioResampler(format="fltp")  # keeps the layout and rate
        parts: list[np.ndarray] = []
        total = 0
        for frame in container.decode(stream):
            if frame.sample_rate != sr:
                raise MediaError("audio sample rate changes mid-stream", reason="audio_unreadable")
            for out in planar.resample(frame):
                arr = out.to_ndarray()  # (channels, samples)
                if arr.shape[0] > limits.max_audio_channels:
                    _check_header(sr, arr.shape[0], 0, limits)
                total += arr.shape[1]
                if total > cap:
                    _too_long(total, sr, limits)
                parts.append(arr.mean(axis=0, dtype=np.float32) if arr.shape[0] > 1 else arr[0])
        name = container.format.name
    if not total:
        raise MediaError("audio has no samples", reason="audio_unreadable")
    samples = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    return DecodedAudio(AudioInfo(name, sr, channels, total), samples)


def decode_audio(data: bytes, limits: MediaLimits) -> DecodedAudio:
    """Decode to mono float32: libsndfile first, FFmpeg for what it cannot read.

    Raises:
        MediaError: unreadable, or outside the rate, channel or duration limits.
    """
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except Exception:  # libsndfile does not know the format: try FFmpeg
        f = None
    try:
        if f is not None:
            with f:
                return _decode_soundfile(f, limits)
        return _decode_pyav(data, limits)
    except MediaError:
        raise
    except Exception:  # decoders raise many types on corrupt data
        raise MediaError(
            "cannot decode the audio: corrupt or unsupported data", reason="audio_unreadable"
        ) from None


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Mono float32 at ``rate`` -> at ``target`` (libswresample), for native encoders."""
    if rate == target:
        return samples
    frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
    frame.sample_rate = rate
    rs = av.AudioResampler(format="flt", layout="mono", rate=target)
    outs = [*rs.resample(frame), *rs.resample(None)]
    if not outs:
        return np.zeros(0, np.float32)
    return np.ascontiguousarray(np.concatenate([o.to_ndarray()[0] for o in outs]), np.float32)
