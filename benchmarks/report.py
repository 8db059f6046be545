"""Results dict -> the markdown table for the README (RESULTS.md) and the console.

Every row is a ratio measured side by side in one process run; the goal column states the issue's
target and the status column says whether this run met it.
"""

from __future__ import annotations

# LLaVA-1.5-7B, for the note on how the LM-head saving scales: hidden, layers, MLP width, vocabulary,
# sequence (576 image tokens + a short exchange), labelled tokens per sample, frozen vision tower params.
LLAVA_7B = dict(hidden=4096, layers=32, intermediate=11008, vocab=32000, sequence=640, labelled=32, vision_params=304e6)


def lm_head_share_7b(hidden, layers, intermediate, vocab, sequence, labelled, vision_params) -> tuple[float, float]:
    """(LM-head share of LLaVA's training-step FLOPs, speedup from computing it at labelled positions only).

    6 FLOPs per trained parameter per token, 2 per frozen-tower parameter per image token, attention 12·s²·d per layer.
    """
    layer_params = layers * (4 * hidden**2 + 3 * hidden * intermediate)
    head_full = 6 * hidden * vocab * sequence
    rest = 6 * layer_params * sequence + layers * 12 * sequence**2 * hidden + 2 * vision_params * 577
    head_labelled = 6 * hidden * vocab * labelled
    return head_full / (rest + head_full), (rest + head_full) / (rest + head_labelled)


def _status(value: float | None, goal: str) -> str:
    if value is None:
        return "n/a"
    if goal.startswith(">="):
        return "met" if value >= float(goal[2:].rstrip("×")) else "missed"
    if goal.startswith("<="):
        return "met" if value <= float(goal[2:].rstrip("×")) else "missed"
    return "—"


