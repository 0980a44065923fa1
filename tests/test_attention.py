"""Scaled dot-product attention: backends agree, masks behave, each backend is shown to run.

References: eq. 1 of Vaswani et al. 2017 written out in float64 (``reference_attention``), and
PyTorch's profiler for which kernel ran.
"""

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minformer.attention import MultiHeadAttention, causal_mask, scaled_dot_product_attention, sliding_window_mask

HYPOTHESIS = settings(deadline=None, derandomize=bool(os.environ.get("CI")), max_examples=40)


def reference_attention(queries, keys, values, mask):
    """Eq. 1 in float64 with an explicit loop-free softmax; fully masked rows give zeros."""
    q, k, v = queries.double(), keys.double(), values.double()
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (weights @ v).float()


def max_relative_difference(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def test_causal_mask_aligns_last_query_with_last_key():
    mask = causal_mask(2, 5)

    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_causal_mask_square_is_lower_triangular():
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4).tril().bool())


@HYPOTHESIS
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    q_len=st.integers(1, 9),
    extra_keys=st.integers(0, 6),
    head_dim=st.sampled_from([4, 8, 16]),
    causal=st.booleans(),
    use_padding=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_backends_agree_with_reference(batch, heads, q_len, extra_keys, head_dim, causal, use_padding, seed):
    generator = torch.Generator().manual_seed(seed)
    k_len = q_len + extra_keys
    queries = torch.randn(batch, heads, q_len, head_dim, generator=generator)
    keys = torch.randn(batch, heads, k_len, head_dim, generator=generator)
    values = torch.randn(batch, heads, k_len, head_dim, generator=generator)
    padding = torch.rand(batch, 1, 1, k_len, generator=generator) > 0.3 if use_padding else None
    full_mask = torch.ones(batch, heads, q_len, k_len, dtype=torch.bool)
    if padding is not None:
        full_mask = full_mask & padding
    if causal:
        full_mask = full_mask & causal_mask(q_len, k_len)
    expected = reference_attention(queries, keys, values, full_mask)

    for backend in ("naive", "sdpa", "flash"):
        output, _ = scaled_dot_product_attention(queries, keys, values, mask=padding, causal=causal, backend=backend)
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


@HYPOTHESIS
@given(q_len=st.integers(1, 8), extra_keys=st.integers(0, 4), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_backends_agree_in_gradients(q_len, extra_keys, causal, seed):
    generator = torch.Generator().manual_seed(seed)
    k_len = q_len + extra_keys
    shape_q, shape_k = (2, 2, q_len, 8), (2, 2, k_len, 8)
    base = [torch.randn(shape_q, generator=generator), torch.randn(shape_k, generator=generator), torch.randn(shape_k, generator=generator)]
    padding = torch.rand(2, 1, 1, k_len, generator=generator) > 0.3
    upstream = torch.randn(shape_q, generator=generator)
    gradients = {}
    for backend in ("naive", "sdpa", "flash"):
        inputs = [tensor.clone().requires_grad_(True) for tensor in base]
        output, _ = scaled_dot_product_attention(*inputs, mask=padding, causal=causal, backend=backend)
        (output * upstream).sum().backward()
        gradients[backend] = [tensor.grad for tensor in inputs]
    # One scale for all three inputs: with a single key the query and key gradients are exactly
    # zero, and a per-tensor ratio would divide rounding noise by zero.
    naive_all = torch.cat([grad.flatten() for grad in gradients["naive"]])
    assert torch.isfinite(naive_all).all()
    for backend in ("sdpa", "flash"):
        backend_all = torch.cat([grad.flatten() for grad in gradients[backend]])
        assert max_relative_difference(backend_all, naive_all) <= 1e-5, backend


@pytest.mark.parametrize("backend", ["naive", "sdpa", "flash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fully_masked_query_gives_zeros_and_finite_gradients(backend, dtype):
    queries = torch.randn(1, 2, 3, 8, dtype=dtype, requires_grad=True)
    keys = torch.randn(1, 2, 3, 8, dtype=dtype, requires_grad=True)
    values = torch.randn(1, 2, 3, 8, dtype=dtype, requires_grad=True)
    mask = torch.tensor([[True, True, True], [False, False, False], [True, False, True]])[None, None]

    output, _ = scaled_dot_product_attention(queries, keys, values, mask=mask, backend=backend)
    output.float().sum().backward()

    assert torch.equal(output[:, :, 1], torch.zeros_like(output[:, :, 1]))
    assert output[:, :, 0].abs().sum() > 0
    for tensor in (queries, keys, values):
        assert torch.isfinite(tensor.grad).all()


def test_naive_backend_returns_weights_that_sum_to_one():
    queries, keys, values = (torch.randn(1, 2, 5, 4) for _ in range(3))

    _, weights = scaled_dot_product_attention(queries, keys, values, causal=True, backend="naive", return_weights=True)

    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 5))
    assert torch.equal(weights[0, 0].triu(1), torch.zeros(5, 5))


def test_return_weights_rejected_for_sdpa():
    queries = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="naive"):
        scaled_dot_product_attention(queries, queries, queries, backend="sdpa", return_weights=True)


def test_unknown_backend_rejected():
    queries = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="attention_backend='fast'"):
        scaled_dot_product_attention(queries, queries, queries, backend="fast")


def profiled_op_names(backend):
    attention = MultiHeadAttention(16, 2, backend=backend, causal=True).eval()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        attention(torch.randn(1, 5, 16))
    return {event.key for event in profile.key_averages()}


def test_sdpa_backend_runs_fused_kernel():
    assert "aten::scaled_dot_product_attention" in profiled_op_names("sdpa")


