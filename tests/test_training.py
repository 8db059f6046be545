"""The trainer: stages, LoRA with projectors, loss falls, exact resume, atomic checkpoints, 2 processes = 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.demo_data import make_demo_data
from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer
from modeling_multimodal.training import checkpointing
from modeling_multimodal.training.checkpointing import list_checkpoints
from modeling_multimodal.training.recipe import load_recipe
from modeling_multimodal.training.stages import apply_stage, base_model
from modeling_multimodal.training.mixture import ExampleCache, load_rows
from modeling_multimodal.training.model_builder import build_model_and_processor
from modeling_multimodal.training.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_test.yaml"
SIZES = {
    "image": {"train": 24, "validation": 8, "test": 8},
    "video": {"train": 8, "validation": 2, "test": 2},
    "speech": {"train": 8, "validation": 4, "test": 4},
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_data")
    make_demo_data(root, seed=0, sizes=SIZES)
    return root


def recipe(data_root, output_dir, *overrides):
    return load_recipe(RECIPE, [f"data.root={data_root}", f"output_dir={output_dir}", "report=false", *overrides])


def history(output_dir):
    return json.loads((Path(output_dir) / "log_history.json").read_text())["train"]


# --- stages ---------------------------------------------------------------------------------------
STAGE_CASES = [
    # (stage, lora.encoders, trained prefixes (after PEFT's base_model.model.), must stay frozen)
    ("encoders", False, {"model.multi_modal_projector", "auxiliary_heads", "model.vision_tower", "model.audio_tower"}, {"model.language_model", "retrieval_head", "lm_head"}),
    ("align", False, {"model.multi_modal_projector", "auxiliary_heads", "retrieval_head"}, {"model.language_model", "model.vision_tower", "model.audio_tower", "lm_head"}),
    ("finetune", False, {"model.multi_modal_projector", "auxiliary_heads", "retrieval_head", "model.language_model"}, {"model.vision_tower", "model.audio_tower", "lm_head"}),
    ("finetune", True, {"model.multi_modal_projector", "auxiliary_heads", "retrieval_head", "model.language_model", "model.vision_tower", "model.audio_tower"}, {"lm_head"}),
    ("full", False, {"model.multi_modal_projector", "auxiliary_heads", "retrieval_head", "model.language_model", "lm_head"}, {"model.vision_tower", "model.audio_tower"}),
]


@pytest.mark.parametrize("stage,encoders,trained,frozen", STAGE_CASES, ids=[f"{c[0]}-encoders{c[1]}" for c in STAGE_CASES])
def test_each_stage_trains_exactly_the_intended_parameters(stage, encoders, trained, frozen):
    torch.manual_seed(0)
    config = tiny_config(tiny_tokenizer(), auxiliary_loss_weight=0.5, contrastive_loss_weight=0.5, freeze_vision_tower=False, freeze_audio_tower=False)
    if stage != "encoders":  # the other stages keep the towers the config freezes frozen
        config = tiny_config(tiny_tokenizer(), auxiliary_loss_weight=0.5, contrastive_loss_weight=0.5)  # α > 0: the retrieval head exists
    model = MultimodalForConditionalGeneration(config)
    values = {"model": {"config": {}}, "data": {"train": [{"manifest": "x"}]}, "stage": stage, "lora": {"encoders": encoders}}
    trainable = apply_stage(model, load_recipe(values=values))
    names = [n.removeprefix("base_model.model.") for n, p in trainable.named_parameters() if p.requires_grad]
    prefixes = {next(p for p in sorted(trained | frozen, key=len, reverse=True) if n.startswith(p)) for n in names}
    assert prefixes == trained
    if stage == "finetune":  # LoRA layers only inside the LM (and the towers when asked); never a full LM weight
        lm_names = [n for n in names if n.startswith(("model.language_model", "model.vision_tower", "model.audio_tower"))]
        assert lm_names and all("lora_" in n for n in lm_names)
        assert all(".modules_to_save." in n for n in names if n.startswith(("model.multi_modal_projector", "auxiliary_heads", "retrieval_head")))


def test_lora_adapter_carries_the_projectors(tmp_path):
    """The projector weights trained with LoRA are saved with the adapter and restored by PeftModel."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    base = MultimodalForConditionalGeneration(tiny_config(tokenizer, audio=False, video=False))
    base.save_pretrained(tmp_path / "base")
    peft_model = apply_stage(base, load_recipe(values={"model": {"config": {}}, "data": {"train": [{"manifest": "x"}]}, "stage": "finetune"}))
    with torch.no_grad():  # stand-in for training: move every trainable weight
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("multi_modal_projector.image" in k for k in saved) and any("lora_A" in k for k in saved)
    input_ids = torch.tensor([[tokenizer.bos_token_id] + [base.config.image_token_id] * 16 + [7, 8, 9]])
    pixel_values = torch.randn(1, 3, 32, 32)
    expected = peft_model.eval()(input_ids=input_ids, pixel_values=pixel_values).logits
    fresh = MultimodalForConditionalGeneration.from_pretrained(tmp_path / "base")
    restored = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    torch.testing.assert_close(restored(input_ids=input_ids, pixel_values=pixel_values).logits, expected, rtol=0, atol=1e-6)


