"""Tests of ``minformer.linear.Linear``: its matrix-vector path equals ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minformer.linear import Linear


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@settings(max_examples=30, deadline=None)
@given(
    in_features=st.integers(0, 40),
    out_features=st.integers(0, 40),
    leading=st.sampled_from([(), (1,), (1, 1), (2,), (3, 1), (1, 3), (2, 2)]),
    bias=st.booleans(),
)
def test_linear_matches_f_linear_fp32(in_features, out_features, leading, bias):
    torch.manual_seed(0)
    layer = Linear(in_features, out_features, bias=bias)
    hidden = torch.randn(*leading, in_features)

    output = layer(hidden)
    expected = F.linear(hidden, layer.weight, layer.bias)

    assert output.shape == expected.shape
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("out_features", [5, 0])
def test_wrong_width_row_raises(out_features):
    """A (2, 4) input has 8 numbers, like one row of Linear(8, ...), but its rows are 4 wide."""
    layer = Linear(8, out_features)
    hidden = torch.randn(2, 4)

    with pytest.raises(RuntimeError) as expected:
        F.linear(hidden, layer.weight, layer.bias)
    with pytest.raises(RuntimeError) as raised:
        layer(hidden)

    assert str(raised.value) == str(expected.value)


@pytest.mark.parametrize("bias", [True, False])
def test_single_row_bf16_matches_f_linear(bias):
    torch.manual_seed(0)
    layer = Linear(256, 96, bias=bias).to(torch.bfloat16)
    hidden = torch.randn(1, 1, 256, dtype=torch.bfloat16)

    output = layer(hidden)
    reference = F.linear(hidden.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())

    assert output.dtype == torch.bfloat16
    assert output.shape == (1, 1, 96)
    # Both paths round the fp32 result to bf16 (8 bits of mantissa).
    torch.testing.assert_close(output.float(), reference, rtol=2e-2, atol=2e-2)


def test_autocast_single_row_keeps_dtype():
    layer = Linear(16, 8)
    hidden = torch.randn(1, 16)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(hidden)

    assert output.dtype == torch.bfloat16


def test_single_row_gradients_match_f_linear():
    torch.manual_seed(0)
    layer = Linear(12, 5)
    hidden = torch.randn(1, 12, requires_grad=True)

    layer(hidden).square().sum().backward()
    grads = (hidden.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
    hidden.grad = None
    layer.zero_grad()
    F.linear(hidden, layer.weight, layer.bias).square().sum().backward()

    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], layer.weight.grad)
    torch.testing.assert_close(grads[2], layer.bias.grad)


def test_compiled_single_row_matches_f_linear():
    torch.manual_seed(0)
    layer = Linear(12, 5)
    hidden = torch.randn(1, 1, 12)

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    output = compiled(hidden)

    torch.testing.assert_close(output, F.linear(hidden, layer.weight, layer.bias))
