"""The loss / registry refactor (issue 28) changes no number: logits, each loss term, gradients, one trainer step.

`REFERENCE` holds the values the code gave before the refactor (commit 3bf39c1, CPU, float32, seed 0), computed
by `reference_figures` / `trainer_figures` below; the test recomputes them with the current code. The model-level
case also checks `loss` against the formula `L_text + λ·L_auxiliary + α·L_contrastive` written out explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.demo_data import make_demo_data
from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer
from modeling_multimodal.training.recipe import load_recipe
from modeling_multimodal.training.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_test.yaml"
LAMBDA, ALPHA = 0.3, 0.5


def tiny_batch(model):
    """Two samples: image + audio + caption pair, video + audio + pair; CTC labels for both clips."""
    torch.manual_seed(1)
    config, layout = model.config, model.config.token_layout
    mel = 40
    audio_tokens, image_tokens, video_tokens = layout.audio_tokens(mel), layout.image_tokens(), layout.video_tokens()
    text = [20, 21, 22, 23]
    rows = [
        [config.image_token_id] * image_tokens + [config.audio_token_id] * audio_tokens + text,
        [config.video_token_id] * video_tokens + [config.audio_token_id] * audio_tokens + text,
    ]
    width = max(map(len, rows))
    pad = config.text_config.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    labels = input_ids.clone()
    labels[:, :-len(text)] = -100
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.randn(1, 3, 32, 32),
        pixel_values_videos=torch.randn(1, 4, 3, 32, 32),
        input_features=torch.randn(2, 80, mel),
        labels=labels,
        ctc_labels=torch.tensor([[20, 21, -100], [22, 23, 24]]),
        pair_input_ids=torch.tensor([[20, 21, 22], [23, 24, 25]]),
        pair_attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
    )


def tiny_model():
    torch.manual_seed(0)
    config = tiny_config(
        tiny_tokenizer(), auxiliary_loss_weight=LAMBDA, contrastive_loss_weight=ALPHA,
        auxiliary_tasks=["audio_ctc", "media_bow"], freeze_audio_tower=False,
    )
    return MultimodalForConditionalGeneration(config)


def reference_figures():
    model = tiny_model().train()
    out = model(**tiny_batch(model))
    out.loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            top = ".".join(name.split(".")[:2])
            grads[top] = grads.get(top, 0.0) + float(param.grad.double().pow(2).sum())
    return {
        "logits_sum": float(out.logits.detach().double().sum()),
        "logits_abs": float(out.logits.detach().double().abs().sum()),
        "loss": float(out.loss),
        "loss_text": float(out.loss_text),
        "loss_auxiliary": float(out.loss_auxiliary),
        "loss_contrastive": float(out.loss_contrastive),
        "grads": {k: v for k, v in sorted(grads.items()) if v > 0},
    }


def trainer_figures(root, output_dir):
    run = load_recipe(RECIPE, [
        f"data.root={root}", f"output_dir={output_dir}", "report=false", "data.eval=[]", "optim.max_steps=1",
        "optim.batch_size=4", "auxiliary_loss_weight=0.3", "contrastive_loss_weight=0.1",
    ])  # fmt: skip
    Trainer(run).train()
    record = json.loads((Path(output_dir) / "log_history.json").read_text())["train"][0]
    weights = load_file(Path(output_dir) / "final" / "model.safetensors")
    return {
        **{key: record[key] for key in ("loss", "loss_text", "loss_auxiliary", "loss_contrastive", "grad_norm")},
        "weights_abs": float(sum(t.double().abs().sum() for t in weights.values())),
        "weight_keys": len(weights),
    }


REFERENCE = {'model': {'grads': {'auxiliary_heads.audio_ctc': 29.6849436492186,
                     'auxiliary_heads.media_bow': 0.023169921806972034,
                     'lm_head.weight': 7.576403801555139,
                     'model.audio_tower': 1.7150116096959782,
                     'model.language_model': 3098.9871423773666,
                     'model.multi_modal_projector': 29.703042459126348,
                     'retrieval_head.logit_scale': 0.1616805727290762,
                     'retrieval_head.media_projection': 578.021894691293,
                     'retrieval_head.text_projection': 1286.8016919014897},
           'logits_abs': 236.86885359607913,
           'logits_sum': 10.473755983413866,
           'loss': 14.394922256469727,
           'loss_auxiliary': 33.14329147338867,
           'loss_contrastive': 1.0271320343017578,
           'loss_text': 3.938368797302246},
 'trainer': {'grad_norm': 17.51854705810547,
             'loss': 22.56776373386383,
             'loss_auxiliary': 61.68529510498047,
             'loss_contrastive': 2.7490155696868896,
             'loss_text': 3.787273645401001,
             'weight_keys': 114,
             'weights_abs': 33370.73514242124}}


def test_model_forward_and_gradients_equal_the_reference():
    got = reference_figures()
    expected = REFERENCE["model"]
    for key in ("logits_sum", "logits_abs", "loss", "loss_text", "loss_auxiliary", "loss_contrastive"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert got["loss"] == pytest.approx(got["loss_text"] + LAMBDA * got["loss_auxiliary"] + ALPHA * got["loss_contrastive"], rel=1e-6)
    assert set(got["grads"]) == set(expected["grads"])
    for key, value in expected["grads"].items():
        assert got["grads"][key] == pytest.approx(value, rel=1e-4), key


def test_one_trainer_step_equals_the_reference(tmp_path):
    make_demo_data(tmp_path / "data", seed=0, sizes={"image": {"train": 4, "validation": 1, "test": 1},
                                                    "video": {"train": 2, "validation": 1, "test": 1},
                                                    "speech": {"train": 2, "validation": 1, "test": 1}})  # fmt: skip
    got = trainer_figures(tmp_path / "data", tmp_path / "run")
    expected = REFERENCE["trainer"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
