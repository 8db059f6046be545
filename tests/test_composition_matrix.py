"""The composition matrix: every LM family, vision tower and audio encoder a user may bring, each crossed with a base pair.

Parts are tiny random models saved in Hub layout (`composition_parts`). Each LM row is composed with CLIP + Whisper,
each vision row with Qwen2 + Whisper, each audio row with Qwen2 + CLIP. A supported row must: compose; give the
processor's token counts equal to the features the model makes; run forward with image, audio and video; generate
the same tokens batched (left padding) as one by one; save and load through the Auto classes with equal logits;
take a LoRA step on the LM (GPT-2's Conv1D layers included). A refused row is refused from its config in under 2 s,
with its reason. The `slow` variant adds the recipe's LoRA stage through the trainer and the remote-code load.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import peft
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

import composition_parts as parts
from modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.testing_utils import WITHOUT_PACKAGE_PRELUDE
from modeling_multimodal.training.stages import default_lora_targets, modules_to_save

BASE = {"text": "qwen2", "vision": "clip", "audio": "whisper"}
SUPPORTED_ROWS = (
    [dict(BASE, text=lm) for lm in parts.LM_FAMILIES if lm != BASE["text"]]
    + [dict(BASE)]
    + [dict(BASE, vision=tower) for tower in ("siglip", "dinov2", "vit")]
    + [dict(BASE, audio="qwen2_audio")]
)
REFUSED_ROWS = [
    (dict(BASE, vision="siglip2"), r"siglip2_vision_model.*own patch grid.*fixed-resolution SigLIP"),
    (dict(BASE, audio="wav2vec2"), r"'wav2vec2'.*raw-waveform encoder.*Whisper or Qwen2-Audio"),
    (dict(BASE, audio="hubert"), r"'hubert'.*raw-waveform encoder.*Whisper or Qwen2-Audio"),
]
COMPOSE = dict(video_num_frames=2, audio_pool_stride=4)


def row_id(row: dict) -> str:
    return "+".join(row[role] for role in ("text", "vision", "audio"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Every part's folder, built once: {name: path}."""
    root = tmp_path_factory.mktemp("hub_parts")
    built = {lm: str(parts.save_lm(root / lm, lm)) for lm in parts.LM_FAMILIES}
    for name, save in {**parts.VISION_TOWERS, **parts.AUDIO_ENCODERS}.items():
        built[name] = str(save(root / name))
    return built


def compose(row: dict, folders: dict):
    torch.manual_seed(0)
    return MultimodalForConditionalGeneration.from_pretrained_components(
        **{role: folders[name] for role, name in row.items()}, **COMPOSE
    )


def media():
    rng = np.random.default_rng(0)
    return {
        "images": [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))],
        "audio": [np.sin(np.linspace(0, 400, 16000)).astype(np.float32), rng.standard_normal(9600).astype(np.float32) * 0.1],
        "videos": [rng.integers(0, 255, (4, 36, 30, 3), dtype=np.uint8)],
    }


SAMPLES = ["<image> <audio> describe the image", "<video> <audio> what happens in the video"]


def process(processor, texts, items, **kwargs):
    """The processor on `texts`, given the media their placeholders ask for (in order)."""
    wanted = {"images": "<image>", "audio": "<audio>", "videos": "<video>"}
    given, used = {}, {key: 0 for key in wanted}
    for text in texts:
        for key, token in wanted.items():
            count = text.count(token)
            given.setdefault(key, []).extend(items[key][used[key] : used[key] + count])
            used[key] += count
    media_args = {key: value for key, value in given.items() if value}
    return processor(text=texts, **media_args, sampling_rate=16000, **kwargs)


def feature_rows(pooler_output) -> list[int]:
    """Tokens per media item of a `get_*_features(...).pooler_output` (one tensor per item, or a stacked batch)."""
    if isinstance(pooler_output, torch.Tensor) and pooler_output.dim() == 3:
        return [pooler_output.shape[1]] * pooler_output.shape[0]
    return [item.shape[0] for item in pooler_output]


def check_token_counts(model, inputs) -> None:
    """Placeholders the processor wrote == feature tokens the model makes, per modality."""
    config, ids = model.config, inputs["input_ids"]
    with torch.no_grad():
        image = feature_rows(model.get_image_features(inputs["pixel_values"]).pooler_output)
        audio = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).token_counts.tolist()  # one (total, d) tensor
        video = feature_rows(model.get_video_features(inputs["pixel_values_videos"]).pooler_output)
    layout = config.token_layout
    assert image == [layout.image_tokens()] * len(image)
    assert int((ids == config.image_token_id).sum()) == sum(image)
    assert int((ids == config.audio_token_id).sum()) == sum(audio)
    assert int((ids == config.video_token_id).sum()) == sum(video)


