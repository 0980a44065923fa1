"""Position schemes against independent references.

References: Hugging Face transformers' Llama rotary embedding (``LlamaRotaryEmbedding``,
``apply_rotary_pos_emb``) and its RoPE parameter functions for linear, dynamic-NTK and YaRN
scaling. For ALiBi, the slopes given by Press et al. 2022 and BLOOM's
``build_alibi_tensor``; T5's ``T5Attention._relative_position_bucket`` and ``compute_bias``.
Every reference module is built locally from a config; nothing is downloaded.
"""

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minformer.attention import causal_mask, scaled_dot_product_attention
from minformer.models.gpt import GPT, GPTConfig
from minformer.positions import (
    ACTS_ON,
    POSITIONS,
    ALiBi,
    RotaryEmbedding,
    T5RelativeBias,
    alibi_slopes,
    relative_position_bucket,
    rope_inverse_frequencies,
)

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, T5Config  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.bloom.modeling_bloom import build_alibi_tensor  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

# Tiny models run faster on one thread than on two busy cores (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")
HYPOTHESIS = settings(deadline=None, derandomize=bool(os.environ.get("CI")), max_examples=30)
D_HEAD = 16
MAX_POSITION = 128


def llama_rotary(rope_parameters: dict) -> LlamaRotaryEmbedding:
    config = LlamaConfig(
        hidden_size=4 * D_HEAD,
        num_attention_heads=4,
        head_dim=D_HEAD,
        max_position_embeddings=MAX_POSITION,
        rope_parameters=dict(rope_parameters),
    )
    return LlamaRotaryEmbedding(config)


