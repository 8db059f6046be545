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

`bench_demo_packing` runs the same plans on the pretrained demo's own data, recipe and LoRA model (its real
length distribution: short samples, 16 tokens per image); `bench_pretrained.py` calls it.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from modeling_multimodal.data import LengthGroupedBatchSampler, MultimodalCollator
from modeling_multimodal.training import PackingCollator, first_fit, use_per_sample_attention

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


def plan_batches(examples: list[dict], batch_size: int, max_length: int, pad_token_id: int = PAD, rows_per_step: int = 1,
                 seed: int = 0) -> dict[str, list[dict]]:
    """The collated batches of each strategy over the same examples (see the module docstring).

    Packed steps hold `rows_per_step` rows of at most `max_length` tokens (first fit over the shuffled
    examples), each collated by `PackingCollator` with its own samples' media and sample boundaries.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    shuffled = [examples[i] for i in order]
    padded = MultimodalCollator(pad_token_id, padding_side="right")
    packing = PackingCollator(pad_token_id, max_length=max_length)
    grouped = LengthGroupedBatchSampler([len(e["input_ids"]) for e in examples], batch_size, seed=seed)
    rows = first_fit([len(e["input_ids"]) for e in shuffled], max_length, decreasing=False)
    steps = [rows[i : i + rows_per_step] for i in range(0, len(rows), rows_per_step)]
    packed = [packing([shuffled[i] for row in step for i in row]) for step in steps]
    return {
        "padded_random": [padded(shuffled[i : i + batch_size]) for i in range(0, len(shuffled), batch_size)],
        "padded_length_grouped": [padded([examples[i] for i in indices]) for indices in grouped],
        "packed": packed,
        "packed_masked_row": [{k: v for k, v in batch.items() if not k.startswith("cu_seq_lens")} for batch in packed],
    }


def time_plans(model: torch.nn.Module, examples: list[dict], plans: dict[str, list[dict]], device: str, repeats: int) -> dict:
    """Interleaved epochs (one optimizer step per batch) of every plan; real tokens/s and the speedups of `packed`.

    The model's LM runs `per_sample_sdpa` (what the trainer uses with packing): plain SDPA for the padded
    plans and the masked rows, which carry no sample boundaries.
    """
    use_per_sample_attention(model)
    real_tokens = sum(len(e["input_ids"]) for e in examples)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    epochs, summary = {}, {}
    for name, batches in plans.items():
        steps = [make_train_step(model, to_device(batch, device), True, optimizer)[0] for batch in batches]
        steps[0]()  # warm up: optimizer state, first-call costs
        epochs[name] = lambda steps=steps: [step() for step in steps]
        positions = sum(b["input_ids"].numel() for b in batches)
        summary[name] = {"steps": len(batches), "positions": positions, "padding_fraction": 1 - real_tokens / positions}
    times = interleaved_medians(epochs, device, repeats=repeats, warmup=0)
    for name, seconds in times.items():
        summary[name].update(epoch_s=seconds, real_tokens_per_s=real_tokens / seconds)
    lengths = [len(e["input_ids"]) for e in examples]
    return {
        "examples": len(examples), "real_tokens": real_tokens, "length_min": min(lengths),
        "length_median": int(np.median(lengths)), "length_max": max(lengths), **summary,
        "speedup_vs_padded_random": times["padded_random"] / times["packed"],
        "speedup_vs_padded_length_grouped": times["padded_length_grouped"] / times["packed"],
        "speedup_vs_packed_masked_row": times["packed_masked_row"] / times["packed"],
        # what dropping padding alone can give where a step's cost is linear in its positions
        "positions_ratio_vs_padded_random": summary["padded_random"]["positions"] / summary["packed"]["positions"],
        "positions_ratio_vs_padded_length_grouped": summary["padded_length_grouped"]["positions"] / summary["packed"]["positions"],
    }


def bench_packing(sizes: Sizes, device: str, count: int, batch_size: int, max_length: int) -> dict:
    examples = make_examples(sizes, count, max_text=max_length - sizes.image_tokens - 1)
    plans = plan_batches(examples, batch_size, max_length, rows_per_step=1)
    model = set_trainable(build_ours(sizes)).to(device)
    results = time_plans(model, examples, plans, device, repeats=max(1, sizes.repeats - 1))
    return {"padded_batch_size": batch_size, "packed_max_length": max_length, "packed_rows_per_step": 1, **results}


def demo_examples(recipe, processor, count: int, seed: int = 0) -> list[dict]:
    """`count` examples drawn from the recipe's training mixture (each entry's `repeat` weighting it), encoded."""
    from modeling_multimodal.data import ExampleEncoder
    from modeling_multimodal.training.mixture import load_rows

    draws = []
    for (task, rows), entry in zip(load_rows(recipe, recipe.data.train), recipe.data.train):
        draws += [(task, rows, index) for index in range(len(rows))] * entry.get("repeat", 1)
    random.Random(seed).shuffle(draws)
    encoders = {}
    examples = []
    for task, rows, index in draws[:count]:
        encoder = encoders.setdefault(task, ExampleEncoder(processor, task, max_length=recipe.data.max_length))
        examples.append(encoder(rows[index]))
    return examples


def bench_demo_packing(folders: dict[str, str], data_root: str, device: str, count: int, batch_size: int, rows_per_step: int) -> dict:
    """Packing on the pretrained demo's own data and recipe (`recipes/demo_pretrained.yaml`, stage finetune: LoRA).

    Real encoded examples (images, videos, clips; their real lengths), the recipe's `max_length` and batch size,
    fp32 (the recipe trains under bf16 autocast where the CPU has native bf16).
    """
    from modeling_multimodal.training.model_builder import build_model_and_processor
    from modeling_multimodal.training.recipe import load_recipe
    from modeling_multimodal.training.stages import apply_stage, base_model

    recipe_path = Path(__file__).resolve().parent.parent / "recipes" / "demo_pretrained.yaml"
    overrides = [f"data.root={data_root}", "stage=finetune"] + [f"model.components.{role}={path}" for role, path in folders.items()]
    recipe = load_recipe(recipe_path, overrides)
    model, processor = build_model_and_processor(recipe)
    model = base_model(apply_stage(model, recipe)).to(device)  # LoRA layers inside; projectors and heads trained fully
    examples = demo_examples(recipe, processor, count)
    max_length = recipe.data.max_length
    plans = plan_batches(examples, batch_size, max_length, processor.tokenizer.pad_token_id, rows_per_step)
    results = time_plans(model, examples, plans, device, repeats=2)
    return {"data": str(data_root), "padded_batch_size": batch_size, "packed_max_length": max_length,
            "packed_rows_per_step": rows_per_step, **results}


def run(sizes: Sizes, device: str) -> dict:
    if sizes.vocab_size > 1000:
        return {"packing": bench_packing(sizes, device, count=12, batch_size=4, max_length=2048)}
    return {"packing": bench_packing(sizes, device, count=8, batch_size=2, max_length=96)}