def test_encoders_stage_trains_the_towers_on_l_other_without_running_the_lm(data_root, tmp_path):
    run = recipe(
        data_root, tmp_path, "stage=encoders", "data.eval=[]", "optim.max_steps=6", "auxiliary_loss_weight=1.0",
        "contrastive_loss_weight=0.5", "model.config.auxiliary_tasks=[audio_ctc, media_bow]",
        "model.config.freeze_vision_tower=false", "model.config.freeze_audio_tower=false", "optim.lr_encoder=0.01",
    )
    trainer = Trainer(run)
    model = trainer.model
    lm_calls = []
    model.model.language_model.register_forward_hook(lambda *a: lm_calls.append(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    records = history(tmp_path)
    assert all(r["loss_text"] is None and r["loss_contrastive"] is None for r in records)
    assert all(r["loss_auxiliary"] is not None and r["loss_auxiliary"] > 0 for r in records)
    assert not lm_calls  # not even for L_contrastive's text pass
    changed = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"model.vision_tower", "model.audio_tower", "model.multi_modal_projector"} <= changed
    assert not any(n.startswith(("model.language_model", "lm_head", "retrieval_head")) for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    with pytest.raises(ValueError, match="stage=encoders trains on L_auxiliary alone"):
        Trainer(recipe(data_root, tmp_path / "again", "stage=encoders", "auxiliary_loss_weight=0"))


def test_chained_stages_in_one_process_decode_each_example_once(data_root, tmp_path, monkeypatch):
    from modeling_multimodal.data import ExampleEncoder

    calls = []
    original = ExampleEncoder.__call__
    monkeypatch.setattr(ExampleEncoder, "__call__", lambda self, row: calls.append(row["id"]) or original(self, row))
    common = ["data.cache_in_memory=true", "data.eval=[]", "optim.max_steps=12"]  # 40 samples, batch 4: > 1 epoch
    cache = ExampleCache()  # what train() gives every stage of a chain, and the demo all its runs
    first = Trainer(recipe(data_root, tmp_path / "a", *common), cache).train()
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 40
    Trainer(recipe(data_root, tmp_path / "b", *common, "stage=align", f"init_from={first['final_dir']}"), cache).train()
    assert len(calls) == 40  # same rows, task and (reloaded) processor: nothing decoded again
    Trainer(recipe(data_root, tmp_path / "c", *common, "data.max_length=400"), cache).train()
    assert len(calls) == 80  # another encoding: decoded afresh
    Trainer(recipe(data_root, tmp_path / "d", *common)).train()
    assert len(calls) == 120  # a run given no cache keeps its own: nothing global is shared


def test_repeat_weights_a_task_in_the_mixture_and_decodes_each_row_once(data_root, tmp_path, monkeypatch):
    from collections import Counter

    from modeling_multimodal.data import ExampleEncoder

    calls = []
    original = ExampleEncoder.__call__
    monkeypatch.setattr(ExampleEncoder, "__call__", lambda self, row: calls.append(row["id"]) or original(self, row))
    train = "data.train=[{manifest: image_train.jsonl, task: image_caption, repeat: 3}, {manifest: speech_train.jsonl, task: speech_transcription}]"
    trainer = Trainer(recipe(data_root, tmp_path, train, "data.cache_in_memory=true", "data.eval=[]", "optim.max_steps=20"))
    trainer.train()  # 24 images x 3 + 8 clips = 80 samples = one epoch of 20 batches of 4
    epoch = [index for batch in trainer.batch_sampler for index in batch]
    assert len(epoch) == 80
    assert Counter(index % 24 for index in epoch if index < 72) == {row: 3 for row in range(24)}
    assert len(calls) == 32 and len(set(calls)) == 32  # every row decoded once, its repeats come from the cache
    with pytest.raises(ValueError, match="repeat must be an integer >= 1"):
        Trainer(recipe(data_root, tmp_path / "bad", train.replace("repeat: 3", "repeat: 0")))
    with pytest.raises(ValueError, match="repeat is for data.train only"):
        Trainer(recipe(data_root, tmp_path / "bad_eval", "data.eval=[{manifest: image_train.jsonl, task: image_caption, repeat: 2}]"))


# --- runs -----------------------------------------------------------------------------------------
def test_loss_falls_clearly_on_a_small_task(data_root, tmp_path):
    run = recipe(
        data_root, tmp_path, "data.train=[{manifest: image_train.jsonl, task: image_caption}]", "data.eval=[]",
        "optim.max_steps=30", "optim.batch_size=8", "contrastive_loss_weight=0", "auxiliary_loss_weight=0",
        "optim.lr_lm=0.01", "optim.lr_projector=0.01",
    )
    result = Trainer(run).train()
    losses = [record["loss_text"] for record in history(tmp_path)]
    assert sum(losses[-5:]) / 5 < 0.4 * sum(losses[:3]) / 3, losses
    final = MultimodalForConditionalGeneration.from_pretrained(result["final_dir"])
    assert final.config.image_token_id is not None


def test_contrastive_every_n_steps_takes_l_contrastive_on_those_steps_only(data_root, tmp_path):
    run = recipe(
        data_root, tmp_path, "data.train=[{manifest: image_train.jsonl, task: image_caption}]", "data.eval=[]",
        "optim.max_steps=4", "contrastive_loss_weight=0.5", "auxiliary_loss_weight=0", "contrastive_every_n_steps=2",
    )
    Trainer(run).train()
    records = history(tmp_path)
    assert [record["loss_contrastive"] is not None for record in records] == [False, True, False, True]
    for record in records:  # the total is L_text alone on the other steps
        expected = record["loss_text"] + 0.5 * (record["loss_contrastive"] or 0.0)
        assert record["loss"] == pytest.approx(expected)


def test_training_writes_logs_checkpoints_and_report(data_root, tmp_path):
    run = recipe(data_root, tmp_path, "report=true", "save_steps=2", "eval_steps=3", "optim.max_steps=4", "save_total_limit=1")
    result = Trainer(run).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4"]  # the last step is saved too (a later run can extend it)
    lines = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss_text" in line for line in lines) and any("eval/image_caption/exact_match" in line for line in lines)
    assert list((tmp_path / "logs" / "train").rglob("events.out.tfevents.*"))
    assert (tmp_path / "report.png").stat().st_size > 10_000
    scores = result["scores"]
    assert {"image_caption/exact_match", "image_caption/bleu", "image_caption/text_to_media_recall@1", "speech_transcription/wer"} <= set(scores)
    assert (tmp_path / "final" / "processor_config.json").exists() and (tmp_path / "final" / "model.safetensors").exists()


KEY_CASES = [("full", "model.language_model."), ("finetune", "base_model.model.model.language_model.")]


@pytest.mark.parametrize("stage,lm_prefix", KEY_CASES, ids=[c[0] for c in KEY_CASES])
def test_checkpoints_and_exports_are_keyed_by_the_models_own_names(data_root, tmp_path, stage, lm_prefix):
    """The trainer wraps the model in its TrainingObjective; what it saves stays keyed as the model (or PeftModel)
    names its parameters, so checkpoints written before the wrapper existed still resume."""
    run = recipe(data_root, tmp_path, f"stage={stage}", "save_steps=2", "optim.max_steps=2", "data.eval=[]")
    Trainer(run).train()
    reference = apply_stage(build_model_and_processor(run, load_rows(run, run.data.train))[0], run)
    trainable = {name for name, param in reference.named_parameters() if param.requires_grad}
    saved = set(load_file(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert saved == trainable and any(name.startswith(lm_prefix) for name in saved)
    optimizer = json.loads((tmp_path / "checkpoint-2" / "optimizer.json").read_text())
    assert {name for group in optimizer["param_groups"] for name in group["params"]} == trainable
    exported = set(load_file(tmp_path / "final" / "model.safetensors"))
    assert exported == set(MultimodalForConditionalGeneration(base_model(reference).config).state_dict())


def test_resume_continues_exactly(data_root, tmp_path, monkeypatch):
    """Killed after step 5 with checkpoints at 2 and 4; the resumed run's losses and weights equal an uninterrupted run."""
    overrides = ["optim.max_steps=7", "save_steps=2", "data.eval=[]", "model.config.text_config.attention_dropout=0.2", "model.config.audio_config.dropout=0.2"]
    Trainer(recipe(data_root, tmp_path / "straight", *overrides)).train()

    calls = {"n": 0}
    original = Trainer._step

    def dying_step(self, window, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("killed")
        return original(self, window, **kwargs)

    monkeypatch.setattr(Trainer, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        Trainer(recipe(data_root, tmp_path / "resumed", *overrides)).train()
    monkeypatch.setattr(Trainer, "_step", original)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["checkpoint-2", "checkpoint-4"]
    Trainer(recipe(data_root, tmp_path / "resumed", *overrides, "resume=true")).train()

    straight, resumed = history(tmp_path / "straight"), history(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 8))
    logged = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(logged) and len([s for s in logged if s == 5]) == len([s for s in logged if s == 3])  # no step twice
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6), (a, b)
    weights_a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    weights_b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=1e-6, msg=name)


def test_kill_during_checkpoint_write_keeps_the_previous_one(data_root, tmp_path, monkeypatch):
    original = checkpointing.save_file

    def failing_save(tensors, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            original(tensors, path, *args, **kwargs)
            raise OSError("disk full while writing checkpoint-4")
        return original(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "save_file", failing_save)
    with pytest.raises(OSError):
        Trainer(recipe(data_root, tmp_path, "optim.max_steps=6", "save_steps=2", "data.eval=[]")).train()
    monkeypatch.setattr(checkpointing, "save_file", original)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-4.tmp").exists()  # the half-written one is never taken for a checkpoint
    result = Trainer(recipe(data_root, tmp_path, "optim.max_steps=6", "save_steps=2", "data.eval=[]", "resume=true")).train()
    assert result["steps"] == 6 and [r["step"] for r in history(tmp_path)] == list(range(1, 7))


def test_two_processes_equal_one_process(data_root, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): the same global batch gives the same losses and final weights."""
    common = [f"data.root={data_root}", "data.eval=[]", "report=false", "optim.max_steps=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = [sys.executable, "-m", "modeling_multimodal.train", "--recipe", str(RECIPE), *common, f"output_dir={tmp_path / 'one'}"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "modeling_multimodal.train",
           "--recipe", str(RECIPE), *common, f"output_dir={tmp_path / 'two'}"]
    for command in (one, two):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp_path / "two" / "logs" / "config.json").read_text())
    assert config["optim.batch_size"] == 4
    a, b = history(tmp_path / "one"), history(tmp_path / "two")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for key in ("loss", "loss_text", "loss_auxiliary", "loss_contrastive", "tokens"):
            if x[key] is None or y[key] is None:  # a term no batch of the step had (e.g. CTC without audio)
                assert x[key] is None and y[key] is None, (key, x, y)
            else:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-5), (key, x, y)
    weights_a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    weights_b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    # Adam divides by the gradient's running scale, so an entry whose gradient is near zero moves by an amount
    # that float summation order decides (measured: one CTC class row, 5e-5 apart; lr 3e-3). Losses match to 1e-5.
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-4, atol=1e-4, msg=name)


RECIPE_ERRORS = [
    (["stage=pretrain"], "stage='pretrain'"),
    (["optim.lr=1"], "Unknown recipe key(s) ['lr'] in optim"),
    (["colour=red"], "Unknown recipe key(s) ['colour']"),
    (["model.checkpoint=some/dir"], "exactly one of checkpoint / components / config"),
    (["mixed_precision=fp8"], "mixed_precision='fp8'"),
    (["data.train=[]"], "data.train is empty"),
    (["stage"], "must look like key.sub=value"),
    (["contrastive_every_n_steps=0"], "contrastive_every_n_steps"),
]


@pytest.mark.parametrize("overrides,fragment", RECIPE_ERRORS, ids=[o[0] for o, _ in RECIPE_ERRORS])
def test_recipe_errors_name_the_problem(overrides, fragment):
    with pytest.raises(ValueError) as error:
        load_recipe(RECIPE, overrides)
    assert fragment in str(error.value)


RUN_OPTIONS = [
    # (name, overrides): options a recipe turns on; each must train and save a loadable model
    ("bf16_mixed_precision", ["mixed_precision=bf16"]),
    ("lora_finetune", ["stage=finetune", "lora.r=4", "lora.encoders=true"]),
]


@pytest.mark.parametrize("name,overrides", RUN_OPTIONS, ids=[c[0] for c in RUN_OPTIONS])
def test_recipe_options_train_and_save(name, overrides, data_root, tmp_path):
    result = Trainer(recipe(data_root, tmp_path, "optim.max_steps=3", "data.eval=[]", *overrides)).train()
    losses = [r["loss"] for r in history(tmp_path)]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(loss)) for loss in losses)
    model = MultimodalForConditionalGeneration.from_pretrained(result["final_dir"])
    assert model.config.text_config.hidden_size == 32
    if name == "lora_finetune":
        assert (tmp_path / "final" / "adapter" / "adapter_model.safetensors").exists()


# One optimizer step on the same 8 image samples: the reference (one batch of 8), and each option that must not change
# the step. The contrastive loss is off: InfoNCE over 8 pairs is another loss than over two sets of 4 (by design).
ONE_STEP = [
    "data.train=[{manifest: image_train.jsonl, task: image_caption, max_samples: 8}]", "data.eval=[]",
    "optim.max_steps=1", "optim.warmup_steps=0", "contrastive_loss_weight=0", "stage=full",
    "model.config.freeze_vision_tower=false",
]
SAME_STEP = [
    # (name, overrides against the reference's optim.batch_size=8, tolerance)
    ("gradient_accumulation_2x4", ["optim.batch_size=4", "optim.gradient_accumulation_steps=2"], 1e-5),
    ("packing", ["data.packing=true", "data.max_length=512", "optim.batch_size=1"], 1e-4),  # all 8 in one packed row
    ("gradient_checkpointing", ["optim.batch_size=8", "gradient_checkpointing=true"], 1e-5),
]


@pytest.fixture(scope="module")
def one_step_reference(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_step")
    Trainer(recipe(data_root, out / "reference", *ONE_STEP, "optim.batch_size=8")).train()
    Trainer(recipe(data_root, out / "no_step", *ONE_STEP, "optim.batch_size=8", "optim.lr_projector=0", "optim.lr_lm=0",
                   "optim.lr_encoder=0")).train()  # fmt: skip
    return out / "reference", out / "no_step"


@pytest.mark.parametrize("name, overrides, tolerance", SAME_STEP, ids=[c[0] for c in SAME_STEP])
def test_option_gives_the_same_step_as_one_batch(one_step_reference, data_root, tmp_path, name, overrides, tolerance):
    """Loss terms, gradient norm and the weights after the optimizer step equal those of one batch of 8."""
    reference, no_step = one_step_reference
    trainer = Trainer(recipe(data_root, tmp_path, *ONE_STEP, *overrides))
    # packing: the LM attends within each sample (training/packing.py), not over the masked row
    assert base_model(trainer.model).config.text_config._attn_implementation == ("sdpa_packed" if name == "packing" else "sdpa")
    trainer.train()
    (expected,), (got,) = history(reference), history(tmp_path)
    for key in ("loss", "loss_text", "grad_norm"):
        assert got[key] == pytest.approx(expected[key], rel=tolerance), (key, got, expected)
    assert got["tokens"] == expected["tokens"]
    before = load_file(no_step / "final" / "model.safetensors")
    after, weights = load_file(reference / "final" / "model.safetensors"), load_file(tmp_path / "final" / "model.safetensors")
    assert any(not torch.equal(before[key], after[key]) for key in after)  # the step moved the weights
    for key in after:
        torch.testing.assert_close(weights[key], after[key], rtol=tolerance, atol=tolerance, msg=key)


# --- exact resume anywhere ------------------------------------------------------------------------
SMALL = [  # 4 rows in batches of 2: 2 batches per epoch, 6 steps = 3 epochs
    "data.train=[{manifest: image_train.jsonl, task: image_caption, max_samples: 4}]",
    "data.eval=[]", "optim.batch_size=2", "optim.max_steps=6", "report=false",
    "model.config.text_config.attention_dropout=0.3", "model.config.vision_config.attention_dropout=0.3",  # RNG matters
]
AUGMENT = [
    "augment.hflip=0.5", "augment.rotation=10", "augment.crop_scale=0.6", "augment.colour_jitter=0.3",
    "augment.flip_word_swaps={left: right, right: left}",
]
RESUME_CASES = [
    # (name, overrides, [(save_steps, killed during step), ...]) sharing one uninterrupted run
    ("plain", [], [(2, 4), (5, 6)]),  # resumed at the end of epoch 0; mid-epoch after two epochs
    ("workers", ["data.num_workers=2"], [(3, 5)]),
    ("packing", ["data.packing=true", "data.max_length=256"], [(3, 5)]),
    # the projectors' input statistics are estimated once, at the start, and restored (not re-estimated) on resume
    ("standardised projectors", ["model.config.projector_input_standardize=true"], [(3, 5)]),
    ("augmented", [*AUGMENT, "data.num_workers=2"], [(3, 5)]),  # the same augmented samples after a resume
    ("contrastive every 2nd step", ["contrastive_every_n_steps=2"], [(3, 5)]),  # resumed after an odd step: the same steps take it
]


def killed_at(step):
    """Replace Trainer._step by one that raises KeyboardInterrupt during the given step (a kill)."""
    original, calls = Trainer._step, {"n": 0}

    def step_or_die(self, window, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt(f"killed during step {step}")
        return original(self, window, **kwargs)

    return step_or_die


def assert_same_run(straight_dir, resumed_dir):
    straight, resumed = history(straight_dir), history(resumed_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    assert [r["epoch"] for r in resumed] == [r["epoch"] for r in straight]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6), (a, b)
    weights_a = load_file(Path(straight_dir) / "final" / "model.safetensors")
    weights_b = load_file(Path(resumed_dir) / "final" / "model.safetensors")
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("name,overrides,kills", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_is_exact_anywhere(data_root, tmp_path, monkeypatch, name, overrides, kills):
    """Killed mid-run, resumed: the loss curve, epochs and final weights equal an uninterrupted run's."""
    Trainer(recipe(data_root, tmp_path / "straight", *SMALL, *overrides)).train()
    if name != "packing":
        assert [r["epoch"] for r in history(tmp_path / "straight")] == [0, 0, 1, 1, 2, 2]
    for save_steps, kill in kills:
        run = [*SMALL, *overrides, f"save_steps={save_steps}"]
        out = tmp_path / f"killed_{kill}"
        with monkeypatch.context() as patch:
            patch.setattr(Trainer, "_step", killed_at(kill))
            with pytest.raises(KeyboardInterrupt):
                Trainer(recipe(data_root, out, *run)).train()
        assert list_checkpoints(out)[-1].name == f"checkpoint-{(kill - 1) // save_steps * save_steps}"
        Trainer(recipe(data_root, out, *run, "resume=true")).train()
        assert_same_run(tmp_path / "straight", out)


KILLING_TRAIN = """
import os, sys
from modeling_multimodal.cli import main
from modeling_multimodal.training.trainer import Trainer
original, calls = Trainer._step, [0]
def step_or_die(self, window, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_DURING_STEP"]):
        os._exit(3)  # no clean-up, no finally: as a kill
    return original(self, window, **kwargs)
Trainer._step = step_or_die
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_two_process_run_killed_and_resumed_equals_an_uninterrupted_one(data_root, tmp_path):
    """torchrun --nproc_per_node 2 equals one process over 3 epochs; killed during step 5 (checkpoint at 3,
    mid-epoch) and resumed, it equals itself uninterrupted."""
    script = tmp_path / "killing_train.py"
    script.write_text(KILLING_TRAIN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KILL_DURING_STEP": "0"}
    # No dropout: one process draws other masks than two would (RNG restore is covered by the in-process tests).
    no_dropout = ["model.config.text_config.attention_dropout=0", "model.config.vision_config.attention_dropout=0"]
    common = [f"data.root={data_root}", *SMALL, *no_dropout, "save_steps=3"]

    def torchrun(output_dir, *extra, kill=0):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                   "--recipe", str(RECIPE), *common, f"output_dir={output_dir}", *extra]
        return subprocess.run(command, env={**env, "KILL_DURING_STEP": str(kill)}, capture_output=True, text=True, timeout=600)

    done = torchrun(tmp_path / "straight")
    assert done.returncode == 0, done.stderr[-3000:]
    one = [sys.executable, "-m", "modeling_multimodal.train", "--recipe", str(RECIPE), *common, f"output_dir={tmp_path / 'one'}"]
    done = subprocess.run(one, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(history(tmp_path / "one"), history(tmp_path / "straight"), strict=True):  # every epoch's order
        assert (a["epoch"], a["loss"]) == (b["epoch"], pytest.approx(b["loss"], rel=1e-5, abs=1e-5)), (a, b)
    assert torchrun(tmp_path / "resumed", kill=5).returncode != 0
    assert list_checkpoints(tmp_path / "resumed")[-1].name == "checkpoint-3"
    done = torchrun(tmp_path / "resumed", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_stages_chain_in_one_call_and_resume_skips_finished_stages(data_root, tmp_path, monkeypatch):
    """stages: [align, finetune] in one train(); killed in the second stage, resumed without re-running the first."""
    from modeling_multimodal.training.trainer import train

    chain = "stages=[{stage: align, optim.max_steps: 2}, {stage: finetune, optim.max_steps: 3, lora.r: 4}]"
    run = [*SMALL, "save_steps=1", chain]
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_step", killed_at(4))  # the finetune stage's second step
        with pytest.raises(KeyboardInterrupt):
            train(recipe(data_root, tmp_path, *run))
    assert (tmp_path / "1-align" / "final" / "model.safetensors").is_file()
    assert [p.name for p in list_checkpoints(tmp_path / "2-finetune")] == ["checkpoint-1"]
    steps = []
    original = Trainer._step
    monkeypatch.setattr(Trainer, "_step", lambda self, window, **kwargs: steps.append(self.recipe.stage) or original(self, window, **kwargs))
    result = train(recipe(data_root, tmp_path, *run, "resume=true"))
    assert steps == ["finetune", "finetune"]  # align finished: not run again; finetune resumed at step 1
    assert result["final_dir"] == str(tmp_path / "2-finetune" / "final") and result["steps"] == 3
    saved = json.loads((tmp_path / "2-finetune" / "final" / "training_recipe.json").read_text())
    assert saved["init_from"] == str(tmp_path / "1-align" / "final") and saved["lora"]["r"] == 4
    assert [r["step"] for r in history(tmp_path / "2-finetune")] == [1, 2, 3]
    steps.clear()
    assert train(recipe(data_root, tmp_path, *run, "resume=true"))["steps"] == 3 and steps == []  # all finished


def test_trainer_sets_torch_threads(data_root, tmp_path):
    before = torch.get_num_threads()
    try:
        Trainer(recipe(data_root, tmp_path, "threads=1", "data.eval=[]"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_runs_on_one_folder_are_kept_apart(data_root, tmp_path):
    """A new run over another run's checkpoints is refused (or replaced when asked); --resume needs a checkpoint."""
    run = [*SMALL, "optim.max_steps=2", "save_steps=2"]
    with pytest.raises(ValueError, match="holds no complete checkpoint to resume from"):
        Trainer(recipe(data_root, tmp_path, *run, "resume=true")).train()
    Trainer(recipe(data_root, tmp_path, *run)).train()
    with pytest.raises(ValueError, match="holds another run's checkpoints \\(checkpoint-2\\): pass --resume"):
        Trainer(recipe(data_root, tmp_path, *run)).train()
    first_run = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["run_id"]
    Trainer(recipe(data_root, tmp_path, *run, "overwrite_output_dir=true")).train()
    assert json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["run_id"] != first_run
    assert [r["step"] for r in history(tmp_path)] == [1, 2]


def test_training_samples_are_augmented_per_epoch_and_index(data_root, tmp_path):
    trainer = Trainer(recipe(data_root, tmp_path, *SMALL, *AUGMENT))
    trainer._train_loader()
    dataset = trainer.train_dataset
    first = dataset[0]["pixel_values"]
    assert torch.equal(first, dataset[0]["pixel_values"])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[0]["pixel_values"])


def test_finetune_adapter_records_its_base_and_merges_back_to_the_exported_model(data_root, tmp_path):
    """The adapter a finetune run saves names what it was trained on (`init_from`), so `push --merge-adapter`
    (`merge_adapter_checkpoint`) folds it into that base and gets the model the run exported; a run composed from
    a config records nothing, and the merge then asks for --base-model by name."""
    from modeling_multimodal.hub.weights import merge_adapter_checkpoint

    common = ["data.eval=[]", "optim.max_steps=2"]
    first = Trainer(recipe(data_root, tmp_path / "a", *common)).train()
    tuned = Trainer(recipe(data_root, tmp_path / "b", *common, "stage=finetune", f"init_from={first['final_dir']}")).train()
    adapter = Path(tuned["adapter_dir"])
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(Path(first["final_dir"]).resolve())
    merged = merge_adapter_checkpoint(adapter, tmp_path / "merged")
    exported = load_file(Path(tuned["final_dir"]) / "model.safetensors")
    again = load_file(Path(merged) / "model.safetensors")
    assert set(again) == set(exported)
    assert all(torch.allclose(again[name], exported[name], atol=1e-6) for name in exported)

    scratch = Trainer(recipe(data_root, tmp_path / "c", *common, "stage=finetune")).train()
    assert json.loads((Path(scratch["adapter_dir"]) / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    with pytest.raises(ValueError, match="records no base model .* pass the checkpoint it was trained on with --base-model"):
        merge_adapter_checkpoint(scratch["adapter_dir"], tmp_path / "merged2")
