"""A linear layer that decodes single tokens with a matrix-vector product."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def row_product(weight: torch.Tensor, vector: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Return weight @ vector (+ bias) with PyTorch's matrix-vector kernel; the bias is added in the same call."""
    return torch.mv(weight, vector) if bias is None else torch.addmv(bias, weight, vector)


@torch.library.custom_op("minformer::row_product", mutates_args=())
def compiled_row_product(weight: torch.Tensor, vector: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``row_product`` as an operator that torch.compile calls as it is instead of generating code for it.

    Inductor otherwise turns a matrix-vector product into a generated multiply-and-sum loop, which
    read GPT-2's fp32 weights more slowly than this kernel (39 against 47 new tokens/s decoding).
    """
    return row_product(weight, vector, bias)


@compiled_row_product.register_fake
def _(weight: torch.Tensor, vector: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return weight.new_empty(weight.size(0))


def _row_product_backward(ctx, grad: torch.Tensor):
    # y = W v + b: dW = grad v^T, dv = W^T grad, db = grad.
    weight, vector = ctx.saved_tensors
    grad_weight = torch.outer(grad, vector) if ctx.needs_input_grad[0] else None
    grad_vector = torch.mv(weight.t(), grad) if ctx.needs_input_grad[1] else None
    grad_bias = grad if ctx.needs_input_grad[2] else None
    return grad_weight, grad_vector, grad_bias


def _save_for_backward(ctx, inputs, output) -> None:
    weight, vector, _ = inputs
    ctx.save_for_backward(weight, vector)


compiled_row_product.register_autograd(_row_product_backward, setup_context=_save_for_backward)


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
        ):
            product = compiled_row_product if torch.compiler.is_compiling() else row_product
            output = product(weight, hidden.reshape(-1), self.bias)
            return output.view(*hidden.shape[:-1], weight.size(0))
        return F.linear(hidden, weight, self.bias)
