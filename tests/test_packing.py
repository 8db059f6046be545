"""Packing: bin planning, packed-row layout, and per-sample losses equal to the samples run alone."""

import json

import datasets
import numpy as np
import PIL.Image
import pytest
import soundfile
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.processing import MultimodalProcessor
from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer
from modeling_multimodal.data import EncodedDataset, ExampleEncoder, MultimodalCollator, load_manifest
from modeling_multimodal.training import PackedBatchSampler, PackingCollator, first_fit

TOKENIZER = tiny_tokenizer()
CONFIG = tiny_config(TOKENIZER)
PROCESSOR = MultimodalProcessor.from_config_and_components(CONFIG, TOKENIZER)
PAD = TOKENIZER.pad_token_id

FFD_CASES = [
    ("fits_in_one", [3, 4, 5], 12, [[2, 1, 0]]),
    ("exact_fill", [6, 6, 6, 6], 12, [[0, 1], [2, 3]]),
    ("decreasing_first_fit", [2, 9, 3, 7, 5], 10, [[1], [3, 2], [4, 0]]),
    ("one_each", [8, 8, 8], 10, [[0], [1], [2]]),
]


@pytest.mark.parametrize("name,lengths,max_length,expected", FFD_CASES, ids=[c[0] for c in FFD_CASES])
def test_first_fit(name, lengths, max_length, expected):
    assert first_fit(lengths, max_length) == expected


def test_in_order_first_fit_keeps_order():
    assert first_fit([2, 9, 3, 7, 5], 10, decreasing=False) == [[0, 2, 4], [1], [3]]


def test_over_long_item_is_refused():
    with pytest.raises(ValueError, match="Item 1 is 11 tokens, longer than max_length=10"):
        first_fit([3, 11], 10)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / "red.png")
    soundfile.write(root / "one.wav", (rng.standard_normal(8_000) * 0.1).astype("float32"), 16_000)
    soundfile.write(root / "two.wav", (rng.standard_normal(13_000) * 0.1).astype("float32"), 16_000)
    return root


@pytest.fixture(scope="module")
def examples(root):
    """Encoded examples with an image, audio clips of two lengths and text only."""
    chat = [{"role": "user", "content": "what happens in the video"}, {"role": "assistant", "content": "the green triangle is in the middle"}]
    rows = [
        ("image_caption", {"id": "img", "image": "red.png", "caption": "a small red circle in the top left"}),
        ("speech_transcription", {"id": "wav-1", "audio": "one.wav", "transcript": "a big blue square"}),
        (None, {"id": "txt", "messages": json.dumps(chat)}),
        ("speech_transcription", {"id": "wav-2", "audio": "two.wav", "transcript": "what is said in the audio"}),
        ("image_caption", {"id": "img-2", "image": "red.png", "caption": "a big blue square moving right"}),
    ]
    encoded = []
    for task, row in rows:
        dataset = load_manifest(datasets.Dataset.from_list([row]), root, task=task)
        encoded.append(ExampleEncoder(PROCESSOR, task=task)(dataset[0]))
    return encoded


def test_packed_rows_restart_positions_and_mask_boundaries(examples):
    max_length = 100
    batch = PackingCollator(PAD, max_length)(examples)
    assert "attention_mask" not in batch
    bins = first_fit([len(e["input_ids"]) for e in examples], max_length, decreasing=False)
    assert batch["input_ids"].shape[0] == len(bins) > 1 and batch["input_ids"].shape[1] <= max_length
    order = [i for row in bins for i in row]
    for sample, index in enumerate(order):
        row, columns = (batch["segment_ids"] == sample).nonzero(as_tuple=True)
        example = examples[index]
        assert len(row.unique()) == 1 and len(columns) == len(example["input_ids"])
        assert torch.equal(batch["input_ids"][row, columns], example["input_ids"])
        assert torch.equal(batch["position_ids"][row, columns], torch.arange(len(columns)))
        assert batch["labels"][row[0], columns[0]] == -100
        assert torch.equal(batch["labels"][row, columns][1:], example["labels"][1:])
    padding = batch["segment_ids"] == -1
    assert (batch["labels"][padding] == -100).all() and (batch["input_ids"][padding] == PAD).all()
    for row in range(batch["input_ids"].shape[0]):  # trailing padding: its own positions from 0
        count = int(padding[row].sum())
        assert torch.equal(batch["position_ids"][row, batch["input_ids"].shape[1] - count :], torch.arange(count))
    # media and pair texts follow the flat sample order
    images = [examples[i]["pixel_values"] for i in order if "pixel_values" in examples[i]]
    assert torch.equal(batch["pixel_values"], torch.cat(images))
    frames = [examples[i]["input_features"].shape[-1] for i in order if "input_features" in examples[i]]
    assert batch["input_features_mask"].sum(-1).tolist() == frames
    assert batch["pair_input_ids"].shape[0] == len(examples) and batch["ctc_labels"].shape[0] == 2


