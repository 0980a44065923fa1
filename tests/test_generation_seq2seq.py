"""Tests of ``minformer.generation_seq2seq``: greedy decoding, sampling and beam search for T5 and the
2017 Transformer.

Beam search is checked against a brute-force enumeration of every target sequence on tiny
vocabularies, scored by the same length-normalised formula, in settings where the beam keeps
every live prefix, so that the search is exact. Cached decoding is checked against decoding that
reruns the whole target at every step, in each decoding mode.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from minformer.generation_seq2seq import beam_search, generate_seq2seq
from minformer.models.t5 import T5, T5Config
from minformer.models.transformer import Transformer, TransformerConfig


def small_model(seed: int = 0, **overrides) -> T5:
    """A small T5 with every parameter redrawn (norm weights ~ 1 + N(0, 0.1), others ~ N(0, 0.3)).

    T5's own initialisation makes an untrained model repeat one token; the redrawn weights give
    varied outputs, so that EOS and beam choices are exercised.
    """
    values = dict(
        vocab_size=41, max_seq_len=64, d_model=32, n_encoder_layers=2, n_decoder_layers=2, n_heads=4, d_head=8, d_ff=48,
        t5_num_buckets=8, t5_max_distance=16, dropout=0.0,
    )
    model = T5(T5Config(**{**values, **overrides}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.1 * noise if "norm" in name else 0.3 * noise)
    return model.eval()


def transformer_model(seed: int = 0, **overrides) -> Transformer:
    """A small 2017 Transformer with every parameter redrawn the same way as ``small_model``'s."""
    values = dict(
        vocab_size=41, max_seq_len=64, d_model=32, n_encoder_layers=2, n_decoder_layers=2, n_heads=4, d_ff=48, dropout=0.0,
    )
    model = Transformer(TransformerConfig(**{**values, **overrides}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.1 * noise if "norm" in name else 0.3 * noise)
    return model.eval()


MODEL_BUILDERS = {"t5": small_model, "transformer": transformer_model}


def source_batch(seed: int = 1, vocab_size: int = 41, batch: int = 2):
    """Sources (batch, 9); the second row has 5 real tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, 9), generator=generator)
    attention_mask = torch.ones(batch, 9, dtype=torch.long)
    if batch > 1:
        attention_mask[1, 5:] = 0
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def with_eos(model, eos_token_id: int):
    """The same weights with another end-of-sequence id."""
    config = dataclasses.replace(model.config, eos_token_id=eos_token_id)
    copy = type(model)(config)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


# ---- greedy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MODEL_BUILDERS)
def test_greedy_with_cache_equals_without(family):
    model = MODEL_BUILDERS[family]()
    input_ids, attention_mask = source_batch()

    cached = generate_seq2seq(model, input_ids, attention_mask, max_new_tokens=24, stop_at_eos=False)
    uncached = generate_seq2seq(model, input_ids, attention_mask, max_new_tokens=24, stop_at_eos=False, use_cache=False)

    assert cached.shape == (2, 25)
    assert bool((cached[:, 0] == model.config.decoder_start_token_id).all())
    assert torch.equal(cached, uncached)


def test_greedy_stops_at_eos_per_sequence():
    model = small_model(seed=2)
    input_ids, attention_mask = source_batch(seed=3)
    free = generate_seq2seq(model, input_ids, attention_mask, max_new_tokens=10, stop_at_eos=False)
    # Take as EOS a token that row 0 emits at some step and row 1 never emits.
    row_0, row_1 = free[0, 1:].tolist(), free[1, 1:].tolist()
    candidates = [token for token in row_0 if token not in row_1 and token != model.config.pad_token_id]
    if not candidates:
        pytest.skip("The seeded model emits no token in row 0 only.")
    eos = candidates[0]
    stop = row_0.index(eos) + 1  # number of tokens row 0 generates, EOS included

    stopped = generate_seq2seq(with_eos(model, eos), input_ids, attention_mask, max_new_tokens=10)

    assert 1 < stop < 10
    assert stopped[0, 1 : stop + 1].tolist() == row_0[:stop]
    assert bool((stopped[0, stop + 1 :] == model.config.pad_token_id).all())
    assert torch.equal(stopped[1], free[1])


def test_greedy_stops_early_when_every_row_ends():
    model = small_model(seed=2)
    input_ids, attention_mask = source_batch(seed=3, batch=1)
    free = generate_seq2seq(model, input_ids, attention_mask, max_new_tokens=10, stop_at_eos=False)
    eos = int(free[0, 2])

    stopped = generate_seq2seq(with_eos(model, eos), input_ids, attention_mask, max_new_tokens=10)

    assert stopped.shape[1] == free[0, 1:].tolist().index(eos) + 2


def test_empty_source_raises():
    model = small_model()
    with pytest.raises(ValueError, match="empty"):
        generate_seq2seq(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match="empty"):
        generate_seq2seq(model, torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), max_new_tokens=3)


# ---- beam search ------------------------------------------------------------------------------


def brute_force_best(model, input_ids, attention_mask, max_new_tokens: int, length_penalty: float):
    """Score every target sequence of 1 .. max_new_tokens tokens and return the best with its score.

    A sequence ends at its first EOS or at the length limit. Its score is the sum of its
    log-probabilities divided by length ** length_penalty.
    """
    config = model.config
    best_tokens, best_score = None, float("-inf")
    for length in range(1, max_new_tokens + 1):
        for body in itertools.product(range(config.vocab_size), repeat=length):
            if config.eos_token_id in body[:-1]:
                continue
            if length < max_new_tokens and body[-1] != config.eos_token_id:
                continue
            tokens = [config.decoder_start_token_id, *body]
            with torch.no_grad():
                logits = model(input_ids, attention_mask, torch.tensor([tokens[:-1]])).logits[0]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            total = float(sum(log_probs[step, token] for step, token in enumerate(body)))
            score = total / length**length_penalty
            if score > best_score:
                best_tokens, best_score = tokens, score
    return best_tokens, best_score


@pytest.mark.parametrize(
    "vocab_size, max_new_tokens, length_penalty",
    [(5, 2, 0.0), (5, 2, 1.0), (5, 2, 3.0), (2, 3, 0.0), (2, 3, 1.0), (2, 3, 2.0)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("family", MODEL_BUILDERS)
def test_beam_search_finds_brute_force_best(vocab_size, max_new_tokens, length_penalty, seed, family):
    # num_beams = vocab_size keeps every live prefix here: with 5 tokens all 4 non-EOS tokens of
    # step 1, and with 2 tokens the single non-EOS prefix; the last step scores every extension.
    model = MODEL_BUILDERS[family](seed=seed, vocab_size=vocab_size)
    input_ids, attention_mask = source_batch(seed=seed, vocab_size=vocab_size, batch=1)
    expected_tokens, expected_score = brute_force_best(model, input_ids, attention_mask, max_new_tokens, length_penalty)

    output = beam_search(model, input_ids, attention_mask, vocab_size, max_new_tokens, length_penalty=length_penalty)

    tokens = output.sequences[0, : len(expected_tokens)].tolist()
    assert tokens == expected_tokens
    assert bool((output.sequences[0, len(expected_tokens) :] == model.config.pad_token_id).all())
    assert output.scores[0].item() == pytest.approx(expected_score, abs=1e-5)


def test_length_penalty_changes_the_choice():
    """Negative twin: some seed picks a different hypothesis with alpha 0 and alpha 3, so the penalty acts."""
    chosen = []
    for seed in range(3):
        model = small_model(seed=seed, vocab_size=5)
        input_ids, attention_mask = source_batch(seed=seed, vocab_size=5, batch=1)
        outputs = [beam_search(model, input_ids, attention_mask, 5, 2, length_penalty=alpha) for alpha in (0.0, 3.0)]
        chosen.append(outputs[0].sequences.tolist() != outputs[1].sequences.tolist())
    assert any(chosen)


@pytest.mark.parametrize("family", MODEL_BUILDERS)
def test_one_beam_equals_greedy(family):
    model = MODEL_BUILDERS[family](seed=5)
    input_ids, attention_mask = source_batch(seed=6)

    greedy = generate_seq2seq(model, input_ids, attention_mask, max_new_tokens=12, stop_at_eos=False)
    beams = beam_search(model, input_ids, attention_mask, num_beams=1, max_new_tokens=12)

    assert torch.equal(beams.sequences, greedy)


def test_one_beam_equals_greedy_with_eos():
    model = small_model(seed=2)
    input_ids, attention_mask = source_batch(seed=3, batch=1)
    free = generate_seq2seq(model, input_ids, attention_mask, max_new_tokens=10, stop_at_eos=False)
    model = with_eos(model, int(free[0, 3]))

    greedy = generate_seq2seq(model, input_ids, attention_mask, max_new_tokens=10)
    beams = beam_search(model, input_ids, attention_mask, num_beams=1, max_new_tokens=10)

    assert torch.equal(beams.sequences, greedy)


@pytest.mark.parametrize("family", MODEL_BUILDERS)
def test_more_beams_than_vocabulary_raise(family):
    model = MODEL_BUILDERS[family](vocab_size=5)
    input_ids, attention_mask = source_batch(vocab_size=5, batch=1)
    with pytest.raises(ValueError, match="num_beams=6"):
        beam_search(model, input_ids, attention_mask, num_beams=6, max_new_tokens=2)


@pytest.mark.parametrize("family", MODEL_BUILDERS)
def test_beam_search_with_cache_equals_without(family):
    model = MODEL_BUILDERS[family](seed=7)
    input_ids, attention_mask = source_batch(seed=8)

    cached = beam_search(model, input_ids, attention_mask, num_beams=4, max_new_tokens=10, length_penalty=0.6)
    uncached = beam_search(model, input_ids, attention_mask, num_beams=4, max_new_tokens=10, length_penalty=0.6, use_cache=False)

    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.scores, uncached.scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", MODEL_BUILDERS)
def test_beam_search_empty_source_raises(family):
    model = MODEL_BUILDERS[family]()
    with pytest.raises(ValueError, match="empty"):
        beam_search(model, torch.zeros(1, 0, dtype=torch.long), num_beams=2, max_new_tokens=2)


# ---- sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MODEL_BUILDERS)
@pytest.mark.parametrize("top_k, top_p", [(None, None), (5, None), (None, 0.8)])
def test_sampling_with_cache_equals_without(family, top_k, top_p):
    model = MODEL_BUILDERS[family](seed=3)
    input_ids, attention_mask = source_batch(seed=4)
    options = dict(max_new_tokens=16, temperature=1.3, top_k=top_k, top_p=top_p)

    cached = generate_seq2seq(model, input_ids, attention_mask, generator=torch.Generator().manual_seed(9), **options)
    uncached = generate_seq2seq(
        model, input_ids, attention_mask, generator=torch.Generator().manual_seed(9), use_cache=False, **options
    )

    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", MODEL_BUILDERS)
def test_sampling_depends_on_the_seed(family):
    """Negative twin of the cache test: the same weights give other tokens with another seed, so sampling samples."""
    model = MODEL_BUILDERS[family](seed=3)
    input_ids, attention_mask = source_batch(seed=4)
    samples = [
        generate_seq2seq(model, input_ids, attention_mask, max_new_tokens=16, stop_at_eos=False, temperature=1.3,
                         generator=torch.Generator().manual_seed(seed))
        for seed in (9, 10)
    ]
    assert not torch.equal(samples[0], samples[1])


@pytest.mark.parametrize("family", MODEL_BUILDERS)
def test_top_k_of_one_equals_greedy(family):
    model = MODEL_BUILDERS[family](seed=3)
    input_ids, attention_mask = source_batch(seed=4)

    greedy = generate_seq2seq(model, input_ids, attention_mask, max_new_tokens=12, stop_at_eos=False)
    sampled = generate_seq2seq(model, input_ids, attention_mask, max_new_tokens=12, stop_at_eos=False, temperature=1.0,
                               top_k=1, generator=torch.Generator().manual_seed(0))

    assert torch.equal(sampled, greedy)


@pytest.mark.parametrize("option, value", [("temperature", -1.0), ("top_k", -2), ("top_p", 1.5)])
def test_invalid_sampling_options_raise(option, value):
    model = transformer_model()
    input_ids, attention_mask = source_batch()
    with pytest.raises(ValueError, match=option):
        generate_seq2seq(model, input_ids, attention_mask, max_new_tokens=3, **{option: value})


# ---- bad input --------------------------------------------------------------------------------


def test_transformer_empty_source_raises():
    model = transformer_model()
    with pytest.raises(ValueError, match="empty"):
        generate_seq2seq(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match="empty"):
        generate_seq2seq(model, torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), max_new_tokens=3)


def test_transformer_source_longer_than_max_seq_len_raises():
    model = transformer_model()
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate_seq2seq(model, torch.ones(1, 65, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        beam_search(model, torch.ones(1, 65, dtype=torch.long), num_beams=2, max_new_tokens=3)


def test_t5_reads_sources_longer_than_max_seq_len():
    """T5's relative positions have no table to overflow: max_seq_len bounds only the decoding cache."""
    model = small_model()
    tokens = generate_seq2seq(model, torch.ones(1, 80, dtype=torch.long), max_new_tokens=3, stop_at_eos=False)
    assert tokens.shape == (1, 4)


@pytest.mark.parametrize("decode", ["greedy", "beam"])
def test_transformer_rejects_more_new_tokens_than_positions(decode):
    model = transformer_model()
    input_ids, attention_mask = source_batch()
    with pytest.raises(ValueError, match="max_new_tokens=65"):
        if decode == "greedy":
            generate_seq2seq(model, input_ids, attention_mask, max_new_tokens=65)
        else:
            beam_search(model, input_ids, attention_mask, num_beams=2, max_new_tokens=65)
    assert generate_seq2seq(model, input_ids, attention_mask, max_new_tokens=64, stop_at_eos=False).shape == (2, 65)


def test_decoder_only_model_raises():
    from minformer.models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=41, max_seq_len=16, d_model=16, n_layers=1, n_heads=2)).eval()
    with pytest.raises(ValueError, match="gpt is not an encoder-decoder"):
        generate_seq2seq(model, torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="gpt is not an encoder-decoder"):
        beam_search(model, torch.ones(1, 3, dtype=torch.long), num_beams=2, max_new_tokens=2)
