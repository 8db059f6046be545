"""A convolutional patch stem for vision towers trained from scratch.

A ViT cuts the image into patches with one strided convolution (kernel = stride = patch size), a linear map
of each patch's pixels. Its features then depend on where a shape falls relative to the patch grid, and a
small tower trained from scratch on little data learns shape separately at each offset. A stack of 3x3
stride-2 convolutions with a nonlinearity between them (Xiao et al., 2021, "Early Convolutions Help
Transformers See Better") computes local edges and corners the same way at every pixel before the
transformer sees them, and keeps the tower's interface: same input, same patch grid, same width.

`use_conv_stem` swaps it in place of the tower's patch convolution; the rest of the tower is unchanged, so
any CLIP / SigLIP / ViT / DINOv2 vision config works.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ConvPatchStem(nn.Module):
    """(n, C, H, W) -> (n, width, H/patch, W/patch) through log2(patch) 3x3 stride-2 convs and a 1x1 conv.

    Channels double at each stride-2 step up to `width`; GELU between layers; no normalisation (its batch
    statistics would make an image's features depend on its batch).
    """

    def __init__(self, in_channels: int, width: int, patch_size: int):
        super().__init__()
        steps = int(math.log2(patch_size))
        if patch_size < 2 or 2**steps != patch_size:
            raise ValueError(f"A convolutional stem needs a power-of-two patch_size >= 2, got {patch_size}.")
        channels = [in_channels] + [max(width >> (steps - i), 8) for i in range(1, steps + 1)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.GELU()]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(channels[-1], width, kernel_size=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The towers read `patch_embedding.weight.dtype` to cast their input; the output conv's weight answers."""
        return self.proj.weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(pixel_values))


def find_patch_convolution(tower: nn.Module, patch_size: int) -> tuple[nn.Module, str]:
    """The parent module and attribute name of the tower's patch convolution (kernel = stride = patch)."""
    for name, module in tower.named_modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (patch_size, patch_size) == module.stride:
            parent_name, _, attribute = name.rpartition(".")
            return tower.get_submodule(parent_name), attribute
    raise ValueError(f"{type(tower).__name__} has no Conv2d with kernel and stride {patch_size} to replace with a stem.")


def use_conv_stem(tower: nn.Module, patch_size: int) -> ConvPatchStem:
    """Replace the tower's patch convolution by a `ConvPatchStem` with the same input channels and width.

    The stem keeps its own initialisation: parameters that hold their drawn values carry the flag
    transformers puts on loaded weights, so the tower's `_init_weights` (small normal) leaves them alone in
    `post_init`. Under `from_pretrained` they are built on the meta device (nothing drawn, no flag), so
    weights the checkpoint lacks (a patch-stem checkpoint loaded with `vision_stem="conv"`) are drawn by the
    tower's init, N(0, initializer_range), as transformers does for any missing weight.
    """
    parent, attribute = find_patch_convolution(tower, patch_size)
    old = getattr(parent, attribute)
    stem = ConvPatchStem(old.in_channels, old.out_channels, patch_size)
    for param in stem.parameters():
        if not param.is_meta:
            param._is_hf_initialized = True
    setattr(parent, attribute, stem)
    return stem
