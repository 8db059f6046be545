"""FSDP2 checkpoints: a 2-process `fully_shard` run (gloo, CPU) equals the 1-process run and resumes exactly;
the trainer (full training and LoRA) likewise, and LoRA's export merges the adapter from the gathered state dict.

Accelerate 1.15 cannot start FSDP on CPU (`AcceleratorState` only turns a run into FSDP for accelerator
device types; with `cpu=True` it is MULTI_CPU, the plugin is dropped and `prepare` wraps the model in
DDP), so this test shards with torch's `fully_shard` directly and drives the trainer's checkpoint
functions, which see the same DTensor parameters and optimizer state that Accelerate's FSDP2 gives.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

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


TRAIN_UNDER_FSDP2 = r'''
import os, sys
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from modeling_multimodal.cli import main
from modeling_multimodal.training.trainer import Trainer

original_init = Accelerator.__init__


def init(self, *args, **kwargs):  # what `accelerate launch --config_file examples/accelerate/fsdp.yaml` selects on GPUs
    original_init(self, *args, **kwargs)
    if self.num_processes > 1 and os.environ["SHARDING"] == "fsdp":  # else DDP, as torchrun gives
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer", "CLIPEncoderLayer", "WhisperEncoderLayer"],
        )


original_step, calls = Trainer._step, [0]


def step_or_die(self, window, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ.get("KILL_DURING_STEP", "0")):
        os._exit(3)
    return original_step(self, window, **kwargs)


Accelerator.__init__, Trainer._step = init, step_or_die
sys.exit(main(["train", *sys.argv[1:]]))
'''


# (stage, what shards the 2-process run): full training and LoRA under FSDP2, LoRA under DDP
TRAINER_CASES = [("full", "fsdp"), ("finetune", "fsdp"), ("finetune", "ddp")]


@pytest.mark.slow
@pytest.mark.parametrize("stage, sharding", TRAINER_CASES)
def test_trainer_on_two_processes_equals_one_process_and_resumes_exactly(tmp_path, stage, sharding):
    """The trainer on 2 CPU processes (Accelerate's FSDP2 with per-layer fully_shard, or DDP), evaluating data.eval
    on every rank: same losses, scores and final weights (and LoRA adapter) as 1 process; killed during step 4 and
    resumed from checkpoint-2: the same again.

    One stand-in, in this test's launcher: Accelerate picks FSDP only for accelerator devices, so the
    launcher sets it as `accelerate launch` would on GPUs.
    """
    from modeling_multimodal.demo_data import make_demo_data

    data = tmp_path / "data"
    make_demo_data(data, seed=0, sizes={"image": {"train": 4, "validation": 3, "test": 1}, "video": {"train": 1, "validation": 1, "test": 1}, "speech": {"train": 1, "validation": 1, "test": 1}})
    script = tmp_path / "train_under_fsdp2.py"
    script.write_text(TRAIN_UNDER_FSDP2)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_test.yaml"
    common = [
        "--recipe", str(recipe), f"data.root={data}", "data.train=[{manifest: image_train.jsonl, task: image_caption}]",
        "data.eval=[{manifest: image_validation.jsonl, task: image_caption}]", "eval_steps=2",
        "optim.batch_size=2", "optim.max_steps=5", "report=false", "save_steps=2", f"stage={stage}",
    ]

    def run(out, *extra, processes=2, kill=0):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] if processes == 2 else [sys.executable]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KILL_DURING_STEP": str(kill), "SHARDING": sharding}
        return subprocess.run([*launcher, str(script), *common, f"output_dir={tmp_path / out}", *extra], env=env, capture_output=True, text=True, timeout=600)

    for out, processes in (("one", 1), ("two", 2)):
        done = run(out, processes=processes)
        assert done.returncode == 0, done.stderr[-3000:]
    if sharding == "fsdp":
        assert "FSDPTrainingObjective" in done.stderr  # FSDP2 wrapped the objective (its warning names the class)
    assert run("resumed", kill=4).returncode != 0
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-2"]
    if stage == "finetune":  # the checkpoint holds what trains: the adapter, projectors and heads, no frozen LM weight
        saved = set(load_file(tmp_path / "resumed" / "checkpoint-2" / "model.safetensors"))
        assert any(".lora_A." in k for k in saved) and any(".modules_to_save." in k for k in saved)
        assert not any(".base_layer." in k or "embed_tokens" in k for k in saved), sorted(saved)[:5]
    done = run("resumed", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    histories = {name: json.loads((tmp_path / name / "log_history.json").read_text()) for name in ("one", "two", "resumed")}
    for name, tolerance in (("two", 1e-5), ("resumed", 1e-6)):
        reference = histories["one" if name == "two" else "two"]
        assert [r["step"] for r in histories[name]["train"]] == [1, 2, 3, 4, 5]
        for a, b in zip(reference["train"], histories[name]["train"]):
            assert b["loss"] == pytest.approx(a["loss"], rel=tolerance, abs=tolerance), (name, a, b)
        assert [r["step"] for r in histories[name]["eval"]] == [2, 4, 5]  # every rank scored its share of data.eval
        for a, b in zip(reference["eval"], histories[name]["eval"]):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-4), (name, a, b)
    files = ["model.safetensors"] + (["adapter/adapter_model.safetensors"] if stage == "finetune" else [])
    for file in files:
        weights = {name: load_file(tmp_path / name / "final" / file) for name in ("one", "two", "resumed")}
        assert set(weights["two"]) == set(weights["one"])  # full tensors under the model's names, not rank 0's shards
        for key, value in weights["one"].items():
            assert weights["two"][key].shape == value.shape, key
            torch.testing.assert_close(weights["two"][key], value, rtol=1e-4, atol=1e-4, msg=f"{file} {key}")
            torch.testing.assert_close(weights["resumed"][key], weights["two"][key], rtol=0, atol=1e-6, msg=f"{file} {key}")


def test_merged_lora_state_equals_peft_merge_and_unload(tmp_path):
    """The export's merge on a (gathered) state dict gives PEFT's `merge_and_unload` weights under the same names,
    and final/ saved from it loads as the merged model."""
    import types

    from modeling_multimodal import MultimodalForConditionalGeneration
    from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer
    from modeling_multimodal.training.export import merged_lora_state
    from modeling_multimodal.training.recipe import LoraSpec
    from modeling_multimodal.training.stages import apply_stage

    torch.manual_seed(0)
    model = apply_stage(
        MultimodalForConditionalGeneration(tiny_config(tiny_tokenizer())),
        types.SimpleNamespace(stage="finetune", lora=LoraSpec(r=4, alpha=8), mixed_precision="no"),
    )
    for param in model.parameters():
        if param.requires_grad:  # LoRA's B starts at zero, which would make any merge look right
            torch.nn.init.normal_(param, std=0.1)
    merged = merged_lora_state(model, model.state_dict())
    model.get_base_model().save_pretrained(tmp_path, state_dict=dict(merged))  # (save_pretrained empties the dict it writes)
    reference = model.merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-6, msg=key)
    loaded = MultimodalForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)
