"""Image tiling on the processor side: one image -> a global view plus a grid of tower-sized tiles.

The grid is chosen by `media_tokens.best_tile_grid` (LLaVA-NeXT's best fit over every rows x cols grid of at most
`max_tiles` crops), the function the model's `MediaTokenLayout` counts tokens with, so the processor's placeholders
and the model's features agree by construction. Unlike LLaVA-NeXT, which keeps the aspect ratio and pads, the image is
resized onto the grid's canvas (rows * tile x cols * tile) and cut, as SmolVLM does: the best fit already matches the
aspect ratio as closely as the grids allow, and no tile is spent on padding. The global view is the whole image
resized to one tile (no centre crop: nothing of a wide or tall image is cut away).
"""

from __future__ import annotations

import numpy as np
import PIL.Image

from ..configuration.media_tokens import best_tile_grid


def _resized(image: np.ndarray, height: int, width: int, resample) -> np.ndarray:
    """(H, W, 3) uint8 resized with PIL to (height, width, 3) (unchanged when it already has that size)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(PIL.Image.fromarray(image).resize((width, height), resample=resample))


def tile_image(image: np.ndarray, tile_size: int, max_tiles: int, resample) -> tuple[list[np.ndarray], tuple[int, int]]:
    """(crops, (rows, cols)) of an RGB uint8 (H, W, 3) image: the global view, then the tiles row by row (the order
    the model reads them in, `tiling.arrange_tiled_images`); a (1, 1) grid gives the global view alone."""
    rows, cols = best_tile_grid(image.shape[0], image.shape[1], tile_size, max_tiles)
    crops = [_resized(image, tile_size, tile_size, resample)]
    if rows * cols > 1:
        canvas = _resized(image, rows * tile_size, cols * tile_size, resample)  # (rows*tile, cols*tile, 3)
        grid = canvas.reshape(rows, tile_size, cols, tile_size, 3).transpose(0, 2, 1, 3, 4)  # (rows, cols, tile, tile, 3)
        crops += list(grid.reshape(rows * cols, tile_size, tile_size, 3))
    return crops, (rows, cols)


__all__ = ["tile_image"]
