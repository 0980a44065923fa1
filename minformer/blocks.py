"""Transformer blocks: a sub-layer of attention, optionally cross-attention, then a feed-forward.

Post-LN (Vaswani et al. 2017, sec. 5.4): x = Norm(x + Dropout(Sublayer(x))).
Pre-LN (Xiong et al. 2020, eq. in Table 1; GPT-2): x = x + Dropout(Sublayer(Norm(x))).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minformer.attention import MultiHeadAttention
from minformer.cache import LayerKVCache
from minformer.feedforward import FeedForward, apply_dropout
from minformer.moe import MoEFeedForward
from minformer.norms import build_norm
from minformer.positions import Rotation


@dataclass(frozen=True)
class BlockConfig:
    """The fields a block needs, taken from a family config by its ``block_config()``."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_ff: int
    activation: str
    norm: str
    norm_eps: float
    norm_position: str
    attention_backend: str
    dropout: float
    bias: bool
    causal: bool
    cross_attention: bool = False
    sliding_window: int | None = None
    attention_scale: float | None = None
    """Factor on q.k in self- and cross-attention; None for 1/sqrt(d_head). T5 uses 1.0."""
    moe: bool = False
    """Whether the feed-forward is a mixture of experts (the moe_* fields below) instead of one network."""
    moe_n_experts: int = 8
    moe_top_k: int = 2
    moe_capacity_factor: float | None = None
    moe_balance_coef: float = 0.01
    moe_z_loss_coef: float = 0.001


class TransformerBlock(nn.Module):
    """An encoder block (non-causal self-attention) or a decoder block (causal, optional cross-attention)."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attn_norm = build_norm(config.norm, config.d_model, config.norm_eps, config.bias)
        self.attn = MultiHeadAttention(
            config.d_model,
            config.n_heads,
            config.n_kv_heads,
            config.d_head,
            bias=config.bias,
            dropout=config.dropout,
            backend=config.attention_backend,
            causal=config.causal,
            scale=config.attention_scale,
            window=config.sliding_window,
        )
        if config.cross_attention:
            self.cross_norm = build_norm(config.norm, config.d_model, config.norm_eps, config.bias)
            self.cross_attn = MultiHeadAttention(
                config.d_model,
                config.n_heads,
                config.n_kv_heads,
                config.d_head,
                bias=config.bias,
                dropout=config.dropout,
                backend=config.attention_backend,
                scale=config.attention_scale,
            )
        else:
            self.cross_norm = None
            self.cross_attn = None
        self.ffn_norm = build_norm(config.norm, config.d_model, config.norm_eps, config.bias)
        if config.moe:
            self.ffn = MoEFeedForward(
                config.d_model,
                config.d_ff,
                config.activation,
                bias=config.bias,
                n_experts=config.moe_n_experts,
                top_k=config.moe_top_k,
                capacity_factor=config.moe_capacity_factor,
                balance_coef=config.moe_balance_coef,
                z_loss_coef=config.moe_z_loss_coef,
            )
        else:
            self.ffn = FeedForward(config.d_model, config.d_ff, config.activation, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def residual(self, hidden: torch.Tensor, norm: nn.Module, sublayer) -> torch.Tensor:
        """Apply one sub-layer with its residual connection, pre-LN or post-LN."""
        if self.pre_norm:
            return hidden + apply_dropout(self.resid_dropout, sublayer(norm(hidden)))
        return norm(hidden + apply_dropout(self.resid_dropout, sublayer(hidden)))

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        return_weights: bool = False,
        bias: torch.Tensor | None = None,
        rotation: Rotation | None = None,
        kv_cache: LayerKVCache | None = None,
        moe_stats: list | None = None,
        memory_kv_cache: LayerKVCache | None = None,
    ):
        """Run the block on (batch, seq, d_model); returns ``(hidden, self-attention weights or None)``.

        ``bias``, ``rotation`` and ``kv_cache`` reach the self-attention only. A mixture-of-experts
        block appends its ``MoEStats`` to ``moe_stats`` when that list is given.
        ``memory_kv_cache`` reaches the cross-attention: it stores the keys and values of ``memory``,
        so a later call may pass an empty (batch, 0, d_model) ``memory`` and reuse them.
        """
        weights = []

        def self_attention(normed):
            output, attn_weights = self.attn(
                normed, mask=mask, return_weights=return_weights, bias=bias, rotation=rotation, kv_cache=kv_cache
            )
            weights.append(attn_weights)
            return output

        hidden = self.residual(hidden, self.attn_norm, self_attention)
        if self.cross_attn is not None and memory is not None:
            hidden = self.residual(
                hidden, self.cross_norm, lambda normed: self.cross_attn(normed, memory=memory, mask=memory_mask, kv_cache=memory_kv_cache)[0]
            )
        hidden = self.residual(hidden, self.ffn_norm, lambda normed: self.feed_forward(normed, moe_stats))
        return hidden, weights[0]

    def forward_packed(
        self, packed: torch.Tensor, token_index: torch.Tensor, shape: tuple[int, int], mask: torch.Tensor,
        return_weights: bool = False,
    ):
        """Run an encoder block on the real tokens only; returns ``(packed, self-attention weights or None)``.

        ``packed`` (n_real, d_model) contains the real tokens of a (batch, seq) = ``shape`` batch, in the
        order of ``token_index``, their flat indices in batch * seq. Only attention needs the padded
        layout: ``mask`` hides the padding keys there. Every other operation acts on one token at a
        time, so it skips padding. Blocks with cross-attention or mixture-of-experts layers use ``forward``.
        """
        if self.cross_attn is not None or isinstance(self.ffn, MoEFeedForward):
            raise ValueError("forward_packed runs encoder blocks with a dense feed-forward only; call forward instead.")
        weights = []

        def self_attention(normed):
            output, attn_weights = self.attn.forward_packed(normed, token_index, shape, mask, return_weights)
            weights.append(attn_weights)
            return output

        packed = self.residual(packed, self.attn_norm, self_attention)
        packed = self.residual(packed, self.ffn_norm, self.ffn)
        return packed, weights[0]

    def feed_forward(self, normed: torch.Tensor, moe_stats: list | None) -> torch.Tensor:
        """Apply the feed-forward sub-layer, collecting a mixture of experts' stats into ``moe_stats``."""
        if not isinstance(self.ffn, MoEFeedForward):
            return self.ffn(normed)
        output, stats = self.ffn(normed)
        if moe_stats is not None:
            moe_stats.append(stats)
        return output
