"""Real scale: the pretrained composition under LoRA against transformers' classes built from the same weights.

What a user trains is SmolLM2-135M-Instruct with a DINOv2-small vision tower (22M) and a Whisper tiny.en
encoder (8M), towers frozen, LoRA on the LM and the projector trained in full: a 49k vocabulary, 256 image
tokens, clips of a few seconds. The converted folders come from `--pretrained DIR` (or the
`MODELING_MULTIMODAL_PRETRAINED` environment variable): DIR/{smollm2-135m-instruct, dinov2-small,
whisper-tiny.en}, as `modeling-multimodal convert all DIR` writes them. Without them the section is skipped
and says why.

- `pretrained_vs_llava`: LoRA step time and peak memory, ours against `LlavaForConditionalGeneration` with our
  DINOv2 tower, MLP projector and LM (224 px: 16x16 patches = 256 image tokens, CLS dropped, layer -2).
- `pretrained_vs_qwen2_audio`: the same against `Qwen2AudioForConditionalGeneration` with the Whisper tiny.en
  encoder and our linear projector, on clips of 3, 5, 7 and 10 s (Qwen2-Audio pads each to 30 s; we do not).
- `pretrained_generate_b1` / `_b4`: greedy tokens/s with one image per sample, ours against LLaVA's `generate`.
- `pretrained_rerank`: retrieval re-ranking, log p(caption | image) of k candidate captions per image: our
  `pair_log_likelihoods` (each image's prompt once, candidates on its KV cache) against one whole-sequence pass
  per pair (what scoring each pair with the model's loss costs), with the largest difference of the scores.
- `pretrained_mfu`: FLOPs of our LoRA step (FlopCounterMode) / its time / the measured fp32 `torch.mm` peak.
- `pretrained_packing`: `bench_packing`'s plans on the pretrained demo's data and recipe, when a demo data
  folder is given (`--demo-data DIR` or `MODELING_MULTIMODAL_DEMO_DATA`; `modeling-multimodal make-demo-data DIR`).
Both sides get the same LoRA (r 16 on every Linear of the LM, the same seed) and the same batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model

from modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.constants import IGNORE_INDEX
from modeling_multimodal.data.collator import MultimodalCollator
from modeling_multimodal.evaluation.tasks import pair_log_likelihoods, split_prompt_response
from modeling_multimodal.training.stages import default_lora_targets

from .bench_generation import interleaved_generate, prompt_only
from .bench_packing import bench_demo_packing
from .bench_training import _ratios, compare_steps, count_step_flops, make_train_step
from .common import interleaved_medians, matmul_peak_flops
from .models import MEL_FRAMES_PER_SECOND, Sizes, llava_twin, qwen2_audio_twin, to_device

PRETRAINED_ENV = "MODELING_MULTIMODAL_PRETRAINED"
DEMO_DATA_ENV = "MODELING_MULTIMODAL_DEMO_DATA"
FOLDERS = {"text": "smollm2-135m-instruct", "vision": "dinov2-small", "audio": "whisper-tiny.en"}
IMAGE_SIZE = 224  # DINOv2 ViT-S/14 at its processor's crop: 16x16 patches, 256 image tokens
CLIP_SECONDS = (3, 5, 7, 10)  # frames a multiple of 4: our token count and Qwen2-Audio's agree
LORA_RANK = 16


def pretrained_folders(root: str | None) -> dict[str, str] | str:
    """{part: folder} under `root`, or the reason the section is skipped."""
    if not root:
        return f"no converted weights: pass --pretrained DIR or set {PRETRAINED_ENV} (DIR from `modeling-multimodal convert all DIR`)"
    missing = [name for name in FOLDERS.values() if not (Path(root) / name / "config.json").exists()]
    if missing:
        return f"{root} lacks the converted folder(s) {', '.join(missing)}"
    return {part: str(Path(root) / name) for part, name in FOLDERS.items()}


def with_lora(model: torch.nn.Module, targets: str, seed: int = 0) -> torch.nn.Module:
    """LoRA (r 16, alpha 32) on the LM's Linears, the projector trained in full, everything else frozen."""
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=targets), model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name or "multi_modal_projector." in name)
    return model


