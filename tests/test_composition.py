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
from modeling_multimodal.training.objective import TrainingObjective


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


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    """A tower laid out like facebook/dinov2-small: config image_size 518, its processor crops 224."""
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    tower = Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=518, patch_size=14))
    tower.save_pretrained(root)
    BitImageProcessorPil(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(root)
    return root, tower.eval()


def test_dinov2_tower_takes_its_processor_crop_with_interpolated_positions(parts, dinov2_folder, tmp_path):
    root, lm, _, _, _ = parts
    folder, tower = dinov2_folder
    model, processor = MultimodalForConditionalGeneration.from_pretrained_components(
        text=str(root / "lm"), vision=str(folder), video_num_frames=2
    )
    assert model.config.vision_config.image_size == 224
    assert model.model.vision_tower.embeddings.position_embeddings.shape == (1, 16 * 16 + 1, 32)
    assert model.config.token_layout.image_tokens() == 256  # 16 x 16 patches at 224 px, CLS dropped
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 260, 3), dtype=np.uint8))
    inputs = processor(text=["<image> what"], images=[image])
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 256
    # The re-gridded tower computes what the original computes at 224 px (DINOv2 interpolates on every call).
    with torch.no_grad():
        ours = model.model.vision_tower.eval()(pixel_values=inputs["pixel_values"]).last_hidden_state
        reference = tower(pixel_values=inputs["pixel_values"]).last_hidden_state
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    out = model.eval()(**inputs)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = MultimodalForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**MultimodalProcessor.from_pretrained(tmp_path)(text=["<image> what"], images=[image])).logits, out.logits, rtol=0, atol=0)


def test_image_size_option_regrids_clip_like_interpolate_pos_encoding(parts):
    root, _, clip, _, _ = parts
    model, processor = MultimodalForConditionalGeneration.from_pretrained_components(
        text=str(root / "lm"), vision=str(root / "clip"), image_size=48, video_num_frames=2, video_spatial_pool_stride=3
    )
    assert model.config.vision_config.image_size == 48 and processor.image_processor.crop_size.height == 48
    assert processor.video_processor.crop_size.height == 48
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ours = model.model.vision_tower.eval()(pixel_values=pixels).last_hidden_state
        reference = clip.vision_model.eval()(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_bad_combination_fails_from_configs_before_any_weight_is_read(parts, dinov2_folder, monkeypatch):
    root, *_ = parts
    folder, _ = dinov2_folder

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the configuration was checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    monkeypatch.setattr("modeling_multimodal.composition.AutoModelForCausalLM.from_pretrained", no_weights)
    with pytest.raises(ValueError, match=r"video_spatial_pool_stride=3 must divide the patch grid \(16\)"):
        MultimodalForConditionalGeneration.from_pretrained_components(text=str(root / "lm"), vision=str(folder), video_spatial_pool_stride=3)
    with pytest.raises(ValueError, match="image_size=50 is not a multiple of the vision tower's patch_size=14|patch grid"):
        MultimodalForConditionalGeneration.from_pretrained_components(text=str(root / "lm"), vision=str(folder), image_size=50)


def test_auxiliary_heads_exist_only_with_lambda_and_the_audio_encoder_is_whole(parts):
    root, _, _, whisper, _ = parts
    plain, _ = MultimodalForConditionalGeneration.from_pretrained_components(text=str(root / "lm"), audio=str(root / "whisper"))
    assert len(plain.auxiliary_heads) == 0
    joint, _ = MultimodalForConditionalGeneration.from_pretrained_components(
        text=str(root / "lm"), audio=str(root / "whisper"), auxiliary_loss_weight=0.5
    )
    assert set(joint.auxiliary_heads) == {"audio_ctc"}
    expected = whisper.model.encoder.state_dict()
    got = joint.model.audio_tower.state_dict()
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_touch_pass_does_not_run_a_frozen_tower(parts):
    root, *_ = parts
    model, processor = MultimodalForConditionalGeneration.from_pretrained_components(
        text=str(root / "lm"), vision=str(root / "clip"), audio=str(root / "whisper"), video_num_frames=2
    )
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: calls.append("vision"))
    model.model.audio_tower.conv1.register_forward_hook(lambda *args: calls.append("audio"))
    ids = torch.tensor([[5, 6, 7]])
    loss = TrainingObjective(model.train())(input_ids=ids, labels=ids).loss
    loss.backward()
    assert calls == []
    assert model.model.multi_modal_projector["image"].linear_1.weight.grad is not None


