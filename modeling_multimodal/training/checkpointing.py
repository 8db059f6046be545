"""Training checkpoints that load nothing executable, hold every rank's shards, and survive a kill.

Layout of `checkpoint-N/` (nothing is pickled, so a crafted file in a shared folder cannot run code):
    model.safetensors        the trainable parameters, full tensors under their module names
    optimizer.safetensors    the optimizer's per-parameter tensors (`<parameter>/<name>`)
    optimizer.json           param groups (parameters by name) and non-tensor per-parameter state
    scheduler.json           the learning-rate scheduler's state
    rng_state_<rank>.json    each rank's Python / NumPy / torch generator states
    trainer_state.json       step, data position (epoch, batch), histories, run id
    COMPLETE                 written last: every file above with its size

Model and optimizer states go through `torch.distributed.checkpoint.state_dict`, which gathers FSDP2's
DTensor shards (and unwraps DDP) into full tensors on rank 0 and scatters them back on load, so a
sharded run's checkpoint is complete. Accelerate's own `save_state` is not used: its
`register_for_checkpointing` objects load with `weights_only=False` and DCP's sharded metadata is a
pickle. Only the trainable parameters are stored (the adapter, projectors and heads of a LoRA run);
frozen weights are rebuilt from the recipe's model source, so resuming needs the same recipe.

A checkpoint is written into `checkpoint-N.tmp`, each file fsynced, and renamed to `checkpoint-N`
only once complete; `latest_checkpoint` skips (with a warning) a checkpoint whose files do not match
its COMPLETE list, so a torn write falls back to the previous checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0 only
SCATTER = StateDictOptions(full_state_dict=True, strict=False)  # every rank reads the files and keeps its shard


# --- files ------------------------------------------------------------------------------------------
def write_file(path: Path, data: bytes) -> None:
    """Write and fsync, so a completed checkpoint is on disk before it is renamed into place."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json(path: Path, value) -> None:
    write_file(path, json.dumps(value, indent=1).encode())


