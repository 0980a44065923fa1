"""Tests of ``minformer.models.transformer`` (Vaswani et al. 2017): config, presets against the paper's
parameter counts, shared embeddings, post-LN, padding and causal masks, cached decoding, bad inputs,
and the inverse-square-root warm-up schedule.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from minformer.cache import EncoderDecoderCache
from minformer.config import load_preset
from minformer.models import FAMILIES, build_model, config_from_dict
from minformer.models.transformer import Transformer, TransformerConfig
from minformer.training.optim import inverse_sqrt_learning_rate

VOCAB = 41


def small_config(**overrides) -> TransformerConfig:
    values = dict(
        vocab_size=VOCAB, max_seq_len=32, d_model=32, n_encoder_layers=2, n_decoder_layers=2, n_heads=4, d_ff=48,
        dropout=0.0,
    )
    return TransformerConfig(**{**values, **overrides})


def small_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small_config(**overrides)).eval()


def source_batch(seed: int = 1):
    """Sources (2, 9) with 9 and 5 real tokens; the padding contains arbitrary ids, which the mask must hide."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (2, 9), generator=generator)
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 5:] = 0
    return input_ids, attention_mask


# ---- config, presets and parameter counts -------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("activation", "mish"), ("norm_position", "sandwich"), ("position", "rope"), ("attention_backend", "flash"),
     ("dropout", 1.0), ("eos_token_id", VOCAB), ("n_kv_heads", 3), ("d_model", 30), ("tie_embeddings", 1)],
)
def test_config_rejects_invalid_field(field, value):
    with pytest.raises(ValueError, match=field):
        small_config(**{field: value})


@pytest.mark.parametrize(
    "name, d_model, n_heads, d_ff, dropout",
    [("transformer-base", 512, 8, 2048, 0.1), ("transformer-big", 1024, 16, 4096, 0.3)],
)
def test_presets_have_paper_sizes(name, d_model, n_heads, d_ff, dropout):
    # Vaswani et al. 2017, Table 3: N = 6 layers per stack, P_drop and label smoothing 0.1 (big: P_drop 0.3).
    config = TransformerConfig.from_preset(name)
    preset = load_preset(name)

    assert (config.n_encoder_layers, config.n_decoder_layers) == (6, 6)
    assert (config.d_model, config.n_heads, config.d_head, config.d_ff) == (d_model, n_heads, 64, d_ff)
    assert config.dropout == dropout
    assert (config.norm_position, config.position, config.tie_embeddings) == ("post", "sinusoidal", True)
    assert preset["objective"]["label_smoothing"] == 0.1
    assert preset["train"]["schedule"] == "inverse_sqrt"
    assert preset["train"]["lr"] == pytest.approx((d_model * 4000) ** -0.5, rel=1e-3)


@pytest.mark.parametrize("name, paper_count", [("transformer-base", 65e6), ("transformer-big", 213e6)])
def test_preset_parameter_count_matches_paper(name, paper_count):
    # Table 3 lists 65M (base) and 213M (big) parameters, with the shared 37000-token BPE vocabulary
    # of English-German (sec. 5.1). We count 63.1M and 214.2M.
    config = TransformerConfig.from_preset(name)
    with torch.device("meta"):
        model = Transformer(config)

    assert config.vocab_size == 37000
    assert model.num_parameters() == pytest.approx(paper_count, rel=0.05)


def test_parameter_count_matches_formula():
    config = TransformerConfig()
    d, d_ff, vocab = config.d_model, config.d_ff, config.vocab_size
    attention = 4 * (d * d + d)
    feed_forward = d * d_ff + d_ff + d_ff * d + d
    layer_norm = 2 * d
    encoder_layer = attention + feed_forward + 2 * layer_norm
    decoder_layer = 2 * attention + feed_forward + 3 * layer_norm
    with torch.device("meta"):
        model = Transformer(config)

    assert model.num_parameters() == vocab * d + 6 * encoder_layer + 6 * decoder_layer
    assert model.num_parameters(non_embedding=True) == 6 * encoder_layer + 6 * decoder_layer


def test_tiny_preset_needs_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        TransformerConfig.from_preset("transformer-tiny")
    config = TransformerConfig.from_preset("transformer-tiny", vocab_size=100)
    assert (config.n_encoder_layers, config.d_model, config.n_heads, config.d_ff) == (2, 64, 4, 256)


def test_family_registry_builds_transformer():
    config = config_from_dict(small_config().to_dict())

    assert FAMILIES["transformer"] == (TransformerConfig, Transformer)
    assert config == small_config()
    assert isinstance(build_model(config), Transformer)


# ---- embeddings, post-LN, dropout ---------------------------------------------------------------


def test_one_shared_embedding_matrix():
    model = small_model()
    embeddings = [module for module in model.modules() if isinstance(module, nn.Embedding)]

    assert embeddings == [model.shared]
    assert model.lm_head.weight is model.shared.weight
    assert small_model(tie_embeddings=False).lm_head.weight is not small_model(tie_embeddings=False).shared.weight


