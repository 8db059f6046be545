"""Evaluation split across the processes of a `torchrun` / `accelerate launch` job, with the results gathered.

Each rank scores its share of the rows and the predictions (or embeddings) are gathered back into row order, so
every rank ends with the single-process result. Three rules keep a sharded model (FSDP2, whose every forward
all-gathers parameters collectively) from hanging:
- every rank runs the same number of batches: shares are padded to equal length with repeated rows, whose
  results are dropped;
- batch i of every rank holds the same modalities: rows are grouped by the media they carry before the split,
  so a tower runs on all ranks or on none;
- generation keeps stepping until every rank is done (`generate(synced_gpus=True)`, transformers' switch for
  ZeRO-3 / FSDP).
Without a process group (or with `distributed=False`) a "share" is every row, in order: one process is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class Ranks:
    """This process's place in the evaluation: `rank` of `world` processes; `sharded`: the model's parameters are
    FSDP2 shards, so every forward is collective."""

    rank: int = 0
    world: int = 1
    sharded: bool = False

    @classmethod
    def of(cls, model, distributed: bool) -> "Ranks":
        sharded = any(isinstance(p, DTensor) for p in model.parameters())
        if not (distributed and dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            if sharded:
                raise ValueError("the model's parameters are FSDP2 shards: evaluate it with distributed=True on every rank")
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), sharded)

    def share(self, keys: list) -> list[tuple[int, bool]]:
        """(row index, is padding) of this rank's rows: rows grouped by `keys[i]` (e.g. the modalities a row holds),
        each group split into equal contiguous parts (the last padded with its group's last row)."""
        if self.world == 1:
            return [(index, False) for index in range(len(keys))]
        groups: dict = {}
        for index, key in enumerate(keys):
            groups.setdefault(key, []).append(index)
        mine = []
        for indices in groups.values():
            size = -(-len(indices) // self.world)  # ceil
            part = indices[self.rank * size : (self.rank + 1) * size]
            mine += [(i, False) for i in part] + [(indices[-1], True)] * (size - len(part))
        return mine

    def gather(self, results: dict[int, object], total: int) -> list:
        """{row index: result} of every rank -> the results of rows 0..total-1, in order, on every rank."""
        if self.world > 1:
            everyone = [None] * self.world
            dist.all_gather_object(everyone, results)  # between this job's own processes; nothing is read from disk
            results = {index: value for part in everyone for index, value in part.items()}
        missing = sorted(set(range(total)) - set(results))
        if missing:
            raise RuntimeError(f"evaluation results of rows {missing[:5]} came back from no rank")
        return [results[index] for index in range(total)]


def media_signature(example: dict) -> tuple:
    """The modalities (and audio tracks of videos) an example holds: the towers its forward runs."""
    return tuple(bool(example["media"][modality]) for modality in ("image", "audio", "video")) + (any(example["use_audio_in_video"]),)


def batches_of(share: list[tuple[int, bool]], keys: list | None, size: int):
    """Batches of at most `size` from a share; with `keys` (several ranks) never mixing two groups, so every rank's
    batch i has the same key; without, consecutive rows as one process always batched them."""
    batch = []
    for item in share:
        if batch and (len(batch) == size or (keys is not None and keys[batch[-1][0]] != keys[item[0]])):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def cpu(value):
    """Tensors moved to the CPU (what `Ranks.gather` sends between processes)."""
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value
