"""The demo pipeline end to end at a tiny size (the full run is the README's first command)."""

import json
import subprocess
import sys

import pytest
import torch

from modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.demo import TARGETS, run_demo


@pytest.mark.slow
def test_quick_demo_trains_reloads_scores_and_reports(tmp_path):
    results = run_demo(tmp_path, quick=True, plan="scratch")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["scores"] == results["scores"]
    for key, _, _ in TARGETS:
        assert key in saved["scores"]
    assert saved["scores"]["image_caption/num_test_samples"] == 12
    assert [row["metric"] for row in saved["targets"]] == [key for key, _, _ in TARGETS]
    assert saved["train_steps"] == {"encoders": 2, "pretrain": 3, "align": 2, "finetune": 3}
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert (tmp_path / "finetune" / "final" / "adapter" / "adapter_config.json").exists()
    model = MultimodalForConditionalGeneration.from_pretrained(tmp_path / "finetune" / "final")
    assert model.config.modalities == ["image", "video", "audio"]
    assert sorted(model.auxiliary_heads) == ["audio_ctc", "media_bow"]
    for task in ("image_caption", "video_caption", "speech_transcription"):
        assert len(saved["samples"][task]) == saved["scores"][f"{task}/num_test_samples"] and {"prediction", "reference"} <= set(saved["samples"][task][0])
    # The CLI scores the saved checkpoint the same way, re-ranking included.
    out = tmp_path / "eval.json"
    command = [sys.executable, "-m", "modeling_multimodal.cli", "evaluate", str(tmp_path / "finetune" / "final"),
               "--root", str(tmp_path / "data"), "--manifest", "image_test.jsonl", "--task", "image_caption",
               "--batch-size", "32", "--rerank-top-k", "10", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True)
    scores = json.loads(out.read_text())["results"][0]["scores"]
    for key in ("exact_match", "text_to_media_recall@1", "reranked_text_to_media_recall@1", "reranked_media_to_text_recall@1"):
        assert scores[key] == saved["scores"][f"image_caption/{key}"]


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    missing = tmp_path / "nope.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "modeling_multimodal.cli", "train", "--recipe", str(missing)], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert f"Recipe {missing} does not exist" in done.stderr and "Traceback" not in done.stderr


def test_ablation_runs_without_l_other_skip_the_encoders_stage():
    from modeling_multimodal.demo import demo_stages

    assert [name for name, _ in demo_stages()] == ["encoders", "pretrain", "align", "finetune"]
    assert [name for name, _ in demo_stages(["auxiliary_loss_weight=0.0", "contrastive_loss_weight=0.2"])] == ["pretrain", "align", "finetune"]


def test_shape_learning_diagnostic_learns_shapes(tmp_path):
    """examples/diagnostics/shape_learning.py (docs/RESULTS.md's shape-learning table) trains the tower it reports on:
    scored on the very images it trains on, the convolutional-stem tower names every shape within 80 steps."""
    import shutil
    from pathlib import Path

    from modeling_multimodal.demo_data import make_demo_data

    none = {"train": 0, "validation": 0, "test": 0}
    make_demo_data(tmp_path, seed=0, sizes={"image": {"train": 16, "validation": 0, "test": 8}, "video": none, "speech": none})
    shutil.copy(tmp_path / "image_train.jsonl", tmp_path / "image_test.jsonl")  # score on the training images
    script = Path(__file__).resolve().parents[1] / "examples" / "diagnostics" / "shape_learning.py"
    command = [sys.executable, str(script), "--data", str(tmp_path), "--stem", "conv", "--loss", "classify", "--steps", "80"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    last = done.stdout.strip().splitlines()[-1]
    assert "'stem': 'conv'" in last and "step 80: test shape accuracy" in last
    assert float(last.split("accuracy ")[1].split()[0]) >= 0.9  # chance is 0.25


def test_quick_pretrained_plan_composes_parts_trains_and_reports(tmp_path):
    """The pretrained plan end to end on tiny parts laid out like Hub checkpoints (the real ones are converted)."""
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM, WhisperConfig
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from modeling_multimodal.demo import PRETRAINED
    from modeling_multimodal.demo_data import grammar
    from modeling_multimodal.tokenization import build_tokenizer

    words = [*grammar.COLOURS, *grammar.SHAPES, *grammar.SIZES, *grammar.ROWS, *grammar.COLUMNS, *grammar.DIRECTIONS]
    corpus = [" ".join(words), "a the in is moving show me find move describe what said video image audio user assistant system"]
    tokenizer = build_tokenizer(corpus, kind="word", media_tokens=False)
    parts = {"text": tmp_path / "lm", "vision": tmp_path / "dinov2", "audio": tmp_path / "whisper"}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2)).save_pretrained(parts["text"])
    tokenizer.save_pretrained(parts["text"])
    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4, image_size=518, patch_size=14)).save_pretrained(parts["vision"])
    BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}).save_pretrained(parts["vision"])
    WhisperForConditionalGeneration(WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                                                  encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=60, pad_token_id=1,
                                                  bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).save_pretrained(parts["audio"])
    WhisperFeatureExtractor(feature_size=80).save_pretrained(parts["audio"])

    results = run_demo(tmp_path / "out", quick=True, plan="pretrained", parts={k: str(v) for k, v in parts.items()})
    assert results["plan"] == "pretrained" and results["train_steps"] == {"align": 2, "finetune": 2}
    assert [row["metric"] for row in results["targets"]] == [key for key, _, _ in PRETRAINED.targets]
    scores = results["scores"]
    assert scores["english_nll_base"] > 0 and scores["english_nll_increase"] == scores["english_nll_finetuned"] / scores["english_nll_base"] - 1
    assert "speech_transcription/whisper_baseline_wer" not in scores  # this Whisper folder has no tokenizer
    model = MultimodalForConditionalGeneration.from_pretrained(tmp_path / "out" / "finetune" / "final")
    assert model.config.vision_config.image_size == 112 and model.config.vision_feature_layers == [4, -1]  # the recipe's image_size
    assert len(model.auxiliary_heads) == 0 and model.config.auxiliary_loss_weight == 0.0  # λ = 0: no head is built or saved
    assert len(results["samples"]["image_caption"]) == scores["image_caption/num_test_samples"] == 6


