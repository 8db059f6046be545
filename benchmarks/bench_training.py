"""Training step (forward + backward + AdamW) of ours against LLaVA and Qwen2-Audio; frozen towers; MFU.

Ours is called with `return_logits=False`: the LM head and cross-entropy run only at labelled positions,
in chunks (`losses.labelled_lm_loss`). The references compute (batch × sequence × vocabulary) logits at
every position, as their forward does in training. Weights, trainable split and batch are identical.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from .common import interleaved_medians, matmul_peak_flops, memory_at_peak, mib, peak_memory, resident_tensors
from .models import (
    Sizes,
    audio_batches,
    build_ours,
    image_batch,
    llava_twin,
    qwen2_audio_twin,
    set_trainable,
    to_device,
)


def make_train_step(model: torch.nn.Module, batch: dict, ours: bool, optimizer: torch.optim.Optimizer | None = None):
    """A closure running one optimizer step on `batch`, and its optimizer (state created on first call)."""
    model.train()
    if optimizer is None:  # fused: both trainers' default (ours, and transformers' Trainer since torch 2.8)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    extra = {"return_logits": False} if ours else {}

    def step():
        loss = model(**batch, use_cache=False, **extra).loss
        loss.backward()
        optimizer.step()
        # Gradients freed here, not at the next step's start: no step then starts with the last step's gradients
        # alive (the CPU profiler cannot see frees of blocks allocated before it started).
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def compare_steps(models: dict[str, tuple[torch.nn.Module, dict, bool]], device: str, repeats: int) -> dict:
    """Interleaved median step time and peak memory of each (model, batch, is_ours) entry.

    On CPU each entry also gets `at_peak_mib`: what is alive at its peak, by kind (`common.memory_at_peak`).
    `step_flops_g` (forward + backward, `count_step_flops`) says how much of a speedup is less work.
    """
    steps = {name: make_train_step(model, batch, ours) for name, (model, batch, ours) in models.items()}
    times = interleaved_medians({name: step for name, (step, _) in steps.items()}, device, repeats)
    results = {}
    for name, (step, optimizer) in steps.items():
        model, batch, _ = models[name]
        memory = peak_memory(step, device, resident_tensors(model, optimizer, batch))
        results[name] = {"step_s": times[name], "peak_mib": mib(memory["peak_bytes"]), "step_peak_mib": mib(memory["step_bytes"]),
                         "step_flops_g": round(count_step_flops(model, batch, models[name][2]) / 1e9, 3)}
        if not device.startswith("cuda"):
            results[name]["at_peak_mib"] = {k: v if isinstance(v, str) else mib(v) for k, v in memory_at_peak(step).items()}
    return results


def _ratios(results: dict, ours: str, theirs: str) -> dict:
    return {
        "speedup": results[theirs]["step_s"] / results[ours]["step_s"],
        "peak_memory_ratio": results[ours]["peak_mib"] / results[theirs]["peak_mib"],
        "flop_ratio": results[theirs]["step_flops_g"] / results[ours]["step_flops_g"],
    }


def bench_llava(sizes: Sizes, device: str) -> dict:
    ours = set_trainable(build_ours(sizes)).to(device)
    llava = set_trainable(llava_twin(ours)).to(device)
    batch = to_device(image_batch(sizes), device)
    results = compare_steps({"ours": (ours, batch, True), "llava": (llava, batch, False)}, device, sizes.repeats)
    return {
        "sequence": batch["input_ids"].shape[1], "batch": sizes.batch_size,
        "labelled_per_sample": sizes.response_tokens, **results, **_ratios(results, "ours", "llava"),
    }


def bench_qwen2_audio(sizes: Sizes, device: str) -> dict:
    ours = set_trainable(build_ours(sizes, image=False, audio=True)).to(device)
    reference = set_trainable(qwen2_audio_twin(ours)).to(device)
    ours_batch, their_batch = audio_batches(ours, sizes, sizes.audio_seconds)
    ours_batch, their_batch = to_device(ours_batch, device), to_device(their_batch, device)
    results = compare_steps({"ours": (ours, ours_batch, True), "qwen2_audio": (reference, their_batch, False)}, device, sizes.repeats)
    return {
        "clip_seconds": sizes.audio_seconds, "sequence": ours_batch["input_ids"].shape[1], "batch": sizes.batch_size,
        "encoder_frames_ours": ours_batch["input_features"].shape[-1],
        "encoder_frames_qwen2_audio": their_batch["input_features"].shape[-1],
        **results, **_ratios(results, "ours", "qwen2_audio"),
    }


def bench_frozen_tower(sizes: Sizes, device: str) -> dict:
    """Same model and batch with the vision tower frozen (encoded under no_grad) or trained."""
    frozen = set_trainable(build_ours(sizes)).to(device)
    trained = set_trainable(copy.deepcopy(frozen), train_towers=True)
    batch = to_device(image_batch(sizes), device)
    results = compare_steps({"frozen_tower": (frozen, batch, True), "trainable_tower": (trained, batch, True)}, device, sizes.repeats)
    results["activation_memory_ratio"] = results["frozen_tower"]["step_peak_mib"] / results["trainable_tower"]["step_peak_mib"]
    return results


def count_step_flops(model: torch.nn.Module, batch: dict, ours: bool = True) -> int:
    """FLOPs of one forward + backward, counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls, convs, attention)."""
    model.train()
    extra = {"return_logits": False} if ours else {}
    with FlopCounterMode(display=False) as counter:
        model(**batch, use_cache=False, **extra).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_mfu(sizes: Sizes, device: str, matmul_size: int) -> dict:
    """Achieved FLOP/s of our training step over the measured `torch.mm` peak, in fp32 and bf16.

    A bf16 run is skipped (and says why) when bf16 matmuls run at under 10% of fp32 speed: CPUs without
    native bf16 (no AVX512-BF16 / AMX) fall back to a slow kernel, and a step would take minutes.
    """
    results = {}
    base = set_trainable(build_ours(sizes))
    fp32_peak = None
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        probe = matmul_peak_flops(device, dtype, min(512, matmul_size), repeats=1)
        if fp32_peak is not None and probe < 0.1 * fp32_peak:
            results[name] = {"skipped": f"bf16 torch.mm of {min(512, matmul_size)}^2 runs at {probe / 1e9:.2f} GFLOP/s here "
                             f"(fp32: {fp32_peak / 1e9:.1f}); no native bf16 on this CPU"}
            continue
        fp32_peak = fp32_peak or probe
        model = copy.deepcopy(base).to(device=device, dtype=dtype)
        batch = to_device(image_batch(sizes), device, dtype)
        flops = count_step_flops(model, batch)
        step, _ = make_train_step(model, batch, ours=True)
        seconds = interleaved_medians({"step": step}, device, sizes.repeats)["step"]
        peak = matmul_peak_flops(device, dtype, matmul_size)
        achieved = flops / seconds
        results[name] = {
            "step_flops_g": round(flops / 1e9, 2), "step_s": seconds, "achieved_gflops": achieved / 1e9,
            "matmul_peak_gflops": peak / 1e9, "mfu": achieved / peak,
        }
        del model
    results["flop_count"] = "torch.utils.flop_counter.FlopCounterMode over one forward + backward (matmuls, convs, attention)"
    return results


def run(sizes: Sizes, device: str) -> dict:
    return {
        "train_vs_llava": bench_llava(sizes, device),
        "train_vs_qwen2_audio": bench_qwen2_audio(sizes, device),
        "frozen_vs_trainable_tower": bench_frozen_tower(sizes, device),
        "mfu": bench_mfu(sizes, device, matmul_size=2048 if sizes.vocab_size > 1000 else 256),
    }
