"""Media made on the fly for the tests (images, tones, encoded videos with or without a sound track) and the tiny
processor."""

from __future__ import annotations

import av
import numpy as np

from modeling_multimodal.processing import MultimodalProcessor
from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer


def tiny_processor(tokenizer=None, **config_overrides) -> MultimodalProcessor:
    """The processor of `testing_utils.tiny_config` (CLIP 32 px / patch 8, Whisper 80 mels, 4 video frames)."""
    tokenizer = tokenizer or tiny_tokenizer()
    return MultimodalProcessor.from_config_and_components(tiny_config(tokenizer, **config_overrides), tokenizer)


def random_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width) if channels == 0 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def tone(seconds: float, sampling_rate: int = 16000, frequency: float = 440.0, channels: int = 0) -> np.ndarray:
    """A sine; channels > 0 gives (samples, channels) with a different level per channel."""
    t = np.arange(int(round(seconds * sampling_rate))) / sampling_rate
    mono = (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
    return mono if channels == 0 else np.stack([mono * (c + 1) / channels for c in range(channels)], axis=1)


def make_video(path, num_frames: int = 30, fps: int = 10, size=(48, 64), codec: str = "libx264", gop: int = 10):
    """Encode a video whose frame k is uniform gray level 8*k (so a decoded frame tells its own index)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"bf": "2", "preset": "ultrafast"}
        for k in range(num_frames):
            frame = np.full((size[0], size[1], 3), (8 * k) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_levels(frames: np.ndarray) -> list[int]:
    """The frame index each gray frame encodes (level / 8, rounded)."""
    return [int(round(float(frame.mean()) / 8)) for frame in frames]



def make_av_video(
    path, video_seconds: float = 2.0, audio_seconds: float | None = None, audio: np.ndarray | None = None,
    fps: int = 10, size=(32, 32), sampling_rate: int = 22050, audio_codec: str = "aac", container_format: str = "mp4",
):
    """A video with gray frames (frame k at level 8*k, as `make_video`) for `video_seconds` and a sound track: `audio`
    (mono float32 at `sampling_rate`) or a 440 Hz sine of `audio_seconds` (default: as long as the frames)."""
    if audio is None:
        audio = tone(video_seconds if audio_seconds is None else audio_seconds, sampling_rate)
    with av.open(str(path), "w", format=container_format) as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = size[1], size[0], "yuv420p"
        track = container.add_stream(audio_codec, rate=sampling_rate)
        track.layout = "mono"
        for k in range(int(round(video_seconds * fps))):
            frame = np.full((size[0], size[1], 3), (8 * k) % 256, np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        sample_format = "s16" if audio_codec.startswith("pcm_s16") else "fltp" if audio_codec == "aac" else "flt"
        samples = np.round(audio * 32768).clip(-32768, 32767).astype(np.int16) if sample_format == "s16" else audio.astype(np.float32)
        for start in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format=sample_format, layout="mono")
            frame.sample_rate, frame.pts = sampling_rate, start
            container.mux(track.encode(frame))
        container.mux(track.encode())
    return path


def make_video_with_corrupt_audio(path, seconds: int = 2, fps: int = 10):
    """An mp4 whose frames decode but whose AAC stream holds random bytes (every audio packet is rejected)."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        track = container.add_stream("aac", rate=16000)
        track.layout = "mono"
        track.codec_context.open()  # the stream header (extradata) is valid; the packets are not
        for k in range(seconds * fps):
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 8 * k, np.uint8), format="rgb24")))
        container.mux(video.encode())
        for index in range(seconds * 16000 // 1024):
            packet = av.Packet(rng.integers(0, 256, 200, dtype=np.uint8).tobytes())
            packet.stream, packet.time_base = track, track.time_base
            packet.pts = packet.dts = index * 1024
            container.mux(packet)
    return path
