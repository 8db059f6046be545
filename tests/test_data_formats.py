"""Bring your own data: one conversation in every chat format encodes identically; bad rows are named; containers."""

import base64
import json

import datasets
import numpy as np
import pytest
import torch

from modeling_multimodal.data import ExampleEncoder, load_manifest
from modeling_multimodal.data.formats import detect_format

from test_training_data import PROCESSOR, TOKENIZER, write_image, write_wav

Q1, A1, Q2, A2 = "describe the image.", "a small red circle", "what is said in the audio", "the green triangle"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    (root / "images").mkdir()
    write_image(root / "images" / "red.png")
    write_wav(root / "speech.wav", 0.5, rate=16_000)
    return root


def every_format(root):
    """{format: row} writing the same two-turn conversation (an image in turn 1, an audio clip in turn 2)."""
    wav = (root / "speech.wav").read_bytes()
    hf = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image", "image": "images/red.png"}, {"type": "text", "text": Q1}]},
        {"role": "assistant", "content": A1},
        {"role": "user", "content": [{"type": "audio", "audio": "speech.wav"}, {"type": "text", "text": Q2}]},
        {"role": "assistant", "content": [{"type": "text", "text": A2}]},
    ]
    return {
        "messages": {"id": "r", "messages": json.dumps(hf)},
        "llava": {
            "id": "r", "image": "red.png", "audio": str(root / "speech.wav"),
            "conversations": [
                {"from": "system", "value": "be brief"}, {"from": "human", "value": f"<image>\n{Q1}"},
                {"from": "gpt", "value": A1}, {"from": "human", "value": f"<audio>\n{Q2}"}, {"from": "gpt", "value": A2},
            ],
        },
        "sharegpt": {
            "id": "r", "system": "be brief", "images": ["images/red.png"], "audios": ["speech.wav"],
            "messages": [
                {"role": "user", "content": f"<image>{Q1}"}, {"role": "assistant", "content": A1},
                {"role": "user", "content": f"<audio> {Q2}"}, {"role": "assistant", "content": A2},
            ],
        },
        "openai": {
            "id": "r",
            "messages": json.dumps([
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"file://{root / 'images' / 'red.png'}"}},
                    {"type": "text", "text": Q1},
                ]},
                {"role": "assistant", "content": A1},
                {"role": "user", "content": [
                    {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
                    {"type": "text", "text": Q2},
                ]},
                {"role": "assistant", "content": A2},
            ]),
        },
    }


def load(row, root, fmt=None, **kwargs):
    kwargs.setdefault("media_root", root / "images" if fmt == "llava" else None)
    return load_manifest(datasets.Dataset.from_list([row]), root, format=fmt, **kwargs)


@pytest.mark.parametrize("named", [False, True], ids=["detected", "named"])
def test_the_same_conversation_encodes_identically_in_every_format(root, named):
    encoder = ExampleEncoder(PROCESSOR)
    encoded = {}
    for fmt, row in every_format(root).items():
        assert detect_format(row) == fmt
        encoded[fmt] = encoder(load(row, root, fmt if named else None)[0]) if fmt != "llava" or named else None
    reference = encoded.pop("messages")
    assert reference["pixel_values"].shape[0] == 1 and reference["input_features"].shape[0] == 1
    for fmt, tensors in encoded.items():
        if tensors is None:  # LLaVA's image folder is named with the entry (its media_root)
            tensors = encoder(load(every_format(root)["llava"], root, None, media_root=root / "images")[0])
        assert set(tensors) == set(reference), fmt
        for key, value in reference.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(tensors[key], value), (fmt, key)
    # every assistant reply is trained, and exactly its tokens (+ EOS)
    labels = reference["labels"][reference["labels"] != -100]
    assert TOKENIZER.decode(labels, skip_special_tokens=True) == f"{A1} {A2}"


def test_estimated_length_is_exact_for_multi_turn_and_inline_audio(root):
    encoder = ExampleEncoder(PROCESSOR)
    for fmt, row in every_format(root).items():
        rows = load(row, root, fmt)
        assert encoder.estimate_length(rows[0]) == len(encoder(rows[0])["input_ids"]), fmt


def test_truncation_drops_a_later_media_turn_whole(root):
    rows = load(every_format(root)["messages"], root)
    full = ExampleEncoder(PROCESSOR)(rows[0])
    audio_at = int((full["input_ids"] == PROCESSOR.tokenizer.convert_tokens_to_ids("<audio>")).nonzero()[0])
    short = ExampleEncoder(PROCESSOR, max_length=audio_at + 2)
    encoded = short(rows[0])
    assert "input_features" not in encoded and encoded["pixel_values"].shape[0] == 1
    assert len(encoded["input_ids"]) == short.estimate_length(rows[0]) <= audio_at + 2
    assert TOKENIZER.decode(encoded["labels"][encoded["labels"] != -100], skip_special_tokens=True) == A1


BAD_ROWS = [
    ({"id": "b0", "messages": json.dumps([{"role": "human", "content": "hi"}, {"role": "bot", "content": "yo"}])},
     None, "row 'b0', message 0: unknown role 'human'"),
    ({"id": "b1", "messages": json.dumps([{"role": "user", "content": "hi"}])}, None, "does not end with an assistant turn"),
    ({"id": "b2", "messages": '[{"role": "user", "content": "hi"'}, None, "row 'b2': 'messages' is not valid JSON"),
    ({"id": "b3", "images": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}]},
     None, "row 'b3': 2 image item(s) in 'images' but 1 <image> placeholder(s)"),
    ({"id": "b4", "conversations": [{"from": "robot", "value": "x"}]}, "llava", "row 'b4': turn 0 has from/role 'robot'"),
    ({"id": "b5", "images": [], "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}]},
     "sharegpt", "more <image> placeholders than the 0 image item(s)"),
    ({"id": "b6", "messages": json.dumps([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}])},
     "openai", "row 'b6', message 0: an input_audio item needs"),
]


