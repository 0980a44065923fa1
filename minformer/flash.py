"""FlashAttention in PyTorch: exact attention in memory linear in the sequence length.

Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness".
The forward pass (Algorithm 1) visits the key blocks of each query block and keeps a running row
maximum m and running sum l of exp(scores - m), the online softmax, so the (q_len, k_len) score
matrix never exists. It saves only the inputs, the output and the per-row logsumexp L = m + log(l).
The backward pass recomputes each block's probabilities P = exp(S - L) from L. Both passes use the
loop order of FlashAttention-2 (Dao 2023, Algorithms 1 and 2): query blocks outside in the
forward, key blocks outside in the backward.

Conventions match ``attention.py``: tensors are (batch, heads, seq, head_dim), masks are boolean
with True meaning "may attend", and a causal mask aligns the last query with the last key, so that
query i attends to key j iff j <= i + (k_len - q_len). A query whose keys are all masked returns zeros
and passes back zero gradients.

Half-precision inputs are computed in float32 blocks, and the output is cast back to the input
dtype. Float32 and float64 inputs are computed in their own dtype. Key blocks that causality hides
from a whole query block are skipped, which roughly halves the work of causal attention. Blocks
that ``mask`` hides entirely are skipped too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Each block step runs a few Python-level tensor ops, so on CPU small blocks spend their time in
# the interpreter. 512 x 512 blocks keep that overhead small at long sequences while one block of
# float32 scores stays 1 MB per (batch, head).
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


@dataclass(frozen=True)
class _Tiling:
    """The problem the kernel tiles: lengths, block sizes, scale and masking."""

    q_len: int
    k_len: int
    block_q: int
    block_k: int
    scale: float
    causal: bool
    window: int | None = None

    @property
    def causal_offset(self) -> int:
        """Diagonal shift: query i attends to key j iff j <= i + causal_offset."""
        return self.k_len - self.q_len

    def query_blocks(self, first_query: int = 0) -> list[slice]:
        """Return the query blocks of the fixed grid, from the block that holds ``first_query``."""
        start = (max(first_query, 0) // self.block_q) * self.block_q
        return [slice(i, min(i + self.block_q, self.q_len)) for i in range(start, self.q_len, self.block_q)]

    def key_blocks(self, key_end: int | None = None, key_start: int = 0) -> list[slice]:
        """Return the key blocks of the fixed grid that hold a key in [key_start, key_end)."""
        key_end = self.k_len if key_end is None else min(key_end, self.k_len)
        start = (max(key_start, 0) // self.block_k) * self.block_k
        return [slice(j, min(j + self.block_k, self.k_len)) for j in range(start, max(key_end, 0), self.block_k)]

    def keys_seen_by(self, rows: slice) -> list[slice]:
        """Return the key blocks that some query in ``rows`` may see under causality and the window."""
        key_end = rows.stop + self.causal_offset if self.causal else None
        # Query i sees keys j > i + offset - window, so the first query of the block sees the most.
        key_start = rows.start + self.causal_offset - self.window + 1 if self.window is not None else 0
        return self.key_blocks(key_end, key_start)

    def queries_seeing(self, cols: slice) -> list[slice]:
        """Return the query blocks in which some query may see a key of ``cols`` under causality and the window."""
        blocks = self.query_blocks(cols.start - self.causal_offset) if self.causal else self.query_blocks()
        if self.window is None:
            return blocks
        last_query = cols.stop - 1 - self.causal_offset + self.window - 1
        return [rows for rows in blocks if rows.start <= last_query]


def _as_4d(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Prepend size-1 dimensions so a broadcastable mask or bias has 4 dimensions (a view)."""
    if tensor is None:
        return None
    return tensor.reshape((1,) * (4 - tensor.dim()) + tuple(tensor.shape))


def _block_of(tensor: torch.Tensor | None, rows: slice, cols: slice) -> torch.Tensor | None:
    """Slice the (rows, cols) block out of a tensor broadcastable to (batch, heads, q_len, k_len).

    A size-1 query or key dimension is kept whole, so a broadcast mask is never expanded.
    """
    if tensor is None:
        return None
    row_index = rows if tensor.size(-2) > 1 else slice(None)
    col_index = cols if tensor.size(-1) > 1 else slice(None)
    return tensor[..., row_index, col_index]


