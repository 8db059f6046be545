"""Training stages as LLaVA / LLaMA-Factory users know them, and the optimizer's parameter groups.

- `encoders`: the towers, projectors and auxiliary heads train on the auxiliary loss alone (CTC, bag of words) and
  the LM does not even run: a cheap way to teach towers built from scratch to see and hear before they
  are connected to the LM (towers the model config freezes stay frozen).
- `align`: only the projectors (and the auxiliary and retrieval heads) train; towers and LM are frozen.
- `finetune`: LoRA on the LM through PEFT, with projectors and heads trained fully and saved with the
  adapter (`modules_to_save`), optionally LoRA on the towers too; with `lora.quantize: 4bit`, QLoRA (the
  LM's Linear layers in NF4 through bitsandbytes, a CUDA GPU needed: `compression.quantize_language_model_4bit`).
- `full`: everything trains except the towers the model config freezes.

PEFT pitfalls handled here: a plain list in `target_modules` matches by suffix and would also hit the
towers' same-named layers, so targets are one regex anchored at `model.language_model.`; and
`modules_to_save` matches by string suffix, so it names each projector by its full attribute path.
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..modeling_multimodal import MultimodalForConditionalGeneration

HEAD_PREFIXES = ("model.multi_modal_projector.", "auxiliary_heads.", "retrieval_head.")


# The layers LoRA adapts: nn.Linear, and transformers' Conv1D (GPT-2-style LMs: a Linear with its weight transposed,
# which PEFT adapts with fan_in_fan_out).
LORA_LAYER_TYPES = (nn.Linear, Conv1D)


def linear_leaf_names(module: nn.Module) -> list[str]:
    """The last name of every Linear-like layer (`LORA_LAYER_TYPES`) of `module`."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, LORA_LAYER_TYPES)})


def default_lora_targets(model: MultimodalForConditionalGeneration, encoders: bool) -> str:
    """A regex matching every Linear (or Conv1D) layer of the LM (and of the towers when `encoders`), nothing else."""
    scopes = {"model.language_model": model.model.language_model}
    if encoders:
        scopes.update({"model.vision_tower": model.model.vision_tower, "model.audio_tower": model.model.audio_tower})
    patterns = []
    for prefix, module in scopes.items():
        names = "|".join(map(re.escape, linear_leaf_names(module))) if module is not None else ""
        if names:
            patterns.append(rf"{re.escape(prefix)}\..*\.({names})")
    return "^(" + "|".join(patterns) + ")$"


def modules_to_save(model: MultimodalForConditionalGeneration) -> list[str]:
    """Full attribute paths of the projectors and heads (PEFT matches them by suffix)."""
    names = [f"model.multi_modal_projector.{key}" for key in model.model.multi_modal_projector]
    names += [f"auxiliary_heads.{key}" for key in model.auxiliary_heads]
    return names + (["retrieval_head"] if model.retrieval_head is not None else [])


def apply_stage(model: MultimodalForConditionalGeneration, recipe) -> nn.Module:
    """Set what trains for `recipe.stage`; returns the model to train (a PeftModel for `finetune`)."""
    model.requires_grad_(False)
    if recipe.stage == "align":
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(HEAD_PREFIXES))
        return model
    if recipe.stage == "encoders":
        model.requires_grad_(True)
        model.model.apply_freezing()  # towers the config freezes stay frozen
        for module in (model.model.language_model, model.lm_head, model.retrieval_head):
            if module is not None:
                module.requires_grad_(False)
        return model
    if recipe.stage == "full":
        model.requires_grad_(True)
        model.model.apply_freezing()
        return model
    lora = recipe.lora
    if lora.quantize == "4bit":
        from ..compression import quantize_language_model_4bit

        compute_dtype = torch.bfloat16 if recipe.mixed_precision == "bf16" else torch.float32
        quantize_language_model_4bit(model, compute_dtype)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or default_lora_targets(model, lora.encoders),
        modules_to_save=modules_to_save(model),
    )
    return get_peft_model(model, config)


def parameter_groups(model: nn.Module, optim) -> list[dict]:
    """One optimizer group per learning rate: projectors/heads, LoRA, towers, LM (empty groups dropped)."""
    groups = {"projector": [], "lora": [], "encoder": [], "lm": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_" in name:
            groups["lora"].append(param)
        elif any(prefix.rstrip(".") in name for prefix in HEAD_PREFIXES):
            groups["projector"].append(param)
        elif ".vision_tower." in f".{name}" or ".audio_tower." in f".{name}":
            groups["encoder"].append(param)
        else:
            groups["lm"].append(param)
    rates = {"projector": optim.lr_projector, "lora": optim.lr_lora, "encoder": optim.lr_encoder, "lm": optim.lr_lm}
    return [
        {"params": params, "lr": rates[key], "name": key, "weight_decay": optim.weight_decay}
        for key, params in groups.items()
        if params
    ]


def base_model(model: nn.Module) -> MultimodalForConditionalGeneration:
    """The MultimodalForConditionalGeneration inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
