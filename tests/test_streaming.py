"""Streaming training data (`data.streaming`, `IterableDataset`s): rows read as needed, the same rows as the indexed
path, an order that depends on (seed, epoch, position) only, a shard per rank, and an exact resume after a kill."""

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

from test_training import KILLING_TRAIN, assert_same_run, history, killed_at

from modeling_multimodal.cli import main
from modeling_multimodal.data.examples import ExampleEncoder, load_manifest
from modeling_multimodal.demo_data import make_demo_data
from modeling_multimodal.processing.processing_multimodal import MultimodalProcessor
from modeling_multimodal.training.checkpointing import list_checkpoints
from modeling_multimodal.training.recipe import load_recipe
from modeling_multimodal.training.streaming import StreamingBatchSampler, shuffled
from modeling_multimodal.training.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_test.yaml"
SIZES = {"image": {"train": 6, "validation": 1, "test": 1}, "video": {"train": 2, "validation": 1, "test": 1},
         "speech": {"train": 6, "validation": 1, "test": 1}}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    make_demo_data(root, seed=0, sizes=SIZES)
    return root


def _recipe(data_root, checkpoint, output_dir, *overrides):
    return load_recipe(RECIPE, [
        f"data.root={data_root}", f"output_dir={output_dir}", "report=false", "model.config=null", "model.tokenizer=null",
        f"model.checkpoint={checkpoint}", "data.eval=[]", "optim.batch_size=2", "contrastive_loss_weight=0",
        "data.streaming=true", *overrides,
    ])


def _sampler(rows_by_task, processor, repeats=None, **kwargs):
    encoders = [ExampleEncoder(processor, task, max_length=512) for task, _ in rows_by_task]
    options = {"seed": 0, "shuffle_buffer": 4, **kwargs}
    return StreamingBatchSampler([r for _, r in rows_by_task], encoders, repeats or [1] * len(rows_by_task), 2, **options)


@pytest.fixture(scope="module")
def streams(data_root, checkpoint):
    processor = MultimodalProcessor.from_pretrained(checkpoint)
    tasks = [("image_caption", "image_train.jsonl"), ("speech_transcription", "speech_train.jsonl")]
    rows = [(task, load_manifest(data_root / name, task=task, streaming=True)) for task, name in tasks]
    return rows, processor


def test_streamed_rows_equal_the_indexed_rows(data_root, tmp_path):
    for name, task in (("image_train.jsonl", "image_caption"), ("speech_train.jsonl", "speech_transcription")):
        indexed, streamed = load_manifest(data_root / name, task=task), load_manifest(data_root / name, task=task, streaming=True)
        assert isinstance(streamed, datasets.IterableDataset)
        assert list(streamed) == list(indexed)
    chat = [{"id": f"c{i}", "image": "images/" + Path(r["image"]).name, "conversations": [
        {"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": r["caption"]}]}
        for i, r in enumerate(json.loads(line) for line in (data_root / "image_train.jsonl").read_text().splitlines())]
    (tmp_path / "llava.json").write_text(json.dumps(chat))
    kwargs = {"root": data_root, "image_folder": data_root}
    assert list(load_manifest(tmp_path / "llava.json", streaming=True, **kwargs)) == list(load_manifest(tmp_path / "llava.json", **kwargs))
    in_memory = datasets.Dataset.from_list(chat)
    assert list(load_manifest(in_memory.to_iterable_dataset(), **kwargs)) == list(load_manifest(in_memory, **kwargs))


def test_a_bad_streamed_row_is_named_when_it_is_read(data_root, tmp_path):
    rows = [json.loads(line) for line in (data_root / "image_train.jsonl").read_text().splitlines()]
    rows[3]["caption"] = ""
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    streamed = load_manifest(tmp_path / "bad.jsonl", root=data_root, task="image_caption", streaming=True)
    with pytest.raises(ValueError, match=rf"row 3 \(id '{rows[3]['id']}'\): no 'caption' value"):
        list(streamed)
    outside = [{**rows[0], "image": "/etc/passwd"}]
    (tmp_path / "outside.jsonl").write_text(json.dumps(outside[0]) + "\n")
    with pytest.raises(ValueError, match="passwd"):
        list(load_manifest(tmp_path / "outside.jsonl", root=data_root, task="image_caption", streaming=True))


