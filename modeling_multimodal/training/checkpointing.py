"""Atomic training checkpoints: trainable weights, optimizer, scheduler, RNG states, data position.

A checkpoint is written into `checkpoint-N.tmp` and renamed to `checkpoint-N` only once complete,
so a run killed mid-write leaves the previous checkpoint as the latest loadable one. Only the
trainable parameters are stored (the adapter, projectors and heads of a LoRA run); frozen weights are
rebuilt from the recipe's model source, so resuming needs the same recipe.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.exists():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().cpu().contiguous() for name, param in model.named_parameters() if param.requires_grad}


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    trainer_state: dict,
    rank: int = 0,
    is_main: bool = True,
    total_limit: int | None = None,
    wait_for_everyone=lambda: None,
) -> Path:
    """Write checkpoint-`step` atomically and return its path."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    temporary = output_dir / f"checkpoint-{step}.tmp"
    if is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        save_file(trainable_state_dict(model), temporary / "trainable.safetensors")
        torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
        torch.save(scheduler.state_dict(), temporary / "scheduler.pt")
        (temporary / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    wait_for_everyone()
    torch.save(rng_state(), temporary / f"rng_state_{rank}.pt")
    wait_for_everyone()
    if is_main:
        (temporary / "COMPLETE").write_text(str(step))
        if final.exists():  # re-saving a step (after a resume): drop the stale copy first
            shutil.rmtree(final)
        os.replace(temporary, final)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    wait_for_everyone()
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer, scheduler, rank: int = 0) -> tuple[dict, dict]:
    """Load weights, optimizer and scheduler; return (trainer_state, rng_state) — RNG is restored by the caller."""
    path = Path(path)
    if not (path / "COMPLETE").exists():
        raise ValueError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
    weights = load_file(path / "trainable.safetensors")
    parameters = dict(model.named_parameters())
    missing = [name for name, param in parameters.items() if param.requires_grad and name not in weights]
    unexpected = [name for name in weights if name not in parameters]
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {path} does not match the model built from this recipe: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. Resume with the recipe that wrote it."
        )
    with torch.no_grad():
        for name, value in weights.items():
            parameters[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    state = json.loads((path / "trainer_state.json").read_text())
    rng_file = path / f"rng_state_{rank}.pt"
    rng = torch.load(rng_file if rng_file.exists() else path / "rng_state_0.pt", weights_only=False)
    return state, rng