# --- issue 30: parts as users bring them ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub_parts(tmp_path_factory):
    import composition_parts

    root = tmp_path_factory.mktemp("hub_parts")
    saved = {"qwen2": composition_parts.save_lm(root / "qwen2", "qwen2")}
    for name in ("clip", "siglip", "vit", "whisper", "qwen2_audio"):
        saved[name] = {**composition_parts.VISION_TOWERS, **composition_parts.AUDIO_ENCODERS}[name](root / name)
    return {name: str(path) for name, path in saved.items()}


@pytest.mark.parametrize("tower, tokens", [("siglip", 16), ("vit", 16)])
def test_siglip_and_vit_run_at_their_processors_size_without_a_crop(hub_parts, tower, tokens):
    from transformers import AutoImageProcessor

    model, processor = MultimodalForConditionalGeneration.from_pretrained_components(text=hub_parts["qwen2"], vision=hub_parts[tower])
    assert not processor.image_processor.do_center_crop and processor.image_processor.size.height == 32
    assert model.config.vision_config.image_size == 32  # the tower is not re-gridded to a 224 crop
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (30, 70, 3), dtype=np.uint8))
    inputs = processor(text=["<image> what"], images=[image])
    own = AutoImageProcessor.from_pretrained(hub_parts[tower])(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"], own, rtol=1e-4, atol=1e-4)  # resized, not padded
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens == model.config.token_layout.image_tokens()
    features = model.get_image_features(inputs["pixel_values"]).pooler_output  # one (tokens, dim) tensor per image
    assert [item.shape[0] for item in features] == [tokens]


def test_a_crop_the_tower_did_not_ask_for_is_said(parts, tmp_path, caplog):
    root, *_ = parts
    folder = tmp_path / "short_edge_only"
    CLIPModel.from_pretrained(root / "clip").save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, do_center_crop=False).save_pretrained(folder)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            _, processor = MultimodalForConditionalGeneration.from_pretrained_components(text=str(root / "lm"), vision=str(folder))
    finally:
        hf_logging.disable_propagation()
    assert "a 32x32 centre crop is added" in caplog.text
    assert processor.image_processor.do_center_crop and processor.image_processor.crop_size.height == 32


def test_qwen2_audio_checkpoint_gives_its_audio_tower_alone(hub_parts, monkeypatch):
    from safetensors import safe_open
    from transformers import Qwen2AudioForConditionalGeneration

    import modeling_multimodal.part_weights as part_weights

    read = []

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = safe_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.handle.get_tensor(key)

    monkeypatch.setattr(part_weights, "safe_open", Recording)
    model, processor = MultimodalForConditionalGeneration.from_pretrained_components(text=hub_parts["qwen2"], audio=hub_parts["qwen2_audio"])
    assert model.config.audio_config.model_type == "qwen2_audio_encoder"
    assert read and all(key.startswith("audio_tower.") for key in read)  # its LM and projector stay on disk
    whole = Qwen2AudioForConditionalGeneration.from_pretrained(hub_parts["qwen2_audio"])
    source = whole.get_submodule(next(name for name, _ in whole.named_modules() if name.endswith("audio_tower"))).state_dict()
    got = model.model.audio_tower.state_dict()
    assert set(got) == set(source)
    for name, value in source.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
    audio = np.sin(np.linspace(0, 300, 8000)).astype(np.float32)
    inputs = processor(text=["<audio> what is said"], audio=[audio], sampling_rate=16000)
    assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_dual_encoder_checkpoint_reads_only_its_vision_half(hub_parts, tower, capsys, caplog):
    from modeling_multimodal.part_weights import part_state

    model, _ = MultimodalForConditionalGeneration.from_pretrained_components(text=hub_parts["qwen2"], vision=hub_parts[tower])
    state = part_state(model.model.vision_tower, hub_parts[tower], "vision tower")
    assert set(state) == set(model.model.vision_tower.state_dict())  # the tower's keys, none of the text half
    assert "UNEXPECTED" not in capsys.readouterr().err + caplog.text and "text_model" not in caplog.text


