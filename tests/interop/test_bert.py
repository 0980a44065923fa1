"""Parity of minformer's BERT with Hugging Face ``transformers`` BERT, through ``from_hf`` and ``to_hf``.

Every reference model is built locally from a small ``BertConfig``, so nothing is downloaded.
Each of its parameters, biases and LayerNorm weights included, is redrawn from a seeded normal
distribution, so a swapped bias, a wrong epsilon or the wrong GELU changes the outputs.
Comparisons cover non-padding positions only, in fp32 and eval mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from minformer import from_hf, to_hf  # noqa: E402
from minformer.interop import config_from_hf  # noqa: E402
from minformer.models.bert import BERT, BERTConfig, BERTForMaskedLM, BERTForSequenceClassification  # noqa: E402

SMALL_CONFIG = dict(
    vocab_size=97,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=80,
    max_position_embeddings=40,
    type_vocab_size=3,
    layer_norm_eps=1e-6,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    pad_token_id=0,
)


def redraw_parameters(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter: norm weights ~ 1 + N(0, 0.1), everything else (biases too) ~ N(0, 0.2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            is_norm_weight = "LayerNorm" in name and name.endswith("weight")
            parameter.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.2 * noise)


def build_hf_bert(model_class, seed: int = 0, **overrides):
    """A small randomised BERT of ``model_class`` from ``transformers``, in eval mode."""
    config = transformers.BertConfig(**{**SMALL_CONFIG, **overrides})
    model = model_class(config).eval()
    redraw_parameters(model, seed)
    return model


def save_hf(model, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def padded_batch(seed: int = 1, vocab_size: int = 97, type_vocab_size: int = 3):
    """Three rows of length 17 with 17, 11 and 4 real tokens: (input_ids, attention_mask, token_type_ids)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [17, 11, 4]
    input_ids = torch.randint(1, vocab_size, (3, 17), generator=generator)
    attention_mask = torch.zeros(3, 17, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    token_type_ids = torch.randint(0, type_vocab_size, (3, 17), generator=generator) * attention_mask
    return input_ids, attention_mask, token_type_ids


def assert_values_equal(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def real(tensor: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The (n_real, ...) rows of a (batch, seq, ...) tensor at non-padding positions."""
    return tensor[attention_mask.bool()]


# ---- from_hf: parity --------------------------------------------------------------------------


def test_bert_model_hidden_states_and_pooled_match(tmp_path):
    reference = build_hf_bert(transformers.BertModel, seed=0)
    model = from_hf(save_hf(reference, tmp_path))
    input_ids, attention_mask, token_type_ids = padded_batch()

    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        actual = model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    assert type(model) is BERT
    assert not model.training
    assert_values_equal(real(actual.hidden_states, attention_mask), real(expected.last_hidden_state, attention_mask))
    assert_values_equal(actual.pooled_output, expected.pooler_output)


def test_bert_masked_lm_logits_match(tmp_path):
    reference = build_hf_bert(transformers.BertForMaskedLM, seed=1)
    model = from_hf(save_hf(reference, tmp_path))
    input_ids, attention_mask, token_type_ids = padded_batch(seed=2)

    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
        actual = model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    assert type(model) is BERTForMaskedLM
    assert_values_equal(real(actual, attention_mask), real(expected, attention_mask))


def test_bert_sequence_classification_logits_match(tmp_path):
    reference = build_hf_bert(transformers.BertForSequenceClassification, seed=2, num_labels=5)
    model = from_hf(save_hf(reference, tmp_path))
    input_ids, attention_mask, token_type_ids = padded_batch(seed=3)

    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
        actual = model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    assert type(model) is BERTForSequenceClassification
    assert model.config.n_labels == 5
    assert_values_equal(actual, expected)


def test_bert_tanh_gelu_config_matches(tmp_path):
    reference = build_hf_bert(transformers.BertModel, seed=4, hidden_act="gelu_new")
    model = from_hf(save_hf(reference, tmp_path))
    input_ids, attention_mask, token_type_ids = padded_batch(seed=4)

    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        actual = model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    assert model.config.activation == "gelu_tanh"
    assert_values_equal(real(actual.hidden_states, attention_mask), real(expected.last_hidden_state, attention_mask))


def test_wrong_gelu_changes_outputs(tmp_path):
    """Negative twin of the parity tests: the tanh GELU in place of the exact one is detected."""
    reference = build_hf_bert(transformers.BertModel, seed=0)
    directory = save_hf(reference, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["hidden_act"] = "gelu_new"
    (directory / "config.json").write_text(json.dumps(config))
    model = from_hf(directory)
    input_ids, attention_mask, token_type_ids = padded_batch()

    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        actual = model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).hidden_states

    assert not torch.allclose(real(actual, attention_mask), real(expected, attention_mask), atol=1e-5, rtol=1e-5)


# ---- from_hf: names and options ---------------------------------------------------------------


def rewrite_tensor_names(directory: Path, rename) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    save_file({rename(name): tensor for name, tensor in tensors.items()}, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_legacy_gamma_beta_names_load(tmp_path):
    reference = build_hf_bert(transformers.BertForMaskedLM, seed=5)
    directory = save_hf(reference, tmp_path)
    rewrite_tensor_names(
        directory, lambda name: name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
    )
    assert any(name.endswith("LayerNorm.gamma") for name in load_file(str(directory / "model.safetensors")))
    model = from_hf(directory)
    input_ids, attention_mask, token_type_ids = padded_batch(seed=5)

    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
        actual = model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    assert_values_equal(real(actual, attention_mask), real(expected, attention_mask))


def test_prefixed_encoder_names_load(tmp_path):
    reference = build_hf_bert(transformers.BertModel, seed=6)
    directory = save_hf(reference, tmp_path)
    rewrite_tensor_names(directory, lambda name: "bert." + name)
    model = from_hf(directory)
    input_ids, attention_mask, _ = padded_batch(seed=6)

    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).pooler_output
        actual = model(input_ids, attention_mask=attention_mask).pooled_output

    assert_values_equal(actual, expected)


def test_masked_lm_names_without_prefix_load(tmp_path):
    reference = build_hf_bert(transformers.BertForMaskedLM, seed=7)
    directory = save_hf(reference, tmp_path)
    rewrite_tensor_names(directory, lambda name: name.removeprefix("bert."))
    model = from_hf(directory)
    input_ids, attention_mask, _ = padded_batch(seed=7)

    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).logits
        actual = model(input_ids, attention_mask=attention_mask).logits

    assert_values_equal(real(actual, attention_mask), real(expected, attention_mask))


def test_config_from_hf_translates_names(tmp_path):
    directory = save_hf(build_hf_bert(transformers.BertModel), tmp_path)
    config = config_from_hf(directory)

    assert isinstance(config, BERTConfig)
    assert (config.d_model, config.n_layers, config.n_heads, config.d_ff) == (48, 2, 4, 80)
    assert (config.max_seq_len, config.type_vocab_size, config.norm_eps) == (40, 3, 1e-6)


@pytest.mark.parametrize(
    "key, value",
    [
        ("position_embedding_type", "relative_key"),
        ("is_decoder", True),
        ("add_cross_attention", True),
        ("hidden_act", "mish"),
        ("attention_probs_dropout_prob", 0.3),
    ],
)
def test_options_without_equivalent_raise(tmp_path, key, value):
    directory = save_hf(build_hf_bert(transformers.BertModel), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config[key] = value
    (directory / "config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match=key):
        from_hf(directory)


def test_missing_tensor_is_named(tmp_path):
    directory = save_hf(build_hf_bert(transformers.BertModel), tmp_path)
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["encoder.layer.1.output.dense.bias"]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})

    with pytest.raises(ValueError, match="encoder.layer.1.output.dense.bias"):
        from_hf(directory)


def test_misfit_checkpoint_names_tensor(tmp_path):
    # The weights stay as saved; config.json now claims a wider feed-forward than they have.
    directory = save_hf(build_hf_bert(transformers.BertModel), tmp_path)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    config["intermediate_size"] += 8
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")

    with pytest.raises(ValueError, match=r"intermediate\.dense\.weight has shape"):
        from_hf(directory)


# ---- to_hf: round trip through transformers ----------------------------------------------------


def tiny_config(**overrides) -> BERTConfig:
    values = dict(
        vocab_size=97, max_seq_len=40, d_model=48, n_layers=2, n_heads=4, d_ff=80, type_vocab_size=3,
        norm_eps=1e-6, dropout=0.0, n_labels=3,
    )
    return BERTConfig(**{**values, **overrides})


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.1 * noise if "norm.weight" in name else 0.2 * noise)
    return model.eval()


@pytest.mark.parametrize(
    "our_class, hf_class",
    [
        (BERT, "BertModel"),
        (BERTForMaskedLM, "BertForMaskedLM"),
        (BERTForSequenceClassification, "BertForSequenceClassification"),
    ],
)
def test_to_hf_round_trip_loads_in_transformers(tmp_path, our_class, hf_class):
    model = randomised(our_class(tiny_config()), seed=8)
    to_hf(model, tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    reference = getattr(transformers, hf_class).from_pretrained(tmp_path).eval()
    reloaded = from_hf(tmp_path)
    input_ids, attention_mask, token_type_ids = padded_batch(seed=9)

    with torch.no_grad():
        ours = model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        theirs = reference(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        again = reloaded(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    assert type(reloaded) is our_class
    if our_class is BERT:
        assert_values_equal(real(ours.hidden_states, attention_mask), real(theirs.last_hidden_state, attention_mask))
        assert_values_equal(ours.pooled_output, theirs.pooler_output)
        assert_values_equal(again.pooled_output, ours.pooled_output)
    elif our_class is BERTForMaskedLM:
        assert_values_equal(real(ours.logits, attention_mask), real(theirs.logits, attention_mask))
        assert_values_equal(again.logits, ours.logits)
    else:
        assert_values_equal(ours.logits, theirs.logits)
        assert_values_equal(again.logits, ours.logits)


def test_to_hf_rejects_rmsnorm(tmp_path):
    with pytest.raises(ValueError, match="norm='rmsnorm'"):
        to_hf(BERTForMaskedLM(tiny_config(norm="rmsnorm")), tmp_path)


def test_to_hf_rejects_bert_without_pooler(tmp_path):
    with pytest.raises(ValueError, match="pooler"):
        to_hf(BERT(tiny_config(), with_pooler=False), tmp_path)
