"""Read one part of a pretrained checkpoint: only the keys of the module wanted, wherever the checkpoint nests it.

A vision tower is often saved inside a dual encoder (`CLIPModel` / `SiglipModel`: `vision_model.*` beside
`text_model.*`), an audio encoder inside a whole speech model (Whisper: `model.encoder.*` beside its decoder;
Qwen2-Audio: `audio_tower.*` beside its LM), a ViT inside a classifier (`vit.*`). The module's own key names are
looked up in the checkpoint's safetensors headers under the one prefix that holds them, and only those tensors are
read: the rest is neither loaded into memory nor reported as unexpected. transformers' `from_pretrained` then
loads that state, so each family's key renames and initialisation of missing tensors apply as they do for any model.
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file, logging

logger = logging.get_logger(__name__)


def checkpoint_files(source: str) -> list[str]:
    """The safetensors files of a checkpoint folder or Hub id (one file, or the shards its index names)."""
    single = cached_file(source, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False)
    if single is not None:
        return [single]
    index = cached_file(source, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False)
    if index is None:
        raise ValueError(f"{source} has no {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}: safetensors weights are needed")
    with open(index, encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return [cached_file(source, shard) for shard in shards]


def find_prefix(wanted: list[str], available: set[str]) -> tuple[str, int]:
    """The prefix under which most `wanted` keys exist in `available`, and how many do ("" when they are top-level)."""
    candidates = set()
    for key in wanted[:8]:
        candidates |= {name[: -len(key)] for name in available if name.endswith(key) and (name == key or name[-len(key) - 1] == ".")}
    scored = [(sum(prefix + key in available for key in wanted), prefix) for prefix in candidates]
    count, prefix = max(scored, default=(0, ""), key=lambda item: (item[0], -len(item[1])))
    return prefix, count


def part_state(module: nn.Module, source: str, what: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of `module` (built on any device, meta included), read from `source` by key alone.

    The prefix is the one under which most of the module's own key names exist. Under it, when the checkpoint holds
    every top-level name of the module, only those names are kept (a dual encoder's text half is dropped); when it does
    not (the family renamed its layers since the checkpoint was written: transformers renames them on load), every
    key under the prefix is kept for transformers' own conversion.
    """
    wanted = list(module.state_dict())
    files = checkpoint_files(source)
    key_file = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            key_file.update(dict.fromkeys(f.keys(), path))
    prefix, found = find_prefix(wanted, set(key_file))
    if found == 0:
        raise ValueError(
            f"{source} holds none of the {what}'s weights: expected keys such as {wanted[:3]} (under any prefix), "
            f"found {sorted(key_file)[:5]}"
        )
    under = [key[len(prefix):] for key in key_file if key.startswith(prefix)]
    own_names = {key.split(".", 1)[0] for key in wanted}
    if own_names <= {key.split(".", 1)[0] for key in under}:
        under = [key for key in under if key.split(".", 1)[0] in own_names]
    state = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in under:
                if key_file[prefix + key] == path:
                    tensor = f.get_tensor(prefix + key)
                    state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return state


def load_part(module_class, config, source: str, what: str, dtype: torch.dtype | None = None) -> nn.Module:
    """`module_class` (a transformers model class) for `config`, with its weights from the checkpoint `source`.

    Only the part's tensors are read (`part_state`); transformers' `from_pretrained` then loads them, so the family's
    key renames and its initialisation of what the checkpoint lacks (with its report) apply as usual.
    """
    with torch.device("meta"):
        skeleton = module_class(config)
    state = part_state(skeleton, source, what, dtype)
    return module_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
