"""Evaluation split across processes (`evaluation.distributed`): every row scored once, ranks in lock-step, and
`modeling-multimodal evaluate` under torchrun equal to one process."""

import json
import os
import subprocess
import sys

import pytest

from modeling_multimodal.evaluation.distributed import Ranks, batches_of

# (keys of the rows: the modalities each holds, processes, batch size)
SHARE_CASES = [
    ("one group, uneven", ["image"] * 5, 2, 2),
    ("fewer rows than ranks", ["audio"], 3, 4),
    ("interleaved modalities", ["image", "audio"] * 4 + ["video"], 2, 3),
    ("three ranks, mixed", ["image", "image", "audio", "image", "audio", "video", "video"], 3, 1),
]


@pytest.mark.parametrize("name, keys, world, size", SHARE_CASES, ids=[case[0] for case in SHARE_CASES])
def test_shares_score_every_row_once_in_lock_step(name, keys, world, size):
    per_rank = [list(batches_of(Ranks(rank, world).share(keys), keys, size)) for rank in range(world)]
    scored = sorted(index for batches in per_rank for batch in batches for index, padding in batch if not padding)
    assert scored == list(range(len(keys)))  # every row once; padding repeats a row but is never scored
    assert len({len(batches) for batches in per_rank}) == 1  # the same number of (collective) batches on every rank
    for step in zip(*per_rank):  # batch i holds one modality, the same on every rank: the same towers run
        assert len({keys[index] for batch in step for index, _ in batch}) == 1
        assert all(0 < len(batch) <= size for batch in step)


def test_one_process_keeps_the_rows_and_batches_as_they_were():
    keys = ["image", "audio", "image"]
    share = Ranks().share(keys)
    assert share == [(0, False), (1, False), (2, False)]
    assert list(batches_of(share, None, 2)) == [[(0, False), (1, False)], [(2, False)]]
    assert Ranks().gather({1: "b", 0: "a"}, 2) == ["a", "b"]
    with pytest.raises(RuntimeError, match=r"rows \[1\] came back from no rank"):
        Ranks().gather({0: "a"}, 2)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny model with a retrieval head, demo validation data and a chat manifest whose rows alternate image and
    speech; `evaluate` run by one process and by torchrun with 2 (their --out files)."""
    from modeling_multimodal import MultimodalForConditionalGeneration, MultimodalProcessor
    from modeling_multimodal.demo_data import make_demo_data
    from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer

    root = tmp_path_factory.mktemp("evaluation")
    data, model_dir = root / "data", root / "model"
    make_demo_data(data, seed=0, image_size=32, sizes={
        "image": {"train": 0, "validation": 3, "test": 0}, "video": {"train": 0, "validation": 0, "test": 0},
        "speech": {"train": 0, "validation": 3, "test": 0},
    })
    images = [json.loads(line) for line in (data / "image_validation.jsonl").read_text().splitlines()]
    speech = [json.loads(line) for line in (data / "speech_validation.jsonl").read_text().splitlines()]
    chat = []
    for image, clip in zip(images, speech):
        chat.append({"id": image["id"], "messages": [
            {"role": "user", "content": [{"type": "image", "image": image["image"]}, {"type": "text", "text": "what is shown?"}]},
            {"role": "assistant", "content": image["caption"]}]})
        chat.append({"id": clip["id"], "messages": [
            {"role": "user", "content": [{"type": "audio", "audio": clip["audio"]}, {"type": "text", "text": "what is said?"}]},
            {"role": "assistant", "content": clip["transcript"]}]})
    (data / "mixed_chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chat))
    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer, contrastive_loss_weight=0.1)  # a retrieval head: recall and re-ranking run
    MultimodalForConditionalGeneration(config).save_pretrained(model_dir)
    MultimodalProcessor.from_config_and_components(config, tokenizer).save_pretrained(model_dir)
    arguments = [
        "evaluate", str(model_dir), "--root", str(data), "--manifest", "image_validation.jsonl:image_caption",
        "--manifest", "speech_validation.jsonl:speech_transcription", "--manifest", "mixed_chat.jsonl",
        "--rerank-top-k", "2", "--batch-size", "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    outputs = {}
    for processes in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] if processes == 2 else [sys.executable]
        out = root / f"scores_{processes}.json"
        done = subprocess.run([*launcher, "-m", "modeling_multimodal.cli", *arguments, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count('"checkpoint"') == 1  # the summary is printed once, by the main process
        outputs[processes] = json.loads(out.read_text())["results"]
    return outputs


@pytest.mark.slow
def test_evaluate_under_torchrun_equals_one_process(scored):
    one, two = scored[1], scored[2]
    assert [r["rows"] for r in two] == [3, 3, 6]
    assert {"reranked_text_to_media_recall@1", "text_to_media_recall@1", "bleu"} <= set(one[0]["scores"])
    assert "wer" in one[1]["scores"]
    for a, b in zip(one, two):
        assert [p["id"] for p in b["predictions"]] == [p["id"] for p in a["predictions"]]  # gathered back in row order
        assert [p["prediction"] for p in b["predictions"]] == [p["prediction"] for p in a["predictions"]], a["manifest"]
        assert b["scores"] == pytest.approx(a["scores"], rel=1e-6, abs=1e-6), a["manifest"]
