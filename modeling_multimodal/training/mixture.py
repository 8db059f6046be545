"""The training data mixture: the recipe's manifests as one dataset, its example cache, and the loader.

A training entry's `repeat` weights its task in the mixture (its rows appear that many times per epoch).
With `data.cache_in_memory` each encoded example is kept in an `ExampleCache`, so a row is decoded once
however often it is drawn. The cache is an object the caller owns and hands to each run that may reuse
it: `train()` gives one to every stage of a chain, and the demo one to all its runs; it keeps the
examples of one encoding at a time (`encoding_fingerprint`), so a different data set, task or processor
replaces them instead of reading stale ones.

With an active `augment` section each part's encoder carries an `Augmentation`; the dataset then encodes every
draw afresh for (seed, epoch, index) — the trainer calls `MixedDataset.set_epoch` before each epoch — and the
recipe refuses `data.cache_in_memory` with it, so nothing augmented is memoised.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader

from ..data.collator import LengthGroupedBatchSampler, MultimodalCollator
from ..data.examples import EncodedDataset, ExampleEncoder, load_manifest
from ..data.length_cache import cached_lengths, encoder_fingerprint
from .augmentation import Augmentation
from .packing import PackedBatchSampler, PackingCollator
from .recipe import TrainingRecipe
from .streaming import GROUP_BATCHES, StreamedExamples, StreamingBatchSampler


LENGTH_CACHE_FOLDER = ".modeling_multimodal_cache"  # beside the data: per-row length estimates (data/length_cache.py)


def load_rows(recipe: TrainingRecipe, entries: list[dict], training: bool = True) -> list[tuple[str, object]]:
    """[(task, datasets.Dataset)] for the recipe's manifest entries, paths resolved against data.root.

    An entry's manifest is a file, an `.arrow` file or a `save_to_disk` folder (relative to data.root), or a
    `datasets.Dataset` / `DatasetDict` object (Python); `format`, `media_root`, data.image_folder (LLaVA rows) and
    `split` (default train / validation) go to `load_manifest`, with data.media_roots as further allowed folders.

    A training entry's `repeat` is applied by the training loader; an evaluation entry scores each row once,
    so `repeat` there is refused (by the recipe's `check_data_entries`) rather than ignored.
    """
    loaded, data = [], recipe.data
    root = Path(data.root)
    streaming = training and data.streams()
    for entry in entries:
        manifest = entry["manifest"]
        source = manifest if not isinstance(manifest, (str, Path)) else root / manifest  # a Dataset object as it is
        rows = load_manifest(
            source, root=data.root, task=entry.get("task"), format=entry.get("format"),
            media_root=root / entry["media_root"] if entry.get("media_root") else None,
            image_folder=root / data.image_folder if data.image_folder else None,
            media_roots=[root / r for r in data.media_roots],
            split=entry.get("split") or ("train" if training else "validation"), streaming=streaming,
        )
        if isinstance(rows, datasets.IterableDataset) and not streaming:  # an IterableDataset to score: its rows, read once
            limit = entry.get("max_samples") or data.eval_max_samples
            rows = datasets.Dataset.from_list(list(rows.take(limit) if limit else rows))
        if entry.get("max_samples") and streaming:
            rows = rows.take(int(entry["max_samples"]))
        elif entry.get("max_samples"):
            rows = rows.select(range(min(len(rows), int(entry["max_samples"]))))
        loaded.append((entry.get("task"), rows))
    return loaded


def encoding_fingerprint(part: EncodedDataset) -> str:
    """What decides a part's encoded examples: its rows and the encoder (`encoder_fingerprint`)."""
    digest = hashlib.sha256(encoder_fingerprint(part.encoder).encode() + b"\0")
    for row in part.rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode() + b"\0")
    return digest.hexdigest()


class ExampleCache:
    """Encoded examples of one encoding (`examples_for` its fingerprint), shared by the runs it is given to."""

    def __init__(self):
        self.key, self.examples = None, {}

    def examples_for(self, parts: list[EncodedDataset]) -> dict:
        """The memo for these parts: the kept one if they encode as before, else a fresh one replacing it."""
        key = tuple(encoding_fingerprint(part) for part in parts)
        if key != self.key:
            self.key, self.examples = key, {}
        return self.examples


