"""The demo data's vocabulary, caption grammar and held-out combinations: one place for every word.

Images, videos and speech share the words (colours, shapes, sizes, directions), so a tiny model can
transfer between modalities. The same colour+shape pairs are held out of train and validation in every
task and make up the test split; every colour and every shape still occurs in training, so the test
measures composition of known words, not memory. Speech also holds out one espeak-ng voice.
"""

from __future__ import annotations

import itertools

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


def pairs_for_split(split: str) -> list[tuple[str, str]]:
    """Colour+shape pairs a split may use: the held-out pairs for test, all others otherwise."""
    held_out = set(HELD_OUT_PAIRS)
    return [pair for pair in itertools.product(COLOURS, SHAPES) if (pair in held_out) == (split == "test")]


def voices_for_split(split: str) -> tuple[str, ...]:
    return TEST_VOICES if split == "test" else TRAIN_VOICES


def position_name(row: str, column: str) -> str:
    """"top left", "middle right", ..., and plain "centre" for the middle of the image."""
    return "centre" if (row, column) == ("middle", "centre") else f"{row} {column}"


def image_caption(size: str, colour: str, shape: str, position: str) -> str:
    return f"a {size} {colour} {shape} in the {position}"


def video_caption(size: str, colour: str, shape: str, direction: str) -> str:
    return f"a {size} {colour} {shape} moving {direction}"


def sentences_for_split(split: str) -> list[str]:
    """Every speech sentence a split may use: colour+shape sentences follow `pairs_for_split`; the
    test split only uses held-out-pair sentences, the other splits also use the colourless ones."""
    sentences = []
    for template in SENTENCE_TEMPLATES:
        if "{colour}" in template:
            for (colour, shape), size in itertools.product(pairs_for_split(split), SIZES):
                sentences.append(template.format(colour=colour, shape=shape, size=size))
        elif split != "test":
            for shape, direction in itertools.product(SHAPES, DIRECTIONS):
                sentences.append(template.format(shape=shape, direction=direction))
    return list(dict.fromkeys(sentences))  # templates without {size} repeat per size: keep one, in order


def vocabulary() -> list[str]:
    """Every word any caption, sentence or transcript can contain, sorted."""
    words = set(COLOURS) | set(SHAPES) | set(SIZES) | set(ROWS) | set(COLUMNS) | set(DIRECTIONS)
    for text in (image_caption("", "", "", ""), video_caption("", "", "", ""), *SENTENCE_TEMPLATES):
        words |= {w for w in text.split() if not w.startswith("{")}
    return sorted(words)
