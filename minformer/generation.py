"""Autoregressive decoding: greedy, temperature, top-k and nucleus (top-p) sampling, with a KV cache.

Each step takes the logits of the last position and picks the next token. With ``use_cache``
the prompt is run once (prefill) and each later step feeds only the new token, reading earlier
keys and values from a ``KVCache``. Without it every step reruns the whole window. Once the
sequence is longer than ``max_seq_len`` the model sees only the last ``max_seq_len`` tokens,
which the cached path handles by refilling the cache from that window.

Batches of prompts of different lengths are LEFT-padded, with ``attention_mask`` marking real
tokens; position ids come from the mask's cumulative sum, so every prompt starts at position 0
and decodes as it would alone.

Logit processing, in order: the repetition penalty of CTRL (Keskar et al. 2019),
temperature, top-k, then nucleus filtering (Holtzman et al. 2020, eq. 3), which keeps the
smallest set of most probable tokens whose total probability reaches ``top_p``: the token that
crosses the threshold is kept, so the set is never empty.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from minformer.cache import KVCache


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


def apply_repetition_penalty(
    logits: torch.Tensor, tokens: torch.Tensor, penalty: float, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Penalise every token already in ``tokens`` (batch, seq): positive logits / penalty, negative * penalty.

    This is the CTRL rule (Keskar et al. 2019) in its sign-aware form, as in Hugging
    Face's ``RepetitionPenaltyLogitsProcessor``, so that a penalty above 1 always lowers the
    token's probability. Positions where ``token_mask`` is 0 (padding) do not count as present.
    """
    counted = torch.ones_like(tokens) if token_mask is None else token_mask.long()
    occurrences = torch.zeros(logits.shape, dtype=torch.long, device=logits.device)  # (batch, vocab)
    occurrences.scatter_add_(-1, tokens, counted)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(occurrences > 0, penalised, logits)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return (batch, seq) position ids that count real tokens from 0; padding gets position 0."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0)


def check_sampling_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise a ``ValueError`` for sampling options outside their ranges."""
    if not temperature >= 0 or temperature == float("inf"):  # `not >=` also catches NaN
        raise ValueError(f"temperature={temperature} is invalid; use 0 for greedy decoding or a positive finite value.")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} is invalid; it must be positive (or 0/None to disable).")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} is invalid; it must be in (0, 1].")


def check_generation_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    repetition_penalty: float,
    stop: Sequence[str] | None,
    decode: Callable | None,
) -> None:
    """Raise a ``ValueError`` for prompts, masks and stopping options ``generate`` cannot use."""
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ValueError(f"input_ids must have shape (batch, prompt_len) with prompt_len >= 1, got {tuple(input_ids.shape)}.")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid; it must be non-negative.")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} is invalid; it must be positive (1.0 disables it).")
    if stop and decode is None:
        raise ValueError("Stop strings need decode=, a function from a list of token ids to text.")
    if attention_mask is None:
        return
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(input_ids.shape)} like input_ids."
        )
    # Left padding means each row is 0 ... 0 1 ... 1: the mask never decreases along the sequence.
    if bool((attention_mask.long().diff(dim=-1) < 0).any()):
        raise ValueError("attention_mask must be left-padded (padding before the prompt) for generation.")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("Every prompt needs at least one real token; a row of attention_mask is all zeros.")


@dataclass
class GenerationOutput:
    """The result of ``generate_sequences``.

    ``tokens`` (batch, prompt_len + steps) contains each prompt and its continuation; after a sequence
    finishes, its row is filled with ``pad_token_id``. ``attention_mask`` marks real tokens (prompt
    and generated, the stopping token included) with 1. ``new_token_counts`` is the number of
    tokens each row generated, and ``finish_reasons`` why it stopped: ``length``, ``eos`` or ``stop``.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    new_token_counts: list[int]
    finish_reasons: list[str]


def takes_logits_to_keep(model) -> bool:
    """Return whether ``model``'s forward accepts ``logits_to_keep`` (minformer's GPT does; a stub may not)."""
    parameters = inspect.signature(model.forward).parameters.values()
    return any(
        parameter.name == "logits_to_keep" or parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters
    )


