"""Specification of ``minformer.models.bert``: configs, presets, padding masks and input checks."""

from __future__ import annotations

import pytest
import torch

from minformer.models import FAMILIES, build_model, config_from_dict
from minformer.models.bert import BERT, BERTConfig, BERTForMaskedLM, BERTForSequenceClassification


def tiny_config(**overrides) -> BERTConfig:
    values = dict(vocab_size=53, max_seq_len=24, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, n_labels=3)
    return BERTConfig(**{**values, **overrides})


def seeded(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return model.eval()


def test_presets_have_published_shapes():
    shapes = {
        "bert-base": (12, 768, 12, 3072),
        "bert-large": (24, 1024, 16, 4096),
        "bert-tiny": (2, 128, 2, 512),
        "bert-mini": (4, 256, 4, 1024),
    }
    for name, shape in shapes.items():
        config = BERTConfig.from_preset(name, vocab_size=30522)
        assert (config.n_layers, config.d_model, config.n_heads, config.d_ff) == shape, name
        assert (config.vocab_size, config.max_seq_len) == (30522, 512), name
        assert (config.activation, config.norm_eps, config.norm_position) == ("gelu", 1e-12, "post"), name


def test_bert_base_parameter_count_matches_paper():
    # 109,482,240 is the parameter count of transformers' BertModel(BertConfig()), pooler included.
    assert BERT(BERTConfig.from_preset("bert-base")).num_parameters() == 109_482_240


def test_mini_preset_needs_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        BERTConfig.from_preset("bert-mini")


def test_family_registry_builds_masked_lm():
    config = config_from_dict(tiny_config().to_dict())
    assert FAMILIES["bert"][0] is BERTConfig
    assert config == tiny_config()
    assert isinstance(build_model(config), BERTForMaskedLM)


@pytest.mark.parametrize(
    "field, value",
    [("norm_position", "pre"), ("position", "rope"), ("activation", "swiglu"), ("pad_token_id", 53), ("dropout", 1.0)],
)
def test_invalid_config_field_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_padding_never_changes_real_token_outputs():
    model = seeded(BERTForSequenceClassification(tiny_config()))
    generator = torch.Generator().manual_seed(1)
    real_ids = torch.randint(1, 53, (1, 9), generator=generator)
    padded_ids = torch.cat([real_ids, torch.randint(1, 53, (1, 6), generator=generator)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 6)], dim=1).long()

    with torch.no_grad():
        alone = model(real_ids)
        padded = model(padded_ids, attention_mask=mask)

    torch.testing.assert_close(padded.hidden_states[:, :9], alone.hidden_states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.logits, alone.logits, atol=1e-5, rtol=1e-5)


def test_unmasked_extra_tokens_do_change_outputs():
    """Negative twin: without the mask, the same extra tokens are attended to and change every output."""
    model = seeded(BERT(tiny_config()))
    generator = torch.Generator().manual_seed(1)
    real_ids = torch.randint(1, 53, (1, 9), generator=generator)
    padded_ids = torch.cat([real_ids, torch.randint(1, 53, (1, 6), generator=generator)], dim=1)

    with torch.no_grad():
        alone = model(real_ids).hidden_states
        unmasked = model(padded_ids).hidden_states[:, :9]

    assert not torch.allclose(alone, unmasked, atol=1e-4)


