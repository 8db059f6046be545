"""Quantized LM vs float32 on CPU: generation tokens/s, weights size and held-out scores, as ratios from one run.

    python benchmarks/bench_quantization.py --out /tmp/q.json                       # composed pretrained model
    python benchmarks/bench_quantization.py --checkpoint RUN/final --data DATA --out /tmp/q.json   # + held-out scores
    python benchmarks/bench_quantization.py --quick --out /tmp/q.json               # tiny model: a smoke test

The model is, in this order: `--checkpoint` (a trained run's `final/`, e.g. the pretrained demo's finetune
stage); else the pretrained demo's parts (`demo.PRETRAINED_PARTS`: SmolLM2-135M-Instruct + DINOv2-small +
Whisper tiny.en from `--pretrained-dir`, default /tmp/pre) composed as `recipes/demo_pretrained.yaml` does,
untrained, so only speed and size mean something; else (or with `--quick`) a tiny model from a config (hidden
32, 2 layers) whose numbers mean nothing. Without any of them the section is skipped with the reason.

Every method of `compression.QUANTIZATION_METHODS` is written with `quantize_checkpoint` and loaded with
`load_quantized`, as a user would. Greedy generation of the same image prompt is timed interleaved
(float32, each method, float32, ...; `bench_generation.interleaved_generate`), and each method's generated
tokens are compared with float32's (agreement). Held-out scores (`evaluate_task`: exact match, WER) are
measured only for a trained `--checkpoint` with `--data` (the demo's test manifests), as each method minus
float32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_quantization.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_generation import interleaved_generate  # noqa: E402
from benchmarks.common import machine_info, mib  # noqa: E402
from benchmarks.models import Sizes  # noqa: E402

DEFAULT_PRETRAINED_DIR = "/tmp/pre"
PRETRAINED_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo_pretrained.yaml"
HELD_OUT = (("image_test.jsonl", "image_caption"), ("video_test.jsonl", "video_caption"), ("speech_test.jsonl", "speech_transcription"))


# --- the float32 model ----------------------------------------------------------------------------------
def save_tiny(folder: Path) -> str:
    from modeling_multimodal import MultimodalForConditionalGeneration
    from modeling_multimodal.processing import MultimodalProcessor
    from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer)
    torch.manual_seed(0)
    MultimodalForConditionalGeneration(config).save_pretrained(folder)
    MultimodalProcessor.from_config_and_components(config, tokenizer).save_pretrained(folder)
    return "tiny model from a config (hidden 32, 2 layers; numbers mean nothing)"


def save_composed_pretrained(folder: Path, pretrained_dir: Path) -> str:
    """The pretrained demo's parts composed as its recipe does (untrained projectors), saved as a checkpoint."""
    from modeling_multimodal.demo import PRETRAINED_PARTS
    from modeling_multimodal.training.recipe import load_recipe
    from modeling_multimodal.training.model_builder import build_model_and_processor

    parts = {role: pretrained_dir / name for role, name in PRETRAINED_PARTS}
    recipe = load_recipe(PRETRAINED_RECIPE, [f"model.components.{role}={path}" for role, path in parts.items()])
    model, processor = build_model_and_processor(recipe)
    model.float().save_pretrained(folder)
    processor.save_pretrained(folder)
    return "pretrained demo parts composed, untrained (" + ", ".join(name for _, name in PRETRAINED_PARTS) + ")"


def float32_checkpoint(work: Path, checkpoint: str | None, pretrained_dir: Path, quick: bool) -> tuple[str | None, str]:
    """(folder of the float32 model or None, what it is / why there is none)."""
    if checkpoint:
        return checkpoint, f"trained checkpoint {checkpoint}"
    folder = work / "float32"
    if quick:
        return str(folder), save_tiny(folder)
    from modeling_multimodal.demo import PRETRAINED_PARTS

    missing = [name for _, name in PRETRAINED_PARTS if not (pretrained_dir / name / "config.json").is_file()]
    if missing:
        return None, f"no converted pretrained parts {missing} in {pretrained_dir} (`modeling-multimodal convert all DIR`); pass --checkpoint or --quick"
    return str(folder), save_composed_pretrained(folder, pretrained_dir)


# --- measurements ----------------------------------------------------------------------------------------
def weights_bytes(folder: str) -> int:
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


def image_prompt(processor) -> dict:
    """One demo-like image (a red circle) and the demo's caption prompt, as generate's inputs."""
    from modeling_multimodal.demo_data.images import render_image

    image, _ = render_image("red", "circle", "medium", "top", "left", 64, np.random.default_rng(0))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "describe the image."}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)


def greedy_tokens(model, batch: dict, new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, batch["input_ids"].shape[1] :].tolist()


