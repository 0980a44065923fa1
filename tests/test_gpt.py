"""GPT: configuration checks, causality, dropout, backends inside the model, initialisation."""

import math

import numpy as np
import pytest
import torch

from minformer.models.gpt import GPT, GPTConfig


def tiny_config(**overrides):
    values = dict(vocab_size=37, max_seq_len=16, d_model=32, n_layers=2, n_heads=4)
    values.update(overrides)
    return GPTConfig(**values)


def test_presets_have_published_sizes():
    # GPT-2 sizes of Radford et al. 2019, Table 2 (124M, 355M, 774M, 1558M parameters).
    expected = {"gpt2": 124.4e6, "gpt2-medium": 354.8e6, "gpt2-large": 774.0e6, "gpt2-xl": 1557.6e6}
    for name, count in expected.items():
        config = GPTConfig.from_preset(name)
        with torch.device("meta"):
            model = GPT(config)
        assert abs(model.num_parameters() - count) / count < 0.002, name


def test_shakespeare_char_preset_shape():
    config = GPTConfig.from_preset("gpt-shakespeare-char", vocab_size=65)

    assert (config.n_layers, config.n_heads, config.d_model, config.max_seq_len) == (6, 6, 384, 256)


def test_from_preset_without_vocab_size_explains():
    with pytest.raises(ValueError, match="vocab_size=tokenizer.vocab_size"):
        GPTConfig.from_preset("gpt-tiny")


def test_from_preset_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match="gpt-tiny"):
        GPTConfig.from_preset("gpt-tyny")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(d_model=30, n_heads=4), "d_model=30"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3"),
        (dict(norm="batchnorm"), "norm='batchnorm'"),
        (dict(position="absolute"), "position='absolute'"),
        (dict(activation="swish"), "activation='swish'"),
        (dict(norm_position="middle"), "norm_position='middle'"),
        (dict(dropout=1.0), "dropout=1.0"),
        (dict(n_layers=0), "n_layers=0"),
        (dict(attention_backend="cuda"), "attention_backend='cuda'"),
    ],
)
def test_invalid_config_names_field(overrides, field):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    assert field in str(error.value)


def test_d_head_makes_indivisible_width_valid():
    config = tiny_config(d_model=30, n_heads=4, d_head=8)

    assert GPT(config)(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 37)


def test_config_is_frozen():
    config = tiny_config()
    with pytest.raises(Exception):
        config.d_model = 64


@pytest.mark.parametrize("backend", ["naive", "sdpa", "flash"])
@pytest.mark.parametrize("position", ["learned", "sinusoidal", "none"])
def test_future_token_never_changes_earlier_logits(backend, position):
    torch.manual_seed(0)
    model = GPT(tiny_config(attention_backend=backend, position=position)).eval()
    tokens = torch.randint(0, 37, (2, 12))
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 37

    before, after = model(tokens).logits, model(changed).logits

    torch.testing.assert_close(before[:, :8], after[:, :8], atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["naive", "sdpa", "flash"])
def test_earlier_token_changes_later_logits(backend):
    torch.manual_seed(0)
    model = GPT(tiny_config(attention_backend=backend)).eval()
    tokens = torch.randint(0, 37, (2, 12))
    changed = tokens.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 37

    difference = (model(tokens).logits - model(changed).logits).abs()

    assert difference[:, 3:].amax(dim=-1).min() > 1e-6
    assert difference[:, :3].max() == 0


def test_naive_and_sdpa_models_agree_in_values_and_gradients():
    torch.manual_seed(0)
    naive = GPT(tiny_config(attention_backend="naive", dropout=0.0))
    sdpa = GPT(tiny_config(attention_backend="sdpa", dropout=0.0))
    sdpa.load_state_dict(naive.state_dict())
    tokens = torch.randint(0, 37, (3, 16))
    targets = torch.randint(0, 37, (3, 16))

    naive_out, sdpa_out = naive(tokens, targets=targets), sdpa(tokens, targets=targets)
    naive_out.loss.backward()
    sdpa_out.loss.backward()

    torch.testing.assert_close(sdpa_out.logits, naive_out.logits, atol=1e-5, rtol=1e-5)
    naive_grads = torch.cat([p.grad.flatten() for p in naive.parameters()])
    sdpa_grads = torch.cat([p.grad.flatten() for p in sdpa.parameters()])
    assert float((sdpa_grads - naive_grads).abs().max() / naive_grads.abs().max()) <= 1e-5


