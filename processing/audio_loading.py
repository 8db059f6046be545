"""Audio in any form the user has -> mono float32 at the feature extractor's rate, and per-clip log-mels.

Forms: numpy arrays and torch tensors (1-D, or 2-D with a channel axis) with a sampling rate; a
`{"array": ..., "sampling_rate": ...}` dict (the `datasets` Audio format); a file path or bytes
(wav, flac, ogg, mp3 through soundfile; anything else ffmpeg reads through PyAV); and the sound track of a
video file (`load_video_track`, for `use_audio_in_video`), fitted to the span of its frames.

Channels are averaged to mono. Resampling uses libswresample through `av.AudioResampler` (a
windowed-sinc polyphase filter with delay compensation, so the output has exactly
round(n * target / source) samples). Each clip's log-mel is computed on its own, never padded to
30 s, so a clip's features do not depend on what it is batched with.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass

import av
import numpy as np
import soundfile
import torch

from .media_files import open_media_file


logger = logging.getLogger(__name__)

# Sampling rates we accept (Hz): below this it is not audio, above it no real recording exists.
MIN_SAMPLING_RATE, MAX_SAMPLING_RATE = 1_000, 768_000
# Channels a file may declare (3rd-order ambisonics has 16): a header claiming thousands would make even a
# short clip decode to gigabytes before it is averaged to mono.
MAX_CHANNELS = 32


def _check_sampling_rate(sampling_rate) -> int:
    """A resamplable rate is a whole number of Hz in [MIN_SAMPLING_RATE, MAX_SAMPLING_RATE]."""
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, float, np.integer, np.floating)):
        raise ValueError(f"sampling_rate must be a number of Hz, got {sampling_rate!r}")
    if not math.isfinite(sampling_rate) or sampling_rate != int(sampling_rate):
        raise ValueError(f"sampling_rate={sampling_rate} cannot be resampled: it must be a whole number of Hz")
    if not MIN_SAMPLING_RATE <= sampling_rate <= MAX_SAMPLING_RATE:
        raise ValueError(
            f"sampling_rate={sampling_rate} cannot be resampled: expected {MIN_SAMPLING_RATE}..{MAX_SAMPLING_RATE} Hz"
        )
    return int(sampling_rate)


def _channel_axis(shape: tuple[int, int]) -> int:
    """Which axis of a 2-D array holds the channels: the one with at most MAX_CHANNELS entries.

    When both axes are that short ((3, 8): 3 channels of 8 samples, or 8 of 3?) nothing in the array says which,
    so it is refused rather than guessed; a real clip has far more than MAX_CHANNELS samples.
    """
    short = [axis for axis in (0, 1) if shape[axis] <= MAX_CHANNELS]
    if len(short) == 1:
        return short[0]
    if not short:
        raise ValueError(f"audio array of shape {shape} has more than {MAX_CHANNELS} entries on both axes: neither can be its channels")
    raise ValueError(
        f"audio array of shape {shape} is ambiguous: both axes could hold the channels (at most {MAX_CHANNELS}); "
        "pass 1-D mono samples, or a clip longer than that"
    )


def _to_float_mono(array, channel_axis: int | None = None) -> np.ndarray:
    """1-D samples or 2-D (channels, samples) / (samples, channels) -> float32 mono; integer PCM is scaled to [-1, 1].

    `channel_axis` is given for decoded files (always (channels, samples)); for a 2-D array from the user it is
    the axis with at most MAX_CHANNELS entries (`_channel_axis`)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype == np.uint8:  # 8-bit PCM is unsigned
        array = (array.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32) / float(-np.iinfo(array.dtype).min)
    elif not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"audio samples must be numbers, got dtype {array.dtype}")
    if array.size == 0:  # before averaging: the mean over an empty axis is NaN
        raise ValueError(f"the audio is empty (0 samples, shape {array.shape})")
    if array.ndim == 2:
        array = array.mean(axis=_channel_axis(array.shape) if channel_axis is None else channel_axis)
    elif array.ndim != 1:
        raise ValueError(f"expected 1-D audio or 2-D (channels, samples), got shape {array.shape}")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError("the audio contains NaN or infinite samples")
    return array


class AudioHeaderError(ValueError):
    """A file whose header declares what we refuse to decode: too long, a wild rate, too many channels."""