def held_out_scores(model, processor, data: Path, max_samples: int) -> dict[str, float]:
    from modeling_multimodal.evaluation.tasks import evaluate_task
    from modeling_multimodal.data.examples import load_manifest

    scores = {}
    for manifest, task in HELD_OUT:
        if not (data / manifest).is_file():
            continue
        dataset = load_manifest(data / manifest, root=data, task=task)
        rows = list(dataset.select(range(min(max_samples, len(dataset)))))
        task_scores, _ = evaluate_task(model, processor, rows, task, num_examples=0, retrieval=False)
        scores.update({f"{task}/{name}": value for name, value in task_scores.items() if name in ("exact_match", "wer")})
    return scores


def bench_quantization(
    work: Path, checkpoint: str | None, pretrained_dir: Path, quick: bool, data: Path | None, max_samples: int,
    new_tokens: int, repeats: int, timing: bool = True,
) -> dict:
    from modeling_multimodal import MultimodalForConditionalGeneration
    from modeling_multimodal.compression import QUANTIZATION_METHODS, load_quantized, quantize_checkpoint
    from modeling_multimodal.processing import MultimodalProcessor

    source, model_note = float32_checkpoint(work, checkpoint, pretrained_dir, quick)
    if source is None:
        return {"skipped": model_note}
    folders, skipped = {"float32": source}, {}
    for method in QUANTIZATION_METHODS:
        try:
            folders[method] = str(quantize_checkpoint(source, work / method, method))
        except ImportError as err:  # optimum-quanto not installed: that method is reported, not fatal
            skipped[method] = str(err)
    models = {"float32": MultimodalForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()}
    processor = MultimodalProcessor.from_pretrained(source)
    for method, folder in folders.items():
        if method != "float32":
            models[method] = load_quantized(folder)[0]
    batch = image_prompt(processor)
    reference = greedy_tokens(models["float32"], batch, new_tokens)
    results = {"model": model_note, "new_tokens": new_tokens, "prompt_length": batch["input_ids"].shape[1], "skipped_methods": skipped}
    timings = {}
    if timing:
        with torch.no_grad():
            timings = interleaved_generate(models, dict.fromkeys(models, batch), new_tokens, "cpu", repeats)
    scores = {}
    if data is not None and checkpoint:
        scores = {name: held_out_scores(model, processor, data, max_samples) for name, model in models.items()}
    for name, model in models.items():
        entry = {"weights_mib": mib(weights_bytes(folders[name])), "weights_ratio": weights_bytes(folders[name]) / weights_bytes(source)}
        tokens = reference if name == "float32" else greedy_tokens(model, batch, new_tokens)
        entry["greedy_agreement"] = float(np.mean([a == b for a, b in zip(tokens, reference)]))
        if name in timings:
            entry.update(timings[name], tokens_per_s=new_tokens / timings[name]["total_s"])
            entry["speedup"] = timings["float32"]["total_s"] / timings[name]["total_s"]
        if scores:
            entry["held_out"] = scores[name]
            entry["held_out_change"] = {key: value - scores["float32"][key] for key, value in scores[name].items()}
        results[name] = entry
    if not scores:
        results["held_out"] = "not measured: pass a trained --checkpoint and --data (the demo's data folder)"
    return results


def run(sizes: Sizes, device: str) -> dict:
    """The `benchmarks/run.py` section: the composed pretrained model (tiny with --quick); CPU methods only."""
    if device != "cpu":
        return {"quantization": {"skipped": "the quantized kernels measured here are CPU kernels; run with --device cpu"}}
    quick = sizes.vocab_size <= 1000
    with tempfile.TemporaryDirectory() as folder:
        result = bench_quantization(
            Path(folder), None, Path(os.environ.get("MM_PRETRAINED_DIR", DEFAULT_PRETRAINED_DIR)), quick, None, 0,
            new_tokens=4 if quick else 32, repeats=sizes.repeats,
        )
    return {"quantization": result}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results JSON path")
    parser.add_argument("--checkpoint", help="a trained checkpoint folder (float32 or bf16 weights)")
    parser.add_argument("--data", type=Path, help="the demo data folder whose *_test.jsonl are scored (with --checkpoint)")
    parser.add_argument("--max-samples", type=int, default=40, help="held-out rows per task (default 40; more than a test set holds: all of it)")
    parser.add_argument("--pretrained-dir", type=Path, default=Path(DEFAULT_PRETRAINED_DIR))
    parser.add_argument("--quick", action="store_true", help="a tiny model (smoke test); numbers mean nothing")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice; 1 with --quick)")
    parser.add_argument("--no-timing", action="store_true", help="sizes, agreement and scores only (on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    with tempfile.TemporaryDirectory() as folder:
        result = bench_quantization(
            Path(folder), args.checkpoint, args.pretrained_dir, args.quick, args.data, args.max_samples,
            new_tokens=4 if args.quick else args.new_tokens, repeats=1 if args.quick else args.repeats, timing=not args.no_timing,
        )
    results = {"machine": machine_info("cpu"), "quick": args.quick, "quantization": result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    from benchmarks.report import quantization_rows

    for row in quantization_rows(results):
        print(" | ".join(row))
    return results


if __name__ == "__main__":
    main()
