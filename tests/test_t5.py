"""Tests of ``minformer.models.t5``: config validation, presets, shapes, losses and cached decoding."""

from __future__ import annotations

import pytest
import torch

from minformer.models import FAMILIES, build_model, config_from_dict
from minformer.models.t5 import T5, T5Config, T5DecoderCache


def small_config(**overrides) -> T5Config:
    values = dict(
        vocab_size=41, max_seq_len=64, d_model=32, n_encoder_layers=2, n_decoder_layers=3, n_heads=4, d_head=8, d_ff=48,
        t5_num_buckets=8, t5_max_distance=16, dropout=0.0,
    )
    return T5Config(**{**values, **overrides})


def small_model(seed: int = 0, **overrides) -> T5:
    torch.manual_seed(seed)
    return T5(small_config(**overrides)).eval()


def source_batch(seed: int = 1, vocab_size: int = 41):
    """Sources (2, 9) with 9 and 5 real tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab_size, (2, 9), generator=generator)
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 5:] = 0
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


# ---- config and presets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("activation", "mish"), ("norm_position", "post"), ("position", "rope"), ("attention_backend", "flash"),
     ("dropout", 1.0), ("eos_token_id", 41), ("t5_max_distance", 4)],
)
def test_config_rejects_invalid_field(field, value):
    with pytest.raises(ValueError, match=field):
        small_config(**{field: value})


@pytest.mark.parametrize(
    "name, layers, d_model, n_heads, d_ff, activation, tied",
    [
        ("t5-small", (6, 6), 512, 8, 2048, "relu", True),
        ("t5-base", (12, 12), 768, 12, 3072, "relu", True),
        ("t5-v1_1-small", (8, 8), 512, 6, 1024, "geglu_tanh", False),
    ],
)
def test_presets_have_published_sizes(name, layers, d_model, n_heads, d_ff, activation, tied):
    config = T5Config.from_preset(name)

    assert (config.n_encoder_layers, config.n_decoder_layers) == layers
    assert (config.d_model, config.n_heads, config.d_head, config.d_ff) == (d_model, n_heads, 64, d_ff)
    assert config.activation == activation
    assert config.tie_embeddings is tied
    assert config.vocab_size == 32128


def test_tiny_preset_needs_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        T5Config.from_preset("t5-tiny")
    config = T5Config.from_preset("t5-tiny", vocab_size=100)
    assert (config.n_encoder_layers, config.d_model, config.n_heads, config.d_head, config.d_ff) == (2, 64, 4, 16, 128)


def test_family_registry_builds_t5():
    config = config_from_dict(small_config().to_dict())

    assert FAMILIES["t5"] == (T5Config, T5)
    assert config == small_config()
    assert type(build_model(config)) is T5


def test_t5_small_parameter_count():
    # The released t5-small has 60.5M parameters (transformers' T5ForConditionalGeneration, tied head).
    with torch.device("meta"):
        model = T5(T5Config.from_preset("t5-small"))
    assert model.num_parameters() == 60_506_624


# ---- forward ------------------------------------------------------------------------------------


def test_tied_head_shares_the_embedding():
    tied, untied = small_model(), small_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.shared.weight
    assert untied.lm_head.weight is not untied.shared.weight


def test_shift_right_pads_ignored_labels():
    model = small_model(decoder_start_token_id=0, pad_token_id=0)
    labels = torch.tensor([[5, 6, 7, 1], [8, 1, -100, -100]])

    assert model.shift_right(labels).tolist() == [[0, 5, 6, 7], [0, 8, 1, 0]]


def test_loss_ignores_labels_of_minus_100():
    model = small_model()
    input_ids, attention_mask = source_batch()
    labels = torch.tensor([[5, 6, 7, 1], [8, 1, -100, -100]])

    output = model(input_ids, attention_mask, labels=labels)
    logits = output.logits[labels != -100]
    expected = torch.nn.functional.cross_entropy(logits, labels[labels != -100])

    assert output.logits.shape == (2, 4, 41)
    torch.testing.assert_close(output.loss, expected)


def test_source_padding_does_not_change_outputs():
    model = small_model()
    input_ids, attention_mask = source_batch()
    decoder_input_ids = torch.tensor([[0, 4, 9]])

    with torch.no_grad():
        padded = model(input_ids[1:], attention_mask[1:], decoder_input_ids).logits
        alone = model(input_ids[1:, :5], None, decoder_input_ids).logits

    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


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


def test_feed_forward_dropout_alone_in_train_mode_drops():
    """Monte Carlo dropout on the feed-forward activations only: the model in eval mode, those Dropouts in train."""
    model = small_model(dropout=0.3).eval()
    for block in [*model.encoder.blocks, *model.decoder.blocks]:
        block.ffn.dropout.train()
    input_ids, attention_mask = source_batch()
    decoder_input_ids = torch.tensor([[0, 4, 9], [0, 3, 5]])

    with torch.no_grad():
        torch.manual_seed(1)
        first = model(input_ids, attention_mask, decoder_input_ids).logits
        torch.manual_seed(2)
        second = model(input_ids, attention_mask, decoder_input_ids).logits

    assert not torch.allclose(first, second)


# ---- cached decoding ----------------------------------------------------------------------------


@pytest.mark.parametrize("tie_embeddings, activation", [(True, "relu"), (False, "geglu_tanh")])
def test_cached_decoding_matches_full_decoder_forward(tie_embeddings, activation):
    model = small_model(seed=2, tie_embeddings=tie_embeddings, activation=activation)
    input_ids, attention_mask = source_batch(seed=3)
    n_steps = 24
    decoder_input_ids = torch.randint(2, 41, (2, n_steps), generator=torch.Generator().manual_seed(4))
    decoder_input_ids[:, 0] = 0

    with torch.no_grad():
        encoder_hidden = model.encode(input_ids, attention_mask)
        full = model.decode(decoder_input_ids, encoder_hidden, attention_mask)
        cache = T5DecoderCache.for_model(model, batch=2, source_len=9, max_len=n_steps)
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
        cache = T5DecoderCache.for_model(model, batch=2, source_len=9, max_len=5)
        for token in (0, 4, 7, 9, 2):
            model.decode(torch.full((2, 1), token), encoder_hidden, attention_mask, cache=cache)

    # One projection of the 9 source positions per decoder layer on the first step, then empty ones.
    assert calls[:3] == [9, 9, 9]
    assert calls[3:] == [0] * 12


def test_cached_decoding_with_wrong_mask_length_raises():
    model = small_model()
    input_ids, attention_mask = source_batch()
    encoder_hidden = model.encode(input_ids, attention_mask)
    cache = T5DecoderCache.for_model(model, batch=2, source_len=9, max_len=4)
    model.decode(torch.zeros(2, 1, dtype=torch.long), encoder_hidden, attention_mask, cache=cache)

    with pytest.raises(ValueError, match="decoder_attention_mask"):
        model.decode(torch.zeros(2, 1, dtype=torch.long), encoder_hidden, attention_mask, torch.ones(2, 1), cache=cache)
