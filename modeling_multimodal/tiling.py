"""Tiled images on the model side: each image's crops (a global view and a grid of tiles) become one token sequence.

With `config.image_max_tiles` > 0 the processor cuts each image into a (rows, cols) grid of tower-sized crops plus a
global view of the whole picture (`processing/image_tiling.py`), sends every crop as a row of `pixel_values` and each
image's grid as a row of `image_tiles`. The tower and projector run on the crops as on plain images; then, per image,
each crop's tokens are preceded by one learned marker token that names the crop, as SmolVLM's `<row_r_col_c>` and
`<global-img>` text tokens do, but as vectors (the markers are features at `<image>` placeholders, so one
`MediaTokenLayout.image_tokens(grid)` counts them with the crops and no tokenizer is involved):

    [global marker] global view tokens, [row 1 + col 1] tile (1, 1) tokens, [row 1 + col 2] tile (1, 2) tokens, ...

A tile's marker is the sum of a learned row vector and a learned column vector, so the LM reads where a crop sits
from one token. A (1, 1) grid (an image that one crop holds) is the global view alone.
"""

from __future__ import annotations

import torch
from torch import nn


class TileMarkers(nn.Module):
    """The learned marker vectors of tiled images: `global_view` (width,), `row` and `column` (max_tiles, width)."""

    def __init__(self, max_tiles: int, width: int):
        super().__init__()
        self.global_view = nn.Parameter(torch.zeros(width))
        self.row = nn.Parameter(torch.zeros(max_tiles, width))
        self.column = nn.Parameter(torch.zeros(max_tiles, width))

    def markers(self, rows: int, cols: int) -> torch.Tensor:
        """(crops, width): the global view's marker, then tile (r, c)'s row r + column c, row by row."""
        tiles = (self.row[:rows, None, :] + self.column[None, :cols, :]).reshape(rows * cols, -1)  # (rows*cols, width)
        return self.global_view[None] if rows * cols == 1 else torch.cat([self.global_view[None], tiles])

    def touch(self) -> torch.Tensor:
        """The sum of every marker (the zero-weight touch of an unused projector reaches them too)."""
        return self.global_view.sum() + self.row.sum() + self.column.sum()


def crops_per_image(layout, image_tiles: torch.Tensor | None, num_crops: int) -> list[tuple[int, int]]:
    """Each image's (rows, cols) grid, checked against the `num_crops` rows of `pixel_values`.

    Without `image_tiles` every crop is an image of its own (a (1, 1) grid: the global view alone).
    """
    if image_tiles is None:
        return [(1, 1)] * num_crops
    if image_tiles.ndim != 2 or image_tiles.shape[-1] != 2:
        raise ValueError(f"image_tiles must be (n_images, 2) (rows, cols) per image, got shape {tuple(image_tiles.shape)}")
    grids = [(int(rows), int(cols)) for rows, cols in image_tiles.tolist()]
    counts = [layout.image_crops(grid) for grid in grids]
    if sum(counts) != num_crops:
        raise ValueError(
            f"image_tiles {grids} need {sum(counts)} crops (a global view plus rows x cols tiles per image with more than "
            f"one tile) but pixel_values has {num_crops}; pass the processor's pixel_values and image_tiles together"
        )
    return grids


def arrange_tiled_images(crop_tokens: torch.Tensor, grids: list[tuple[int, int]], markers: TileMarkers) -> list[torch.Tensor]:
    """(crops, tokens, d) of all images' crops -> one (image_tokens(grid), d) tensor per image: each crop's tokens
    after its marker (see the module docstring)."""
    images, start = [], 0
    for rows, cols in grids:
        marks = markers.markers(rows, cols).to(crop_tokens.dtype)[:, None, :]  # (count, 1, d): one per crop
        count = marks.shape[0]
        crops = crop_tokens[start : start + count]  # (count, tokens, d)
        images.append(torch.cat([marks, crops], dim=1).flatten(0, 1))  # (count * (1 + tokens), d)
        start += count
    return images


__all__ = ["TileMarkers", "arrange_tiled_images", "crops_per_image"]
