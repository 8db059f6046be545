"""High resolution (issue 30): pixel-shuffle token compression and image tiling with a global view.

Each feature is checked against a reference computation written out here (a loop over patches, a loop over grids),
and tiling end to end on one batch of wide, tall, square and small images: the processor's placeholders, the model's
merged features, `_get_num_multimodal_tokens`, the collators, the length estimate, batched == one-by-one generation
and a save / load round trip all agree.
"""

import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from modeling_multimodal import MultimodalConfig, MultimodalForConditionalGeneration
from modeling_multimodal.configuration.media_tokens import best_tile_grid
from modeling_multimodal.data import ExampleEncoder, MultimodalCollator, load_manifest
from modeling_multimodal.processing import MultimodalProcessor
from modeling_multimodal.processing.image_tiling import tile_image
from modeling_multimodal.projectors import pixel_shuffle, pool_patch_grid
from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer
from modeling_multimodal.training.packing import PackingCollator

TOKENIZER = tiny_tokenizer()
# (height, width): wide, tall, square and larger than one crop, smaller than one crop (the tiny tower takes 32 px)
SIZES = [(32, 96), (96, 32), (64, 64), (20, 20)]


def build(**overrides):
    torch.manual_seed(0)
    return MultimodalForConditionalGeneration(tiny_config(TOKENIZER, **overrides)).eval()


