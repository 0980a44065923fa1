"""FlashAttention (``minformer.flash``): exact against a float64 reference, linear in memory.

The reference is eq. 1 of Vaswani et al. 2017 with an additive bias, written out in float64 with
the weights materialised (``reference_attention``). Memory is checked without timing: by the
bytes autograd saves for backward and by the largest tensor any operator creates.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from minformer.flash import flash_attention

HYPOTHESIS = settings(deadline=None, derandomize=bool(os.environ.get("CI")), max_examples=100)


def reference_attention(queries, keys, values, mask=None, causal=False, bias=None, scale=None):
    """Compute eq. 1 in float64 with the (batch, heads, q_len, k_len) weights. Fully masked rows give zeros."""
    q_len, k_len = queries.size(-2), keys.size(-2)
    scale = 1.0 / math.sqrt(queries.size(-1)) if scale is None else scale
    scores = queries.double() @ keys.double().transpose(-2, -1) * scale
    if bias is not None:
        scores = scores + bias.double()

    visible = torch.ones(q_len, k_len, dtype=torch.bool)
    if causal:
        visible = torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=k_len - q_len)
    if mask is not None:
        visible = visible & mask
    # The minimum finite value keeps a fully masked row finite, and the product with the mask then
    # turns it into zeros with zero gradients.
    scores = scores.masked_fill(~visible, torch.finfo(torch.float64).min)
    weights = torch.softmax(scores, dim=-1) * visible
    return weights @ values.double()


def gradient_ratio(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Return the max absolute gradient difference over the max absolute reference gradient, over all tensors."""
    difference = max(float((a.double() - e).abs().max()) for a, e in zip(actual, expected))
    largest = max(float(e.abs().max()) for e in expected)
    return difference / max(largest, 1e-30)


def make_mask(kind, batch, heads, q_len, k_len, window, generator):
    """Build a boolean mask of the given kind: padding (batch, 1, 1, k_len), band, or full random."""
    if kind == "none":
        return None
    if kind == "padding":
        return torch.rand(batch, 1, 1, k_len, generator=generator) > 0.3
    if kind == "band":
        # A sliding window of ``window`` keys ending at each query's diagonal.
        query_positions = torch.arange(q_len).unsqueeze(1) + (k_len - q_len)
        key_positions = torch.arange(k_len).unsqueeze(0)
        return (key_positions <= query_positions) & (key_positions > query_positions - window)
    return torch.rand(batch, heads, q_len, k_len, generator=generator) > 0.4


def make_bias(kind, batch, heads, q_len, k_len, generator):
    """Build a learnable bias: per head over all pairs (T5-like), per key (ALiBi-like), or None."""
    if kind == "none":
        return None
    shape = (1, heads, q_len, k_len) if kind == "pairwise" else (batch, heads, 1, k_len)
    return torch.randn(*shape, generator=generator).requires_grad_()


@HYPOTHESIS
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    q_len=st.integers(1, 24),
    k_len=st.integers(1, 24),
    head_dim=st.sampled_from([1, 4, 8, 16]),
    block_q=st.integers(1, 30),
    block_k=st.integers(1, 30),
    causal=st.booleans(),
    mask_kind=st.sampled_from(["none", "padding", "band", "random"]),
    window=st.integers(1, 8),
    bias_kind=st.sampled_from(["none", "pairwise", "per_key"]),
    seed=st.integers(0, 2**16),
)
def test_flash_matches_float64_reference(
    batch, heads, q_len, k_len, head_dim, block_q, block_k, causal, mask_kind, window, bias_kind, seed
):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, heads, q_len, head_dim, generator=generator).requires_grad_()
    keys = torch.randn(batch, heads, k_len, head_dim, generator=generator).requires_grad_()
    values = torch.randn(batch, heads, k_len, head_dim, generator=generator).requires_grad_()
    mask = make_mask(mask_kind, batch, heads, q_len, k_len, window, generator)
    bias = make_bias(bias_kind, batch, heads, q_len, k_len, generator)
    inputs = [queries, keys, values] + ([bias] if bias is not None else [])
    reference_inputs = [tensor.detach().double().requires_grad_() for tensor in inputs]
    reference_bias = reference_inputs[3] if bias is not None else None

    output = flash_attention(
        queries, keys, values, mask=mask, causal=causal, bias=bias, block_q=block_q, block_k=block_k
    )
    expected = reference_attention(*reference_inputs[:3], mask=mask, causal=causal, bias=reference_bias)

    torch.testing.assert_close(output, expected.float(), atol=1e-5, rtol=1e-5)

    grad_output = torch.randn(expected.shape, generator=generator)
    output.backward(grad_output)
    expected.backward(grad_output.double())
    actual_grads = [tensor.grad for tensor in inputs]
    assert all(grad is not None and grad.shape == tensor.shape for grad, tensor in zip(actual_grads, inputs))
    assert gradient_ratio(actual_grads, [tensor.grad for tensor in reference_inputs]) <= 1e-5


