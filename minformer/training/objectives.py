"""Training objectives: each draws batches, sums its loss over target tokens, and evaluates held-out data.

The trainer only sees this interface, so a new objective (masked LM, span corruption,
sequence-to-sequence pairs) is a new class here plus an entry in ``OBJECTIVES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from minformer.data.datasets import RandomWindows, evaluation_windows


@dataclass
class LossParts:
    """What one forward pass of an objective returns.

    ``nats``: the summed cross-entropy over the batch's target tokens (a scalar tensor);
    ``aux_loss``: an auxiliary loss already weighted by its coefficient (mixture-of-experts
    balancing), or None; ``metrics``: extra floats to log.
    """

    nats: torch.Tensor
    aux_loss: torch.Tensor | None = None
    metrics: dict | None = None


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over targets, ignoring -100, computed in fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum")


def start_ids(tokenizer) -> list[int]:
    """The context placed before the first held-out token: end-of-text if the tokenizer has one, else a newline."""
    if tokenizer.eos_id is not None:
        return [tokenizer.eos_id]
    return tokenizer.encode("\n")


class CausalLMObjective:
    """Next-token prediction (Radford et al. 2018, eq. 1) on random windows of the training stream."""

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, context: int, batch_size: int, seed: int, start_ids: list[int]):
        self.context = context
        self.n_train_tokens = len(train_tokens)
        self.n_val_tokens = len(val_tokens)
        self.windows = RandomWindows(train_tokens, context, batch_size, seed)
        self.val_inputs, self.val_targets = evaluation_windows(val_tokens, context, start_ids)

    @classmethod
    def from_run(cls, config, tokenizer, corpus) -> "CausalLMObjective":
        """Encode the corpus's splits with ``tokenizer`` and sample windows of ``model.max_seq_len``."""
        objective = cls(
            tokenizer.encode_array(corpus.text("train")),
            tokenizer.encode_array(corpus.text("val")),
            config.model.max_seq_len,
            config.train.batch_size,
            config.train.seed,
            start_ids(tokenizer),
        )
        objective.val_characters = len(corpus.text("val"))
        return objective

    def describe(self) -> str:
        """One line on the data, for the progress display."""
        return f"{self.n_train_tokens:,} training tokens, {self.n_val_tokens:,} held out"

    def next_batch(self) -> dict[str, torch.Tensor]:
        inputs, targets = self.windows.next_batch()
        return {"input_ids": inputs, "targets": targets}

    @staticmethod
    def n_targets(batch: dict) -> int:
        return int((batch["targets"] != -100).sum())

    @staticmethod
    def n_tokens(batch: dict) -> int:
        """Tokens the model reads in this batch, for throughput."""
        return batch["input_ids"].numel()

    def loss(self, model, batch: dict) -> LossParts:
        output = model(batch["input_ids"])
        return LossParts(nats=summed_cross_entropy(output.logits, batch["targets"]), aux_loss=getattr(output, "aux_loss", None))

    def eval_batches(self, batch_size: int, n_windows: int | None = None) -> Iterator[dict]:
        """Held-out batches: every window, or ``n_windows`` evenly spaced ones (the same every time)."""
        total = len(self.val_inputs)
        if n_windows is None or n_windows >= total:
            chosen = torch.arange(total)
        else:
            chosen = torch.linspace(0, total - 1, n_windows).round().long().unique()
        for start in range(0, len(chosen), batch_size):
            index = chosen[start : start + batch_size]
            yield {"input_ids": self.val_inputs[index], "targets": self.val_targets[index]}

    def get_state(self) -> torch.Tensor:
        return self.windows.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.windows.set_state(state)


OBJECTIVES = {"causal_lm": CausalLMObjective}


@torch.no_grad()
def held_out_loss(model, objective, batch_size: int, device, n_windows: int | None = None, autocast_dtype=None) -> tuple[float, int]:
    """Summed nats and target count over the objective's held-out batches, in eval mode.

    ``n_windows`` None covers every held-out window (the exact validation loss). The model's
    previous mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    total_nats, total_targets = 0.0, 0
    try:
        for batch in objective.eval_batches(batch_size, n_windows):
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                parts = objective.loss(model, batch)
            total_nats += float(parts.nats)
            total_targets += objective.n_targets(batch)
    finally:
        model.train(was_training)
    return total_nats, total_targets