class AudioTooLongError(AudioHeaderError):
    """A clip longer than the caller's `max_seconds`, found from its header (or while decoding)."""


def _too_long(name: str, seconds: float, max_seconds: float, how: str) -> AudioTooLongError:
    return AudioTooLongError(
        f"{name} lasts {seconds:.2f} s ({how}), more than the {max_seconds:.2f} s this model takes; split it, "
        "or pass truncate_audio=True to keep its beginning"
    )


def _check_header(name: str, rate: int, channels: int) -> None:
    """What a container declares, checked before its samples are decoded."""
    try:
        _check_sampling_rate(rate)
    except ValueError as err:
        raise AudioHeaderError(f"{name}: {err}") from None
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioHeaderError(f"{name} declares {channels} channels; expected 1..{MAX_CHANNELS}")


def _truncated(name: str, seconds: float | None, max_seconds: float) -> None:
    length = f"lasts {seconds:.2f} s" if seconds is not None else f"lasts more than {max_seconds:.2f} s"
    logger.warning(f"{name} {length}; only its first {max_seconds:.2f} s were decoded (truncate)")


def _read_soundfile(source, name: str, max_seconds: float | None, truncate: bool) -> tuple[np.ndarray, int]:
    """libsndfile formats: the length is checked from the header, and at most one sample past the limit is read."""
    with soundfile.SoundFile(source) as sound:
        rate, header_frames = sound.samplerate, sound.frames
        _check_header(name, rate, sound.channels)
        if max_seconds is None:
            return sound.read(dtype="float32", always_2d=True).T, rate  # (channels, samples)
        limit = math.floor(max_seconds * rate)  # the samples that fit
        if header_frames > limit and not truncate:
            raise _too_long(name, header_frames / rate, max_seconds, "from its header")
        samples = sound.read(frames=limit + 1, dtype="float32", always_2d=True)  # (samples, channels)
    if len(samples) > limit:
        if not truncate:  # the header under-counted
            raise _too_long(name, len(samples) / rate, max_seconds, "more than its header said")
        samples = samples[:limit]
        _truncated(name, header_frames / rate if header_frames > limit else None, max_seconds)
    return samples.T, rate


def _decode_stream(container, stream, limit: int | None) -> np.ndarray | None:
    """Decode an audio stream to planar float (channels, samples), stopping once more than `limit` samples are in
    (`None`: the whole stream). None when nothing decodes."""
    codec = stream.codec_context
    # planar float, one row per channel, whatever the codec's native format
    resampler = av.AudioResampler(format="fltp", layout=codec.layout, rate=codec.sample_rate)
    chunks, count = [], 0
    for frame in container.decode(stream):
        for out in resampler.resample(frame):
            chunks.append(out.to_ndarray())
            count += chunks[-1].shape[1]
        if limit is not None and count > limit:
            break
    return np.concatenate(chunks, axis=1) if chunks else None


