"""Source-target pairs for sequence-to-sequence training: where they come from, and how they become padded batches.

A pair is two strings. ``folio`` pairs are the aligned First Folio and modern lines written by
``minformer prepare folio``. ``copy`` and ``reverse`` pairs are synthetic tasks made from the
lines of any prepared corpus (each line paired with itself, or with its characters reversed),
which check that a model and its training loop can learn at all.
"""

from __future__ import annotations

import torch

PAIR_SOURCES = ("folio", "copy", "reverse")


def corpus_line_pairs(corpus, split: str, kind: str) -> list[tuple[str, str]]:
    """Return the synthetic ``copy`` or ``reverse`` pairs of the non-blank lines of one split of ``corpus``."""
    lines = [line.strip() for line in corpus.text(split).splitlines()]
    lines = [line for line in lines if line]
    if kind == "copy":
        return [(line, line) for line in lines]
    if kind == "reverse":
        return [(line, line[::-1]) for line in lines]
    raise ValueError(f"kind={kind!r} is invalid; allowed values: 'copy', 'reverse'.")


def load_pair_split(source: str, split: str, corpus) -> list[tuple[str, str]]:
    """Return the (source, target) string pairs of ``split`` ('train' or 'val') from the pair source named ``source``."""
    if source not in PAIR_SOURCES:
        raise ValueError(f"objective.pairs={source!r} is invalid; allowed values: {', '.join(map(repr, PAIR_SOURCES))}.")
    if source != "folio":
        return corpus_line_pairs(corpus, split, source)
    try:
        from minformer.data.folio import load_pairs
    except ModuleNotFoundError as error:
        if error.name != "minformer.data.folio":
            raise
        raise ValueError(
            "objective.pairs='folio' needs the Folio-to-modern pairs, which this minformer cannot build; "
            "use objective.pairs=copy or reverse."
        ) from None
    return list(load_pairs(split))


def encode_pairs(pairs, encode, eos_id: int, max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Encode string pairs into (source ids + EOS, target ids + EOS); returns the pairs that fit and the number dropped.

    A pair is dropped when either side, with its EOS, is longer than ``max_len`` tokens, because
    a model with absolute positions cannot read it and truncation would teach wrong endings.
    """
    kept, dropped = [], 0
    for source, target in pairs:
        source_ids = list(encode(source)) + [eos_id]
        target_ids = list(encode(target)) + [eos_id]
        if len(source_ids) > max_len or len(target_ids) > max_len:
            dropped += 1
            continue
        kept.append((source_ids, target_ids))
    return kept, dropped


def pad_pair_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int, decoder_start_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded pairs into one batch for teacher forcing.

    Returns ``input_ids`` and ``attention_mask`` (batch, longest source), ``targets`` (batch,
    longest target) with -100 at padding, and ``decoder_input_ids`` (batch, longest target): the
    start token, then the targets shifted right by one, padded with ``pad_id``.
    """
    source_len = max(len(source) for source, _ in pairs)
    target_len = max(len(target) for _, target in pairs)
    batch = len(pairs)
    input_ids = torch.full((batch, source_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, source_len), dtype=torch.long)
    targets = torch.full((batch, target_len), -100, dtype=torch.long)
    decoder_input_ids = torch.full((batch, target_len), pad_id, dtype=torch.long)
    for row, (source, target) in enumerate(pairs):
        input_ids[row, : len(source)] = torch.tensor(source)
        attention_mask[row, : len(source)] = 1
        targets[row, : len(target)] = torch.tensor(target)
        decoder_input_ids[row, 0] = decoder_start_id
        decoder_input_ids[row, 1 : len(target)] = torch.tensor(target[:-1])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids, "targets": targets}