def test_embedding_is_scaled_and_adds_sinusoids():
    # Sec. 3.4: embeddings times sqrt(d_model); sec. 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...).
    model = small_model()
    ids = torch.tensor([[5, 7, 7, 2]])
    positions = torch.arange(2, 6, dtype=torch.float64)[:, None]
    frequencies = 10000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    expected_pe = torch.stack([torch.sin(positions * frequencies), torch.cos(positions * frequencies)], dim=-1).flatten(1)

    embedded = model.embed(ids, first_position=2)

    expected = model.shared.weight[ids] * math.sqrt(32) + expected_pe.float()
    torch.testing.assert_close(embedded, expected, atol=1e-5, rtol=1e-5)


def test_post_ln_stack_ends_in_norm():
    captured = {}
    for position in ("post", "pre"):
        model = small_model(norm_position=position)
        last_norm = model.encoder.blocks[-1].ffn_norm
        handle = last_norm.register_forward_hook(lambda module, args, output: captured.update(last=output))
        input_ids, attention_mask = source_batch()
        with torch.no_grad():
            encoded = model.encode(input_ids, attention_mask)
        handle.remove()
        captured[position] = torch.equal(encoded, captured["last"])

    assert captured["post"]
    assert not captured["pre"]  # the negative twin: a pre-LN block normalises its input, not its output


def test_dropout_inert_in_eval_and_active_in_training():
    model = small_model(dropout=0.3)
    input_ids, attention_mask = source_batch()
    decoder_input_ids = torch.tensor([[0, 4, 9], [0, 3, 5]])

    with torch.no_grad():
        first = model(input_ids, attention_mask, decoder_input_ids).logits
        second = model(input_ids, attention_mask, decoder_input_ids).logits
        model.train()
        trained = model(input_ids, attention_mask, decoder_input_ids).logits

    assert torch.equal(first, second)
    assert not torch.allclose(trained, first)
    # Sec. 5.4 drops sub-layer outputs and embedding sums, never the attention weights.
    attentions = [module for module in model.modules() if module.__class__.__name__ == "MultiHeadAttention"]
    assert len(attentions) == 2 + 2 * 2
    assert all(attention.dropout == 0.0 for attention in attentions)


# ---- masks and shapes ---------------------------------------------------------------------------

PADDING_MODEL = small_model(seed=3)


