"""Decoding: greedy, temperature, top-k and nucleus filtering, reproducibility."""

import pytest
import torch

from minformer.generation import filter_logits, generate
from minformer.models.gpt import GPT, GPTConfig


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    probabilities = torch.tensor([[0.5, 0.3, 0.15, 0.05]])

    kept = torch.isfinite(filter_logits(probabilities.log(), top_p=0.6))

    assert kept.tolist() == [[True, True, False, False]]


def test_top_p_never_empties_the_set():
    probabilities = torch.tensor([[0.9, 0.05, 0.05]])

    kept = torch.isfinite(filter_logits(probabilities.log(), top_p=1e-6))

    assert kept.tolist() == [[True, False, False]]


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0]])

    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("options", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)])
def test_invalid_sampling_options_rejected(options):
    model = GPT(GPTConfig(vocab_size=11, max_seq_len=8, d_model=16, n_layers=1, n_heads=2))
    with pytest.raises(ValueError):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 3, **options)


def test_greedy_equals_argmax_of_full_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, max_seq_len=32, d_model=16, n_layers=1, n_heads=2)).eval()
    prompt = torch.tensor([[1, 2, 3]])

    tokens = generate(model, prompt, 5, temperature=0)

    for step in range(5):
        prefix = tokens[:, : 3 + step]
        assert tokens[0, 3 + step] == model(prefix).logits[0, -1].argmax()


def test_sampling_reproducible_with_seed_and_varies_across_seeds():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, max_seq_len=32, d_model=16, n_layers=1, n_heads=2)).eval()
    prompt = torch.tensor([[1, 2]])

    def sample(seed):
        return generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_generation_past_context_slides_window():
    model = GPT(GPTConfig(vocab_size=11, max_seq_len=4, d_model=16, n_layers=1, n_heads=2)).eval()

    tokens = generate(model, torch.tensor([[1, 2, 3]]), 6, temperature=0)

    assert tokens.shape == (1, 9)


# --- Repetition penalty, stopping, seeds ----------------------------------------------------

from types import SimpleNamespace  # noqa: E402

from minformer.generation import (  # noqa: E402
    apply_repetition_penalty,
    generate_sequences,
    generate_text,
)


class CountingModel(torch.nn.Module):
    """A stub language model that predicts (last token + 1) mod vocab_size, 10 logits ahead of the rest.

    It needs no cache and makes stopping behaviour exact and readable.
    """

    def __init__(self, vocab_size=10, max_seq_len=64):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None):
        following = (input_ids + 1) % self.config.vocab_size
        return SimpleNamespace(logits=torch.nn.functional.one_hot(following, self.config.vocab_size).float() * 10)


class ConstantModel(CountingModel):
    """A stub whose logits are the same fixed vector at every position."""

    def __init__(self, logits):
        super().__init__(vocab_size=len(logits))
        self.fixed_logits = torch.tensor(logits)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None):
        return SimpleNamespace(logits=self.fixed_logits.expand(*input_ids.shape, -1))


LETTERS = "abcdefghij"


def decode_letters(token_ids):
    return "".join(LETTERS[token_id] for token_id in token_ids)


def tiny_gpt(seed=0, vocab_size=50):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, max_seq_len=32, d_model=16, n_layers=1, n_heads=2, init_std=0.5)).eval()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0]])
    tokens = torch.tensor([[0, 1, 1]])

    penalised = apply_repetition_penalty(logits, tokens, 2.0)

    assert penalised.tolist() == [[1.0, -2.0, 3.0, -4.0]]


def test_repetition_penalty_of_one_changes_nothing():
    logits = torch.tensor([[2.0, -1.0, 3.0]])

    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([[0, 1, 2]]), 1.0), logits)


def test_repetition_penalty_ignores_padding():
    logits = torch.tensor([[2.0, 2.0, 2.0]])
    tokens = torch.tensor([[0, 0, 1]])
    mask = torch.tensor([[0, 0, 1]])  # token 0 appears only as left padding

    assert apply_repetition_penalty(logits, tokens, 2.0, mask).tolist() == [[2.0, 1.0, 2.0]]


