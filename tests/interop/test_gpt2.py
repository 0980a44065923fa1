"""Parity of minformer's GPT with Hugging Face ``transformers`` GPT-2, through ``from_hf`` and ``to_hf``.

Every reference model is built locally from a ``GPT2Config``, so nothing is downloaded. Each of
its parameters, biases and layer-norm weights included, is redrawn from a seeded normal
distribution, so a swapped bias, a wrong epsilon or the wrong GELU changes the logits.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from minformer import GPT, GPTConfig, from_hf, to_hf  # noqa: E402
from minformer.generation import generate  # noqa: E402
from minformer.interop import config_from_hf, gpt2_config_from_hf  # noqa: E402

SMALL_CONFIG = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=101)
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def redraw_parameters(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter: norm weights ~ 1 + N(0, 0.1), everything else (biases too) ~ N(0, 0.2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            is_norm_weight = name.endswith("weight") and parameter.dim() == 1
            parameter.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.2 * noise)


def build_hf_gpt2(seed: int = 0, model_class=None, **overrides):
    """A small randomised GPT-2 from ``transformers``, in eval mode."""
    config = transformers.GPT2Config(**{**SMALL_CONFIG, **NO_DROPOUT, **NO_SPECIAL_TOKENS, **overrides})
    model = (model_class or transformers.GPT2LMHeadModel)(config).eval()
    redraw_parameters(model, seed)
    return model


def save_hf(model, directory: Path, **options) -> Path:
    model.save_pretrained(directory, safe_serialization=True, **options)
    return directory


def random_ids(batch: int, seq: int, seed: int = 1, vocab_size: int = 101) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, input_ids, attention_mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, attention_mask=attention_mask).logits


def our_logits(model, input_ids, attention_mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, attention_mask=attention_mask).logits


def assert_values_equal(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# ---- from_hf: logits parity -------------------------------------------------------------------


def test_from_hf_logits_match_without_mask(tmp_path):
    reference = build_hf_gpt2(seed=0)
    model = from_hf(save_hf(reference, tmp_path))
    input_ids = random_ids(3, 20)

    assert isinstance(model, GPT)
    assert not model.training
    assert_values_equal(our_logits(model, input_ids), hf_logits(reference, input_ids))


def test_from_hf_logits_match_with_right_padding(tmp_path):
    reference = build_hf_gpt2(seed=1)
    model = from_hf(save_hf(reference, tmp_path))
    input_ids = random_ids(3, 16)
    lengths = torch.tensor([16, 11, 5])
    attention_mask = (torch.arange(16)[None, :] < lengths[:, None]).long()  # (batch, seq), right padding

    ours = our_logits(model, input_ids, attention_mask)
    theirs = hf_logits(reference, input_ids, attention_mask)
    real_tokens = attention_mask.bool()
    assert_values_equal(ours[real_tokens], theirs[real_tokens])


@pytest.mark.parametrize("activation_function", ["gelu_new", "gelu", "relu"])
def test_from_hf_matches_activation_and_epsilon(tmp_path, activation_function):
    reference = build_hf_gpt2(seed=2, activation_function=activation_function, layer_norm_epsilon=1e-3, n_inner=96)
    model = from_hf(save_hf(reference, tmp_path))
    input_ids = random_ids(2, 24)

    assert model.config.norm_eps == 1e-3
    assert model.config.d_ff == 96
    assert_values_equal(our_logits(model, input_ids), hf_logits(reference, input_ids))


def with_config(model: GPT, **changes) -> GPT:
    """The same weights in a GPT whose config differs by ``changes``."""
    changed = GPT(dataclasses.replace(model.config, **changes)).eval()
    changed.load_state_dict(model.state_dict())
    return changed


def test_wrong_activation_or_epsilon_changes_logits(tmp_path):
    # Negative twin of the parity tests: each mapping has to be right for them to pass.
    reference = build_hf_gpt2(seed=2, activation_function="gelu_new", layer_norm_epsilon=1e-3)
    model = from_hf(save_hf(reference, tmp_path))
    input_ids = random_ids(2, 24)
    expected = hf_logits(reference, input_ids)

    exact_gelu = our_logits(with_config(model, activation="gelu"), input_ids)
    default_epsilon = our_logits(with_config(model, norm_eps=1e-5), input_ids)
    # Ten times the parity tolerance (atol=1e-5), so the parity tests would catch either mistake.
    assert (exact_gelu - expected).abs().max() > 1e-4
    assert (default_epsilon - expected).abs().max() > 1e-4


def test_from_hf_reads_gpt2model_without_prefix(tmp_path):
    reference = build_hf_gpt2(seed=3, model_class=transformers.GPT2Model)
    model = from_hf(save_hf(reference, tmp_path))
    input_ids = random_ids(2, 12)
    with torch.no_grad():
        hidden = reference(input_ids).last_hidden_state
    expected = hidden @ reference.wte.weight.T  # GPT2Model has no head; GPT-2's head is tied to wte

    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["GPT2Model"]
    assert_values_equal(our_logits(model, input_ids), expected)


def test_from_hf_reads_untied_output_layer(tmp_path):
    reference = build_hf_gpt2(seed=4, tie_word_embeddings=False)
    model = from_hf(save_hf(reference, tmp_path))
    input_ids = random_ids(2, 12)

    assert not model.config.tie_embeddings
    assert not torch.equal(model.lm_head.weight, model.token_embedding.weight)
    assert_values_equal(our_logits(model, input_ids), hf_logits(reference, input_ids))


def test_from_hf_reads_sharded_safetensors(tmp_path):
    reference = build_hf_gpt2(seed=5)
    save_hf(reference, tmp_path, max_shard_size="100KB")
    input_ids = random_ids(2, 12)

    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_values_equal(our_logits(from_hf(tmp_path), input_ids), hf_logits(reference, input_ids))


def test_from_hf_reads_pytorch_model_bin(tmp_path):
    reference = build_hf_gpt2(seed=6)
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    input_ids = random_ids(2, 12)

    assert_values_equal(our_logits(from_hf(tmp_path), input_ids), hf_logits(reference, input_ids))


class NotATensor:
    """A pickled object that ``weights_only`` loading must reject."""


def test_from_hf_rejects_pickled_objects(tmp_path):
    reference = build_hf_gpt2(seed=6)
    reference.config.save_pretrained(tmp_path)
    torch.save({"wte.weight": NotATensor()}, tmp_path / "pytorch_model.bin")

    with pytest.raises(ValueError, match="weights_only"):
        from_hf(tmp_path)


# ---- to_hf ------------------------------------------------------------------------------------


def build_our_gpt(seed: int = 7, **overrides) -> GPT:
    config = GPTConfig(vocab_size=101, max_seq_len=64, d_model=64, n_layers=2, n_heads=4, **overrides)
    model = GPT(config).eval()
    redraw_parameters(model, seed)
    return model


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_to_hf_loads_in_transformers_with_same_logits(tmp_path, tie_embeddings):
    model = build_our_gpt(tie_embeddings=tie_embeddings, activation="gelu_tanh", norm_eps=1e-4)
    assert to_hf(model, tmp_path) == tmp_path

    reference, loading_info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    reference.eval()
    input_ids = random_ids(2, 20)

    assert not loading_info["missing_keys"]
    assert not loading_info["unexpected_keys"]
    assert not loading_info["mismatched_keys"]
    assert reference.config.activation_function == "gelu_new"
    assert reference.config.tie_word_embeddings == tie_embeddings
    assert_values_equal(hf_logits(reference, input_ids), our_logits(model, input_ids))


def test_from_hf_of_to_hf_is_identical(tmp_path):
    model = build_our_gpt(tie_embeddings=False)
    loaded = from_hf(to_hf(model, tmp_path))

    assert loaded.config == model.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert restored.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(restored[name], tensor), name


def test_to_hf_leaves_no_temporary_files(tmp_path):
    to_hf(build_our_gpt(), tmp_path)
    to_hf(build_our_gpt(seed=8), tmp_path)  # overwrites in place

    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


# ---- greedy generation ------------------------------------------------------------------------


def test_greedy_generation_matches_transformers(tmp_path):
    reference = build_hf_gpt2(seed=9)
    model = from_hf(save_hf(reference, tmp_path))
    prompt = random_ids(1, 5, seed=10)

    with torch.no_grad():
        output = reference.generate(
            prompt,
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    theirs = output.sequences[:, prompt.size(1) :]
    ours = generate(model, prompt, 32, temperature=0)[:, prompt.size(1) :]

    assert theirs.shape == (1, 32)
    for step, step_logits in enumerate(output.logits):
        top_two = step_logits[0].topk(2).values
        margin = float(top_two[0] - top_two[1])
        assert margin > 1e-3, f"near-tie at step {step} (margin {margin:.2e}); choose another seed"
    assert torch.equal(ours, theirs)


# ---- options without an equivalent, and damaged checkpoints -----------------------------------


@pytest.mark.parametrize(
    "option, value",
    [
        ("scale_attn_by_inverse_layer_idx", True),
        ("scale_attn_weights", False),
        ("add_cross_attention", True),
        ("activation_function", "quick_gelu"),
        ("attn_pdrop", 0.2),
    ],
)
def test_from_hf_rejects_option_without_equivalent(tmp_path, option, value):
    save_hf(build_hf_gpt2(seed=0), tmp_path)
    config_path = tmp_path / "config.json"
    hf_config = json.loads(config_path.read_text())
    hf_config[option] = value
    config_path.write_text(json.dumps(hf_config))

    with pytest.raises(ValueError, match=option):
        from_hf(tmp_path)


@pytest.mark.parametrize(
    "field, value",
    [
        ("norm", "rmsnorm"),
        ("norm_position", "post"),
        ("position", "sinusoidal"),
        ("bias", False),
        ("n_kv_heads", 2),
        ("activation", "swiglu"),
        ("d_head", 8),
    ],
)
def test_to_hf_rejects_option_without_equivalent(tmp_path, field, value):
    model = GPT(GPTConfig(vocab_size=101, max_seq_len=64, d_model=64, n_layers=1, n_heads=4, **{field: value}))

    with pytest.raises(ValueError, match=field):
        to_hf(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_from_hf_rejects_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))

    with pytest.raises(ValueError, match="llama.*gpt2"):
        from_hf(tmp_path)


def test_from_hf_rejects_unsupported_architecture(tmp_path):
    save_hf(build_hf_gpt2(seed=0), tmp_path)
    config_path = tmp_path / "config.json"
    hf_config = json.loads(config_path.read_text())
    hf_config["architectures"] = ["GPT2ForSequenceClassification"]
    config_path.write_text(json.dumps(hf_config))

    with pytest.raises(ValueError, match="GPT2ForSequenceClassification"):
        from_hf(tmp_path)


def rewrite_weights(directory: Path, change) -> None:
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_from_hf_names_missing_tensor(tmp_path):
    save_hf(build_hf_gpt2(seed=0), tmp_path)
    rewrite_weights(tmp_path, lambda tensors: tensors.pop("transformer.h.1.mlp.c_fc.bias"))

    with pytest.raises(ValueError, match=r"missing.*h\.1\.mlp\.c_fc\.bias"):
        from_hf(tmp_path)


def test_from_hf_names_unexpected_tensor(tmp_path):
    save_hf(build_hf_gpt2(seed=0), tmp_path)
    rewrite_weights(tmp_path, lambda tensors: tensors.update({"transformer.h.2.ln_1.weight": torch.ones(64)}))

    with pytest.raises(ValueError, match=r"h\.2\.ln_1\.weight"):
        from_hf(tmp_path)


def test_from_hf_names_misshapen_tensor(tmp_path):
    save_hf(build_hf_gpt2(seed=0), tmp_path)
    rewrite_weights(tmp_path, lambda tensors: tensors.update({"transformer.wpe.weight": torch.zeros(32, 64)}))

    with pytest.raises(ValueError, match=r"wpe\.weight has shape \(32, 64\)"):
        from_hf(tmp_path)


def test_from_hf_ignores_saved_attention_mask_buffers(tmp_path):
    reference = build_hf_gpt2(seed=0)
    save_hf(reference, tmp_path)
    causal = torch.tril(torch.ones(64, 64, dtype=torch.bool))[None, None]
    rewrite_weights(
        tmp_path,
        lambda tensors: tensors.update(
            {"transformer.h.0.attn.bias": causal, "transformer.h.0.attn.masked_bias": torch.tensor(-1e4)}
        ),
    )
    input_ids = random_ids(1, 8)

    assert_values_equal(our_logits(from_hf(tmp_path), input_ids), hf_logits(reference, input_ids))


# ---- config translation and the no-transformers rule ------------------------------------------


def test_gpt2_config_from_hf_translates_every_field(tmp_path):
    overrides = dict(n_inner=80, activation_function="gelu", layer_norm_epsilon=1e-3, initializer_range=0.05)
    save_hf(build_hf_gpt2(seed=0, **overrides, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1), tmp_path)
    expected = GPTConfig(
        vocab_size=101,
        max_seq_len=64,
        d_model=64,
        n_layers=2,
        n_heads=4,
        d_ff=80,
        activation="gelu",
        norm_eps=1e-3,
        dropout=0.1,
        init_std=0.05,
        tie_embeddings=True,
    )

    assert gpt2_config_from_hf(tmp_path) == expected
    assert config_from_hf(tmp_path) == expected


def test_library_never_imports_transformers(tmp_path):
    to_hf(build_our_gpt(), tmp_path)
    script = (
        "import sys; import minformer; "
        f"minformer.from_hf({str(tmp_path)!r}); minformer.to_hf(minformer.from_hf({str(tmp_path)!r}), {str(tmp_path / 'again')!r}); "
        "loaded = sorted(name for name in sys.modules if name.split('.')[0] == 'transformers'); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_to_hf_rejects_sliding_window(tmp_path):
    model = GPT(GPTConfig(vocab_size=101, max_seq_len=16, d_model=32, n_layers=1, n_heads=4, sliding_window=4))

    with pytest.raises(ValueError, match="sliding_window=4"):
        to_hf(model, tmp_path)


def test_to_hf_with_tokenizer_writes_tokenizer_json(tmp_path):
    from minformer.data.tokenizers import BPETokenizer, load_tokenizer

    tokenizer = BPETokenizer.train(["a small text for a small tokenizer"] * 20, vocab_size=300)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, max_seq_len=16, d_model=32, n_layers=1, n_heads=4))

    to_hf(model, tmp_path, tokenizer=tokenizer)

    assert load_tokenizer(tmp_path).encode("a small text") == tokenizer.encode("a small text")
