"""Checkpoints and output folders: nothing unpickled, exact round trips, torn writes, one run per folder."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from modeling_multimodal.training import checkpointing
from modeling_multimodal.training.checkpointing import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from modeling_multimodal.training.run_folder import RunLock, prepare_output_dir


def tiny_run(seed=0):
    """A model with a frozen part, its AdamW (two groups) and cosine schedule, after two steps."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([{"params": [model[2].weight], "lr": 0.01}, {"params": [model[2].bias], "lr": 0.1}], betas=(0.8, 0.9))
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, 10)
    for _ in range(2):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    return model, optimizer, scheduler


def save(output_dir, step, run_id="run-a", total_limit=None):
    model, optimizer, scheduler = tiny_run()
    state = {"step": step, "epoch": 0, "batch": step, "run_id": run_id, "log_history": [], "eval_history": []}
    return save_checkpoint(output_dir, step, model, optimizer, scheduler, state, total_limit=total_limit)


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, optimizer, scheduler = tiny_run()
    state = {"step": 2, "epoch": 1, "batch": 3, "run_id": "r", "log_history": [{"loss": 1.0}], "eval_history": []}
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, state)
    expected_draw = torch.rand(3)
    assert sorted(p.name for p in path.iterdir()) == [
        "COMPLETE", "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng_state_0.json", "scheduler.json", "trainer_state.json",
    ]
    fresh_model, fresh_optimizer, fresh_scheduler = tiny_run(seed=1)
    loaded_state, rng = load_checkpoint(path, fresh_model, fresh_optimizer, fresh_scheduler)
    assert loaded_state == state
    checkpointing.set_rng_state(rng)
    torch.testing.assert_close(torch.rand(3), expected_draw, rtol=0, atol=0)
    torch.testing.assert_close(fresh_model[2].weight, model[2].weight, rtol=0, atol=0)
    assert not torch.equal(fresh_model[0].weight, model[0].weight)  # frozen weights are not stored
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    ours, theirs = fresh_optimizer.state_dict(), optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for index, values in theirs["state"].items():
        for name, value in values.items():
            torch.testing.assert_close(ours["state"][index][name], value, rtol=0, atol=0)


class Payload:
    """Unpickling this creates the marker file: what a crafted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, name, marker):
    """Replace (or add) `name` in a checkpoint with a pickle payload, and fix COMPLETE's sizes to match."""
    torch.save(Payload(marker), path / name)
    manifest = json.loads((path / "COMPLETE").read_text())
    if name in manifest["files"]:
        manifest["files"][name] = (path / name).stat().st_size
        (path / "COMPLETE").write_text(json.dumps(manifest))


PAYLOAD_CASES = [
    # (file replaced by a pickle payload, error fragment; None: a file we never read, resume ignores it)
    ("optimizer.safetensors", "is not a valid safetensors file"),
    ("model.safetensors", "is not a valid safetensors file"),
    ("optimizer.json", "optimizer.json is unreadable"),
    ("scheduler.json", "scheduler.json is unreadable"),
    ("rng_state_0.json", "rng_state_0.json is unreadable"),
    ("trainer_state.json", "trainer_state.json is unreadable"),
    ("optimizer.pt", None),  # the old format's names, Accelerate's names: never loaded
    ("scheduler.pt", None),
    ("rng_state_0.pt", None),
    ("optimizer.bin", None),
    ("random_states_0.pkl", None),
    ("custom_checkpoint_0.pkl", None),
]


def test_payload_is_live(tmp_path):
    """The payload really runs when unpickled (so the cases below test something)."""
    torch.save(Payload(tmp_path / "ran"), tmp_path / "payload.pt")
    torch.load(tmp_path / "payload.pt", weights_only=False)
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("name,fragment", PAYLOAD_CASES, ids=[c[0] for c in PAYLOAD_CASES])
def test_pickle_payload_in_a_checkpoint_never_runs(tmp_path, name, fragment):
    path = save(tmp_path / "run", 2)
    marker = tmp_path / "payload_ran"
    plant(path, name, marker)
    model, optimizer, scheduler = tiny_run(seed=1)
    if fragment is None:
        state, _ = load_checkpoint(path, model, optimizer, scheduler)
        assert state["step"] == 2
    else:
        with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
            load_checkpoint(path, model, optimizer, scheduler)
    assert not marker.exists()


def test_torn_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    save(tmp_path, 2)
    torn = save(tmp_path, 4)
    (torn / "model.safetensors").write_bytes(b"")  # e.g. a crash before the data reached the disk
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert "checkpoint-4" in caplog.text and "model.safetensors has 0 bytes" in caplog.text
    (tmp_path / "checkpoint-2" / "optimizer.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}")  # wrong size too
    assert latest_checkpoint(tmp_path) is None


def test_interrupted_write_is_never_listed(tmp_path, monkeypatch):
    save(tmp_path, 2)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing, "write_json", disk_full)
    with pytest.raises(OSError):
        save(tmp_path, 4)
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"] and (tmp_path / "checkpoint-4.tmp").is_dir()


