"""The demo data's vocabulary, caption grammar and held-out combinations: one place for every word.

Images, videos and speech share the words (colours, shapes, sizes, directions), so a tiny model can
transfer between modalities. Two hold-out rules decide what only the test split may use:

- "combinations" (the default): a quarter of each task's attribute combinations (colour, shape, size,
  position for images; colour, shape, size, direction for videos; whole sentences for speech), drawn
  per seed, such that every pair of attribute values still occurs in training. Every test caption is a
  combination the model never saw, made of pairs it did.
- "pairs" (stricter): six colour+shape pairs never occur in train or validation in any task and make up
  the whole test split. The training data then never shows a red star while showing red with three
  other shapes, so P(shape | colour) in training rules the held-out pairs out; a model trained from
  scratch learns that correlation (measured: the demo's test shape accuracy is 0.0 with this rule).

Speech also holds out one espeak-ng voice under both rules.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

# Well separated RGB values, so a pixel's colour names its word even after video compression.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
# Shape radius as a fraction of the image side (jittered by +-10% per sample).
SIZES: dict[str, float] = {"small": 0.08, "medium": 0.12, "large": 0.17}
ROWS: dict[str, float] = {"top": 0.25, "middle": 0.5, "bottom": 0.75}
COLUMNS: dict[str, float] = {"left": 0.25, "centre": 0.5, "right": 0.75}
DIRECTIONS = ("left", "right", "up", "down")

# Each colour loses one shape; each shape keeps at least four colours in training.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("green", "circle"),
    ("blue", "triangle"),
    ("yellow", "square"),
    ("purple", "circle"),
    ("orange", "star"),
)

TRAIN_VOICES = ("en-us", "en-gb", "en-029", "en-us+f3", "en-gb+m3")
TEST_VOICES = ("en-gb-scotland",)
SPEEDS = (140, 165, 190)  # espeak-ng words per minute

# Speech sentences, 3 to 6 words. Templates with both {colour} and {shape} follow the held-out pairs.
SENTENCE_TEMPLATES = (
    "a {colour} {shape}",
    "the {colour} {shape} is {size}",
    "show me the {colour} {shape}",
    "find a {size} {colour} {shape}",
    "move the {shape} {direction}",
    "the {shape} is moving {direction}",
)

SPLITS = ("train", "validation", "test")
HOLDOUTS = ("combinations", "pairs")
TEST_FRACTION = 0.25  # of each task's combinations, under the "combinations" rule


def voices_for_split(split: str) -> tuple[str, ...]:
    return TEST_VOICES if split == "test" else TRAIN_VOICES


def position_name(row: str, column: str) -> str:
    """"top left", "middle right", ..., and plain "centre" for the middle of the image."""
    return "centre" if (row, column) == ("middle", "centre") else f"{row} {column}"


def image_caption(size: str, colour: str, shape: str, position: str) -> str:
    return f"a {size} {colour} {shape} in the {position}"


def video_caption(size: str, colour: str, shape: str, direction: str) -> str:
    return f"a {size} {colour} {shape} moving {direction}"


def vocabulary() -> list[str]:
    """Every word any caption, sentence or transcript can contain, sorted."""
    words = set(COLOURS) | set(SHAPES) | set(SIZES) | set(ROWS) | set(COLUMNS) | set(DIRECTIONS)
    for text in (image_caption("", "", "", ""), video_caption("", "", "", ""), *SENTENCE_TEMPLATES):
        words |= {w for w in text.split() if not w.startswith("{")}
    return sorted(words)


# --- attribute combinations per task and split ---------------------------------------------------------
def image_combinations() -> list[tuple[str, ...]]:
    """Every image attribute combination: (colour, shape, size, row, column)."""
    return list(itertools.product(COLOURS, SHAPES, SIZES, ROWS, COLUMNS))


def video_combinations() -> list[tuple[str, ...]]:
    """Every video attribute combination: (colour, shape, size, direction)."""
    return list(itertools.product(COLOURS, SHAPES, SIZES, DIRECTIONS))


def sentence_combinations() -> list[tuple[str, ...]]:
    """Every speech sentence as (template, colour, shape, size, direction), "" where the template has no slot."""
    combos = []
    for template in SENTENCE_TEMPLATES:
        slots = (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES), ("direction", DIRECTIONS))
        choices = [tuple(values) if "{" + name + "}" in template else ("",) for name, values in slots]
        combos += [(template, *values) for values in itertools.product(*choices)]
    return combos


def sentence(combination: tuple[str, ...]) -> str:
    template, colour, shape, size, direction = combination
    return template.format(colour=colour, shape=shape, size=size, direction=direction)


def av_video_combinations() -> list[tuple[str, ...]]:
    """Every audio-visual clip combination: (spoken colour, shape, direction)."""
    return list(itertools.product(COLOURS, SHAPES, DIRECTIONS))


def av_video_caption(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


COMBINATIONS = {
    "image": image_combinations, "video": video_combinations, "speech": sentence_combinations, "av_video": av_video_combinations,
}


def _value_pairs(combination: tuple[str, ...]) -> set:
    """(slot, value, slot, value) for every two filled slots: what "every pair still occurs" checks."""
    filled = [(i, v) for i, v in enumerate(combination) if v]
    return {(i, a, j, b) for (i, a), (j, b) in itertools.combinations(filled, 2)}


@functools.lru_cache(maxsize=None)
def held_out_combinations(task: str, seed: int = 0) -> frozenset[tuple[str, ...]]:
    """The "combinations" rule: `TEST_FRACTION` of `task`'s combinations, the same for the same seed, drawn
    again (deterministically) until every pair of attribute values still occurs in the rest. Cached:
    every split of every task asks for it."""
    combos = COMBINATIONS[task]()
    count = round(TEST_FRACTION * len(combos))
    every_pair = set().union(*map(_value_pairs, combos))
    for attempt in range(100):
        rng = np.random.default_rng([seed, list(COMBINATIONS).index(task), attempt])
        order = rng.permutation(len(combos))
        held_out = frozenset(combos[i] for i in order[:count])
        if set().union(*(_value_pairs(c) for c in combos if c not in held_out)) == every_pair:
            return held_out
    raise RuntimeError(f"no hold-out of {count} {task} combinations keeps every attribute pair in training")


def combinations_for_split(task: str, split: str, holdout: str = "combinations", seed: int = 0) -> list[tuple[str, ...]]:
    """The attribute combinations a split may use, in a fixed order: the held-out ones for test, the others
    for train and validation (see the module docstring for the two rules)."""
    if holdout not in HOLDOUTS:
        raise ValueError(f"Unknown holdout rule {holdout!r}; expected one of {HOLDOUTS}.")
    combos = COMBINATIONS[task]()
    if holdout == "combinations":
        held_out = held_out_combinations(task, seed)
        return [c for c in combos if (c in held_out) == (split == "test")]
    pairs, slots = set(HELD_OUT_PAIRS), slice(1, 3) if task == "speech" else slice(0, 2)
    return [c for c in combos if (c[slots] in pairs) == (split == "test")]  # colourless sentences: train only
