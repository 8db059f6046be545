"""Projector input standardisation (`config.projector_input_standardize`) and its calibration from data."""

import pytest
import torch

from modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.encoders import encode_audio, select_vision_features
from modeling_multimodal.projectors import MultiModalProjector, pool_patch_grid, pool_time
from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer
from modeling_multimodal.training.calibration import calibrate_projectors, calibration_batches, projectors_to_calibrate

TOKENIZER = tiny_tokenizer()


def build_model(**overrides):
    torch.manual_seed(0)
    config = tiny_config(TOKENIZER, video=False, projector_input_standardize=True, **overrides)
    return MultimodalForConditionalGeneration(config).eval()


def media_batches():
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 3, 32, 32, generator=g) * 2 + 1, torch.randn(2, 3, 32, 32, generator=g)]
    # two clips per batch, the second shorter: its padded mel frames must not count
    audio = []
    for frames in ((60, 40), (80, 24)):
        features = torch.zeros(2, 80, max(frames))
        mask = torch.zeros(2, max(frames), dtype=torch.long)
        for i, n in enumerate(frames):
            features[i, :, :n] = torch.randn(80, n, generator=g)
            mask[i, :n] = 1
        audio.append((features, mask))
    return [
        {"pixel_values": images[0], "input_features": audio[0][0], "input_features_mask": audio[0][1]},
        {"pixel_values": images[1], "input_features": audio[1][0], "input_features_mask": audio[1][1]},
    ]


def projector_input(inner, pixel_values):
    """The image projector's input before pooling: the configured vision layers without CLS."""
    hidden_states = inner.get_image_features(pixel_values, output_hidden_states=True).hidden_states
    return select_vision_features(hidden_states, inner.config.vision_feature_layers, drop_cls=True)


def reference_statistics(model, batches):
    """Per-channel mean / std of what each projector reads, computed without hooks."""
    inner, config = model.model, model.config
    image_rows, audio_rows = [], []
    with torch.no_grad():
        for batch in batches:
            features = projector_input(inner, batch["pixel_values"])
            image_rows.append(pool_patch_grid(features, config.image_pool_stride).reshape(-1, features.shape[-1]))
            lengths = batch["input_features_mask"].sum(-1)
            states, positions = encode_audio(inner.audio_tower, batch["input_features"], lengths, config.audio_feature_layer)
            pooled, counts = pool_time(states, positions, config.audio_pool_stride)
            audio_rows += [pooled[i, :n] for i, n in enumerate(counts.tolist())]
    stats = {}
    for name, rows in (("image", torch.cat(image_rows)), ("audio", torch.cat(audio_rows))):
        rows = rows.double()
        stats[name] = (rows.mean(0), rows.std(0, unbiased=False), rows.shape[0])
    return stats


def test_uncalibrated_projector_is_the_plain_projector_and_calibrated_one_standardises():
    torch.manual_seed(0)
    plain = MultiModalProjector(16, 8)
    standardised = MultiModalProjector(16, 8, standardize=True)
    standardised.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 5, 16) * 3 + 2
    torch.testing.assert_close(standardised(x), plain(x))
    mean, std = torch.randn(16), torch.rand(16) + 0.5
    standardised.set_standardization(mean, std)
    torch.testing.assert_close(standardised(x), plain((x - mean) / std))
    assert bool(standardised.calibrated)
    with pytest.raises(ValueError, match="standardize=False"):
        plain.set_standardization(mean, std)