def _block_visibility(tiling: _Tiling, mask: torch.Tensor | None, rows: slice, cols: slice, device):
    """Return the boolean visibility of a block (broadcastable to it), or None if all is visible."""
    visible = _block_of(mask, rows, cols)
    last_key = cols.stop - 1
    if tiling.causal and last_key > rows.start + tiling.causal_offset:
        # The block crosses the diagonal. Blocks wholly below it need no causal mask.
        query_positions = torch.arange(rows.start, rows.stop, device=device).unsqueeze(1)
        key_positions = torch.arange(cols.start, cols.stop, device=device).unsqueeze(0)
        causal_block = key_positions <= query_positions + tiling.causal_offset  # (block_q, block_k)
        visible = causal_block if visible is None else visible & causal_block
    if tiling.window is not None and cols.start <= rows.stop - 1 + tiling.causal_offset - tiling.window:
        # The block crosses the window's lower edge: its last query cannot see its first key.
        query_positions = torch.arange(rows.start, rows.stop, device=device).unsqueeze(1)
        key_positions = torch.arange(cols.start, cols.stop, device=device).unsqueeze(0)
        window_block = key_positions > query_positions + tiling.causal_offset - tiling.window
        visible = window_block if visible is None else visible & window_block
    return visible


def _block_scores(q_block, k_block, bias_block, visible, scale):
    """Return the scores S = scale * Q K^T + bias of a block, -inf where not visible."""
    # In-place steps keep one block-sized tensor alive instead of three.
    scores = torch.matmul(q_block, k_block.transpose(-2, -1)).mul_(scale)  # (batch, heads, block_q, block_k)
    if bias_block is not None:
        scores.add_(bias_block)
    if visible is not None:
        scores.masked_fill_(~visible, float("-inf"))
    return scores


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return float32 for half-precision inputs and the input dtype for float32 and float64."""
    return torch.promote_types(dtype, torch.float32)


def _reduce_to_shape(gradient: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a block gradient over the dimensions in which a broadcast tensor of ``shape`` has size 1."""
    broadcast_dims = [dim for dim in range(4) if shape[dim] == 1 and gradient.size(dim) != 1]
    if not broadcast_dims:
        return gradient
    return gradient.sum(dim=broadcast_dims, keepdim=True)


def _flash_forward(queries, keys, values, mask, bias, tiling: _Tiling):
    """Run the blockwise forward pass with float32 or float64 accumulators. Return ``(output, logsumexp)``."""
    batch, heads, _, _ = queries.shape
    value_dim = values.size(-1)
    dtype = _compute_dtype(queries.dtype)
    queries, keys, values = queries.to(dtype), keys.to(dtype), values.to(dtype)
    output = queries.new_zeros(batch, heads, tiling.q_len, value_dim)
    logsumexp = queries.new_empty(batch, heads, tiling.q_len)

    for rows in tiling.query_blocks():
        q_block = queries[:, :, rows]  # (batch, heads, block_q, head_dim)
        n_rows = rows.stop - rows.start
        row_max = queries.new_full((batch, heads, n_rows, 1), float("-inf"))
        row_sum = queries.new_zeros(batch, heads, n_rows, 1)
        accumulator = queries.new_zeros(batch, heads, n_rows, value_dim)

        for cols in tiling.keys_seen_by(rows):
            visible = _block_visibility(tiling, mask, rows, cols, queries.device)
            # NOTE: this check synchronises with the device once per block, which costs time on GPUs.
            if visible is not None and mask is not None and not bool(visible.any()):
                continue
            scores = _block_scores(q_block, keys[:, :, cols], _block_of(bias, rows, cols), visible, tiling.scale)

            # Online softmax: rescale what was summed under the old max to the new max.
            new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
            # A row with no visible key so far has max -inf. Subtracting 0 instead keeps its
            # exp() terms at exp(-inf) = 0, where -inf - (-inf) would give NaN.
            safe_max = new_max.masked_fill(new_max == float("-inf"), 0.0)
            probs = scores.sub_(safe_max).exp_()
            rescale = torch.exp(row_max - safe_max)
            row_sum = row_sum * rescale + probs.sum(dim=-1, keepdim=True)
            accumulator = accumulator * rescale + torch.matmul(probs, values[:, :, cols])
            row_max = new_max

        # Every row with a visible finite score has row_sum >= 1 (its maximum contributes exp(0)).
        has_keys = row_sum > 0
        output[:, :, rows] = torch.where(has_keys, accumulator / row_sum.clamp_min(1.0e-30), 0.0)
        # A fully masked row gets L = +inf, so the backward's exp(S - L) is 0 for it and never NaN.
        row_logsumexp = torch.where(has_keys, row_max + torch.log(row_sum.clamp_min(1.0e-30)), float("inf"))
        logsumexp[:, :, rows] = row_logsumexp.squeeze(-1)
    return output, logsumexp


