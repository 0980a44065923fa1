"""Decoding for encoder-decoder models (T5, the 2017 Transformer): greedy search, sampling and beam search.

The source is encoded once. The decoder starts from ``decoder_start_token_id`` and feeds one new
token per step, reading earlier target keys and values from the self-attention cache and the
encoder's keys and values from the cross-attention cache, which the first step fills. A model
works here when it has ``config`` (with ``vocab_size``, ``pad_token_id``, ``eos_token_id``,
``decoder_start_token_id``, ``n_decoder_layers``, ``n_heads``, ``d_head``), ``check_ids``,
``encode(input_ids, attention_mask)`` and ``decode(decoder_input_ids, encoder_hidden_states,
attention_mask, cache=...)``.

Sampling draws each token from softmax(logits / temperature), optionally restricted to the top-k
tokens and to the nucleus of mass top_p (Holtzman et al. 2020), as ``minformer.generation`` does.

Beam search scores a finished hypothesis by its length-normalised log-probability:

    score = sum of log p(y_t | y_<t, x) over the generated tokens / (generated length) ** alpha

where the generated length counts the tokens after the start token, EOS included, and never the
source. alpha = 0 ranks by total log-probability; alpha > 0 favours longer hypotheses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minformer.cache import EncoderDecoderCache
from minformer.generation import check_sampling_options, choose_next_token

# Position schemes with a table of max_seq_len rows, which bound the target length.
ABSOLUTE_POSITIONS = ("sinusoidal", "learned")


def check_encoder_decoder(model) -> None:
    """Raise a ``ValueError`` naming the model's family unless it is an encoder-decoder that this module can decode."""
    if not all(hasattr(model, method) for method in ("encode", "decode", "check_ids")):
        family = getattr(getattr(model, "config", None), "family", type(model).__name__)
        raise ValueError(
            f"{family} is not an encoder-decoder model; source-to-target decoding needs a t5 or transformer model."
        )


def check_source(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Return the source mask (all ones when not given), raising ``ValueError`` for an empty source or a decoder-only model."""
    check_encoder_decoder(model)
    model.check_ids("input_ids", input_ids, allow_empty=True)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(input_ids.shape)}.")
    if input_ids.size(1) == 0 or not bool(attention_mask.bool().any(dim=1).all()):
        raise ValueError("The source is empty: every row of input_ids needs at least one real (unmasked) token.")
    return attention_mask


def check_max_new_tokens(model, max_new_tokens: int) -> None:
    """Raise a ``ValueError`` unless ``max_new_tokens`` is a positive integer the decoder's positions can reach.

    The decoder reads the start token and every new token but the last, so a model with absolute
    positions decodes at most ``max_seq_len`` new tokens. T5's relative positions set no such limit.
    """
    check_encoder_decoder(model)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid; expected an integer of at least 1.")
    config = model.config
    if getattr(config, "position", None) in ABSOLUTE_POSITIONS and max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} exceeds the decoder's max_seq_len={config.max_seq_len}; "
            f"decode at most {config.max_seq_len} tokens."
        )


@torch.no_grad()
def generate_seq2seq(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    stop_at_eos: bool = True,
    use_cache: bool = True,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode greedily (``temperature`` 0) or by sampling; returns (batch, 1 + generated) token ids that
    start with the decoder start token.

    A row that emits ``eos_token_id`` is finished and is padded with ``pad_token_id`` from then
    on. Decoding stops when every row is finished or after ``max_new_tokens`` tokens. With
    ``stop_at_eos=False`` every row gets exactly ``max_new_tokens`` tokens. ``use_cache=False``
    reruns the decoder over the whole target at each step (for checking the cache). Sampling
    draws from ``generator``, so a seeded generator gives the same tokens with and without the cache.
    """
    check_max_new_tokens(model, max_new_tokens)
    check_sampling_options(temperature, top_k, top_p)
    attention_mask = check_source(model, input_ids, attention_mask)
    config = model.config
    batch = input_ids.size(0)

    encoder_hidden = model.encode(input_ids, attention_mask)  # (batch, source_len, d_model)
    cache = EncoderDecoderCache.for_model(model, batch, input_ids.size(1), max_new_tokens) if use_cache else None
    tokens = torch.full((batch, 1), config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)

    for _ in range(max_new_tokens):
        step_input = tokens[:, -1:] if use_cache else tokens
        logits = model.decode(step_input, encoder_hidden, attention_mask, cache=cache)[:, -1].float()  # (batch, vocab)
        next_token = choose_next_token(logits, temperature, top_k, top_p, generator)
        next_token = next_token.masked_fill(finished, config.pad_token_id)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)

        if stop_at_eos:
            finished = finished | (next_token == config.eos_token_id)
            if bool(finished.all()):
                break
    return tokens