def token_losses(logits, labels):
    """(batch, seq) next-token loss at each position, 0 where the shifted label is -100."""
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=-100, reduction="none")
    return F.pad(losses, (0, 1))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked_losses(examples, attention):
    torch.manual_seed(0)
    model = MultimodalForConditionalGeneration(tiny_config(TOKENIZER, attn_implementation=attention)).eval()
    alone = []
    with torch.no_grad():
        for example in examples:
            batch = MultimodalCollator(PAD)([example])
            alone.append(token_losses(model(**batch, use_cache=False).logits, batch["labels"]).sum())
        packed = PackingCollator(PAD, max_length=100)(examples)
        order = [i for row in first_fit([len(e["input_ids"]) for e in examples], 100, decreasing=False) for i in row]
        out = model(**packed, use_cache=False)
        losses = token_losses(out.logits, packed["labels"])
        for sample, index in enumerate(order):
            torch.testing.assert_close(losses[packed["segment_ids"] == sample].sum(), alone[index], atol=1e-5, rtol=1e-5)
        # the model's own mean loss agrees with the per-sample sums
        labelled = (packed["labels"][:, 1:] != -100).sum()
        torch.testing.assert_close(out.loss_text, torch.stack(alone).sum() / labelled, atol=1e-5, rtol=1e-5)
        # with a cache, transformers skips packed-sequence detection: samples attend to each other
        leaky = token_losses(model(**packed, use_cache=True).logits, packed["labels"])
        assert not torch.allclose(leaky, losses, atol=1e-4)


def test_contrastive_loss_runs_on_packed_rows(examples):
    torch.manual_seed(0)
    model = MultimodalForConditionalGeneration(tiny_config(TOKENIZER, contrastive_loss_weight=1.0, auxiliary_loss_weight=1.0)).eval()
    out = model(**PackingCollator(PAD, max_length=100)(examples), use_cache=False)
    assert torch.isfinite(out.loss_contrastive) and torch.isfinite(out.loss_auxiliary)


def test_packed_loader_with_two_workers(root):
    captions = ["a small red circle", "a big blue square moving right", "the green triangle is in the middle"]
    rows = [{"id": f"img-{i}", "image": "red.png", "caption": captions[i % 3]} for i in range(6)]
    dataset = load_manifest(datasets.Dataset.from_list(rows), root, task="image_caption")
    encoder = ExampleEncoder(PROCESSOR, task="image_caption")
    lengths = encoder.estimate_lengths(dataset)
    sampler = PackedBatchSampler(lengths, max_length=64, rows_per_batch=2, seed=0)
    loader = DataLoader(EncodedDataset(dataset, encoder), batch_sampler=sampler, collate_fn=PackingCollator(PAD, 64), num_workers=2)
    batches = list(loader)
    assert sum(int(b["segment_ids"].max()) + 1 for b in batches) == 6
    for batch in batches:
        assert batch["input_ids"].shape[0] <= 2 and batch["pixel_values"].shape[0] == int(batch["segment_ids"].max()) + 1


def test_packed_batch_sampler_fills_rows_deterministically():
    lengths = np.random.default_rng(0).integers(5, 120, 300).tolist()
    sampler = PackedBatchSampler(lengths, max_length=256, rows_per_batch=4, seed=1, window=100)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(300)) and len(sampler) == len(batches)
    assert batches == list(PackedBatchSampler(lengths, max_length=256, rows_per_batch=4, seed=1, window=100))
    for batch in batches:
        assert len(first_fit([lengths[i] for i in batch], 256, decreasing=False)) <= 4
    real = sum(lengths) / (256 * 4 * len(batches))
    assert real > 0.9
    sampler.set_epoch(1)
    assert list(sampler) != batches
