"""Norms, feed-forward activations and absolute positions against their defining formulas."""

import math

import pytest
import torch

from minformer.feedforward import FeedForward, activation_fn
from minformer.norms import LayerNorm, RMSNorm
from minformer.positions import LearnedPositions, SinusoidalPositions, sinusoidal_table


def test_layernorm_matches_formula():
    torch.manual_seed(0)
    norm = LayerNorm(8, eps=1e-3)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    hidden = torch.randn(3, 8)

    mean = hidden.mean(-1, keepdim=True)
    variance = hidden.var(-1, unbiased=False, keepdim=True)
    expected = (hidden - mean) / torch.sqrt(variance + 1e-3) * norm.weight + norm.bias

    torch.testing.assert_close(norm(hidden), expected, atol=1e-5, rtol=1e-5)


def test_rmsnorm_matches_formula_without_mean_subtraction():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    hidden = torch.randn(3, 8) + 5.0

    expected = hidden / torch.sqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight

    torch.testing.assert_close(norm(hidden), expected, atol=1e-5, rtol=1e-5)


def test_exact_gelu_is_erf_form():
    values = torch.linspace(-4, 4, 101)

    expected = 0.5 * values * (1 + torch.erf(values / math.sqrt(2)))

    torch.testing.assert_close(activation_fn("gelu")(values), expected, atol=1e-6, rtol=1e-6)


def test_tanh_gelu_is_tanh_form_and_differs_from_exact():
    values = torch.linspace(-4, 4, 101)

    expected = 0.5 * values * (1 + torch.tanh(math.sqrt(2 / math.pi) * (values + 0.044715 * values**3)))

    torch.testing.assert_close(activation_fn("gelu_tanh")(values), expected, atol=1e-6, rtol=1e-6)
    assert (activation_fn("gelu_tanh")(values) - activation_fn("gelu")(values)).abs().max() > 1e-4


def test_gated_feedforward_multiplies_branches():
    torch.manual_seed(0)
    ffn = FeedForward(6, 10, activation="swiglu")
    hidden = torch.randn(2, 6)

    expected = ffn.fc_out(torch.nn.functional.silu(ffn.fc_gate(hidden)) * ffn.fc_in(hidden))

    torch.testing.assert_close(ffn(hidden), expected)


def test_unknown_activation_names_field():
    with pytest.raises(ValueError, match="activation='swish'"):
        FeedForward(4, 8, activation="swish")


def test_sinusoidal_table_matches_vaswani_formula():
    table = sinusoidal_table(50, 16)

    for position in (0, 1, 7, 49):
        for i in range(8):
            angle = position / 10000 ** (2 * i / 16)
            assert table[position, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[position, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_positions_are_not_parameters():
    positions = SinusoidalPositions(10, 8)

    assert list(positions.parameters()) == []
    assert "table" not in positions.state_dict()


def test_position_past_table_is_rejected():
    positions = LearnedPositions(4, 8)
    with pytest.raises(ValueError, match="max_seq_len=4"):
        positions(torch.arange(5))
