"""T5's span corruption (Raffel et al. 2020, sec. 3.1.4 and 3.3.4): drop random spans of a token sequence
into the target, leaving one sentinel token in the input where each span was.

    original  Thank you for inviting me to your party last week .
    inputs    Thank you <X0> me to your party <X1> week . </s>
    targets   <X0> for inviting <X1> last </s>

The noise mask follows ``random_spans_noise_mask`` of T5's released preprocessors:
num_noise_tokens = round(length * noise_density), clipped to [1, length - 1];
num_noise_spans = max(1, round(num_noise_tokens / mean_noise_span_length)). The noise tokens
and the other tokens are each cut into num_noise_spans non-empty segments, uniformly at random
among all such cuts. The segments then alternate, starting with a non-noise segment, so that
every sequence begins with kept tokens and ends with a dropped span.
"""

from __future__ import annotations

import torch


def noise_span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """Return (num_noise_tokens, num_noise_spans) for a sequence of ``length`` tokens (length >= 2)."""
    num_noise_tokens = min(max(round(length * noise_density), 1), length - 1)
    num_noise_spans = max(round(num_noise_tokens / mean_noise_span_length), 1)
    # Each noise span needs a non-empty kept segment before it. T5 never meets this case at its
    # densities; with a density near 1 we use fewer spans instead of failing.
    num_noise_spans = min(num_noise_spans, length - num_noise_tokens)
    return num_noise_tokens, num_noise_spans


def random_segmentation(num_items: int, num_segments: int, generator: torch.Generator) -> torch.Tensor:
    """Cut ``num_items`` items into ``num_segments`` non-empty segments, each cut equally likely; returns their lengths.

    A segment starts after each of ``num_segments - 1`` boundaries drawn without replacement from
    the ``num_items - 1`` gaps between items.
    """
    if not 1 <= num_segments <= num_items:
        raise ValueError(f"Cannot cut {num_items} items into {num_segments} non-empty segments.")
    is_boundary = torch.zeros(num_items - 1, dtype=torch.long)
    is_boundary[: num_segments - 1] = 1
    is_boundary = is_boundary[torch.randperm(num_items - 1, generator=generator)]
    first_in_segment = torch.cat([torch.zeros(1, dtype=torch.long), is_boundary])  # (num_items,)
    segment_ids = first_in_segment.cumsum(0)
    return torch.bincount(segment_ids, minlength=num_segments)  # (num_segments,)


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, generator: torch.Generator
) -> torch.Tensor:
    """Return a (length,) boolean mask, True at the tokens to drop into the target (see the module docstring).

    As in T5, a sequence of one token is treated as two and the mask is cut back to one, so it
    has no noise.
    """
    if length < 1:
        raise ValueError(f"length={length} is invalid; a sequence to corrupt needs at least one token.")
    padded_length = max(length, 2)
    num_noise_tokens, num_noise_spans = noise_span_counts(padded_length, noise_density, mean_noise_span_length)
    noise_lengths = random_segmentation(num_noise_tokens, num_noise_spans, generator)
    kept_lengths = random_segmentation(padded_length - num_noise_tokens, num_noise_spans, generator)

    interleaved = torch.stack([kept_lengths, noise_lengths], dim=1).flatten()  # kept, noise, kept, noise, ...
    is_noise_segment = torch.arange(2 * num_noise_spans) % 2 == 1
    mask = torch.repeat_interleave(is_noise_segment, interleaved)  # (padded_length,)
    return mask[:length]


def corrupt_spans(tokens: torch.Tensor, noise_mask: torch.Tensor, sentinel_ids: list[int], eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split 1-D ``tokens`` by ``noise_mask`` into (inputs, targets), each ending with ``eos_id``.

    The i-th run of masked tokens becomes ``sentinel_ids[i]`` in the inputs, and ``sentinel_ids[i]``
    followed by the run in the targets. A mask from ``random_spans_noise_mask`` starts unmasked,
    which makes these targets the ones of T5's ``nonnoise_span_to_unique_sentinel``.
    """
    if tokens.shape != noise_mask.shape or tokens.dim() != 1:
        raise ValueError(f"tokens {tuple(tokens.shape)} and noise_mask {tuple(noise_mask.shape)} must be 1-D of the same length.")
    inputs, targets = [], []
    n_spans, previous_is_noise = 0, False
    for token, is_noise in zip(tokens.tolist(), noise_mask.tolist()):
        if is_noise and not previous_is_noise:
            if n_spans == len(sentinel_ids):
                raise ValueError(
                    f"The sequence has more noise spans than the {len(sentinel_ids)} sentinel tokens; "
                    "use a tokenizer with more sentinels or shorter sequences."
                )
            inputs.append(sentinel_ids[n_spans])
            targets.append(sentinel_ids[n_spans])
            n_spans += 1
        (targets if is_noise else inputs).append(token)
        previous_is_noise = is_noise
    return (
        torch.tensor(inputs + [eos_id], dtype=torch.long),
        torch.tensor(targets + [eos_id], dtype=torch.long),
    )


def corrupted_lengths(raw_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """Return the (inputs, targets) lengths, EOS included, that corrupting ``raw_length`` tokens gives."""
    if raw_length < 2:
        return raw_length + 1, 1
    num_noise_tokens, num_noise_spans = noise_span_counts(raw_length, noise_density, mean_noise_span_length)
    return raw_length - num_noise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1


def raw_length_for_inputs(inputs_length: int, noise_density: float, mean_noise_span_length: float) -> int:
    """Return the longest raw sequence whose corrupted inputs and targets both fit in ``inputs_length`` tokens.

    T5 chooses its raw length the same way (``random_spans_helper``), so that no input is
    truncated or padded.
    """
    def fits(raw_length: int) -> bool:
        return max(corrupted_lengths(raw_length, noise_density, mean_noise_span_length)) <= inputs_length

    if not fits(2):
        raise ValueError(f"model.max_seq_len={inputs_length} is too short for span corruption; it needs at least 3 tokens.")
    raw_length = 2
    while fits(raw_length + 1):
        raw_length += 1
    return raw_length
