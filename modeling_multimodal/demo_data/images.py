"""Shapes drawn with Pillow, without anti-aliasing, so every pixel inside a shape has its exact colour."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .grammar import COLOURS, COLUMNS, ROWS, SIZES, position_name


def shape_polygon(shape: str, centre: tuple[float, float], radius: float) -> list[tuple[float, float]]:
    """Vertices of a square, an upward triangle or a five-pointed star around `centre`."""
    x, y = centre
    if shape == "square":
        half = 0.85 * radius
        return [(x - half, y - half), (x + half, y - half), (x + half, y + half), (x - half, y + half)]
    if shape == "triangle":
        angles = [-90, 30, 150]
        return [(x + radius * math.cos(math.radians(a)), y + radius * math.sin(math.radians(a))) for a in angles]
    if shape == "star":
        points = []
        for i in range(10):
            r = radius if i % 2 == 0 else 0.45 * radius
            a = math.radians(-90 + 36 * i)
            points.append((x + r * math.cos(a), y + r * math.sin(a)))
        return points
    raise ValueError(f"Unknown shape {shape!r}; expected circle, square, triangle or star.")


def draw_shape(image: Image.Image, shape: str, colour: str | tuple[int, int, int], centre: tuple[float, float], radius: float) -> None:
    """Draw one filled shape in place, in a colour of the grammar (by name) or any RGB triple."""
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour] if isinstance(colour, str) else colour
    if shape == "circle":
        x, y = centre
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill)
    else:
        draw.polygon(shape_polygon(shape, centre, radius), fill=fill)


def background(image_size: int, rng: np.random.Generator) -> Image.Image:
    """A plain light grey canvas whose shade varies per sample, so the background is not a constant."""
    grey = int(rng.integers(195, 236))
    return Image.new("RGB", (image_size, image_size), (grey, grey, grey))


def render_image(
    colour: str, shape: str, size: str, row: str, column: str, image_size: int, rng: np.random.Generator
) -> tuple[Image.Image, dict]:
    """One image and the attributes that describe it (centre and radius in pixels, after jitter)."""
    jitter = 0.03 * image_size
    centre = (
        round(COLUMNS[column] * image_size + rng.uniform(-jitter, jitter), 2),
        round(ROWS[row] * image_size + rng.uniform(-jitter, jitter), 2),
    )
    radius = round(SIZES[size] * image_size * rng.uniform(0.9, 1.1), 2)
    image = background(image_size, rng)
    draw_shape(image, shape, colour, centre, radius)
    attributes = {
        "colour": colour,
        "shape": shape,
        "size": size,
        "position": position_name(row, column),
        "centre": list(centre),
        "radius": radius,
    }
    return image, attributes
