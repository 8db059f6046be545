"""Packing: real (non-padding) tokens per second, packed rows against padded batches.

The same encoded examples — a LLaVA-665k-like mix of image conversations (576 image tokens plus a short
exchange) and text-only conversations of widely varying length — are trained on once per strategy:
- `padded_random`: `MultimodalCollator` on batches in random order (the default loader);
- `padded_length_grouped`: the same collator on `LengthGroupedBatchSampler` batches (less padding);
- `packed`: `PackingCollator` rows of `max_length` tokens (first-fit over the shuffled examples), the LM
  attending within each sample (`training.packing.per_sample_sdpa`, what the trainer uses with packing);
- `packed_masked_row`: the same rows without the sample boundaries, so SDPA runs over the whole row with a
  block-diagonal mask ((row length)² attention: the layout before per-sample attention).
Throughput is the examples' token count over the wall time of the pass; the passes are interleaved.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from modeling_multimodal.data import LengthGroupedBatchSampler, MultimodalCollator
from modeling_multimodal.training import PackingCollator, use_per_sample_attention
from modeling_multimodal.training.packing import varlen_kwargs

from .bench_training import make_train_step
from .common import interleaved_medians
from .models import BOS, FIRST_TEXT_ID, IMAGE_TOKEN, PAD, Sizes, build_ours, set_trainable, to_device


def make_examples(sizes: Sizes, count: int, max_text: int, seed: int = 0) -> list[dict]:
    """Encoded examples: half with one image and a short exchange, half text-only with long-tailed lengths.

    Text lengths are log-normal (medians 60 and 200 tokens); the second half of each text is the labelled
    response.
    """
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        has_image = index % 2 == 0
        median = 60 if has_image else 200
        scale = median * sizes.response_tokens / 32  # shrinks with --quick
        text = int(np.clip(rng.lognormal(np.log(scale), 0.8), 8, max_text))
        prefix = [BOS] + [IMAGE_TOKEN] * (sizes.image_tokens if has_image else 0)
        words = torch.randint(FIRST_TEXT_ID, sizes.vocab_size, (text,), generator=generator).tolist()
        ids = torch.tensor(prefix + words)
        labels = ids.clone()
        labels[: len(prefix) + text // 2] = -100
        example = {"id": str(index), "input_ids": ids, "labels": labels}
        if has_image:
            example["pixel_values"] = torch.randn(1, 3, sizes.image_size, sizes.image_size, generator=generator)
        examples.append(example)
    return examples


def plan_batches(examples: list[dict], batch_size: int, max_length: int, seed: int = 0) -> dict[str, list[dict]]:
    """The collated batches of each strategy over the same examples."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    padded = MultimodalCollator(PAD, padding_side="right")
    packed = PackingCollator(PAD, max_length=max_length)
    lengths = [len(e["input_ids"]) for e in examples]
    grouped = LengthGroupedBatchSampler(lengths, batch_size, seed=seed)
    shuffled = [examples[i] for i in order]
    return {
        "padded_random": [padded(shuffled[i : i + batch_size]) for i in range(0, len(shuffled), batch_size)],
        "padded_length_grouped": [padded([examples[i] for i in indices]) for indices in grouped],
        "packed": [packed(shuffled)],  # one call: the collator packs all examples into as many rows as they need
    }


def split_rows(batch: dict, rows_per_step: int) -> list[dict]:
    """Cut a packed batch into steps of `rows_per_step` rows, with the media of the samples in those rows."""
    steps = []
    image_of_sample = []  # image index of each packed sample (or None)
    image = 0
    for segment in range(int(batch["segment_ids"].max()) + 1):
        rows, cols = (batch["segment_ids"] == segment).nonzero(as_tuple=True)
        has_image = bool((batch["input_ids"][rows, cols] == IMAGE_TOKEN).any())
        image_of_sample.append(image if has_image else None)
        image += has_image
    for start in range(0, batch["input_ids"].shape[0], rows_per_step):
        rows = slice(start, start + rows_per_step)
        step = {key: batch[key][rows] for key in ("input_ids", "labels", "position_ids")}
        step.update(varlen_kwargs(step["position_ids"]))
        segments = batch["segment_ids"][rows].unique().tolist()
        images = [image_of_sample[s] for s in segments if s >= 0 and image_of_sample[s] is not None]
        if images:
            step["pixel_values"] = batch["pixel_values"][images]
        steps.append(step)
    return steps


def bench_packing(sizes: Sizes, device: str, count: int, batch_size: int, max_length: int) -> dict:
    examples = make_examples(sizes, count, max_text=max_length - sizes.image_tokens - 1)
    plans = plan_batches(examples, batch_size, max_length)
    plans["packed"] = split_rows(plans["packed"][0], rows_per_step=1)
    plans["packed_masked_row"] = [{k: v for k, v in step.items() if not k.startswith("cu_seq_lens")} for step in plans["packed"]]
    real_tokens = sum(len(e["input_ids"]) for e in examples)
    model = set_trainable(build_ours(sizes)).to(device)
    use_per_sample_attention(model)  # plain SDPA for the padded plans and the masked rows: they carry no boundaries
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    epochs, summary = {}, {}
    for name, batches in plans.items():
        steps = [make_train_step(model, to_device(batch, device), True, optimizer)[0] for batch in batches]
        steps[0]()  # warm up: optimizer state, first-call costs
        epochs[name] = lambda steps=steps: [step() for step in steps]
        positions = sum(b["input_ids"].numel() for b in batches)
        summary[name] = {"steps": len(batches), "positions": positions, "padding_fraction": 1 - real_tokens / positions}
    times = interleaved_medians(epochs, device, repeats=max(1, sizes.repeats - 1), warmup=0)
    for name, seconds in times.items():
        summary[name].update(epoch_s=seconds, real_tokens_per_s=real_tokens / seconds)
    lengths = [len(e["input_ids"]) for e in examples]
    return {
        "examples": count, "real_tokens": real_tokens, "length_min": min(lengths), "length_median": int(np.median(lengths)),
        "length_max": max(lengths), "padded_batch_size": batch_size, "packed_max_length": max_length, **summary,
        "speedup_vs_padded_random": times["padded_random"] / times["packed"],
        "speedup_vs_padded_length_grouped": times["padded_length_grouped"] / times["packed"],
        "speedup_vs_packed_masked_row": times["packed_masked_row"] / times["packed"],
    }


def run(sizes: Sizes, device: str) -> dict:
    if sizes.vocab_size > 1000:
        return {"packing": bench_packing(sizes, device, count=12, batch_size=4, max_length=2048)}
    return {"packing": bench_packing(sizes, device, count=8, batch_size=2, max_length=96)}
