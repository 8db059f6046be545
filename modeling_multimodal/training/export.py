"""What a finished run leaves in its output folder, and reading it back.

    final/                    merged model + processor that `from_pretrained` loads (with the flat code and
                              `auto_map`, so it loads where the package is not installed), the recipe, the
                              evaluation results and the model card's inputs (`modeling-multimodal push`)
    final/adapter/            the LoRA adapter with the projectors and heads (stage `finetune`)
    log_history.json          train and eval records, written last: its presence marks a finished run
    report.png                loss curves and scores (`report: true`)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper

from ..hub import save_custom_code, training_card_inputs, write_model_card_inputs
from .recipe import TrainingRecipe
from .report import write_report


def export_run(
    output_dir: Path,
    model,
    processor,
    recipe: TrainingRecipe,
    final: dict,
    log_history: list[dict],
    eval_history: list[dict],
    state_dict: dict | None = None,
) -> dict:
    """Write final/ (and the adapter, history and report); returns their paths. Main process only.

    model: the trained model or its PeftModel (its adapter saved, then merged into the saved weights). state_dict:
    full tensors gathered from an FSDP2 run's shards (`checkpointing.gather_full_state`), else the model's own.
    """
    final_dir = Path(output_dir) / "final"
    paths = {"final_dir": str(final_dir)}
    if hasattr(model, "merge_and_unload"):
        # One path for one process and for FSDP2's gathered shards: the adapter's tensors and the merged model are
        # both taken from the full state dict (PEFT filters the adapter's own; `merged_lora_state` merges the rest).
        state_dict = state_dict if state_dict is not None else model.state_dict()
        _record_adapter_base(model, recipe)
        model.save_pretrained(final_dir / "adapter", state_dict=state_dict)
        paths["adapter_dir"] = str(final_dir / "adapter")
        state_dict, model = merged_lora_state(model, state_dict), model.get_base_model()
    model.save_pretrained(final_dir, state_dict=state_dict)
    processor.save_pretrained(final_dir)
    (final_dir / "training_recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
    (final_dir / "eval_results.json").write_text(json.dumps(final, indent=2, default=str))
    save_custom_code(final_dir)  # flat code + auto_map: final/ loads where the package is not installed
    card_inputs = training_card_inputs(recipe.to_dict(), model.config.to_dict(), final["scores"])
    write_model_card_inputs(final_dir, **card_inputs)  # what `modeling-multimodal push` puts on the card
    (Path(output_dir) / "log_history.json").write_text(json.dumps({"train": log_history, "eval": eval_history}, indent=2))
    if recipe.report:
        paths["report"] = str(write_report(log_history, eval_history, Path(output_dir) / "report.png"))
    return paths


def merged_lora_state(peft_model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`peft_model.merge_and_unload().state_dict()` computed from a state dict of the PeftModel, under the base
    model's own names: each LoRA Linear's weight plus its scaled `B @ A`, each `modules_to_save` copy in place of
    its original, the adapter's own tensors dropped.

    Why on the state dict: an FSDP2 run's parameters are shards, which PEFT's in-place merge cannot add to; the
    gathered full state (`checkpointing.gather_full_state`, rank 0's CPU only) can be merged one layer at a time,
    so the export needs no second copy of the model. The module tree only supplies each layer's scaling.
    """
    lora_layers, saved_copies = {}, {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if not isinstance(module, LoraLinear) or any(module.use_dora.get(a) or module.lora_bias.get(a) for a in adapters):
                raise ValueError(f"merging LoRA layer {name!r} ({type(module).__name__}) from a state dict: only plain LoRA on Linear layers is supported")
            lora_layers[name] = (module, adapters)
        elif isinstance(module, ModulesToSaveWrapper):
            saved_copies[name] = module.active_adapters

    def owner(key: str, layers: dict):
        prefix = key
        while "." in prefix:
            prefix = prefix.rsplit(".", 1)[0]
            if prefix in layers:
                return prefix, key[len(prefix) + 1 :]
        return None, key

    merged = {}
    for key, value in state_dict.items():
        name = key
        prefix, rest = owner(key, saved_copies)
        if prefix is not None:
            adapter_prefix = f"modules_to_save.{saved_copies[prefix][0]}."
            if not rest.startswith(adapter_prefix):
                continue  # the frozen original the copy replaces
            name = f"{prefix}.{rest[len(adapter_prefix):]}"
        prefix, rest = owner(key, lora_layers)
        if prefix is not None:
            if not rest.startswith("base_layer."):
                continue  # lora_A / lora_B
            name = f"{prefix}.{rest[len('base_layer.'):]}"
            if rest == "base_layer.weight":
                module, adapters = lora_layers[prefix]
                value = value.clone()
                for adapter in adapters:
                    a, b = (state_dict[f"{prefix}.lora_{x}.{adapter}.weight"].float() for x in "AB")
                    delta = (b @ a).T if module.fan_in_fan_out else b @ a
                    value += (delta * module.scaling[adapter]).to(value.dtype)
        merged[name.removeprefix("base_model.model.")] = value
    return merged


def adapter_base(recipe: TrainingRecipe) -> str | None:
    """The checkpoint a run's LoRA adapter was trained on: `init_from` or `model.checkpoint` (a local folder as an
    absolute path, a Hub id as is); None for a model composed from components or built from a config, which no
    single checkpoint holds (`push --merge-adapter` then needs `--base-model`)."""
    source = recipe.init_from or recipe.model.checkpoint
    if source is None:
        return None
    return str(Path(source).resolve()) if Path(source).expanduser().is_dir() else source


def _record_adapter_base(model, recipe: TrainingRecipe) -> None:
    """Write what the adapter was trained on into its `adapter_config.json` (`base_model_name_or_path`), which
    PEFT otherwise leaves null for our model (its config has no `name_or_path` when built in the run)."""
    base = adapter_base(recipe)
    if base is not None:
        for config in model.peft_config.values():
            config.base_model_name_or_path = base


def finished(recipe: TrainingRecipe) -> bool:
    """Whether a run wrote its final/ model after all its steps (its log history is written last)."""
    history = Path(recipe.output_dir) / "log_history.json"
    if not (Path(recipe.output_dir) / "final" / "eval_results.json").is_file() or not history.is_file():
        return False
    records = json.loads(history.read_text())["train"]
    return bool(records) and records[-1]["step"] >= recipe.optim.max_steps


def finished_result(recipe: TrainingRecipe) -> dict:
    """`Trainer.train()`'s result for a finished run, from its files."""
    output_dir = Path(recipe.output_dir)
    records = json.loads((output_dir / "log_history.json").read_text())["train"]
    evaluation = json.loads((output_dir / "final" / "eval_results.json").read_text())
    paths = {"final_dir": str(output_dir / "final")}
    if (output_dir / "final" / "adapter").is_dir():
        paths["adapter_dir"] = str(output_dir / "final" / "adapter")
    if (output_dir / "report.png").is_file():
        paths["report"] = str(output_dir / "report.png")
    return {"steps": records[-1]["step"], "seconds": 0.0, "final_loss": records[-1]["loss"], **evaluation, **paths}
