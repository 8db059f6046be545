"""Builders shared by the processing tests: a tiny tokenizer and config, media made on the fly (no tests here)."""

from __future__ import annotations

import av
import numpy as np
from transformers import CLIPVisionConfig, LlamaConfig, WhisperConfig

from modeling_multimodal.configuration import MultimodalConfig
from modeling_multimodal.processing import MultimodalProcessor
from modeling_multimodal.tokenization import build_tokenizer

CORPUS = [
    "user: assistant: system: what is in this picture? a red square on white.",
    "describe the audio and the video. hello world, this is a long sentence with many words.",
]


def tiny_tokenizer(kind: str = "word"):
    return build_tokenizer(CORPUS, kind=kind, vocab_size=300)


def tiny_config(tokenizer, audio: bool = True, video: bool = True, **overrides) -> MultimodalConfig:
    """The brief's tiny config: CLIP 32 px / patch 8 (4x4 grid), Whisper 80 mels, 4 video frames."""
    ids = {kind: tokenizer.convert_tokens_to_ids(f"<{kind}>") for kind in ("image", "audio", "video")}
    return MultimodalConfig(
        text_config=LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tokenizer),
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
        ),
        audio_config=WhisperConfig(
            d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, num_mel_bins=80,
            max_source_positions=1500,
        ) if audio else None,
        image_token_id=ids["image"],
        audio_token_id=ids["audio"] if audio else None,
        video_token_id=ids["video"] if video else None,
        video_num_frames=4,
        **overrides,
    )


def tiny_processor(tokenizer=None, **config_overrides) -> MultimodalProcessor:
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