def test_naive_backend_never_calls_fused_kernel():
    names = profiled_op_names("naive")

    assert "aten::scaled_dot_product_attention" not in names
    assert "aten::softmax" in names or "aten::_softmax" in names


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_grouped_query_heads_share_keys(n_kv_heads):
    torch.manual_seed(0)
    attention = MultiHeadAttention(32, 4, n_kv_heads=n_kv_heads, backend="naive", causal=True).eval()
    hidden = torch.randn(2, 6, 32)

    output, _ = attention(hidden)

    assert attention.k_proj.out_features == n_kv_heads * 8
    # Reference: expand the key/value projections to one per query head and run plain MHA.
    group = 4 // n_kv_heads
    full = MultiHeadAttention(32, 4, backend="naive", causal=True).eval()
    with torch.no_grad():
        full.q_proj.load_state_dict(attention.q_proj.state_dict())
        full.out_proj.load_state_dict(attention.out_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            source = getattr(attention, name)
            weight = source.weight.view(n_kv_heads, 8, 32).repeat_interleave(group, 0).reshape(32, 32)
            bias = source.bias.view(n_kv_heads, 8).repeat_interleave(group, 0).reshape(32)
            getattr(full, name).weight.copy_(weight)
            getattr(full, name).bias.copy_(bias)
    torch.testing.assert_close(output, full(hidden)[0], atol=1e-5, rtol=1e-5)


def test_sliding_window_mask_aligns_with_last_key():
    mask = causal_mask(3, 6) & sliding_window_mask(3, 6, window=2)

    assert mask.tolist() == [
        [False, False, True, True, False, False],
        [False, False, False, True, True, False],
        [False, False, False, False, True, True],
    ]


@HYPOTHESIS
@given(
    q_len=st.integers(1, 12),
    extra_keys=st.integers(0, 6),
    window=st.integers(1, 8),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sliding_window_backends_agree_with_reference(q_len, extra_keys, window, causal, seed):
    generator = torch.Generator().manual_seed(seed)
    k_len = q_len + extra_keys
    queries = torch.randn(1, 2, q_len, 8, generator=generator)
    keys = torch.randn(1, 2, k_len, 8, generator=generator)
    values = torch.randn(1, 2, k_len, 8, generator=generator)
    full_mask = sliding_window_mask(q_len, k_len, window)
    if causal:
        full_mask = full_mask & causal_mask(q_len, k_len)
    expected = reference_attention(queries, keys, values, full_mask.expand(1, 2, q_len, k_len))

    for backend in ("naive", "sdpa", "flash"):
        output, _ = scaled_dot_product_attention(queries, keys, values, causal=causal, window=window, backend=backend)
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_flash_backend_runs_its_own_kernel():
    queries = torch.randn(1, 2, 5, 8, requires_grad=True)

    output, _ = scaled_dot_product_attention(queries, queries, queries, causal=True, backend="flash")

    assert type(output.grad_fn).__name__ == "FlashAttentionFunctionBackward"


@HYPOTHESIS
@given(
    layout=st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 3), (2, 1)]),
    q_len=st.integers(1, 10),
    memory_len=st.integers(1, 10),
    cross=st.booleans(),
    use_padding=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 6)),
    seed=st.integers(0, 2**16),
)
def test_multi_head_backends_agree_for_every_head_layout(layout, q_len, memory_len, cross, use_padding, window, seed):
    n_heads, n_kv_heads = layout
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, q_len, 24, generator=generator)
    memory = torch.randn(2, memory_len, 24, generator=generator) if cross else None
    k_len = memory_len if cross else q_len
    padding = (torch.rand(2, 1, 1, k_len, generator=generator) > 0.3) if use_padding else None
    upstream = torch.randn(2, q_len, 24, generator=generator)

    torch.manual_seed(seed)
    reference_module = MultiHeadAttention(24, n_heads, n_kv_heads, d_head=4, backend="naive", causal=not cross, window=window)
    results = {}
    for backend in ("naive", "sdpa", "flash"):
        module = MultiHeadAttention(24, n_heads, n_kv_heads, d_head=4, backend=backend, causal=not cross, window=window)
        module.load_state_dict(reference_module.state_dict())
        inputs = hidden.clone().requires_grad_(True)
        output, _ = module(inputs, memory=memory, mask=padding)
        (output * upstream).sum().backward()
        gradients = torch.cat([inputs.grad.flatten()] + [p.grad.flatten() for p in module.parameters()])
        results[backend] = (output.detach(), gradients)

    naive_output, naive_gradients = results["naive"]
    for backend in ("sdpa", "flash"):
        output, gradients = results[backend]
        torch.testing.assert_close(output, naive_output, atol=1e-5, rtol=1e-5)
        assert max_relative_difference(gradients, naive_gradients) <= 1e-5, backend


def test_cross_attention_matches_manual_computation():
    torch.manual_seed(0)
    attention = MultiHeadAttention(8, 2, n_kv_heads=1, backend="naive").eval()
    hidden, memory = torch.randn(1, 3, 8), torch.randn(1, 5, 8)

    output, weights = attention(hidden, memory=memory, return_weights=True)

    queries = attention.q_proj(hidden).view(1, 3, 2, 4).transpose(1, 2)
    keys = attention.k_proj(memory).view(1, 5, 1, 4).transpose(1, 2).expand(1, 2, 5, 4)
    values = attention.v_proj(memory).view(1, 5, 1, 4).transpose(1, 2).expand(1, 2, 5, 4)
    expected_weights = torch.softmax(queries @ keys.transpose(-2, -1) / 2.0, dim=-1)
    expected = attention.out_proj((expected_weights @ values).transpose(1, 2).reshape(1, 3, 8))
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(output, expected)