ROPE_CASES = [
    (dict(), {"rope_type": "default", "rope_theta": 10000.0}),
    (dict(base=500000.0), {"rope_type": "default", "rope_theta": 500000.0}),
    (dict(scaling="linear", scaling_factor=2.0), {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    (
        dict(scaling="yarn", scaling_factor=4.0, original_max_seq_len=32),
        {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32},
    ),
    (
        dict(scaling="yarn", scaling_factor=8.0, original_max_seq_len=16, yarn_beta_fast=16.0, yarn_beta_slow=2.0),
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "rope_theta": 10000.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
        },
    ),
]


# --- RoPE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ours, theirs", ROPE_CASES)
def test_rope_frequencies_match_llama_rotary(ours, theirs):
    reference = llama_rotary(theirs)

    ours_module = RotaryEmbedding(D_HEAD, **ours)

    torch.testing.assert_close(torch.tensor(ours_module.inv_freq, dtype=torch.float32), reference.inv_freq, atol=0, rtol=1e-6)
    assert ours_module.attention_factor == pytest.approx(reference.attention_scaling, rel=1e-12)


@pytest.mark.parametrize("ours, theirs", ROPE_CASES)
def test_rope_rotation_matches_llama_apply_rotary(ours, theirs):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(2, 3, 40, D_HEAD, generator=generator)
    keys = torch.randn(2, 3, 40, D_HEAD, generator=generator)
    position_ids = torch.stack([torch.arange(40), torch.arange(40) + 60])  # (batch, seq), rows start at 0 and 60
    reference = llama_rotary(theirs)
    cos, sin = reference(queries, position_ids)
    expected_queries, expected_keys = apply_rotary_pos_emb(queries, keys, cos, sin)

    rotation = RotaryEmbedding(D_HEAD, **ours)(position_ids)

    # The reference forms its angles in float32; ours are float64. At positions below 100 the
    # float32 angle error is under 1e-5 rad.
    torch.testing.assert_close(rotation.apply(queries), expected_queries, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(rotation.apply(keys), expected_keys, atol=2e-5, rtol=1e-5)


def test_rope_without_scaling_differs_from_linear_scaling():
    position_ids = torch.arange(10)[None]
    queries = torch.randn(1, 1, 10, D_HEAD)

    plain = RotaryEmbedding(D_HEAD)(position_ids).apply(queries)
    linear = RotaryEmbedding(D_HEAD, scaling="linear", scaling_factor=2.0)(position_ids).apply(queries)

    assert (plain - linear)[:, :, 1:].abs().max() > 1e-2


def test_linear_scaling_equals_dividing_positions():
    # Position interpolation (Chen et al. 2023): rotating position p with factor s equals position p / s.
    queries = torch.randn(1, 2, 8, D_HEAD)
    positions = torch.arange(0, 16, 2)[None]

    scaled = RotaryEmbedding(D_HEAD, scaling="linear", scaling_factor=2.0)(positions).apply(queries)
    halved = RotaryEmbedding(D_HEAD)(positions // 2).apply(queries)

    torch.testing.assert_close(scaled, halved, atol=1e-6, rtol=1e-6)


def test_ntk_scaling_matches_base_formula():
    factor = 4.0

    ntk = rope_inverse_frequencies(D_HEAD, 10000.0, "ntk", factor)

    scaled_base = 10000.0 * factor ** (D_HEAD / (D_HEAD - 2))
    expected = torch.tensor([scaled_base ** (-2 * i / D_HEAD) for i in range(D_HEAD // 2)], dtype=torch.float64)
    torch.testing.assert_close(ntk, expected, atol=0, rtol=1e-12)
    # The lowest frequency is stretched by exactly the factor, the highest is kept.
    plain = rope_inverse_frequencies(D_HEAD, 10000.0)
    assert float(plain[-1] / ntk[-1]) == pytest.approx(factor ** ((D_HEAD - 2) / (D_HEAD - 2)), rel=1e-12)
    assert float(ntk[0]) == 1.0


def test_ntk_scaling_matches_dynamic_ntk_at_its_fixed_point():
    # Hugging Face's dynamic NTK uses base * (f * L / L0 - (f - 1))^(d/(d-2)) at sequence length L.
    # At L = L0 * (2f - 1) / f the bracket is f, so it equals our static NTK with factor f.
    # Dynamic scaling itself (frequencies that change with the length) is not implemented.
    factor = 2.0
    config = LlamaConfig(
        hidden_size=4 * D_HEAD,
        num_attention_heads=4,
        head_dim=D_HEAD,
        max_position_embeddings=MAX_POSITION,
        rope_parameters={"rope_type": "dynamic", "factor": factor, "rope_theta": 10000.0},
    )
    seq_len = int(MAX_POSITION * (2 * factor - 1) / factor)

    reference, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, seq_len=seq_len)

    ours = rope_inverse_frequencies(D_HEAD, 10000.0, "ntk", factor)
    torch.testing.assert_close(ours.float(), reference, atol=0, rtol=1e-6)


def test_dynamic_rope_scaling_is_rejected():
    with pytest.raises(ValueError, match="rope_scaling='dynamic'"):
        GPTConfig(vocab_size=11, d_model=32, n_heads=2, position="rope", rope_scaling="dynamic", rope_scaling_factor=2.0)


def test_yarn_keeps_fast_and_interpolates_slow_frequencies():
    plain = rope_inverse_frequencies(64, 10000.0)

    yarn = rope_inverse_frequencies(64, 10000.0, "yarn", 8.0, original_max_seq_len=256)

    assert float(yarn[0]) == float(plain[0])
    assert float(yarn[-1]) == pytest.approx(float(plain[-1]) / 8.0, rel=1e-12)


def test_interleaved_rope_equals_rotate_half_under_permutation():
    # Feature 2i of the interleaved layout is feature i of the half layout, and 2i+1 is i + d/2.
    permutation = torch.cat([torch.arange(0, D_HEAD, 2), torch.arange(1, D_HEAD, 2)])
    features = torch.randn(2, 3, 12, D_HEAD)
    position_ids = torch.arange(12)[None] + 5

    interleaved = RotaryEmbedding(D_HEAD, interleaved=True)(position_ids).apply(features)
    halves = RotaryEmbedding(D_HEAD, interleaved=False)(position_ids).apply(features[..., permutation])

    torch.testing.assert_close(interleaved[..., permutation], halves, atol=1e-6, rtol=1e-6)
    assert (interleaved - RotaryEmbedding(D_HEAD)(position_ids).apply(features)).abs().max() > 1e-2


@HYPOTHESIS
@given(query_position=st.integers(0, 200), key_position=st.integers(0, 200), shift=st.integers(1, 300))
def test_rope_score_depends_only_on_distance(query_position, key_position, shift):
    generator = torch.Generator().manual_seed(query_position * 1000 + key_position)
    query = torch.randn(1, 1, 1, D_HEAD, dtype=torch.float64, generator=generator)
    key = torch.randn(1, 1, 1, D_HEAD, dtype=torch.float64, generator=generator)
    rotary = RotaryEmbedding(D_HEAD)

    def score(q_pos, k_pos):
        rotated_query = rotary(torch.tensor([[q_pos]])).apply(query)
        rotated_key = rotary(torch.tensor([[k_pos]])).apply(key)
        return float((rotated_query * rotated_key).sum())

    # cos and sin are float32, so the two scores agree to float32 precision only.
    assert score(query_position, key_position) == pytest.approx(score(query_position + shift, key_position + shift), abs=1e-5)


def test_rope_score_changes_with_distance():
    query, key = torch.randn(2, 1, 1, 1, D_HEAD, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rotary = RotaryEmbedding(D_HEAD)

    def score(q_pos, k_pos):
        return float((rotary(torch.tensor([[q_pos]])).apply(query) * rotary(torch.tensor([[k_pos]])).apply(key)).sum())

    assert abs(score(5, 2) - score(5, 3)) > 1e-3


def test_rope_survives_bfloat16_model_cast():
    config = GPTConfig(vocab_size=11, max_seq_len=8, d_model=32, n_layers=1, n_heads=2, position="rope")
    model = GPT(config).to(torch.bfloat16)

    expected = rope_inverse_frequencies(16, 10000.0)

    assert model.rotary.inv_freq == tuple(expected.tolist())


# --- ALiBi -----------------------------------------------------------------------------------


def test_alibi_slopes_match_paper_for_8_heads():
    # Press et al. 2022 give the slopes for 8 heads as the geometric sequence 1/2^1, 1/2^2, ..., 1/2^8.
    assert alibi_slopes(8) == [1 / 2**k for k in range(1, 9)]


def test_alibi_slopes_match_paper_for_16_heads():
    # and for 16 heads as the sequence that starts at 1/2^0.5 with ratio 1/2^0.5.
    assert alibi_slopes(16) == pytest.approx([2 ** (-0.5 * k) for k in range(1, 17)], rel=1e-12)


@pytest.mark.parametrize("n_heads", range(1, 18))
def test_alibi_slopes_match_bloom(n_heads):
    key_positions = torch.ones(1, 5)

    bloom = build_alibi_tensor(key_positions, n_heads, torch.float32)  # (heads, 1, seq) = slope * key position

    torch.testing.assert_close(torch.tensor(alibi_slopes(n_heads)), bloom[:, 0, 1], atol=0, rtol=1e-6)


@pytest.mark.parametrize("n_heads", [3, 8, 12])
def test_alibi_bias_equals_bloom_up_to_row_constant(n_heads):
    # BLOOM adds slope * j, and Press et al.'s -slope * (i - j) differs from it by -slope * i in
    # each row, which the softmax ignores. Compared on the keys a causal query attends to.
    seq = 9
    bloom = build_alibi_tensor(torch.ones(1, seq), n_heads, torch.float32).view(n_heads, 1, seq)
    slopes = torch.tensor(alibi_slopes(n_heads))[:, None, None]
    query_positions = torch.arange(seq)[None, :, None]

    ours = ALiBi(n_heads)(seq, seq)[0]  # (heads, q, k)

    causal = torch.ones(seq, seq).tril().bool()
    expected = (bloom - slopes * query_positions).expand(n_heads, seq, seq)
    torch.testing.assert_close(ours[:, causal], expected[:, causal], atol=1e-5, rtol=1e-6)


def test_alibi_bias_is_zero_on_diagonal_and_grows_with_distance():
    bias = ALiBi(4)(5, 5)[0]

    assert torch.equal(bias.diagonal(dim1=-2, dim2=-1), torch.zeros(4, 5))
    assert bias[0, 4, 0] == -0.25 * 4
    assert bias[0, 4, 3] > bias[0, 4, 0]


# --- T5 relative positions ------------------------------------------------------------------


BUCKET_SETTINGS = [(32, 128), (16, 64), (8, 20), (64, 256), (4, 10)]


@pytest.mark.parametrize(
    "num_buckets, max_distance, bidirectional",
    [(*setting, True) for setting in BUCKET_SETTINGS] + [(*setting, False) for setting in BUCKET_SETTINGS + [(2, 8)]],
)
def test_t5_buckets_match_reference(num_buckets, max_distance, bidirectional):
    relative = torch.arange(-400, 401)

    ours = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)

    reference = T5Attention._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, reference)


def test_causal_t5_buckets_put_future_keys_in_bucket_zero():
    buckets = relative_position_bucket(torch.arange(0, 50), bidirectional=False)

    assert torch.equal(buckets, torch.zeros(50, dtype=torch.long))


def test_bidirectional_t5_buckets_separate_directions():
    before = relative_position_bucket(torch.tensor([-3]), bidirectional=True)
    after = relative_position_bucket(torch.tensor([3]), bidirectional=True)

    assert int(before) == 3
    assert int(after) == 16 + 3


@pytest.mark.parametrize("is_decoder, past", [(True, 0), (True, 5), (False, 0)])
def test_t5_bias_matches_compute_bias(is_decoder, past):
    torch.manual_seed(0)
    config = T5Config(
        d_model=32,
        d_kv=8,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=40,
        is_decoder=is_decoder,
    )
    reference = T5Attention(config, has_relative_attention_bias=True, layer_idx=0)
    ours = T5RelativeBias(4, 16, 40, bidirectional=not is_decoder)
    ours.relative_attention_bias.load_state_dict(reference.relative_attention_bias.state_dict())
    q_len = 6

    expected = reference.compute_bias(q_len, past + q_len, past_seen_tokens=past)

    torch.testing.assert_close(ours(q_len, past + q_len), expected, atol=0, rtol=0)


# --- Score bias inside attention ------------------------------------------------------------


def reference_biased_attention(queries, keys, values, bias, mask):
    """softmax(q k^T / sqrt(d) + bias) v in float64; fully masked rows give zeros."""
    scores = queries.double() @ keys.double().transpose(-2, -1) / math.sqrt(queries.size(-1)) + bias.double()
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1).nan_to_num(0.0) @ values.double()).float()


@HYPOTHESIS
@given(q_len=st.integers(1, 7), extra_keys=st.integers(0, 5), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_score_bias_backends_agree_with_reference(q_len, extra_keys, causal, seed):
    generator = torch.Generator().manual_seed(seed)
    k_len = q_len + extra_keys
    queries = torch.randn(2, 3, q_len, 8, generator=generator)
    keys = torch.randn(2, 3, k_len, 8, generator=generator)
    values = torch.randn(2, 3, k_len, 8, generator=generator)
    bias = torch.randn(1, 3, q_len, k_len, generator=generator)
    padding = torch.rand(2, 1, 1, k_len, generator=generator) > 0.3
    full_mask = padding & (torch.ones(q_len, k_len).tril(k_len - q_len).bool() if causal else True)
    expected = reference_biased_attention(queries, keys, values, bias, full_mask.expand(2, 3, q_len, k_len))

    for backend in ("naive", "sdpa"):
        output, _ = scaled_dot_product_attention(
            queries, keys, values, mask=padding, causal=causal, backend=backend, bias=bias
        )
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_score_bias_changes_output():
    queries, keys, values = torch.randn(3, 1, 2, 4, 8)
    bias = torch.randn(1, 2, 4, 4)

    plain, _ = scaled_dot_product_attention(queries, keys, values, backend="sdpa")
    biased, _ = scaled_dot_product_attention(queries, keys, values, backend="sdpa", bias=bias)

    assert (plain - biased).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_score_bias_keeps_fully_masked_row_zero(backend):
    queries, keys, values = (torch.randn(1, 2, 3, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 3, 3, requires_grad=True)
    mask = torch.tensor([[True, True, True], [False, False, False], [True, False, True]])[None, None]

    output, _ = scaled_dot_product_attention(queries, keys, values, mask=mask, backend=backend, bias=bias)
    output.sum().backward()

    assert torch.equal(output[:, :, 1], torch.zeros_like(output[:, :, 1]))
    assert torch.isfinite(bias.grad).all()
    assert torch.isfinite(queries.grad).all()


def test_t5_bias_gradients_agree_across_backends():
    gradients = {}
    for backend in ("naive", "sdpa"):
        torch.manual_seed(0)
        config = GPTConfig(
            vocab_size=23, max_seq_len=12, d_model=32, n_layers=2, n_heads=4, position="t5", attention_backend=backend
        )
        model = GPT(config)
        tokens = torch.randint(0, 23, (2, 12))
        model(tokens, targets=tokens).loss.backward()
        gradients[backend] = model.score_bias.relative_attention_bias.weight.grad

    assert gradients["naive"].abs().max() > 0
    scale = gradients["naive"].abs().max()
    assert float((gradients["sdpa"] - gradients["naive"]).abs().max() / scale) <= 1e-5


# --- Configuration --------------------------------------------------------------------------


def test_every_position_states_how_it_acts():
    assert set(ACTS_ON) == set(POSITIONS)
    assert ACTS_ON["rope"] == "queries_keys"
    assert ACTS_ON["alibi"] == ACTS_ON["t5"] == "scores"
    assert ACTS_ON["learned"] == ACTS_ON["sinusoidal"] == "embeddings"


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(position="rope", rope_scaling="dynamic", rope_scaling_factor=2.0), "rope_scaling='dynamic'"),
        (dict(position="learned", rope_scaling="linear", rope_scaling_factor=2.0), "rope_scaling='linear'"),
        (dict(position="rope", rope_scaling_factor=2.0), "rope_scaling_factor=2.0"),
        (dict(position="rope", rope_scaling="linear", rope_scaling_factor=0.5), "rope_scaling_factor=0.5"),
        (dict(position="rope", rope_scaling="yarn", rope_scaling_factor=4.0), "rope_original_max_seq_len=None"),
        (dict(position="rope", rope_scaling="linear", rope_scaling_factor=2.0, rope_original_max_seq_len=8), "rope_original_max_seq_len=8"),
        (dict(position="rope", rope_base=1.0), "rope_base=1.0"),
        (dict(position="rope", rope_interleaved="yes"), "rope_interleaved='yes'"),
        (dict(position="rope", rope_yarn_beta_fast=1.0, rope_yarn_beta_slow=2.0), "rope_yarn_beta_fast=1.0"),
        (dict(position="rope", d_head=7), "d_head=7"),
        (dict(position="t5", t5_num_buckets=1), "t5_num_buckets=1"),
        (dict(position="t5", t5_num_buckets=32, t5_max_distance=16), "t5_max_distance=16"),
    ],
)
def test_invalid_position_options_name_field(overrides, field):
    with pytest.raises(ValueError) as error:
        GPTConfig(vocab_size=11, d_model=32, n_heads=2, **overrides)
    assert field in str(error.value)


@pytest.mark.parametrize("position", POSITIONS)
def test_model_builds_each_position(position):
    model = GPT(GPTConfig(vocab_size=11, max_seq_len=8, d_model=32, n_layers=1, n_heads=2, position=position))

    assert model(torch.zeros(1, 5, dtype=torch.long)).logits.shape == (1, 5, 11)
    assert (model.position_embedding is not None) == (ACTS_ON[position] == "embeddings")
    assert (model.rotary is not None) == (ACTS_ON[position] == "queries_keys")
    assert (model.score_bias is not None) == (ACTS_ON[position] == "scores")


def test_causal_alibi_bias_gives_same_attention_as_full_bias():
    q_len, k_len, heads = 5, 9, 6
    scores = torch.randn(1, heads, q_len, k_len, generator=torch.Generator().manual_seed(0))
    visible = causal_mask(q_len, k_len)

    full = torch.softmax((scores + ALiBi(heads)(q_len, k_len)).masked_fill(~visible, float("-inf")), dim=-1)
    compact_bias = ALiBi(heads, causal=True)(q_len, k_len)
    compact = torch.softmax((scores + compact_bias).masked_fill(~visible, float("-inf")), dim=-1)

    assert compact_bias.shape == (1, heads, 1, k_len)
    torch.testing.assert_close(compact, full, atol=1e-6, rtol=1e-6)
