"""The three loss terms of `L = L_text + λ·L_auxiliary + α·L_contrastive`.

- `labelled_lm_loss`: next-token cross-entropy computed only at labelled positions, in chunks, so the
  (sequence × vocabulary) logits of prompt and media positions are never materialised.
- `AUXILIARY_HEADS`: a small registry of the other modalities' own tasks (the auxiliary loss); each head
  declares its modality and computes its loss from that modality's encoder output (`audio_ctc`: CTC
  transcription on the audio encoder) or from the pooled media tokens (`media_bow`: the paired text's
  bag of words, i.e. image/video tagging and keyword spotting).
- `RetrievalHead`: the shared retrieval space and the symmetric InfoNCE over it (the contrastive loss).
- `MultimodalLoss`: the whole objective, as open_clip's `ClipLoss`: it owns λ and α, the world size and the
  cross-rank gather of the contrastive embeddings, the normalisation over an accumulation window and the
  zero-weight touch of the modules a batch left unused. The model gives it its outputs and heads;
  `MultimodalForConditionalGeneration.forward` calls it when targets are given, so `model(**batch).loss` is the
  training loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .constants import IGNORE_INDEX
from .encoders import has_trainable_parameters
from .projectors import keep_torch_default_init


def labelled_lm_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 4096,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy over positions whose (shifted) label is not -100.

    Equal to transformers' `ForCausalLMLoss` on full logits, but the LM head runs only on the
    labelled positions, `chunk_size` rows at a time. The sum is divided by `num_items_in_batch` when
    given (the labelled tokens of a whole accumulation window across ranks, so that gradient
    accumulation and data parallelism weigh every token equally), else by this batch's count.
    `shift_labels` (batch, seq), already aligned with `hidden_states` (sequence / context parallelism, where a
    chunk's last target is the next chunk's first token), are used as they are instead of shifting `labels`.
    """
    if shift_labels is None:
        shift_labels, hidden_states = labels[:, 1:], hidden_states[:, :-1]
    keep = shift_labels != IGNORE_INDEX
    hidden = hidden_states[keep]  # (n_labelled, d)
    targets = shift_labels[keep]
    if targets.numel() == 0:
        return hidden_states.sum() * 0.0
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        logits = lm_head(hidden[start : start + chunk_size]).float()
        total = total + F.cross_entropy(logits, targets[start : start + chunk_size], reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else targets.numel())


