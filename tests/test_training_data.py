"""Training data: manifests, task templates, encoding and label masking, collation, length grouping, workers."""

import json
import pickle

import av
import datasets
import numpy as np
import pandas as pd
import PIL.Image
import pytest
import soundfile
import torch
from torch.utils.data import DataLoader

from modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.processing import MultimodalProcessor
from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer
from modeling_multimodal.data import (
    EncodedDataset,
    ExampleEncoder,
    LengthGroupedBatchSampler,
    MultimodalCollator,
    TaskSpec,
    build_example,
    load_manifest,
)

TOKENIZER = tiny_tokenizer()
CONFIG = tiny_config(TOKENIZER)
PROCESSOR = MultimodalProcessor.from_config_and_components(CONFIG, TOKENIZER)
MEDIA_IDS = [CONFIG.image_token_id, CONFIG.audio_token_id, CONFIG.video_token_id]


# --- media made on the fly -------------------------------------------------------------------------
def write_image(path, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)


def write_wav(path, seconds, rate=22_050):
    soundfile.write(path, (np.random.default_rng(1).standard_normal(int(seconds * rate)) * 0.1).astype("float32"), rate)


def write_mp4(path, frames=8, side=32):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=6)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        rng = np.random.default_rng(2)
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "media").mkdir()
    write_image(root / "media" / "red.png", seed=0)
    write_image(root / "media" / "blue.png", seed=1)
    write_wav(root / "media" / "short.wav", 0.7)
    write_wav(root / "media" / "long.wav", 1.3, rate=16_000)
    write_mp4(root / "media" / "clip.mp4")
    (root / "media" / "broken.png").write_bytes(b"not an image")
    return root


CHAT_ROW = {
    "id": "chat-0",
    "messages": [
        {"role": "user", "content": [{"type": "image", "image": "media/red.png"}, {"type": "text", "text": "describe the image."}]},
        {"role": "assistant", "content": "a small red circle"},
        {"role": "user", "content": "what is in the middle?"},
        {"role": "assistant", "content": "the green triangle"},
    ],
}
IMAGE_ROW = {"id": "img-0", "image": "media/red.png", "caption": "a small red circle in the top left"}
IMAGE_ROW_2 = {"id": "img-1", "image": "media/blue.png", "caption": "a big blue square"}
AUDIO_ROW = {"id": "wav-0", "audio": "media/short.wav", "transcript": "what is said in the audio"}
AUDIO_ROW_2 = {"id": "wav-1", "audio": "media/long.wav", "transcript": "a big blue square"}
VIDEO_ROW = {"id": "vid-0", "video": "media/clip.mp4", "caption": "a big blue square moving right"}
TEXT_ROW = {"id": "txt-0", "messages": [{"role": "user", "content": "describe the image"}, {"role": "assistant", "content": "a small red circle"}]}


def as_dataset(rows):
    """In memory, chat messages go in as JSON strings: Arrow cannot mix string and list contents in one column."""
    return datasets.Dataset.from_list([{**r, "messages": json.dumps(r["messages"])} if "messages" in r else r for r in rows])


def encode(row, task, root):
    dataset = load_manifest(as_dataset([row]), root, task=task)
    return ExampleEncoder(PROCESSOR, task=task)(dataset[0]), dataset[0]


# --- task templates and label masking --------------------------------------------------------------
LABEL_CASES = [
    ("image_caption", IMAGE_ROW, IMAGE_ROW["caption"]),
    ("speech_transcription", AUDIO_ROW, AUDIO_ROW["transcript"]),
    ("video_caption", VIDEO_ROW, VIDEO_ROW["caption"]),
    (None, TEXT_ROW, "a small red circle"),
]


