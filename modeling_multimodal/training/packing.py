"""Packing: several encoded examples in one row of at most `max_length` tokens, attention kept per sample.

No attention mask is built here. Each sample's `position_ids` restart at 0 and the batch carries no
`attention_mask`; transformers v5 then finds the sample boundaries from the position ids
(`masking_utils.find_packed_sequence_indices`: a new sample starts wherever the position does not grow by
one) and builds a block-diagonal causal mask for eager / sdpa (flash-attention reads the same position
ids). Two conditions, both the trainer's to meet:
- call the model with `use_cache=False`: with a cache, transformers skips the packed-sequence detection and
  the samples attend to each other;
- leave `attention_mask` out (the packed batch has none).

Labels: the first token of every sample is -100, so the last token of sample k never learns to predict the
first token of sample k+1 (alone, a sample's first token is never a target either). Trailing padding is a
segment of its own (positions from 0, labels -100, `segment_ids` -1). With these, each sample's summed
token loss equals its loss when run alone (tests/test_packing.py checks it with media in the row).

For the contrastive loss every packed sample keeps its own pair text: `pair_input_ids` is (n_samples, L),
one row per packed sample in flat order, and `segment_ids` (rows, seq) gives each token's sample index in
that flat order (-1 on padding), from which the model can pool each sample's media tokens.
`MultimodalForConditionalGeneration.forward(segment_ids=...)` pools per sample with it.

Attention that skips the blocks between samples. With SDPA and a block-diagonal mask, a packed row costs
(row length)² in attention: every sample's queries are scored against every key of the row and the mask
throws most of it away (on CPU there is no varlen kernel, and `flex_attention` has no CPU backward in
torch 2.13). The collator therefore also emits transformers' varlen kwargs `cu_seq_lens_q/k` (the sample
boundaries over the flattened rows, as `DataCollatorWithFlattening` does), and
`per_sample_sdpa` — registered with `AttentionInterface` as `"sdpa_packed"` — runs causal SDPA on each
sample's slice alone: Σ(sample length)² instead of (row length)². Flash attention reads the same boundaries.
Without them (unpacked batches, generation) `"sdpa_packed"` is exactly `"sdpa"`. `use_per_sample_attention`
switches a model's LM to it; the trainer does so on CPU when `data.packing` is on and the LM runs on SDPA.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch.nn import functional as F
from torch.utils.data import Sampler
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..constants import IGNORE_INDEX
from ..data.collator import collate_media, pad_sequences


def first_fit(lengths: Sequence[int], max_length: int, decreasing: bool = True) -> list[list[int]]:
    """Bins of indices whose lengths sum to at most `max_length`: each item into the first bin it fits.

    decreasing=True places the longest first (first-fit-decreasing, the tighter packing); False keeps the given
    order, which never needs more bins than a given feasible plan listed bin by bin (so `PackingCollator`
    reproduces `PackedBatchSampler`'s rows). Within a bin, indices keep their placement order. Raises if one
    item is too long.
    """
    for index, length in enumerate(lengths):
        if length > max_length:
            raise ValueError(f"Item {index} is {length} tokens, longer than max_length={max_length}; it cannot be packed.")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if decreasing else range(len(lengths))
    bins, space = [], []
    for index in order:
        for b, free in enumerate(space):
            if lengths[index] <= free:
                bins[b].append(index)
                space[b] -= lengths[index]
                break
        else:
            bins.append([index])
            space.append(max_length - lengths[index])
    return bins


class PackingCollator:
    """Encoded examples -> packed rows of at most `max_length` tokens (first fit, see `first_fit`).

    decreasing=False (default) packs in the given order, which reproduces the rows `PackedBatchSampler` planned
    (it lists each batch row by row); True sorts longest first, for batches that come from elsewhere.
    Returns input_ids, labels, position_ids, segment_ids (rows, seq) — no attention_mask —, the sample boundaries
    as transformers' varlen kwargs (`varlen_kwargs`), and the media, CTC and pair inputs of the samples in row
    order (pair_input_ids: one row per sample). The number of rows is
    what the examples need; rows are padded to the longest row, or to `max_length` with `pad_to_max_length`.
    """

    def __init__(self, pad_token_id: int, max_length: int, pad_to_max_length: bool = False, decreasing: bool = False):
        self.pad_token_id, self.max_length, self.pad_to_max_length = pad_token_id, max_length, pad_to_max_length
        self.decreasing = decreasing

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("PackingCollator got an empty list of examples.")
        for example in examples:
            if len(example["input_ids"]) > self.max_length:
                raise ValueError(
                    f"Example {example.get('id')!r} is {len(example['input_ids'])} tokens, over max_length={self.max_length}."
                )
        bins = first_fit([len(e["input_ids"]) for e in examples], self.max_length, self.decreasing)
        rows = [[examples[i] for i in row] for row in bins]
        width = self.max_length if self.pad_to_max_length else max(sum(len(e["input_ids"]) for e in row) for row in rows)
        packed, first_sample = [], 0
        for row in rows:
            packed.append(self._pack_row(row, first_sample, width))
            first_sample += len(row)
        batch = {key: torch.stack([row[key] for row in packed]) for key in packed[0]}
        batch.update(varlen_kwargs(batch["position_ids"]))
        batch.update(collate_media([e for row in rows for e in row], self.pad_token_id))  # flat sample order
        return batch

    def _pack_row(self, samples: list[dict], first_sample: int, width: int) -> dict[str, torch.Tensor]:
        """One row of `width` tokens: the samples one after another, then padding as a segment of its own."""
        ids, labels, positions, segments = [], [], [], []
        for sample, example in enumerate(samples, start=first_sample):
            length = len(example["input_ids"])
            sample_labels = example["labels"].clone()
            sample_labels[0] = IGNORE_INDEX  # the previous sample must not predict this sample's first token
            ids.append(example["input_ids"])
            labels.append(sample_labels)
            positions.append(torch.arange(length))
            segments.append(torch.full((length,), sample))
        padding = width - sum(len(t) for t in ids)
        ids.append(torch.full((padding,), self.pad_token_id))
        labels.append(torch.full((padding,), IGNORE_INDEX))
        positions.append(torch.arange(padding))  # positions restart at 0: padding attends only to padding
        segments.append(torch.full((padding,), -1))
        parts = {"input_ids": ids, "labels": labels, "position_ids": positions, "segment_ids": segments}
        return {key: torch.cat([p.long() for p in values]) for key, values in parts.items()}


def varlen_kwargs(position_ids: torch.LongTensor) -> dict[str, torch.Tensor]:
    """`cu_seq_lens_q` / `cu_seq_lens_k` of packed rows whose positions restart at 0 at every sample.

    The boundaries index the rows flattened to one sequence (rows × seq), as flash attention's varlen kernels
    and `per_sample_sdpa` read them; trailing padding counts as one more sample. (Without `max_length_q/k`,
    which would be the batch's only non-tensors, flash attention finds the same boundaries from the positions.)
    """
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().flatten()
    cu_seq_lens = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens.clone()}


PACKED_ATTENTION = "sdpa_packed"


def per_sample_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA over each packed sample's slice alone (see the module docstring); plain SDPA without boundaries.

    query (batch, heads, seq, head_dim), key / value (batch, kv_heads, seq, head_dim); returns (batch, seq, heads,
    head_dim) as transformers' attention functions do. Boundaries index the flattened rows and a sample never
    crosses a row. Layers with a sliding window or attention sinks keep the masked path.
    """
    batch, heads, length, _ = query.shape
    plain = (
        cu_seq_lens_q is None
        or key.shape[2] != length  # a cached prefix: the boundaries describe the queries only
        or kwargs.get("sliding_window") is not None
        or kwargs.get("s_aux") is not None
    )
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_q, cu_seq_lens_k):
        raise ValueError("per_sample_sdpa needs the same sample boundaries for queries and keys (cu_seq_lens_q == cu_seq_lens_k).")
    if int(cu_seq_lens_q[-1]) != batch * length:
        raise ValueError(f"cu_seq_lens_q ends at {int(cu_seq_lens_q[-1])} but the batch holds {batch} rows × {length} tokens.")
    outputs = []
    bounds = cu_seq_lens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        row, begin = divmod(start, length)
        stop = end - row * length
        if stop > length:
            raise ValueError(f"Packed sample at flat tokens {start}:{end} crosses the end of row {row} ({length} tokens).")
        outputs.append(
            F.scaled_dot_product_attention(
                query[row : row + 1, :, begin:stop], key[row : row + 1, :, begin:stop], value[row : row + 1, :, begin:stop],
                dropout_p=dropout if module.training else 0.0, is_causal=True, scale=scaling,
                enable_gqa=key.shape[1] != heads,
            )
        )
    output = torch.cat(outputs, dim=2).view(heads, batch, length, -1)  # (heads, rows, seq, head_dim)
    return output.permute(1, 2, 0, 3).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, per_sample_sdpa)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # the mask plain calls need; packed calls ignore it


