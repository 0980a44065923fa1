"""Translation with an encoder-decoder run, and the scores of translations: character error rate, BLEU and chrF.

``translate`` turns source lines into target lines with a T5 or 2017 Transformer model and its
``Seq2SeqCharTokenizer``, greedily or by beam search, with the KV cache of
``minformer.generation_seq2seq``. ``score`` compares translations with references: the corpus
character error rate (our Levenshtein distance) and sacrebleu's corpus BLEU and chrF.
"""

from __future__ import annotations

from typing import Sequence

import torch

from minformer.generation_seq2seq import beam_search, check_encoder_decoder, check_max_new_tokens, generate_seq2seq

# Limitation: a translation more than this many tokens longer than its source is cut off. In the
# prepared Folio pairs the modern side is at most 15 characters longer than the Folio side.
EXTRA_TARGET_TOKENS = 32


# ---- scores -------------------------------------------------------------------------------------


def edit_distance(hypothesis: str, reference: str) -> int:
    """Return the Levenshtein distance: the fewest insertions, deletions and substitutions of one
    character that turn ``hypothesis`` into ``reference``.

    Dynamic programming over prefixes, one row at a time: D[i][j] = min(D[i-1][j] + 1,
    D[i][j-1] + 1, D[i-1][j-1] + [h_i != r_j]), with D[i][0] = i and D[0][j] = j.
    """
    previous = list(range(len(reference) + 1))
    for i, hypothesis_char in enumerate(hypothesis, start=1):
        current = [i]
        for j, reference_char in enumerate(reference, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (hypothesis_char != reference_char)))
        previous = current
    return previous[-1]


def character_error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Return the corpus character error rate: summed edit distances over summed reference lengths."""
    if len(hypotheses) != len(references):
        raise ValueError(f"Got {len(hypotheses)} hypotheses for {len(references)} references; give one per reference.")
    reference_chars = sum(len(reference) for reference in references)
    if reference_chars == 0:
        raise ValueError("The references are empty, so the character error rate is undefined.")
    errors = sum(edit_distance(hypothesis, reference) for hypothesis, reference in zip(hypotheses, references))
    return errors / reference_chars


def score(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Return the corpus CER, BLEU and chrF of ``hypotheses`` (one reference each); BLEU and chrF from sacrebleu."""
    import sacrebleu

    return {
        "cer": character_error_rate(hypotheses, references),
        "bleu": sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score,
        "chrf": sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score,
    }


# ---- translation ---------------------------------------------------------------------------------


def normalise_source(text: str) -> str:
    """Make every run of whitespace one space and strip the ends, as the prepared pairs are."""
    return " ".join(text.split())


def encode_source(model, tokenizer, text: str) -> list[int]:
    """Encode one source line with EOS, raising a ``ValueError`` for an empty line, a character
    outside the tokenizer's alphabet, or more tokens than the model's ``max_seq_len``."""
    if not text:
        raise ValueError("The source text is empty; give at least one character to translate.")
    try:
        ids = tokenizer.encode(text) + [tokenizer.eos_id]
    except ValueError:
        unknown = sorted({char for char in text if not tokenizer_knows(tokenizer, char)})
        raise ValueError(
            f"The source contains {', '.join(map(repr, unknown))}, which the run's tokenizer does not have; "
            "remove or replace those characters."
        ) from None
    limit = model.config.max_seq_len
    if len(ids) > limit:
        # Training dropped longer pairs, so neither family has learned to read them.
        raise ValueError(
            f"The source has {len(text)} characters, but this model accepts at most {limit - 1} "
            f"(model.max_seq_len={limit} tokens, EOS included); split it into shorter lines."
        )
    return ids


def tokenizer_knows(tokenizer, char: str) -> bool:
    try:
        tokenizer.encode(char)
    except ValueError:
        return False
    return True


def default_max_new_tokens(model, source_len: int) -> int:
    """Return the decoding length limit for a source of ``source_len`` tokens: EXTRA_TARGET_TOKENS more, at most max_seq_len."""
    return min(model.config.max_seq_len, source_len + EXTRA_TARGET_TOKENS)


def decoded_text(tokenizer, ids: list[int]) -> str:
    """Return the text of generated ids: the start token dropped, cut at the first EOS, special tokens removed."""
    ids = ids[1:]
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def translate_greedy(model, tokenizer, encoded: list[list[int]], batch_size: int = 64,
                     max_new_tokens: int | None = None) -> list[str]:
    """Decode encoded sources greedily in padded batches of similar length; returns one text per source."""
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda index: len(encoded[index]))
    texts: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        longest = max(len(encoded[row]) for row in rows)
        input_ids = torch.full((len(rows), longest), tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for position, row in enumerate(rows):
            input_ids[position, : len(encoded[row])] = torch.tensor(encoded[row])
            attention_mask[position, : len(encoded[row])] = 1
        limit = max_new_tokens or default_max_new_tokens(model, longest)
        tokens = generate_seq2seq(model, input_ids.to(device), attention_mask.to(device), max_new_tokens=limit)
        for position, row in enumerate(rows):
            texts[row] = decoded_text(tokenizer, tokens[position].tolist())
    return texts


def translate_beam(model, tokenizer, encoded: list[list[int]], num_beams: int, length_penalty: float,
                   max_new_tokens: int | None = None) -> list[str]:
    """Decode each encoded source by beam search (one source at a time, with the KV cache); returns one text per source."""
    device = next(model.parameters()).device
    texts = []
    for ids in encoded:
        limit = max_new_tokens or default_max_new_tokens(model, len(ids))
        output = beam_search(model, torch.tensor([ids], device=device), num_beams=num_beams, max_new_tokens=limit,
                             length_penalty=length_penalty)
        texts.append(decoded_text(tokenizer, output.sequences[0].tolist()))
    return texts


def translate(model, tokenizer, sources: Sequence[str], num_beams: int = 1, length_penalty: float = 1.0,
              max_new_tokens: int | None = None) -> list[str]:
    """Translate source lines with an encoder-decoder model: greedy when ``num_beams`` is 1, else beam search.

    Each source is normalised (whitespace runs become one space) and checked by ``encode_source``.
    ``max_new_tokens`` None uses ``default_max_new_tokens`` per source (per batch when greedy).
    """
    check_encoder_decoder(model)
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams={num_beams!r} is invalid; expected an integer of at least 1.")
    if num_beams > model.config.vocab_size:
        raise ValueError(
            f"num_beams={num_beams} exceeds the model's vocabulary of {model.config.vocab_size} tokens; "
            f"use at most {model.config.vocab_size} beams."
        )
    if max_new_tokens is not None:
        check_max_new_tokens(model, max_new_tokens)
    encoded = [encode_source(model, tokenizer, normalise_source(text)) for text in sources]
    model.eval()
    if num_beams == 1:
        return translate_greedy(model, tokenizer, encoded, max_new_tokens=max_new_tokens)
    return translate_beam(model, tokenizer, encoded, num_beams, length_penalty, max_new_tokens)