def test_calibration_matches_reference_statistics_and_skips_audio_padding():
    model = build_model()
    batches = media_batches()
    assert set(projectors_to_calibrate(model)) == {"image", "audio"}
    seen = calibrate_projectors(model, batches)
    reference = reference_statistics(model, batches)
    for name, projector in model.model.multi_modal_projector.items():
        mean, std, rows = reference[name]
        assert seen[name] == rows
        torch.testing.assert_close(projector.input_mean.double(), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(projector.input_std.double(), std, rtol=1e-4, atol=1e-5)
    # calibrated once: a second call changes nothing
    before = {k: v.clone() for k, v in model.state_dict().items() if "input_" in k}
    assert calibrate_projectors(model, media_batches()[:1]) == {}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_modality_absent_from_calibration_data_stays_identity():
    model = build_model()
    seen = calibrate_projectors(model, [{"pixel_values": torch.randn(2, 3, 32, 32)}])
    audio = model.model.multi_modal_projector["audio"]
    assert seen["audio"] == 0 and not bool(audio.calibrated)
    assert torch.equal(audio.input_mean, torch.zeros_like(audio.input_mean))
    assert bool(model.model.multi_modal_projector["image"].calibrated)


def test_statistics_survive_save_and_load(tmp_path):
    model = build_model()
    calibrate_projectors(model, media_batches())
    model.save_pretrained(tmp_path)
    loaded = MultimodalForConditionalGeneration.from_pretrained(tmp_path).eval()
    for name, projector in model.model.multi_modal_projector.items():
        other = loaded.model.multi_modal_projector[name]
        assert bool(other.calibrated)
        torch.testing.assert_close(other.input_mean, projector.input_mean)
        torch.testing.assert_close(other.input_std, projector.input_std)
    assert projectors_to_calibrate(loaded) == {}


def test_models_without_the_option_have_no_statistics():
    torch.manual_seed(0)
    model = MultimodalForConditionalGeneration(tiny_config(TOKENIZER, video=False))
    assert not any("input_mean" in k or "calibrated" in k for k in model.state_dict())
    assert projectors_to_calibrate(model) == {}


def test_calibration_batches_spread_over_each_part():
    parts = [list(range(10)), list(range(3)), []]
    batches = calibration_batches(parts, collate=list, per_part=4, batch_size=3)
    assert batches == [[0, 3, 6], [9], [0, 1, 2]]


def test_trainer_calibrates_before_the_first_step(tmp_path):
    from pathlib import Path

    from modeling_multimodal.demo_data import make_demo_data
    from modeling_multimodal.training.recipe import load_recipe
    from modeling_multimodal.training.trainer import Trainer

    data = tmp_path / "data"
    make_demo_data(data, seed=0, sizes={"image": {"train": 6, "validation": 1, "test": 1}, "video": {"train": 1, "validation": 1, "test": 1}, "speech": {"train": 1, "validation": 1, "test": 1}})
    recipe = load_recipe(
        Path(__file__).resolve().parents[1] / "recipes" / "tiny_test.yaml",
        [f"data.root={data}", f"output_dir={tmp_path / 'run'}", "report=false", "data.eval=[]", "optim.max_steps=1",
         "optim.lr_projector=0", "data.train=[{manifest: image_train.jsonl, task: image_caption}]",
         "model.config.projector_input_standardize=true"],
    )
    trainer = Trainer(recipe)
    untrained = trainer.model
    result = trainer.train()
    final = MultimodalForConditionalGeneration.from_pretrained(result["final_dir"])
    image = final.model.multi_modal_projector["image"]
    assert bool(image.calibrated) and image.input_mean.abs().sum() > 0
    # the statistics are those of the training images as the projector reads them
    reference = build_reference_from_trainer(trainer, untrained)
    torch.testing.assert_close(image.input_mean.double(), reference[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(image.input_std.double(), reference[1], rtol=1e-4, atol=1e-5)


def build_reference_from_trainer(trainer, model):
    rows = []
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    with torch.no_grad():
        for part in trainer.train_dataset.parts:
            for i in range(len(part)):
                features = projector_input(inner, part[i]["pixel_values"])
                rows.append(pool_patch_grid(features, model.config.image_pool_stride).reshape(-1, features.shape[-1]))
    rows = torch.cat(rows).double()
    return rows.mean(0), rows.std(0, unbiased=False)
