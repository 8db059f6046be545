"""Tiny random parts saved in Hub layout (weights, config and the part's own preprocessing), for composition tests.

Each builder writes one folder as the Hub repo of that family holds it: an LM with its tokenizer, a vision tower
(or the whole dual encoder) with its own image processor's `preprocessor_config.json`, an audio model with its
feature extractor. Sizes are tiny (hidden 32, 2 layers) so a folder is written in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_multimodal.testing_utils import TINY_CORPUS
from modeling_multimodal.tokenization import build_tokenizer

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# LM families users fine-tune: model_type -> config values beyond SMALL (vocab and special ids come from the tokenizer).
LM_FAMILIES = {
    "llama": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=8),
    "gemma2": dict(num_key_value_heads=2, head_dim=8),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=8),
    "phi3": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=512),
    "olmo2": dict(num_key_value_heads=2),
    "granite": dict(num_key_value_heads=2),
    "smollm3": dict(num_key_value_heads=2),
}
NEEDS_NO_SMALL = {"gpt2"}  # GPT-2's config names its sizes n_embd / n_layer / n_head


def save_lm(folder: Path, model_type: str, seed: int = 0) -> Path:
    """A causal LM of `model_type` with a word-level tokenizer (no media placeholders, as on the Hub)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(TINY_CORPUS, kind="word", media_tokens=False)
    sizes = {} if model_type in NEEDS_NO_SMALL else SMALL
    config = AutoConfig.for_model(
        model_type, **sizes, **LM_FAMILIES[model_type], vocab_size=len(tokenizer), max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


VISION = dict(**SMALL, image_size=32, patch_size=8)
TEXT_HALF = dict(**SMALL, vocab_size=99, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def _save(model, processor, folder: Path) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# Vision towers: name -> a builder writing the folder. CLIP and SigLIP are saved whole (the dual encoder, as the Hub
# holds them): composition must read only their vision half.
def save_clip(folder: Path) -> Path:
    config = transformers.CLIPConfig(vision_config=VISION, text_config=TEXT_HALF, projection_dim=16)
    return _save(transformers.CLIPModel(config), transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), folder)


def save_siglip(folder: Path) -> Path:
    config = transformers.SiglipConfig(vision_config=VISION, text_config=TEXT_HALF)
    return _save(transformers.SiglipModel(config), transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}), folder)


def save_siglip2(folder: Path) -> Path:
    config = transformers.Siglip2VisionConfig(**SMALL, patch_size=8, num_patches=16)
    processor = transformers.Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)
    return _save(transformers.Siglip2VisionModel(config), processor, folder)


def save_dinov2(folder: Path) -> Path:
    """Laid out like facebook/dinov2-small: config image_size larger than the processor's crop."""
    tower = transformers.Dinov2Model(transformers.Dinov2Config(**{**VISION, "image_size": 64}))
    processor = transformers.BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_center_crop=True)
    return _save(tower, processor, folder)


def save_vit(folder: Path) -> Path:
    return _save(transformers.ViTModel(transformers.ViTConfig(**VISION)), transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}), folder)


VISION_TOWERS = {"clip": save_clip, "siglip": save_siglip, "siglip2": save_siglip2, "dinov2": save_dinov2, "vit": save_vit}

WHISPER = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, num_mel_bins=80, max_source_positions=1500)


def save_whisper(folder: Path) -> Path:
    config = transformers.WhisperConfig(
        **WHISPER, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=60,
        pad_token_id=1, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    return _save(transformers.WhisperForConditionalGeneration(config), transformers.WhisperFeatureExtractor(feature_size=80), folder)


def save_qwen2_audio(folder: Path) -> Path:
    """A whole Qwen2-Audio checkpoint (audio tower + projector + LM): composition reads only its audio tower."""
    audio = {k: v for k, v in WHISPER.items()}
    config = transformers.Qwen2AudioConfig(
        audio_config=audio, text_config=dict(model_type="qwen2", **SMALL, num_key_value_heads=2, vocab_size=64),
    )
    return _save(transformers.Qwen2AudioForConditionalGeneration(config), transformers.WhisperFeatureExtractor(feature_size=80), folder)


def save_wav2vec2(folder: Path, model_type: str = "wav2vec2") -> Path:
    sizes = dict(**SMALL, conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                 num_conv_pos_embedding_groups=2)
    model_class = transformers.HubertModel if model_type == "hubert" else transformers.Wav2Vec2Model
    config = AutoConfig.for_model(model_type, **sizes)
    return _save(model_class(config), transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000), folder)


AUDIO_ENCODERS = {
    "whisper": save_whisper, "qwen2_audio": save_qwen2_audio,
    "wav2vec2": save_wav2vec2, "hubert": lambda folder: save_wav2vec2(folder, "hubert"),
}
