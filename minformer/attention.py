"""Scaled dot-product attention and multi-head attention (Vaswani et al. 2017, sec. 3.2).

Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + bias) V   (eq. 1)

Backends compute the same function:
- ``naive``: materialises the (batch, heads, q_len, k_len) weights and can return them;
- ``sdpa``: PyTorch's fused ``scaled_dot_product_attention`` kernel;
- ``flash``: minformer's blockwise FlashAttention (``minformer.flash``), memory linear in length.

Masks are boolean with True meaning "may attend". A causal mask aligns the last query with the
last key, so that a block of new queries over a longer key sequence (decoding with a cache)
sees every earlier key. A query whose keys are all masked returns zeros.

Head layouts: multi-head (n_kv_heads == n_heads), grouped-query (Ainslie et al. 2023) and
multi-query (n_kv_heads == 1, Shazeer 2019); each key/value head serves n_heads // n_kv_heads
query heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minformer.cache import LayerKVCache
from minformer.flash import flash_attention
from minformer.linear import Linear
from minformer.positions import Rotation

BACKENDS = ("naive", "sdpa", "flash")


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Return a (q_len, k_len) boolean mask where query i sees keys j <= i + (k_len - q_len)."""
    offset = k_len - q_len
    query_positions = torch.arange(q_len, device=device).unsqueeze(1) + offset
    key_positions = torch.arange(k_len, device=device).unsqueeze(0)
    return key_positions <= query_positions


def sliding_window_mask(q_len: int, k_len: int, window: int, device=None) -> torch.Tensor:
    """Return a (q_len, k_len) boolean mask where query i sees keys j > i + (k_len - q_len) - window.

    Combined with the causal mask, each query sees itself and the ``window - 1`` keys before it
    (Child et al. 2019; the convention of Mistral's sliding-window attention).
    """
    offset = k_len - q_len
    query_positions = torch.arange(q_len, device=device).unsqueeze(1) + offset
    key_positions = torch.arange(k_len, device=device).unsqueeze(0)
    return key_positions > query_positions - window


def padding_mask(key_padding: torch.Tensor) -> torch.Tensor | None:
    """Turn a (batch, k_len) mask of 1 = real token, 0 = padding into a (batch, 1, 1, k_len) bool mask.

    Returns None when no position is padding, because such a mask changes no output but costs every
    layer time. The fused kernels leave their unmasked path, and a score bias has to be merged with
    the mask into a (batch, heads, q_len, k_len) tensor.
    """
    mask = key_padding.bool()[:, None, None, :]
    # Under torch.compile, reading the mask's value back would split the graph, so the mask stays.
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask


def combine_masks(*masks: torch.Tensor | None) -> torch.Tensor | None:
    """AND together the given boolean masks (broadcasting), skipping None."""
    combined = None
    for mask in masks:
        if mask is None:
            continue
        combined = mask if combined is None else combined & mask
    return combined


def naive_attention(queries, keys, values, mask=None, scale=None, dropout_p=0.0, return_weights=False, bias=None):
    """Attention by eq. 1 with the weights materialised.

    Shapes: queries (batch, heads, q_len, head_dim); keys and values (batch, heads, k_len, head_dim);
    mask broadcastable to (batch, heads, q_len, k_len), True = attend; bias (float) likewise.
    """
    scale = 1.0 / math.sqrt(queries.size(-1)) if scale is None else scale
    attn_scores = torch.matmul(queries, keys.transpose(-2, -1)) * scale  # (batch, heads, q_len, k_len)
    if bias is not None:
        attn_scores = attn_scores + bias.to(attn_scores.dtype)
    if mask is not None:
        # The most negative finite value, not -inf, keeps a fully masked row finite (softmax of
        # equal scores); multiplying by the mask afterwards turns that row into zeros.
        attn_scores = attn_scores.masked_fill(~mask, torch.finfo(attn_scores.dtype).min)
    attn_weights = torch.softmax(attn_scores, dim=-1)
    if mask is not None:
        attn_weights = attn_weights * mask
    if dropout_p > 0.0:
        attn_weights = F.dropout(attn_weights, p=dropout_p)
    output = torch.matmul(attn_weights, values)
    return (output, attn_weights) if return_weights else (output, None)


