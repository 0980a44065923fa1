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
    because ``torch.mv`` is not on autocast's list of bf16 operations. Under ``torch.compile`` too:
    Inductor calls a matrix kernel for ``F.linear``, but rewrites ``torch.mv`` as a generated
    multiply-and-sum loop, with which GPT-2 decoded 39 new tokens/s against 49 with ``F.linear``.
    """
    # Limitation: compiled bf16 decoding runs oneDNN's bf16 kernel through F.linear, slower than eager torch.mv.

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        in_features = weight.size(1)
        # One row: the last dimension is in_features and every other dimension is 1. A layer without
        # inputs (in_features 0) goes to F.linear, since its row count cannot be read from numel.
        if (
            in_features > 0
            and hidden.numel() == in_features
            and hidden.dim() >= 1
            and hidden.size(-1) == in_features
            and hidden.is_cpu
            and hidden.dtype == weight.dtype
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
        ):
            vector = hidden.reshape(-1)
            # addmv adds the bias inside the same kernel call; decoding runs this 73 times per GPT-2 token.
            output = torch.mv(weight, vector) if self.bias is None else torch.addmv(self.bias, weight, vector)
            return output.view(*hidden.shape[:-1], weight.size(0))
        return F.linear(hidden, weight, self.bias)