@dataclass
class BeamSearchOutput:
    """Best hypothesis per source: ``sequences`` (batch, 1 + longest) starting with the decoder
    start token and padded with ``pad_token_id``, and their length-normalised ``scores`` (batch,)."""

    sequences: torch.Tensor
    scores: torch.Tensor


def hypothesis_score(sum_log_prob: float, generated_len: int, length_penalty: float) -> float:
    """Return sum_log_prob / generated_len ** length_penalty (see the module docstring)."""
    return sum_log_prob / generated_len**length_penalty


@torch.no_grad()
def beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    num_beams: int = 4,
    max_new_tokens: int = 20,
    length_penalty: float = 1.0,
    use_cache: bool = True,
) -> BeamSearchOutput:
    """Find, per source row, the hypothesis of highest length-normalised score by beam search.

    At each step the ``num_beams`` best extensions of the live beams are kept; those that end in
    EOS are finished and leave the beam. At the last step every extension is a finished
    hypothesis of ``max_new_tokens`` tokens. The search runs until no beam is live or the length
    limit is reached, with no early stop. ``use_cache=False`` reruns the decoder over each whole
    hypothesis at each step (for checking the cache).
    """
    check_max_new_tokens(model, max_new_tokens)
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams={num_beams!r} is invalid; expected an integer of at least 1.")
    if num_beams > model.config.vocab_size:
        raise ValueError(
            f"num_beams={num_beams} exceeds vocab_size={model.config.vocab_size}; one step cannot fill that many beams."
        )
    attention_mask = check_source(model, input_ids, attention_mask)

    results = [
        search_one_source(
            model, input_ids[row : row + 1], attention_mask[row : row + 1], num_beams, max_new_tokens, length_penalty, use_cache
        )
        for row in range(input_ids.size(0))
    ]
    longest = max(len(tokens) for tokens, _ in results)
    sequences = torch.full((len(results), longest), model.config.pad_token_id, dtype=torch.long, device=input_ids.device)
    for row, (tokens, _) in enumerate(results):
        sequences[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    scores = torch.tensor([score for _, score in results], dtype=torch.float32)
    return BeamSearchOutput(sequences=sequences, scores=scores)


def search_one_source(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float,
    use_cache: bool = True,
) -> tuple[list[int], float]:
    """Run beam search for one source (1, source_len); returns the best token list (start token first) and its score."""
    config = model.config
    device = input_ids.device
    encoder_hidden = model.encode(input_ids, attention_mask).expand(num_beams, -1, -1)  # (beams, source_len, d_model)
    source_mask = attention_mask.expand(num_beams, -1)
    cache = EncoderDecoderCache.for_model(model, num_beams, input_ids.size(1), max_new_tokens) if use_cache else None

    # Beam rows without a live hypothesis carry -inf, so that none of their extensions is chosen.
    beam_tokens = [[config.decoder_start_token_id] for _ in range(num_beams)]
    beam_log_probs = torch.full((num_beams,), float("-inf"), device=device)
    beam_log_probs[0] = 0.0
    finished: list[tuple[float, list[int]]] = []

    for step in range(max_new_tokens):
        if use_cache:
            step_input = torch.tensor([[tokens[-1]] for tokens in beam_tokens], device=device)  # (beams, 1)
        else:
            step_input = torch.tensor(beam_tokens, device=device)  # (beams, step + 1)
        logits = model.decode(step_input, encoder_hidden, source_mask, cache=cache)[:, -1]  # (beams, vocab)
        candidate_log_probs = beam_log_probs[:, None] + torch.log_softmax(logits.float(), dim=-1)  # (beams, vocab)
        generated_len = step + 1
        is_last_step = step == max_new_tokens - 1

        flat = candidate_log_probs.flatten()
        n_kept = flat.numel() if is_last_step else num_beams
        top_log_probs, top_indices = flat.topk(n_kept)
        live_beams, live_tokens, live_log_probs = [], [], []
        for log_prob, index in zip(top_log_probs.tolist(), top_indices.tolist()):
            if log_prob == float("-inf"):
                break
            beam, token = divmod(index, config.vocab_size)
            tokens = beam_tokens[beam] + [token]
            if token == config.eos_token_id or is_last_step:
                finished.append((hypothesis_score(log_prob, generated_len, length_penalty), tokens))
            else:
                live_beams.append(beam)
                live_tokens.append(tokens)
                live_log_probs.append(log_prob)
        if not live_beams:
            break

        n_empty = num_beams - len(live_beams)
        beam_indices = torch.tensor(live_beams + [live_beams[0]] * n_empty, device=device)
        if cache is not None:
            cache.reorder(beam_indices)
        beam_tokens = live_tokens + [list(live_tokens[0]) for _ in range(n_empty)]
        beam_log_probs = torch.tensor(live_log_probs + [float("-inf")] * n_empty, device=device)

    best_score, best_tokens = max(finished, key=lambda item: item[0])
    return best_tokens, best_score
