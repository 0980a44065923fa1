"""Training objectives: each draws batches, sums its loss over target tokens, and evaluates held-out data.

The trainer uses only this interface, so a new objective (masked LM, span corruption,
sequence-to-sequence pairs) is a new class here plus an entry in ``OBJECTIVES``. An objective
that needs special tokens also has a ``build_tokenizer(config, corpus)`` class method, which the
trainer calls in place of its own choice of tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from minformer.data.datasets import RandomWindows, evaluation_windows
from minformer.data.pairs import encode_pairs, load_pair_split, pad_pair_batch
from minformer.data.span_corruption import corrupt_spans, random_spans_noise_mask, raw_length_for_inputs
from minformer.data.tokenizers import Seq2SeqCharTokenizer
from minformer.moe import moe_metrics

logger = logging.getLogger(__name__)


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


def label_smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Cross-entropy against the smoothed labels (1 - epsilon) * one_hot + epsilon / vocab, summed over targets
    other than -100, in fp32 (Szegedy et al. 2016, sec. 7).

    Per target y this is (1 - epsilon) * (-log p_y) + epsilon * mean over the vocabulary of (-log p_k).
    """
    log_probs = torch.log_softmax(logits.float().reshape(-1, logits.size(-1)), dim=-1)  # (n, vocab)
    targets = targets.reshape(-1)
    scored = targets != -100
    true_class_nll = -log_probs.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)  # (n,)
    uniform_nll = -log_probs.mean(dim=-1)  # (n,)
    per_target = (1.0 - epsilon) * true_class_nll + epsilon * uniform_nll
    return per_target[scored].sum()


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


def check_seq2seq_tokenizer(config, tokenizer) -> None:
    """Raise a ``ValueError`` unless ``tokenizer`` has the padding, EOS and sentinel ids that ``config.model`` uses."""
    if not isinstance(tokenizer, Seq2SeqCharTokenizer):
        raise ValueError(
            f"objective.kind={config.objective.kind} needs a tokenizer with <pad>, </s> and sentinel tokens, "
            f"got {type(tokenizer).__name__}; set tokenizer.kind=char."
        )
    for field, token_id in (("pad_token_id", tokenizer.pad_id), ("eos_token_id", tokenizer.eos_id)):
        if getattr(config.model, field) != token_id:
            raise ValueError(f"model.{field}={getattr(config.model, field)} does not match the tokenizer's id {token_id}.")


def build_seq2seq_tokenizer(config, text: str) -> Seq2SeqCharTokenizer:
    """Build the character tokenizer with special tokens that span corruption and seq2seq train with."""
    if config.tokenizer.kind != "char":
        raise ValueError(
            f"objective.kind={config.objective.kind} supports tokenizer.kind=char only (a character tokenizer with "
            f"<pad>, </s> and sentinel tokens), got tokenizer.kind={config.tokenizer.kind!r}."
        )
    return Seq2SeqCharTokenizer(text)


