"""Training-time augmentation that keeps the text true: images, video frames, log-mel features, speech speed.

What is unusual here:
- The transforms run on the processor's output tensors (`pixel_values`, `pixel_values_videos`,
  `input_features`), so images and video frames share one path, the processors stay untouched, and
  evaluation (which never passes an augmentation) cannot see them. Speed perturbation is the exception:
  it resamples the waveform (libswresample, through PyAV) before the log-mel is computed.
- One draw per sample, from `numpy.random.default_rng([seed, epoch, index])`: a resumed run (same epoch,
  same index) sees the same augmented sample, and every image and frame of a sample gets the same
  transform (a video stays one coherent clip; a flip of one image and not the other could not be
  described by one rewritten text).
- Caption-aware rules. A transform that changes what the text says is either undone in the text or not
  applied:
  - a horizontal flip swaps words through `flip_word_swaps` (e.g. left <-> right) in every text of the
    sample that describes it (prompt, response, paired text; not an audio transcript);
  - `text_attributes` says, per task, what its text names; each named attribute switches off the
    transforms that could make it false (`DISABLED_BY`): a crop moves and rescales the subject and can
    cut it out (off when the text names its `position`, `size` or the `subject` itself), a colour
    jitter can turn one named colour into another (off when the text names a `colour`).
  - A small rotation (at most `MAX_ROTATION` degrees) stays on: it moves a point at distance d from the
    centre by at most 2 d sin(angle / 2), which the recipe should keep below the spacing of the
    positions its text names (the demo's 3x3 grid: 10 degrees, tested).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..processing.audio_loading import load_audio, resample

# Attributes a task's text can name -> the transforms that could make that text false.
# Words a mirror image changes the meaning of; with `flip_word_swaps: {}` no text may hold one (see below).
SIDE_WORDS = re.compile(r"\b(left|right)(most|wards?)?\b", re.IGNORECASE)


def _refuse_sides_without_swaps(example: dict) -> None:
    """`hflip` with an empty `flip_word_swaps` states that no text names a side: an example whose prompt, response
    or paired text says "left" / "right" would train on a mirrored image whose caption is now wrong, so it is refused."""
    texts = [example.get("response"), example.get("pair_text")]
    for message in example.get("prompt") or []:
        content = message.get("content")
        texts += [content] if isinstance(content, str) else [i.get("text") for i in content or [] if i.get("type") == "text"]
    for text in texts:
        found = SIDE_WORDS.search(text) if isinstance(text, str) else None
        if found:
            raise ValueError(
                f"Row {example.get('id')!r}: augment.hflip is on with an empty augment.flip_word_swaps, but its text names a "
                f"side ({found.group(0)!r}, in {text[:60]!r}); a mirrored image would contradict it: list the swaps "
                "(e.g. {left: right, right: left}) or set augment.hflip: 0"
            )


DISABLED_BY = {
    "colour": ("colour_jitter",),
    "position": ("crop",),
    "size": ("crop",),
    "subject": ("crop",),
}
MAX_ROTATION = 30.0  # degrees: beyond this a "small rotation" turns squares into diamonds and moves corners far
CROP_RATIOS = (3 / 4, 4 / 3)  # aspect ratios of a random resized crop, drawn log-uniformly (as torchvision's)


@dataclass
class SamplePlan:
    """The transforms drawn for one sample (identity values when a transform is off)."""

    flip: bool = False
    angle: float = 0.0  # degrees, counter-clockwise
    crop: tuple[float, float, float, float] | None = None  # (centre x, centre y, width, height) in [-1, 1] coordinates
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    speed: float = 1.0
    rng: np.random.Generator | None = None  # for the SpecAugment masks (their count depends on each clip's length)

    @property
    def geometric(self) -> bool:
        return self.angle != 0.0 or self.crop is not None

    @property
    def colour(self) -> bool:
        return (self.brightness, self.contrast, self.saturation) != (1.0, 1.0, 1.0)


def swap_words(text: str, swaps: dict[str, str]) -> str:
    """Every whole word of `text` found in `swaps` replaced by its partner, in one pass ("left" <-> "right")."""
    if not swaps or not text:
        return text
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(swaps, key=len, reverse=True))) + r")\b")
    return pattern.sub(lambda match: swaps[match.group(1)], text)


def affine_matrix(plan: SamplePlan, height: int, width: int) -> torch.Tensor:
    """(2, 3) map from output to input coordinates in [-1, 1] (`F.affine_grid`): flip, then rotate, then crop.

    Rotation is done in pixel units (normalised coordinates stretch non-square images), so a circle stays round.
    """
    flip = -1.0 if plan.flip else 1.0
    cos, sin = math.cos(math.radians(plan.angle)), math.sin(math.radians(plan.angle))
    rotate = torch.tensor([[cos, -sin * height / width], [sin * width / height, cos]], dtype=torch.float64)
    linear = rotate @ torch.diag(torch.tensor([flip, 1.0], dtype=torch.float64))
    offset = torch.zeros(2, dtype=torch.float64)
    if plan.crop is not None:
        centre_x, centre_y, crop_width, crop_height = plan.crop
        scale = torch.diag(torch.tensor([crop_width, crop_height], dtype=torch.float64))
        linear, offset = scale @ linear, torch.tensor([centre_x, centre_y], dtype=torch.float64)
    return torch.cat([linear, offset[:, None]], dim=1).float()


def transform_pixels(pixels: torch.Tensor, plan: SamplePlan, mean, std) -> torch.Tensor:
    """Apply `plan`'s flip / rotation / crop and colour jitter to normalised images (..., 3, H, W).

    All leading dimensions (images, videos x frames) get the same transform. Pixels a rotation brings in
    from outside the image repeat the border (a plain background stays plain). `mean` / `std` are the
    processor's normalisation, undone for the colour jitter and redone after it.
    """
    shape = pixels.shape
    images = pixels.reshape(-1, *shape[-3:])  # (n, 3, H, W)
    height, width = shape[-2:]
    if plan.geometric:
        theta = affine_matrix(plan, height, width).expand(images.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    elif plan.flip:
        images = images.flip(-1)  # exact: no resampling
    if plan.colour:
        mean = torch.tensor(mean, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(std, dtype=images.dtype).view(1, 3, 1, 1)
        rgb = images * std + mean  # (n, 3, H, W) in [0, 1]
        rgb = rgb * plan.brightness
        grey = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).unsqueeze(1)  # (n, 1, H, W), ITU-R 601 luma
        rgb = (rgb - grey.mean(dim=(2, 3), keepdim=True)) * plan.contrast + grey.mean(dim=(2, 3), keepdim=True)
        grey = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).unsqueeze(1)
        rgb = (grey + (rgb - grey) * plan.saturation).clamp(0.0, 1.0)
        images = (rgb - mean) / std
    return images.reshape(shape)


def mask_spectrogram(
    features: torch.Tensor, frames: int, rng: np.random.Generator, time_masks: int, time_width: int, freq_masks: int, freq_width: int
) -> torch.Tensor:
    """SpecAugment on one clip's log-mel (mels, T), of which the first `frames` are real (the rest is padding).

    Each mask covers a width drawn uniformly in [0, max width] at a uniform start, filled with the clip's mean
    (a neutral value for a normalised log-mel). Padding is left as it is.
    """
    features = features.clone()
    fill = features[:, :frames].mean()
    mels = features.shape[0]
    for _ in range(time_masks):
        width = int(rng.integers(0, min(time_width, frames) + 1))
        start = int(rng.integers(0, frames - width + 1))
        features[:, start : start + width] = fill
    for _ in range(freq_masks):
        width = int(rng.integers(0, min(freq_width, mels) + 1))
        start = int(rng.integers(0, mels - width + 1))
        features[start : start + width, :frames] = fill
    return features


class Augmentation:
    """Draws and applies one `SamplePlan` per (epoch, index) for one task's examples (see the module docstring).

    spec: the recipe's `augment` section (`AugmentSpec`); task: the task name its `text_attributes` are looked up
    under (None for chat rows); seed: the run's seed; processor: the `MultimodalProcessor` whose normalisation and
    audio settings the tensors follow.
    """

    def __init__(self, spec, task: str | None, seed: int, processor):
        self.spec, self.seed = spec, seed
        named = spec.text_attributes.get(task or "messages", [])
        off = {transform for attribute in named for transform in DISABLED_BY[attribute]}
        self.crop_scale = None if "crop" in off else spec.crop_scale
        self.colour_jitter = 0.0 if "colour_jitter" in off else spec.colour_jitter
        self.swaps = dict(spec.flip_word_swaps or {})
        self.normalisation = {}
        for key, name in (("pixel_values", "image_processor"), ("pixel_values_videos", "video_processor")):
            sub = getattr(processor, name, None)
            if sub is not None:
                normalise = getattr(sub, "do_normalize", True)
                self.normalisation[key] = (sub.image_mean, sub.image_std) if normalise else ([0.0] * 3, [1.0] * 3)
        extractor = getattr(processor, "feature_extractor", None)
        self.sampling_rate = getattr(extractor, "sampling_rate", None)
        layout = getattr(processor, "layout", None)
        geometric = [name for name, on in (("hflip", spec.hflip), ("rotation", spec.rotation), ("crop_scale", self.crop_scale)) if on]
        if layout is not None and layout.image_max_tiles and geometric:
            raise ValueError(
                f"augment.{', augment.'.join(geometric)} transform(s) each crop of a tiled image (image_max_tiles="
                f"{layout.image_max_tiles}) on its own, which breaks the tiles' arrangement: turn them off (colour jitter "
                "and the audio masks still apply) or train without tiling"
            )
        self.max_audio_seconds = None
        if extractor is not None and layout is not None and layout.max_audio_mel_frames():
            self.max_audio_seconds = (layout.max_audio_mel_frames() + 1) * extractor.hop_length / extractor.sampling_rate

    def plan(self, epoch: int, index: int) -> SamplePlan:
        """The transforms of sample `index` in `epoch` (deterministic for the run's seed)."""
        spec = self.spec
        rng = np.random.default_rng([self.seed, epoch, index])
        plan = SamplePlan(rng=rng)
        plan.flip = bool(rng.random() < spec.hflip)
        if spec.rotation:
            plan.angle = float(rng.uniform(-spec.rotation, spec.rotation))
        if self.crop_scale is not None:
            area = rng.uniform(self.crop_scale, 1.0)
            ratio = math.exp(rng.uniform(*np.log(CROP_RATIOS)))
            width, height = min(1.0, math.sqrt(area * ratio)), min(1.0, math.sqrt(area / ratio))
            plan.crop = (rng.uniform(-(1 - width), 1 - width), rng.uniform(-(1 - height), 1 - height), width, height)
        if self.colour_jitter:
            plan.brightness, plan.contrast, plan.saturation = (
                float(v) for v in rng.uniform(1 - self.colour_jitter, 1 + self.colour_jitter, size=3)
            )
        if spec.speed is not None:
            plan.speed = float(rng.uniform(*spec.speed))
        return plan

    # --- before the processor: text and waveforms ---
    def rewrite_example(self, example: dict, plan: SamplePlan) -> dict:
        """The example with its texts rewritten for a flip and its audio sped up or slowed down (a new dict)."""
        example = dict(example)
        visual = example["media"]["image"] or example["media"]["video"]
        if self.spec.hflip and visual and not self.swaps:
            _refuse_sides_without_swaps(example)
        if plan.flip and visual and self.swaps:
            example["prompt"] = [self._swap_message(message) for message in example["prompt"]]
            for key in ("response", "pair_text"):
                if example[key]:
                    example[key] = swap_words(example[key], self.swaps)
        if plan.speed != 1.0 and example["media"]["audio"]:
            example["media"] = {**example["media"], "audio": [self._speed(item, plan.speed) for item in example["media"]["audio"]]}
        return example

    def _swap_message(self, message: dict) -> dict:
        content = message.get("content")
        if isinstance(content, str):
            return {**message, "content": swap_words(content, self.swaps)}
        if isinstance(content, list):
            items = [{**item, "text": swap_words(item["text"], self.swaps)} if item.get("type") == "text" else item for item in content]
            return {**message, "content": items}
        return message

    def _speed(self, item, factor: float) -> dict:
        """Speed perturbation (tempo and pitch, as sox `speed`): resample to rate / factor, play at the rate."""
        samples = load_audio(item, None, self.sampling_rate, self.max_audio_seconds)
        faster = resample(samples, self.sampling_rate, round(self.sampling_rate / factor))
        return {"array": faster, "sampling_rate": self.sampling_rate}

    # --- after the processor: tensors ---
    def transform_tensors(self, encoded: dict, plan: SamplePlan) -> dict:
        """The encoded example with its pixels transformed and its log-mel features masked (in place)."""
        for key, (mean, std) in self.normalisation.items():
            if key in encoded:
                encoded[key] = transform_pixels(encoded[key], plan, mean, std)
        spec = self.spec
        if "input_features" in encoded and (spec.time_masks or spec.freq_masks):
            features, lengths = encoded["input_features"], encoded["input_features_mask"].sum(-1).tolist()
            encoded["input_features"] = torch.stack([
                mask_spectrogram(clip, int(frames), plan.rng, spec.time_masks, spec.time_mask_frames, spec.freq_masks, spec.freq_mask_bins)
                for clip, frames in zip(features, lengths)
            ])
        return encoded


__all__ = ["DISABLED_BY", "MAX_ROTATION", "Augmentation", "SamplePlan", "affine_matrix", "mask_spectrogram", "swap_words", "transform_pixels"]
