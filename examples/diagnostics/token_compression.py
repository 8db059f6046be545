"""Pixel shuffle against average pooling at an equal token count, on the pretrained demo's image captions.

Both arms are the pretrained demo's recipe (SmolLM2-135M + DINOv2 at 112 px + Whisper, `recipes/demo_pretrained.yaml`:
8x8 patches, `image_pool_stride: 2` -> 16 tokens per image, row ends, position embeddings) at a reduced budget,
trained on the image captions alone, with α = 0 (no retrieval head; exact match is what is compared); they differ
only in `image_token_compression` (frames share the image projector, so videos would be shuffled too; none are
trained here). Each arm runs once per seed; the script prints and writes every test score and the spread.

    OMP_NUM_THREADS=1 python examples/diagnostics/token_compression.py --out demo_output/compression \
        --seeds 0 1 2 --align-steps 10 --finetune-steps 60 --train-images 480 --test-images 150
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from modeling_multimodal.data.examples import load_manifest
from modeling_multimodal.demo import PRETRAINED, component_overrides, pretrained_parts, train_demo_model
from modeling_multimodal.demo_data import make_demo_data
from modeling_multimodal.evaluation.tasks import evaluate_task
from modeling_multimodal.modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.processing import MultimodalProcessor

ARMS = ("avg_pool", "pixel_shuffle")


def image_exact_match(model_dir: Path, data: Path) -> float:
    """Exact match of the reloaded model's captions on the image test split."""
    model = MultimodalForConditionalGeneration.from_pretrained(model_dir, dtype=PRETRAINED.test_dtype).eval()
    processor = MultimodalProcessor.from_pretrained(model_dir)
    rows = list(load_manifest(data / "image_test.jsonl", root=data))
    scores, _ = evaluate_task(model, processor, rows, "image_caption", batch_size=32, num_examples=0, retrieval=False)
    return scores["exact_match"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_output/compression")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--align-steps", type=int, default=10)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--train-images", type=int, default=480)
    parser.add_argument("--test-images", type=int, default=150)
    parser.add_argument("--holdout", default="combinations")
    args = parser.parse_args()
    out = Path(args.out)
    parts = pretrained_parts(out / "pretrained")
    data = out / "data"
    none = {"train": 0, "validation": 0, "test": 0}
    sizes = {"image": {"train": args.train_images, "validation": 8, "test": args.test_images}, "video": none, "speech": none}
    make_demo_data(data, seed=0, sizes=sizes, holdout=args.holdout, **PRETRAINED.data)
    budget = {"steps": {"align": args.align_steps, "finetune": args.finetune_steps}, "eval_steps": {"align": 0, "finetune": 0}}
    results = {arm: {} for arm in args.arms}
    for seed in args.seeds:
        for arm in args.arms:
            started = time.perf_counter()
            overrides = [
                *component_overrides(parts), f"seed={seed}", f"model.overrides.image_token_compression={arm}",
                "data.train=[{manifest: image_train.jsonl, task: image_caption}]", "data.eval=[]", "contrastive_loss_weight=0",
            ]
            run = out / f"{arm}_seed{seed}"
            train_demo_model(run, data, budget, overrides, PRETRAINED)
            score = image_exact_match(run / "finetune" / "final", data)
            results[arm][seed] = {"exact_match": score, "seconds": time.perf_counter() - started}
            print(f"{arm} seed {seed}: image caption exact match {score:.3f} ({results[arm][seed]['seconds']:.0f} s)", flush=True)
    summary = {}
    for arm, runs in results.items():
        scores = [run["exact_match"] for run in runs.values()]
        summary[arm] = {"scores": scores, "mean": statistics.mean(scores), "min": min(scores), "max": max(scores)}
        if len(scores) > 1:
            summary[arm]["stdev"] = statistics.stdev(scores)
        print(f"{arm}: mean {summary[arm]['mean']:.3f}, range {summary[arm]['min']:.3f}-{summary[arm]['max']:.3f}")
    (out / "token_compression.json").write_text(json.dumps({"args": vars(args), "runs": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