class EncoderDecoderObjective:
    """Teacher-forced training of an encoder-decoder on padded (source, target) rows; the subclass makes the rows.

    Training applies label smoothing when ``label_smoothing`` > 0; evaluation (the model in eval
    mode) always sums the plain cross-entropy, so the held-out loss is the negative log-likelihood.
    """

    def __init__(self, batch_size: int, seed: int, pad_id: int, decoder_start_id: int, label_smoothing: float):
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.decoder_start_id = decoder_start_id
        self.label_smoothing = label_smoothing
        self.generator = torch.Generator().manual_seed(seed)
        self.val_rows: list[tuple[list[int], list[int]]] = []

    def pad(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        return pad_pair_batch(rows, self.pad_id, self.decoder_start_id)

    @staticmethod
    def n_targets(batch: dict) -> int:
        return int((batch["targets"] != -100).sum())

    @staticmethod
    def n_tokens(batch: dict) -> int:
        """Real source and target tokens the model reads in this batch, for throughput."""
        return int(batch["attention_mask"].sum()) + int((batch["targets"] != -100).sum())

    def loss(self, model, batch: dict) -> LossParts:
        output = model(batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"])
        if self.label_smoothing > 0 and model.training:
            return LossParts(nats=label_smoothed_cross_entropy(output.logits, batch["targets"], self.label_smoothing))
        return LossParts(nats=summed_cross_entropy(output.logits, batch["targets"]))

    def eval_batches(self, batch_size: int, n_windows: int | None = None) -> Iterator[dict]:
        """Held-out batches: every held-out row, or ``n_windows`` evenly spaced ones (the same every time)."""
        total = len(self.val_rows)
        if n_windows is None or n_windows >= total:
            chosen = list(range(total))
        else:
            chosen = torch.linspace(0, total - 1, n_windows).round().long().unique().tolist()
        for start in range(0, len(chosen), batch_size):
            yield self.pad([self.val_rows[index] for index in chosen[start : start + batch_size]])


class SpanCorruptionObjective(EncoderDecoderObjective):
    """T5's span corruption (Raffel et al. 2020, sec. 3.1.4) on random windows of the training stream.

    Each window has the raw length whose corrupted input, EOS included, is ``input_length``
    tokens, so training rows need no padding. Noise masks are drawn afresh for every batch.
    Held-out rows are consecutive windows of the held-out stream, corrupted once with a fixed
    seed, so every held-out token is in exactly one row and the held-out loss is the same every time.
    """

    EVAL_NOISE_SEED = 20200728

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, input_length: int, batch_size: int, seed: int,
                 noise_density: float, mean_noise_span_length: float, sentinel_ids: list[int], eos_id: int,
                 pad_id: int, decoder_start_id: int, label_smoothing: float = 0.0):
        super().__init__(batch_size, seed, pad_id, decoder_start_id, label_smoothing)
        self.noise = dict(noise_density=noise_density, mean_noise_span_length=mean_noise_span_length)
        self.sentinel_ids, self.eos_id = list(sentinel_ids), eos_id
        self.raw_length = raw_length_for_inputs(input_length, noise_density, mean_noise_span_length)
        if len(train_tokens) < self.raw_length:
            raise ValueError(
                f"The training split has {len(train_tokens)} tokens, fewer than one window of {self.raw_length}; "
                "use more text or a smaller model.max_seq_len."
            )
        if len(val_tokens) == 0:
            raise ValueError("The validation split is empty; prepare a corpus with held-out text.")
        self.train_tokens = torch.from_numpy(np.asarray(train_tokens, dtype=np.int64))
        self.n_val_tokens = len(val_tokens)
        self.noise_generator = torch.Generator().manual_seed(seed + 1)

        val_stream = torch.from_numpy(np.asarray(val_tokens, dtype=np.int64))
        eval_generator = torch.Generator().manual_seed(self.EVAL_NOISE_SEED)
        self.val_rows = [
            self.corrupt(val_stream[start : start + self.raw_length], eval_generator)
            for start in range(0, len(val_stream), self.raw_length)
        ]

    @classmethod
    def build_tokenizer(cls, config, corpus) -> Seq2SeqCharTokenizer:
        """Build a character tokenizer over every character of the corpus, with <pad>, </s> and sentinels."""
        return build_seq2seq_tokenizer(config, corpus.characters())

    @classmethod
    def from_run(cls, config, tokenizer, corpus) -> "SpanCorruptionObjective":
        """Encode the corpus's splits and corrupt windows whose inputs are ``model.max_seq_len`` tokens."""
        check_seq2seq_tokenizer(config, tokenizer)
        return cls(
            tokenizer.encode_array(corpus.text("train")), tokenizer.encode_array(corpus.text("val")),
            config.model.max_seq_len, config.train.batch_size, config.train.seed,
            config.objective.noise_density, config.objective.mean_noise_span_length, tokenizer.sentinel_ids,
            tokenizer.eos_id, tokenizer.pad_id, config.model.decoder_start_token_id, config.objective.label_smoothing,
        )

    def corrupt(self, tokens: torch.Tensor, generator: torch.Generator) -> tuple[list[int], list[int]]:
        """Draw a noise mask for the 1-D ``tokens`` and return its (inputs, targets) id lists."""
        noise_mask = random_spans_noise_mask(len(tokens), generator=generator, **self.noise)
        inputs, targets = corrupt_spans(tokens, noise_mask, self.sentinel_ids, self.eos_id)
        return inputs.tolist(), targets.tolist()

    def describe(self) -> str:
        """Return one line on the data, for the progress display."""
        return (f"{len(self.train_tokens):,} training tokens, {self.n_val_tokens:,} held out, windows of "
                f"{self.raw_length} tokens with {self.noise['noise_density']:.0%} in spans of mean length "
                f"{self.noise['mean_noise_span_length']:g}")

    def next_batch(self) -> dict[str, torch.Tensor]:
        n_starts = len(self.train_tokens) - self.raw_length + 1
        starts = torch.randint(0, n_starts, (self.batch_size,), generator=self.generator).tolist()
        rows = [self.corrupt(self.train_tokens[start : start + self.raw_length], self.noise_generator) for start in starts]
        return self.pad(rows)

    def get_state(self) -> torch.Tensor:
        """Return the window generator's state followed by the noise generator's state, as one byte tensor."""
        return torch.cat([self.generator.get_state(), self.noise_generator.get_state()])

    def set_state(self, state: torch.Tensor) -> None:
        split = len(self.generator.get_state())
        self.generator.set_state(state[:split].clone())
        self.noise_generator.set_state(state[split:].clone())


class Seq2SeqObjective(EncoderDecoderObjective):
    """Teacher forcing on (source, target) pairs: the decoder reads the start token and the target shifted right.

    Each side ends with EOS. Training batches are pairs drawn uniformly with replacement from a
    seeded generator; held-out batches are every held-out pair in order. A pair with a side
    longer than ``max_len`` tokens (EOS included) is dropped from either split.
    """

    def __init__(self, train_pairs: list[tuple[list[int], list[int]]], val_pairs: list[tuple[list[int], list[int]]],
                 batch_size: int, seed: int, pad_id: int, decoder_start_id: int, label_smoothing: float = 0.0,
                 n_dropped: int = 0):
        super().__init__(batch_size, seed, pad_id, decoder_start_id, label_smoothing)
        if not train_pairs:
            raise ValueError("seq2seq has no training pairs that fit in model.max_seq_len tokens.")
        if not val_pairs:
            raise ValueError("seq2seq has no held-out pairs that fit in model.max_seq_len tokens.")
        self.train_rows = train_pairs
        self.val_rows = val_pairs
        self.n_dropped = n_dropped

    @classmethod
    def from_pairs(cls, train_pairs, val_pairs, tokenizer, max_len: int, batch_size: int, seed: int,
                   decoder_start_id: int, label_smoothing: float = 0.0) -> "Seq2SeqObjective":
        """Encode (source, target) string pairs with ``tokenizer`` (which has ``pad_id`` and ``eos_id``)."""
        train_rows, train_dropped = encode_pairs(train_pairs, tokenizer.encode, tokenizer.eos_id, max_len)
        val_rows, val_dropped = encode_pairs(val_pairs, tokenizer.encode, tokenizer.eos_id, max_len)
        if train_dropped or val_dropped:
            logger.warning("seq2seq: dropped %d training and %d held-out pairs longer than %d tokens",
                           train_dropped, val_dropped, max_len)
        return cls(train_rows, val_rows, batch_size, seed, tokenizer.pad_id, decoder_start_id, label_smoothing,
                   train_dropped + val_dropped)

    @classmethod
    def build_tokenizer(cls, config, corpus) -> Seq2SeqCharTokenizer:
        """Build a character tokenizer over every character of the corpus and of both splits' pairs."""
        characters = set(corpus.characters())
        for split in ("train", "val"):
            for source, target in load_pair_split(config.objective.pairs, split, corpus):
                characters.update(source)
                characters.update(target)
        return build_seq2seq_tokenizer(config, "".join(sorted(characters)))

    @classmethod
    def from_run(cls, config, tokenizer, corpus) -> "Seq2SeqObjective":
        """Load the pairs named by ``objective.pairs`` and encode them with the run's tokenizer."""
        check_seq2seq_tokenizer(config, tokenizer)
        return cls.from_pairs(
            load_pair_split(config.objective.pairs, "train", corpus), load_pair_split(config.objective.pairs, "val", corpus),
            tokenizer, config.model.max_seq_len, config.train.batch_size, config.train.seed,
            config.model.decoder_start_token_id, config.objective.label_smoothing,
        )

    def describe(self) -> str:
        """Return one line on the data, for the progress display."""
        dropped = f" ({self.n_dropped:,} longer than max_seq_len dropped)" if self.n_dropped else ""
        return f"{len(self.train_rows):,} training pairs, {len(self.val_rows):,} held out{dropped}"

    def next_batch(self) -> dict[str, torch.Tensor]:
        indices = torch.randint(0, len(self.train_rows), (self.batch_size,), generator=self.generator).tolist()
        return self.pad([self.train_rows[index] for index in indices])

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


OBJECTIVES = {
    "causal_lm": CausalLMObjective,
    "masked_lm": MaskedLMObjective,
    "span_corruption": SpanCorruptionObjective,
    "seq2seq": Seq2SeqObjective,
}


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