def test_repetition_penalty_steers_greedy_decoding():
    model = ConstantModel([5.0, 4.0, 3.0, 2.0])
    prompt = torch.tensor([[3]])

    plain = generate(model, prompt, 3, temperature=0, use_cache=False)
    penalised = generate(model, prompt, 3, temperature=0, use_cache=False, repetition_penalty=2.0)

    assert plain[0, 1:].tolist() == [0, 0, 0]
    # Step 1 picks 0 (5); then 0 is 2.5 < 4, so 1; then 0 is 2.5, 1 is 2, 2 is 3, so 2.
    assert penalised[0, 1:].tolist() == [0, 1, 2]


def test_eos_stops_each_sequence_separately():
    model = CountingModel()
    prompt = torch.tensor([[1], [4]])

    output = generate_sequences(model, prompt, 6, temperature=0, use_cache=False, eos_token_id=5, pad_token_id=9)

    # Decoding ends at step 4, when the first row generates its eos; the second has padded since step 1.
    assert output.tokens[0].tolist() == [1, 2, 3, 4, 5]
    assert output.tokens[1].tolist() == [4, 5, 9, 9, 9]
    assert output.finish_reasons == ["eos", "eos"]
    assert output.new_token_counts == [4, 1]
    assert output.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_generation_ends_when_every_sequence_has_finished():
    output = generate_sequences(CountingModel(), torch.tensor([[1], [2]]), 20, temperature=0, use_cache=False, eos_token_id=4)

    assert output.tokens.shape == (2, 4)


def test_without_eos_generation_runs_full_length():
    output = generate_sequences(CountingModel(), torch.tensor([[1], [4]]), 6, temperature=0, use_cache=False)

    assert output.tokens.shape == (2, 7)
    assert output.finish_reasons == ["length", "length"]
    assert output.tokens[0].tolist() == [1, 2, 3, 4, 5, 6, 7]


def test_stop_string_ends_generation_and_is_stripped():
    model = CountingModel()

    texts = generate_text(model, torch.tensor([[0]]), 8, decode_letters, stop=["de"], temperature=0, use_cache=False)

    # Generated "bcde": the stop string "de" spans two tokens and is cut off.
    assert texts == ["bc"]


def test_without_stop_string_text_continues():
    texts = generate_text(CountingModel(), torch.tensor([[0]]), 8, decode_letters, temperature=0, use_cache=False)

    assert texts == ["bcdefghi"]


def test_stop_string_that_never_appears_runs_full_length():
    output = generate_sequences(
        CountingModel(), torch.tensor([[0]]), 5, temperature=0, use_cache=False, stop=["zz"], decode=decode_letters
    )

    assert output.finish_reasons == ["length"]
    assert output.new_token_counts == [5]


def test_eos_token_is_left_out_of_text():
    texts = generate_text(CountingModel(), torch.tensor([[0]]), 8, decode_letters, temperature=0, use_cache=False, eos_token_id=4)

    assert texts == ["bcd"]


def test_stop_token_sequence_ends_generation():
    output = generate_sequences(
        CountingModel(), torch.tensor([[0], [5]]), 6, temperature=0, use_cache=False, stop_token_sequences=[[3, 4]]
    )

    assert output.finish_reasons == ["stop", "length"]
    assert output.tokens[0, : 1 + output.new_token_counts[0]].tolist() == [0, 1, 2, 3, 4]


def test_stop_token_sequence_in_prompt_does_not_stop():
    output = generate_sequences(
        CountingModel(), torch.tensor([[3, 4]]), 3, temperature=0, use_cache=False, stop_token_sequences=[[3, 4]]
    )

    assert output.finish_reasons == ["length"]


def test_stop_strings_need_decode():
    with pytest.raises(ValueError, match="decode="):
        generate(CountingModel(), torch.tensor([[0]]), 3, stop=["x"])