class MixedDataset(torch.utils.data.Dataset):
    """Several tasks' encoded datasets behind one index, each repeated `repeats[i]` times, optionally memoised."""

    def __init__(self, parts: list[EncodedDataset], repeats: list[int] | None = None, cache: ExampleCache | None = None):
        self.parts = parts
        self.offsets = [0]
        for part, repeat in zip(parts, repeats or [1] * len(parts)):
            self.offsets.append(self.offsets[-1] + len(part) * repeat)
        self.memo = cache.examples_for(parts) if cache is not None else None
        self.epoch = 0  # the epoch augmented samples are drawn for (`set_epoch`, called before each epoch's iterator)

    def __len__(self):
        return self.offsets[-1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def calibration_parts(self, per_task: int) -> list[EncodedDataset]:
        """The tasks' encoded datasets (`calibration_batches` spreads its `per_task` samples over each)."""
        return self.parts

    def __getitem__(self, index):
        part = next(i for i in range(len(self.parts)) if index < self.offsets[i + 1])
        key = (part, (index - self.offsets[part]) % len(self.parts[part]))  # a repeated row is one example
        if self.parts[part].encoder.augmentation is not None:  # never memoised (the recipe refuses both)
            return self.parts[part].augmented(key[1], self.epoch, index)  # each repeat draws its own transforms
        if self.memo is not None and key in self.memo:
            return self.memo[key]
        example = self.parts[key[0]][key[1]]
        if self.memo is not None:
            self.memo[key] = example
        return example


def _encoder(recipe: TrainingRecipe, processor, task) -> ExampleEncoder:
    data = recipe.data
    augmentation = Augmentation(recipe.augment, task, recipe.seed, processor) if recipe.augment.active else None
    return ExampleEncoder(processor, task, max_length=data.max_length, augmentation=augmentation, assistant_turns=data.assistant_turns)


def _collator(recipe: TrainingRecipe, processor):
    pad_id = processor.tokenizer.pad_token_id
    if recipe.data.packing:
        return PackingCollator(pad_token_id=pad_id, max_length=recipe.data.max_length)
    return MultimodalCollator(pad_token_id=pad_id, padding_side="right")


def build_streaming_loader(recipe: TrainingRecipe, processor, rows_by_task, rank: int = 0, world_size: int = 1):
    """(DataLoader, its `StreamingBatchSampler`) over streamed rows (`training/streaming.py`): this rank's shard,
    planned in order by the sampler and encoded by the loader's workers. Not for Accelerate's `prepare`: each
    rank already reads its own shard."""
    data = recipe.data
    if data.cache_in_memory:
        raise ValueError("data.cache_in_memory keeps every example of an indexed data set; streamed rows are read once per pass")
    encoders = [_encoder(recipe, processor, task) for task, _ in rows_by_task]
    sampler = StreamingBatchSampler(
        [rows for _, rows in rows_by_task], encoders, [entry.get("repeat", 1) for entry in data.train],
        recipe.optim.batch_size, seed=recipe.seed, packing=data.packing, max_length=data.max_length,
        group_by_length=data.group_by_length, shuffle_buffer=data.shuffle_buffer, rank=rank, world_size=world_size,
    )
    loader = DataLoader(
        StreamedExamples([rows for _, rows in rows_by_task], encoders), batch_sampler=sampler, collate_fn=_collator(recipe, processor),
        num_workers=data.num_workers, generator=torch.Generator().manual_seed(recipe.seed),
    )
    return loader, sampler


def build_train_loader(
    recipe: TrainingRecipe, processor, rows_by_task, cache: ExampleCache | None = None, rank: int = 0, world_size: int = 1
):
    """(DataLoader, its batch sampler) over the mixture: length-grouped batches, or packed rows with `data.packing`;
    streamed rows (`data.streams()`) through `build_streaming_loader` (this `rank`'s shard of `world_size`).

    The cache is used only with `data.cache_in_memory`. The sampler is returned too, because the trainer sets
    its epoch itself (Accelerate's loader does not reach it in every setup); so does it the dataset's
    (`loader.dataset`, a `MixedDataset`), which augmentation draws by.
    """
    data = recipe.data
    if data.streams():
        return build_streaming_loader(recipe, processor, rows_by_task, rank, world_size)
    parts, lengths, repeats = [], [], [entry.get("repeat", 1) for entry in data.train]
    for (task, rows), repeat in zip(rows_by_task, repeats):
        encoder = _encoder(recipe, processor, task)
        parts.append(EncodedDataset(rows, encoder))
        lengths += cached_lengths(encoder, rows, Path(data.root) / LENGTH_CACHE_FOLDER) * repeat
    dataset = MixedDataset(parts, repeats, cache if data.cache_in_memory else None)
    batch_size = recipe.optim.batch_size
    collator = _collator(recipe, processor)
    if data.packing:  # batch_size counts packed rows
        batch_sampler = PackedBatchSampler(lengths, data.max_length, rows_per_batch=batch_size, seed=recipe.seed)
    else:
        groups = GROUP_BATCHES if data.group_by_length else 1
        batch_sampler = LengthGroupedBatchSampler(lengths, batch_size, seed=recipe.seed, group_batches=groups)
    loader = DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collator,
        num_workers=data.num_workers,
        generator=torch.Generator().manual_seed(recipe.seed),  # keeps the global RNG (dropout) untouched
    )
    return loader, batch_sampler