def test_token_types_change_outputs():
    model = seeded(BERT(tiny_config()))
    input_ids = torch.randint(0, 53, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        segment_a = model(input_ids).hidden_states
        segment_b = model(input_ids, token_type_ids=torch.ones_like(input_ids)).hidden_states
    assert not torch.allclose(segment_a, segment_b, atol=1e-4)


def test_dropout_inert_in_eval_and_active_in_training():
    model = BERTForMaskedLM(tiny_config(dropout=0.3))
    input_ids = torch.randint(0, 53, (2, 7), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        first, second = model(input_ids).logits, model(input_ids).logits
    assert torch.equal(first, second)
    model.train()
    with torch.no_grad():
        first, second = model(input_ids).logits, model(input_ids).logits
    assert not torch.equal(first, second)


def test_masked_lm_decoder_is_tied_to_word_embeddings():
    model = BERTForMaskedLM(tiny_config())
    word_embedding = model.bert.embeddings.word_embedding.weight
    hidden = torch.randn(1, 3, 32)
    with torch.no_grad():
        word_embedding.mul_(2.0)
        logits = model.mlm_head(hidden, word_embedding)
        expected = model.mlm_head.norm(model.mlm_head.act(model.mlm_head.dense(hidden))) @ word_embedding.t()
    torch.testing.assert_close(logits, expected + model.mlm_head.bias)
    assert model.num_parameters() == sum(parameter.numel() for parameter in model.parameters())


def test_masked_lm_loss_ignores_unlabelled_positions():
    model = seeded(BERTForMaskedLM(tiny_config()))
    input_ids = torch.randint(0, 53, (2, 7), generator=torch.Generator().manual_seed(4))
    targets = torch.full_like(input_ids, -100)
    targets[0, 2] = 5
    output = model(input_ids, targets=targets)
    expected = torch.nn.functional.cross_entropy(output.logits[0, 2:3], torch.tensor([5]))
    torch.testing.assert_close(output.loss, expected)


def test_padding_row_of_word_embedding_starts_at_zero():
    model = BERT(tiny_config(pad_token_id=4))
    assert torch.count_nonzero(model.embeddings.word_embedding.weight[4]) == 0
    assert torch.count_nonzero(model.embeddings.word_embedding.weight[3]) > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.tensor([[1, 53]])), "Token id 53"),
        (dict(input_ids=torch.tensor([[-1, 2]])), "Token id -1"),
        (dict(input_ids=torch.ones(1, 25, dtype=torch.long)), "max_seq_len=24"),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4)), "attention_mask has shape"),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), token_type_ids=torch.ones(5, dtype=torch.long)), "token_type_ids"),
        (dict(input_ids=torch.ones(1, 5, dtype=torch.long), token_type_ids=torch.full((1, 5), 2)), "type_vocab_size=2"),
        (dict(input_ids=torch.ones(5, dtype=torch.long)), r"\(batch, seq\)"),
    ],
)
def test_bad_inputs_raise_named_value_error(kwargs, message):
    model = BERT(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_classification_labels_out_of_range_raise():
    model = BERTForSequenceClassification(tiny_config())
    with pytest.raises(ValueError, match="n_labels=3"):
        model(torch.ones(2, 4, dtype=torch.long), labels=torch.tensor([0, 3]))


def test_inference_skips_padding_same_outputs():
    """Without gradients every layer but attention runs on the real tokens only; real positions must not change."""
    config = BERTConfig(vocab_size=50, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0)
    torch.manual_seed(0)
    model = BERT(config).eval()
    input_ids = torch.randint(1, 50, (3, 16))
    attention_mask = torch.ones(3, 16, dtype=torch.long)
    attention_mask[1, 10:] = 0
    attention_mask[2, 3:] = 0
    real = attention_mask.bool()

    with torch.enable_grad():
        full = model(input_ids, attention_mask=attention_mask).hidden_states.detach()
    with torch.inference_mode():
        packed = model(input_ids, attention_mask=attention_mask).hidden_states

    torch.testing.assert_close(packed[real], full[real], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(packed).all()


def test_inference_skips_padding_same_attentions():
    config = BERTConfig(vocab_size=50, max_seq_len=12, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0,
                        attention_backend="naive")
    torch.manual_seed(0)
    model = BERT(config).eval()
    input_ids = torch.randint(1, 50, (2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, 7:] = 0

    with torch.enable_grad():
        full = model(input_ids, attention_mask=attention_mask, return_attentions=True).attentions
    with torch.inference_mode():
        packed = model(input_ids, attention_mask=attention_mask, return_attentions=True).attentions

    real_rows = attention_mask.bool()[:, None, :, None]  # (batch, 1, query, 1)
    for full_layer, packed_layer in zip(full, packed):
        assert packed_layer.shape == full_layer.shape
        torch.testing.assert_close(packed_layer * real_rows, full_layer.detach() * real_rows, rtol=1e-5, atol=1e-6)


def test_forward_packed_rejects_cross_attention_block():
    from minformer.blocks import TransformerBlock
    from minformer.models.t5 import T5Config

    block = TransformerBlock(T5Config(vocab_size=10, d_model=16, n_heads=2, d_head=8, d_ff=32).block_config(decoder=True))

    with pytest.raises(ValueError, match="dense feed-forward only"):
        block.forward_packed(torch.zeros(3, 16), torch.arange(3), (1, 3), None)