@pytest.mark.slow
def test_quick_pretrained_demo_on_the_converted_weights(tmp_path):
    """`demo --plan pretrained --quick` on the real weights: convert, compose, align, LoRA, reload, score."""
    from modeling_multimodal.conversion import missing_requirements
    from modeling_multimodal.demo import PRETRAINED_PARTS

    missing = [reason for _, name in PRETRAINED_PARTS for reason in missing_requirements(name)]
    if missing:
        pytest.skip("; ".join(missing))
    results = run_demo(tmp_path, quick=True, plan="pretrained")
    scores = results["scores"]
    assert results["train_steps"] == {"align": 2, "finetune": 2}
    assert scores["english_nll_base"] == pytest.approx(scores["english_nll_finetuned"], rel=0.5)
    assert 0.0 <= scores["speech_transcription/whisper_baseline_wer"] <= 1.0  # Whisper tiny.en on the same clips
    model = MultimodalForConditionalGeneration.from_pretrained(tmp_path / "finetune" / "final")
    assert model.config.text_config.num_hidden_layers == 30 and model.config.vision_config.image_size == 112


def test_ablation_resumes_keeping_finished_arms(tmp_path, monkeypatch):
    """An interrupted ablation: arms with test scores are read back, an arm with a trained model is only scored,
    and only the arms with neither are trained."""
    from modeling_multimodal import demo

    trained, scored = [], []

    def fake_train(run_dir, data, budget, overrides, plan):
        trained.append(run_dir.name)
        (run_dir / "finetune" / "final").mkdir(parents=True)
        (run_dir / "finetune" / "final" / "config.json").write_text("{}")

    def fake_evaluate(model_dir, data, num_examples=3, plan=demo.SCRATCH):
        scored.append(model_dir.parent.parent.name)
        return {"image_caption/exact_match": 0.5}, {}

    monkeypatch.setattr(demo, "train_demo_model", fake_train)
    monkeypatch.setattr(demo, "evaluate_on_test", fake_evaluate)
    monkeypatch.setattr(demo, "make_demo_data", lambda *args, **kwargs: None)
    out = tmp_path / "ablation"
    (out / "neither").mkdir(parents=True)
    (out / "neither" / demo.ABLATION_SCORES).write_text(json.dumps({"image_caption/exact_match": 0.25}))
    (out / "both" / "finetune" / "final").mkdir(parents=True)
    (out / "both" / "finetune" / "final" / "config.json").write_text("{}")
    rows = demo.run_ablation(out, quick=True, plan="scratch")
    assert trained == ["lambda", "alpha"] and scored == ["lambda", "alpha", "both"]
    assert [row["image_caption/exact_match"] for row in rows] == [0.25, 0.5, 0.5, 0.5]
    assert all((out / arm / demo.ABLATION_SCORES).is_file() for arm in ("neither", "lambda", "alpha", "both"))
    assert "| neither (λ=0, α=0) | 0.0 | 0.0 |" in (out / "ablation.md").read_text()


def test_pretrained_ablation_runs_its_lambda_arms_at_the_plans_lambda(tmp_path, monkeypatch):
    """The pretrained recipe trains with λ = 0, so its ablation's λ arms take the plan's `ablation_lambda`."""
    from modeling_multimodal import demo

    weights = {}

    def fake_train(run_dir, data, budget, overrides, plan):
        weights[run_dir.name] = [o for o in overrides if o.startswith(("auxiliary_loss_weight=", "contrastive_loss_weight="))]
        (run_dir / "finetune" / "final").mkdir(parents=True)

    monkeypatch.setattr(demo, "pretrained_parts", lambda weights_dir: {"text": str(tmp_path)})
    monkeypatch.setattr(demo, "train_demo_model", fake_train)
    monkeypatch.setattr(demo, "evaluate_on_test", lambda *args, **kwargs: ({}, {}))
    monkeypatch.setattr(demo, "make_demo_data", lambda *args, **kwargs: None)
    demo.run_ablation(tmp_path, quick=True, plan="pretrained")
    recipe = demo.load_recipe(demo.recipe_path(demo.PRETRAINED.recipe), [f"model.components.text={tmp_path}"])
    recipe_alpha = recipe.contrastive_loss_weight
    assert recipe.auxiliary_loss_weight == 0.0
    assert weights == {
        "neither": ["auxiliary_loss_weight=0.0", "contrastive_loss_weight=0.0"],
        "lambda": [f"auxiliary_loss_weight={demo.PRETRAINED.ablation_lambda}", "contrastive_loss_weight=0.0"],
        "alpha": ["auxiliary_loss_weight=0.0", f"contrastive_loss_weight={recipe_alpha}"],
        "both": [f"auxiliary_loss_weight={demo.PRETRAINED.ablation_lambda}", f"contrastive_loss_weight={recipe_alpha}"],
    }
