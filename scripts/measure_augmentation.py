"""The from-scratch demo with and without augmentation on part of its training data, at the same steps.

    python scripts/measure_augmentation.py --out /tmp/aug                       # a quarter of the data and steps
    python scripts/measure_augmentation.py --out /tmp/aug --step-fraction 1 --seeds 0 1 2

Both arms run `demo.train_demo_model` (the demo's four stages, `recipes/demo.yaml`) on the same data (a
`--data-fraction` of the demo's training sets, the demo's validation and test sets) with the same steps (a
`--step-fraction` of the demo's) and seed; the augmented arm adds `AUGMENT` (the demo recipe's word-swap
table and text attributes keep the captions true; examples are re-encoded every epoch, so the demo's
in-memory example cache is off in that arm). Each arm is scored on the test split (`demo.evaluate_on_test`).
Writes OUT/results.json: per seed and arm, the held-out scores; and the augmented minus plain difference.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from modeling_multimodal import demo
from modeling_multimodal.demo_data import make_demo_data

AUGMENT = [
    "augment.hflip=0.5", "augment.rotation=10",  # images and videos (crop and colour jitter: off, captions name them)
    "augment.time_masks=2", "augment.time_mask_frames=10", "augment.freq_masks=2", "augment.freq_mask_bins=8",
    "augment.speed=[0.9,1.1]", "data.cache_in_memory=false",
]
KEYS = ("image_caption/exact_match", "video_caption/exact_match", "speech_transcription/wer")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-fraction", type=float, default=0.25)
    parser.add_argument("--step-fraction", type=float, default=0.25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    plan = demo.SCRATCH
    sizes = {task: {"train": max(1, round(args.data_fraction * splits["train"]))} for task, splits in plan.full["sizes"].items()}
    steps = {name: max(1, round(args.step_fraction * count)) for name, count in plan.full["steps"].items()}
    budget = {"sizes": sizes, "steps": steps, "eval_steps": dict.fromkeys(steps, 0)}
    data = args.out / "data"
    make_demo_data(data, seed=0, sizes=sizes)
    results = {"sizes": sizes, "steps": steps, "augment": AUGMENT, "runs": {}}
    for seed in args.seeds:
        for arm, overrides in (("plain", []), ("augmented", AUGMENT)):
            started = time.perf_counter()
            out = args.out / f"seed{seed}" / arm
            demo.train_demo_model(out, data, budget, [f"seed={seed}", "overwrite_output_dir=true", *overrides], plan)
            scores, _ = demo.evaluate_on_test(out / "finetune" / "final", data, num_examples=0, plan=plan)
            results["runs"].setdefault(str(seed), {})[arm] = {"scores": scores, "wall_s": round(time.perf_counter() - started)}
            (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        runs = results["runs"][str(seed)]
        runs["augmented_minus_plain"] = {key: runs["augmented"]["scores"][key] - runs["plain"]["scores"][key] for key in KEYS}
        print(json.dumps({"seed": seed, **{arm: {k: runs[arm]["scores"][k] for k in KEYS} for arm in ("plain", "augmented")},
                          "difference": runs["augmented_minus_plain"]}), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
