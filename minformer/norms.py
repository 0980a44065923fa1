"""Normalisation layers: LayerNorm (Ba et al. 2016, eq. 15-16) and RMSNorm (Zhang & Sennrich 2019, eq. 4).

LayerNorm subtracts the mean and divides by the standard deviation over the feature axis, then
applies a learned gain and (optionally) bias. RMSNorm only divides by the root mean square and
applies a gain: no mean subtraction and no bias, as T5 does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("layernorm", "rmsnorm")


class LayerNorm(nn.Module):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, over the last axis."""

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(hidden, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last axis, computed in fp32."""

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The mean square is taken in fp32 because bf16 loses the small components of the sum.
        hidden_fp32 = hidden.float()
        inv_rms = torch.rsqrt(hidden_fp32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (hidden_fp32 * inv_rms).to(hidden.dtype) * self.weight


def build_norm(kind: str, d_model: int, eps: float, bias: bool = True) -> nn.Module:
    """Build the norm named by ``kind`` (one of ``NORMS``)."""
    if kind == "layernorm":
        return LayerNorm(d_model, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(d_model, eps=eps)
    raise ValueError(f"norm={kind!r} is invalid; allowed values: {', '.join(NORMS)}.")
