"""Augmentation: captions stay true on demo samples, draws are seeded per (seed, epoch, index), rules and recipe keys."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_multimodal.demo_data import make_demo_data
from modeling_multimodal.demo_data.grammar import COLUMNS, ROWS, position_name, vocabulary
from modeling_multimodal.processing import MultimodalProcessor
from modeling_multimodal.testing_utils import tiny_config
from modeling_multimodal.tokenization import build_tokenizer
from modeling_multimodal.training.augmentation import Augmentation, SamplePlan, mask_spectrogram, swap_words, transform_pixels
from modeling_multimodal.data.examples import ExampleEncoder, load_manifest
from modeling_multimodal.training.recipe import AugmentSpec, load_recipe

TOKENIZER = build_tokenizer([" ".join(vocabulary())] + ["describe the image. what happens in the video? is said in audio"])
PROCESSOR = MultimodalProcessor.from_config_and_components(tiny_config(TOKENIZER), TOKENIZER)
DEMO_SWAPS = {"left": "right", "right": "left"}
DEMO_ATTRIBUTES = {"image_caption": ["colour", "position", "size"], "video_caption": ["colour", "size"]}
SIZES = {
    "image": {"train": 12, "validation": 0, "test": 0},
    "video": {"train": 4, "validation": 0, "test": 0},
    "speech": {"train": 2, "validation": 0, "test": 0},
}
DEMO_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_data")
    make_demo_data(root, seed=0, sizes=SIZES)
    return root


def rows(root, manifest, task):
    return load_manifest(root / manifest, root=root, task=task)


def encoder(task, **augment):
    spec = AugmentSpec(**{"flip_word_swaps": DEMO_SWAPS, "text_attributes": DEMO_ATTRIBUTES, **augment})
    return ExampleEncoder(PROCESSOR, task, augmentation=Augmentation(spec, task, seed=0, processor=PROCESSOR))


def shape_centroid(pixels: torch.Tensor, processor=PROCESSOR.image_processor) -> tuple[float, float]:
    """(x, y) of the coloured shape in a normalised (3, H, W) image, as fractions of its side (the background is grey)."""
    mean, std = torch.tensor(processor.image_mean).view(3, 1, 1), torch.tensor(processor.image_std).view(3, 1, 1)
    rgb = pixels * std + mean
    chroma = rgb.max(0).values - rgb.min(0).values  # grey background: ~0; the demo's colours: > 0.4
    ys, xs = torch.nonzero(chroma > 0.25, as_tuple=True)
    assert len(xs), "no shape pixels found"
    height, width = chroma.shape
    return (xs.float().mean().item() + 0.5) / width, (ys.float().mean().item() + 0.5) / height


def nearest(value: float, cells: dict) -> str:
    return min(cells, key=lambda name: abs(cells[name] - value))


def position_of(pixels) -> str:
    x, y = shape_centroid(pixels)
    return position_name(nearest(y, ROWS), nearest(x, COLUMNS))


def caption_position(caption: str) -> str:
    return caption.split(" in the ", 1)[1]


def trained_text(example) -> str:
    """The response an encoded example trains on (its labelled tokens, EOS dropped)."""
    return TOKENIZER.decode([t for t in example["labels"].tolist() if t >= 0], skip_special_tokens=True)


# --- captions stay true (demo grammar) ----------------------------------------------------------------
def test_flipped_demo_image_and_rewritten_caption_agree(demo):
    """Under the demo grammar a caption names the cell of the shape's centre: the flipped image's shape lies in
    the cell the rewritten caption names, and (for a left / right column) the original caption is now false."""
    flipped, plain = encoder("image_caption", hflip=1.0), ExampleEncoder(PROCESSOR, "image_caption")
    sides = 0
    for row in rows(demo, "image_train.jsonl", "image_caption"):
        original = plain(row)
        assert position_of(original["pixel_values"][0]) == caption_position(row["caption"])  # the check itself is sound
        example = flipped(row, augment_key=(0, 0))
        caption = trained_text(example)
        assert position_of(example["pixel_values"][0]) == caption_position(caption), (row["caption"], caption)
        assert torch.equal(example["pixel_values"], original["pixel_values"].flip(-1))  # an exact mirror
        if "left" in row["caption"] or "right" in row["caption"]:
            sides += 1
            assert caption != row["caption"] and caption_position(row["caption"]) != position_of(example["pixel_values"][0])
        pair = TOKENIZER.decode(example["pair_input_ids"].tolist())
        assert pair == caption  # the contrastive pair text is rewritten too
    assert sides > 0


def test_flipped_demo_video_moves_the_way_the_rewritten_caption_says(demo):
    flipped = encoder("video_caption", hflip=1.0)
    for row in rows(demo, "video_train.jsonl", "video_caption"):
        example = flipped(row, augment_key=(0, 0))
        caption = trained_text(example)
        frames = example["pixel_values_videos"][0]  # (frames, 3, H, W)
        (x0, y0), (x1, y1) = shape_centroid(frames[0]), shape_centroid(frames[-1])
        moved = ("right" if x1 > x0 else "left") if abs(x1 - x0) > abs(y1 - y0) else ("down" if y1 > y0 else "up")
        assert caption.endswith(f"moving {moved}"), (row["caption"], caption, (x0, y0, x1, y1))


def test_demo_rotation_keeps_the_named_position(demo):
    """The demo's 10 degrees move no shape out of the cell its caption names (the bound in the module docstring)."""
    plain = ExampleEncoder(PROCESSOR, "image_caption")
    mean, std = PROCESSOR.image_processor.image_mean, PROCESSOR.image_processor.image_std
    for row in rows(demo, "image_train.jsonl", "image_caption"):
        pixels = plain(row)["pixel_values"][0]
        for angle in (-10.0, 10.0):
            rotated = transform_pixels(pixels, SamplePlan(angle=angle), mean, std)
            assert position_of(rotated) == caption_position(row["caption"])