class AudioCTCHead(nn.Module):
    """CTC over the audio encoder's positions predicting the transcript's token ids (blank = last class)."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.blank_id = vocab_size
        self.classifier = nn.Linear(hidden_size, vocab_size + 1)

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        return self.classifier(encoder_states)

    def loss(
        self, encoder_states: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor, num_items: int | torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """encoder_states (n, L, d), lengths (n,) real positions, labels (n, S) padded with -100.

        Per clip, the CTC loss divided by its transcript length; averaged over the clips, or summed and
        divided by `num_items` (clips with transcripts in the whole accumulation window, all ranks).
        Clips whose label row is all -100 (audio without a transcript) take no part.
        """
        target_lengths = (labels != IGNORE_INDEX).sum(-1)
        keep = target_lengths > 0
        if not keep.any():
            return None
        encoder_states, lengths, labels, target_lengths = encoder_states[keep], lengths[keep], labels[keep], target_lengths[keep]
        log_probs = self(encoder_states).float().log_softmax(-1).transpose(0, 1)  # (L, n, V+1)
        targets = labels[labels != IGNORE_INDEX]
        per_clip = F.ctc_loss(
            log_probs, targets, lengths, target_lengths, blank=self.blank_id, reduction="none", zero_infinity=True
        ) / target_lengths
        return per_clip.sum() / (num_items if num_items is not None else per_clip.numel())


class MediaBagOfWordsHead(nn.Module):
    """Predicts the words of a sample's paired text (caption, transcript) from its pooled media tokens.

    Image / video tagging and spoken keyword spotting in one head, trained as classification over the
    LM vocabulary (SuperClass, Huang et al. 2024: softmax cross-entropy against the normalised bag of
    the text's token ids). Unlike the caption loss, the target does not depend on word order or on the
    previous words, so the towers must see every attribute themselves instead of leaning on the LM's
    word-to-word statistics; unlike the contrastive loss it needs no negatives from the batch.
    """

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.classifier = nn.Linear(hidden_size, vocab_size)
        keep_torch_default_init(self)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)

    def loss(
        self, pooled: torch.Tensor, pair_input_ids: torch.Tensor, pair_attention_mask: torch.Tensor, num_items: int | torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """pooled (n, d) per-sample media embeddings; pair ids / mask (n, S). Per sample the cross-entropy
        against its normalised bag of words, summed and divided by `num_items` (else averaged)."""
        if pooled.shape[0] == 0:
            return None
        log_probs = self(pooled).float().log_softmax(-1)
        bags = torch.zeros_like(log_probs).scatter_add_(1, pair_input_ids, pair_attention_mask.to(log_probs.dtype))
        bags = bags.clamp(max=1.0)  # a word said twice counts once
        bags = bags / bags.sum(-1, keepdim=True).clamp(min=1.0)
        per_sample = -(bags * log_probs).sum(-1)
        return per_sample.sum() / (num_items if num_items is not None else per_sample.numel())


AUXILIARY_HEADS = {"audio_ctc": AudioCTCHead, "media_bow": MediaBagOfWordsHead}


class RetrievalHead(nn.Module):
    """Projects pooled media and pooled text into one normalised space; symmetric InfoNCE between them."""

    def __init__(self, hidden_size: int, embed_dim: int, init_temperature: float):
        super().__init__()
        self.media_projection = nn.Linear(hidden_size, embed_dim, bias=False)
        self.text_projection = nn.Linear(hidden_size, embed_dim, bias=False)
        # Shape (1,), not a scalar: FSDP2's fully_shard refuses 0-d parameters.
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / init_temperature)]))
        self.init_temperature = init_temperature

    def embed_media(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.media_projection(pooled).float(), dim=-1)

    def embed_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(pooled).float(), dim=-1)

    def contrastive_loss(self, media_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE: row i of each side is the positive pair of the other side's row i."""
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        logits = scale * media_embeds @ text_embeds.T  # (n, n)
        targets = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def gather_rows_across_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (n_r, d) rows in rank order, keeping gradients (CLIP-style global negatives).

    Ranks may hold different numbers of rows (even zero); every rank must call this the same number of times.
    The backward pass sums the gradients of each row from all ranks, so after DDP's average each row's
    gradient equals that of the one-process loss over the concatenated batch.
    """
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    group = _gather_group()
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([rows.shape[0]], device=rows.device), group=group)
    counts = [int(c) for c in counts]
    padded = F.pad(rows, (0, 0, 0, max(counts) - rows.shape[0]))
    gathered = all_gather(padded, group=group)
    return torch.cat([part[:count] for part, count in zip(gathered, counts)])


_GATHER_GROUPS = {}


def _gather_group():
    """A process group of its own for the embedding gather.

    Its backward runs inside autograd while DDP all-reduces gradient buckets on the default group as they
    become ready; on one group the two streams of collectives could pair up differently across ranks.
    """
    import torch.distributed as dist

    key = dist.get_world_size()
    if key not in _GATHER_GROUPS:
        _GATHER_GROUPS[key] = dist.new_group(backend=dist.get_backend())
    return _GATHER_GROUPS[key]


def masked_mean(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where mask is true: (n, L, d), (n, L) -> (n, d)."""
    mask = mask.to(hidden_states.dtype)[..., None]
    return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1)


# The targets `MultimodalLoss` reads from a batch besides `labels` (forward takes them as keyword arguments).
LOSS_TARGETS = ("shift_labels", "ctc_labels", "pair_input_ids", "pair_attention_mask", "segment_ids")


@dataclass
class LossTerms:
    """The loss terms of one batch: `text` (L_text), `auxiliary` (L_auxiliary per auxiliary task), `contrastive`
    (L_contrastive)."""

    text: torch.Tensor | None = None
    auxiliary: dict[str, torch.Tensor] = field(default_factory=dict)
    contrastive: torch.Tensor | None = None

    @property
    def auxiliary_total(self) -> torch.Tensor | None:
        return sum(self.auxiliary.values()) if self.auxiliary else None


