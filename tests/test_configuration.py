"""MultimodalConfig: valid subsets of modalities, clear errors for invalid ones, save/load round trip."""

import pytest
from transformers import (
    CLIPConfig, Dinov2Config, GPT2Config, Qwen2Config, SiglipVisionConfig, ViTConfig, WhisperConfig,
)

from modeling_multimodal import MediaTokenLayout, MultimodalConfig
from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

VALID_CASES = [
    # (name, overrides, modalities, image tokens)
    ("vision_only", dict(audio=False), ["image", "video"], 16),
    ("audio_only", dict(vision=False, video=False), ["audio"], None),
    ("images_no_video", dict(video=False), ["image", "audio"], 16),
    ("pooled_images", dict(image_pool_stride=2), ["image", "video", "audio"], 4),
    ("full_strategy_keeps_cls", dict(vision_feature_select_strategy="full"), ["image", "video", "audio"], 17),
    ("siglip_has_no_cls", dict(vision_config=SiglipVisionConfig(**SMALL, image_size=32, patch_size=8), vision_feature_select_strategy="full"), ["image", "video", "audio"], 16),
    ("vit_tower", dict(vision_config=ViTConfig(**SMALL, image_size=32, patch_size=8)), ["image", "video", "audio"], 16),
    ("dinov2_tower", dict(vision_config=Dinov2Config(**{k: v for k, v in SMALL.items() if k != "intermediate_size"}, image_size=32, patch_size=8)), ["image", "video", "audio"], 16),
    ("whole_clip_config", dict(vision_config=CLIPConfig(vision_config=dict(**SMALL, image_size=32, patch_size=8))), ["image", "video", "audio"], 16),
    ("qwen2_lm", dict(text_config=Qwen2Config(**SMALL, num_key_value_heads=2, vocab_size=len(TOKENIZER))), ["image", "video", "audio"], 16),
    ("gpt2_lm", dict(text_config=GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(TOKENIZER))), ["image", "video", "audio"], 16),
]


@pytest.mark.parametrize("name,overrides,modalities,image_tokens", VALID_CASES, ids=[c[0] for c in VALID_CASES])
def test_valid_configs_round_trip(name, overrides, modalities, image_tokens, tmp_path):
    config = tiny_config(TOKENIZER, **overrides)
    assert sorted(config.modalities) == sorted(modalities)
    if image_tokens is not None:
        assert config.token_layout.image_tokens() == image_tokens
    config.save_pretrained(tmp_path)
    loaded = MultimodalConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.token_layout == config.token_layout
    assert MediaTokenLayout.from_dict(config.token_layout.to_dict()) == config.token_layout


INVALID_CASES = [
    # (name, overrides, fragment of the error)
    ("pool_does_not_divide_grid", dict(image_pool_stride=3), "image_pool_stride=3 must divide the patch grid (4)"),
    ("temporal_pool_does_not_divide_frames", dict(video_num_frames=5), "must divide video_num_frames=5"),
    ("unknown_projector", dict(image_projector="qformer"), "image_projector='qformer'"),
    ("negative_lambda", dict(auxiliary_loss_weight=-1.0), "must be >= 0"),
    ("lambda_without_audio", dict(audio=False, auxiliary_loss_weight=0.5), "no auxiliary task applies"),
    ("image_token_without_vision", dict(vision=False, video=False, image_token_id=5), "image_token_id is set but there is no vision_config"),
    ("audio_token_without_audio", dict(audio=False, audio_token_id=6), "audio_token_id is set but there is no audio_config"),
    ("vision_without_image_token", dict(image_token_id=None), "image_token_id is None"),
    ("same_ids", dict(audio_token_id=4), "must differ"),
    ("id_outside_vocab", dict(image_token_id=10_000), "outside the LM vocabulary"),
    ("bad_feature_layer", dict(vision_feature_layer=7), "vision_feature_layer=7 is outside"),
    ("unknown_aux_task", dict(auxiliary_tasks=["image_ocr"]), "unknown auxiliary_tasks ['image_ocr']"),
    ("unsupported_audio_tower", dict(audio_config=GPT2Config()), "audio_config.model_type='gpt2'"),
    ("full_strategy_with_pooling", dict(vision_feature_select_strategy="full", image_pool_stride=2), "cannot be pooled"),
    ("bad_temperature", dict(contrastive_init_temperature=0.0), "contrastive_init_temperature must be > 0"),
]


@pytest.mark.parametrize("name,overrides,fragment", INVALID_CASES, ids=[c[0] for c in INVALID_CASES])
def test_invalid_configs_raise_clear_value_errors(name, overrides, fragment):
    with pytest.raises(ValueError) as error:
        tiny_config(TOKENIZER, **overrides)
    assert fragment in str(error.value)


def test_default_config_is_text_only_and_valid():
    config = MultimodalConfig()
    assert config.modalities == [] and config.vision_config is None and config.audio_config is None


def test_whisper_audio_config_keeps_encoder_limits():
    config = tiny_config(TOKENIZER, audio_config=WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, max_source_positions=100))
    assert config.token_layout.max_audio_mel_frames() == 200
    assert config.token_layout.audio_tokens(500) == 50


def test_deprecated_loss_weight_names_still_load(tmp_path):
    """Configs saved with `other_loss_weight` / `cross_loss_weight` load into the current names, with a FutureWarning."""
    saved = tiny_config(TOKENIZER, auxiliary_loss_weight=0.5, contrastive_loss_weight=0.2).to_dict()
    saved["other_loss_weight"], saved["cross_loss_weight"] = saved.pop("auxiliary_loss_weight"), saved.pop("contrastive_loss_weight")
    with pytest.warns(FutureWarning, match="other_loss_weight is deprecated, use auxiliary_loss_weight"):
        config = MultimodalConfig.from_dict(saved)
    assert (config.auxiliary_loss_weight, config.contrastive_loss_weight) == (0.5, 0.2)
    assert "other_loss_weight" not in config.to_dict() and "cross_loss_weight" not in config.to_dict()
    config.save_pretrained(tmp_path)
    assert MultimodalConfig.from_pretrained(tmp_path).auxiliary_loss_weight == 0.5