def next_token_logits(model, tokens, token_mask, kv_cache, n_new: int, pass_mask: bool, last_only: bool) -> torch.Tensor:
    """Run the model on what it has not seen yet and return the (batch, vocab) float32 logits of the last position.

    Without a cache, or when the cache cannot take ``n_new`` more positions within
    ``max_seq_len``, the model reruns the window of the last ``max_seq_len`` tokens (refilling
    the cache from it). Otherwise it runs only the ``n_new`` newest tokens against the cache.
    """
    max_seq_len = model.config.max_seq_len
    if kv_cache is None or kv_cache.length + n_new > min(max_seq_len, kv_cache.max_len):
        if kv_cache is not None:
            kv_cache.reset()
        inputs = tokens[:, -max_seq_len:]
        mask = token_mask[:, -max_seq_len:]
    else:
        inputs = tokens[:, -n_new:]
        mask = token_mask[:, -(kv_cache.length + n_new) :]  # (batch, cached + new)
    position_ids = positions_from_mask(mask)[:, -inputs.size(1) :]
    # Only the last position's logits are used, so a model that can skip the others is asked to.
    options = {"logits_to_keep": 1} if last_only else {}
    output = model(inputs, attention_mask=mask if pass_mask else None, position_ids=position_ids, kv_cache=kv_cache, **options)
    return output.logits[:, -1, :].float()


