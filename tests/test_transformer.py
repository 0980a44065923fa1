"""Tests of the 2017 Transformer's training pieces: the inverse-square-root warm-up schedule."""

from __future__ import annotations

import math

import pytest

from minformer.training.optim import inverse_sqrt_learning_rate


@pytest.mark.parametrize("step", [1, 2, 100, 3999, 4000, 4001, 10_000, 100_000])
def test_inverse_sqrt_schedule_matches_formula(step):
    # Vaswani et al. 2017, eq. 3, with the paper's d_model = 512 and warmup_steps = 4000.
    expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)

    assert inverse_sqrt_learning_rate(step, 512, 4000) == pytest.approx(expected, rel=1e-12)


def test_inverse_sqrt_schedule_peaks_at_warmup_end():
    rates = [inverse_sqrt_learning_rate(step, 512, 4000) for step in range(1, 20_000)]

    assert max(range(len(rates)), key=rates.__getitem__) + 1 == 4000
    assert rates[3999] == pytest.approx(512**-0.5 / math.sqrt(4000))


def test_inverse_sqrt_schedule_is_linear_then_decays():
    assert inverse_sqrt_learning_rate(0, 512, 4000) == 0.0
    assert inverse_sqrt_learning_rate(2000, 512, 4000) == pytest.approx(inverse_sqrt_learning_rate(1000, 512, 4000) * 2)
    assert inverse_sqrt_learning_rate(16_000, 512, 4000) == pytest.approx(inverse_sqrt_learning_rate(4000, 512, 4000) / 2)


@pytest.mark.parametrize("step, warmup_steps", [(-1, 4000), (1.5, 4000), (10, 0)])
def test_inverse_sqrt_schedule_rejects_invalid_arguments(step, warmup_steps):
    with pytest.raises(ValueError):
        inverse_sqrt_learning_rate(step, 512, warmup_steps)
