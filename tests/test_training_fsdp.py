"""FSDP2 checkpoints: a 2-process `fully_shard` run (gloo, CPU) equals the 1-process run and resumes exactly.

Accelerate 1.15 cannot start FSDP on CPU (`AcceleratorState` only turns a run into FSDP for accelerator
device types; with `cpu=True` it is MULTI_CPU, the plugin is dropped and `prepare` wraps the model in
DDP), so this test shards with torch's `fully_shard` directly and drives the trainer's checkpoint
functions, which see the same DTensor parameters and optimizer state that Accelerate's FSDP2 gives.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = r'''
import json, os, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import get_cosine_schedule_with_warmup
from modeling_multimodal.training.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state

out, stop, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"
distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 15), torch.nn.Tanh(), torch.nn.Linear(15, 3)
)
model[0].requires_grad_(False)  # frozen: not in the checkpoint
if distributed:
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[2], model[4]):
        fully_shard(layer, mesh=mesh)  # 15 rows over 2 ranks: uneven shards
    fully_shard(model, mesh=mesh)
optimizer = torch.optim.AdamW([{"params": model[2].parameters(), "lr": 0.02}, {"params": model[4].parameters(), "lr": 0.05}])
scheduler = get_cosine_schedule_with_warmup(optimizer, 1, 6)
data = torch.Generator().manual_seed(1)
batches = [(torch.randn(8, 6, generator=data), torch.randn(8, 3, generator=data)) for _ in range(6)]
barrier = dist.barrier if distributed else (lambda: None)
start, losses = 0, []
if resume:
    state, rng = load_checkpoint(latest_checkpoint(out), model, optimizer, scheduler, rank)
    start, losses = state["step"], state["losses"]
    set_rng_state(rng)
for step in range(start, stop):
    x, y = (t.chunk(world)[rank] for t in batches[step])
    loss = (model(x) - y).square().mean()
    loss.backward()
    optimizer.step(); scheduler.step(); optimizer.zero_grad()
    total = loss.detach().clone()
    if distributed:
        dist.all_reduce(total)
    losses.append(total.item() / world)
state = {"step": stop, "epoch": 0, "batch": stop, "run_id": "fsdp", "losses": losses, "log_history": [], "eval_history": []}
save_checkpoint(out, stop, model, optimizer, scheduler, state, rank=rank, is_main=rank == 0, wait_for_everyone=barrier)
if distributed:
    dist.destroy_process_group()
'''


@pytest.mark.slow
def test_fsdp2_two_processes_checkpoint_is_complete_and_resumes_exactly(tmp_path):
    script = tmp_path / "fsdp_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, stop, mode="fresh", processes=2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
        done = subprocess.run([*launcher, str(script), str(tmp_path / out), str(stop), mode], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return tmp_path / out / f"checkpoint-{stop}"

    one = run("one", 6, processes=1)
    two = run("two", 6)
    run("resumed", 3)
    resumed = run("resumed", 6, "resume")
    states = {name: json.loads((path / "trainer_state.json").read_text()) for name, path in (("one", one), ("two", two), ("resumed", resumed))}
    assert states["two"]["losses"] == pytest.approx(states["one"]["losses"], rel=1e-5, abs=1e-6)
    assert states["resumed"]["losses"] == pytest.approx(states["two"]["losses"], rel=1e-6, abs=1e-7)
    for file in ("model.safetensors", "optimizer.safetensors"):
        reference, sharded, restarted = (load_file(path / file) for path in (one, two, resumed))
        assert set(sharded) == set(reference)  # every shard gathered: full tensors under module names
        if file == "model.safetensors":
            assert set(sharded) == {"2.weight", "2.bias", "4.weight", "4.bias"} and sharded["2.weight"].shape == (15, 16)
        for key in reference:
            torch.testing.assert_close(sharded[key], reference[key], rtol=1e-4, atol=1e-5, msg=f"{file} {key}")
            torch.testing.assert_close(restarted[key], sharded[key], rtol=0, atol=1e-7, msg=f"{file} {key}")