def sdpa_attention(queries, keys, values, mask=None, scale=None, dropout_p=0.0, is_causal=False, bias=None):
    """Attention through ``torch.nn.functional.scaled_dot_product_attention``.

    A score ``bias`` goes in as a float ``attn_mask``, with masked positions set to the most
    negative finite value (not -inf, which would make a fully masked row NaN).
    """
    attn_mask = mask
    if bias is not None:
        bias = bias.to(queries.dtype)
        attn_mask = bias if mask is None else torch.where(mask, bias, torch.finfo(queries.dtype).min)
    output = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )
    if mask is not None:
        # A fully masked query gives NaN in some fused kernels; the contract here is zeros.
        fully_masked = ~mask.any(dim=-1, keepdim=True)
        if bool(fully_masked.any()):
            output = output.masked_fill(fully_masked, 0.0)
    return output


def scaled_dot_product_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "sdpa",
    return_weights: bool = False,
    bias: torch.Tensor | None = None,
):
    """Compute eq. 1 with the chosen backend; returns ``(output, attn_weights or None)``.

    ``causal`` adds the causal mask aligned to the last key; ``window`` adds the sliding-window
    mask (see ``sliding_window_mask``). ``bias``, a float tensor
    broadcastable to (batch, heads, q_len, k_len), is added to the scaled scores before the
    softmax (ALiBi, T5 relative positions). ``return_weights`` requires the ``naive`` backend,
    the only one that materialises the weights.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention_backend={backend!r} is invalid; allowed values: {', '.join(BACKENDS)}.")
    q_len, k_len = queries.size(-2), keys.size(-2)
    if return_weights and backend != "naive":
        raise ValueError("return_weights=True needs attention_backend='naive'; the fused kernels never form the weights.")
    if causal and q_len == 1:
        # One query aligned with the last key sees every key, so the causal mask would be all True.
        # Dropping it spares each decoding step building that mask and checking it for empty rows.
        causal = False

    if backend == "sdpa" and causal and mask is None and bias is None and window is None and q_len == k_len:
        # The fused kernel's own causal path is the fastest; it aligns top-left, which is the same
        # as bottom-right only when q_len == k_len.
        return sdpa_attention(queries, keys, values, scale=scale, dropout_p=dropout_p, is_causal=True), None

    if backend == "flash":
        # The flash kernel applies causality block by block, so no (q_len, k_len) mask is built.
        output = flash_attention(
            queries, keys, values, mask=mask, causal=causal, window=window, scale=scale, bias=bias, dropout_p=dropout_p
        )
        return output, None

    full_mask = combine_masks(
        mask,
        causal_mask(q_len, k_len, queries.device) if causal else None,
        sliding_window_mask(q_len, k_len, window, queries.device) if window is not None else None,
    )
    if backend == "naive":
        return naive_attention(queries, keys, values, full_mask, scale, dropout_p, return_weights, bias)
    return sdpa_attention(queries, keys, values, full_mask, scale, dropout_p, bias=bias), None


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017, eq. 4-5) with MHA, GQA and MQA head layouts.

    Self-attention when ``memory`` is None, cross-attention over ``memory`` otherwise.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        d_head: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        backend: str = "sdpa",
        causal: bool = False,
        scale: float | None = None,
        window: int | None = None,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.d_head = d_head or d_model // n_heads
        self.backend = backend
        self.causal = causal
        self.window = window
        self.scale = scale
        self.dropout = dropout
        self.q_proj = Linear(d_model, self.n_heads * self.d_head, bias=bias)
        self.k_proj = Linear(d_model, self.n_kv_heads * self.d_head, bias=bias)
        self.v_proj = Linear(d_model, self.n_kv_heads * self.d_head, bias=bias)
        self.out_proj = Linear(self.n_heads * self.d_head, d_model, bias=bias)

    def split_heads(self, projected: torch.Tensor, n_heads: int) -> torch.Tensor:
        """(batch, seq, n_heads * d_head) -> (batch, n_heads, seq, d_head)."""
        batch, seq, _ = projected.shape
        return projected.view(batch, seq, n_heads, self.d_head).transpose(1, 2)

    def forward(
        self,
        hidden: torch.Tensor,
        memory: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        return_weights: bool = False,
        bias: torch.Tensor | None = None,
        rotation: Rotation | None = None,
        kv_cache: LayerKVCache | None = None,
    ):
        """Attend from ``hidden`` (batch, q_len, d_model); returns ``(output, attn_weights or None)``.

        ``bias`` is added to the scores (see ``scaled_dot_product_attention``); ``rotation``
        rotates queries and keys (RoPE). With ``kv_cache`` the new keys and values are appended to
        the cache and the queries attend over every cached position, so ``mask`` must cover the
        cached and new keys.
        """
        source = hidden if memory is None else memory
        queries = self.split_heads(self.q_proj(hidden), self.n_heads)  # (batch, heads, q_len, d_head)
        keys = self.split_heads(self.k_proj(source), self.n_kv_heads)  # (batch, kv_heads, new_len, d_head)
        values = self.split_heads(self.v_proj(source), self.n_kv_heads)

        if rotation is not None:
            queries = rotation.apply(queries)
            keys = rotation.apply(keys)
        if kv_cache is not None:
            keys, values = kv_cache.append(keys, values)  # (batch, kv_heads, k_len, d_head)

        context, attn_weights = self.attend(
            queries, keys, values, mask, self_attention=memory is None, return_weights=return_weights, bias=bias
        )
        return self.out_proj(context), attn_weights

    def attend(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
        self_attention: bool, return_weights: bool, bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend with split heads; returns the context (batch, q_len, n_heads * d_head) and the weights or None.

        Key and value heads are repeated to the query heads (grouped-query attention). The causal
        mask and the sliding window apply to self-attention only.
        """
        if self.n_kv_heads != self.n_heads:
            group_size = self.n_heads // self.n_kv_heads
            keys = keys.repeat_interleave(group_size, dim=1)  # (batch, heads, k_len, d_head)
            values = values.repeat_interleave(group_size, dim=1)

        context, attn_weights = scaled_dot_product_attention(
            queries,
            keys,
            values,
            mask=mask,
            causal=self.causal and self_attention,
            window=self.window if self_attention else None,
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend,
            return_weights=return_weights,
            bias=bias,
        )
        batch, _, q_len, _ = context.shape
        return context.transpose(1, 2).reshape(batch, q_len, self.n_heads * self.d_head), attn_weights

    def forward_packed(
        self, packed: torch.Tensor, token_index: torch.Tensor, shape: tuple[int, int], mask: torch.Tensor,
        return_weights: bool = False,
    ):
        """Self-attend over the real tokens of a padded batch; returns ``(output (n_real, d_model), weights or None)``.

        ``packed`` (n_real, d_model) contains the real tokens of a (batch, seq) = ``shape`` batch, in the
        order of ``token_index``, their flat indices in batch * seq. The projections run on the
        real tokens. Attention runs in the padded layout, where padding positions have zero queries,
        keys and values and ``mask`` must hide the padding keys.
        """
        batch, seq = shape
        padded = []
        for projection, n_heads in ((self.q_proj, self.n_heads), (self.k_proj, self.n_kv_heads), (self.v_proj, self.n_kv_heads)):
            projected = projection(packed)  # (n_real, n_heads * d_head)
            full = projected.new_zeros(batch * seq, projected.size(-1)).index_copy_(0, token_index, projected)
            padded.append(self.split_heads(full.view(batch, seq, -1), n_heads))
        queries, keys, values = padded
        context, attn_weights = self.attend(queries, keys, values, mask, self_attention=True, return_weights=return_weights)
        context = context.reshape(batch * seq, self.n_heads * self.d_head)
        return self.out_proj(context.index_select(0, token_index)), attn_weights
