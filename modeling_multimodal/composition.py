"""Compose a multimodal model from pretrained parts: an LM, a vision tower, an audio encoder.

Each part's folder (or Hub id) carries its own preprocessing config, as Hub checkpoints do: the LM
folder its tokenizer, a CLIP/SigLIP folder its `preprocessor_config.json`, a Whisper folder its
feature extractor. The processor is built from those, the media placeholders are added to the
tokenizer and the LM's embeddings are resized to match. Projectors and heads start fresh.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor

from .configuration import MultimodalConfig
from .processing import MultimodalImageProcessor, MultimodalProcessor, MultimodalVideoProcessor
from .tokenization import MEDIA_TOKENS

# What a video processor takes over from the vision tower's image preprocessing.
IMAGE_OPTIONS_SHARED_WITH_VIDEO = (
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std",
)


def _load_into(target: torch.nn.Module, source: torch.nn.Module, what: str, path: str) -> None:
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"{what} weights from {path!r} do not fit the tower built from its config: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _audio_encoder(path: str, audio_config):
    model = AutoModel.from_pretrained(path)
    return model.get_encoder() if hasattr(model, "get_encoder") and audio_config.model_type == "whisper" else model


def from_pretrained_components(cls, text: str, vision: str | None = None, audio: str | None = None, dtype=None, **config_overrides):
    """(model, processor) from pretrained parts; see the module docstring."""
    tokenizer = AutoTokenizer.from_pretrained(text)
    wanted = (["image", "video"] if vision else []) + (["audio"] if audio else [])
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [MEDIA_TOKENS[m] for m in wanted]}, replace_extra_special_tokens=False
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    language_model = AutoModelForCausalLM.from_pretrained(text, dtype=dtype)
    if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(len(tokenizer))
    ids = {m: tokenizer.convert_tokens_to_ids(MEDIA_TOKENS[m]) for m in wanted}
    config = MultimodalConfig(
        text_config=language_model.config,
        vision_config=AutoConfig.from_pretrained(vision) if vision else None,
        audio_config=AutoConfig.from_pretrained(audio) if audio else None,
        image_token_id=ids.get("image"),
        video_token_id=ids.get("video"),
        audio_token_id=ids.get("audio"),
        **config_overrides,
    )
    model = cls(config)
    _load_into(model.model.language_model, language_model.base_model, "LM", text)
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    image_processor = video_processor = feature_extractor = None
    if vision:
        tower = type(model.model.vision_tower).from_pretrained(vision)
        _load_into(model.model.vision_tower, tower, "vision tower", vision)
        image_processor = MultimodalImageProcessor.from_pretrained(vision)
        shared = {k: v for k, v in image_processor.to_dict().items() if k in IMAGE_OPTIONS_SHARED_WITH_VIDEO}
        video_processor = MultimodalVideoProcessor(num_frames=config.video_num_frames, **shared)
    if audio:
        _load_into(model.model.audio_tower, _audio_encoder(audio, config.audio_config), "audio encoder", audio)
        feature_extractor = WhisperFeatureExtractor.from_pretrained(audio)
    model.model.apply_freezing()
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = MultimodalProcessor.from_config_and_components(
        config, tokenizer, image_processor=image_processor, feature_extractor=feature_extractor, video_processor=video_processor
    )
    return model, processor