class MultimodalLoss:
    """`L_text + λ·L_auxiliary + α·L_contrastive` from the model's outputs, for one process or one rank of many.

    auxiliary_loss_weight (λ) / contrastive_loss_weight (α): a weight of 0 skips its term's computation.
    world_size > 1: `L_contrastive` is taken over every rank's pairs (`gather_rows_across_ranks`, so every rank must
        call this in every step, pairs or not), and the summed terms are multiplied by the world size, which undoes
        DDP's gradient average (their divisors already count the items of all ranks, see `num_items`).
    touch_unused_modules: add 0 × a tiny pass through each module the batch left unused, so that every rank runs
        every module it owns whatever mix of modalities it drew (DDP fails on unused parameters, FSDP / ZeRO-3
        hang) and one process gives its optimizer the same zero gradients as several would. The value is unchanged.

    `num_items` (per call) divides each summed term by its count over a whole accumulation window and all ranks:
    "text" (labelled tokens), "audio_ctc" (clips with a transcript), "media_bow" (samples with a paired text) and
    "contrastive" (micro-batches in the window: `L_contrastive` is a mean per micro-batch). Default: this batch's.
    """

    def __init__(
        self,
        auxiliary_loss_weight: float = 0.0,
        contrastive_loss_weight: float = 0.0,
        world_size: int = 1,
        touch_unused_modules: bool = False,
    ):
        self.auxiliary_loss_weight = auxiliary_loss_weight
        self.contrastive_loss_weight = contrastive_loss_weight
        self.world_size = world_size
        self.touch_unused_modules = touch_unused_modules

    @classmethod
    def from_config(cls, config, **kwargs) -> "MultimodalLoss":
        return cls(config.auxiliary_loss_weight, config.contrastive_loss_weight, **kwargs)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return gather_rows_across_ranks(rows) if self.world_size > 1 else rows

    def __call__(
        self, model, outputs, targets: dict, num_items: dict | None = None, contrastive: bool = True, media_used: dict | None = None
    ) -> tuple[torch.Tensor | None, LossTerms]:
        """(loss, terms) for `MultimodalForConditionalGeneration` `model`'s `MultimodalModel` outputs and the targets
        given (see its `forward`). `media_used` {modality: bool}: the media the batch carried (for the touch pass).
        The loss is None when no term applies (and nothing is touched)."""
        num_items = num_items or {}
        terms = self.terms(model, outputs, num_items=num_items, contrastive=contrastive, **targets)
        like = outputs.inputs_embeds
        if self.touch_unused_modules:
            loss = self.combine(terms, like, num_items)
            loss = like.new_zeros((), dtype=torch.float32) if loss is None else loss
            used = {
                **(media_used or {}),
                "audio_ctc": "audio_ctc" in terms.auxiliary,
                "media_bow": "media_bow" in terms.auxiliary,
                "retrieval": terms.contrastive is not None,
            }
            return loss + 0.0 * touch_unused_modules(model, used, like), terms
        return self.combine(terms, like, num_items), terms

    def terms(
        self,
        model,
        outputs,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        ctc_labels: torch.LongTensor | None = None,
        pair_input_ids: torch.LongTensor | None = None,
        pair_attention_mask: torch.Tensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        num_items: dict | None = None,
        contrastive: bool = True,
    ) -> LossTerms:
        """The three terms. Outputs of `MultimodalModel.merge_media` alone (no LM run, `last_hidden_state` None) give
        only `L_auxiliary`: `L_text` and `L_contrastive` need the LM. contrastive=False skips `L_contrastive`."""
        num_items = num_items or {}
        terms = LossTerms()
        runs_language_model = outputs.last_hidden_state is not None
        if (labels is not None or shift_labels is not None) and runs_language_model:
            terms.text = labelled_lm_loss(
                outputs.last_hidden_state, labels, model.lm_head, num_items.get("text"), shift_labels=shift_labels
            )
        heads = model.auxiliary_heads
        wants_bow = self.auxiliary_loss_weight > 0 and "media_bow" in heads
        wants_cross = contrastive and self.contrastive_loss_weight > 0 and runs_language_model
        pairs = None  # (media tokens per sample, pair ids, pair mask) of the samples that have both
        if (wants_bow or wants_cross) and (pair_input_ids is not None or self.world_size > 1):
            pairs = model._media_text_pairs(outputs, pair_input_ids, pair_attention_mask, segment_ids)
        if self.auxiliary_loss_weight > 0:
            if "audio_ctc" in heads and ctc_labels is not None and outputs.audio_outputs is not None:
                terms.auxiliary["audio_ctc"] = heads["audio_ctc"].loss(
                    outputs.audio_outputs.last_hidden_state, outputs.audio_positions, ctc_labels, num_items.get("audio_ctc")
                )
            if wants_bow and pairs is not None and pairs[0]:
                pooled = torch.stack([t.mean(0) for t in pairs[0]])  # each sample's mean media token, before the LM
                terms.auxiliary["media_bow"] = heads["media_bow"].loss(pooled, pairs[1], pairs[2], num_items.get("media_bow"))
            terms.auxiliary = {task: value for task, value in terms.auxiliary.items() if value is not None}
        if wants_cross and pairs is not None:
            terms.contrastive = self.contrastive_term(model, *pairs)
        return terms

    def contrastive_term(self, model, tokens, pair_input_ids, pair_attention_mask) -> torch.Tensor | None:
        """InfoNCE between each sample's media (media-only LM pass) and its paired text (text-only LM pass), over
        every rank's pairs; None with fewer than 2 pairs in all."""
        media_embeds = model._media_embeddings(tokens)
        if tokens:
            text_embeds = model._text_embeddings(pair_input_ids, pair_attention_mask)
        else:
            text_embeds = media_embeds.new_zeros(0, media_embeds.shape[-1])
        media_embeds, text_embeds = self.gather(media_embeds), self.gather(text_embeds)
        if media_embeds.shape[0] < 2:
            return None
        return model.retrieval_head.contrastive_loss(media_embeds, text_embeds)

    def combine(self, terms: LossTerms, like: torch.Tensor, num_items: dict | None = None) -> torch.Tensor | None:
        """`world·(L_text + λ·L_auxiliary) + α·L_contrastive / micro-batches` over the terms present (None if none);
        with one process and one micro-batch, `L_text + λ·L_auxiliary + α·L_contrastive`."""
        if terms.text is None and terms.auxiliary_total is None and terms.contrastive is None:
            return None
        world, steps = self.world_size, (num_items or {}).get("contrastive", 1)
        loss = terms.text if terms.text is not None else like.new_zeros((), dtype=torch.float32)
        if world != 1:
            loss = world * loss
        if terms.auxiliary_total is not None:
            auxiliary = self.auxiliary_loss_weight * terms.auxiliary_total
            loss = loss + (world * auxiliary if world != 1 else auxiliary)
        if terms.contrastive is not None:
            contrastive = self.contrastive_loss_weight * terms.contrastive
            loss = loss + (contrastive / steps if steps != 1 else contrastive)
        return loss


