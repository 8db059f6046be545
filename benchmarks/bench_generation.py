"""Generation: tokens per second against LLaVA's `generate`, and decode cost at 1 vs 4 images.

A no-op logits processor timestamps every generation step, so the decode time per token is read
directly (the median interval between steps) rather than inferred from two runs. A forward hook on the
vision tower counts how often media are encoded per `generate` call (once, at prefill, is the goal).
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .common import synchronize
from .models import Sizes, build_ours, image_batch, llava_twin, to_device


class StepClock(LogitsProcessor):
    """Records the time at which each generation step's logits are ready; leaves the scores unchanged."""

    def __init__(self, device: str):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def timed_generate(model, batch: dict, new_tokens: int, device: str) -> dict:
    """Total seconds of one greedy `generate` of exactly `new_tokens`, and the median seconds per decode step."""
    clock = StepClock(device)
    synchronize(device)
    start = time.perf_counter()
    model.generate(
        **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        logits_processor=LogitsProcessorList([clock]), pad_token_id=0,
    )
    synchronize(device)
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return {"total_s": total, "prefill_s": clock.times[0] - start, "decode_s": statistics.median(steps)}


def interleaved_generate(models: dict, batches: dict, new_tokens: int, device: str, repeats: int) -> dict:
    """Median total / prefill / decode seconds per model, calling them in turn after one warmup round."""
    for name, model in models.items():
        timed_generate(model, batches[name], 2, device)
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(timed_generate(model, batches[name], new_tokens, device))
    return {name: {key: statistics.median(r[key] for r in results) for key in results[0]} for name, results in runs.items()}


def prompt_only(batch: dict) -> dict:
    """Drop the labelled response: generation starts right after the prompt."""
    return {k: v for k, v in batch.items() if k != "labels"}


def bench_against_llava(sizes: Sizes, device: str, new_tokens: int, batch_size: int) -> dict:
    ours = build_ours(sizes).eval().to(device)
    llava = llava_twin(ours).eval().to(device)
    batch = to_device(prompt_only(image_batch(sizes, batch_size=batch_size)), device)
    with torch.no_grad():
        timings = interleaved_generate({"ours": ours, "llava": llava}, {"ours": batch, "llava": batch}, new_tokens, device, sizes.repeats)
    for timing in timings.values():
        timing["tokens_per_s"] = batch_size * new_tokens / timing["total_s"]
    return {
        "batch": batch_size, "new_tokens": new_tokens, "prompt_length": batch["input_ids"].shape[1], **timings,
        "throughput_ratio": timings["ours"]["tokens_per_s"] / timings["llava"]["tokens_per_s"],
    }


def bench_decode_vs_media(sizes: Sizes, device: str, new_tokens: int, image_counts=(1, 4)) -> dict:
    """Decode seconds per token of one sample with 1 vs 4 images; vision tower calls per `generate`."""
    model = build_ours(sizes).eval().to(device)
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    models, batches = {}, {}
    for count in image_counts:
        models[f"{count}_images"] = model
        batches[f"{count}_images"] = to_device(prompt_only(image_batch(sizes, images_per_sample=count, batch_size=1)), device)
    with torch.no_grad():
        timings = interleaved_generate(models, batches, new_tokens, device, sizes.repeats)
        calls.clear()
        timed_generate(model, batches[f"{image_counts[-1]}_images"], new_tokens, device)
    first, last = (timings[f"{c}_images"] for c in (image_counts[0], image_counts[-1]))
    return {
        **timings, "decode_ratio": last["decode_s"] / first["decode_s"], "prefill_ratio": last["prefill_s"] / first["prefill_s"],
        "vision_tower_calls_per_generate": len(calls),
    }


def run(sizes: Sizes, device: str) -> dict:
    new_tokens = 16 if sizes.vocab_size > 1000 else 4
    return {
        "generate_vs_llava": bench_against_llava(sizes, device, new_tokens, batch_size=2 * sizes.batch_size),
        "decode_vs_media": bench_decode_vs_media(sizes, device, new_tokens),
    }