def test_pruning_only_touches_this_runs_checkpoints(tmp_path):
    save(tmp_path, 1, run_id="other")
    for step in (2, 3, 4):
        save(tmp_path, step, run_id="mine", total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]


# --- output folders ------------------------------------------------------------------------------------
def test_second_run_on_a_folder_fails_at_once_naming_folder_and_pid(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(ValueError, match=rf"output_dir {tmp_path} is in use by another training run \(pid {os.getpid()}\)"):
            RunLock(tmp_path)
    RunLock(tmp_path).release()  # released: free again


def test_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from modeling_multimodal.training.run_folder import RunLock; lock = RunLock({str(tmp_path)!r}); print('held', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"pid {holder.pid}"):
            RunLock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the lock when the process dies; no stale lock file to clean
        try:
            RunLock(tmp_path).release()
            break
        except ValueError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


FOLDER_CASES = [
    # (checkpoints present, resume, overwrite, expected: error fragment or "fresh" / "resume")
    ([], False, False, "fresh"),
    ([], True, False, "holds no complete checkpoint to resume from"),
    (["checkpoint-2"], False, False, "holds another run's checkpoints (checkpoint-2): pass --resume"),
    (["checkpoint-2.tmp"], False, False, "holds another run's checkpoints (checkpoint-2.tmp)"),
    (["checkpoint-2"], True, False, "resume"),
    (["checkpoint-2"], False, True, "fresh"),
    (["checkpoint-2.tmp"], True, False, "holds no complete checkpoint"),
]


@pytest.mark.parametrize("present,resume,overwrite,expected", FOLDER_CASES)
def test_output_folder_rules(tmp_path, present, resume, overwrite, expected):
    for name in present:
        path = save(tmp_path, 2)
        if name.endswith(".tmp"):
            (path / "COMPLETE").unlink()
            path.rename(tmp_path / name)
    (tmp_path / "final").mkdir()
    if expected in ("fresh", "resume"):
        checkpoint = prepare_output_dir(tmp_path, resume, overwrite)
        assert checkpoint == (tmp_path / "checkpoint-2" if expected == "resume" else None)
        if overwrite:  # the previous run's checkpoints and outputs are gone
            assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "final").exists()
    else:
        with pytest.raises(ValueError) as error:
            prepare_output_dir(tmp_path, resume, overwrite)
        assert expected in str(error.value) and str(tmp_path) in str(error.value)
        shutil.rmtree(tmp_path / "final")


def edit_json(path, name, change):
    value = json.loads((path / name).read_text())
    change(value)
    (path / name).write_text(json.dumps(value))
    manifest = json.loads((path / "COMPLETE").read_text())
    manifest["files"][name] = (path / name).stat().st_size
    (path / "COMPLETE").write_text(json.dumps(manifest))


DAMAGED_CASES = [
    # (file, change to its JSON, error fragment): valid JSON, wrong content
    ("trainer_state.json", lambda v: v.update(step="2"), "expected non-negative integers"),
    ("trainer_state.json", lambda v: v.update(batch=-1), "expected non-negative integers"),
    ("trainer_state.json", lambda v: v.update(log_history={"a": 1}), "log_history must be a list of records"),
    ("scheduler.json", lambda v: v.update(base_lrs="abc"), "scheduler.json: base_lrs: expected a list of 2"),
    ("scheduler.json", lambda v: v.update(last_epoch=float("nan")), "last_epoch: expected a number"),
    ("scheduler.json", lambda v: v.update(extra=1), "scheduler.json: expected the keys"),
    ("rng_state_0.json", lambda v: v.update(torch=[1, 2, 3]), "rng_state_0.json: not a generator state"),
    ("rng_state_0.json", lambda v: v.update(numpy="x"), "rng_state_0.json: not a generator state"),
    ("optimizer.json", lambda v: v["param_groups"].pop(), "the optimizer state does not fit"),
    ("optimizer.json", lambda v: v.update(scalars=[]), "expected {param_groups, scalars}"),
]


@pytest.mark.parametrize("name,change,fragment", DAMAGED_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(DAMAGED_CASES)])
def test_damaged_checkpoint_content_is_a_clear_error(tmp_path, name, change, fragment):
    path = save(tmp_path, 2)
    edit_json(path, name, change)
    model, optimizer, scheduler = tiny_run(seed=1)
    before = torch.get_rng_state()
    with pytest.raises(ValueError) as error:
        load_checkpoint(path, model, optimizer, scheduler)
    assert fragment in str(error.value), error.value
    assert torch.equal(torch.get_rng_state(), before)


def test_weights_of_the_wrong_shape_are_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = save(tmp_path, 2)
    save_file({"2.weight": torch.zeros(3, 9), "2.bias": torch.zeros(3)}, path / "model.safetensors")
    manifest = json.loads((path / "COMPLETE").read_text())
    manifest["files"]["model.safetensors"] = (path / "model.safetensors").stat().st_size
    (path / "COMPLETE").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="model.safetensors does not fit this recipe's model"):
        load_checkpoint(path, *tiny_run(seed=1))
