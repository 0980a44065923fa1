"""Position information for attention models, each scheme stating how it acts.

- ``learned``: a trained table of absolute position vectors added to the token embeddings
  (GPT-2, BERT).
- ``sinusoidal``: the fixed table of Vaswani et al. 2017, sec. 3.5:
  PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)),
  added to the token embeddings.
- ``none``: no position signal (a causal mask alone still leaks order, Haviv et al. 2022).

``ACTS_ON`` tells a model where each scheme enters: ``embeddings`` (added to the input),
``queries_keys`` (rotates q and k), or ``scores`` (a bias added to attention scores).
"""

from __future__ import annotations

import math

import torch
from torch import nn

POSITIONS = ("learned", "sinusoidal", "none")
ACTS_ON = {"learned": "embeddings", "sinusoidal": "embeddings", "none": "nothing"}


def sinusoidal_table(n_positions: int, d_model: int) -> torch.Tensor:
    """Return the (n_positions, d_model) sinusoidal table of Vaswani et al. 2017, sec. 3.5."""
    positions = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)
    # 1 / 10000^(2i / d_model) for i = 0 .. d_model/2 - 1, computed in float64 for exactness.
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    angles = positions * inv_freq
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return table.float()


class LearnedPositions(nn.Module):
    """A trainable (max_seq_len, d_model) table looked up by position id."""

    def __init__(self, max_seq_len: int, d_model: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.weight = nn.Parameter(torch.zeros(max_seq_len, d_model))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Return position vectors of shape (*position_ids.shape, d_model)."""
        check_position_range(position_ids, self.max_seq_len)
        return nn.functional.embedding(position_ids, self.weight)


class SinusoidalPositions(nn.Module):
    """The fixed sinusoidal table, stored as a non-persistent buffer (it is never trained)."""

    def __init__(self, max_seq_len: int, d_model: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.register_buffer("table", sinusoidal_table(max_seq_len, d_model), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        check_position_range(position_ids, self.max_seq_len)
        return self.table[position_ids]


def check_position_range(position_ids: torch.Tensor, max_seq_len: int) -> None:
    """Raise a ``ValueError`` when a position id falls outside a table of ``max_seq_len`` rows."""
    if position_ids.numel() == 0:
        return
    largest = int(position_ids.max())
    smallest = int(position_ids.min())
    if largest >= max_seq_len or smallest < 0:
        raise ValueError(
            f"Position id {largest if largest >= max_seq_len else smallest} is outside the position table "
            f"of max_seq_len={max_seq_len}; crop the input to at most {max_seq_len} tokens."
        )


def build_absolute_positions(kind: str, max_seq_len: int, d_model: int) -> nn.Module | None:
    """Build the module that adds absolute positions to embeddings, or None for other schemes."""
    if kind == "learned":
        return LearnedPositions(max_seq_len, d_model)
    if kind == "sinusoidal":
        return SinusoidalPositions(max_seq_len, d_model)
    if kind == "none":
        return None
    raise ValueError(f"position={kind!r} is invalid; allowed values: {', '.join(POSITIONS)}.")
