"""The offline demo: real data made on this machine → align → LoRA finetune → test → reload → report.

`run_demo` is the README's first command. It makes the demo data (Pillow shapes, PyAV videos,
espeak-ng speech), builds a small model from `recipes/demo.yaml`, trains it with
`L_text + λ·L_other + α·L_cross`, reloads the saved model with `from_pretrained`, scores it on the
held-out test split (attribute combinations and a voice never seen in training), prints a results
table and sample outputs, and writes `results.json` and the report image. `run_ablation` repeats the
training with λ and α switched off and on, at the same budget and seeds.

A model built from configs has no pretrained part, and the align and LoRA stages assume one (LoRA on
a random, frozen LM does not learn the task; measured: exact match 0.0 after 900 steps). So the demo
first teaches the towers to see and hear on their own tasks (stage `encoders`: `L_other` alone, the LM
does not run, so a step costs a fraction of a full one), then pretrains every part (stage `full`), then
runs the usual `align` (projectors and heads) and `finetune` (LoRA on the LM and the towers) stages on
top, as one would on pretrained parts. With λ = 0 there is no `L_other`, so the ablation's λ = 0 runs
skip the `encoders` stage.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib.resources import files as package_files
from pathlib import Path

from .demo_data import make_demo_data
from .evaluation.tasks import evaluate_task
from .modeling_multimodal import MultimodalForConditionalGeneration
from .processing import MultimodalProcessor
from .training.data import load_manifest
from .training.recipe import load_recipe
from .training.report import write_report
from .training.trainer import train

TEST_SETS = (("image_caption", "image_test.jsonl"), ("video_caption", "video_test.jsonl"), ("speech_transcription", "speech_test.jsonl"))
# Retrieval in the demo: each query's top RERANK_TOP_K candidates by embedding similarity, re-ranked by the
# model's log p(caption | image) (`evaluation.tasks.retrieval_scores`); embedding-only recall is reported too.
RERANK_TOP_K = 10
# (metric key, goal, higher is better) — the targets on the held-out test split.
TARGETS = (
    ("image_caption/reranked_text_to_media_recall@1", 0.90, True),
    ("image_caption/reranked_media_to_text_recall@1", 0.90, True),
    ("image_caption/exact_match", 0.90, True),
    ("video_caption/exact_match", 0.80, True),
    ("speech_transcription/wer", 0.10, False),
)
FULL = {
    "sizes": {"image": {"train": 8000}, "video": {"train": 3200}, "speech": {"train": 1600}},
    "steps": {"encoders": 2000, "pretrain": 2400, "align": 100, "finetune": 400},
    "eval_steps": {"encoders": 0, "pretrain": 1200, "align": 0, "finetune": 200},
}
QUICK = {
    "sizes": {"image": {"train": 32, "validation": 8, "test": 12}, "video": {"train": 16, "validation": 4, "test": 6}, "speech": {"train": 16, "validation": 4, "test": 6}},
    "steps": {"encoders": 2, "pretrain": 3, "align": 2, "finetune": 3},
    "eval_steps": {"encoders": 0, "pretrain": 0, "align": 0, "finetune": 0},
}
HOLDOUT_TITLES = {"combinations": "unseen attribute combinations", "pairs": "unseen colour+shape pairs"}
STAGES = (("encoders", "encoders"), ("pretrain", "full"), ("align", "align"), ("finetune", "finetune"))


def recipe_path(name: str) -> Path:
    """A recipe shipped as package data of `modeling_multimodal.recipes` (the repository's `recipes/`)."""
    path = Path(str(package_files("modeling_multimodal.recipes") / name))
    if not path.is_file():
        raise FileNotFoundError(f"recipe {name} not found in {path.parent}")
    return path


def train_demo_model(out: Path, data: Path, budget: dict, overrides: list[str] = ()) -> dict:
    """Encoders, pretraining (stage full), align, then LoRA finetune, each from the previous result."""
    common = [f"data.root={data}", "data.cache_in_memory=true", *overrides]
    results, previous = {}, None
    for name, stage in demo_stages(overrides):
        run = [*common, f"stage={stage}", f"output_dir={out / name}", f"optim.max_steps={budget['steps'][name]}"]
        run += [f"eval_steps={budget['eval_steps'][name]}", "report=false"]
        if previous is not None:
            run.append(f"init_from={previous}")
        if name != "finetune":
            run.append("data.eval=[]" if not budget["eval_steps"][name] else "data.eval_max_samples=40")
        results[name] = train(load_recipe(recipe_path("demo.yaml"), run))
        previous = out / name / "final"
    return results


def demo_stages(overrides: list[str] = ()) -> tuple[tuple[str, str], ...]:
    """(run name, stage) in order; without L_other (λ = 0) the `encoders` stage has nothing to train."""
    lam = load_recipe(recipe_path("demo.yaml"), [o for o in overrides if o.startswith("other_loss_weight=")]).other_loss_weight
    return tuple((name, stage) for name, stage in STAGES if stage != "encoders" or lam > 0)


def write_stages_report(out: Path, path: Path, overrides: list[str] = ()) -> Path:
    """One report image over all stages: their step axes laid end to end."""
    train_history, eval_history, boundaries, offset = [], [], [], 0
    for name, _ in demo_stages(overrides):
        logs = json.loads((out / name / "log_history.json").read_text())
        train_history += [{**record, "step": record["step"] + offset} for record in logs["train"]]
        eval_history += [{**record, "step": record["step"] + offset} for record in logs["eval"]]
        boundaries.append((offset, name))
        offset += len(logs["train"])
    return write_report(train_history, eval_history, path, "demo: encoders → pretrain → align → LoRA finetune", boundaries)


def evaluate_on_test(model_dir: Path, data: Path) -> tuple[dict, dict]:
    """Reload the saved model with `from_pretrained` and score it on every test set."""
    model = MultimodalForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = MultimodalProcessor.from_pretrained(model_dir)
    scores, samples = {}, {}
    for task, manifest in TEST_SETS:
        rows = list(load_manifest(data / manifest, root=data))
        task_scores, task_samples = evaluate_task(
            model, processor, rows, task, batch_size=32, num_examples=3, rerank_top_k=RERANK_TOP_K
        )
        scores.update({f"{task}/{k}": v for k, v in task_scores.items()})
        scores[f"{task}/num_test_samples"] = len(rows)
        samples[task] = task_samples
    return scores, samples


def targets_table(scores: dict) -> list[dict]:
    rows = []
    for key, goal, higher in TARGETS:
        value = scores.get(key)
        met = value is not None and (value >= goal if higher else value <= goal)
        rows.append({"metric": key, "value": value, "goal": f"{'≥' if higher else '≤'} {goal}", "met": met})
    return rows


def print_results(scores: dict, samples: dict, timings: dict, holdout: str = "combinations") -> None:
    print(f"\n=== held-out test split ({HOLDOUT_TITLES[holdout]}, unseen voice) ===")
    print(f"{'metric':52s} {'value':>8s}  {'goal':>7s}  met")
    for row in targets_table(scores):
        value = "n/a" if row["value"] is None else f"{row['value']:.3f}"
        print(f"{row['metric']:52s} {value:>8s}  {row['goal']:>7s}  {'yes' if row['met'] else 'NO'}")
    others = {k: v for k, v in scores.items() if k not in {t[0] for t in TARGETS} and not k.endswith("num_test_samples")}
    for key, value in sorted(others.items()):
        print(f"{key:52s} {value:8.3f}")
    print("\n=== sample inputs and the model's outputs ===")
    for task, examples in samples.items():
        for example in examples:
            media = ", ".join(Path(p).name for paths in example["media"].values() for p in paths)
            print(f"[{task}] {media}\n    model:     {example['prediction']}\n    reference: {example['reference']}")
    print("\n=== time ===")
    print(", ".join(f"{k}: {v:.0f} s" for k, v in timings.items()))


def run_demo(out: str | Path = "demo_output", quick: bool = False, overrides: list[str] = (), holdout: str = "combinations") -> dict:
    """The whole demo; returns (and writes to out/results.json) the test scores, targets and timings."""
    out = Path(out)
    budget = QUICK if quick else FULL
    timings, started = {}, time.perf_counter()
    data = out / "data"
    make_demo_data(data, seed=0, sizes=budget["sizes"], holdout=holdout)
    timings["data"] = time.perf_counter() - started
    mark = time.perf_counter()
    runs = train_demo_model(out, data, budget, list(overrides))
    timings["train"] = time.perf_counter() - mark
    mark = time.perf_counter()
    model_dir = out / "finetune" / "final"
    scores, samples = evaluate_on_test(model_dir, data)
    timings["test"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started
    report = write_stages_report(out, out / "report.png", list(overrides))
    results = {
        "scores": scores,
        "targets": targets_table(scores),
        "samples": samples,
        "timings_seconds": timings,
        "model_dir": str(model_dir),
        "report": str(report),
        "train_steps": {name: run["steps"] for name, run in runs.items()},
        "overrides": list(overrides),
        "holdout": holdout,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print_results(scores, samples, timings, holdout)
    print(f"\nresults: {out / 'results.json'}\nreport:  {report}\nmodel:   {model_dir}")
    return results


# The ablation table: the targets, then embedding-only retrieval (before re-ranking).
ABLATION_COLUMNS = (*(key for key, _, _ in TARGETS), "image_caption/text_to_media_recall@1", "image_caption/media_to_text_recall@1")
ABLATIONS = (("neither (λ=0, α=0)", 0.0, 0.0), ("λ only", None, 0.0), ("α only", 0.0, None), ("both", None, None))


def run_ablation(out: str | Path = "demo_output/ablation", quick: bool = False, holdout: str = "combinations") -> list[dict]:
    """The same budget and seeds with each loss term off and on; writes ablation.json and ablation.md."""
    out = Path(out)
    budget = QUICK if quick else FULL
    data = out / "data"
    make_demo_data(data, seed=0, sizes=budget["sizes"], holdout=holdout)
    defaults = load_recipe(recipe_path("demo.yaml"))
    rows = []
    for name, lam, alpha in ABLATIONS:
        lam = defaults.other_loss_weight if lam is None else lam
        alpha = defaults.cross_loss_weight if alpha is None else alpha
        run_dir = out / name.split(" ")[0].replace("λ", "lambda").replace("α", "alpha")
        no_eval = {stage: 0 for stage, _ in STAGES}
        train_demo_model(run_dir, data, {**budget, "eval_steps": no_eval}, [f"other_loss_weight={lam}", f"cross_loss_weight={alpha}"])
        scores, _ = evaluate_on_test(run_dir / "finetune" / "final", data)
        rows.append({"run": name, "lambda": lam, "alpha": alpha, **{key: scores.get(key) for key in ABLATION_COLUMNS}})
        for stage, _ in STAGES[:-1]:
            shutil.rmtree(run_dir / stage, ignore_errors=True)
    (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    header = "| run | λ | α | " + " | ".join(ABLATION_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (3 + len(ABLATION_COLUMNS))]
    for row in rows:
        values = " | ".join("n/a" if row[key] is None else f"{row[key]:.3f}" for key in ABLATION_COLUMNS)
        lines.append(f"| {row['run']} | {row['lambda']} | {row['alpha']} | {values} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows
