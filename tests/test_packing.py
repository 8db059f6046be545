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
from modeling_multimodal.training import PackedBatchSampler, PackingCollator, first_fit, use_per_sample_attention
from modeling_multimodal.training.packing import PACKED_ATTENTION, per_sample_sdpa, varlen_kwargs

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


@pytest.mark.parametrize("attention", ["sdpa", "eager", PACKED_ATTENTION])
def test_packed_losses_equal_unpacked_losses(examples, attention):
    torch.manual_seed(0)
    model = MultimodalForConditionalGeneration(tiny_config(TOKENIZER, attn_implementation="sdpa" if attention == PACKED_ATTENTION else attention))
    model.eval()
    if attention == PACKED_ATTENTION:
        assert use_per_sample_attention(model)
        assert model.config.text_config._attn_implementation == PACKED_ATTENTION
        assert model.config.vision_config._attn_implementation == "sdpa"  # the towers keep theirs
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
        with_cache = token_losses(model(**packed, use_cache=True).logits, packed["labels"])
        if attention == PACKED_ATTENTION:  # the boundaries are explicit (cu_seq_lens), so a cache changes nothing
            torch.testing.assert_close(with_cache, losses, atol=1e-5, rtol=1e-5)
        else:  # with a cache, transformers skips packed-sequence detection: samples attend to each other
            assert not torch.allclose(with_cache, losses, atol=1e-4)


def test_varlen_kwargs_mark_every_sample_and_the_padding():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])  # row 0: 3 + 2 + 1 padding; row 1: 4 + 2 padding
    kwargs = varlen_kwargs(positions)
    assert kwargs["cu_seq_lens_q"].tolist() == kwargs["cu_seq_lens_k"].tolist() == [0, 3, 5, 6, 10, 12]


def block_diagonal_causal_mask(cu_seq_lens, rows, length):
    """(rows, 1, seq, seq) boolean mask: causal within each packed sample, nothing across samples."""
    sample = torch.zeros(rows * length, dtype=torch.long)
    sample[cu_seq_lens[1:-1].long()] = 1
    sample = sample.cumsum(0).view(rows, length)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return ((sample[:, :, None] == sample[:, None, :]) & causal)[:, None]


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_per_sample_attention_equals_masked_sdpa_with_gradients(kv_heads):
    """Outputs and gradients of per-sample SDPA equal SDPA over the whole row with a block-diagonal mask."""
    generator = torch.Generator().manual_seed(0)
    rows, heads, length, dim = 2, 4, 12, 8
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0, 1, 0, 1, 2]])
    cu_seq_lens = varlen_kwargs(positions)["cu_seq_lens_q"]
    inputs = [torch.randn(rows, h, length, dim, generator=generator, requires_grad=True) for h in (heads, kv_heads, kv_heads)]
    module = torch.nn.Module().eval()
    module.num_key_value_groups = heads // kv_heads  # read by transformers' SDPA function (the plain path)
    ours, _ = per_sample_sdpa(module, *inputs, None, scaling=0.3, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens)
    mask = block_diagonal_causal_mask(cu_seq_lens, rows, length)
    reference = F.scaled_dot_product_attention(*inputs, attn_mask=mask, scale=0.3, enable_gqa=kv_heads != heads).transpose(1, 2)
    torch.testing.assert_close(ours, reference)
    weights = torch.randn(ours.shape, generator=generator)
    ours_grads = torch.autograd.grad((ours * weights).sum(), inputs)
    reference_grads = torch.autograd.grad((reference * weights).sum(), inputs)
    for got, expected in zip(ours_grads, reference_grads):
        torch.testing.assert_close(got, expected)
    # without boundaries it is plain SDPA (causal over the whole row)
    plain, _ = per_sample_sdpa(module, *inputs, None, scaling=0.3)
    expected = F.scaled_dot_product_attention(*inputs, is_causal=True, scale=0.3, enable_gqa=kv_heads != heads).transpose(1, 2)
    torch.testing.assert_close(plain, expected)


BAD_BOUNDARIES = [
    ("short_of_the_batch", [0, 5, 20], "ends at 20 but the batch holds 2 rows × 12 tokens"),
    ("sample_across_rows", [0, 5, 14, 24], "crosses the end of row 0"),
]


@pytest.mark.parametrize("name,bounds,message", BAD_BOUNDARIES, ids=[c[0] for c in BAD_BOUNDARIES])
def test_per_sample_attention_refuses_boundaries_that_do_not_fit(name, bounds, message):
    query = key = value = torch.zeros(2, 2, 12, 4)
    with pytest.raises(ValueError, match=message):
        per_sample_sdpa(torch.nn.Module(), query, key, value, None, cu_seq_lens_q=torch.tensor(bounds))


def test_packed_training_losses_and_gradients_match_the_masked_row(examples):
    """In training mode (LoRA-free, everything trainable) per-sample attention gives the masked row's loss and gradients."""
    batch = PackingCollator(PAD, max_length=100)(examples)
    results = {}
    for attention in ("sdpa", PACKED_ATTENTION):
        torch.manual_seed(0)
        model = MultimodalForConditionalGeneration(tiny_config(TOKENIZER)).train()
        if attention == PACKED_ATTENTION:
            use_per_sample_attention(model)
        loss = model(**batch, use_cache=False, return_logits=False).loss
        loss.backward()
        results[attention] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(results[PACKED_ATTENTION][0], results["sdpa"][0])
    assert results[PACKED_ATTENTION][1].keys() == results["sdpa"][1].keys()
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results[PACKED_ATTENTION][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


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
