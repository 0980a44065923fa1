"""Parity of minformer's T5 with Hugging Face ``transformers`` T5, through ``from_hf`` and ``to_hf``.

Every reference model is built locally from a small ``T5Config``, so nothing is downloaded.
Each of its parameters, RMSNorm weights and relative bias tables included, is redrawn from a
seeded normal distribution. Comparisons cover non-padding positions only, in fp32 and eval mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from minformer import from_hf, to_hf  # noqa: E402
from minformer.generation_seq2seq import generate_seq2seq  # noqa: E402
from minformer.interop import config_from_hf  # noqa: E402
from minformer.models.t5 import T5, T5Config  # noqa: E402

VOCAB_SIZE = 53
SMALL_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    d_model=32,
    d_kv=12,  # d_kv * num_heads != d_model, as T5 allows
    d_ff=40,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    decoder_start_token_id=0,
)
V1_0 = dict(feed_forward_proj="relu", tie_word_embeddings=True)
V1_1 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def redraw_parameters(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter: norm weights ~ 1 + N(0, 0.1), everything else ~ N(0, 0.2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            is_norm_weight = "layer_norm" in name or "norm.weight" in name
            parameter.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.2 * noise)


def build_hf_t5(version: dict, seed: int = 0, **overrides):
    """A small randomised ``T5ForConditionalGeneration`` from ``transformers``, in eval mode."""
    config = transformers.T5Config(**{**SMALL_CONFIG, **version, **overrides})
    model = transformers.T5ForConditionalGeneration(config).eval()
    redraw_parameters(model, seed)
    return model


def save_hf(model, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def padded_batch(seed: int = 1):
    """Sources (2, 30) with 30 and 19 real tokens; targets (2, 25) with 17 and 25 real tokens (right padding)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB_SIZE, (2, 30), generator=generator)
    attention_mask = torch.ones(2, 30, dtype=torch.long)
    attention_mask[1, 19:] = 0
    decoder_input_ids = torch.randint(2, VOCAB_SIZE, (2, 25), generator=generator)
    decoder_input_ids[:, 0] = 0
    decoder_attention_mask = torch.ones(2, 25, dtype=torch.long)
    decoder_attention_mask[0, 17:] = 0
    return (
        input_ids.masked_fill(attention_mask == 0, 0),
        attention_mask,
        decoder_input_ids.masked_fill(decoder_attention_mask == 0, 0),
        decoder_attention_mask,
    )