def choose_next_token(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
    """Pick one token per row from (batch, vocab) logits: argmax when temperature is 0, else sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probabilities = torch.softmax(logits, dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


def ends_with_sequence(generated: list[int], sequences: Sequence[Sequence[int]]) -> bool:
    """Return True when the token list ``generated`` ends with one of ``sequences``."""
    return any(len(sequence) > 0 and generated[-len(sequence) :] == list(sequence) for sequence in sequences)


def find_stop_string(text: str, stop: Sequence[str]) -> int:
    """Return the index where the earliest stop string begins in ``text``, or -1 when none occurs."""
    starts = [text.find(stop_string) for stop_string in stop if stop_string]
    starts = [start for start in starts if start >= 0]
    return min(starts) if starts else -1


COMPILED_ATTRIBUTE = "_compiled_for_generation"


def compiled_for_generation(model: torch.nn.Module) -> torch.nn.Module:
    """Return ``torch.compile(model, dynamic=True)``, built on the first call for this model and reused.

    Shapes are marked dynamic because each decoding step sees one more cached position. The wrapper
    is kept in the model's instance ``__dict__``: assigning it as an attribute would register it as
    a submodule and list every parameter twice in the state dict.
    """
    compiled = vars(model).get(COMPILED_ATTRIBUTE)
    if compiled is None:
        compiled = torch.compile(model, dynamic=True)
        vars(model)[COMPILED_ATTRIBUTE] = compiled
    return compiled


def generate_sequences(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    use_cache: bool = True,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_token_sequences: Sequence[Sequence[int]] | None = None,
    stop: Sequence[str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    compile: bool = False,
) -> GenerationOutput:
    """Extend ``input_ids`` (batch, prompt_len) by up to ``max_new_tokens`` tokens; temperature 0 is greedy.

    - ``attention_mask`` (batch, prompt_len): 1 for real tokens, 0 for LEFT padding.
    - ``use_cache``: decode with a KV cache (default); False reruns the whole window each step.
    - ``repetition_penalty``: CTRL penalty for tokens already in the row (1.0 disables it).
    - A row finishes when it generates one of ``eos_token_id``, when its generated tokens end
      with one of ``stop_token_sequences``, or when ``decode`` of its generated tokens contains
      one of the ``stop`` strings. The stopping tokens stay in ``tokens``; a finished row is then
      filled with ``pad_token_id`` (default: the first eos id, else 0). Decoding ends when every
      row has finished.
    - ``generator`` seeds the sampling; ``on_token`` receives each new (batch,) column.
    - ``compile``: run the model through ``torch.compile`` (built once per model and reused).
    """
    check_sampling_options(temperature, top_k, top_p)
    check_generation_inputs(input_ids, attention_mask, max_new_tokens, repetition_penalty, stop, decode)
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    batch, prompt_len = input_ids.shape
    device = input_ids.device

    tokens = input_ids
    token_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long().to(device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    finish_reasons = ["length"] * batch
    new_token_counts = [0] * batch
    eos_tensor = torch.tensor(eos_ids, dtype=input_ids.dtype, device=device)

    was_training = model.training
    model.eval()
    # The cache needs room for the prompt and every generated token but the last. It never needs
    # more than the model's window, and a shorter cache is less memory to allocate.
    cache_len = min(model.config.max_seq_len, prompt_len + max(max_new_tokens, 1))
    kv_cache = KVCache.for_model(model, batch, max_len=cache_len) if use_cache else None
    forward_model = compiled_for_generation(model) if compile else model
    last_only = takes_logits_to_keep(model)
    n_unseen = prompt_len
    # inference_mode, unlike no_grad, also skips autograd's version counters and view tracking.
    try:
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                logits = next_token_logits(
                    forward_model, tokens, token_mask, kv_cache, n_unseen, attention_mask is not None, last_only
                )
                if repetition_penalty != 1.0:
                    logits = apply_repetition_penalty(logits, tokens, repetition_penalty, token_mask)
                next_token = choose_next_token(logits, temperature, top_k, top_p, generator)
                next_token = next_token.masked_fill(finished, pad_token_id)

                tokens = torch.cat([tokens, next_token[:, None]], dim=1)
                token_mask = torch.cat([token_mask, (~finished).long()[:, None]], dim=1)
                n_unseen = 1
                if on_token is not None:
                    on_token(next_token)

                newly_finished = update_finished(
                    tokens, finished, finish_reasons, new_token_counts, prompt_len, eos_tensor,
                    stop_token_sequences, stop, decode,
                )
                finished = finished | newly_finished
                if bool(finished.all()):
                    break
    finally:
        model.train(was_training)
    # Clones made outside inference mode are ordinary tensors, which callers may use with autograd.
    return GenerationOutput(tokens.clone(), token_mask.clone(), new_token_counts, finish_reasons)


def update_finished(
    tokens, finished, finish_reasons, new_token_counts, prompt_len, eos_tensor, stop_token_sequences, stop, decode
) -> torch.Tensor:
    """Count the token each running row just generated and return the (batch,) mask of rows that finish with it.

    Updates ``finish_reasons`` and ``new_token_counts`` in place.
    """
    last_token = tokens[:, -1]
    newly_finished = torch.zeros_like(finished)
    for row in range(tokens.size(0)):
        if bool(finished[row]):
            continue
        new_token_counts[row] += 1
        if eos_tensor.numel() and bool((eos_tensor == last_token[row]).any()):
            finish_reasons[row] = "eos"
        elif stop_token_sequences and ends_with_sequence(tokens[row, prompt_len:].tolist(), stop_token_sequences):
            finish_reasons[row] = "stop"
        elif stop and find_stop_string(decode(tokens[row, prompt_len:].tolist()), stop) >= 0:
            finish_reasons[row] = "stop"
        else:
            continue
        newly_finished[row] = True
    return newly_finished


def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    **options,
) -> torch.Tensor:
    """Return the (batch, prompt_len + steps) tokens of ``generate_sequences`` with the same arguments.

    Without stopping options every row gets exactly ``max_new_tokens`` new tokens.
    """
    output = generate_sequences(model, input_ids, max_new_tokens, temperature, top_k, top_p, generator, on_token, **options)
    return output.tokens


def generate_text(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    decode: Callable[[list[int]], str],
    stop: Sequence[str] | None = None,
    **options,
) -> list[str]:
    """Generate as ``generate_sequences`` does and return each row's continuation as text.

    The text is ``decode`` of the generated tokens without a final eos token, cut before the
    first stop string it contains, so the stop string itself is stripped.
    """
    output = generate_sequences(model, input_ids, max_new_tokens, stop=stop, decode=decode, **options)
    prompt_len = input_ids.size(1)
    texts = []
    for row, count in enumerate(output.new_token_counts):
        generated = output.tokens[row, prompt_len : prompt_len + count].tolist()
        if output.finish_reasons[row] == "eos":
            generated = generated[:-1]
        text = decode(generated)
        stop_start = find_stop_string(text, stop or [])
        texts.append(text if stop_start < 0 else text[:stop_start])
    return texts