def images(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


# --- pixel shuffle ------------------------------------------------------------------------------------
def reference_pixel_shuffle(features: torch.Tensor, stride: int) -> torch.Tensor:
    """The space-to-depth written as loops: output token (i, j) holds patches (i*s + a, j*s + b), a-major, then b."""
    n, patches, dim = features.shape
    side = int(patches**0.5)
    grid = features.view(n, side, side, dim)
    out = torch.empty(n, (side // stride) ** 2, stride * stride * dim)
    for i in range(side // stride):
        for j in range(side // stride):
            block = [grid[:, i * stride + a, j * stride + b] for a in range(stride) for b in range(stride)]
            out[:, i * (side // stride) + j] = torch.cat(block, dim=-1)
    return out


@pytest.mark.parametrize("side, stride", [(4, 2), (6, 3), (4, 1), (8, 4)])
def test_pixel_shuffle_equals_the_loop_reference_and_keeps_every_feature(side, stride):
    features = torch.randn(2, side * side, 5)
    shuffled = pixel_shuffle(features, stride)
    torch.testing.assert_close(shuffled, reference_pixel_shuffle(features, stride))
    assert shuffled.shape == (2, (side // stride) ** 2, 5 * stride * stride)
    assert pool_patch_grid(features, stride).shape[1] == shuffled.shape[1]  # the average pool's token count
    # the average pool is the mean of each shuffled token's stride^2 feature groups: nothing is lost, only rearranged
    torch.testing.assert_close(shuffled.view(2, -1, stride * stride, 5).mean(2), pool_patch_grid(features, stride))


def test_pixel_shuffle_model_counts_widths_and_round_trip(tmp_path):
    model = build(image_token_compression="pixel_shuffle", image_pool_stride=2)
    pooled = build(image_pool_stride=2)
    assert model.config.token_layout.image_tokens() == pooled.config.token_layout.image_tokens() == 4  # 4x4 -> 2x2
    assert model.model.multi_modal_projector["image"].linear_1.in_features == 4 * 32  # stride^2 x the tower width
    processor = MultimodalProcessor.from_config_and_components(model.config, TOKENIZER)
    batch = processor(text=["<image> a b"], images=images([(32, 32)]))
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded = MultimodalForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.image_token_compression == "pixel_shuffle"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits)


def test_pixel_shuffle_config_checks():
    with pytest.raises(ValueError, match="image_token_compression='bilinear'"):
        tiny_config(TOKENIZER, image_token_compression="bilinear")
    with pytest.raises(ValueError, match=r"video_spatial_pool_stride \(2\) = image_pool_stride \(1\)"):
        tiny_config(TOKENIZER, image_token_compression="pixel_shuffle", video_projector="image")
    shared = build(image_token_compression="pixel_shuffle", image_pool_stride=2, video_projector="image")
    videos = torch.randn(1, 4, 3, 32, 32)
    assert shared.model.encode_videos(videos).shape == (1, 2 * 4, 32)  # frames shuffled like images: 2 steps x 2x2


# --- the tile grid -----------------------------------------------------------------------------------
def reference_grid(height, width, tile, max_tiles):
    """LLaVA-NeXT's best fit written out: most image pixels kept in the canvas, then least canvas wasted."""
    best, best_key = None, None
    for rows in range(1, max_tiles + 1):
        for cols in range(1, max_tiles + 1):
            if rows * cols > max_tiles:
                continue
            scale = min(cols * tile / width, rows * tile / height)
            kept = min(int(width * scale) * int(height * scale), width * height)
            key = (kept, -(rows * cols * tile * tile - kept))
            if best_key is None or key > best_key:
                best, best_key = (rows, cols), key
    return best


GRID_CASES = [  # (height, width, max_tiles, expected (rows, cols))
    (32, 96, 4, (1, 3)), (96, 32, 4, (3, 1)), (64, 64, 4, (2, 2)), (20, 20, 4, (1, 1)), (32, 32, 4, (1, 1)),
    (64, 64, 3, (1, 1)), (40, 300, 6, (1, 6)), (300, 90, 6, (4, 1)), (33, 33, 9, (2, 2)),
]


@pytest.mark.parametrize("height, width, max_tiles, expected", GRID_CASES)
def test_tile_grid_follows_the_aspect_ratio(height, width, max_tiles, expected):
    assert best_tile_grid(height, width, 32, max_tiles) == expected == reference_grid(height, width, 32, max_tiles)


def test_tile_grid_matches_the_reference_on_random_sizes():
    rng = np.random.default_rng(0)
    for height, width, max_tiles in zip(rng.integers(1, 400, 200), rng.integers(1, 400, 200), rng.integers(1, 10, 200)):
        assert best_tile_grid(int(height), int(width), 32, int(max_tiles)) == reference_grid(height, width, 32, max_tiles)


def test_layout_counts_crops_and_markers():
    layout = tiny_config(TOKENIZER, image_max_tiles=4).token_layout  # 4x4 patches: 16 tokens per crop
    assert [layout.image_crops(g) for g in ((1, 1), (1, 3), (2, 2))] == [1, 4, 5]
    assert [layout.image_tokens(g) for g in ((1, 1), (1, 3), (2, 2))] == [17, 4 * 17, 5 * 17]
    newline = tiny_config(TOKENIZER, image_max_tiles=4, image_newline=True, image_pool_stride=2).token_layout
    assert newline.image_tokens((1, 2)) == 3 * (1 + 2 * 2 + 2)  # per crop: marker + 2x2 grid + 2 row ends
    with pytest.raises(ValueError, match="needs its tile grid"):
        layout.image_tokens()
    with pytest.raises(ValueError, match="tile grid 2x3 is outside"):
        layout.image_tokens((2, 3))
    with pytest.raises(ValueError, match="does not tile images"):
        tiny_config(TOKENIZER).token_layout.image_tokens((1, 2))
    with pytest.raises(ValueError, match="image_max_tiles must be an integer >= 0"):
        tiny_config(TOKENIZER, image_max_tiles=-1)


def test_tiles_are_the_resized_image_cut_row_by_row():
    image = np.random.default_rng(1).integers(0, 256, (40, 100, 3), dtype=np.uint8)
    crops, grid = tile_image(image, 32, 4, PIL.Image.BILINEAR)
    assert grid == (1, 3) and len(crops) == 4
    whole = np.asarray(PIL.Image.fromarray(image).resize((32, 32), PIL.Image.BILINEAR))
    canvas = np.asarray(PIL.Image.fromarray(image).resize((96, 32), PIL.Image.BILINEAR))
    np.testing.assert_array_equal(crops[0], whole)  # the global view first: the whole image, not a centre crop
    for col in range(3):
        np.testing.assert_array_equal(crops[1 + col], canvas[:, 32 * col : 32 * (col + 1)])


# --- tiling end to end -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiled():
    model = build(image_max_tiles=4)
    return model, MultimodalProcessor.from_config_and_components(model.config, TOKENIZER)


def test_processor_counts_equal_the_models_features_on_mixed_aspect_ratios(tiled):
    model, processor = tiled
    layout = model.config.token_layout
    texts = ["<image> a b", "<image> c <image>", "<image>"]
    batch = processor(text=texts, images=[images(SIZES[:1]), images(SIZES[1:3]), images(SIZES[3:])])
    assert batch["image_tiles"].tolist() == [[1, 3], [3, 1], [2, 2], [1, 1]]
    assert batch["pixel_values"].shape == (4 + 4 + 5 + 1, 3, 32, 32)
    expected = [layout.image_tokens(g) for g in ((1, 3), (3, 1), (2, 2), (1, 1))]
    placeholders = (batch["input_ids"] == model.config.image_token_id).sum(-1).tolist()
    assert placeholders == [expected[0], expected[1] + expected[2], expected[3]]
    counts = processor._get_num_multimodal_tokens(image_sizes=SIZES)
    assert counts["num_image_tokens"] == expected and counts["num_image_patches"] == [4, 4, 5, 1]
    with torch.no_grad():
        features = model.get_image_features(batch["pixel_values"], batch["image_tiles"]).pooler_output
        merged = model.model.merge_media(batch["input_ids"], pixel_values=batch["pixel_values"], image_tiles=batch["image_tiles"])
    assert [f.shape[0] for f in features] == expected
    mask = batch["input_ids"] == model.config.image_token_id
    torch.testing.assert_close(merged.inputs_embeds[mask], torch.cat(features))


def test_each_crop_follows_its_marker(tiled):
    model, processor = tiled
    batch = processor(text=["<image>"], images=images(SIZES[2:3]))  # a 2x2 grid: global view + 4 tiles
    markers = model.model.multi_modal_projector["image"].tile_markers
    with torch.no_grad():
        (tokens,) = model.get_image_features(batch["pixel_values"], batch["image_tiles"]).pooler_output
        crops = model.model._image_tokens(model.model._vision_tower_outputs(batch["pixel_values"]).hidden_states)
    crops_with_markers = tokens.view(5, 17, -1)
    torch.testing.assert_close(crops_with_markers[:, 1:], crops)  # global view, then tiles row by row
    expected = torch.stack([markers.global_view] + [markers.row[r] + markers.column[c] for r in range(2) for c in range(2)])
    torch.testing.assert_close(crops_with_markers[:, 0], expected.detach())
    assert len({tuple(m.tolist()) for m in expected.detach()}) == 5  # every crop has its own marker


def test_mismatched_tiles_are_refused(tiled):
    model, processor = tiled
    batch = processor(text=["<image>"], images=images(SIZES[:1]))
    with pytest.raises(ValueError, match=r"image_tiles \[\(2, 2\)\] need 5 crops .* pixel_values has 4"):
        model.get_image_features(batch["pixel_values"], torch.tensor([[2, 2]]))
    with pytest.raises(ValueError, match="max_tiles=2 but the model tiles images into at most image_max_tiles=4"):
        processor(text=["<image>"], images=images(SIZES[:1]), max_tiles=2)


def test_batched_generation_equals_one_by_one(tiled):
    model, processor = tiled
    texts, per_sample = ["<image> a b", "c <image>", "<image>"], [images(SIZES[:1]), images(SIZES[1:2]), images(SIZES[2:3])]
    batch = processor(text=texts, images=per_sample, padding_side="left")
    generated = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    for row, (text, media) in enumerate(zip(texts, per_sample)):
        alone = processor(text=[text], images=[media])
        one = model.generate(**alone, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert generated[row, -4:].tolist() == one[0, -4:].tolist()


def test_collators_and_length_estimate_follow_each_images_grid(tiled, tmp_path):
    model, processor = tiled
    for index, (height, width) in enumerate(SIZES):
        images([(height, width)], seed=index)[0].save(tmp_path / f"{index}.png")
    rows = [{"id": f"img-{i}", "image": f"{i}.png", "caption": "a small red circle"} for i in range(len(SIZES))]
    dataset = load_manifest(datasets.Dataset.from_list(rows), tmp_path, task="image_caption")
    encoder = ExampleEncoder(processor, task="image_caption")
    encoded = [encoder(row) for row in dataset]
    assert [encoder.estimate_length(row) for row in dataset] == [len(e["input_ids"]) for e in encoded]
    for batch in (MultimodalCollator(TOKENIZER.pad_token_id)(encoded), PackingCollator(TOKENIZER.pad_token_id, 400)(encoded)):
        assert batch["image_tiles"].tolist() == [[1, 3], [3, 1], [2, 2], [1, 1]]
        with torch.no_grad():
            loss = model(**{k: v for k, v in batch.items() if k != "segment_ids"}).loss
        assert torch.isfinite(loss)


def test_tiled_round_trip_and_markers_train(tiled, tmp_path):
    model, processor = tiled
    batch = processor(text=["<image> a b", "<image>"], images=[images(SIZES[:1]), images(SIZES[1:2])])
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["image_max_tiles"] == 4
    reloaded, reprocessor = (MultimodalForConditionalGeneration.from_pretrained(tmp_path).eval(), MultimodalProcessor.from_pretrained(tmp_path))
    again = reprocessor(text=["<image> a b", "<image>"], images=[images(SIZES[:1]), images(SIZES[1:2])])
    assert torch.equal(again["input_ids"], batch["input_ids"]) and torch.equal(again["image_tiles"], batch["image_tiles"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**again).logits, logits)
    trained = build(image_max_tiles=4).train()
    trained(**batch, labels=batch["input_ids"]).loss.backward()
    markers = trained.model.multi_modal_projector["image"].tile_markers
    assert markers.global_view.grad.abs().sum() > 0 and markers.row.grad[:3].abs().sum() > 0


def test_tiling_is_off_by_default():
    config = tiny_config(TOKENIZER)
    assert config.image_max_tiles == 0 and config.image_token_compression == "avg_pool"
    processor = MultimodalProcessor.from_config_and_components(config, TOKENIZER)
    batch = processor(text=["<image>"], images=images(SIZES[:1]))
    assert "image_tiles" not in batch and batch["pixel_values"].shape == (1, 3, 32, 32)
    assert MultimodalConfig.from_dict(config.to_dict()).image_max_tiles == 0


def test_retrieval_touch_and_augmentation_know_tiled_images(tiled):
    from modeling_multimodal.losses import touch_unused_modules
    from modeling_multimodal.training.augmentation import Augmentation
    from modeling_multimodal.training.recipe import AugmentSpec

    model = build(image_max_tiles=4, retrieval_head=True)
    _, processor = tiled
    batch = processor(text=["<image><image>"], images=[images(SIZES[:2])])
    with torch.no_grad():
        together = model.get_retrieval_embeddings(pixel_values=batch["pixel_values"], image_tiles=batch["image_tiles"])
        alone = [processor(text=["<image>"], images=[[image]]) for image in images(SIZES[:2])]
        each = [model.get_retrieval_embeddings(pixel_values=a["pixel_values"], image_tiles=a["image_tiles"]) for a in alone]
    assert together.shape[0] == 2  # one embedding per image, not per crop
    torch.testing.assert_close(together, torch.cat(each))
    unfrozen = build(image_max_tiles=4, freeze_vision_tower=False).train()
    for candidate in (unfrozen, build(image_max_tiles=4).train()):  # trainable tower, frozen tower
        (touch_unused_modules(candidate, {}, torch.zeros(1)) * 0).backward()
        markers = candidate.model.multi_modal_projector["image"].tile_markers
        assert all(p.grad is not None for p in markers.parameters())  # reached, so DDP / FSDP see them used
    with pytest.raises(ValueError, match=r"augment.hflip, augment.rotation transform\(s\) each crop of a tiled image"):
        Augmentation(AugmentSpec(hflip=0.5, rotation=5, flip_word_swaps={"left": "right", "right": "left"}), "image_caption", 0, processor)
    Augmentation(AugmentSpec(colour_jitter=0.2), "image_caption", 0, processor)  # colour alone is fine