def touch_unused_modules(model, used: dict[str, bool], like: torch.Tensor) -> torch.Tensor:
    """Sum of a tiny pass through each module of `model` (`MultimodalForConditionalGeneration`) this batch left
    unused (to be multiplied by 0). `used`: {"image", "video", "audio", "audio_ctc", "media_bow", "retrieval": bool}."""
    config, inner, total = model.config, model.model, like.new_zeros((), dtype=torch.float32)
    # A frozen tower has nothing to synchronise: only its projector is touched, never the tower itself.
    if inner.vision_tower is not None:
        vision = config.vision_config
        if not used.get("image"):
            if has_trainable_parameters(inner.vision_tower):
                tokens = inner.encode_images(like.new_zeros(1, 3, vision.image_size, vision.image_size))
                total = total + sum(item.sum() for item in tokens)  # one tensor per image when tiled
                markers = inner.multi_modal_projector["image"].tile_markers  # a lone crop reads only the global marker
                total = total if markers is None else total + markers.touch()
            else:
                total = total + inner.multi_modal_projector["image"].touch(like)
        if config.video_token_id is not None and not used.get("video"):
            total = total + inner.video_projector.touch(like)
    if inner.audio_tower is not None:
        states = None
        if not used.get("audio"):
            if has_trainable_parameters(inner.audio_tower):
                clips, states, _ = inner.encode_audio(like.new_zeros(1, config.audio_config.num_mel_bins, 2))
                total = total + clips[0].sum()
            else:
                total = total + inner.multi_modal_projector["audio"].touch(like)
        if "audio_ctc" in model.auxiliary_heads and not used.get("audio_ctc"):
            states = states if states is not None else like.new_zeros(1, 1, config.audio_config.d_model)
            total = total + model.auxiliary_heads["audio_ctc"](states).sum()
    if "media_bow" in model.auxiliary_heads and not used.get("media_bow"):
        total = total + model.auxiliary_heads["media_bow"](like.new_zeros(1, config.text_config.hidden_size)).sum()
    head = getattr(model, "retrieval_head", None)
    if head is not None and not used.get("retrieval"):
        zeros = like.new_zeros(1, config.text_config.hidden_size)
        total = total + head.media_projection(zeros).sum() + head.text_projection(zeros).sum() + head.logit_scale.sum()
    return total
