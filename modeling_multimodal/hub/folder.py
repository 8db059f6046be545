"""What a checkpoint folder holds: the files a push uploads, its weight files, and the files that stay behind.

A push reads nothing outside its folder: a file that is a symlink to somewhere else is refused, and so are
pickled weights (safetensors only).
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

CARD_INPUTS_FILENAME = "model_card_inputs.json"
# Trainer state and other files a checkpoint folder may hold that do not belong in a model repo.
IGNORE_PATTERNS = (
    "README.md", ".*", "*/.*", "__pycache__/*", "*.pyc", "optimizer.*", "scheduler.*", "rng_state*",
    "scaler.pt", "training_args.bin", "trainer_state.json", "checkpoint-*/*", "runs/*",
)  # fmt: skip
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def read_json(path: Path) -> dict | None:
    """The JSON file's content, or None when the folder has no such file."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def checkpoint_files(checkpoint_dir: str | Path) -> list[str]:
    """Repo paths of the files a push uploads; raises if a weight file is a pickle (safetensors only)."""
    checkpoint_dir = Path(checkpoint_dir)
    files = sorted(
        path.relative_to(checkpoint_dir).as_posix()
        for path in checkpoint_dir.rglob("*")
        if path.is_file()
        and not any(fnmatch.fnmatch(path.relative_to(checkpoint_dir).as_posix(), p) for p in IGNORE_PATTERNS)
    )
    real_root = os.path.realpath(checkpoint_dir)
    leaving = [
        f"{name} -> {target}"
        for name in files
        for target in [os.path.realpath(checkpoint_dir / name)]
        if os.path.commonpath([real_root, target]) != real_root
    ]
    if leaving:
        raise ValueError(
            f"{checkpoint_dir} holds symlinks to files outside it ({', '.join(leaving)}); a push uploads only the "
            "folder's own files: copy them in or remove the links"
        )
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{checkpoint_dir} holds pickled weights {pickles}; save with safetensors before pushing")
    if "config.json" not in files and "adapter_config.json" not in files:
        raise ValueError(f"{checkpoint_dir} is not a checkpoint: it has neither config.json nor adapter_config.json")
    return files



def weight_files(checkpoint_dir: str | Path) -> list[str]:
    """The folder's full-model weight files: `model.safetensors`, or the index and the shards it names."""
    checkpoint_dir = Path(checkpoint_dir)
    index = read_json(checkpoint_dir / WEIGHTS_INDEX_NAME)
    if index is not None:
        return [WEIGHTS_INDEX_NAME, *sorted(set(index["weight_map"].values()))]
    return [WEIGHTS_NAME] if (checkpoint_dir / WEIGHTS_NAME).is_file() else []
