"""The training objective: the module the trainer wraps and prepares (DDP / FSDP2 / ZeRO-3), holding the model.

The model's `forward` computes the loss terms the way one process on one batch would. Data-parallel
training needs three things more, and they must run inside the module the framework wraps, because
FSDP2 and ZeRO-3 gather a module's parameters in its forward hooks and every rank must take part:
- a touch pass: 0 × a tiny pass through every module the batch left unused, so every rank runs every module
  it owns whatever mix of modalities it drew (otherwise DDP fails on unused parameters and FSDP / ZeRO-3
  hang), and one process gives its optimizer the same (zero) gradients as several would;
- `L_contrastive` over the pairs of all ranks (the embedding rows gathered across ranks, CLIP-style);
- each summed term divided by its count over the whole accumulation window and all ranks
  (`window_item_counts`), so accumulation and data parallelism weigh every token, clip and pair equally.

Only the model is saved (`TrainingObjective.model`): checkpoints and exports are keyed by the model's own
parameter names, never by this wrapper's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..configuration.media_registry import MEDIA_INPUTS
from ..encoders import has_trainable_parameters
from ..losses import gather_rows_across_ranks
from ..modeling_multimodal import MultimodalForConditionalGeneration
from .stages import base_model

# The batch keys the objective reads (a collator may add others, e.g. for evaluation).
MODEL_INPUTS = (
    "input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",  # packed rows: `packing.varlen_kwargs`
    *MEDIA_INPUTS,
)
TARGETS = ("labels", "ctc_labels", "pair_input_ids", "pair_attention_mask", "segment_ids")


@dataclass
class ObjectiveOutput(ModelOutput):
    """`loss` = L_text + λ·L_auxiliary + α·L_contrastive (+ 0 × the touch pass); each term also on its own (None if absent)."""

    loss: torch.Tensor | None = None
    loss_text: torch.Tensor | None = None
    loss_auxiliary: torch.Tensor | None = None
    loss_contrastive: torch.Tensor | None = None


def window_item_counts(window: list[dict], reduce_sum) -> dict[str, torch.Tensor]:
    """What each summed loss term of a window of micro-batches is divided by: its items on all ranks (at least 1).

    "text": labelled tokens (after the shift), "audio_ctc": clips with a transcript, "media_bow": samples
    with a paired text. `reduce_sum` sums a tensor over ranks (Accelerate's `reduce(x, "sum")`).
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
    return {"text": text, "audio_ctc": ctc, "media_bow": pairs}


class TrainingObjective(nn.Module):
    """Wraps the model (or its PeftModel) for training; `forward(**batch, num_items=..., gather=...)`.

    run_language_model: False for the `encoders` stage: only the towers, projectors and auxiliary heads run
        (`MultimodalModel.merge_media`), so the loss is `λ·L_auxiliary` alone.
    """

    def __init__(self, model: nn.Module, run_language_model: bool = True):
        super().__init__()
        self.model = model
        self.run_language_model = run_language_model

    # Accelerate's FSDP2 preparation reads these from the module it wraps: the model's own.
    @property
    def _no_split_modules(self):
        return base_model(self.model)._no_split_modules

    def get_input_embeddings(self):
        return base_model(self.model).get_input_embeddings()

    def get_output_embeddings(self):
        return base_model(self.model).get_output_embeddings()

    def forward(self, num_items: dict | None = None, gather: bool = False, contrastive: bool = True, **batch) -> ObjectiveOutput:
        """num_items: `window_item_counts` of the step's window (default: each batch's own counts).
        gather: compute `L_contrastive` over every rank's pairs (`torch.distributed` must be initialised).
        contrastive: False leaves `L_contrastive` out (every rank must agree, as the trainer's step count does)."""
        model = base_model(self.model)  # LoRA layers live inside its modules; PEFT's forward adds nothing here
        inputs = {key: batch[key] for key in MODEL_INPUTS if batch.get(key) is not None}
        if self.run_language_model:
            outputs = model.model(**inputs, use_cache=False)
        else:
            lm_only = ("attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k")
            outputs = model.model.merge_media(**{k: v for k, v in inputs.items() if k not in lm_only})
        terms = model.loss_terms(
            outputs,
            **{key: batch[key] for key in TARGETS if batch.get(key) is not None},
            num_items=num_items,
            gather=gather_rows_across_ranks if gather else None,
            contrastive=contrastive,
        )
        loss = model.weighted_loss(terms, like=outputs.inputs_embeds)
        loss = loss if loss is not None else outputs.inputs_embeds.new_zeros((), dtype=torch.float32)
        used = {
            "image": "pixel_values" in inputs,
            "video": "pixel_values_videos" in inputs,
            # videos' sound tracks run the audio encoder and projector too
            "audio": "input_features" in inputs or bool(inputs.get("video_audio_features_mask", torch.zeros(1)).any()),
            "audio_ctc": "audio_ctc" in terms.auxiliary,
            "media_bow": "media_bow" in terms.auxiliary,
            "retrieval": terms.contrastive is not None,
        }
        loss = loss + 0.0 * touch_unused_modules(model, used, outputs.inputs_embeds)
        return ObjectiveOutput(loss=loss, loss_text=terms.text, loss_auxiliary=terms.auxiliary_total, loss_contrastive=terms.contrastive)


def touch_unused_modules(model: MultimodalForConditionalGeneration, used: dict[str, bool], like: torch.Tensor) -> torch.Tensor:
    """Sum of a tiny pass through each module this batch left unused (to be multiplied by 0)."""
    config, inner, total = model.config, model.model, like.new_zeros((), dtype=torch.float32)
    # A frozen tower has nothing to synchronise: only its projector is touched, never the tower itself.
    if inner.vision_tower is not None:
        vision = config.vision_config
        if not used["image"]:
            if has_trainable_parameters(inner.vision_tower):
                total = total + inner.encode_images(like.new_zeros(1, 3, vision.image_size, vision.image_size)).sum()
            else:
                total = total + inner.multi_modal_projector["image"].touch(like)
        if config.video_token_id is not None and not used["video"]:
            total = total + inner.video_projector.touch(like)
    if inner.audio_tower is not None:
        states = None
        if not used["audio"]:
            if has_trainable_parameters(inner.audio_tower):
                clips, states, _ = inner.encode_audio(like.new_zeros(1, config.audio_config.num_mel_bins, 2))
                total = total + clips[0].sum()
            else:
                total = total + inner.multi_modal_projector["audio"].touch(like)
        if "audio_ctc" in model.auxiliary_heads and not used["audio_ctc"]:
            states = states if states is not None else like.new_zeros(1, 1, config.audio_config.d_model)
            total = total + model.auxiliary_heads["audio_ctc"](states).sum()
    if "media_bow" in model.auxiliary_heads and not used["media_bow"]:
        total = total + model.auxiliary_heads["media_bow"](like.new_zeros(1, config.text_config.hidden_size)).sum()
    if not used["retrieval"]:
        head, zeros = model.retrieval_head, like.new_zeros(1, config.text_config.hidden_size)
        total = total + head.media_projection(zeros).sum() + head.text_projection(zeros).sum() + head.logit_scale.sum()
    return total


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