@pytest.mark.parametrize("task,row,response", LABEL_CASES, ids=[c[1]["id"] for c in LABEL_CASES])
def test_only_response_and_eos_are_trained(root, task, row, response):
    encoded, resolved = encode(row, task, root)
    ids, labels = encoded["input_ids"], encoded["labels"]
    trained = labels != -100
    # the trained tokens are exactly the response + EOS, at the end
    assert TOKENIZER.decode(labels[trained]) == TOKENIZER.decode(TOKENIZER(response, add_special_tokens=False)["input_ids"] + [TOKENIZER.eos_token_id])
    assert labels[trained][-1] == TOKENIZER.eos_token_id and trained[-1]
    assert torch.equal(labels[trained], ids[trained])
    first = int(trained.nonzero()[0])
    assert not trained[:first].any() and trained[first:].all()
    assert not trained[torch.isin(ids, torch.tensor(MEDIA_IDS))].any()
    # the prompt is exactly what the processor makes of the chat template with a generation prompt
    example = build_example(resolved, task)
    prompt = PROCESSOR.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=False)
    media = example["media"]
    alone = PROCESSOR(text=[prompt], images=media["image"] or None, audio=media["audio"] or None, videos=media["video"] or None)
    assert torch.equal(ids[:first], alone["input_ids"][0])


def test_chat_row_trains_every_assistant_turn_or_the_last_one(root):
    dataset = load_manifest(as_dataset([CHAT_ROW]), root)
    every = ExampleEncoder(PROCESSOR)(dataset[0])
    trained = every["labels"] != -100
    eos = TOKENIZER.eos_token_id
    replies = [TOKENIZER(t, add_special_tokens=False)["input_ids"] + [eos] for t in ("a small red circle", "the green triangle")]
    assert every["labels"][trained].tolist() == replies[0] + replies[1]
    assert every["pixel_values"].shape == (1, 3, 32, 32)
    last = ExampleEncoder(PROCESSOR, assistant_turns="last")(dataset[0])
    assert torch.equal(last["input_ids"], every["input_ids"])  # the same tokens, fewer of them trained
    assert last["labels"][last["labels"] != -100].tolist() == replies[1]


def test_task_outputs_ctc_and_pair_text(root):
    encoded, _ = encode(AUDIO_ROW, "speech_transcription", root)
    transcript = TOKENIZER(AUDIO_ROW["transcript"], add_special_tokens=False)["input_ids"]
    assert encoded["ctc_labels"].tolist() == [transcript]
    assert encoded["pair_input_ids"].tolist() == transcript
    assert encoded["input_features"].shape[:2] == (1, 80) and encoded["input_features_mask"].all()


def test_retrieval_only_rows_have_no_lm_target(root):
    encoded, _ = encode(IMAGE_ROW, "image_text_pair", root)
    assert (encoded["labels"] == -100).all() and "pair_input_ids" in encoded


def test_custom_task_spec_fills_fields_and_checks_media_count(root):
    spec = TaskSpec("vqa", "<image> {question}", "answer", {"image": "images"})
    row = {"id": "q", "images": ["media/red.png"], "question": "what is in the top left?", "answer": "a small red circle"}
    encoded, _ = encode(row, spec, root)
    assert encoded["pixel_values"].shape[0] == 1
    with pytest.raises(ValueError, match="'q'.*2 image items but 1 placeholders"):
        encode({**row, "images": ["media/red.png", "media/blue.png"]}, spec, root)


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="Unknown task 'image_captioning'.*image_caption"):
        ExampleEncoder(PROCESSOR, task="image_captioning")


# --- manifests --------------------------------------------------------------------------------------
ESCAPE_CASES = [
    ("parent", "../outside.png"),
    ("nested_parent", "media/../../outside.png"),
    ("absolute_elsewhere", "/etc/passwd"),
]


@pytest.mark.parametrize("name,path", ESCAPE_CASES, ids=[c[0] for c in ESCAPE_CASES])
def test_paths_leaving_the_root_are_refused(root, name, path):
    with pytest.raises(ValueError, match=rf"Row 'bad-1'.*{path}.*leaves the data root"):
        load_manifest(as_dataset([IMAGE_ROW, {**IMAGE_ROW, "id": "bad-1", "image": path}]), root, task="image_caption")
    chat = {"id": "bad-1", "messages": [{"role": "user", "content": [{"type": "image", "image": path}]}]}
    with pytest.raises(ValueError, match=r"Row 'bad-1'.*leaves the data root"):
        load_manifest(as_dataset([chat]), root)