def _read_pyav(source, name: str, max_seconds: float | None, truncate: bool) -> tuple[np.ndarray | None, int]:
    """Anything ffmpeg reads: the duration is checked from the container, and decoding stops past the limit."""
    with av.open(source) as container:
        if not container.streams.audio:
            raise ValueError("it has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        _check_header(name, rate, stream.codec_context.channels)
        limit = None if max_seconds is None else math.floor(max_seconds * rate)
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        else:
            seconds = container.duration / av.time_base if container.duration is not None else None
        if limit is not None and seconds is not None and seconds > max_seconds and not truncate:
            raise _too_long(name, seconds, max_seconds, "from its header")
        samples = _decode_stream(container, stream, limit)
    if samples is None:
        return None, rate
    if limit is not None and samples.shape[1] > limit:
        if not truncate:  # the header under-counted
            raise _too_long(name, samples.shape[1] / rate, max_seconds, "more than its header said")
        samples = samples[:, :limit]
        _truncated(name, seconds if seconds is not None and seconds > max_seconds else None, max_seconds)
    return samples, rate


def _decode_file(source: str | bytes, name: str, max_seconds: float | None = None, truncate: bool = False):
    """Decode a path or bytes with soundfile (wav/flac/ogg/mp3), falling back to PyAV: ((channels, samples), rate).

    Paths must be regular files (a FIFO or device is refused, never read). With `max_seconds`, a longer clip is
    refused from its header before its samples are decoded (and decoding stops if the header under-counts); with
    `truncate` too, only its first `max_seconds` are decoded instead, with a warning.
    """
    stream = open_media_file(source, name) if isinstance(source, str) else io.BytesIO(source)
    with stream:
        try:
            return _read_soundfile(stream, name, max_seconds, truncate)
        except AudioHeaderError:
            raise
        except Exception as err:  # noqa: BLE001 - libsndfile raises several types; ffmpeg may still read it
            soundfile_error = err
        stream.seek(0)
        try:
            samples, rate = _read_pyav(stream, name, max_seconds, truncate)
        except AudioHeaderError:
            raise
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"cannot decode {name} as audio: {err} (soundfile said: {soundfile_error})") from err
    if samples is None:
        raise ValueError(f"{name} has no decodable audio samples")
    return samples, rate


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 resampling with libswresample (via PyAV); exact output length round(n * target / source)."""
    if source_rate == target_rate:
        return samples
    frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
    frame.sample_rate = source_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    frames = resampler.resample(frame) + resampler.resample(None)  # None flushes the filter's tail
    if not frames:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([out.to_ndarray()[0] for out in frames]).astype(np.float32, copy=False)


def load_audio(
    item, sampling_rate: int | None, target_rate: int, max_seconds: float | None = None, truncate: bool = False
) -> np.ndarray:
    """Any supported audio form -> mono float32 samples at `target_rate`. Raises `ValueError` saying what is wrong.

    `sampling_rate` is the rate of raw arrays (the processor's `sampling_rate=` argument); a dict's own
    "sampling_rate" and a file's header take precedence. `max_seconds` bounds what a file or bytes may hold:
    a longer one is refused from its container header, before its samples are decoded, or with `truncate`
    only its first `max_seconds` are decoded (with a warning). Arrays are already in memory: the caller checks
    their length.
    """
    if isinstance(item, dict):
        if "array" not in item:
            raise ValueError(f"an audio dict needs an 'array' key (and 'sampling_rate'), got keys {sorted(item)}")
        samples, sampling_rate = item["array"], item.get("sampling_rate", sampling_rate)
    elif isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)):
        is_path = isinstance(item, (str, os.PathLike))
        name = f"file {os.fspath(item)!r}" if is_path else f"audio bytes ({len(item)} bytes)"
        samples, sampling_rate = _decode_file(os.fspath(item) if is_path else bytes(item), name, max_seconds, truncate)
        if samples.shape[-1] == 0:
            raise ValueError(f"{name} holds no samples (0 frames): an empty recording")
        return resample(_to_float_mono(samples, channel_axis=0), _check_sampling_rate(sampling_rate), target_rate)
    elif isinstance(item, (np.ndarray, torch.Tensor)):
        samples = item
    else:
        raise ValueError(
            f"unsupported audio type {type(item).__name__}; expected a path, bytes, numpy array, torch tensor "
            "or {'array': ..., 'sampling_rate': ...}"
        )
    if sampling_rate is None:
        raise ValueError(
            "an audio array was given without a sampling rate; pass sampling_rate=... to the processor "
            "or {'array': ..., 'sampling_rate': ...}"
        )
    sampling_rate = _check_sampling_rate(sampling_rate)
    return resample(_to_float_mono(samples), sampling_rate, target_rate)


@dataclass(frozen=True)
class SoundTrackRequest:
    """What `use_audio_in_video` asks of a video file's decoding pass: its sound track at `sampling_rate`, fitted to
    the frames' span, which may hold at most `max_samples` samples (the audio encoder's `encoder_seconds`)."""

    sampling_rate: int
    max_samples: int
    encoder_seconds: float


def read_sound_track(container, name: str, request: SoundTrackRequest, seconds: float | None) -> tuple[np.ndarray, float]:
    """The sound track of an open video container, fitted to its frames: (mono float32, the track's own seconds).

    `seconds` is how long the frames last (`SampledVideoMetadata.duration`). The track's first sample is taken to
    sit at the first frame; a longer track is cut at `seconds` (decoding stops there), a shorter one is padded with
    silence to it, so the result has exactly round(seconds * rate) samples. The second value is the track's own
    length (past `seconds`, from the stream header; the caller warns about a large mismatch). A span the encoder
    cannot take, a file without an audio stream, or one whose audio does not decode raises a `ValueError`.
    """
    if not seconds or seconds <= 0:
        raise ValueError("cannot tell how long its frames last, so its sound track cannot be aligned")
    if round(seconds * request.sampling_rate) > request.max_samples:
        raise ValueError(
            f"its frames last {seconds:.2f} s; with use_audio_in_video its sound track must fit the audio encoder's "
            f"{request.encoder_seconds:.2f} s. Cut the video, or pass use_audio_in_video=False for it"
        )
    if not container.streams.audio:
        raise ValueError(
            f"{name} has no audio stream, but use_audio_in_video=True asks for its sound track; pass "
            "use_audio_in_video=False (or a per-video list with False for this one)"
        )
    stream = container.streams.audio[0]
    rate = stream.codec_context.sample_rate
    _check_header(name, rate, stream.codec_context.channels)
    limit = math.ceil(seconds * rate)
    container.seek(0)  # the frames were decoded first: back to the start of the file
    try:
        samples = _decode_stream(container, stream, limit)
    except av.error.FFmpegError as err:
        raise ValueError(f"cannot decode the audio stream of {name}: {err}") from err
    declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    if declared is None and container.duration:  # Matroska / WebM keep no per-stream duration, only the file's
        declared = container.duration / av.time_base
    if samples is None:
        raise ValueError(f"the audio stream of {name} has no decodable samples (corrupt or empty)")
    track_seconds = samples.shape[1] / rate
    if samples.shape[1] > limit and declared is not None:  # decoding stopped at the frames' end: the header says the rest
        track_seconds = max(track_seconds, declared)
    mono = resample(_to_float_mono(samples, channel_axis=0), rate, request.sampling_rate)
    length = round(seconds * request.sampling_rate)
    return np.pad(mono[:length], (0, max(0, length - len(mono)))), track_seconds


def load_video_track(video: str | bytes, name: str, target_rate: int, seconds: float) -> tuple[np.ndarray, float]:
    """`read_sound_track` of a video file opened for it alone (the processor reads the track in the frames' pass)."""
    source = open_media_file(video, name) if isinstance(video, str) else io.BytesIO(video)
    request = SoundTrackRequest(target_rate, max_samples=2**62, encoder_seconds=math.inf)
    with source, av.open(source) as container:
        return read_sound_track(container, name, request, seconds)


def mel_frame_count(num_samples: int, hop_length: int, n_fft: int) -> int:
    """Log-mel frames `log_mel` makes of `num_samples` samples (a clip shorter than one FFT window counts as one window)."""
    return max(num_samples, n_fft) // hop_length


def pad_log_mels(
    mels: list[torch.Tensor | None], masks: list[torch.Tensor | None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mels (n_mels, frames_i), None for a row of length 0, right-padded with zeros to the longest:
    ((n, n_mels, T_max) features, (n, T_max) mask). The mask is 1 on each row's frames, or the row's own
    (frames_i,) mask from `masks` (rows that were padded before)."""
    present = [mel for mel in mels if mel is not None]
    longest = max(mel.shape[-1] for mel in present)
    features = present[0].new_zeros(len(mels), present[0].shape[0], longest)  # (n, n_mels, T_max)
    mask = torch.zeros(len(mels), longest, dtype=torch.long)  # (n, T_max)
    for index, mel in enumerate(mels):
        if mel is not None:
            features[index, :, : mel.shape[-1]] = mel
            mask[index, : mel.shape[-1]] = 1 if masks is None else masks[index].long()
    return features, mask


def log_mel(feature_extractor, samples: np.ndarray) -> torch.Tensor:
    """Whisper log-mel of one clip on its own (no 30 s padding): float32 (n_mels, len(samples) // hop_length).

    Clips shorter than one FFT window (25 ms at 16 kHz) are zero-padded to one window first, since the STFT
    needs that much signal.
    """
    if len(samples) < feature_extractor.n_fft:
        samples = np.pad(samples, (0, feature_extractor.n_fft - len(samples)))
    features = feature_extractor(
        samples, sampling_rate=feature_extractor.sampling_rate, padding="longest", truncation=False, return_tensors="pt"
    )["input_features"]
    return features[0].float()  # (n_mels, frames)


__all__ = [
    "AudioHeaderError", "AudioTooLongError", "SoundTrackRequest", "load_audio", "load_video_track", "read_sound_track", "log_mel", "mel_frame_count", "pad_log_mels",
    "resample",
]
