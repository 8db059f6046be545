"""Projectors from encoder space into the LM's embedding space, and the token-compressing pools.

Pooling happens before projection (cheaper: encoder width is usually smaller than the LM's), and the
pooled sizes are exactly those `MediaTokenLayout` counts, which the processor uses to expand the
placeholders.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from .tiling import TileMarkers


def keep_torch_default_init(module: nn.Module) -> None:
    """Mark every Linear under `module` to keep PyTorch's default initialisation in `post_init`.

    transformers' `_init_weights` draws Linear weights from N(0, 0.02), the LM's scheme. Two such layers in
    a row shrink a signal many-fold, so a tower trained from scratch behind them gets little useful gradient
    until they have grown (docs/RESULTS.md has the measurement; `examples/diagnostics/shape_learning.py`
    reproduces it). The original LLaVA code builds its projector from plain `nn.Linear`s, which keep
    PyTorch's default (Kaiming-uniform) initialisation; so do ours and the bag-of-words head.
    `MultimodalPreTrainedModel._init_weights` honours the mark.
    """
    for child in module.modules():
        if isinstance(child, nn.Linear):
            child._torch_default_init = True


class MultiModalProjector(nn.Module):
    """`linear`: one Linear; `mlp`: Linear → activation → Linear (LLaVA-1.5's projector), PyTorch's default init.

    standardize: subtract a per-channel mean and divide by a per-channel standard deviation before the first
    Linear. A pretrained tower's features are badly conditioned for a freshly initialised projector: most of
    their energy is a per-channel offset shared by every input, and channels differ in scale by an order of
    magnitude, so Adam spends its first hundreds of steps on the scale instead of on what varies between
    inputs. The statistics are buffers (saved with the model), estimated once from training data by
    `training.calibration.calibrate_projectors`; until then they are the identity (mean 0, std 1).

    num_positions: with N > 0, a learned (N, out_features) table, zero at start, is added to the output: the
    input is a sequence of groups of N tokens (an image's pooled patch grid, or each time step of a video), and
    token i of every group gets row i (`config.projector_position_embeddings`).

    row_end: a learned (out_features,) vector that `append_row_ends` puts after each row of an image's grid
    (`config.image_newline`); it lives here so that it trains, saves and is touched with the projector.

    max_tiles: with N > 0, the `tiling.TileMarkers` that name each crop of a tiled image (`config.image_max_tiles`),
    here for the same reason.
    """

    def __init__(
        self, in_features: int, out_features: int, kind: str = "mlp", act: str = "gelu", standardize: bool = False,
        num_positions: int = 0, row_end: bool = False, max_tiles: int = 0,
    ):
        super().__init__()
        self.kind = kind
        self.standardize = standardize
        self.in_features, self.num_positions = in_features, num_positions
        if standardize:
            self.register_buffer("input_mean", torch.zeros(in_features))
            self.register_buffer("input_std", torch.ones(in_features))
            self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.linear_1 = nn.Linear(in_features, out_features)
        if kind == "mlp":
            self.act = ACT2FN[act]
            self.linear_2 = nn.Linear(out_features, out_features)
        self.position_embedding = nn.Parameter(torch.zeros(num_positions, out_features)) if num_positions else None
        self.row_end = nn.Parameter(torch.zeros(out_features)) if row_end else None
        self.tile_markers = TileMarkers(max_tiles, out_features) if max_tiles else None
        keep_torch_default_init(self)

    def reset_position_embedding(self) -> None:
        """Zero the position table (a fresh projector adds nothing until training moves it)."""
        if self.position_embedding is not None:
            with torch.no_grad():
                self.position_embedding.zero_()

    def touch(self, like: torch.Tensor) -> torch.Tensor:
        """The sum of a pass over one zero group of inputs (the trainer's zero-weight touch of an unused projector)."""
        total = self(like.new_zeros(1, self.num_positions or 1, self.in_features)).sum()
        if self.row_end is not None:
            total = total + self.row_end.to(total.dtype).sum()
        return total if self.tile_markers is None else total + self.tile_markers.touch().to(total.dtype)

    def reset_standardization(self) -> None:
        """Back to the identity, not calibrated."""
        if self.standardize:
            with torch.no_grad():
                self.input_mean.zero_()
                self.input_std.fill_(1.0)
                self.calibrated.fill_(False)

    @torch.no_grad()
    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Use `mean` and `std` (per input channel) from now on; std is floored so no channel is blown up."""
        if not self.standardize:
            raise ValueError("this projector was built with standardize=False (config.projector_input_standardize)")
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp(min=1e-6 * float(std.max().clamp(min=1e-12)) + 1e-12))
        self.calibrated.fill_(True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            features = (features - self.input_mean.to(features.dtype)) / self.input_std.to(features.dtype)
        hidden = self.linear_1(features)
        if self.kind == "mlp":
            hidden = self.linear_2(self.act(hidden))
        if self.position_embedding is not None:
            n, length, width = hidden.shape
            if length % self.num_positions:
                raise ValueError(
                    f"the projector adds {self.num_positions} position embeddings per group of tokens, but got "
                    f"{length} tokens per item (not a multiple)"
                )
            table = self.position_embedding.to(hidden.dtype)
            hidden = (hidden.view(n, length // self.num_positions, self.num_positions, width) + table).view(n, length, width)
        return hidden


def append_row_ends(tokens: torch.Tensor, side: int, row_end: torch.Tensor) -> torch.Tensor:
    """(n, [cls +] side*side, d) -> (n, [cls +] side*(side + 1), d): `row_end` after each row of the grid."""
    n, length, width = tokens.shape
    head, grid = tokens[:, : length - side * side], tokens[:, length - side * side :]
    ends = row_end.to(tokens.dtype).expand(n, side, 1, width)
    rows = torch.cat([grid.reshape(n, side, side, width), ends], dim=2)
    return torch.cat([head, rows.reshape(n, side * (side + 1), width)], dim=1)


def pool_patch_grid(features: torch.Tensor, stride: int) -> torch.Tensor:
    """Average-pool a square patch grid by `stride` per side: (n, g*g, d) -> (n, (g/stride)^2, d)."""
    if stride == 1:
        return features
    n, num_patches, dim = features.shape
    side = int(round(num_patches**0.5))
    grid = features.transpose(1, 2).reshape(n, dim, side, side)  # (n, d, g, g)
    pooled = F.avg_pool2d(grid, kernel_size=stride, stride=stride)  # (n, d, g/s, g/s)
    return pooled.flatten(2).transpose(1, 2)


def pixel_shuffle(features: torch.Tensor, stride: int) -> torch.Tensor:
    """Space-to-depth on a square patch grid: (n, g*g, d) -> (n, (g/stride)^2, d*stride^2) (SmolVLM / nanoVLM).

    Each stride x stride block of patches becomes one token holding all of their features (in the block's row-major
    order, then the feature axis), so tokens shrink as with `pool_patch_grid` but no feature is averaged away.
    """
    if stride == 1:
        return features
    n, num_patches, dim = features.shape
    side = int(round(num_patches**0.5))
    blocks = features.reshape(n, side // stride, stride, side // stride, stride, dim)  # (n, g/s, s, g/s, s, d)
    blocks = blocks.permute(0, 1, 3, 2, 4, 5)  # (n, g/s, g/s, s, s, d): block row, block column, within the block
    return blocks.reshape(n, (side // stride) ** 2, stride * stride * dim)


# `config.image_token_compression` -> how a patch grid shrinks by its stride per side (same token count either way).
PATCH_GRID_COMPRESSIONS = {"avg_pool": pool_patch_grid, "pixel_shuffle": pixel_shuffle}


def compress_patch_grid(features: torch.Tensor, stride: int, compression: str = "avg_pool") -> torch.Tensor:
    """(n, g*g, d) -> (n, (g/stride)^2, d or d*stride^2): `PATCH_GRID_COMPRESSIONS[compression]`."""
    return PATCH_GRID_COMPRESSIONS[compression](features, stride)


def pool_time(features: torch.Tensor, lengths: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool each sequence in time by `stride`, using only its first `lengths[i]` positions.

    (n, L, d) -> (n, ceil(L/stride), d) and the pooled lengths ceil(lengths/stride). The last window
    of a sequence averages only its real positions, so a padded sequence pools exactly as it would alone.
    """
    n, length, dim = features.shape
    valid = (torch.arange(length, device=features.device)[None, :] < lengths[:, None]).to(features.dtype)
    if stride == 1:
        return features * valid[..., None], lengths
    padded_length = -(-length // stride) * stride
    features = F.pad(features * valid[..., None], (0, 0, 0, padded_length - length))
    valid = F.pad(valid, (0, padded_length - length))
    sums = features.view(n, padded_length // stride, stride, dim).sum(2)  # (n, L/s, d)
    counts = valid.view(n, padded_length // stride, stride).sum(2).clamp(min=1)  # (n, L/s)
    return sums / counts[..., None], (lengths + stride - 1) // stride
