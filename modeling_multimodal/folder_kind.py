"""What a local folder handed to a command holds, decided from its file names and config alone (no model built).

The commands that load a model (`generate`, `evaluate`, `quantize`, `push`) call `require_model_folder` first,
so a folder that is not a full multimodal checkpoint is named for what it is instead of reaching transformers,
which would build a model from a default config (a training `checkpoint-N/` has no config.json, and
`PreTrainedConfig.get_config_dict` then returns `{}`: a 6.7B Llama) or fail with a message about another file.
`MultimodalConfig.get_config_dict` refuses the same configs for the Python API (`check_saved_config`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .constants import QUANTIZATION_FILE

KINDS = ("multimodal", "quantized", "training checkpoint", "adapter", "other model", "not a model")


def folder_kind(folder: str | Path) -> tuple[str, str]:
    """(one of `KINDS`, a phrase saying why) for a local folder."""
    folder = Path(folder)
    if (folder / QUANTIZATION_FILE).is_file():
        return "quantized", f"it holds {QUANTIZATION_FILE}: it was written by `quantize`"
    config_path = folder / "config.json"
    if not config_path.is_file():
        if (folder / "trainer_state.json").is_file() or (folder / "optimizer.safetensors").is_file():
            return "training checkpoint", (
                "it is a training checkpoint (trainer_state.json, optimizer state: only the trainable parameters, "
                "for `train --resume`); use the run's final/ folder"
            )
        if (folder / "adapter_config.json").is_file():
            return "adapter", "it holds only a LoRA adapter (adapter_config.json); use the merged model folder (the run's final/)"
        return "not a model", "it has no config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        return "not a model", f"{config_path} is not valid JSON ({err})"
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "modeling_multimodal":
        return "other model", (
            f"its config.json has model_type={model_type!r}: not a multimodal checkpoint (a plain language model is "
            "composed with towers through a recipe's model.components)"
        )
    return "multimodal", "a multimodal checkpoint"


def require_model_folder(folder: str | Path, command: str, accept: tuple[str, ...] = ("multimodal", "quantized")) -> str:
    """The folder's kind when `command` accepts it, else a ValueError naming the folder and what it is.

    A Hub id (not a local folder) is returned as "hub": the config check on load covers it.
    """
    if not Path(folder).is_dir():
        return "hub"
    kind, why = folder_kind(folder)
    if kind not in accept:
        if kind == "quantized" and command == "quantize":
            why += "; it is already quantized: quantize the float checkpoint it came from"
        raise ValueError(f"`{command}` cannot use {str(folder)!r}: {why}")
    return kind


__all__ = ["KINDS", "folder_kind", "require_model_folder"]
