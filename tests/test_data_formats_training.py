"""Users' data as they have it trains two steps, through `modeling-multimodal train` and through `Trainer`:
each chat format (LLaVA, ShareGPT, OpenAI, HF messages) and each container (Dataset, DatasetDict, save_to_disk,
Arrow; Image() and Audio() columns)."""

import base64
import json
from pathlib import Path

import datasets
import pytest

from modeling_multimodal.cli import main
from modeling_multimodal.demo_data import make_demo_data
from modeling_multimodal.training.recipe import load_recipe
from modeling_multimodal.training.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_test.yaml"
SIZES = {"image": {"train": 4, "validation": 1, "test": 1}, "video": {"train": 1, "validation": 1, "test": 1},
         "speech": {"train": 4, "validation": 1, "test": 1}}
FAST = ["optim.max_steps=2", "optim.batch_size=2", "data.eval=[]", "report=false", "contrastive_loss_weight=0"]


def _rows(root, name):
    return [json.loads(line) for line in (root / name).read_text().splitlines() if line.strip()]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("byod")
    make_demo_data(root, seed=0, sizes=SIZES)
    images, speech = _rows(root, "image_train.jsonl"), _rows(root, "speech_train.jsonl")
    llava = [{"id": r["id"], "image": r["image"].removeprefix("images/"), "conversations": [
        {"from": "human", "value": "<image>\ndescribe the image."}, {"from": "gpt", "value": r["caption"]}]} for r in images]
    (root / "llava.json").write_text(json.dumps(llava))
    sharegpt = [{"id": r["id"], "audios": [r["audio"]], "system": "be brief", "conversations": [
        {"from": "human", "value": "<audio> what is said in the audio?"}, {"from": "gpt", "value": r["transcript"]}]} for r in speech]
    _write_jsonl(root / "sharegpt.jsonl", sharegpt)
    openai = [{"id": r["id"], "messages": [
        {"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode((root / r["audio"]).read_bytes()).decode(), "format": "wav"}},
            {"type": "image_url", "image_url": {"url": f"file://{root / i['image']}"}},
            {"type": "text", "text": "what is said, and what is in the image?"}]},
        {"role": "assistant", "content": r["transcript"]}]} for r, i in zip(speech, images)]
    _write_jsonl(root / "openai.jsonl", openai)
    messages = [{"id": r["id"], "messages": [
        {"role": "user", "content": [{"type": "image", "image": r["image"]}, {"type": "text", "text": "describe the image."}]},
        {"role": "assistant", "content": r["caption"]}, {"role": "user", "content": "again"},
        {"role": "assistant", "content": r["caption"]}]} for r in images]
    _write_jsonl(root / "messages.jsonl", messages)
    # containers: an Image() column saved with save_to_disk (a DatasetDict), an Audio() column as one Arrow file
    pictures = datasets.Dataset.from_list([{"image": str(root / r["image"]), "caption": r["caption"]} for r in images])
    datasets.DatasetDict({"train": pictures.cast_column("image", datasets.Image())}).save_to_disk(root / "saved")
    clips = datasets.Dataset.from_list([{"audio": str(root / r["audio"]), "transcript": r["transcript"]} for r in speech])
    clips.cast_column("audio", datasets.Audio()).save_to_disk(root / "clips")
    return root


ENTRIES = {
    "llava": ("{manifest: llava.json, format: llava}", ["data.image_folder=images"]),
    "llava_detected": ("{manifest: llava.json, media_root: images}", []),
    "sharegpt": ("{manifest: sharegpt.jsonl}", []),
    "openai": ("{manifest: openai.jsonl, format: openai}", []),
    "messages": ("{manifest: messages.jsonl}", []),
    "save_to_disk_image_column": ("{manifest: saved, task: image_caption}", []),
    "arrow_audio_column": ("{manifest: clips/data-00000-of-00001.arrow, task: speech_transcription}", []),
}


@pytest.mark.parametrize("name", list(ENTRIES))
def test_each_format_and_container_trains_two_steps_from_the_cli(name, data_root, tmp_path, capsys):
    entry, extra = ENTRIES[name]
    overrides = [f"data.root={data_root}", f"output_dir={tmp_path}", f"data.train=[{entry}]", *FAST, *extra]
    assert main(["train", "--recipe", str(RECIPE), *overrides]) in (0, None)
    steps = json.loads((tmp_path / "log_history.json").read_text())["train"]
    assert len(steps) == 2 and all(s["loss"] > 0 for s in steps)


def _in_memory(root):
    speech = _rows(root, "speech_train.jsonl")
    return {
        "dataset_sharegpt": datasets.Dataset.from_list(
            [{"audios": [str(root / r["audio"])], "conversations": [
                {"from": "human", "value": "<audio> what is said?"}, {"from": "gpt", "value": r["transcript"]}]} for r in speech]),
        "datasetdict_audio_column": datasets.DatasetDict({"train": datasets.load_from_disk(root / "clips")}),
    }


@pytest.mark.parametrize("name", ["dataset_sharegpt", "datasetdict_audio_column", "llava_file"])
def test_trainer_takes_dataset_objects_and_files(name, data_root, tmp_path):
    recipe = load_recipe(RECIPE, [f"data.root={data_root}", f"output_dir={tmp_path}", *FAST])
    if name == "llava_file":
        recipe.data.train, recipe.data.image_folder = [{"manifest": "llava.json"}], "images"
        Trainer(recipe).train()
    else:
        source = _in_memory(data_root)[name]
        if name == "datasetdict_audio_column":
            recipe.data.train = [{"manifest": source, "task": "speech_transcription"}]
            Trainer(recipe).train()
        else:
            before = list(recipe.data.train)
            Trainer(recipe, train_dataset=source).train()
            assert recipe.data.train == before  # the run used its own copy of the recipe
    steps = json.loads((tmp_path / "log_history.json").read_text())["train"]
    assert len(steps) == 2
    saved = json.loads((tmp_path / "final" / "training_recipe.json").read_text())
    assert isinstance(saved["data"]["train"][0]["manifest"], str)


def test_evaluate_scores_the_last_assistant_turn_of_chat_manifests(data_root, tmp_path, capsys):
    overrides = [f"data.root={data_root}", f"output_dir={tmp_path}", "data.train=[{manifest: messages.jsonl}]", *FAST]
    assert main(["train", "--recipe", str(RECIPE), *overrides]) in (0, None)
    capsys.readouterr()
    out = tmp_path / "predictions.jsonl"
    argv = ["evaluate", str(tmp_path / "final"), "--root", str(data_root), "--manifest", "messages.jsonl",
            "--manifest", "sharegpt.jsonl", "--manifest", "llava.json:llava", "--image-folder", "images", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [(r["task"], r["rows"]) for r in results] == [(None, 4), (None, 4), (None, 4)]
    assert set(results[0]["scores"]) == {"exact_match", "bleu"}
    assert set(results[1]["scores"]) == {"wer", "cer", "exact_match", "bleu"}  # speech-only chat rows: WER too
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    captions = {r["id"]: r["caption"] for r in _rows(data_root, "image_train.jsonl")}
    transcripts = {r["id"]: r["transcript"] for r in _rows(data_root, "speech_train.jsonl")}
    assert [line["reference"] for line in lines] == [*captions.values(), *transcripts.values(), *captions.values()]


def test_evaluate_refuses_a_field_manifest_without_a_task(data_root, capsys, tmp_path):
    assert main(["evaluate", str(tmp_path), "--root", str(data_root), "--manifest", "image_train.jsonl"]) == 2
    assert "has no task: write MANIFEST:TASK" in capsys.readouterr().err