def _flash_backward(grad_output, queries, keys, values, output, logsumexp, mask, bias, tiling, need_bias_grad):
    """Run the blockwise backward pass, recomputing P from the saved logsumexp. Return float32 or float64 gradients."""
    dtype = _compute_dtype(queries.dtype)
    queries, keys, values = queries.to(dtype), keys.to(dtype), values.to(dtype)
    grad_output = grad_output.to(dtype)
    # D_i = rowsum(dO_i * O_i) equals rowsum(P_i * dP_i), the softmax backward's subtracted term.
    delta = (grad_output * output.to(dtype)).sum(dim=-1, keepdim=True)  # (batch, heads, q_len, 1)
    lse = logsumexp.unsqueeze(-1)  # (batch, heads, q_len, 1)

    grad_queries = torch.zeros_like(queries)
    grad_keys = torch.zeros_like(keys)
    grad_values = torch.zeros_like(values)
    grad_bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_bias_grad else None

    for cols in tiling.key_blocks():
        k_block = keys[:, :, cols]  # (batch, heads, block_k, head_dim)
        v_block = values[:, :, cols]
        grad_k_block = torch.zeros_like(k_block)
        grad_v_block = torch.zeros_like(v_block)

        for rows in tiling.queries_seeing(cols):
            visible = _block_visibility(tiling, mask, rows, cols, queries.device)
            if mask is not None and not bool(visible.any()):
                continue
            q_block = queries[:, :, rows]
            grad_out_block = grad_output[:, :, rows]
            scores = _block_scores(q_block, k_block, _block_of(bias, rows, cols), visible, tiling.scale)
            probs = scores.sub_(lse[:, :, rows]).exp_()  # (batch, heads, block_q, block_k)

            grad_v_block += torch.matmul(probs.transpose(-2, -1), grad_out_block)
            grad_probs = torch.matmul(grad_out_block, v_block.transpose(-2, -1))
            grad_scores = grad_probs.sub_(delta[:, :, rows]).mul_(probs)  # dS = P * (dP - D)
            grad_queries[:, :, rows] += torch.matmul(grad_scores, k_block).mul_(tiling.scale)
            grad_k_block += torch.matmul(grad_scores.transpose(-2, -1), q_block).mul_(tiling.scale)
            if grad_bias is not None:
                _block_of(grad_bias, rows, cols).add_(_reduce_to_shape(grad_scores, grad_bias.shape))

        grad_keys[:, :, cols] = grad_k_block
        grad_values[:, :, cols] = grad_v_block
    return grad_queries, grad_keys, grad_values, grad_bias


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: the forward saves q, k, v, output and logsumexp, never the weights."""

    @staticmethod
    def forward(ctx, queries, keys, values, bias, mask, tiling):
        output, logsumexp = _flash_forward(queries, keys, values, mask, bias, tiling)
        output = output.to(queries.dtype)
        ctx.save_for_backward(queries, keys, values, output, logsumexp, mask, bias)
        ctx.tiling = tiling
        return output

    @staticmethod
    def backward(ctx, grad_output):
        queries, keys, values, output, logsumexp, mask, bias = ctx.saved_tensors
        need_bias_grad = bias is not None and ctx.needs_input_grad[3]
        grad_queries, grad_keys, grad_values, grad_bias = _flash_backward(
            grad_output, queries, keys, values, output, logsumexp, mask, bias, ctx.tiling, need_bias_grad
        )
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        grad_queries, grad_keys, grad_values = (
            grad.to(tensor.dtype) for grad, tensor in zip((grad_queries, grad_keys, grad_values), (queries, keys, values))
        )
        return grad_queries, grad_keys, grad_values, grad_bias, None, None


def _check_broadcastable(name: str, tensor: torch.Tensor, target: tuple[int, ...]) -> None:
    """Raise ValueError unless ``tensor`` broadcasts to ``target`` = (batch, heads, q_len, k_len)."""
    if tensor.dim() > 4 or any(size not in (1, want) for size, want in zip(_as_4d(tensor).shape, target)):
        raise ValueError(
            f"{name} of shape {tuple(tensor.shape)} does not broadcast to (batch, heads, q_len, k_len) = {target}. "
            "Give it 4 or fewer dimensions, each 1 or the full size."
        )


def _check_inputs(queries, keys, values, mask, bias, dropout_p, block_q, block_k) -> None:
    """Raise ValueError for inputs the kernel does not accept, naming the value and the fix."""
    if dropout_p > 0.0:
        raise ValueError(
            f"dropout_p={dropout_p} is not supported by the flash backend. Use attention_backend='naive' or 'sdpa' "
            "to train with attention dropout."
        )
    if queries.dim() != 4 or keys.dim() != 4 or values.dim() != 4:
        raise ValueError("queries, keys and values must be 4-dimensional: (batch, heads, seq, head_dim).")
    if keys.shape[:2] != queries.shape[:2] or values.shape[:3] != keys.shape[:3]:
        raise ValueError(
            f"shapes do not match: queries {tuple(queries.shape)}, keys {tuple(keys.shape)}, values "
            f"{tuple(values.shape)}. Expand grouped key/value heads to the query heads before calling."
        )
    if keys.size(-1) != queries.size(-1):
        raise ValueError(f"keys head_dim {keys.size(-1)} differs from queries head_dim {queries.size(-1)}.")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q={block_q} and block_k={block_k} are invalid: both must be at least 1.")

    target = (queries.size(0), queries.size(1), queries.size(2), keys.size(2))
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask has dtype {mask.dtype}. Pass a boolean mask with True meaning 'may attend'.")
        _check_broadcastable("mask", mask, target)
    if bias is not None:
        _check_broadcastable("bias", bias, target)


def flash_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> torch.Tensor:
    """Compute softmax(scale * Q K^T + bias) V blockwise, in memory linear in the sequence length.

    Shapes: queries (batch, heads, q_len, head_dim); keys (batch, heads, k_len, head_dim); values
    (batch, heads, k_len, value_dim). ``mask`` (boolean, True = may attend) and ``bias`` (added to
    the scaled scores, e.g. ALiBi or T5 relative bias) broadcast to (batch, heads, q_len, k_len)
    and are sliced block by block, never expanded. ``causal`` aligns the last query with the last
    key. ``window`` (sliding-window attention) lets query i see only keys j with
    j > i + (k_len - q_len) - window; key blocks wholly outside that band are skipped.
    ``scale`` defaults to 1 / sqrt(head_dim). A bias that requires grad gets its gradient,
    summed over its broadcast dimensions. Returns the output (batch, heads, q_len, value_dim) in
    the dtype of ``queries``, and a query with no visible key returns zeros.
    """
    # Limitation: no attention dropout, so dropout_p > 0 raises ValueError.
    _check_inputs(queries, keys, values, mask, bias, dropout_p, block_q, block_k)
    tiling = _Tiling(
        q_len=queries.size(2),
        k_len=keys.size(2),
        block_q=block_q,
        block_k=block_k,
        scale=1.0 / math.sqrt(queries.size(-1)) if scale is None else float(scale),
        causal=causal,
        window=window,
    )
    return FlashAttentionFunction.apply(queries, keys, values, _as_4d(bias), _as_4d(mask), tiling)