def assert_values_equal(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def real(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The (n_real, ...) rows of a (batch, seq, ...) tensor at non-padding positions."""
    return tensor[mask.bool()]


def run_both(reference, model, batch):
    input_ids, attention_mask, decoder_input_ids, decoder_attention_mask = batch
    with torch.no_grad():
        expected = reference(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
        )
        actual = model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
    return expected, actual


# ---- from_hf: parity --------------------------------------------------------------------------


@pytest.mark.parametrize("version, activation", [(V1_0, "relu"), (V1_1, "geglu_tanh")], ids=["v1.0", "v1.1"])
def test_t5_encoder_states_and_logits_match(tmp_path, version, activation):
    reference = build_hf_t5(version, seed=0)
    model = from_hf(save_hf(reference, tmp_path))
    batch = padded_batch()
    _, attention_mask, _, decoder_attention_mask = batch

    expected, actual = run_both(reference, model, batch)

    assert type(model) is T5
    assert not model.training
    assert model.config.activation == activation
    assert model.config.tie_embeddings is version["tie_word_embeddings"]
    assert_values_equal(
        real(actual.encoder_hidden_states, attention_mask), real(expected.encoder_last_hidden_state, attention_mask)
    )
    assert_values_equal(real(actual.logits, decoder_attention_mask), real(expected.logits, decoder_attention_mask))


def test_t5_loss_matches_with_labels(tmp_path):
    reference = build_hf_t5(V1_1, seed=3)
    model = from_hf(save_hf(reference, tmp_path))
    input_ids, attention_mask, _, _ = padded_batch(seed=3)
    labels = torch.randint(2, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(4))
    labels[1, 8:] = -100

    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        actual = model(input_ids, attention_mask, labels=labels)

    assert_values_equal(actual.logits[labels != -100], expected.logits[labels != -100])
    assert_values_equal(actual.loss, expected.loss)


def test_missing_rescale_changes_logits(tmp_path):
    """Negative twin: a v1.0 checkpoint read as v1.1 (no d_model^-0.5 before the tied head) is detected."""
    reference = build_hf_t5(V1_0, seed=0)
    directory = save_hf(reference, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["scale_decoder_outputs"] = False
    (directory / "config.json").write_text(json.dumps(config))
    model = from_hf(directory)
    batch = padded_batch()

    expected, actual = run_both(reference, model, batch)

    mask = batch[3].bool()
    assert not torch.allclose(actual.logits[mask], expected.logits[mask], atol=1e-3, rtol=1e-3)


def test_scaled_scores_change_logits(tmp_path):
    """Negative twin: attention scores scaled by 1/sqrt(d_head), which T5 omits, are detected."""
    reference = build_hf_t5(V1_0, seed=0)
    model = from_hf(save_hf(reference, tmp_path))
    for module in model.modules():
        if hasattr(module, "scale") and hasattr(module, "q_proj"):
            module.scale = None
    batch = padded_batch()

    expected, actual = run_both(reference, model, batch)

    mask = batch[3].bool()
    assert not torch.allclose(actual.logits[mask], expected.logits[mask], atol=1e-3, rtol=1e-3)


def test_exact_gelu_in_gate_changes_logits(tmp_path):
    """Negative twin: the erf GELU in place of T5 v1.1's tanh GELU is detected."""
    reference = build_hf_t5(V1_1, seed=0)
    model = from_hf(save_hf(reference, tmp_path))
    exact = T5(T5Config(**{**model.config.__dict__, "activation": "geglu"}))
    exact.load_state_dict(model.state_dict())
    batch = padded_batch()

    expected, actual = run_both(reference, exact.eval(), batch)

    mask = batch[3].bool()
    assert not torch.allclose(actual.logits[mask], expected.logits[mask], atol=1e-5, rtol=1e-5)


# ---- from_hf: names and options ---------------------------------------------------------------


def test_config_from_hf_translates_names(tmp_path):
    directory = save_hf(build_hf_t5(V1_1), tmp_path)
    config = config_from_hf(directory)

    assert isinstance(config, T5Config)
    assert (config.d_model, config.d_head, config.d_ff, config.n_heads) == (32, 12, 40, 3)
    assert (config.n_encoder_layers, config.n_decoder_layers) == (2, 3)
    assert (config.t5_num_buckets, config.t5_max_distance) == (8, 20)
    assert (config.pad_token_id, config.decoder_start_token_id, config.eos_token_id) == (0, 0, 1)


def test_old_untied_checkpoint_loads_its_head(tmp_path):
    """A v1.1 checkpoint as transformers 4.x wrote it: tie_word_embeddings false and its own lm_head.weight."""
    reference = build_hf_t5(V1_1, seed=5)
    directory = save_hf(reference, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["tie_word_embeddings"] = False
    config.pop("scale_decoder_outputs", None)
    (directory / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(directory / "model.safetensors"))
    head = torch.randn(tensors["shared.weight"].shape, generator=torch.Generator().manual_seed(6))
    tensors["lm_head.weight"] = head
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})

    model = from_hf(directory)

    assert model.config.tie_embeddings is False
    assert torch.equal(model.lm_head.weight, head)
    assert not torch.equal(model.shared.weight, head)


@pytest.mark.parametrize("key, value", [("feed_forward_proj", "gated-mish"), ("feed_forward_proj", "mish")])
def test_options_without_equivalent_raise(tmp_path, key, value):
    directory = save_hf(build_hf_t5(V1_0), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config[key] = value
    (directory / "config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match=key):
        from_hf(directory)


def test_missing_tensor_is_named(tmp_path):
    directory = save_hf(build_hf_t5(V1_0), tmp_path)
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["decoder.block.2.layer.1.EncDecAttention.k.weight"]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})

    with pytest.raises(ValueError, match="decoder.block.2.layer.1.EncDecAttention.k.weight"):
        from_hf(directory)


# ---- to_hf: round trip through transformers ----------------------------------------------------


def tiny_config(**overrides) -> T5Config:
    values = dict(
        vocab_size=VOCAB_SIZE, d_model=32, n_encoder_layers=2, n_decoder_layers=3, n_heads=3, d_head=12, d_ff=40,
        t5_num_buckets=8, t5_max_distance=20, dropout=0.0,
    )
    return T5Config(**{**values, **overrides})


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    redraw_parameters(model, seed)
    return model.eval()


@pytest.mark.parametrize(
    "overrides", [dict(activation="relu", tie_embeddings=True), dict(activation="geglu_tanh", tie_embeddings=False)],
    ids=["v1.0", "v1.1"],
)
def test_to_hf_round_trip_loads_in_transformers(tmp_path, overrides):
    model = randomised(T5(tiny_config(**overrides)), seed=8)
    to_hf(model, tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    reference = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    reloaded = from_hf(tmp_path)
    batch = padded_batch(seed=9)
    mask = batch[3].bool()

    expected, actual = run_both(reference, model, batch)
    with torch.no_grad():
        again = reloaded(*batch)

    assert reloaded.config == model.config
    assert_values_equal(actual.logits[mask], expected.logits[mask])
    assert_values_equal(again.logits, actual.logits)


def test_to_hf_rejects_layernorm(tmp_path):
    with pytest.raises(ValueError, match="norm='layernorm'"):
        to_hf(T5(tiny_config(norm="layernorm")), tmp_path)


# ---- generation --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [V1_0, V1_1], ids=["v1.0", "v1.1"])
def test_greedy_tokens_match_transformers_generate(tmp_path, version):
    # Equal stack depths: transformers 5.25's generate sizes its decoder cache by num_layers and
    # fails with IndexError when num_decoder_layers is larger.
    reference = build_hf_t5(version, seed=11, num_decoder_layers=2)
    model = from_hf(save_hf(reference, tmp_path))
    input_ids, attention_mask, _, _ = padded_batch(seed=12)
    max_new_tokens = 12

    with torch.no_grad():
        expected = reference.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        )
    actual = generate_seq2seq(model, input_ids, attention_mask, max_new_tokens, stop_at_eos=False)

    # Near-ties could let rounding pick a different token, so every chosen token must lead clearly.
    with torch.no_grad():
        logits = model(input_ids, attention_mask, decoder_input_ids=actual[:, :-1]).logits
    top_two = logits.topk(2, dim=-1).values
    assert bool((top_two[..., 0] - top_two[..., 1] > 1e-3).all())
    assert torch.equal(actual, expected)