def test_buffer_shuffle_is_a_seeded_permutation():
    import random

    first = list(shuffled(range(50), 8, random.Random(1)))
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert first == list(shuffled(range(50), 8, random.Random(1)))
    assert first != list(shuffled(range(50), 8, random.Random(2)))


def _ids(batches):
    return [key[1]["id"] for batch in batches for key in batch]


def test_order_depends_on_seed_epoch_and_position_only(streams):
    rows_by_task, processor = streams
    sampler = _sampler(rows_by_task, processor, repeats=[2, 1])
    epoch0 = list(sampler)
    assert _ids(epoch0) == _ids(_sampler(rows_by_task, processor, repeats=[2, 1]))  # a fresh sampler: the same plan
    counts = Counter((key[0], key[1]["id"]) for batch in epoch0 for key in batch)
    assert set(counts.values()) == {1, 2} and all(n == (2 if task == 0 else 1) for (task, _), n in counts.items())
    assert len(counts) == 12  # every row of both tasks; image rows twice (repeat 2)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert _ids(epoch1) != _ids(epoch0) and sorted(_ids(epoch1)) == sorted(_ids(epoch0))
    sampler.set_epoch(0)
    sampler.skip(3)
    assert _ids(list(sampler)) == _ids(epoch0[3:])  # a resume replays the plan: the tail is the same batches


