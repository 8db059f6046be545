"""The three loss terms of `L = L_text + λ·L_auxiliary + α·L_contrastive`.

- `labelled_lm_loss`: next-token cross-entropy computed only at labelled positions, in chunks, so the
  (sequence × vocabulary) logits of prompt and media positions are never materialised.
- `AUXILIARY_HEADS`: a small registry of the other modalities' own tasks (the auxiliary loss); each head
  declares its modality and computes its loss from that modality's encoder output (`audio_ctc`: CTC
  transcription on the audio encoder) or from the pooled media tokens (`media_bow`: the paired text's
  bag of words, i.e. image/video tagging and keyword spotting).
- `RetrievalHead`: the shared retrieval space and the symmetric InfoNCE over it (the contrastive loss).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .constants import IGNORE_INDEX
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

    modality = "audio"
    labels_key = "ctc_labels"

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

    @torch.no_grad()
    def greedy_decode(self, encoder_states: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        """Best-path decoding: argmax, merge repeats, drop blanks."""
        best = self(encoder_states).argmax(-1)
        sequences = []
        for row, length in zip(best.tolist(), lengths.tolist()):
            tokens, previous = [], None
            for token in row[:length]:
                if token != previous and token != self.blank_id:
                    tokens.append(token)
                previous = token
            sequences.append(tokens)
        return sequences


class MediaBagOfWordsHead(nn.Module):
    """Predicts the words of a sample's paired text (caption, transcript) from its pooled media tokens.

    Image / video tagging and spoken keyword spotting in one head, trained as classification over the
    LM vocabulary (SuperClass, Huang et al. 2024: softmax cross-entropy against the normalised bag of
    the text's token ids). Unlike the caption loss, the target does not depend on word order or on the
    previous words, so the towers must see every attribute themselves instead of leaning on the LM's
    word-to-word statistics; unlike the contrastive loss it needs no negatives from the batch.
    """

    modality = "media"
    labels_key = "pair_input_ids"

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
