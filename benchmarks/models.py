"""Benchmark-sized models, their transformers twins with identical weights, and hand-built batches.

The regime is LLaVA-1.5's at reduced width: a 24x24 patch grid (576 image tokens), a 32k vocabulary and
a short labelled response, so media tokens dominate the sequence. `Sizes.full()` runs in seconds per step
on 2 CPU cores; `Sizes.quick()` is for the smoke test.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
)

from modeling_multimodal import MultimodalConfig, MultimodalForConditionalGeneration

BOS, PAD = 1, 0
IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN = 3, 4, 5
FIRST_TEXT_ID = 10
MEL_FRAMES_PER_SECOND = 100


@dataclass(frozen=True)
class Sizes:
    """Every dimension a benchmark uses, so `--quick` changes one object."""

    vocab_size: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    vision_hidden: int
    vision_layers: int
    image_size: int
    patch_size: int
    audio_hidden: int
    audio_layers: int
    mel_bins: int
    batch_size: int
    prompt_tokens: int
    response_tokens: int
    audio_seconds: float
    repeats: int

    @classmethod
    def full(cls) -> "Sizes":
        return cls(
            vocab_size=32000, text_hidden=512, text_intermediate=1376, text_layers=4, text_heads=8,
            vision_hidden=256, vision_layers=4, image_size=336, patch_size=14,
            audio_hidden=256, audio_layers=4, mel_bins=128,
            batch_size=2, prompt_tokens=16, response_tokens=32, audio_seconds=10.0, repeats=3,
        )

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(
            vocab_size=512, text_hidden=32, text_intermediate=64, text_layers=1, text_heads=4,
            vision_hidden=32, vision_layers=2, image_size=32, patch_size=8,
            audio_hidden=32, audio_layers=2, mel_bins=16,
            batch_size=2, prompt_tokens=4, response_tokens=4, audio_seconds=1.0, repeats=1,
        )

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self) | {"image_tokens": self.image_tokens}


def text_config(sizes: Sizes) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=sizes.vocab_size, hidden_size=sizes.text_hidden, intermediate_size=sizes.text_intermediate,
        num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
        num_key_value_heads=max(1, sizes.text_heads // 2), max_position_embeddings=16384,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2,
    )


def vision_config(sizes: Sizes) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=sizes.vision_hidden, intermediate_size=4 * sizes.vision_hidden,
        num_hidden_layers=sizes.vision_layers, num_attention_heads=max(1, sizes.vision_hidden // 64),
        image_size=sizes.image_size, patch_size=sizes.patch_size,
    )


def audio_config(sizes: Sizes) -> Qwen2AudioEncoderConfig:
    return Qwen2AudioEncoderConfig(
        d_model=sizes.audio_hidden, encoder_layers=sizes.audio_layers,
        encoder_attention_heads=max(1, sizes.audio_hidden // 64), encoder_ffn_dim=4 * sizes.audio_hidden,
        num_mel_bins=sizes.mel_bins, max_source_positions=1500,
    )


def build_ours(sizes: Sizes, image: bool = True, video_frames: int = 0, audio: bool = False, seed: int = 0, **overrides):
    """Our model for images (LLaVA-1.5 layout: layer -2, no CLS, MLP projector), video and/or Qwen2-Audio-style audio."""
    kwargs = dict(text_config=text_config(sizes))
    if image or video_frames:
        kwargs.update(vision_config=vision_config(sizes), image_token_id=IMAGE_TOKEN)
    if video_frames:
        kwargs.update(video_token_id=VIDEO_TOKEN, video_num_frames=video_frames, video_spatial_pool_stride=2)
    if audio:
        kwargs.update(audio_config=audio_config(sizes), audio_token_id=AUDIO_TOKEN, audio_projector="linear", audio_pool_stride=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return MultimodalForConditionalGeneration(MultimodalConfig(**kwargs))


def _copy_weights(reference: torch.nn.Module, ours: torch.nn.Module, mapping: dict[str, str]) -> None:
    """Load `ours`' tensors into `reference`, renaming by prefix (reference prefix -> our prefix)."""
    state = ours.state_dict()
    loaded = {}
    for name in reference.state_dict():
        prefix = next(p for p in mapping if name.startswith(p))
        loaded[name] = state[mapping[prefix] + name[len(prefix) :]]
    reference.load_state_dict(loaded, strict=True)


def llava_twin(model: MultimodalForConditionalGeneration) -> LlavaForConditionalGeneration:
    """LlavaForConditionalGeneration with our vision tower, projector, LM and head (as tests/test_parity.py)."""
    config = model.config
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=config.vision_config, text_config=config.text_config, image_token_index=config.image_token_id,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            projector_hidden_act=config.projector_hidden_act,
        )
    )
    _copy_weights(llava, model, {
        "model.multi_modal_projector.": "model.multi_modal_projector.image.",
        "model.vision_tower.": "model.vision_tower.", "model.language_model.": "model.language_model.", "lm_head.": "lm_head.",
    })
    return llava


