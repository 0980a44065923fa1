"""Causal language-modelling data: random training windows and the exact validation pass.

Training draws windows of ``context + 1`` tokens at uniformly random offsets of the training
token stream, from a seeded ``torch.Generator``; the generator's state is the data position
that a checkpoint stores, so a resumed run draws the same batches. Validation covers the
held-out stream in non-overlapping windows, so every held-out token is predicted exactly once.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class RandomWindows:
    """Batches of (inputs, targets), each (batch, context), from random offsets of ``tokens``."""

    def __init__(self, tokens: np.ndarray, context: int, batch_size: int, seed: int):
        if len(tokens) < context + 1:
            raise ValueError(
                f"The training split has {len(tokens)} tokens, fewer than one window of context+1={context + 1}; "
                "use more text or a smaller model.max_seq_len."
            )
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.context = context
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.window_offsets = torch.arange(context + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one batch; advances the generator."""
        starts = torch.randint(0, len(self.tokens) - self.context, (self.batch_size,), generator=self.generator)
        windows = self.tokens[starts[:, None] + self.window_offsets]  # (batch, context + 1)
        return windows[:, :-1], windows[:, 1:]

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def evaluation_windows(tokens: np.ndarray, context: int, start_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a held-out stream into non-overlapping windows that predict every token once.

    ``start_ids`` are prepended as the context of the first token (a newline for character
    models, the end-of-text id for BPE), so that no held-out token goes unpredicted. The last
    window is padded with target -100, which the loss ignores. Returns (inputs, targets), each
    (n_windows, context).
    """
    stream = torch.from_numpy(np.concatenate([np.asarray(start_ids, dtype=np.int64), np.asarray(tokens, dtype=np.int64)]))
    n_targets = len(stream) - 1
    if len(tokens) == 0:
        raise ValueError("The validation split is empty; prepare a corpus with held-out text.")
    n_windows = math.ceil(n_targets / context)
    padded_length = n_windows * context + 1
    padded = torch.full((padded_length,), -100, dtype=torch.int64)
    padded[: len(stream)] = stream
    inputs = padded[:-1].view(n_windows, context).clone()
    targets = padded[1:].view(n_windows, context).clone()
    inputs[inputs < 0] = 0  # padding inputs only feed positions whose targets are ignored
    # Start ids after the first are context, not held-out text, so they are never scored.
    targets.view(-1)[: max(len(start_ids) - 1, 0)] = -100
    return inputs, targets