def test_flash_gradcheck_float64():
    generator = torch.Generator().manual_seed(7)
    queries = torch.randn(1, 2, 5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(1, 2, 7, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    values = torch.randn(1, 2, 7, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 1, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    padding = torch.tensor([True, True, False, True, True, True, True]).view(1, 1, 1, 7)

    def attend(queries, keys, values, bias):
        return flash_attention(queries, keys, values, mask=padding, causal=True, bias=bias, block_q=2, block_k=3)

    assert torch.autograd.gradcheck(attend, (queries, keys, values, bias))


def test_flash_reference_check_detects_wrong_scale():
    generator = torch.Generator().manual_seed(0)
    queries, keys, values = (torch.randn(1, 2, 9, 8, generator=generator) for _ in range(3))

    output = flash_attention(queries, keys, values, scale=0.5, block_q=4, block_k=4)

    assert not torch.allclose(output, reference_attention(queries, keys, values).float(), atol=1e-5, rtol=1e-5)


def test_flash_causal_ignores_future_keys_but_not_past():
    generator = torch.Generator().manual_seed(1)
    queries, keys, values = (torch.randn(1, 1, 12, 4, generator=generator) for _ in range(3))
    output = flash_attention(queries, keys, values, causal=True, block_q=3, block_k=5)

    changed_values = values.clone()
    changed_values[:, :, 7] += 1.0
    changed = flash_attention(queries, keys, changed_values, causal=True, block_q=3, block_k=5)

    assert torch.equal(changed[:, :, :7], output[:, :, :7])
    assert not torch.allclose(changed[:, :, 7:], output[:, :, 7:])


def test_flash_scale_and_value_dim():
    generator = torch.Generator().manual_seed(2)
    queries = torch.randn(2, 2, 7, 8, generator=generator)
    keys = torch.randn(2, 2, 11, 8, generator=generator)
    values = torch.randn(2, 2, 11, 5, generator=generator)

    output = flash_attention(queries, keys, values, scale=0.3, block_q=3, block_k=4)

    assert output.shape == (2, 2, 7, 5)
    expected = reference_attention(queries, keys, values, scale=0.3).float()
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_flash_fully_masked_rows_give_zeros(dtype):
    generator = torch.Generator().manual_seed(3)
    queries, keys, values = (torch.randn(2, 2, 6, 8, generator=generator).to(dtype).requires_grad_() for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[0, :, 2] = False  # query 2 of batch 0 attends to no key
    mask[1] = False  # no query of batch 1 attends to any key

    output = flash_attention(queries, keys, values, mask=mask, block_q=4, block_k=4)
    output.float().square().sum().backward()

    assert output.dtype == dtype
    assert torch.equal(output[0, :, 2], torch.zeros_like(output[0, :, 2]))
    assert torch.equal(output[1], torch.zeros_like(output[1]))
    assert output[0, :, [0, 1, 3, 4, 5]].abs().sum() > 0
    for tensor in (queries, keys, values):
        assert torch.isfinite(tensor.grad).all()
        assert torch.equal(tensor.grad[1], torch.zeros_like(tensor.grad[1]))
    assert torch.equal(queries.grad[0, :, 2], torch.zeros_like(queries.grad[0, :, 2]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_half_precision_matches_reference(dtype):
    generator = torch.Generator().manual_seed(4)
    queries, keys, values = (torch.randn(1, 2, 40, 16, generator=generator).to(dtype) for _ in range(3))

    output = flash_attention(queries, keys, values, causal=True, block_q=16, block_k=16)

    expected = reference_attention(queries, keys, values, causal=True)
    tolerance = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(output.double(), expected, atol=tolerance, rtol=tolerance)


def test_flash_causal_masks_early_queries():
    generator = torch.Generator().manual_seed(5)
    queries = torch.randn(1, 1, 8, 4, generator=generator, requires_grad=True)
    keys, values = (torch.randn(1, 1, 5, 4, generator=generator, requires_grad=True) for _ in range(2))

    output = flash_attention(queries, keys, values, causal=True, block_q=3, block_k=2)
    output.sum().backward()

    # With 8 queries and 5 keys, query i attends to key j iff j <= i - 3, so queries 0..2 attend to nothing.
    assert torch.equal(output[:, :, :3], torch.zeros(1, 1, 3, 4))
    assert torch.equal(queries.grad[:, :, :3], torch.zeros(1, 1, 3, 4))
    assert torch.isfinite(keys.grad).all()
    assert torch.isfinite(values.grad).all()


def test_flash_rejects_dropout():
    tensor = torch.randn(1, 1, 4, 4)

    with pytest.raises(ValueError, match="dropout_p=0.1"):
        flash_attention(tensor, tensor, tensor, dropout_p=0.1)


def test_flash_rejects_invalid_inputs():
    tensor = torch.randn(1, 2, 4, 8)

    with pytest.raises(ValueError, match="block_q=0"):
        flash_attention(tensor, tensor, tensor, block_q=0)
    with pytest.raises(ValueError, match="Expand grouped"):
        flash_attention(tensor, tensor[:, :1], tensor[:, :1])
    with pytest.raises(ValueError, match="boolean mask"):
        flash_attention(tensor, tensor, tensor, mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="does not broadcast"):
        flash_attention(tensor, tensor, tensor, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        flash_attention(tensor, tensor, tensor, bias=torch.ones(1, 3, 4, 4))


class LargestTensorMode(TorchDispatchMode):
    """Record the largest element count among the tensors every operator returns, and count matmuls."""

    def __init__(self):
        super().__init__()
        self.largest_numel = 0
        self.matmul_calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.mm):
            self.matmul_calls += 1
        for tensor in torch.utils._pytree.tree_leaves(result):
            if isinstance(tensor, torch.Tensor):
                self.largest_numel = max(self.largest_numel, tensor.numel())
        return result


def causal_inputs(seq_len, head_dim=16, padding=False):
    generator = torch.Generator().manual_seed(6)
    tensors = [torch.randn(1, 1, seq_len, head_dim, generator=generator, requires_grad=True) for _ in range(3)]
    mask = torch.rand(1, 1, 1, seq_len, generator=generator) > 0.1 if padding else None
    return tensors, mask


def test_flash_never_creates_score_sized_tensor():
    seq_len = 1024
    (queries, keys, values), mask = causal_inputs(seq_len, padding=True)

    with LargestTensorMode() as forward_mode:
        output = flash_attention(queries, keys, values, mask=mask, causal=True, block_q=128, block_k=128)
    with LargestTensorMode() as backward_mode:
        output.sum().backward()

    # The largest tensors are the inputs (seq_len * 16) and one 128 x 128 block of scores.
    assert forward_mode.largest_numel <= 128 * 128
    assert backward_mode.matmul_calls > 0  # the backward ran under the mode
    assert backward_mode.largest_numel <= 128 * 128
    assert forward_mode.largest_numel < seq_len * seq_len // 32


def test_largest_tensor_mode_sees_naive_score_matrix():
    seq_len = 1024
    (queries, keys, values), _ = causal_inputs(seq_len)

    with LargestTensorMode() as mode:
        reference_attention(queries, keys, values, causal=True)

    assert mode.largest_numel >= seq_len * seq_len


def test_flash_causal_skips_hidden_key_blocks():
    (queries, keys, values), _ = causal_inputs(64)

    with LargestTensorMode() as causal_mode:
        flash_attention(queries, keys, values, causal=True, block_q=16, block_k=16)
    with LargestTensorMode() as full_mode:
        flash_attention(queries, keys, values, causal=False, block_q=16, block_k=16)

    # 4 x 4 blocks, two matmuls each: all 16 blocks without causality, the 10 on or below the diagonal with it.
    assert full_mode.matmul_calls == 2 * 16
    assert causal_mode.matmul_calls == 2 * 10


def bytes_saved_for_backward(attention, seq_len) -> int:
    """Run ``attention`` forward and return the bytes of all tensors autograd saves for backward."""
    (queries, keys, values), mask = causal_inputs(seq_len, padding=True)
    saved_bytes = 0

    def pack(tensor):
        nonlocal saved_bytes
        saved_bytes += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        attention(queries, keys, values, mask)
    return saved_bytes


def test_flash_saved_memory_grows_linearly():
    def flash(queries, keys, values, mask):
        return flash_attention(queries, keys, values, mask=mask, causal=True, block_q=64, block_k=64)

    saved_short = bytes_saved_for_backward(flash, 512)
    saved_long = bytes_saved_for_backward(flash, 1024)

    assert saved_short > 0
    assert saved_long / saved_short == pytest.approx(2.0, rel=0.05)


def test_saved_memory_check_sees_naive_growth():
    def naive(queries, keys, values, mask):
        return reference_attention(queries, keys, values, mask=mask, causal=True)

    saved_short = bytes_saved_for_backward(naive, 512)
    saved_long = bytes_saved_for_backward(naive, 1024)

    assert saved_long / saved_short > 3.5
