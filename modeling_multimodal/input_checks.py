"""Checks on what the model is handed directly, through the Python API rather than the processor.

- `check_weight_files`: a local folder's safetensors weight files are whole before `from_pretrained` builds a model
  (safetensors' own "header too small" / "incomplete metadata" errors name no file).
- `check_media_inputs`: the tensors `forward` / `generate` receive. The processor never produces these faults, but
  a caller that builds its own tensors can: raw `uint8` pixels (the towers would see 0..255 as if normalised),
  NaN or infinite values (every logit turns NaN without a word), and empty `input_ids` (a reshape error deep in
  the LM). Each is refused naming the argument. Raw pixels already cast to float are not detected: their range
  depends on the processor's mean and std, so no bound is safe.
- `holds_quantized_weights`: whether a folder or Hub repo that `from_pretrained` could not load was written by
  `quantize` (its weights are quantized and load with `compression.load_quantized`).
"""

from __future__ import annotations

import json
import os

import torch
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .constants import QUANTIZATION_FILE


def holds_quantized_weights(source, revision: str | None = None) -> bool:
    """`source` (a folder, or a Hub repo id at `revision`) holds `quantization.json`; False where it cannot be asked."""
    if os.path.isdir(str(source)):
        return os.path.isfile(os.path.join(str(source), QUANTIZATION_FILE))
    from huggingface_hub import file_exists

    try:
        return file_exists(str(source), QUANTIZATION_FILE, revision=revision)
    except Exception:  # noqa: BLE001 - offline, not a repo id, no access: the caller's own error stands
        return False


def _local_weight_files(folder: str) -> list[str]:
    """The folder's weight files: `model.safetensors`, or the shards its index names (none: transformers says so)."""
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            try:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{index}: not a valid weights index (a JSON object with a 'weight_map'): {err}") from None
        return [os.path.join(folder, shard) for shard in shards if os.path.isfile(os.path.join(folder, shard))]
    single = os.path.join(folder, SAFE_WEIGHTS_NAME)
    return [single] if os.path.isfile(single) else []


def check_weight_files(pretrained_model_name_or_path, subfolder: str = "") -> None:
    """Raise a ValueError naming the file when a local folder's safetensors weights are empty, cut short or corrupt.

    Only the headers are read (safetensors checks that the tensors they declare fill the file exactly); a Hub id
    is left to transformers, which downloads and checks it.
    """
    from safetensors import SafetensorError, safe_open

    folder = os.path.join(str(pretrained_model_name_or_path), subfolder)
    if not os.path.isdir(folder):
        return
    for path in _local_weight_files(folder):
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path} is empty (0 bytes): a corrupt or truncated .safetensors file; save or download it again")
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as err:
            raise ValueError(f"{path} cannot be read ({err}): a corrupt or truncated .safetensors file; save or download it again") from None


def check_media_inputs(input_ids: torch.Tensor | None, **media: torch.Tensor | None) -> None:
    """Refuse empty `input_ids` and media tensors that are not finite floating-point values (see the module doc)."""
    if input_ids is not None and input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): the model needs at least one token per sequence")
    for name, value in media.items():
        if value is None or not isinstance(value, torch.Tensor):
            continue
        if not torch.is_floating_point(value):
            raise ValueError(
                f"{name} has dtype {value.dtype}: the model takes the processor's normalised floating-point values, "
                "not raw pixels or samples; pass the media through the processor"
            )
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or infinite values (shape {tuple(value.shape)})")


__all__ = ["check_media_inputs", "check_weight_files"]
