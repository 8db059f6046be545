"""Estimate the projectors' input statistics from training data (`config.projector_input_standardize`).

A projector built with `standardize=True` subtracts a per-channel mean and divides by a per-channel standard
deviation of its input (`projectors.MultiModalProjector`). Those statistics come from the frozen towers'
features on a few training samples of each task, computed once before the first optimizer step of a model
that has not been calibrated yet; they are buffers, so checkpoints, `save_pretrained` and resumed runs keep
them and nothing is estimated twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..configuration.media_registry import MEDIA_INPUTS
from .stages import base_model



def projectors_to_calibrate(model) -> dict[str, torch.nn.Module]:
    """{name: projector} of `model` (ours, or a PEFT wrapper of it) whose statistics are still the identity."""
    projectors = base_model(model).model.multi_modal_projector
    return {name: p for name, p in projectors.items() if p.standardize and not bool(p.calibrated)}


@torch.no_grad()
def calibrate_projectors(
    model, batches: Iterable[dict], reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> dict[str, int]:
    """Set each uncalibrated projector's mean and std from its inputs over `batches`; {name: feature rows seen}.

    batches: collated training batches (their media keys are used, text is ignored). Every projector input row
    counts, except rows that are exactly zero: those are the padded positions of a pooled audio batch
    (`projectors.pool_time` zeroes them), and no real feature vector is all zeros.
    reduce: sums a tensor over processes (`accelerator.reduce(t, "sum")`) so every rank sets the same statistics;
    each rank may pass different batches. Every rank must call this, with at least one batch each.
    """
    todo = projectors_to_calibrate(model)
    if not todo:
        return {}
    encoder = base_model(model).model
    # per projector: [sum of rows, sum of squared rows, row count], in float64
    sums = {name: torch.zeros(2 * p.input_mean.shape[0] + 1, dtype=torch.float64) for name, p in todo.items()}

    def record(name):
        def hook(module, args):
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            rows = rows[rows.abs().sum(-1) > 0]
            sums[name] += torch.cat([rows.sum(0), (rows**2).sum(0), rows.new_tensor([rows.shape[0]])]).cpu()

        return hook

    handles = [projector.register_forward_pre_hook(record(name)) for name, projector in todo.items()]
    was_training = encoder.training
    encoder.eval()
    try:
        for batch in batches:
            media = {key: batch[key] for key in MEDIA_INPUTS if batch.get(key) is not None}
            if media:
                encoder.encode_media(**{k: v.to(encoder.device) for k, v in media.items()})
    finally:
        for handle in handles:
            handle.remove()
        encoder.train(was_training)
    seen = {}
    for name, projector in todo.items():
        stats = sums[name] if reduce is None else reduce(sums[name].to(projector.input_mean.device)).cpu()
        width = projector.input_mean.shape[0]
        total, squares, count = stats[:width], stats[width : 2 * width], float(stats[-1])
        seen[name] = int(count)
        if count < 2:
            continue  # no sample of this modality in the calibration data: the projector stays the identity
        mean = total / count
        std = (squares / count - mean**2).clamp(min=0).sqrt()
        projector.set_standardization(mean.to(projector.input_mean), std.to(projector.input_std))
    return seen


def calibration_batches(parts, collate, per_part: int, batch_size: int) -> list[dict]:
    """Collated batches of up to `per_part` samples spread evenly over each encoded dataset in `parts`."""
    batches = []
    for part in parts:
        if len(part) == 0:
            continue
        count = min(per_part, len(part))
        indices = [round(i * (len(part) - 1) / max(count - 1, 1)) for i in range(count)]
        for start in range(0, count, batch_size):
            batches.append(collate([part[i] for i in indices[start : start + batch_size]]))
    return batches