def qwen2_audio_twin(model: MultimodalForConditionalGeneration) -> Qwen2AudioForConditionalGeneration:
    """Qwen2AudioForConditionalGeneration with our audio encoder, linear projector, LM and head.

    Same weights and sizes; Qwen2-Audio pools before its final layer norm and we after, so features
    differ slightly — irrelevant for cost.
    """
    config = model.config
    audio = config.audio_config
    if audio.model_type != "qwen2_audio_encoder":  # a Whisper encoder (the pretrained composition): same layout and weights
        audio = Qwen2AudioEncoderConfig(**{k: v for k, v in audio.to_dict().items() if k not in ("model_type", "architectures")})
    reference = Qwen2AudioForConditionalGeneration(
        Qwen2AudioConfig(audio_config=audio, text_config=config.text_config, audio_token_index=config.audio_token_id)
    )
    _copy_weights(reference, model, {
        "model.multi_modal_projector.linear.": "model.multi_modal_projector.audio.linear_1.",
        "model.audio_tower.": "model.audio_tower.", "model.language_model.": "model.language_model.", "lm_head.": "lm_head.",
    })
    return reference


def set_trainable(model: torch.nn.Module, tower_names: tuple[str, ...] = ("vision_tower", "audio_tower"), train_towers: bool = False):
    """Towers frozen (or trained), everything else trained: the same split for ours and the reference."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(train_towers or not any(f".{tower}." in f".{name}" for tower in tower_names))
    return model


def _text_ids(count: int, sizes: Sizes, generator: torch.Generator) -> list[int]:
    return torch.randint(FIRST_TEXT_ID, sizes.vocab_size, (count,), generator=generator).tolist()


def media_batch(sizes: Sizes, media: list[tuple[int, int]], batch_size: int | None = None, seed: int = 0) -> dict:
    """input_ids / attention_mask / labels for samples `[bos, media placeholders..., prompt, response]`.

    media: (token id, count) placeholder runs per sample; labels cover the response only.
    """
    generator = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for _ in range(batch_size or sizes.batch_size):
        ids = [BOS] + [token for token, count in media for _ in range(count)] + _text_ids(sizes.prompt_tokens, sizes, generator)
        response = _text_ids(sizes.response_tokens, sizes, generator)
        rows.append(ids + response)
        labels.append([-100] * len(ids) + response)
    input_ids = torch.tensor(rows)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": torch.tensor(labels)}


def image_batch(sizes: Sizes, images_per_sample: int = 1, batch_size: int | None = None, seed: int = 0) -> dict:
    batch_size = batch_size or sizes.batch_size
    batch = media_batch(sizes, [(IMAGE_TOKEN, sizes.image_tokens)] * images_per_sample, batch_size, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    batch["pixel_values"] = torch.randn(batch_size * images_per_sample, 3, sizes.image_size, sizes.image_size, generator=generator)
    return batch


def video_batch(model: MultimodalForConditionalGeneration, sizes: Sizes, batch_size: int = 1, seed: int = 0) -> dict:
    layout, frames = model.config.token_layout, model.config.video_num_frames
    batch = media_batch(sizes, [(VIDEO_TOKEN, layout.video_tokens())], batch_size, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    batch["pixel_values_videos"] = torch.randn(batch_size, frames, 3, sizes.image_size, sizes.image_size, generator=generator)
    return batch


def audio_batches(model: MultimodalForConditionalGeneration, sizes: Sizes, seconds: float, batch_size: int | None = None, seed: int = 0):
    """(ours, Qwen2-Audio's) batches of clips of `seconds`: ours at the real length, theirs padded to 30 s.

    Both expand the placeholder to the same count (`seconds` chosen so the two length formulas agree).
    """
    batch_size = batch_size or sizes.batch_size
    frames = int(seconds * MEL_FRAMES_PER_SECOND)
    tokens = model.config.token_layout.audio_tokens(frames)
    batch = media_batch(sizes, [(AUDIO_TOKEN, tokens)], batch_size, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    clips = torch.randn(batch_size, sizes.mel_bins, frames, generator=generator)
    ours = batch | {"input_features": clips, "input_features_mask": torch.ones(batch_size, frames, dtype=torch.long)}
    max_frames = model.config.token_layout.max_audio_mel_frames()
    padded = torch.nn.functional.pad(clips, (0, max_frames - frames))
    mask = (torch.arange(max_frames) < frames).long().expand(batch_size, -1).contiguous()
    theirs = batch | {"input_features": padded, "feature_attention_mask": mask}
    return ours, theirs


def to_device(batch: dict, device: str, dtype: torch.dtype | None = None) -> dict:
    """Move a batch; floating tensors (media) also take `dtype` when given."""
    moved = {}
    for key, value in batch.items():
        value = value.to(device)
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        moved[key] = value
    return moved
