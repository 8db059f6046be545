"""The training objective: the module the trainer wraps and prepares (DDP / FSDP2 / ZeRO-3), holding the model.

It calls the model once, with a `losses.MultimodalLoss` that knows the world size and touches unused modules,
and returns the model's output, whose `loss` the trainer backpropagates. It must be the module the framework
wraps because FSDP2 and ZeRO-3 gather a module's parameters in its forward hooks and every rank must take part;
what data-parallel training needs beyond one process's loss (the touch pass, the cross-rank gather of
`L_contrastive`, every term divided by its count over the window and all ranks) lives in `MultimodalLoss`.

Only the model is saved (`TrainingObjective.model`): checkpoints and exports are keyed by the model's own
parameter names, never by this wrapper's.
"""

from __future__ import annotations

import torch
from torch import nn

from ..configuration.media_registry import MEDIA_INPUTS
from ..losses import LOSS_TARGETS, MultimodalLoss
from .stages import base_model

# The batch keys the objective passes on (a collator may add others, e.g. for evaluation).
MODEL_INPUTS = (
    "input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",  # packed rows: `packing.varlen_kwargs`
    *MEDIA_INPUTS,
)
TARGETS = ("labels", *LOSS_TARGETS)


def window_item_counts(window: list[dict], reduce_sum) -> dict[str, torch.Tensor | int]:
    """What each summed loss term of a window of micro-batches is divided by: its items on all ranks (at least 1).

    "text": labelled tokens (after the shift), "audio_ctc": clips with a transcript, "media_bow": samples
    with a paired text; "contrastive": the window's micro-batches (the same on every rank).
    `reduce_sum` sums a tensor over ranks (Accelerate's `reduce(x, "sum")`).
    """
    local = torch.tensor(
        [
            sum(float((b["labels"][:, 1:] != -100).sum()) for b in window),
            sum(float((b["ctc_labels"] != -100).any(-1).sum()) for b in window if "ctc_labels" in b),
            sum(float(b["pair_attention_mask"].any(-1).sum()) for b in window if "pair_attention_mask" in b),
        ],
        device=window[0]["input_ids"].device,
    )
    text, ctc, pairs = reduce_sum(local).clamp(min=1).unbind()
    return {"text": text, "audio_ctc": ctc, "media_bow": pairs, "contrastive": len(window)}


class TrainingObjective(nn.Module):
    """Wraps the model (or its PeftModel) for training; `forward(**batch, num_items=..., contrastive=...)`.

    run_language_model: False for the `encoders` stage: only the towers, projectors and auxiliary heads run, so
        the loss is `λ·L_auxiliary` alone.
    world_size: the number of data-parallel ranks (`MultimodalLoss`).
    """

    def __init__(self, model: nn.Module, run_language_model: bool = True, world_size: int = 1):
        super().__init__()
        self.model = model
        self.run_language_model = run_language_model
        self.loss_function = MultimodalLoss.from_config(base_model(model).config, world_size=world_size, touch_unused_modules=True)

    # Accelerate's FSDP2 preparation reads these from the module it wraps: the model's own.
    @property
    def _no_split_modules(self):
        return base_model(self.model)._no_split_modules

    def get_input_embeddings(self):
        return base_model(self.model).get_input_embeddings()

    def get_output_embeddings(self):
        return base_model(self.model).get_output_embeddings()

    def forward(self, num_items: dict | None = None, contrastive: bool = True, **batch):
        """The model's output on `batch` (`loss` = the training loss; `loss_text`, `loss_auxiliary`, `loss_contrastive`).

        num_items: `window_item_counts` of the step's window (default: each batch's own counts).
        contrastive: False leaves `L_contrastive` out (every rank must agree, as the trainer's step count does)."""
        model = base_model(self.model)  # LoRA layers live inside its modules; PEFT's forward adds nothing here
        inputs = {key: batch[key] for key in (*MODEL_INPUTS, *TARGETS) if batch.get(key) is not None}
        return model(
            **inputs, num_items=num_items, contrastive=contrastive, loss_function=self.loss_function,
            run_language_model=self.run_language_model, use_cache=False, return_logits=False,
        )


def freeze_unreachable_parameters(model: nn.Module) -> list[str]:
    """Freeze the trainable parameters that no training forward can reach, and return their names.

    Taking features from an inner layer (LLaVA's `vision_feature_layer=-2`) leaves the tower's last
    layers and pooling heads without gradients; DDP then fails ("parameters that were not used in
    producing loss") and FSDP / ZeRO-3 can hang. One tiny forward/backward of the objective (its touch
    pass reaches every module a batch could use) finds them, so the trainer can freeze them before wrapping.
    """
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    ids = torch.tensor([[0, 0]], device=base_model(model).device)
    TrainingObjective(model)(input_ids=ids, labels=ids).loss.backward()
    unused = [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]
    for name, param in model.named_parameters():
        if name in unused:
            param.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return unused
