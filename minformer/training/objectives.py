"""Training objectives: each draws batches, sums its loss over target tokens, and evaluates held-out data.

The trainer uses only this interface, so a new objective (masked LM, span corruption,
sequence-to-sequence pairs) is a new class here plus an entry in ``OBJECTIVES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from minformer.data.datasets import RandomWindows, evaluation_windows
from minformer.moe import moe_metrics


@dataclass
class LossParts:
    """Output of one forward pass of an objective.

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
    """Return the context placed before the first held-out token: end-of-text if the tokenizer has one, else a newline."""
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
        """Return one line on the data, for the progress display."""
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
        return LossParts(
            nats=summed_cross_entropy(output.logits, batch["targets"]),
            aux_loss=getattr(output, "aux_loss", None),
            metrics=moe_metrics(getattr(output, "moe_stats", None)) or None,
        )

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


def mask_tokens(
    input_ids: torch.Tensor,
    special_ids: list[int],
    mask_id: int,
    vocab_size: int,
    mask_probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (Devlin et al. 2019, sec. 3.1, task 1) of a (batch, seq) batch: returns (inputs, labels).

    Each token that is not a special token (``[CLS]``, ``[SEP]``, ``[PAD]``, ...) is chosen with
    probability ``mask_probability``. A chosen token becomes ``[MASK]`` with probability 0.8, a
    random token with probability 0.1, and stays unchanged with probability 0.1. ``labels`` contains
    the original id at chosen positions and -100 elsewhere. A batch where no token was chosen gets
    one chosen token, so that every batch has a target. Random replacements are drawn from the
    non-special ids only, unlike BERT's whole vocabulary, so that they never insert a ``[SEP]``.
    """
    special = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype)
    candidates = ~torch.isin(input_ids, special)  # (batch, seq)
    chosen = (torch.rand(input_ids.shape, generator=generator) < mask_probability) & candidates
    if not bool(chosen.any()) and bool(candidates.any()):
        candidate_positions = candidates.flatten().nonzero().squeeze(1)
        pick = candidate_positions[torch.randint(len(candidate_positions), (1,), generator=generator)]
        chosen.view(-1)[pick] = True

    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)

    ordinary_ids = torch.tensor([token for token in range(vocab_size) if token not in set(special_ids)], dtype=input_ids.dtype)
    random_ids = ordinary_ids[torch.randint(len(ordinary_ids), input_ids.shape, generator=generator)]
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    inputs = torch.where(to_random, random_ids, inputs)
    return inputs, labels


def bert_segments(pieces: np.ndarray, body_length: int, cls_id: int, sep_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a stream of WordPiece ids into consecutive ``[CLS] body [SEP]`` rows, the last one right-padded.

    Returns (input_ids, attention_mask), each (n_segments, body_length + 2).
    """
    n_segments = max(1, -(-len(pieces) // body_length))
    input_ids = torch.full((n_segments, body_length + 2), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n_segments, body_length + 2), dtype=torch.long)
    for row in range(n_segments):
        body = torch.from_numpy(np.asarray(pieces[row * body_length : (row + 1) * body_length], dtype=np.int64))
        input_ids[row, 0] = cls_id
        input_ids[row, 1 : len(body) + 1] = body
        input_ids[row, len(body) + 1] = sep_id
        attention_mask[row, : len(body) + 2] = 1
    return input_ids, attention_mask


class MaskedLMObjective:
    """Masked language modelling (Devlin et al. 2019, sec. 3.1): predict the chosen tokens of ``[CLS] text [SEP]`` rows.

    Training rows are random windows of the training stream, masked afresh for every batch from
    a seeded generator (dynamic masking, Liu et al. 2019, sec. 4.1). Held-out rows are the
    consecutive segments of each held-out document, masked once with a fixed seed, so the
    held-out loss and accuracy are the same every time they are computed.
    """

    EVAL_MASK_SEED = 20190524

    def __init__(self, train_pieces: np.ndarray, val_documents: list[np.ndarray], tokenizer, context: int,
                 batch_size: int, seed: int, mask_probability: float):
        for attribute in ("mask_id", "cls_id", "sep_id", "pad_id", "special_ids", "encode_pieces"):
            if not hasattr(tokenizer, attribute):
                raise ValueError(
                    f"objective.kind=masked_lm needs a tokenizer with [CLS], [SEP], [PAD] and [MASK] tokens; "
                    f"{type(tokenizer).__name__} has none. Set tokenizer.kind=wordpiece."
                )
        if context < 3:
            raise ValueError(f"model.max_seq_len={context} is too short for masked LM rows of [CLS] text [SEP].")
        self.context = context
        self.body_length = context - 2
        self.masking = dict(
            special_ids=tokenizer.special_ids, mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
            mask_probability=mask_probability,
        )
        self.cls_id, self.sep_id, self.pad_id = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
        self.n_train_tokens = len(train_pieces)
        # RandomWindows draws body_length + 1 ids per row; the last one is dropped below.
        self.windows = RandomWindows(train_pieces, self.body_length, batch_size, seed)
        self.generator = torch.Generator().manual_seed(seed + 1)

        segments = [bert_segments(pieces, self.body_length, self.cls_id, self.sep_id, self.pad_id) for pieces in val_documents]
        val_inputs = torch.cat([inputs for inputs, _ in segments])
        self.val_attention_mask = torch.cat([mask for _, mask in segments])
        eval_generator = torch.Generator().manual_seed(self.EVAL_MASK_SEED)
        self.val_inputs, self.val_labels = mask_tokens(val_inputs, generator=eval_generator, **self.masking)
        self.n_val_tokens = int(sum(len(pieces) for pieces in val_documents))

    @classmethod
    def from_run(cls, config, tokenizer, corpus) -> "MaskedLMObjective":
        """Encode the corpus's splits into WordPiece streams and build rows of ``model.max_seq_len`` tokens."""
        if not hasattr(tokenizer, "encode_pieces"):
            raise ValueError(
                f"objective.kind=masked_lm needs a WordPiece tokenizer, got {type(tokenizer).__name__}; set tokenizer.kind=wordpiece."
            )
        train_pieces = np.concatenate(
            [np.asarray(tokenizer.encode_pieces(text), dtype=np.int64) for _, text in corpus.documents("train")]
        )
        val_documents = [np.asarray(tokenizer.encode_pieces(text), dtype=np.int64) for _, text in corpus.documents("val")]
        return cls(
            train_pieces, val_documents, tokenizer, config.model.max_seq_len, config.train.batch_size,
            config.train.seed, config.objective.mask_probability,
        )

    def describe(self) -> str:
        """Return one line on the data, for the progress display."""
        return (f"{self.n_train_tokens:,} training tokens, {self.n_val_tokens:,} held out, "
                f"{self.masking['mask_probability']:.0%} masked")

    def wrap(self, bodies: torch.Tensor) -> torch.Tensor:
        """Put ``[CLS]`` before and ``[SEP]`` after each (batch, body_length) row."""
        batch = bodies.size(0)
        cls_column = torch.full((batch, 1), self.cls_id, dtype=torch.long)
        sep_column = torch.full((batch, 1), self.sep_id, dtype=torch.long)
        return torch.cat([cls_column, bodies, sep_column], dim=1)  # (batch, context)

    def next_batch(self) -> dict[str, torch.Tensor]:
        bodies, _ = self.windows.next_batch()
        input_ids = self.wrap(bodies)
        inputs, labels = mask_tokens(input_ids, generator=self.generator, **self.masking)
        return {"input_ids": inputs, "attention_mask": torch.ones_like(inputs), "targets": labels}

    @staticmethod
    def n_targets(batch: dict) -> int:
        return int((batch["targets"] != -100).sum())

    @staticmethod
    def n_tokens(batch: dict) -> int:
        """Real tokens the model reads in this batch, for throughput."""
        return int(batch["attention_mask"].sum())

    def loss(self, model, batch: dict) -> LossParts:
        """Summed cross-entropy over the chosen tokens; ``masked_accuracy`` is the share predicted exactly."""
        output = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        targets = batch["targets"]
        chosen = targets != -100
        correct = (output.logits.argmax(dim=-1) == targets) & chosen
        accuracy = float(correct.sum()) / max(int(chosen.sum()), 1)
        return LossParts(nats=summed_cross_entropy(output.logits, targets), metrics={"masked_accuracy": accuracy})

    def eval_batches(self, batch_size: int, n_windows: int | None = None) -> Iterator[dict]:
        """Held-out batches with the fixed masking: every segment, or ``n_windows`` evenly spaced ones."""
        total = len(self.val_inputs)
        if n_windows is None or n_windows >= total:
            chosen = torch.arange(total)
        else:
            chosen = torch.linspace(0, total - 1, n_windows).round().long().unique()
        for start in range(0, len(chosen), batch_size):
            index = chosen[start : start + batch_size]
            yield {
                "input_ids": self.val_inputs[index],
                "attention_mask": self.val_attention_mask[index],
                "targets": self.val_labels[index],
            }

    def get_state(self) -> torch.Tensor:
        """Return the window generator's state followed by the masking generator's state, as one byte tensor."""
        return torch.cat([self.windows.get_state(), self.generator.get_state()])

    def set_state(self, state: torch.Tensor) -> None:
        split = len(self.windows.get_state())
        self.windows.set_state(state[:split].clone())
        self.generator.set_state(state[split:].clone())


@torch.no_grad()
def held_out_masked_accuracy(model, objective: MaskedLMObjective, batch_size: int, device) -> float:
    """Share of the held-out chosen tokens that ``model`` predicts exactly, under the fixed masking, in eval mode."""
    was_training = model.training
    model.eval()
    correct, total = 0, 0
    try:
        for batch in objective.eval_batches(batch_size):
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            chosen = batch["targets"] != -100
            correct += int(((logits.argmax(dim=-1) == batch["targets"]) & chosen).sum())
            total += int(chosen.sum())
    finally:
        model.train(was_training)
    return correct / max(total, 1)


OBJECTIVES = {"causal_lm": CausalLMObjective, "masked_lm": MaskedLMObjective}


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