@pytest.mark.parametrize(
    "task,attributes,crop_on,jitter_on",
    [
        ("image_caption", ["colour", "position", "size"], False, False),
        ("image_caption", ["colour"], True, False),
        ("image_caption", ["subject"], False, True),
        ("image_caption", [], True, True),
        ("video_caption", ["size"], False, True),
    ],
)
def test_text_attributes_switch_off_the_transforms_that_could_falsify_them(task, attributes, crop_on, jitter_on):
    spec = AugmentSpec(crop_scale=0.5, colour_jitter=0.4, text_attributes={task: attributes})
    plans = [Augmentation(spec, task, seed=0, processor=PROCESSOR).plan(0, index) for index in range(20)]
    assert any(p.crop is not None for p in plans) == crop_on
    assert any(p.colour for p in plans) == jitter_on


def test_swap_words_swaps_whole_words_once():
    assert swap_words("the left star is right of the leftmost", DEMO_SWAPS) == "the right star is left of the leftmost"
    assert swap_words("moving left.", DEMO_SWAPS) == "moving right."


# --- seeding ---------------------------------------------------------------------------------------------
def test_draws_repeat_per_epoch_and_index_and_evaluation_is_untouched(demo):
    row = rows(demo, "image_train.jsonl", "image_caption")[0]
    augmenting = encoder("image_caption", hflip=0.5, rotation=10.0)
    again = encoder("image_caption", hflip=0.5, rotation=10.0)  # a resumed process builds a new one
    first = augmenting(row, augment_key=(0, 3))["pixel_values"]
    assert torch.equal(first, again(row, augment_key=(0, 3))["pixel_values"])
    assert not torch.equal(first, augmenting(row, augment_key=(1, 3))["pixel_values"])
    assert not torch.equal(first, augmenting(row, augment_key=(0, 4))["pixel_values"])
    untouched = ExampleEncoder(PROCESSOR, "image_caption")(row)["pixel_values"]
    assert torch.equal(augmenting(row)["pixel_values"], untouched)  # no key (evaluation, plain use): no augmentation