def save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    write_file(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: not JSON, not UTF-8
        raise ValueError(f"Checkpoint file {path} is unreadable: {error}") from error


# --- listing and validation ---------------------------------------------------------------------------
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders with their COMPLETE marker, oldest first (temporary `.tmp` folders are ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir() and (p / "COMPLETE").is_file()
    ]
    return [p for _, p in sorted(found)]


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (a file missing, of the wrong size, or not safetensors), or None."""
    try:
        manifest = json.loads((path / "COMPLETE").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its COMPLETE marker is unreadable ({error})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
        if name.endswith(".safetensors"):
            try:
                with safe_open(file, framework="pt"):
                    pass
            except (SafetensorError, OSError) as error:
                return f"{name} is not a valid safetensors file ({error})"
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that is complete and intact; torn ones are skipped with a warning."""
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("Skipping checkpoint %s: %s; falling back to the previous one", path, problem)
    return None


def checkpoint_run_id(path: Path) -> str | None:
    try:
        return json.loads((path / "trainer_state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


# --- RNG --------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every generator a step draws from, as JSON-ready values."""
    version, state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# --- model and optimizer state ------------------------------------------------------------------------
def gather_full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict as full CPU tensors on rank 0 (empty elsewhere); every rank must call it."""
    return get_model_state_dict(model, options=GATHER)


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def run_state_names(model: torch.nn.Module) -> set[str]:
    """What a checkpoint keeps of the model: the trained parameters and every persistent buffer (state a run may
    set without gradients, such as the projectors' input statistics); frozen parameters come from the recipe."""
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return trainable_names(model) | (set(model.state_dict()) - parameters)


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """{"state": {param: {name: value}}, "param_groups": [...]} -> (tensors, JSON-ready rest)."""
    tensors, scalars = {}, {}
    for param, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{name}"] = value
            else:
                scalars.setdefault(param, {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[str, dict] = {param: dict(values) for param, values in rest["scalars"].items()}
    for key, value in tensors.items():
        param, name = key.rsplit("/", 1)
        state.setdefault(param, {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


# --- save and load ----------------------------------------------------------------------------------
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
    """Write checkpoint-`step` atomically and return its path. Every rank must call it (the gather is collective).

    `model` is the unwrapped model (FSDP2 modules stay sharded; DDP's wrapper removed) and `optimizer` the
    torch optimizer. `total_limit` keeps that many of this run's checkpoints (same `run_id`); another run's
    are never touched.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    temporary = output_dir / f"checkpoint-{step}.tmp"
    names = run_state_names(model)
    weights = {k: v for k, v in gather_full_state(model).items() if k in names}
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=GATHER)
    if is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        save_file(weights, temporary / "model.safetensors")
        tensors, rest = _split_optimizer_state(optimizer_state)
        save_file(tensors, temporary / "optimizer.safetensors")
        write_json(temporary / "optimizer.json", rest)
        write_json(temporary / "scheduler.json", scheduler.state_dict())
        write_json(temporary / "trainer_state.json", trainer_state)
    wait_for_everyone()
    write_json(temporary / f"rng_state_{rank}.json", rng_state())
    wait_for_everyone()
    if is_main:
        files = {p.name: p.stat().st_size for p in sorted(temporary.iterdir())}
        write_json(temporary / "COMPLETE", {"step": step, "files": files})
        fsync_dir(temporary)
        if final.exists():  # re-saving a step (after a resume): drop the stale copy first
            shutil.rmtree(final)
        os.replace(temporary, final)
        fsync_dir(output_dir)
        if total_limit:
            own = [p for p in list_checkpoints(output_dir) if checkpoint_run_id(p) == trainer_state.get("run_id")]
            for old in own[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    wait_for_everyone()
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer, scheduler, rank: int = 0) -> tuple[dict, dict]:
    """Load weights, optimizer and scheduler; return (trainer_state, rng_state) — RNG is restored by the caller.

    Only safetensors and JSON are read, and every value is checked before anything is changed, so a
    crafted or damaged checkpoint is a ValueError naming its file. Every rank calls it with the
    unwrapped model and the torch optimizer.
    """
    path = Path(path)
    problem = checkpoint_problem(path) if (path / "COMPLETE").is_file() else "it has no COMPLETE marker"
    if problem:
        raise ValueError(f"{path} is not a complete checkpoint: {problem}")
    try:
        weights = load_file(path / "model.safetensors")
        optimizer_tensors = load_file(path / "optimizer.safetensors")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"Checkpoint {path} is unreadable: {error}") from error
    names = run_state_names(model)
    missing, unexpected = sorted(names - set(weights)), sorted(set(weights) - names)
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {path} does not match the model built from this recipe: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. Resume with the recipe that wrote it."
        )
    optimizer_rest = read_json(path / "optimizer.json")
    schedule = read_json(path / "scheduler.json")
    state = read_json(path / "trainer_state.json")
    rng_file = path / f"rng_state_{rank}.json"
    rng_file = rng_file if rng_file.exists() else path / "rng_state_0.json"
    rng = read_json(rng_file)
    check_trainer_state(state, path / "trainer_state.json")
    check_like(schedule, scheduler.state_dict(), str(path / "scheduler.json"))
    check_rng_state(rng, rng_file)
    if not isinstance(optimizer_rest, dict) or not isinstance(optimizer_rest.get("scalars"), dict):
        raise ValueError(f"Checkpoint file {path / 'optimizer.json'}: expected {{param_groups, scalars}}")
    groups = optimizer_rest.get("param_groups")
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if not isinstance(groups, list) or [len(g.get("params", ())) if isinstance(g, dict) else None for g in groups] != sizes:
        raise ValueError(
            f"Checkpoint {path}: the optimizer state does not fit this recipe's optimizer "
            f"(expected {len(sizes)} parameter groups of {sizes} parameters in optimizer.json)"
        )
    try:
        set_model_state_dict(model, weights, options=SCATTER)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"Checkpoint file {path / 'model.safetensors'} does not fit this recipe's model ({error})") from None
    try:
        set_optimizer_state_dict(model, optimizer, _join_optimizer_state(optimizer_tensors, optimizer_rest), options=SCATTER)
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as error:
        raise ValueError(f"Checkpoint {path}: the optimizer state does not fit this recipe's optimizer ({error!r})") from None
    for group in optimizer.param_groups:  # JSON has no tuples; Adam's betas were one
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    scheduler.load_state_dict(schedule)
    return state, rng


# --- checks of the JSON files (a crafted value must not reach torch as a surprise) ---------------------
def check_trainer_state(state, file: Path) -> None:
    counters = ("step", "epoch", "batch")
    if not isinstance(state, dict) or any(type(state.get(k)) is not int or state[k] < 0 for k in counters):
        raise ValueError(f"Checkpoint file {file}: expected non-negative integers {counters}")
    for key in ("log_history", "eval_history"):
        if not isinstance(state.get(key), list) or not all(isinstance(r, dict) for r in state[key]):
            raise ValueError(f"Checkpoint file {file}: {key} must be a list of records")
    if not isinstance(state.get("run_id", ""), (str, type(None))):
        raise ValueError(f"Checkpoint file {file}: run_id must be a string")


def check_like(saved, current, where: str) -> None:
    """`saved` has the structure and value kinds of `current` (a state dict of the same object, as JSON)."""
    current = json.loads(json.dumps(current))
    if isinstance(current, dict):
        if not isinstance(saved, dict) or set(saved) != set(current):
            raise ValueError(f"Checkpoint file {where}: expected the keys {sorted(current)}")
        for key in current:
            check_like(saved[key], current[key], f"{where}: {key}")
    elif isinstance(current, list):
        if not isinstance(saved, list) or len(saved) != len(current):
            raise ValueError(f"Checkpoint file {where}: expected a list of {len(current)}")
        for index, (a, b) in enumerate(zip(saved, current)):
            check_like(a, b, f"{where}[{index}]")
    elif isinstance(current, bool) or current is None or isinstance(current, str):
        if type(saved) is not type(current):
            raise ValueError(f"Checkpoint file {where}: expected {type(current).__name__}, got {saved!r}")
    elif isinstance(current, (int, float)):
        if isinstance(saved, bool) or not isinstance(saved, (int, float)) or not math.isfinite(saved):
            raise ValueError(f"Checkpoint file {where}: expected a number, got {saved!r}")


def check_rng_state(rng, file: Path) -> None:
    """Try the states (then put the current ones back): a malformed one is a ValueError, not a torch error."""
    current = rng_state()
    try:
        set_rng_state(rng)
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError, OverflowError) as error:
        raise ValueError(f"Checkpoint file {file}: not a generator state ({error!r})") from None
    finally:
        set_rng_state(current)
