"""A linear layer that decodes single tokens with a matrix-vector product."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """``nn.Linear`` (y = x W^T + b) that computes an input of one row with ``torch.mv``.

    Decoding one token at batch size 1 multiplies every weight matrix by a single vector, so the
    step is bound by reading the weights. On CPUs, PyTorch's matrix-vector kernel reads them
    faster than the general matrix product behind ``F.linear``: on a 2-core x86 machine with
    PyTorch 2.13, 24 against 15 GB/s for bf16 weights and 29 against 27 GB/s for fp32
    (``benchmarks/README.md``). Under autocast, and on other devices, ``F.linear`` is used,
    because ``torch.mv`` is not on autocast's list of bf16 operations.
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # One row has exactly in_features numbers; F.linear rejects any other last dimension anyway.
        if (
            hidden.numel() == self.in_features
            and hidden.dim() >= 1
            and hidden.device.type == "cpu"
            and hidden.dtype == self.weight.dtype
            and not torch.is_autocast_enabled("cpu")
        ):
            output = torch.mv(self.weight, hidden.reshape(-1))
            if self.bias is not None:
                output = output + self.bias
            return output.reshape(*hidden.shape[:-1], self.out_features)
        return F.linear(hidden, self.weight, self.bias)