def _fmt(value, unit="", digits=2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def summary_rows(results: dict) -> list[tuple[str, str, str, str, str, str]]:
    """(what, ours, reference, ratio, goal, status) rows for whatever sections ran."""
    rows = []

    def add(what, ours, theirs, ratio, goal):
        rows.append((what, ours, theirs, _fmt(ratio, "×"), goal, _status(ratio, goal)))

    for key, reference, name in (("train_vs_llava", "llava", "LLaVA"), ("train_vs_qwen2_audio", "qwen2_audio", "Qwen2-Audio")):
        if key not in results:
            continue
        r = results[key]
        if reference == "llava":
            setting = f"batch {r['batch']}, seq {r['sequence']}"
        else:
            setting = (f"{r['clip_seconds']:g} s clips, ours {r['encoder_frames_ours']} mel "
                       f"frames vs their {r['encoder_frames_qwen2_audio']}")
        add(f"Train step time vs {name} (speedup; {setting})",
            _fmt(r["ours"]["step_s"], " s"), _fmt(r[reference]["step_s"], " s"), r["speedup"], ">=1.2×")
        if "flop_ratio" in r:
            add("  step FLOPs (forward + backward; theirs/ours)",
                _fmt(r["ours"]["step_flops_g"], " GFLOP", 1), _fmt(r[reference]["step_flops_g"], " GFLOP", 1), r["flop_ratio"], "info")
        add(f"Train peak memory vs {name} (ours/theirs)",
            _fmt(r["ours"]["peak_mib"], " MiB", 0), _fmt(r[reference]["peak_mib"], " MiB", 0), r["peak_memory_ratio"], "<=0.7×")
        add("  of which step memory above weights+optimizer state",
            _fmt(r["ours"]["step_peak_mib"], " MiB", 0), _fmt(r[reference]["step_peak_mib"], " MiB", 0),
            r["ours"]["step_peak_mib"] / r[reference]["step_peak_mib"], "info")
        rows += at_peak_rows(r, reference)
    if "generate_vs_llava" in results:
        r = results["generate_vs_llava"]
        add(f"Generate tokens/s vs LLaVA (batch {r['batch']}, {r['new_tokens']} new tokens)",
            _fmt(r["ours"]["tokens_per_s"], " tok/s", 1), _fmt(r["llava"]["tokens_per_s"], " tok/s", 1), r["throughput_ratio"], "info")
    if "decode_vs_media" in results:
        r = results["decode_vs_media"]
        add(f"Decode time per token, 4 images / 1 image (vision tower calls per generate: {r['vision_tower_calls_per_generate']})",
            _fmt(1000 * r["4_images"]["decode_s"], " ms", 1), _fmt(1000 * r["1_images"]["decode_s"], " ms", 1), r["decode_ratio"], "≈1 (info)")
    if "packing" in results:
        rows += packing_rows(results["packing"], (
            "Packing: real tokens/s, packed vs padded random batches ({}padding {} vs {})",
            "Packing: packed vs length-grouped padded batches (padding {})",
            "Packing: per-sample attention vs SDPA over the whole row with a block-diagonal mask (same rows)",
        ))
    if "frozen_vs_trainable_tower" in results:
        r = results["frozen_vs_trainable_tower"]
        add("Frozen vs trainable vision tower: step memory above weights+optimizer (frozen/trainable)",
            _fmt(r["frozen_tower"]["step_peak_mib"], " MiB", 0), _fmt(r["trainable_tower"]["step_peak_mib"], " MiB", 0),
            r["activation_memory_ratio"], "info")
        add("Frozen vs trainable vision tower: step time (speedup)",
            _fmt(r["frozen_tower"]["step_s"], " s"), _fmt(r["trainable_tower"]["step_s"], " s"),
            r["trainable_tower"]["step_s"] / r["frozen_tower"]["step_s"], "info")
    if "mfu" in results:
        for precision in ("fp32", "bf16"):
            r = results["mfu"].get(precision, {})
            if "skipped" in r:
                rows.append((f"MFU {precision}", "skipped", "", "", "info", r["skipped"]))
            elif r:
                rows.append((f"MFU {precision}: achieved / torch.mm peak", _fmt(r["achieved_gflops"], " GFLOP/s", 1),
                             _fmt(r["matmul_peak_gflops"], " GFLOP/s", 1), f"{r['mfu']:.1%}", "info", "—"))
    rows += pretrained_rows(results)
    rows += quantization_rows(results)
    processors = results.get("processors")
    if isinstance(processors, dict):
        if "skipped" in processors:
            rows.append(("Processors", "skipped", "", "", "", processors["skipped"]))
        for row in processors.get("rows", []):  # optional contract: bench_processors returns {"rows": [...]}
            rows.append(tuple(str(row.get(k, "")) for k in ("what", "ours", "reference", "ratio", "goal", "status")))
    return rows


def packing_rows(r: dict, titles: tuple[str, str, str], context: str = "") -> list[tuple[str, str, str, str, str, str]]:
    """The packing comparison's rows (`bench_packing` entry `r`): packed against padded random and length-grouped
    batches, the positions bound, and per-sample attention against the masked row. `titles` are the three row
    titles with `{}` for (context, packed padding, random padding), (length-grouped padding) and nothing."""
    rows = []

    def add(what, ours, theirs, ratio, goal):
        rows.append((what, ours, theirs, _fmt(ratio, "×"), goal, _status(ratio, goal)))

    packed = _fmt(r["packed"]["real_tokens_per_s"], " tok/s", 0)
    add(titles[0].format(context, f"{r['packed']['padding_fraction']:.0%}", f"{r['padded_random']['padding_fraction']:.0%}"),
        packed, _fmt(r["padded_random"]["real_tokens_per_s"], " tok/s", 0), r["speedup_vs_padded_random"], ">=1.5×")
    add(titles[1].format(f"{r['padded_length_grouped']['padding_fraction']:.0%}"),
        packed, _fmt(r["padded_length_grouped"]["real_tokens_per_s"], " tok/s", 0), r["speedup_vs_padded_length_grouped"], ">=1.1×")
    add("  positions computed, padded random / packed (the most dropping padding can give)",
        str(r["packed"]["positions"]), str(r["padded_random"]["positions"]), r["positions_ratio_vs_padded_random"], "info")
    add(titles[2], packed, _fmt(r["packed_masked_row"]["real_tokens_per_s"], " tok/s", 0), r["speedup_vs_packed_masked_row"], "info")
    return rows


def at_peak_rows(entry: dict, reference: str) -> list[tuple[str, str, str, str, str, str]]:
    """'  at the peak: ...' rows: what is alive at each side's memory peak, by kind (`common.memory_at_peak`)."""
    ours, theirs = entry["ours"].get("at_peak_mib"), entry[reference].get("at_peak_mib")
    if not ours or not theirs:
        return []
    if "unavailable" in ours or "unavailable" in theirs:
        return [("  at the peak, by kind", "", "", "", "info", ours.get("unavailable") or theirs.get("unavailable"))]

    def describe(kinds):
        return ", ".join(f"{name.replace('_', ' ')} {value:.0f}" for name, value in kinds.items() if name != "total" and value >= 0.5)

    shared = sum(ours.get(k, 0) for k in ("parameter", "optimizer_state", "gradient"))
    return [("  at the peak, by kind (MiB; parameters + AdamW state + gradients are the same for both)",
             describe(ours), describe(theirs), _fmt(shared / theirs["total"], "×"), "floor (info)", "—")]


def pretrained_rows(results: dict) -> list[tuple[str, str, str, str, str, str]]:
    """Rows of `bench_pretrained.py`: SmolLM2-135M + DINOv2-small / Whisper tiny.en under LoRA."""
    if "skipped" in results.get("pretrained", {}):
        return [("Real scale (SmolLM2-135M + DINOv2-small / Whisper tiny.en)", "skipped", "", "", "", results["pretrained"]["skipped"])]
    rows = []

    def add(what, ours, theirs, ratio, goal):
        rows.append((what, ours, theirs, _fmt(ratio, "×"), goal, _status(ratio, goal)))

    for key, reference, name, speed_goal in (
        ("pretrained_vs_llava", "llava", "LLaVA", ">=1.3×"), ("pretrained_vs_qwen2_audio", "qwen2_audio", "Qwen2-Audio", ">=1.5×"),
    ):
        if key not in results:
            continue
        r = results[key]
        if reference == "llava":
            setting = f"batch {r['batch']} × {r['image_tokens']} image tokens, seq {r['sequence']}"
        else:
            setting = f"{'/'.join(map(str, r['clip_seconds']))} s clips, ours {r['encoder_frames_ours']} mel frames vs their {r['encoder_frames_qwen2_audio']}"
        add(f"Real scale, LoRA step vs {name} (speedup; {setting})",
            _fmt(r["ours"]["step_s"], " s"), _fmt(r[reference]["step_s"], " s"), r["speedup"], speed_goal)
        add("  step FLOPs (forward + backward; theirs/ours: the speedup that is less work)",
            _fmt(r["ours"]["step_flops_g"], " GFLOP", 0), _fmt(r[reference]["step_flops_g"], " GFLOP", 0), r["flop_ratio"], "info")
        add(f"Real scale, LoRA peak memory vs {name} (ours/theirs)",
            _fmt(r["ours"]["peak_mib"], " MiB", 0), _fmt(r[reference]["peak_mib"], " MiB", 0), r["peak_memory_ratio"], "<=0.7×")
        rows += at_peak_rows(r, reference)
    for key in sorted(k for k in results if k.startswith("pretrained_generate_b")):
        r = results[key]
        add(f"Real scale, greedy generate tokens/s vs LLaVA (batch {r['batch']}, 1 image each, {r['new_tokens']} new tokens)",
            _fmt(r["ours"]["tokens_per_s"], " tok/s", 1), _fmt(r["llava"]["tokens_per_s"], " tok/s", 1), r["throughput_ratio"], ">=1.0×")
    if "pretrained_rerank" in results:
        r = results["pretrained_rerank"]
        add(f"Real scale, re-ranking {r['candidates']} captions per image on the prompt's KV cache vs a whole pass per pair "
            f"({r['images']} images × {r['image_tokens']} tokens; scores differ by ≤ {r['max_abs_difference']:.2g})",
            _fmt(r["ours_s"], " s"), _fmt(r["whole_sequence_s"], " s"), r["speedup"], ">=2×")
    packing = results.get("pretrained_packing", {})
    if "skipped" in packing:
        rows.append(("Real scale, packing on the demo's data", "skipped", "", "", "", packing["skipped"]))
    elif packing:
        context = f"{packing['examples']} examples, median {packing['length_median']} tokens; "
        rows += packing_rows(packing, (
            "Real scale, packing on the demo's data: real tokens/s vs padded random batches ({}padding {} vs {})",
            "Real scale, packing on the demo's data vs length-grouped batches (padding {})",
            "Real scale, packing on the demo's data: per-sample attention vs the masked row",
        ), context)
    if "pretrained_mfu" in results:
        r = results["pretrained_mfu"]
        ok = "met" if r["mfu"] >= 0.5 else "missed"
        rows.append((f"Real scale, MFU of the LoRA step fp32 (batch {r['batch']}, {r['step_flops_g']:.0f} GFLOP/step)",
                     _fmt(r["achieved_gflops"], " GFLOP/s", 1), _fmt(r["matmul_peak_gflops"], " GFLOP/s", 1), f"{r['mfu']:.1%}", ">=50%", ok))
    return rows


def quantization_rows(results: dict) -> list[tuple[str, str, str, str, str, str]]:
    """One row per quantization method and measure, against float32 (`bench_quantization.py`)."""
    r = results.get("quantization")
    if not isinstance(r, dict):
        return []
    if "skipped" in r:
        return [("Quantization", "skipped", "", "", "", r["skipped"])]
    rows, base = [], r["float32"]
    for method in ("dynamic-int8", "int8-weight-only", "int4-weight-only"):
        if method in r.get("skipped_methods", {}):
            rows.append((f"Quantization {method}", "skipped", "", "", "", r["skipped_methods"][method]))
            continue
        q = r[method]
        if "speedup" in q:
            rows.append((f"Quantization {method}: CPU generate tokens/s vs float32 ({r['new_tokens']} new tokens)",
                         _fmt(q["tokens_per_s"], " tok/s", 1), _fmt(base["tokens_per_s"], " tok/s", 1),
                         _fmt(q["speedup"], "×"), ">=1.5×", _status(q["speedup"], ">=1.5×")))
        rows.append((f"Quantization {method}: weights size / float32 (greedy tokens as float32: {q['greedy_agreement']:.0%})",
                     _fmt(q["weights_mib"], " MiB", 1), _fmt(base["weights_mib"], " MiB", 1),
                     _fmt(q["weights_ratio"], "×"), "<=0.4×", _status(q["weights_ratio"], "<=0.4×")))
        for key, change in q.get("held_out_change", {}).items():
            rows.append((f"Quantization {method}: held-out {key} change", _fmt(q["held_out"][key], "", 3),
                         _fmt(base["held_out"][key], "", 3), f"{change:+.3f}", "within ±0.02",
                         "met" if abs(change) <= 0.02 else "missed"))
    return rows


def scale_rows(results: dict) -> list[tuple[str, ...]]:
    rows = []
    for key in ("scale_images", "scale_video_frames", "scale_audio_seconds"):
        for point in results.get(key, {}).get("points", []):
            marginal = point.get("marginal_s_per_1k_media_tokens")
            rows.append((point["point"], str(point["media_tokens"]), str(point["sequence"]), _fmt(point["step_s"], " s"),
                         _fmt(marginal, " s", 3) if marginal is not None else "—"))
    return rows


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _notes(results: dict) -> list[str]:
    share, speedup = lm_head_share_7b(**LLAVA_7B)
    sizes = results["sizes"]
    notes = [
        "Timing: every comparison is interleaved in one process (ours, theirs, ours, theirs, ...) after a warmup "
        "round; each number is a median, each ratio a ratio of medians. The machine is shared and noisy, so read "
        "ratios, not absolute times.",
        "Peak memory on CPU: one step under `torch.profiler` with `profile_memory=True`; the running sum of its "
        "tensor allocation/free events (all threads, so backward is included) gives the step's peak above what was "
        "alive before, to which we add the bytes of what was alive (weights, buffers, AdamW state, batch). That is "
        "the quantity `torch.cuda.max_memory_allocated` reports on CUDA, and it ignores allocator caching and the "
        "Python heap that make `ru_maxrss` noisy. Gradients are freed at the end of each step, so they count inside "
        "the step.",
        f"Configuration: LM Llama hidden {sizes['text_hidden']} × {sizes['text_layers']} layers, vocabulary "
        f"{sizes['vocab_size']}; CLIP vision {sizes['vision_hidden']} wide × {sizes['vision_layers']} layers at "
        f"{sizes['image_size']} px / patch {sizes['patch_size']} ({sizes['image_tokens']} image tokens, layer -2, MLP "
        f"projector); Qwen2-Audio encoder {sizes['audio_hidden']} wide × {sizes['audio_layers']} layers; "
        f"{sizes['response_tokens']} labelled response tokens per sample. Towers frozen, LM + projector trained "
        "with AdamW, identical weights in ours and the reference.",
        "Where the training win comes from: ours computes LM-head logits and cross-entropy only at labelled "
        "positions (chunked); the references compute (batch × sequence × 32k) logits and their gradient. At this "
        "reduced width the LM head is a large share of the step, so the win is large. At LLaVA-1.5-7B scale the "
        f"head is only ≈{share:.1%} of the step's FLOPs, so expect ≈{speedup:.2f}× from this lever there, and a "
        "memory saving of the fp32 logits (≈ 3 × sequence × vocabulary × 4 bytes per sample) rather than a ratio.",
        "Peak memory includes weights, gradients and AdamW state, which are the same for both models and do not "
        "shrink; the ratio therefore improves with batch size and sequence length (the logits grow, the state "
        "does not). The step-memory row isolates the part the lever acts on.",
        "Audio: ours runs the encoder on the clip's real length; Qwen2-Audio's encoder only accepts 30 s of mel "
        "frames (padding), then keeps the real-length tokens for the LM. So part of the audio speedup is the "
        "encoder running on 1/3 of the frames (a legit difference in design, not the LM-head lever). The frozen "
        "encoder keeps no activations in either model, so its padded length costs time, not peak memory.",
        "Generation: both prefill the same prompt and decode with a KV cache; LLaVA's `generate` also computes "
        "logits for the last position only, so parity is the expected result. Decode per token is read from "
        "timestamps of each step; the vision tower runs once per `generate` (at prefill). A decode step with 4 "
        "images attends over a 4× longer KV cache, so it is slightly slower, but it never re-encodes media.",
        "Packing: packed rows carry their sample boundaries (`cu_seq_lens_q/k`) and the LM runs causal SDPA on each "
        "sample's slice (`training.packing.per_sample_sdpa`, attention implementation `sdpa_packed`), so attention "
        "costs Σ(sample length)², as with flash-attention's varlen kernels on CUDA. The masked-row row shows what SDPA "
        "with a block-diagonal mask over the whole row costs ((row length)²). `flex_attention` with a block mask "
        "would skip the same blocks, but torch 2.13 has no flex_attention backward on CPU. Image encoding is the "
        "same in every layout.",
        "Peak memory by kind (the 'at the peak' rows): torch's memory profiler classifies every tensor alive at "
        "each side's peak. Both sides train with fused AdamW (both trainers' default), which allocates nothing at the "
        "step; the per-tensor AdamW kept two temporaries the size of the largest trainable tensor alive at the "
        "step, which was our peak. Parameters, AdamW state and gradients are the same for both models, so "
        "ours/theirs cannot go below their share of the reference's peak (the 'floor' ratio): at the tiny scale "
        "our audio step now peaks at exactly that floor (no activation is alive at our peak). At real scale under "
        "LoRA the shared part is the parameters and the LM's activations for backward; the logits are what ours "
        "does not keep.",
        "Real scale: the 'step FLOPs' rows count forward + backward with `FlopCounterMode` on both sides. Their "
        "ratio is the speedup that comes from doing less work (the logits of unlabelled positions; Qwen2-Audio's "
        "encoder on 30 s of frames); a speedup goal above it cannot be met by this design on a compute-bound "
        "CPU, and the row says by how much. Qwen2-Audio does not tie SmolLM2's LM head to its embeddings "
        "(113 MB more parameters than ours).",
        "Packing's upper bound: the 'positions computed' row is padded positions / packed positions, the speedup "
        "dropping padding alone can give when a step's cost is linear in its positions. On data of uniform "
        "length (the demo's samples are all 60-80 tokens) padding is small and so is packing's possible gain; "
        "per-sample attention only pays where rows are long enough for attention to matter.",
        "Frozen tower: ours encodes under `no_grad` when no tower parameter requires grad (`run_frozen_aware`). "
        "A frozen tower whose inputs do not require grad would record no graph either, so the saving shows against "
        "a trainable tower, whose activations (and gradients, AdamW state) must be kept.",
        "MFU: FLOPs counted with `torch.utils.flop_counter.FlopCounterMode` over one forward + backward of our "
        "step (matmuls, convolutions, attention; the optimizer's elementwise work is not counted), divided by the "
        "step time and by the best `torch.mm` FLOP/s measured in the same run.",
    ]
    return notes


def render_markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Run: `python -m benchmarks.run --out benchmarks/results.json`{' --quick' if results.get('quick') else ''} "
        f"on {machine['date']}.",
        f"Machine: {machine['nproc']} cores (`nproc`), {machine['cpu_model']}, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), transformers {machine['transformers']}, device `{machine['device']}`"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
        + (f", 1-minute load average {machine['load_average_1min']} at the start" if "load_average_1min" in machine else "") + ".",
        "",
        _table(("Benchmark", "Ours", "Reference", "Ratio", "Goal", "Status"), summary_rows(results)),
    ]
    scale = scale_rows(results)
    if scale:
        lines += ["", "## Scale (our training step, one sample)", "",
                  _table(("Media", "Media tokens", "Sequence", "Step", "Marginal cost per 1k media tokens"), scale)]
    lines += ["", "## How it was measured, and why", ""] + [f"- {note}" for note in _notes(results)]
    lines += ["", f"Section wall times (s): {results.get('sections_s', {})}", ""]
    return "\n".join(lines)


def console_table(results: dict) -> str:
    text = _table(("Benchmark", "Ours", "Reference", "Ratio", "Goal", "Status"), summary_rows(results))
    scale = scale_rows(results)
    if scale:
        text += "\n\n" + _table(("Media", "Media tokens", "Sequence", "Step", "Marginal/1k media tokens"), scale)
    return text