@pytest.mark.parametrize("role", ["text", "vision", "audio"])
@pytest.mark.parametrize("source", ["/no/such/folder", "./parts/lm-typo", "parts/lm/typo"])
def test_a_mistyped_part_folder_is_named_as_missing(hub_parts, role, source):
    given = {"text": hub_parts["qwen2"], role: source}
    with pytest.raises(ValueError, match=rf"{role}='{source}': the folder does not exist"):
        MultimodalForConditionalGeneration.from_pretrained_components(**given)


def test_lora_targets_cover_gpt2_conv1d_layers(tmp_path):
    import composition_parts

    from modeling_multimodal.training.stages import default_lora_targets, linear_leaf_names

    folder = composition_parts.save_lm(tmp_path / "gpt2", "gpt2")
    model, _ = MultimodalForConditionalGeneration.from_pretrained_components(text=str(folder))
    assert set(linear_leaf_names(model.model.language_model)) == {"c_attn", "c_fc", "c_proj"}
    pattern = __import__("re").compile(default_lora_targets(model, encoders=False))
    matched = [name for name, _ in model.named_modules() if pattern.match(name)]
    assert len(matched) == 2 * 4 and all(name.startswith("model.language_model.") for name in matched)  # 2 layers x 4


def test_audio_only_model_trains_generates_and_evaluates_from_the_command_line(hub_parts, tmp_path, capsys):
    """LM + audio encoder, no vision tower (the Qwen2-Audio shape): align, LoRA finetune, generate, evaluate."""
    import json

    from modeling_multimodal import cli
    from modeling_multimodal.demo_data import make_demo_data

    data = tmp_path / "data"
    make_demo_data(data, sizes={"image": {"train": 0, "validation": 0, "test": 0}, "video": {"train": 0, "validation": 0, "test": 0},
                                "speech": {"train": 4, "validation": 1, "test": 2}})  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": {"components": {"text": hub_parts["qwen2"], "audio": hub_parts["whisper"]}, "overrides": {"audio_pool_stride": 4}},
        "data": {"root": str(data), "max_length": 256, "train": [{"manifest": "speech_train.jsonl", "task": "speech_transcription"}],
                 "eval": [{"manifest": "speech_validation.jsonl", "task": "speech_transcription"}]},
        "stage": "align", "optim": {"batch_size": 2, "max_steps": 2, "warmup_steps": 0}, "output_dir": str(tmp_path / "align"),
        "logging_steps": 1, "eval_steps": 1,
    }))  # fmt: skip
    assert cli.main(["train", "--recipe", str(recipe), "--threads", "1"]) == 0
    finetune = ["stage=finetune", f"init_from={tmp_path / 'align' / 'final'}", f"output_dir={tmp_path / 'lora'}", "lora.r=2"]
    assert cli.main(["train", "--recipe", str(recipe), "--threads", "1", *finetune]) == 0
    final = tmp_path / "lora" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["vision_config"] is None and config["audio_config"]["model_type"] == "whisper"
    capsys.readouterr()
    clip = sorted((data / "audio" / "test").iterdir())[0]
    assert cli.main(["generate", str(final), "--prompt", "what is said", "--audio", str(clip), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    out = tmp_path / "predictions.jsonl"
    assert cli.main(["evaluate", str(final), "--root", str(data), "--manifest", "speech_test.jsonl:speech_transcription", "--out", str(out)]) == 0
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(predictions) == 2 and all("prediction" in row for row in predictions)
