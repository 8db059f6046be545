"""from_pretrained_components: a model and processor from pretrained parts saved as Hub checkpoints are."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPConfig, CLIPImageProcessorPil, CLIPModel, LlamaConfig, LlamaForCausalLM, WhisperConfig,
    WhisperFeatureExtractor, WhisperForConditionalGeneration,
)

from modeling_multimodal import MultimodalForConditionalGeneration, MultimodalProcessor
from modeling_multimodal.testing_utils import TINY_CORPUS
from modeling_multimodal.tokenization import build_tokenizer


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Three checkpoint folders, each with its own preprocessing config, like Hub repos."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(TINY_CORPUS, kind="word", media_tokens=False)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer)))
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    clip = CLIPModel(CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        projection_dim=16,
    ))
    clip.save_pretrained(root / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    whisper = WhisperForConditionalGeneration(WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80, vocab_size=60, max_source_positions=1500, pad_token_id=1, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
    whisper.save_pretrained(root / "whisper")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(root / "whisper")
    return root, lm, clip, whisper, tokenizer


def test_components_load_their_weights_and_preprocessing(parts, tmp_path):
    root, lm, clip, whisper, tokenizer = parts
    model, processor = MultimodalForConditionalGeneration.from_pretrained_components(
        text=str(root / "lm"), vision=str(root / "clip"), audio=str(root / "whisper"), video_num_frames=4
    )
    assert isinstance(processor, MultimodalProcessor)
    assert len(processor.tokenizer) == len(tokenizer) + 3 == model.config.text_config.vocab_size
    for name in ("image", "audio", "video"):
        assert processor.tokenizer.convert_tokens_to_ids(f"<{name}>") == getattr(model.config, f"{name}_token_id")
    torch.testing.assert_close(model.model.vision_tower.embeddings.patch_embedding.weight, clip.vision_model.embeddings.patch_embedding.weight)
    torch.testing.assert_close(model.model.audio_tower.conv1.weight, whisper.model.encoder.conv1.weight)
    # The LM keeps its behaviour on text (its old vocabulary rows are untouched).
    ids = torch.tensor([tokenizer("a small red circle in the top left")["input_ids"]])
    old_vocab = len(tokenizer)
    torch.testing.assert_close(model.eval()(input_ids=ids).logits[..., :old_vocab], lm.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert processor.feature_extractor.feature_size == 80 and processor.image_processor.crop_size.height == 32

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    audio = np.sin(np.linspace(0, 400, 16000)).astype(np.float32)
    inputs = processor(text=["<image> <audio> describe"], images=[image], audio=[audio], sampling_rate=16000)
    out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    expected = CLIPImageProcessorPil.from_pretrained(root / "clip")(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"], expected, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = MultimodalForConditionalGeneration.from_pretrained(tmp_path).eval()
    again = MultimodalProcessor.from_pretrained(tmp_path)(text=["<image> <audio> describe"], images=[image], audio=[audio], sampling_rate=16000)
    torch.testing.assert_close(reloaded(**again).logits, out.logits, rtol=0, atol=0)