def test_paths_inside_the_root_are_resolved(root):
    rows = [{**IMAGE_ROW, "image": "media/../media/red.png"}, {**IMAGE_ROW_2, "image": str(root / "media" / "blue.png")}]
    dataset = load_manifest(as_dataset(rows), root, task="image_caption")
    assert dataset["image"] == [str(root / "media" / "red.png"), str(root / "media" / "blue.png")]


def write_manifest(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        frame = pd.DataFrame([{**row, "messages": json.dumps(row["messages"])} if "messages" in row else row for row in rows])
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_manifest_formats_load(root, tmp_path, suffix):
    captions = tmp_path / f"captions{suffix}"
    write_manifest(captions, [IMAGE_ROW, IMAGE_ROW_2])
    dataset = load_manifest(captions, root, task="image_caption", cache_dir=str(tmp_path / "cache"))
    assert dataset["id"] == ["img-0", "img-1"] and dataset[1]["image"] == str(root / "media" / "blue.png")
    encoded = ExampleEncoder(PROCESSOR, task="image_caption")(dataset[0])
    assert encoded["pixel_values"].shape == (1, 3, 32, 32)

    chats = tmp_path / f"chats{suffix}"
    write_manifest(chats, [CHAT_ROW, TEXT_ROW])
    dataset = load_manifest(chats, root, cache_dir=str(tmp_path / "cache"))
    example = build_example(dataset[0])
    assert example["media"]["image"] == [str(root / "media" / "red.png")] and example["response"] == "the green triangle"


def test_missing_task_columns_are_named(root):
    with pytest.raises(ValueError, match=r"no column\(s\) \['transcript'\] that task 'speech_transcription' reads"):
        load_manifest(as_dataset([{"audio": "media/short.wav", "text": "a"}]), root, task="speech_transcription")


def test_rows_without_ids_get_their_index(root, tmp_path):
    dataset = load_manifest(as_dataset([{"image": "media/red.png", "caption": "a"}]), root, task="image_caption")
    assert dataset["id"] == ["0"]


BAD_MEDIA_CASES = [
    ("missing", "media/nothing.png", "does not exist"),
    ("unreadable", "media/broken.png", "broken.png"),
]


@pytest.mark.parametrize("name,path,message", BAD_MEDIA_CASES, ids=[c[0] for c in BAD_MEDIA_CASES])
def test_bad_media_names_row_and_file(root, name, path, message):
    with pytest.raises(ValueError, match=rf"Row 'img-9'.*{message}") as error:
        encode({**IMAGE_ROW, "id": "img-9", "image": path}, "image_caption", root)
    assert path.split("/")[-1] in str(error.value)


# --- lengths ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,row", [(t, r) for t, r, _ in LABEL_CASES] + [("speech_transcription", AUDIO_ROW_2)])
def test_estimated_length_equals_encoded_length(root, task, row):
    encoded, resolved = encode(row, task, root)
    assert ExampleEncoder(PROCESSOR, task=task).estimate_length(resolved) == len(encoded["input_ids"])


def test_length_grouping_makes_similar_batches_deterministically():
    lengths = np.random.default_rng(0).integers(10, 500, 400).tolist()
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, group_batches=10)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(400)) and len(batches) == len(sampler)
    assert batches == list(LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, group_batches=10))
    assert batches != list(LengthGroupedBatchSampler(lengths, batch_size=8, seed=4, group_batches=10))
    sampler.set_epoch(1)
    assert list(sampler) != batches

    def real_fraction(batches):
        return sum(lengths[i] for b in batches for i in b) / sum(len(b) * max(lengths[i] for i in b) for b in batches)

    shuffled = np.random.default_rng(0).permutation(400).tolist()
    random_batches = [shuffled[i : i + 8] for i in range(0, 400, 8)]
    assert real_fraction(batches) > 0.9 and real_fraction(random_batches) < 0.7