def conversation_batch(model: MultimodalForConditionalGeneration, sizes: Sizes, media: list[list[tuple[int, int]]], seed: int = 0) -> dict:
    """Right-padded input_ids / attention_mask / labels: `[bos?, media runs..., prompt, response]` per sample.

    media: per sample, (token id, count) placeholder runs; text ids are drawn from the real vocabulary's
    ordinary range, labels cover the response.
    """
    generator = torch.Generator().manual_seed(seed)
    first, last = 1000, model.config.text_config.vocab_size - 1000  # clear of special and added tokens
    rows, labels = [], []
    for runs in media:
        prompt = [token for token, count in runs for _ in range(count)]
        prompt += torch.randint(first, last, (sizes.prompt_tokens,), generator=generator).tolist()
        response = torch.randint(first, last, (sizes.response_tokens,), generator=generator).tolist()
        rows.append(prompt + response)
        labels.append([-100] * len(prompt) + response)
    width = max(len(row) for row in rows)
    pad = model.config.text_config.pad_token_id or 0
    return {
        "input_ids": torch.tensor([row + [pad] * (width - len(row)) for row in rows]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
        "labels": torch.tensor([label + [-100] * (width - len(label)) for label in labels]),
    }


def bench_vs_llava(folders: dict, sizes: Sizes, device: str, batch_size: int) -> dict:
    ours, _ = MultimodalForConditionalGeneration.from_pretrained_components(
        text=folders["text"], vision=folders["vision"], image_size=IMAGE_SIZE
    )
    image_tokens = ours.config.token_layout.image_tokens()
    llava = llava_twin(ours)
    targets = default_lora_targets(ours, encoders=False)
    ours, llava = with_lora(ours, targets).to(device), with_lora(llava, targets).to(device)
    batch = conversation_batch(ours, sizes, [[(ours.config.image_token_id, image_tokens)]] * batch_size)
    batch["pixel_values"] = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    batch = to_device(batch, device)
    results = compare_steps({"ours": (ours, batch, True), "llava": (llava, batch, False)}, device, sizes.repeats)
    return {
        "batch": batch_size, "image_tokens": image_tokens, "sequence": batch["input_ids"].shape[1],
        "trainable_params": sum(p.numel() for p in ours.parameters() if p.requires_grad),
        **results, **_ratios(results, "ours", "llava"),
    }


def bench_vs_qwen2_audio(folders: dict, sizes: Sizes, device: str, clip_seconds: tuple[int, ...]) -> dict:
    ours, _ = MultimodalForConditionalGeneration.from_pretrained_components(
        text=folders["text"], audio=folders["audio"], audio_projector="linear", audio_pool_stride=2
    )
    reference = qwen2_audio_twin(ours)
    targets = default_lora_targets(ours, encoders=False)
    ours, reference = with_lora(ours, targets).to(device), with_lora(reference, targets).to(device)
    layout, mel_bins = ours.config.token_layout, ours.config.audio_config.num_mel_bins
    frames = [int(s * MEL_FRAMES_PER_SECOND) for s in clip_seconds]
    batch = conversation_batch(ours, sizes, [[(ours.config.audio_token_id, layout.audio_tokens(f))] for f in frames])
    generator = torch.Generator().manual_seed(1)
    clips = [torch.randn(mel_bins, f, generator=generator) for f in frames]
    longest, padded_to = max(frames), layout.max_audio_mel_frames()
    ours_batch = batch | {  # padded to the longest clip of the batch, with its mask
        "input_features": torch.stack([torch.nn.functional.pad(c, (0, longest - c.shape[-1])) for c in clips]),
        "input_features_mask": (torch.arange(longest) < torch.tensor(frames)[:, None]).long(),
    }
    their_batch = batch | {  # every clip padded to 30 s, as Qwen2-Audio's processor does
        "input_features": torch.stack([torch.nn.functional.pad(c, (0, padded_to - c.shape[-1])) for c in clips]),
        "feature_attention_mask": (torch.arange(padded_to) < torch.tensor(frames)[:, None]).long(),
    }
    ours_batch, their_batch = to_device(ours_batch, device), to_device(their_batch, device)
    results = compare_steps({"ours": (ours, ours_batch, True), "qwen2_audio": (reference, their_batch, False)}, device, sizes.repeats)
    return {
        "clip_seconds": list(clip_seconds), "batch": len(clip_seconds), "sequence": batch["input_ids"].shape[1],
        "encoder_frames_ours": longest, "encoder_frames_qwen2_audio": padded_to,
        **results, **_ratios(results, "ours", "qwen2_audio"),
    }


def bench_generate(folders: dict, sizes: Sizes, device: str, batch_sizes: tuple[int, ...], new_tokens: int) -> dict:
    """Greedy `generate` of `new_tokens` with one image per sample: ours against LLaVA at each batch size."""
    ours, _ = MultimodalForConditionalGeneration.from_pretrained_components(
        text=folders["text"], vision=folders["vision"], image_size=IMAGE_SIZE
    )
    llava = llava_twin(ours).eval().to(device)
    ours = ours.eval().to(device)
    image_tokens = ours.config.token_layout.image_tokens()
    results = {}
    for batch_size in batch_sizes:
        batch = conversation_batch(ours, sizes, [[(ours.config.image_token_id, image_tokens)]] * batch_size)
        batch["pixel_values"] = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
        batch = to_device(prompt_only(batch), device)
        with torch.no_grad():
            timings = interleaved_generate({"ours": ours, "llava": llava}, {"ours": batch, "llava": batch}, new_tokens, device, sizes.repeats)
        for timing in timings.values():
            timing["tokens_per_s"] = batch_size * new_tokens / timing["total_s"]
        results[f"pretrained_generate_b{batch_size}"] = {
            "batch": batch_size, "new_tokens": new_tokens, "prompt_length": batch["input_ids"].shape[1], **timings,
            "throughput_ratio": timings["ours"]["tokens_per_s"] / timings["llava"]["tokens_per_s"],
        }
    return results


@torch.no_grad()
def whole_sequence_log_likelihoods(model, examples: list[dict], pad_token_id: int, batch_size: int) -> torch.Tensor:
    """The reference: each (prompt + response) example run whole, its labelled tokens' log-probabilities summed."""
    collator, scores = MultimodalCollator(pad_token_id), []
    for start in range(0, len(examples), batch_size):
        batch = collator(examples[start : start + batch_size])
        labels = batch.pop("labels")
        inputs = {k: v.to(model.device) for k, v in batch.items() if k not in ("ctc_labels", "pair_input_ids", "pair_attention_mask")}
        logits = model(**inputs, use_cache=False).logits[:, :-1].float().cpu()
        targets = labels[:, 1:]
        token_scores = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        scores.append((token_scores * (targets != IGNORE_INDEX)).sum(-1))
    return torch.cat(scores)


def bench_rerank(folders: dict, sizes: Sizes, device: str, images: int, candidates: int) -> dict:
    """Seconds to score `candidates` captions for each of `images` images, ours against the whole-sequence reference."""
    model, _ = MultimodalForConditionalGeneration.from_pretrained_components(
        text=folders["text"], vision=folders["vision"], image_size=IMAGE_SIZE
    )
    model = model.eval().to(device)
    image_tokens = model.config.token_layout.image_tokens()
    batch = conversation_batch(model, sizes, [[(model.config.image_token_id, image_tokens)]] * images)
    pixels = torch.randn(images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    # conversation_batch's rows are equally long here (same media, prompt and response sizes): no padding to drop
    rows = [{"pixel_values": pixels[i : i + 1], "input_ids": batch["input_ids"][i], "labels": batch["labels"][i]} for i in range(images)]
    prompts, responses = zip(*map(split_prompt_response, rows))
    pairs = [((image + shift) % images, image) for image in range(images) for shift in range(candidates)]
    examples = [
        {"pixel_values": prompts[m]["pixel_values"], "input_ids": torch.cat([prompts[m]["input_ids"], responses[t]]),
         "labels": torch.cat([torch.full_like(prompts[m]["input_ids"], IGNORE_INDEX), responses[t]])}
        for t, m in pairs
    ]
    pad = model.config.text_config.pad_token_id or 0
    outputs = {}
    calls = {
        "ours": lambda: outputs.__setitem__("ours", pair_log_likelihoods(model, prompts, responses, pairs, pad, batch_size=32)),
        "whole_sequence": lambda: outputs.__setitem__("whole_sequence", whole_sequence_log_likelihoods(model, examples, pad, batch_size=32)),
    }
    seconds = interleaved_medians(calls, device, sizes.repeats)
    return {
        "images": images, "candidates": candidates, "image_tokens": image_tokens, "response_tokens": sizes.response_tokens,
        "ours_s": seconds["ours"], "whole_sequence_s": seconds["whole_sequence"], "speedup": seconds["whole_sequence"] / seconds["ours"],
        "max_abs_difference": float((outputs["ours"] - outputs["whole_sequence"]).abs().max()),
    }


def bench_mfu(folders: dict, sizes: Sizes, device: str, batch_size: int, matmul_size: int) -> dict:
    """FLOPs of our LoRA step over its median time and the best fp32 `torch.mm` FLOP/s of this run."""
    ours, _ = MultimodalForConditionalGeneration.from_pretrained_components(
        text=folders["text"], vision=folders["vision"], image_size=IMAGE_SIZE
    )
    ours = with_lora(ours, default_lora_targets(ours, encoders=False)).to(device)
    batch = conversation_batch(ours, sizes, [[(ours.config.image_token_id, ours.config.token_layout.image_tokens())]] * batch_size)
    batch["pixel_values"] = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    batch = to_device(batch, device)
    flops = count_step_flops(ours, batch)
    step, _ = make_train_step(ours, batch, ours=True)
    seconds = interleaved_medians({"step": step}, device, sizes.repeats)["step"]
    peak = matmul_peak_flops(device, torch.float32, matmul_size)
    return {
        "batch": batch_size, "step_flops_g": round(flops / 1e9, 2), "step_s": seconds, "achieved_gflops": flops / seconds / 1e9,
        "matmul_peak_gflops": peak / 1e9, "mfu": flops / seconds / peak,
    }


def run(sizes: Sizes, device: str) -> dict:
    folders = pretrained_folders(os.environ.get(PRETRAINED_ENV))
    if isinstance(folders, str):
        return {"pretrained": {"skipped": folders}}
    quick = sizes.vocab_size <= 1000  # --quick: the real models, but one sample and a couple of tokens
    batch_size = 1 if quick else 4
    return {
        "pretrained_vs_llava": bench_vs_llava(folders, sizes, device, batch_size),
        "pretrained_vs_qwen2_audio": bench_vs_qwen2_audio(folders, sizes, device, CLIP_SECONDS[:1] if quick else CLIP_SECONDS),
        **bench_generate(folders, sizes, device, (1,) if quick else (1, 4), new_tokens=2 if quick else 32),
        "pretrained_rerank": bench_rerank(folders, sizes, device, images=2 if quick else 8, candidates=2 if quick else 10),
        "pretrained_mfu": bench_mfu(folders, sizes, device, batch_size, matmul_size=256 if quick else 2048),
        "pretrained_packing": demo_packing(folders, device, quick),
    }


def demo_packing(folders: dict, device: str, quick: bool) -> dict:
    """`bench_demo_packing` on the demo data folder of `--demo-data` / $MODELING_MULTIMODAL_DEMO_DATA, else why not."""
    data_root = os.environ.get(DEMO_DATA_ENV)
    if not data_root or not (Path(data_root) / "meta.json").exists():
        return {"skipped": f"no demo data: pass --demo-data DIR or set {DEMO_DATA_ENV} (`modeling-multimodal make-demo-data DIR`)"}
    return bench_demo_packing(folders, data_root, device, count=8 if quick else 32, batch_size=8, rows_per_step=2)
