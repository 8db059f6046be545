"""Scale: our training step as media grow — images per sample, video frames, audio seconds.

Each series is timed interleaved (batch of one sample). The marginal cost per 1k media tokens between
consecutive points is what to read: constant means linear growth in media tokens; the LM's attention is
quadratic in sequence length, so it rises slowly once attention is a visible share of the step.
"""

from __future__ import annotations

import torch

from .bench_training import make_train_step
from .common import interleaved_medians
from .models import Sizes, audio_batches, build_ours, image_batch, set_trainable, to_device, video_batch


def _series(points: dict[str, tuple[torch.nn.Module, dict, int]], device: str, repeats: int) -> dict:
    """points: label -> (model, batch, media tokens). Returns per-point times and marginal costs."""
    steps = {label: make_train_step(model, batch, ours=True)[0] for label, (model, batch, _) in points.items()}
    times = interleaved_medians(steps, device, repeats)
    rows, previous = [], None
    for label, (_, batch, tokens) in points.items():
        row = {"point": label, "media_tokens": tokens, "sequence": batch["input_ids"].shape[1], "step_s": times[label]}
        if previous is not None:
            row["marginal_s_per_1k_media_tokens"] = 1000 * (times[label] - previous[1]) / (tokens - previous[0])
        rows.append(row)
        previous = (tokens, times[label])
    return {"points": rows}


def run(sizes: Sizes, device: str) -> dict:
    quick = sizes.vocab_size <= 1000
    image_counts = (1, 2, 4)
    frame_counts = (2, 4, 8) if quick else (4, 8, 16)
    seconds = (1.0, 2.0, 4.0) if quick else (5.0, 10.0, 20.0, 30.0)

    model = set_trainable(build_ours(sizes)).to(device)
    images = {
        f"{n} image(s)": (model, to_device(image_batch(sizes, images_per_sample=n, batch_size=1), device), n * sizes.image_tokens)
        for n in image_counts
    }
    videos = {}
    for frames in frame_counts:
        video_model = set_trainable(build_ours(sizes, video_frames=frames)).to(device)
        videos[f"{frames} frames"] = (video_model, to_device(video_batch(video_model, sizes), device), video_model.config.token_layout.video_tokens())
    audio_model = set_trainable(build_ours(sizes, image=False, audio=True)).to(device)
    audio = {}
    for s in seconds:
        batch, _ = audio_batches(audio_model, sizes, s, batch_size=1)
        audio[f"{s:g} s audio"] = (audio_model, to_device(batch, device), audio_model.config.token_layout.audio_tokens(int(s * 100)))
    repeats = max(1, sizes.repeats - 1)
    return {
        "scale_images": _series(images, device, repeats),
        "scale_video_frames": _series(videos, device, repeats),
        "scale_audio_seconds": _series(audio, device, repeats),
    }