def test_padding_mask_keeps_real_token_logits():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    tokens = torch.randint(0, 37, (1, 6))
    padded = torch.cat([tokens, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])

    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, :6], model(tokens).logits, atol=1e-5, rtol=1e-5)


def test_dropout_inert_in_eval():
    torch.manual_seed(0)
    model = GPT(tiny_config(dropout=0.5)).eval()
    tokens = torch.randint(0, 37, (2, 10))

    assert torch.equal(model(tokens).logits, model(tokens).logits)


def test_dropout_active_in_training():
    torch.manual_seed(0)
    model = GPT(tiny_config(dropout=0.5)).train()
    tokens = torch.randint(0, 37, (2, 10))

    assert not torch.equal(model(tokens).logits, model(tokens).logits)


def test_embeddings_are_tied():
    model = GPT(tiny_config())

    assert model.lm_head.weight is model.token_embedding.weight
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_untied_embeddings_are_separate():
    model = GPT(tiny_config(tie_embeddings=False))

    assert model.lm_head.weight is not model.token_embedding.weight


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    config = tiny_config(d_model=256, n_layers=8, n_heads=4)
    model = GPT(config)
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)

    assert abs(model.blocks[0].attn.out_proj.weight.std().item() - residual_std) < 0.1 * residual_std
    assert abs(model.blocks[0].ffn.fc_out.weight.std().item() - residual_std) < 0.1 * residual_std
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert torch.equal(model.blocks[0].attn.q_proj.bias, torch.zeros_like(model.blocks[0].attn.q_proj.bias))


def test_loss_ignores_minus_100_targets():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    tokens = torch.randint(0, 37, (1, 8))
    targets = torch.randint(0, 37, (1, 8))
    partial = targets.clone()
    partial[:, 4:] = -100

    logits = model(tokens).logits
    expected = torch.nn.functional.cross_entropy(logits[0, :4], targets[0, :4])

    torch.testing.assert_close(model(tokens, targets=partial).loss, expected)


def test_out_of_vocabulary_token_id_is_rejected():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="Token id 37"):
        model(torch.tensor([[1, 37]]))


def test_sequence_longer_than_context_is_rejected():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_mask_of_wrong_shape_is_rejected():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))


def test_return_attentions_gives_one_map_per_layer():
    model = GPT(tiny_config(attention_backend="naive")).eval()

    output = model(torch.zeros(2, 5, dtype=torch.long), return_attentions=True)

    assert len(output.attentions) == 2
    assert output.attentions[0].shape == (2, 4, 5, 5)


def test_flash_model_agrees_with_sdpa_in_values_and_gradients():
    torch.manual_seed(0)
    flash = GPT(tiny_config(attention_backend="flash"))
    sdpa = GPT(tiny_config(attention_backend="sdpa"))
    sdpa.load_state_dict(flash.state_dict())
    tokens = torch.randint(0, 37, (3, 16))
    targets = torch.randint(0, 37, (3, 16))

    flash_out, sdpa_out = flash(tokens, targets=targets), sdpa(tokens, targets=targets)
    flash_out.loss.backward()
    sdpa_out.loss.backward()

    torch.testing.assert_close(flash_out.logits, sdpa_out.logits, atol=1e-5, rtol=1e-5)
    flash_grads = torch.cat([p.grad.flatten() for p in flash.parameters()])
    sdpa_grads = torch.cat([p.grad.flatten() for p in sdpa.parameters()])
    assert float((flash_grads - sdpa_grads).abs().max() / sdpa_grads.abs().max()) <= 1e-5