def use_per_sample_attention(model) -> bool:
    """Switch the LM of `model` (ours, or any transformers model) from SDPA to `per_sample_sdpa`; True if switched.

    Other implementations (flash attention reads the same boundaries; eager and flex keep their masks) stay.
    """
    config = model.config.get_text_config()
    if config._attn_implementation != "sdpa":
        return False
    if config is model.config:
        model.set_attn_implementation(PACKED_ATTENTION)
    else:
        model.set_attn_implementation({"text_config": PACKED_ATTENTION})
    return True


class PackedBatchSampler(Sampler[list[int]]):
    """Batches of indices that fill `rows_per_batch` packed rows of `max_length` tokens, from precomputed lengths.

    Each epoch: a seeded shuffle, then windows of `window` examples are packed first-fit-decreasing, the rows
    shuffled and grouped `rows_per_batch` at a time (the last, partial group is kept unless `drop_last`). A batch
    lists its indices row by row, so `PackingCollator` (in-order first fit) packs it into at most
    `rows_per_batch` rows when the lengths are the encoder's (`ExampleEncoder.estimate_lengths`, which are
    exact). Call `set_epoch` for a new shuffle.
    """

    def __init__(
        self, lengths: Sequence[int], max_length: int, rows_per_batch: int = 1, seed: int = 0,
        window: int = 1000, drop_last: bool = False,
    ):
        self.lengths, self.max_length, self.rows_per_batch = list(lengths), max_length, rows_per_batch
        self.seed, self.window, self.drop_last, self.epoch = seed, window, drop_last, 0
        first_fit(self.lengths, max_length)  # fail early on an over-long example
        self._batches = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._batches = epoch, None

    def batches(self) -> list[list[int]]:
        if self._batches is None:
            order = list(range(len(self.lengths)))
            random.Random(self.seed + self.epoch).shuffle(order)
            rows = []
            for start in range(0, len(order), self.window):
                chunk = order[start : start + self.window]
                planned = first_fit([self.lengths[i] for i in chunk], self.max_length)
                rows.extend([chunk[i] for i in row] for row in planned)
            random.Random(self.seed + self.epoch + 1).shuffle(rows)
            groups = [rows[i : i + self.rows_per_batch] for i in range(0, len(rows), self.rows_per_batch)]
            if self.drop_last and groups and len(groups[-1]) < self.rows_per_batch:
                groups.pop()
            self._batches = [[i for row in group for i in row] for group in groups]
        return self._batches

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


__all__ = [
    "PACKED_ATTENTION", "PackedBatchSampler", "PackingCollator", "first_fit", "per_sample_sdpa", "use_per_sample_attention", "varlen_kwargs",
]