@settings(deadline=None, max_examples=25, derandomize=bool(os.environ.get("CI")))
@given(
    source_lens=st.lists(st.integers(1, 10), min_size=1, max_size=3),
    extra_padding=st.integers(0, 4),
    target_len=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_source_padding_never_changes_outputs_at_real_positions(source_lens, extra_padding, target_len, seed):
    generator = torch.Generator().manual_seed(seed)
    batch, width = len(source_lens), max(source_lens) + extra_padding
    input_ids = torch.randint(0, VOCAB, (batch, width), generator=generator)  # padding gets arbitrary ids
    attention_mask = (torch.arange(width)[None, :] < torch.tensor(source_lens)[:, None]).long()
    decoder_input_ids = torch.randint(0, VOCAB, (batch, target_len), generator=generator)

    with torch.no_grad():
        padded = PADDING_MODEL(input_ids, attention_mask, decoder_input_ids)
        assert padded.logits.shape == (batch, target_len, VOCAB)
        assert padded.encoder_hidden_states.shape == (batch, width, 32)
        for row, length in enumerate(source_lens):
            alone = PADDING_MODEL(input_ids[row : row + 1, :length], None, decoder_input_ids[row : row + 1])
            torch.testing.assert_close(padded.logits[row], alone.logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                padded.encoder_hidden_states[row, :length], alone.encoder_hidden_states[0], atol=1e-5, rtol=1e-5
            )


def test_real_source_token_changes_outputs():
    """Negative twin of the padding property: a real token, or unmasked padding, does change the logits."""
    input_ids, attention_mask = source_batch()
    decoder_input_ids = torch.tensor([[0, 4, 9], [0, 3, 5]])
    changed = input_ids.clone()
    changed[1, 2] = (changed[1, 2] + 1) % VOCAB

    with torch.no_grad():
        before = PADDING_MODEL(input_ids, attention_mask, decoder_input_ids).logits
        after = PADDING_MODEL(changed, attention_mask, decoder_input_ids).logits
        unmasked = PADDING_MODEL(input_ids, None, decoder_input_ids).logits

    assert torch.equal(after[0], before[0])
    assert not torch.allclose(after[1], before[1])
    assert not torch.allclose(unmasked[1], before[1])


def test_future_target_token_changes_only_later_logits():
    model = small_model()
    input_ids, attention_mask = source_batch()
    decoder_input_ids = torch.tensor([[0, 4, 9, 11], [0, 3, 3, 3]])
    changed = decoder_input_ids.clone()
    changed[:, 2] = 20

    with torch.no_grad():
        before = model(input_ids, attention_mask, decoder_input_ids).logits
        after = model(input_ids, attention_mask, changed).logits

    torch.testing.assert_close(after[:, :2], before[:, :2], atol=0, rtol=0)
    assert not torch.allclose(after[:, 2:], before[:, 2:])


def test_loss_ignores_padding_labels():
    model = small_model()
    input_ids, attention_mask = source_batch()
    labels = torch.tensor([[4, 9, 1, -100], [3, 5, 7, 1]])

    output = model(input_ids, attention_mask, labels=labels)
    logits = model(input_ids, attention_mask, torch.tensor([[0, 4, 9, 1], [0, 3, 5, 7]])).logits

    assert torch.equal(model.shift_right(labels), torch.tensor([[0, 4, 9, 1], [0, 3, 5, 7]]))
    torch.testing.assert_close(output.loss, F.cross_entropy(logits[labels != -100], labels[labels != -100]))


# ---- cached decoding ----------------------------------------------------------------------------


@pytest.mark.parametrize("norm_position, n_kv_heads", [("post", None), ("pre", 2)])
def test_cached_decoding_matches_full_decoder_forward(norm_position, n_kv_heads):
    model = small_model(seed=2, norm_position=norm_position, n_kv_heads=n_kv_heads)
    input_ids, attention_mask = source_batch(seed=3)
    n_steps = 24
    decoder_input_ids = torch.randint(2, VOCAB, (2, n_steps), generator=torch.Generator().manual_seed(4))

    with torch.no_grad():
        encoder_hidden = model.encode(input_ids, attention_mask)
        full = model.decode(decoder_input_ids, encoder_hidden, attention_mask)
        cache = EncoderDecoderCache.for_model(model, batch=2, source_len=9, max_len=n_steps)
        steps = [
            model.decode(decoder_input_ids[:, step : step + 1], encoder_hidden, attention_mask, cache=cache)
            for step in range(n_steps)
        ]

    assert cache.length == n_steps
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cross_attention_keys_are_computed_once_per_sequence():
    model = small_model()
    input_ids, attention_mask = source_batch()
    calls = []
    for block in model.decoder.blocks:
        block.cross_attn.k_proj.register_forward_hook(lambda module, args, output: calls.append(args[0].size(1)))

    with torch.no_grad():
        encoder_hidden = model.encode(input_ids, attention_mask)
        cache = EncoderDecoderCache.for_model(model, batch=2, source_len=9, max_len=5)
        for token in (0, 4, 7, 9, 2):
            model.decode(torch.full((2, 1), token), encoder_hidden, attention_mask, cache=cache)

    # One projection of the 9 source positions per decoder layer on the first step, then empty ones.
    assert calls[:2] == [9, 9]
    assert calls[2:] == [0] * 8


# ---- bad input ----------------------------------------------------------------------------------


def test_source_longer_than_max_seq_len_raises():
    model = small_model()
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model.encode(torch.ones(1, 33, dtype=torch.long))


def test_target_beyond_max_seq_len_raises():
    model = small_model()
    encoder_hidden = model.encode(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model.decode(torch.ones(1, 33, dtype=torch.long), encoder_hidden)


@pytest.mark.parametrize(
    "input_ids, message",
    [
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
        (torch.zeros(3, dtype=torch.long), "shape"),
        (torch.zeros(1, 3), "integer"),
        (torch.full((1, 3), VOCAB), "outside the vocabulary"),
    ],
)
def test_invalid_source_ids_raise(input_ids, message):
    with pytest.raises(ValueError, match=message):
        small_model().encode(input_ids)


def test_forward_without_decoder_inputs_or_labels_raises():
    input_ids, attention_mask = source_batch()
    with pytest.raises(ValueError, match="decoder_input_ids or labels"):
        small_model()(input_ids, attention_mask)


# ---- the inverse-square-root schedule -----------------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 100, 3999, 4000, 4001, 10_000, 100_000])
def test_inverse_sqrt_schedule_matches_formula(step):
    # Vaswani et al. 2017, eq. 3, with the paper's d_model = 512 and warmup_steps = 4000.
    expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)

    assert inverse_sqrt_learning_rate(step, 512, 4000) == pytest.approx(expected, rel=1e-12)


def test_inverse_sqrt_schedule_peaks_at_warmup_end():
    rates = [inverse_sqrt_learning_rate(step, 512, 4000) for step in range(1, 20_000)]

    assert max(range(len(rates)), key=rates.__getitem__) + 1 == 4000
    assert rates[3999] == pytest.approx(512**-0.5 / math.sqrt(4000))


def test_inverse_sqrt_schedule_is_linear_then_decays():
    assert inverse_sqrt_learning_rate(0, 512, 4000) == 0.0
    assert inverse_sqrt_learning_rate(2000, 512, 4000) == pytest.approx(inverse_sqrt_learning_rate(1000, 512, 4000) * 2)
    assert inverse_sqrt_learning_rate(16_000, 512, 4000) == pytest.approx(inverse_sqrt_learning_rate(4000, 512, 4000) / 2)


@pytest.mark.parametrize("step, warmup_steps", [(-1, 4000), (1.5, 4000), (10, 0)])
def test_inverse_sqrt_schedule_rejects_invalid_arguments(step, warmup_steps):
    with pytest.raises(ValueError):
        inverse_sqrt_learning_rate(step, 512, warmup_steps)
