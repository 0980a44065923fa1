"""Position-wise feed-forward networks (Vaswani et al. 2017, eq. 2) and gated variants.

FFN(x) = act(x W_in + b_in) W_out + b_out. The gated variants (Shazeer 2020, "GLU Variants
Improve Transformer", eq. 6) multiply the activated branch by a second linear branch:
FFN(x) = (act(x W_gate) * (x W_in)) W_out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minformer.linear import Linear

# `gelu` is the exact erf form (BERT); `gelu_tanh` is the tanh approximation GPT-2 uses.
# `geglu_tanh` gates with the tanh GELU, as T5 v1.1 does ("gated-gelu", i.e. gelu_new, in transformers).
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "geglu", "geglu_tanh", "swiglu", "reglu")
GATED_ACTIVATIONS = {"geglu": "gelu", "geglu_tanh": "gelu_tanh", "swiglu": "silu", "reglu": "relu"}


def activation_fn(name: str):
    """Return the elementwise function for a non-gated activation name."""
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda hidden: F.gelu(hidden, approximate="tanh")
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu
    raise ValueError(f"activation={name!r} is invalid; allowed values: {', '.join(ACTIVATIONS)}.")


def apply_dropout(dropout: nn.Dropout, hidden: torch.Tensor) -> torch.Tensor:
    """Return ``dropout(hidden)``, or ``hidden`` itself when the dropout is inactive (eval mode or rate 0).

    Skipping an inactive dropout saves its dispatch in every decoding step. The module's own flag
    decides, so Monte Carlo dropout (model.eval(), then only the Dropout modules in train mode) works.
    """
    return dropout(hidden) if dropout.training and dropout.p > 0 else hidden


class FeedForward(nn.Module):
    """Two-layer MLP, or its gated form when ``activation`` is one of ``GATED_ACTIVATIONS``."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.gated = activation in GATED_ACTIVATIONS
        self.act = activation_fn(GATED_ACTIVATIONS.get(activation, activation))
        self.fc_in = Linear(d_model, d_ff, bias=bias)
        self.fc_gate = Linear(d_model, d_ff, bias=bias) if self.gated else None
        self.fc_out = Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.gated:
            inner = self.act(self.fc_gate(hidden)) * self.fc_in(hidden)
        else:
            inner = self.act(self.fc_in(hidden))
        return self.fc_out(apply_dropout(self.dropout, inner))
