"""Autoregressive decoding: greedy, temperature, top-k and nucleus (top-p) sampling.

Each step feeds the last ``max_seq_len`` tokens to the model, takes the logits of the last
position and picks the next token. Nucleus sampling (Holtzman et al. 2020, eq. 3) keeps the
smallest set of most probable tokens whose total probability reaches ``top_p``: the token that
crosses the threshold is kept, so the set is never empty.
"""

from __future__ import annotations

from typing import Callable

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass ``top_p``; logits (batch, vocab)."""
    if top_k is not None and top_k > 0 and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Remove a token when the mass before it already reaches top_p; the crossing token stays.
        mass_before = cumulative - torch.softmax(sorted_logits, dim=-1)
        remove_sorted = mass_before >= top_p
        remove_sorted[:, 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_indices, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def check_sampling_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise a ``ValueError`` for sampling options outside their ranges."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is invalid; use 0 for greedy decoding or a positive value.")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} is invalid; it must be positive (or 0/None to disable).")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} is invalid; it must be in (0, 1].")


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Extend ``input_ids`` (batch, prompt_len) by ``max_new_tokens`` tokens; temperature 0 is greedy.

    Once the sequence is longer than the model's ``max_seq_len``, the model sees only the last
    ``max_seq_len`` tokens. ``on_token`` receives each new (batch,) column as it is chosen.
    """
    check_sampling_options(temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    max_seq_len = model.config.max_seq_len
    tokens = input_ids
    try:
        for _ in range(max_new_tokens):
            window = tokens[:, -max_seq_len:]
            logits = model(window).logits[:, -1, :].float()  # (batch, vocab)
            if temperature == 0:
                next_token = logits.argmax(dim=-1)
            else:
                logits = filter_logits(logits / temperature, top_k, top_p)
                probabilities = torch.softmax(logits, dim=-1)
                next_token = torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if on_token is not None:
                on_token(next_token)
    finally:
        model.train(was_training)
    return tokens