# --- audio ---------------------------------------------------------------------------------------------
def test_specaugment_masks_real_frames_only_within_the_widths():
    features = torch.randn(80, 50)
    features[:, 40:] = 0.0  # padding
    rng = np.random.default_rng(0)
    masked = mask_spectrogram(features, 40, rng, time_masks=2, time_width=5, freq_masks=2, freq_width=8)
    assert torch.equal(masked[:, 40:], features[:, 40:])
    changed = masked[:, :40] != features[:, :40]
    time_columns, mel_rows = changed.all(0), changed.all(1)  # what a time mask / a frequency mask covers
    assert 0 < time_columns.sum() <= 2 * 5 and 0 < mel_rows.sum() <= 2 * 8
    assert torch.equal(changed, time_columns[None, :] | mel_rows[:, None])  # nothing else changed
    assert torch.allclose(masked[:, :40][changed], features[:, :40].mean().expand(int(changed.sum())))


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturbation_resamples_the_clip(demo, factor):
    row = rows(demo, "speech_train.jsonl", "speech_transcription")[0]
    plain = ExampleEncoder(PROCESSOR, "speech_transcription")(row)
    sped = encoder("speech_transcription", speed=[factor, factor])(row, augment_key=(0, 0))
    frames, sped_frames = plain["input_features_mask"].sum().item(), sped["input_features_mask"].sum().item()
    assert abs(sped_frames - frames / factor) <= 2
    assert torch.equal(sped["ctc_labels"], plain["ctc_labels"])
    assert torch.equal(sped["labels"][sped["labels"] >= 0], plain["labels"][plain["labels"] >= 0])  # same transcript


# --- recipe keys ---------------------------------------------------------------------------------------
BAD_AUGMENT = [
    ("augment.hflip=1.5", "augment.hflip"),
    ("augment.flip_word_swaps=null;augment.hflip=0.5", "needs augment.flip_word_swaps"),
    ("augment.rotation=45", "augment.rotation"),
    ("augment.crop_scale=0", "augment.crop_scale"),
    ("augment.colour_jitter=1", "augment.colour_jitter"),
    ("augment.time_masks=2", "augment.time_mask_frames > 0"),
    ("augment.speed=[1.2,0.9]", "low <= high"),
    ("augment.speed=0.9", "expected [low, high]"),
    ("augment.flip_word_swaps={left: right}", "a mirror swaps both ways"),
    ("augment.text_attributes={image_caption: [shade]}", "expected a list of"),
    ("augment.text_attributes={speech_captioning: [colour]}", "does not train on"),
    ("augment.bogus=1", "Unknown recipe key"),
]


@pytest.mark.parametrize("override,message", BAD_AUGMENT, ids=[case[0] for case in BAD_AUGMENT])
def test_bad_augment_keys_are_refused_naming_them(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("+", r"\+")):
        load_recipe(DEMO_RECIPE, override.split(";"))


def test_augment_conflicts_with_cached_examples_and_packing():
    with pytest.raises(ValueError, match="cache_in_memory"):
        load_recipe(DEMO_RECIPE, ["augment.rotation=5", "data.cache_in_memory=true"])
    with pytest.raises(ValueError, match="data.packing"):
        load_recipe(DEMO_RECIPE, ["augment.speed=[0.9, 1.1]", "data.packing=true"])


def test_demo_recipe_ships_the_grammar_table_with_augmentation_off():
    recipe = load_recipe(DEMO_RECIPE)
    assert not recipe.augment.active
    assert recipe.augment.flip_word_swaps == DEMO_SWAPS and recipe.augment.text_attributes == DEMO_ATTRIBUTES
    assert json.loads(json.dumps(recipe.to_dict()))["augment"]["hflip"] == 0.0
