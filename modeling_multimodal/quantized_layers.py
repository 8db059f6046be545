"""int8 layers for CPU inference: a Linear with per-token dynamic activations, and an int8 embedding table.

`Int8DynamicLinear` is what `compression`'s `dynamic-int8` method puts in place of the LM's Linear layers and its
head. Weights are int8 per output channel (symmetric); each call quantizes every token's activations with that
token's own absolute maximum, multiplies in int8 with int32 accumulation (`torch._int_mm`: oneDNN / fbgemm on
x86) and rescales. Per token, not per tensor, because small decoders such as SmolLM2 put activations in the
thousands on a few tokens (the first one above all) of a few layers: one scale for the whole batch, as
`torch.ao.quantization.quantize_dynamic` uses, rounds every other token of those layers to zero (measured in
docs/COMPRESSION.md). torchao's `Int8DynamicActivationInt8WeightConfig` computes the same thing but ran at 0.56×
float32's speed here in eager mode (its tensor subclass dispatch per call costs more than the int8 GEMM saves at
batch 1); this module keeps only the arithmetic.

`Int8Embedding` holds the token table as int8 rows with one scale per row, the same quantization as a Linear's
output channels, so a tied LM head and its embedding share one int8 matrix.
"""

from __future__ import annotations

import torch
from torch import nn

INT8_MAX = 127


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row): symmetric, each row's absolute maximum maps to 127."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=-1) / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    values = torch.round(weight / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values, scale


class Int8DynamicLinear(nn.Module):
    """y = x Wᵀ + b with W in int8 per output channel and x quantized to int8 per token on each call."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8DynamicLinear":
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        module.weight_int8, module.weight_scale = quantize_rows(linear.weight)
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().float().clone()
        return module

    def dequantize(self) -> torch.Tensor:
        """The weight back in float32 (what the int8 values approximate)."""
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        scale = (rows.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        quantized = torch.round(rows / scale).to(torch.int8)  # |rows / scale| <= 127 by construction
        out = torch._int_mm(quantized, self.weight_int8.t()).float() * scale * self.weight_scale
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """An embedding table as int8 rows and a scale per row; looked-up rows come back in float32."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "Int8Embedding":
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx)
        module.weight_int8, module.weight_scale = quantize_rows(embedding.weight)
        return module

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[input_ids].float() * self.weight_scale[input_ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


__all__ = ["Int8DynamicLinear", "Int8Embedding", "quantize_rows"]