def test_flash_with_dropout_is_rejected():
    with pytest.raises(ValueError, match="attention_backend='flash'"):
        tiny_config(attention_backend="flash", dropout=0.1)


def test_sliding_window_limits_what_a_token_sees():
    torch.manual_seed(0)
    model = GPT(tiny_config(sliding_window=3, n_layers=1)).eval()
    tokens = torch.randint(0, 37, (1, 10))
    changed = tokens.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 37

    difference = (model(tokens).logits - model(changed).logits).abs().amax(dim=-1)[0]

    # With one layer, position 4 sees positions 2..4 and position 5 sees 3..5.
    assert difference[4] > 1e-6
    assert difference[5] == 0


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(dropout=float("nan")), "dropout=nan"),
        (dict(norm_eps=float("inf")), "norm_eps=inf"),
        (dict(init_std=float("nan")), "init_std=nan"),
        (dict(bias=1), "bias=1"),
        (dict(sliding_window=0), "sliding_window=0"),
    ],
)
def test_nonsense_config_values_name_field(overrides, field):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    assert field in str(error.value)


def test_from_preset_takes_only_preset_names(tmp_path):
    config_file = tmp_path / "gpt-tiny.yaml"
    config_file.write_text("model:\n  family: gpt\n", encoding="utf-8")

    with pytest.raises(ValueError, match="Unknown preset"):
        GPTConfig.from_preset(str(config_file))


def test_float_token_ids_are_rejected():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 4))


def test_logits_to_keep_slices_full_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=37, max_seq_len=16, d_model=32, n_layers=2, n_heads=4)).eval()
    input_ids = torch.randint(0, 37, (3, 9))
    with torch.no_grad():
        full = model(input_ids).logits
        for keep in (1, 4, 9):
            last_logits = model(input_ids, logits_to_keep=keep).logits
            assert last_logits.shape == (3, keep, 37)
            torch.testing.assert_close(last_logits, full[:, -keep:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_invalid_logits_to_keep_is_named(value):
    model = GPT(GPTConfig(vocab_size=37, max_seq_len=16, d_model=32, n_layers=1, n_heads=4))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(torch.zeros(1, 4, dtype=torch.long), logits_to_keep=value)


def test_logits_to_keep_with_targets_raises():
    model = GPT(GPTConfig(vocab_size=37, max_seq_len=16, d_model=32, n_layers=1, n_heads=4))
    input_ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="logits_to_keep must be 0 when targets"):
        model(input_ids, targets=input_ids, logits_to_keep=1)


def test_monte_carlo_dropout_in_eval():
    """model.eval() with only the Dropout modules switched back to train mode still drops (MC dropout)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=37, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, dropout=0.5)).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module is not model.embed_dropout:
            module.train()
    input_ids = torch.randint(0, 37, (1, 6))

    with torch.no_grad():
        torch.manual_seed(1)
        first = model(input_ids).logits
        torch.manual_seed(2)
        second = model(input_ids).logits
        model.eval()
        deterministic = model(input_ids).logits

    assert not torch.allclose(first, second)
    assert torch.equal(deterministic, model(input_ids).logits.detach())


@pytest.mark.parametrize("value", [np.int64(2), torch.tensor(2)])
def test_logits_to_keep_takes_integer_types(value):
    model = GPT(GPTConfig(vocab_size=37, max_seq_len=16, d_model=32, n_layers=1, n_heads=4))

    logits = model(torch.zeros(1, 4, dtype=torch.long), logits_to_keep=value).logits

    assert logits.shape == (1, 2, 37)


def test_logits_to_keep_above_length_keeps_all():
    model = GPT(GPTConfig(vocab_size=37, max_seq_len=16, d_model=32, n_layers=1, n_heads=4))

    logits = model(torch.zeros(1, 4, dtype=torch.long), logits_to_keep=9).logits

    assert logits.shape == (1, 4, 37)
