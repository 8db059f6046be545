"""MultimodalImageProcessor: parity with CLIPImageProcessorPil, input forms, channel rules, limits, save/load."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from media_builders import random_image
from transformers import CLIPImageProcessorPil

from modeling_multimodal.processing import MediaInputError, MultimodalImageProcessor

SIZES = [(40, 60), (97, 31), (32, 32), (300, 200), (33, 34), (17, 90)]
CONFIGS = [
    ("shortest_edge_crop", {"size": {"shortest_edge": 32}, "crop_size": 32}),
    ("fixed_size_crop", {"size": {"height": 24, "width": 40}, "crop_size": {"height": 20, "width": 30}}),
    ("clip_defaults", {}),
    ("bilinear_custom_norm", {"size": {"shortest_edge": 48}, "crop_size": 40, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}),
    ("crop_larger_than_image", {"size": {"shortest_edge": 20}, "crop_size": 24}),
]


@pytest.mark.parametrize("name, options", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_clip_image_processor_pil(name, options):
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    reference = CLIPImageProcessorPil(**options)(images, return_tensors="pt")["pixel_values"]
    ours = MultimodalImageProcessor(**options)(images, return_tensors="pt")["pixel_values"]
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_rgba_array_matches_clip_image_processor_pil():
    image = random_image(40, 50, channels=4)
    options = {"size": {"shortest_edge": 32}, "crop_size": 32}
    reference = CLIPImageProcessorPil(**options)(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(MultimodalImageProcessor(**options)(image)["pixel_values"], reference, atol=1e-5, rtol=0)


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


INPUT_FORMS = [
    ("path", lambda a, tmp: (tmp / "image.png").write_bytes(_png_bytes(a)) and str(tmp / "image.png")),
    ("pathlib", lambda a, tmp: (tmp / "image.png").write_bytes(_png_bytes(a)) and tmp / "image.png"),
    ("bytes", lambda a, tmp: _png_bytes(a)),
    ("pil", lambda a, tmp: PIL.Image.fromarray(a)),
    ("numpy_chw", lambda a, tmp: np.ascontiguousarray(a.transpose(2, 0, 1))),
    ("numpy_float", lambda a, tmp: a.astype(np.float32) / 255.0),
    ("torch_chw", lambda a, tmp: torch.from_numpy(a).permute(2, 0, 1)),
    ("torch_hwc_uint8", lambda a, tmp: torch.from_numpy(a)),
]


@pytest.mark.parametrize("name, convert", INPUT_FORMS, ids=[f[0] for f in INPUT_FORMS])
def test_every_input_form_gives_the_array_result(name, convert, tmp_path):
    processor = MultimodalImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    array = random_image(45, 70)
    expected = processor(array)["pixel_values"]
    assert torch.equal(processor(convert(array, tmp_path))["pixel_values"], expected)


def _white_composite(color, alpha):
    a = alpha.astype(np.float32)[..., None] / 255.0
    return np.round(a * color + (1 - a) * 255).astype(np.uint8)


CHANNEL_CASES = [  # (name, input, the RGB uint8 image it must be treated as)
    ("grayscale_2d", lambda g: g[..., 0], lambda g: np.repeat(g[..., :1], 3, -1)),
    ("grayscale_1_channel", lambda g: g[..., :1], lambda g: np.repeat(g[..., :1], 3, -1)),
    ("grayscale_pil_L", lambda g: PIL.Image.fromarray(g[..., 0]), lambda g: np.repeat(g[..., :1], 3, -1)),
    ("gray_alpha_on_white", lambda g: g[..., :2], lambda g: np.repeat(_white_composite(g[..., :1], g[..., 1]), 3, -1)),
    ("gray_alpha_pil_LA", lambda g: PIL.Image.fromarray(g[..., :2], mode="LA"), lambda g: np.repeat(_white_composite(g[..., :1], g[..., 1]), 3, -1)),
    ("rgba_on_white", lambda g: g, lambda g: _white_composite(g[..., :3], g[..., 3])),
    ("rgba_pil", lambda g: PIL.Image.fromarray(g, mode="RGBA"), lambda g: _white_composite(g[..., :3], g[..., 3])),
]


@pytest.mark.parametrize("name, make_input, expected_rgb", CHANNEL_CASES, ids=[c[0] for c in CHANNEL_CASES])
def test_documented_channel_handling(name, make_input, expected_rgb):
    processor = MultimodalImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    source = random_image(40, 40, channels=4, seed=3)
    result = processor(make_input(source))["pixel_values"]
    assert result.shape == (1, 3, 32, 32)
    assert torch.equal(result, processor(expected_rgb(source))["pixel_values"])


def test_pixel_limit_is_configurable_and_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    PIL.Image.fromarray(random_image(100, 100)).save(path)
    with pytest.raises(MediaInputError, match=r"image 0: .*10000 pixels, above max_image_pixels=5000"):
        MultimodalImageProcessor(max_image_pixels=5000)(str(path))
    with pytest.raises(ValueError, match="max_image_pixels=5000"):
        MultimodalImageProcessor()(random_image(100, 100), max_image_pixels=5000)
    assert MultimodalImageProcessor(max_image_pixels=None, crop_size=32)(str(path))["pixel_values"].shape == (1, 3, 32, 32)


def test_save_and_load_round_trip(tmp_path):
    processor = MultimodalImageProcessor(size={"shortest_edge": 48}, crop_size=40, max_image_pixels=12345, image_mean=[0.5] * 3)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists()
    loaded = MultimodalImageProcessor.from_pretrained(tmp_path)
    assert loaded.max_image_pixels == 12345 and loaded.to_dict() == processor.to_dict()
    image = random_image(50, 70)
    assert torch.equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])


def test_batch_forms_and_numpy_output():
    processor = MultimodalImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    images = [random_image(40, 40, seed=s) for s in range(3)]
    flat = processor(images)["pixel_values"]
    assert torch.equal(processor(np.stack(images))["pixel_values"], flat)  # 4-D batch array
    assert torch.equal(processor([[images[0]], images[1:]])["pixel_values"], flat)  # nested per sample
    assert isinstance(processor(images, return_tensors="np")["pixel_values"], np.ndarray)


def test_a_datasets_image_dict_loads_as_its_bytes_or_path(tmp_path):
    """🤗 Datasets stores an image nested in chat messages as {"bytes", "path"} (what TRL's GRPO prompts hand over)."""
    from modeling_multimodal.processing.image_processing_multimodal import load_image

    pixels = random_image(16, 12, seed=3)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    (tmp_path / "image.png").write_bytes(buffer.getvalue())
    np.testing.assert_array_equal(load_image({"bytes": buffer.getvalue(), "path": None}), pixels)
    np.testing.assert_array_equal(load_image({"bytes": None, "path": str(tmp_path / "image.png")}), pixels)
    with pytest.raises(ValueError, match="unsupported image type dict"):
        load_image({"bytes": None, "path": None})