# --- collation --------------------------------------------------------------------------------------
def encoded_batch(root):
    rows = [(None, TEXT_ROW), ("image_caption", IMAGE_ROW), ("speech_transcription", AUDIO_ROW),
            ("video_caption", VIDEO_ROW), ("speech_transcription", AUDIO_ROW_2), ("image_caption", IMAGE_ROW_2)]
    return [encode(row, task, root)[0] for task, row in rows]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_and_orders_media_by_sample(root, side):
    examples = encoded_batch(root)
    batch = MultimodalCollator(TOKENIZER.pad_token_id, padding_side=side)(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (6, longest)
    for row, example in enumerate(examples):
        real = batch["attention_mask"][row].bool()
        assert torch.equal(batch["input_ids"][row][real], example["input_ids"])
        assert torch.equal(batch["labels"][row][real], example["labels"]) and (batch["labels"][row][~real] == -100).all()
        assert real[-1] if side == "left" else real[0]
    # media in sample order: images of samples 1 and 5, audio of samples 2 and 4
    assert torch.equal(batch["pixel_values"], torch.cat([examples[1]["pixel_values"], examples[5]["pixel_values"]]))
    assert batch["pixel_values_videos"].shape == (1, 4, 3, 32, 32)
    frames = [e["input_features"].shape[-1] for e in (examples[2], examples[4])]
    assert batch["input_features"].shape == (2, 80, max(frames))
    assert batch["input_features_mask"].sum(-1).tolist() == frames
    assert torch.equal(batch["input_features"][0, :, : frames[0]], examples[2]["input_features"][0])
    assert torch.equal(batch["ctc_labels"][1, : examples[4]["ctc_labels"].shape[1]], examples[4]["ctc_labels"][0])
    assert (batch["ctc_labels"][0, examples[2]["ctc_labels"].shape[1] :] == -100).all()
    # pair text: one row per sample, all padding for the text-only sample
    assert batch["pair_input_ids"].shape[0] == 6 and batch["pair_attention_mask"].sum(-1).tolist()[0] == 0
    assert torch.equal(batch["pair_input_ids"][1][batch["pair_attention_mask"][1].bool()], examples[1]["pair_input_ids"])


def test_mixed_batch_runs_through_the_model_with_all_three_losses(root):
    torch.manual_seed(0)
    model = MultimodalForConditionalGeneration(tiny_config(TOKENIZER, auxiliary_loss_weight=0.5, contrastive_loss_weight=0.5)).eval()
    batch = MultimodalCollator(TOKENIZER.pad_token_id)(encoded_batch(root))
    out = model(**batch, use_cache=False)
    assert all(torch.isfinite(term) for term in (out.loss, out.loss_text, out.loss_auxiliary, out.loss_contrastive))


def test_batch_holds_only_the_modalities_present(root):
    batch = MultimodalCollator(TOKENIZER.pad_token_id)([encode(TEXT_ROW, None, root)[0], encode(CHAT_ROW, None, root)[0]])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}


# --- DataLoader workers -----------------------------------------------------------------------------
def test_dataloader_with_two_workers_matches_in_process(root):
    rows = [IMAGE_ROW, IMAGE_ROW_2, {**IMAGE_ROW, "id": "img-2"}, {**IMAGE_ROW_2, "id": "img-3"}]
    dataset = load_manifest(as_dataset(rows), root, task="image_caption")
    encoder = ExampleEncoder(PROCESSOR, task="image_caption")
    assert pickle.loads(pickle.dumps(encoder)).estimate_length(dataset[0]) == encoder.estimate_length(dataset[0])
    sampler = LengthGroupedBatchSampler(encoder.estimate_lengths(dataset), batch_size=2, seed=0)
    collator = MultimodalCollator(TOKENIZER.pad_token_id)

    def load(workers):
        loader = DataLoader(EncodedDataset(dataset, encoder), batch_sampler=sampler, collate_fn=collator, num_workers=workers)
        return list(loader)

    in_process, workers = load(0), load(2)
    assert len(workers) == 2
    for a, b in zip(in_process, workers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