def test_right_padded_prompt_is_rejected():
    with pytest.raises(ValueError, match="left-padded"):
        generate(CountingModel(), torch.tensor([[1, 2, 0]]), 3, attention_mask=torch.tensor([[1, 1, 0]]), use_cache=False)


def test_near_zero_temperature_sampling_equals_greedy():
    model = tiny_gpt()
    prompt = torch.tensor([[1, 2, 3]])

    greedy = generate(model, prompt, 10, temperature=0)
    cold = generate(model, prompt, 10, temperature=1e-4, generator=torch.Generator().manual_seed(0))

    assert torch.equal(cold, greedy)


def test_hot_sampling_differs_from_greedy():
    model = tiny_gpt()
    prompt = torch.tensor([[1, 2, 3]])

    greedy = generate(model, prompt, 10, temperature=0)
    hot = generate(model, prompt, 10, temperature=5.0, generator=torch.Generator().manual_seed(0))

    assert not torch.equal(hot, greedy)


def test_top_k_one_sampling_equals_greedy():
    model = tiny_gpt()
    prompt = torch.tensor([[4, 5]])

    greedy = generate(model, prompt, 10, temperature=0)
    sampled = generate(model, prompt, 10, temperature=3.0, top_k=1, generator=torch.Generator().manual_seed(1))

    assert torch.equal(sampled, greedy)


def test_top_k_sampling_stays_within_top_k():
    model = tiny_gpt()
    prompt = torch.tensor([[4, 5]])

    def outside_top_three(tokens):
        with torch.no_grad():
            logits = model(tokens[:, :-1]).logits[0, prompt.size(1) - 1 :]
        allowed = logits.topk(3, dim=-1).indices
        return int((allowed != tokens[0, prompt.size(1) :, None]).all(dim=-1).sum())

    generator = torch.Generator().manual_seed(2)
    limited = generate(model, prompt, 25, temperature=5.0, top_k=3, generator=generator)
    unlimited = generate(model, prompt, 25, temperature=5.0, generator=torch.Generator().manual_seed(2))

    assert outside_top_three(limited) == 0
    assert outside_top_three(unlimited) > 0


def test_tiny_top_p_sampling_equals_greedy():
    model = tiny_gpt()
    prompt = torch.tensor([[7]])

    greedy = generate(model, prompt, 10, temperature=0)
    nucleus = generate(model, prompt, 10, temperature=3.0, top_p=1e-6, generator=torch.Generator().manual_seed(3))

    assert torch.equal(nucleus, greedy)


def test_sampling_with_generator_ignores_global_seed():
    model = tiny_gpt()
    prompt = torch.tensor([[1, 2]])

    torch.manual_seed(100)
    first = generate(model, prompt, 15, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(200)
    second = generate(model, prompt, 15, generator=torch.Generator().manual_seed(5))

    assert torch.equal(first, second)


def test_cached_and_uncached_sampling_agree_for_same_seed():
    model = tiny_gpt()
    prompt = torch.tensor([[1, 2]])

    cached = generate(model, prompt, 15, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(6))
    uncached = generate(
        model, prompt, 15, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(6), use_cache=False
    )

    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf")])
def test_non_finite_temperature_rejected(temperature):
    model = GPT(GPTConfig(vocab_size=11, max_seq_len=8, d_model=16, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 3, temperature=temperature)


class LastLogitsModel(CountingModel):
    """A stub that accepts ``logits_to_keep`` and records the value of every call."""

    def __init__(self):
        super().__init__()
        self.logits_to_keep_calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None, logits_to_keep=0):
        self.logits_to_keep_calls.append(logits_to_keep)
        logits = super().forward(input_ids).logits
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_generate_asks_last_logits_only():
    prompt = torch.tensor([[1, 2, 3]])
    model = LastLogitsModel()

    tokens = generate(model, prompt, 4, temperature=0, use_cache=False)

    assert model.logits_to_keep_calls == [1, 1, 1, 1]
    # The stub without the argument (CountingModel) decodes the same tokens.
    assert torch.equal(tokens, generate(CountingModel(), prompt, 4, temperature=0, use_cache=False))