def test_ranks_read_disjoint_shards_of_the_same_stream(streams):
    rows_by_task, processor = streams
    whole = Counter(key[2] for batch in _sampler(rows_by_task, processor) for key in batch)
    shards = [
        Counter(key[2] for batch in _sampler(rows_by_task, processor, rank=rank, world_size=2) for key in batch)
        for rank in range(2)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(whole)
    assert all(position % 2 == rank for rank, shard in enumerate(shards) for position in shard)
    for rank in range(2):  # the global batch of 2 is split: one row per rank and batch
        assert {len(b) for b in _sampler(rows_by_task, processor, rank=rank, world_size=2)} == {1}
    with pytest.raises(ValueError, match="must split evenly over 3 processes"):
        _sampler(rows_by_task, processor, world_size=3)


def test_length_grouping_and_packing_plan_on_a_bounded_buffer(streams):
    rows_by_task, processor = streams
    encoders = {task: ExampleEncoder(processor, task, max_length=512) for task, _ in rows_by_task}
    tasks = [task for task, _ in rows_by_task]
    for batch in _sampler(rows_by_task, processor):
        lengths = [encoders[tasks[t]].estimate_length(row) for t, row, _ in batch]
        assert lengths == sorted(lengths, reverse=True)  # each batch is cut from a length-sorted buffer
    packed = list(_sampler(rows_by_task, processor, packing=True, max_length=128))
    assert sorted(_ids(packed)) == sorted(_ids(list(_sampler(rows_by_task, processor))))
    with pytest.raises(ValueError, match=r"tokens, over data.max_length=8; it cannot be packed"):
        list(_sampler(rows_by_task, processor, packing=True, max_length=8))


def test_streamed_training_resumes_exactly_after_a_kill(data_root, checkpoint, tmp_path, monkeypatch):
    overrides = ["optim.max_steps=5", "save_steps=2", "model.overrides={text_config: {attention_dropout: 0.2}}"]
    Trainer(_recipe(data_root, checkpoint, tmp_path / "straight", *overrides)).train()
    monkeypatch.setattr(Trainer, "_step", killed_at(4))
    with pytest.raises(KeyboardInterrupt):
        Trainer(_recipe(data_root, checkpoint, tmp_path / "resumed", *overrides)).train()
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["checkpoint-2"]
    state = json.loads((tmp_path / "resumed" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["positions"] == [[state["epoch"], state["batch"]]]
    Trainer(_recipe(data_root, checkpoint, tmp_path / "resumed", *overrides, "resume=true")).train()
    assert [r["step"] for r in history(tmp_path / "resumed")] == [1, 2, 3, 4, 5]
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_an_iterable_dataset_trains_through_trainer_and_the_cli(data_root, checkpoint, tmp_path):
    rows = [json.loads(line) for line in (data_root / "image_train.jsonl").read_text().splitlines()]
    chat = datasets.Dataset.from_list([{"id": r["id"], "messages": [
        {"role": "user", "content": [{"type": "image", "image": str(data_root / r["image"])}, {"type": "text", "text": "describe."}]},
        {"role": "assistant", "content": [{"type": "text", "text": r["caption"]}]}]} for r in rows])
    recipe = _recipe(data_root, checkpoint, tmp_path / "python", "optim.max_steps=2", "data.streaming=false")
    trainer = Trainer(recipe, train_dataset=chat.to_iterable_dataset(), eval_dataset=chat.to_iterable_dataset())
    assert len(trainer.eval_rows[0][1]) == len(rows)  # evaluation rows are read once, indexed
    result = trainer.train()
    assert result["steps"] == 2 and all(s["loss"] > 0 for s in history(tmp_path / "python"))
    assert any(key.startswith("chat/") for key in result["scores"])
    overrides = [f"data.root={data_root}", f"output_dir={tmp_path / 'cli'}", "report=false", "model.config=null",
                 "model.tokenizer=null", f"model.checkpoint={checkpoint}", "data.eval=[]", "optim.batch_size=2",
                 "optim.max_steps=2", "contrastive_loss_weight=0", "data.streaming=true", "data.packing=true",
                 ]
    assert main(["train", "--recipe", str(RECIPE), *overrides]) in (0, None)
    assert len(history(tmp_path / "cli")) == 2


def test_streaming_refusals(data_root, checkpoint, tmp_path):
    with pytest.raises(ValueError, match="tokenizer is built from every training row"):
        Trainer(load_recipe(RECIPE, [f"data.root={data_root}", f"output_dir={tmp_path}", "data.streaming=true", "data.eval=[]"]))
    with pytest.raises(ValueError, match="data.cache_in_memory"):
        _recipe(data_root, checkpoint, tmp_path, "data.cache_in_memory=true")




@pytest.mark.slow
def test_two_streaming_processes_read_their_shards_and_resume_exactly_after_a_kill(data_root, checkpoint, tmp_path):
    """torchrun --nproc_per_node 2 on streamed rows (an epoch of 2 tasks spans several steps, and the two shards
    end their epochs at different steps): killed during step 7 and resumed from step 5 (the ranks then in different epochs), the run equals itself uninterrupted."""
    import os
    import subprocess
    import sys

    script = tmp_path / "killing_train.py"
    script.write_text(KILLING_TRAIN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = [f"data.root={data_root}", "report=false", "model.config=null", "model.tokenizer=null",
              f"model.checkpoint={checkpoint}", "data.eval=[]", "optim.batch_size=2", "contrastive_loss_weight=0",
              "data.streaming=true", "optim.max_steps=8", "save_steps=5",
              "data.train=[{manifest: image_train.jsonl, task: image_caption}, {manifest: speech_train.jsonl, task: speech_transcription, max_samples: 3}]"]

    def torchrun(output_dir, *extra, kill=0):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                   "--recipe", str(RECIPE), *common, f"output_dir={output_dir}", *extra]
        return subprocess.run(command, env={**env, "KILL_DURING_STEP": str(kill)}, capture_output=True, text=True, timeout=600)

    done = torchrun(tmp_path / "straight")
    assert done.returncode == 0, done.stderr[-3000:]
    assert torchrun(tmp_path / "resumed", kill=7).returncode != 0
    assert list_checkpoints(tmp_path / "resumed")[-1].name == "checkpoint-5"
    state = json.loads((tmp_path / "resumed" / "checkpoint-5" / "trainer_state.json").read_text())
    # 9 rows an epoch, one per rank and step: rank 0 reads 5 (still in epoch 0), rank 1 reads 4 (now in epoch 1)
    assert state["positions"] == [[0, 5], [1, 1]]
    done = torchrun(tmp_path / "resumed", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in history(tmp_path / "straight")] == list(range(1, 9))
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
