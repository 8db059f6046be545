"""Weights as the Hub should get them: a LoRA adapter folded into its base model, or weights cut into shards."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

from .folder import CARD_INPUTS_FILENAME, IGNORE_PATTERNS, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, weight_files


def merge_adapter_checkpoint(
    adapter_dir: str | Path, output_dir: str | Path, base_model: str | None = None, token: str | None = None
) -> Path:
    """Fold a LoRA adapter into its base model and save full safetensors weights (plus the adapter folder's other files).

    `base_model` defaults to the adapter's `base_model_name_or_path`; the base loads with the first auto class
    that knows its config (image-text-to-text, then causal LM, then plain).
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_dir} is not a LoRA adapter checkpoint: it has no adapter_config.json")
    base_model = base_model or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base_model:
        raise ValueError(
            f"{adapter_dir}/adapter_config.json records no base model (base_model_name_or_path is null: the run composed "
            "its model from components or a config); pass the checkpoint it was trained on with --base-model"
        )
    base_config = AutoConfig.from_pretrained(base_model, token=token)
    for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM, AutoModel):
        if type(base_config) in auto_class._model_mapping:
            break
    else:
        raise ValueError(f"No auto class knows the config of {base_model} ({type(base_config).__name__})")
    base = auto_class.from_pretrained(base_model, dtype="auto", token=token)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(output_dir)
    for path in adapter_dir.rglob("*"):  # tokenizer, processor, card inputs ...: everything but the adapter itself
        relative = path.relative_to(adapter_dir).as_posix()
        if path.is_file() and not relative.startswith("adapter_") and not (output_dir / relative).exists():
            if not any(fnmatch.fnmatch(relative, pattern) for pattern in IGNORE_PATTERNS):
                (output_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, output_dir / relative)
    inputs_path = output_dir / CARD_INPUTS_FILENAME
    if inputs_path.is_file():  # the merged checkpoint is a full model: its card is no adapter card
        card_kwargs = json.loads(inputs_path.read_text(encoding="utf-8"))
        if card_kwargs.pop("adapter_base_model", None):
            card_kwargs["tags"] = [*card_kwargs.get("tags", []), "lora-merged"]
        inputs_path.write_text(json.dumps(card_kwargs, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return output_dir


def reshard_weights(checkpoint_dir: str | Path, output_dir: str | Path, max_shard_size: int | str) -> list[str]:
    """Write the folder's model weights to `output_dir` as safetensors shards of at most `max_shard_size`
    (`"5GB"`, `"200MB"` or bytes) named like `save_pretrained`'s, with `model.safetensors.index.json` when there
    is more than one shard. Tensors are copied as stored (no model is built). Returns the files written."""
    from huggingface_hub import save_torch_state_dict
    from safetensors import safe_open

    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    shards = [name for name in weight_files(checkpoint_dir) if name != WEIGHTS_INDEX_NAME]
    if not shards:
        raise ValueError(f"{checkpoint_dir} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} to shard")
    state_dict, metadata = {}, None
    for name in shards:
        with safe_open(str(checkpoint_dir / name), framework="pt") as weights:
            metadata = metadata or weights.metadata()
            state_dict.update({key: weights.get_tensor(key) for key in weights.keys()})
    output_dir.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state_dict, output_dir, max_shard_size=max_shard_size, metadata=metadata or {"format": "pt"})
    return weight_files(output_dir)