@pytest.mark.parametrize("row,fmt,message", BAD_ROWS, ids=[r[0]["id"] for r in BAD_ROWS])
def test_bad_chat_rows_are_named_with_what_was_expected(root, row, fmt, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        ExampleEncoder(PROCESSOR)(load(row, root, fmt)[0])
    assert "in-memory" in str(error.value) or "Row" in str(error.value)


def test_csv_with_malformed_messages_names_the_file_and_row(root, tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text('id,messages\nok,"[{""role"": ""user"", ""content"": ""hi""}]"\nbad,"[{""role"": ""user"""\n')
    with pytest.raises(ValueError, match=r"chat.csv', row 'bad': 'messages' is not valid JSON"):
        load_manifest(path, root)


def test_media_roots_allow_absolute_paths_inside_them_only(root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_image(elsewhere / "pic.png")
    row = {"id": "m", "images": [str(elsewhere / "pic.png")], "conversations": [
        {"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}]}
    with pytest.raises(ValueError, match="leaves the data root"):
        load(row, root)
    assert str(elsewhere / "pic.png") in load(row, root, media_roots=[elsewhere])[0]["messages"]
    (elsewhere / "link.png").symlink_to(root / ".." )
    row["images"] = [str(elsewhere / "link.png")]
    with pytest.raises(ValueError, match="symlink"):
        load(row, root, media_roots=[elsewhere])


def test_containers_and_media_columns_without_torchcodec(root, tmp_path):
    """An Audio() column (undecoded by us), {array, sampling_rate} rows, a DatasetDict, save_to_disk and Arrow."""
    wav = str(root / "speech.wav")
    rows = {"id": ["a", "b"], "audio": [wav, wav], "transcript": ["what is said", "the audio"]}
    column = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio())
    dd = datasets.DatasetDict({"train": column})
    dd.save_to_disk(tmp_path / "saved")
    encoder = ExampleEncoder(PROCESSOR, task="speech_transcription")
    reference = encoder(load_manifest(datasets.Dataset.from_dict(rows), root, task="speech_transcription")[0])
    arrow = next((tmp_path / "saved" / "train").glob("*.arrow"))
    for source in (column, dd, tmp_path / "saved", arrow):
        loaded = load_manifest(source, root, task="speech_transcription")
        encoded = encoder(loaded[0])
        assert torch.equal(encoded["input_features"], reference["input_features"]), source
        assert encoder.estimate_length(loaded[0]) == len(encoded["input_ids"])
    with pytest.raises(ValueError, match="has no split 'validation'"):
        load_manifest(dd, root, task="speech_transcription", split="validation")
    import soundfile
    samples, rate = soundfile.read(wav, dtype="float32")
    decoded = datasets.Dataset.from_list([{"id": "d", "audio": {"array": samples, "sampling_rate": rate}, "transcript": "x"}])
    row = load_manifest(decoded, root, task="speech_transcription")[0]
    assert encoder.estimate_length(row) == len(encoder(row)["input_ids"])
    assert np.allclose(encoder(row)["input_features"], reference["input_features"], atol=1e-5)


def test_lengths_are_computed_once_in_parallel_and_cached_by_what_decides_them(root, tmp_path, monkeypatch):
    from modeling_multimodal.data import length_cache

    rows = [{"id": str(i), "image": "images/red.png", "caption": "a small red circle " * (i % 5 + 1)} for i in range(40)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import shutil
    shutil.copytree(root / "images", tmp_path / "images")
    dataset = load_manifest(tmp_path / "rows.jsonl", tmp_path, task="image_caption")
    encoder = ExampleEncoder(PROCESSOR, task="image_caption")
    serial = [encoder.estimate_length(row) for row in dataset]
    monkeypatch.setattr(length_cache, "PARALLEL_MIN_ROWS", 10)
    cache = tmp_path / "cache"
    assert length_cache.cached_lengths(encoder, dataset, cache, workers=2) == serial  # two processes, order kept
    assert len(list(cache.glob("lengths-*.int32"))) == 1
    monkeypatch.setattr(ExampleEncoder, "estimate_length", lambda *a: pytest.fail("recomputed a cached length"))
    again = load_manifest(tmp_path / "rows.jsonl", tmp_path, task="image_caption")  # a repeated start
    assert length_cache.cached_lengths(encoder, again, cache) == serial
    shorter = ExampleEncoder(PROCESSOR, task="image_caption", max_length=20)
    assert length_cache.lengths_key(shorter, again) != length_cache.lengths_key(encoder, again)
    with open(tmp_path / "rows.jsonl", "a") as more:  # the manifest changed: a new key
        more.write(json.dumps({"id": "x", "image": "images/red.png", "caption": "the green triangle"}) + "\n")
    changed = load_manifest(tmp_path / "rows.jsonl", tmp_path, task="image_caption")
    assert length_cache.lengths_key(encoder, changed) != length_cache.lengths_key(encoder, again)
