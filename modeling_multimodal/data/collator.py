"""MultimodalCollator: encoded examples -> one padded batch, and media tensors in the order the model reads them.

The model takes media as flat tensors and consumes them sample by sample, in placeholder order within
each sample, so media are concatenated in sample order. Samples without a modality (or text-only
samples) simply add nothing to that modality's tensor. Videos' sound tracks (`video_audio_features`, one row
per video) are padded like audio clips; in a batch where some videos have one, a video without gets a row
of length 0 (mask all 0), so audio-visual and plain videos mix freely. Audio clips are right-padded to the longest clip
with `input_features_mask`; `ctc_labels` get one row per clip (-100 padded, all -100 for a clip without
a transcript); `pair_input_ids` one row per sample (all padding for a sample without a pair text, which
the contrastive loss skips).

`LengthGroupedBatchSampler` makes batches of similar lengths (from precomputed lengths), so little of a
padded batch is padding.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch.nn import functional as F
from torch.utils.data import Sampler

from ..constants import IGNORE_INDEX
from ..processing.audio_loading import pad_log_mels


def pad_sequences(sequences: list[torch.Tensor], value: int, side: str = "right", length: int | None = None) -> torch.Tensor:
    """1-D tensors -> (n, length) padded with `value` on `side` (length defaults to the longest)."""
    length = max([len(s) for s in sequences], default=0) if length is None else length
    out = torch.full((len(sequences), length), value, dtype=sequences[0].dtype if sequences else torch.long)
    for row, sequence in enumerate(sequences):
        if side == "right":
            out[row, : len(sequence)] = sequence
        elif len(sequence):
            out[row, -len(sequence) :] = sequence
    return out


def cat_videos(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(n_i, frames_i, 3, H, W) tensors -> one (sum n_i, max frames_i, 3, H, W), zero frames after each video's own
    (videos sampled at `video_fps` differ in length; `video_frames` says which frames are real)."""
    longest = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, 0, 0, 0, 0, 0, 0, longest - t.shape[1])) if t.shape[1] < longest else t for t in tensors])


def collate_media(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Media, CTC and pair-text inputs of `examples`, concatenated in example order (shared with packing)."""
    batch = {}
    # tiled images: every crop, and each image's grid; videos at a rate: padded to the longest, and their frame counts
    for key in ("pixel_values", "image_tiles", "pixel_values_videos", "video_frames"):
        tensors = [e[key] for e in examples if e.get(key) is not None]
        if tensors:
            batch[key] = cat_videos(tensors) if key == "pixel_values_videos" else torch.cat(tensors)
    batch.update(_collate_video_tracks(examples))
    clips, masks, ctc_rows = [], [], []
    for example in examples:
        features = example.get("input_features")
        if features is None:
            continue
        mask = example.get("input_features_mask")
        if mask is None:
            mask = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long)
        clips.extend(features)
        masks.extend(mask)
        ctc = example.get("ctc_labels")
        ctc_rows.extend(list(ctc) if ctc is not None else [torch.empty(0, dtype=torch.long)] * features.shape[0])
    if clips:
        batch["input_features"], batch["input_features_mask"] = pad_log_mels(clips, masks)
        if any(len(row) for row in ctc_rows):  # no transcript anywhere: leave the CTC loss out entirely
            batch["ctc_labels"] = pad_sequences(ctc_rows, IGNORE_INDEX)
    pairs = [e.get("pair_input_ids") for e in examples]
    if any(p is not None for p in pairs):
        pairs = [p if p is not None else torch.empty(0, dtype=torch.long) for p in pairs]
        batch["pair_input_ids"] = pad_sequences(pairs, pad_token_id)
        batch["pair_attention_mask"] = pad_sequences([torch.ones(len(p), dtype=torch.long) for p in pairs], 0)
    return batch


def _collate_video_tracks(examples: list[dict]) -> dict[str, torch.Tensor]:
    """`video_audio_features` / `_mask`, one row per video in example order (length 0 for a video without track)."""
    if not any(e.get("video_audio_features") is not None for e in examples):
        return {}
    rows, masks = [], []
    for example in examples:
        videos = example.get("pixel_values_videos")
        features, mask = example.get("video_audio_features"), example.get("video_audio_features_mask")
        if features is None:
            count = 0 if videos is None else videos.shape[0]
            rows.extend([None] * count)
            masks.extend([None] * count)
            continue
        if mask is None:
            mask = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long)
        rows.extend(features)
        masks.extend(mask)
    features, mask = pad_log_mels(rows, masks)
    return {"video_audio_features": features, "video_audio_features_mask": mask}


class MultimodalCollator:
    """Pads encoded examples (from `ExampleEncoder`) into a batch for `MultimodalForConditionalGeneration`.

    padding_side: "right" for training, "left" for generation-style batches (the model derives position ids
        from `attention_mask`, so left padding needs nothing else). `pad_to_multiple_of` rounds the length up.
    Returns input_ids, attention_mask, labels (-100 on padding) and the media / CTC / pair inputs present.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r}; expected 'right' or 'left'.")
        self.pad_token_id, self.padding_side, self.pad_to_multiple_of = pad_token_id, padding_side, pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("MultimodalCollator got an empty list of examples.")
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        side = self.padding_side
        batch = {
            "input_ids": pad_sequences([e["input_ids"] for e in examples], self.pad_token_id, side, length),
            "attention_mask": pad_sequences([torch.ones_like(e["input_ids"]) for e in examples], 0, side, length),
            "labels": pad_sequences([e["labels"] for e in examples], IGNORE_INDEX, side, length),
        }
        batch.update(collate_media(examples, self.pad_token_id))
        return batch


def length_sorted_batches(group: Sequence[int], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The indices of `group` sorted longest first (by `lengths[i]`) and cut into batches of `batch_size`."""
    ordered = sorted(group, key=lambda i: -lengths[i])
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of indices of similar length: seeded shuffle, sort within groups, shuffle the batches.

    Each epoch the indices are shuffled (seed + epoch), cut into groups of `batch_size * group_batches`,
    each group sorted by length (longest first) and cut into batches; then the order of all batches is
    shuffled. Larger `group_batches` gives tighter batches and less randomness. Needs only `lengths`
    (`ExampleEncoder.estimate_lengths`). Call `set_epoch(epoch)` for a new order.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, group_batches: int = 50, drop_last: bool = False
    ):
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"batch_size and group_batches must be >= 1, got {batch_size} and {group_batches}.")
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.group_batches, self.drop_last, self.epoch = group_batches, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        group_size = self.batch_size * self.group_batches
        batches = []
        for start in range(0, len(order), group_size):
            batches.extend(length_sorted_batches(order[start : start + group_size], self.lengths, self.batch_size))
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)
        return iter(batches)

    def __len__(self) -> int:
        group_size = self.batch_size * self.group_batches
        full_groups, rest = divmod(len(self.lengths), group_size)
        last_group = rest // self.batch_size if self.drop_last else -(-rest // self.batch_size)
        return full_groups * self.group_batches + last_group


__all__ = ["LengthGroupedBatchSampler", "MultimodalCollator", "cat_videos", "collate_media", "length_sorted_batches", "pad_sequences"]
