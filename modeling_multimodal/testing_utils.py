"""Tiny configurations for tests, benchmarks and examples (hidden size 32, 2 layers, no downloads)."""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, WhisperConfig

from .configuration import MultimodalConfig
from .tokenization import MEDIA_TOKENS, build_tokenizer

TINY_CORPUS = [
    "a small red circle in the top left",
    "a big blue square moving right",
    "the green triangle is in the middle",
    "describe the image",
    "what is said in the audio",
    "what happens in the video",
    "user: assistant: system: what is in this picture? a red square on white.",
    "describe the audio and the video. hello world, this is a long sentence with many words.",
]


def tiny_tokenizer(kind: str = "word"):
    """A tokenizer trained on `TINY_CORPUS`: "word" (whole words) or "bpe" (byte-level, 300 entries)."""
    return build_tokenizer(TINY_CORPUS, kind=kind, vocab_size=300)


def tiny_config(tokenizer=None, vision: bool = True, audio: bool = True, video: bool = True, **overrides) -> MultimodalConfig:
    """A valid MultimodalConfig at hidden size 32 with 2 layers per tower (CLIP 32x32 images, 8x8 patches)."""
    tokenizer = tokenizer or tiny_tokenizer()
    ids = {m: tokenizer.convert_tokens_to_ids(t) for m, t in MEDIA_TOKENS.items()}
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    kwargs = dict(text_config=text)
    if vision:
        kwargs["vision_config"] = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
        )
        kwargs["image_token_id"] = ids["image"]
        if video:
            kwargs.update(video_token_id=ids["video"], video_num_frames=4, video_temporal_pool_stride=2)
    if audio:
        kwargs["audio_config"] = WhisperConfig(
            d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, num_mel_bins=80,
            max_source_positions=1500,
        )
        kwargs["audio_token_id"] = ids["audio"]
    kwargs.update(overrides)
    return MultimodalConfig(**kwargs)


# The start of a script run in a subprocess as a user without this package would: it hides the editable
# install, then sets `package_hidden` (True when `import modeling_multimodal` fails, as it should).
WITHOUT_PACKAGE_PRELUDE = """import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h)]
sys.path_importer_cache.clear()
try:
    import modeling_multimodal
    package_hidden = False
except ImportError:
    package_hidden = True
"""
