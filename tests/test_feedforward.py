"""Tests of ``minformer.feedforward.apply_dropout``: an inactive dropout is skipped, an active one drops."""

from __future__ import annotations

import torch
from torch import nn

from minformer.feedforward import apply_dropout


def test_inactive_dropout_returns_input():
    hidden = torch.randn(4, 8)

    assert apply_dropout(nn.Dropout(0.5).eval(), hidden) is hidden
    assert apply_dropout(nn.Dropout(0.0).train(), hidden) is hidden


def test_active_dropout_drops():
    torch.manual_seed(0)
    hidden = torch.ones(64, 64)

    dropped = apply_dropout(nn.Dropout(0.5).train(), hidden)

    assert (dropped == 0).any()
    assert torch.all((dropped == 0) | (dropped == 2.0))
