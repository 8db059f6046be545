"""The audio-visual demo task with both streams, frames only and the sound track only, at the same budget.

    python scripts/measure_audio_in_video.py --out /tmp/av

Data: `make_av_demo_data` (a grey shape moves while a voice says a colour; the caption "a red circle moving left"
needs both; the test split holds only unseen (colour, shape, direction) combinations). Each arm trains a model
built from configs with `recipes/demo_av.yaml` (stages `encoders` then `full`, same steps and seed) and is
scored by exact match on the test split:
- `both`: task `av_video_caption` (frames and the mp4's sound track, `use_audio_in_video`);
- `frames`: task `video_caption` on the same rows (the frames alone);
- `audio`: the same mp4s given as `<audio>` (their sound track alone), as chat rows.
Writes OUT/results.json: per arm, the test scores (exact match, BLEU, and how often the colour, the shape and the
direction are right) and three sample outputs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from modeling_multimodal.data.examples import load_manifest
from modeling_multimodal.demo import recipe_path
from modeling_multimodal.demo_data.av_videos import make_av_demo_data, manifest_path
from modeling_multimodal.evaluation.tasks import evaluate_task
from modeling_multimodal.modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.processing import MultimodalProcessor
from modeling_multimodal.training.recipe import load_recipe
from modeling_multimodal.training.trainer import train

PROMPT = "what happens in the video?"
ARMS = {  # arm: (manifest prefix, task; None: chat rows)
    "both": ("av_video", "av_video_caption"),
    "frames": ("av_video", "video_caption"),
    "audio": ("av_audio", None),
}


def write_audio_only_manifests(data: Path) -> None:
    """`av_audio_<split>.jsonl`: each row's mp4 as an `<audio>` item (its sound track alone), as chat rows."""
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in manifest_path(data, split).read_text().splitlines() if line.strip()]
        with open(data / f"av_audio_{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                messages = [
                    {"role": "user", "content": [{"type": "audio", "audio": row["video"]}, {"type": "text", "text": PROMPT}]},
                    {"role": "assistant", "content": row["caption"]},
                ]
                f.write(json.dumps({"id": row["id"], "messages": messages, "pair_text": row["caption"]}) + "\n")


def attribute_accuracy(samples: list[dict]) -> dict[str, float]:
    """How often each word of "a {colour} {shape} moving {direction}" is right, over (prediction, reference) pairs."""
    slots = {"colour_accuracy": 1, "shape_accuracy": 2, "direction_accuracy": 4}
    right = dict.fromkeys(slots, 0)
    for sample in samples:
        predicted, reference = sample["prediction"].split(), sample["reference"].split()
        for name, slot in slots.items():
            right[name] += len(predicted) > slot and predicted[slot] == reference[slot]
    return {name: count / max(len(samples), 1) for name, count in right.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=1200, help="training clips")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every arm, e.g. stages.1.optim.max_steps=100")
    args = parser.parse_args(argv)
    data = args.out / "data"
    if not manifest_path(data, "test").is_file():
        make_av_demo_data(data, seed=0, sizes={"train": args.train})
        write_audio_only_manifests(data)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"arms": {}}
    for arm in args.arms:
        prefix, task = ARMS[arm]
        entry = "{manifest: %s_%s.jsonl, task: %s}" % (prefix, "%s", task or "null")
        overrides = [
            f"data.root={data}", f"output_dir={args.out / arm}", f"seed={args.seed}", "overwrite_output_dir=true", "threads=1",
            f"data.train=[{entry % 'train'}]", f"data.eval=[{entry % 'validation'}]", *args.overrides,
        ]
        train(load_recipe(recipe_path("demo_av.yaml"), overrides))
        final = sorted((args.out / arm).glob("*-full/final"))[-1]
        model = MultimodalForConditionalGeneration.from_pretrained(final).eval()
        processor = MultimodalProcessor.from_pretrained(final)
        rows = list(load_manifest(data / f"{prefix}_test.jsonl", root=data))
        scores, samples = evaluate_task(model, processor, rows, task, batch_size=32, num_examples=None, retrieval=False)
        scores.update(attribute_accuracy(samples))
        results["arms"][arm] = {"scores": scores, "samples": samples[:3]}
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({"arm": arm, **{k: v for k, v in scores.items() if k != "bleu"}}), flush=True)
    return results


if __name__ == "__main__":
    main()
