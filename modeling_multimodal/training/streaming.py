"""Streaming training data (`data.streaming: true`, or an `IterableDataset` as a training manifest): rows are read as
training needs them, so a launch or a resume starts without indexing, estimating or checking the whole data set.

The order of the examples is a function of (seed, epoch, position), so a resumed run draws exactly the batches
an uninterrupted run would:
- epoch e reads every task's rows `repeat` times (one pass after another), each pass shuffled in a bounded buffer
  (`data.shuffle_buffer` rows) seeded by (seed, e, task, pass); the tasks are interleaved by a seeded draw
  weighted by `repeat`, as long as any has rows left;
- the mixed stream is dealt row by row to the processes: row j goes to rank j mod world_size, so each rank
  reads its own shard (every rank reads the rows; only its own are length-estimated and encoded);
- each rank plans its batches on a bounded buffer: `batch_size × group_batches` rows sorted by estimated
  length and cut into batches (`data.group_by_length`), or, with `data.packing`, windows of rows packed
  first-fit-decreasing into rows of `max_length` tokens, `batch_size` rows per batch; the buffer's batches
  are shuffled (seeded by seed, epoch, buffer) before they are given out.
- `skip(n)` (resume) replays the plan of the first n batches of the epoch without encoding anything.

`StreamingBatchSampler` yields each batch as a list of `(task index, row, position)` keys and `StreamedExamples`
encodes a key, so the DataLoader's workers encode in parallel while the plan stays in one place and in order.
The batch size follows the indexed path's rule: without packing `batch_size` is the global batch, split
evenly over the processes; with packing each process draws its own batches of `batch_size` rows.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import islice

from torch.utils.data import Sampler

from ..data.collator import length_sorted_batches
from ..data.examples import EncodedDataset, ExampleEncoder
from .packing import first_fit

GROUP_BATCHES = 50  # batches per length-grouping buffer (as LengthGroupedBatchSampler's default)
PACKING_WINDOW = 1000  # rows per packing window (as PackedBatchSampler's)


def shuffled(rows, buffer_size: int, rng: random.Random) -> Iterator:
    """The rows in a random order drawn from a buffer of `buffer_size` (datasets' buffer shuffle, seeded here)."""
    buffer = []
    for row in rows:
        if len(buffer) < buffer_size:
            buffer.append(row)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = row
    rng.shuffle(buffer)
    yield from buffer


class StreamedExamples:
    """The DataLoader's dataset: a `(task, row, position)` key -> that row encoded by its task's encoder."""

    def __init__(self, parts: list, encoders: list[ExampleEncoder]):
        self.parts, self.encoders, self.epoch = parts, encoders, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # augmentation draws per (seed, epoch, position)

    def __getitem__(self, key):
        task, row, position = key
        encoder = self.encoders[task]
        if encoder.augmentation is not None:
            return encoder(row, augment_key=(self.epoch, position))
        return encoder(row)

    def calibration_parts(self, per_task: int) -> list[EncodedDataset]:
        """Each task's first `per_task` rows (in file order), encoded on access, for projector calibration."""
        return [EncodedDataset(list(islice(iter(rows), per_task)), encoder) for rows, encoder in zip(self.parts, self.encoders)]


class StreamingBatchSampler(Sampler):
    """Batches of `(task, row, position)` keys planned from streamed rows (see the module docstring)."""

    def __init__(
        self, parts: list, encoders: list[ExampleEncoder], repeats: list[int], batch_size: int, *, seed: int,
        packing: bool = False, max_length: int | None = None, group_by_length: bool = True,
        shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1,
    ):
        if not packing and batch_size % world_size:
            raise ValueError(
                f"data.streaming: optim.batch_size={batch_size} is the global batch and must split evenly over "
                f"{world_size} processes"
            )
        self.parts, self.encoders, self.repeats = parts, encoders, repeats
        self.batch_size = batch_size if packing else batch_size // world_size
        self.seed, self.packing, self.max_length, self.group_by_length = seed, packing, max_length, group_by_length
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size
        self.epoch, self.skipped = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.skipped = epoch, 0

    def skip(self, batches: int) -> None:
        """The next iteration starts `batches` batches into the epoch (a resumed run)."""
        self.skipped = batches

    def _rng(self, *names) -> random.Random:
        return random.Random("/".join(map(str, (self.seed, self.epoch, *names))))

    def _task_rows(self, task: int) -> Iterator:
        for repeat in range(self.repeats[task]):
            yield from shuffled(iter(self.parts[task]), self.shuffle_buffer, self._rng("rows", task, repeat))

    def mixed_rows(self) -> Iterator[tuple[int, dict, int]]:
        """This epoch's (task, row, position) for every rank, interleaved by a draw weighted by `repeat`."""
        streams = {task: self._task_rows(task) for task in range(len(self.parts))}
        rng, position = self._rng("mix"), 0
        while streams:
            tasks = list(streams)
            task = rng.choices(tasks, weights=[self.repeats[t] for t in tasks])[0]
            try:
                row = next(streams[task])
            except StopIteration:
                del streams[task]
                continue
            yield task, row, position
            position += 1

    def _own_rows(self) -> Iterator[tuple[tuple[int, dict, int], int]]:
        """This rank's keys with their estimated token lengths."""
        for key in self.mixed_rows():
            if key[2] % self.world_size != self.rank:
                continue
            length = self.encoders[key[0]].estimate_length(key[1])
            if self.packing and length > self.max_length:
                raise ValueError(
                    f"Row {key[1].get('id')!r} (task {key[0]}) is {length} tokens, over data.max_length={self.max_length}; "
                    "it cannot be packed."
                )
            yield key, length

    def _buffers(self, size: int) -> Iterator[list]:
        buffer = []
        for item in self._own_rows():
            buffer.append(item)
            if len(buffer) == size:
                yield buffer
                buffer = []
        if buffer:
            yield buffer

    def batches(self) -> Iterator[list]:
        """This epoch's batches for this rank, in order (nothing encoded)."""
        size = PACKING_WINDOW if self.packing else self.batch_size * (GROUP_BATCHES if self.group_by_length else 1)
        for number, buffer in enumerate(self._buffers(size)):
            keys, lengths = [k for k, _ in buffer], [n for _, n in buffer]
            if self.packing:
                rows = [[keys[i] for i in row] for row in first_fit(lengths, self.max_length)]
                self._rng("rows-order", number).shuffle(rows)
                planned = [sum(rows[i : i + self.batch_size], []) for i in range(0, len(rows), self.batch_size)]
            else:
                order = list(range(len(keys)))
                if self.group_by_length:
                    planned = [[keys[i] for i in b] for b in length_sorted_batches(order, lengths, self.batch_size)]
                else:
                    planned = [keys[i : i + self.batch_size] for i in range(0, len(keys), self.batch_size)]
                self._rng("batch-order", number).shuffle(planned)
            yield from planned

    def __iter__(self):
        skipped, given = self.skipped, 0
        for index, batch in enumerate(self.batches()):
            if index >= skipped:
                given += 1
                yield batch
        if skipped == 0 and given == 0:
            raise ValueError(
                f"data.streaming: epoch {self.epoch} gave rank {self.rank} of {self.world_size} no rows; the data set has "
                "fewer rows than processes"
            )


__all__ = ["StreamedExamples", "StreamingBatchSampler", "shuffled"]