@pytest.mark.parametrize("row", SUPPORTED_ROWS, ids=row_id)
def test_supported_row_composes_and_runs(row, folders, tmp_path):
    model, processor = compose(row, folders)
    model.eval()
    items = media()
    batch = process(processor, SAMPLES, items, padding_side="left")
    check_token_counts(model, batch)
    # the tower's own image processor decides the pixels (no crop or pad it did not ask for, SigLIP / ViT included)
    own = AutoImageProcessor.from_pretrained(folders[row["vision"]])(items["images"], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], own, rtol=1e-4, atol=1e-4)

    # forward with every modality, with a loss
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)

    # batched, left-padded greedy generation equals one by one
    steps = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    together = model.generate(**batch, **steps)[:, batch["input_ids"].shape[1] :]
    for index, text in enumerate(SAMPLES):
        consumed = {"images": items["images"][:1 - index], "audio": items["audio"][index:], "videos": items["videos"][: index]}
        single = process(processor, [text], consumed)
        alone = model.generate(**single, **steps)[0, single["input_ids"].shape[1] :]
        assert together[index].tolist() == alone.tolist(), f"{row_id(row)}: sample {index} depends on its batch"

    # save / load through the Auto classes
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    again = process(AutoProcessor.from_pretrained(tmp_path), SAMPLES, items, padding_side="left")
    for key in ("input_ids", "pixel_values", "input_features", "pixel_values_videos"):
        torch.testing.assert_close(again[key], batch[key], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**again).logits, out.logits, rtol=1e-5, atol=1e-5)

    # one LoRA step on the LM's layers (Linear or, for GPT-2, Conv1D), projectors trained fully
    lora = peft.get_peft_model(
        model.train(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=default_lora_targets(model, False), modules_to_save=modules_to_save(model))
    )
    adapted = [name for name, _ in lora.named_parameters() if "lora_B" in name]
    assert adapted and all(".language_model." in name for name in adapted)
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    lora(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
    optimizer.step()
    assert any(p.abs().sum() > 0 for name, p in lora.named_parameters() if "lora_B" in name)


@pytest.mark.parametrize("row, reason", REFUSED_ROWS, ids=[row_id(r) for r, _ in REFUSED_ROWS])
def test_unsupported_row_is_refused_from_its_config(row, reason, folders, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the part was refused")

    monkeypatch.setattr("modeling_multimodal.composition.AutoModelForCausalLM.from_pretrained", no_weights)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=reason):
        compose(row, folders)
    assert time.perf_counter() - start < 2.0


# --- slow: the recipe's LoRA stage through the trainer, and the remote-code load ---------------------------------
REMOTE_LOAD = WITHOUT_PACKAGE_PRELUDE + """
import torch
from transformers import AutoModelForImageTextToText
folder, ids = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor(ids)).logits
print(json.dumps({"hidden": package_hidden, "class": type(model).__module__, "logits": logits[0, -1].tolist()}))
"""


@pytest.fixture(scope="module")
def speech_data(tmp_path_factory):
    from modeling_multimodal.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("matrix_data")
    sizes = {"image": {"train": 4, "validation": 1, "test": 1}, "video": {"train": 2, "validation": 1, "test": 1},
             "speech": {"train": 4, "validation": 1, "test": 1}}  # fmt: skip
    make_demo_data(root, sizes=sizes, image_size=32, video_size=32)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("row", SUPPORTED_ROWS, ids=row_id)
def test_supported_row_trains_through_the_recipe_and_loads_as_remote_code(row, folders, speech_data, tmp_path):
    from modeling_multimodal.training.recipe import load_recipe
    from modeling_multimodal.training.trainer import train

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": {"components": {role: folders[name] for role, name in row.items()}, "overrides": COMPOSE},
        "data": {"root": str(speech_data), "max_length": 256, "train": [
            {"manifest": "image_train.jsonl", "task": "image_caption"}, {"manifest": "speech_train.jsonl", "task": "speech_transcription"},
            {"manifest": "video_train.jsonl", "task": "video_caption"}]},
        "stage": "finetune", "lora": {"r": 2, "alpha": 4}, "optim": {"batch_size": 2, "max_steps": 2, "warmup_steps": 0},
        "output_dir": str(tmp_path / "run"), "logging_steps": 1, "eval_steps": 0,
    }))  # fmt: skip
    result = train(load_recipe(str(recipe)))
    final = result["final_dir"]
    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    ids = [[5, 6, 7, 8]]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids)).logits[0, -1]
    done = subprocess.run([sys.executable, "-c", REMOTE_LOAD, final, json.dumps(ids)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["hidden"] and report["class"].startswith("transformers_modules.")
    torch.testing.assert_close(torch.tensor(report["logits"]), expected, rtol=1e-4, atol=1e-4)
