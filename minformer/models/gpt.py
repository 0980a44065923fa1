"""GPT: a decoder-only Transformer language model (Radford et al. 2018, 2019).

tokens -> token embedding (+ absolute positions) -> n_layers causal blocks -> final norm -> logits,
with the output layer tied to the token embedding (Press & Wolf 2017). GPT-2 initialisation:
weights ~ N(0, 0.02), and the projections that write into the residual stream scaled by
1/sqrt(2 * n_layers) (Radford et al. 2019, sec. 2.3), since each block adds two of them.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minformer.attention import BACKENDS, padding_mask
from minformer.blocks import BlockConfig, TransformerBlock
from minformer.cache import KVCache
from minformer.config import FamilyConfig, check_choice, check_int, check_positive
from minformer.feedforward import ACTIVATIONS, FeedForward
from minformer.linear import Linear
from minformer.moe import MoEFeedForward, MoEStats
from minformer.norms import NORMS, build_norm
from minformer.positions import (
    POSITIONS,
    ROPE_SCALINGS,
    build_absolute_positions,
    build_rotary,
    build_score_bias,
)


@dataclass(frozen=True)
class GPTConfig(FamilyConfig):
    """Hyperparameters of a GPT, in the vocabulary every minformer family shares."""

    vocab_size: int = 50257
    """Number of token ids."""
    max_seq_len: int = 1024
    """Maximum sequence length the model accepts (size of the learned position table)."""
    d_model: int = 768
    """Width of the residual stream."""
    n_layers: int = 12
    """Number of decoder blocks."""
    n_heads: int = 12
    """Number of query heads."""
    n_kv_heads: int | None = None
    """Number of key/value heads; n_heads (MHA) when unset, 1 for MQA, in between for GQA."""
    d_head: int | None = None
    """Width of each head; d_model // n_heads when unset."""
    d_ff: int | None = None
    """Inner width of the feed-forward network; 4 * d_model when unset."""
    activation: str = "gelu_tanh"
    """Feed-forward activation: one of minformer.feedforward.ACTIVATIONS."""
    norm: str = "layernorm"
    """Normalisation: layernorm or rmsnorm."""
    norm_eps: float = 1e-5
    """Epsilon added to the variance in every norm."""
    norm_position: str = "pre"
    """pre (GPT-2) or post (the 2017 Transformer) layer norm."""
    position: str = "learned"
    """Position scheme: one of minformer.positions.POSITIONS."""
    rope_base: float = 10000.0
    """RoPE: base of the rotation frequencies base^(-2i/d_head)."""
    rope_interleaved: bool = False
    """RoPE: rotate adjacent feature pairs (2i, 2i+1) instead of the halves (i, i + d_head/2)."""
    rope_scaling: str | None = None
    """RoPE context extension, fixed at construction: None, linear, ntk or yarn."""
    rope_scaling_factor: float = 1.0
    """RoPE: context-extension factor (extended context / trained context); 1.0 without scaling."""
    rope_original_max_seq_len: int | None = None
    """RoPE with yarn scaling: the context length the model was trained on."""
    rope_yarn_beta_fast: float = 32.0
    """YaRN: frequencies turning more often than this over the original context are kept."""
    rope_yarn_beta_slow: float = 1.0
    """YaRN: frequencies turning less often than this over the original context are interpolated."""
    t5_num_buckets: int = 32
    """T5 relative positions: number of distance buckets."""
    t5_max_distance: int = 128
    """T5 relative positions: distance from which all keys share the last bucket."""
    attention_backend: str = "sdpa"
    """naive (materialises the weights), sdpa (PyTorch's fused kernel) or flash (minformer's FlashAttention)."""
    sliding_window: int | None = None
    """When set, each token attends only to itself and the sliding_window - 1 tokens before it."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches during training."""
    bias: bool = True
    """Whether linear layers and layer norms have biases."""
    tie_embeddings: bool = True
    """Whether the output layer shares its weight with the token embedding."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation."""
    moe_every: int = 0
    """0 for dense blocks; n > 0 makes the feed-forward of every n-th block (indices n-1, 2n-1, ...) a mixture of experts."""
    moe_n_experts: int = 8
    """Mixture of experts: number of experts per layer."""
    moe_top_k: int = 2
    """Mixture of experts: experts per token; 1 is Switch routing, 2 or more is Mixtral routing."""
    moe_capacity_factor: float | None = None
    """Mixture of experts: each expert takes at most ceil(factor * tokens * top_k / n_experts) assignments; None or 0 for no limit."""
    moe_balance_coef: float = 0.01
    """Mixture of experts: weight of the Switch load-balancing loss."""
    moe_z_loss_coef: float = 0.001
    """Mixture of experts: weight of the router z-loss."""

    family = "gpt"

    def __post_init__(self):
        check_int("vocab_size", self.vocab_size)
        check_int("max_seq_len", self.max_seq_len)
        check_int("d_model", self.d_model)
        check_int("n_layers", self.n_layers)
        check_int("n_heads", self.n_heads)

        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        check_int("n_kv_heads", self.n_kv_heads)
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}: "
                "each key/value head serves a whole group of query heads."
            )
        if self.d_head is None:
            if self.d_model % self.n_heads != 0:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "choose a divisible pair or set d_head explicitly."
                )
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        check_int("d_head", self.d_head)

        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        check_int("d_ff", self.d_ff)

        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("norm", self.norm, NORMS)
        check_positive("norm_eps", self.norm_eps)
        check_choice("norm_position", self.norm_position, ("pre", "post"))
        check_choice("position", self.position, POSITIONS)
        self.check_position_options()

        check_choice("attention_backend", self.attention_backend, BACKENDS)
        if self.sliding_window is not None:
            check_int("sliding_window", self.sliding_window)
        check_positive("dropout", self.dropout, allow_zero=True)
        if self.dropout >= 1.0:
            raise ValueError(f"dropout={self.dropout} is invalid; it must be in [0, 1).")
        if self.attention_backend == "flash" and self.dropout > 0:
            raise ValueError(
                f"attention_backend='flash' has no attention dropout, but dropout={self.dropout}; "
                "set dropout=0 or use attention_backend='sdpa'."
            )

        check_choice("bias", self.bias, (True, False))
        check_choice("tie_embeddings", self.tie_embeddings, (True, False))
        check_positive("init_std", self.init_std)
        self.check_moe_options()

    def check_moe_options(self) -> None:
        """Raise a ``ValueError`` for invalid ``moe_*`` fields."""
        check_int("moe_every", self.moe_every, minimum=0)
        if self.moe_every > self.n_layers:
            raise ValueError(
                f"moe_every={self.moe_every} exceeds n_layers={self.n_layers}, so no block would be a mixture "
                "of experts; set moe_every between 1 and n_layers, or 0 for a dense model."
            )
        check_int("moe_n_experts", self.moe_n_experts)
        check_int("moe_top_k", self.moe_top_k)
        if self.moe_top_k > self.moe_n_experts:
            raise ValueError(
                f"moe_top_k={self.moe_top_k} is invalid; it must be at most moe_n_experts={self.moe_n_experts}."
            )
        if self.moe_capacity_factor is not None:
            check_positive("moe_capacity_factor", self.moe_capacity_factor, allow_zero=True)
        check_positive("moe_balance_coef", self.moe_balance_coef, allow_zero=True)
        check_positive("moe_z_loss_coef", self.moe_z_loss_coef, allow_zero=True)

    def is_moe_layer(self, layer_index: int) -> bool:
        """Return whether block ``layer_index`` (from 0) has a mixture-of-experts feed-forward."""
        return self.moe_every > 0 and (layer_index + 1) % self.moe_every == 0

    def check_position_options(self) -> None:
        """Raise a ``ValueError`` for invalid ``rope_*`` and ``t5_*`` fields."""
        check_positive("rope_base", self.rope_base)
        if self.rope_base <= 1.0:
            raise ValueError(f"rope_base={self.rope_base!r} is invalid; it must be greater than 1.")
        check_choice("rope_interleaved", self.rope_interleaved, (True, False))
        check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        check_positive("rope_scaling_factor", self.rope_scaling_factor)

        if self.rope_scaling is not None and self.position != "rope":
            raise ValueError(f"rope_scaling={self.rope_scaling!r} needs position='rope', not {self.position!r}.")
        if self.rope_scaling is None and self.rope_scaling_factor != 1.0:
            raise ValueError(
                f"rope_scaling_factor={self.rope_scaling_factor!r} has no effect without rope_scaling; "
                "set rope_scaling to 'linear', 'ntk' or 'yarn', or leave the factor at 1.0."
            )
        if self.rope_scaling is not None and self.rope_scaling_factor < 1.0:
            raise ValueError(
                f"rope_scaling_factor={self.rope_scaling_factor!r} is invalid; a context extension needs at least 1.0."
            )

        if self.rope_original_max_seq_len is not None:
            check_int("rope_original_max_seq_len", self.rope_original_max_seq_len)
        if (self.rope_scaling == "yarn") != (self.rope_original_max_seq_len is not None):
            raise ValueError(
                f"rope_original_max_seq_len={self.rope_original_max_seq_len!r} is invalid with "
                f"rope_scaling={self.rope_scaling!r}; set it exactly when rope_scaling='yarn'."
            )

        check_positive("rope_yarn_beta_fast", self.rope_yarn_beta_fast)
        check_positive("rope_yarn_beta_slow", self.rope_yarn_beta_slow)
        if self.rope_yarn_beta_fast <= self.rope_yarn_beta_slow:
            raise ValueError(
                f"rope_yarn_beta_fast={self.rope_yarn_beta_fast!r} must be greater than "
                f"rope_yarn_beta_slow={self.rope_yarn_beta_slow!r}."
            )

        if self.position == "rope" and self.d_head % 2 != 0:
            raise ValueError(f"d_head={self.d_head} is invalid with position='rope'; rotary pairs need an even d_head.")
        if self.rope_scaling == "ntk" and self.d_head < 4:
            raise ValueError(f"d_head={self.d_head} is invalid with rope_scaling='ntk'; the exponent d/(d-2) needs d_head >= 4.")

        check_int("t5_num_buckets", self.t5_num_buckets, minimum=2)
        check_int("t5_max_distance", self.t5_max_distance)
        if self.t5_max_distance <= self.t5_num_buckets // 2:
            raise ValueError(
                f"t5_max_distance={self.t5_max_distance} is invalid; it must exceed t5_num_buckets // 2 = "
                f"{self.t5_num_buckets // 2}, the number of distances bucketed exactly."
            )


    def block_config(self, layer_index: int | None = None) -> BlockConfig:
        """Return the fields of block ``layer_index``: causal self-attention, no cross-attention; dense when the index is None."""
        return BlockConfig(
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            d_head=self.d_head,
            d_ff=self.d_ff,
            activation=self.activation,
            norm=self.norm,
            norm_eps=self.norm_eps,
            norm_position=self.norm_position,
            attention_backend=self.attention_backend,
            dropout=self.dropout,
            bias=self.bias,
            causal=True,
            sliding_window=self.sliding_window,
            moe=layer_index is not None and self.is_moe_layer(layer_index),
            moe_n_experts=self.moe_n_experts,
            moe_top_k=self.moe_top_k,
            moe_capacity_factor=self.moe_capacity_factor,
            moe_balance_coef=self.moe_balance_coef,
            moe_z_loss_coef=self.moe_z_loss_coef,
        )


@dataclass
class ModelOutput:
    """Output of a forward pass: logits (batch, seq, vocab), the mean loss when targets are
    given, and the attention weights per layer when requested (naive backend only)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    attentions: list[torch.Tensor] | None = None
    aux_loss: torch.Tensor | None = None
    """Sum of every mixture-of-experts layer's weighted balancing and z losses; None for a dense model."""
    moe_stats: dict[int, MoEStats] | None = None
    """Routing statistics per mixture-of-experts layer, keyed by block index; None for a dense model."""


class GPT(nn.Module):
    """Decoder-only language model built from ``GPTConfig``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = build_absolute_positions(config.position, config.max_seq_len, config.d_model)
        self.rotary = build_rotary(config)
        self.score_bias = build_score_bias(config, bidirectional=False)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config.block_config(index)) for index in range(config.n_layers))
        self.final_norm = build_norm(config.norm, config.d_model, config.norm_eps, config.bias)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, init_std) everywhere, residual projections scaled by 1/sqrt(2 n_layers)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(self.position_embedding, nn.Module) and hasattr(self.position_embedding, "weight"):
            nn.init.normal_(self.position_embedding.weight, mean=0.0, std=std)
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=residual_std)
            for feed_forward in block.ffn.modules():  # the dense network, or each expert
                if isinstance(feed_forward, FeedForward):
                    nn.init.normal_(feed_forward.fc_out.weight, mean=0.0, std=residual_std)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Count parameters once each (tied weights once); ``non_embedding`` leaves out embedding tables."""
        unique = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in unique.values())
        if non_embedding:
            total -= self.token_embedding.weight.numel()
            if isinstance(self.position_embedding, nn.Module) and hasattr(self.position_embedding, "weight"):
                total -= self.position_embedding.weight.numel()
        return total

    def num_active_parameters(self, non_embedding: bool = False) -> int:
        """Count the parameters one token uses: as ``num_parameters``, with each mixture-of-experts layer's
        experts counted top_k / n_experts-wise, since a token runs only top_k of them."""
        total = self.num_parameters(non_embedding)
        for block in self.blocks:
            if isinstance(block.ffn, MoEFeedForward):
                expert_params = sum(p.numel() for p in block.ffn.experts.parameters())
                total -= expert_params - expert_params * block.ffn.top_k // block.ffn.n_experts
        return total

    def check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, kv_cache: KVCache | None = None
    ) -> None:
        """Raise a ``ValueError`` for token ids, lengths, masks or caches the model cannot take."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}.")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
        past_len = kv_cache.length if kv_cache is not None else 0
        if past_len + input_ids.size(1) > self.config.max_seq_len:
            cached = f" after {past_len} cached positions" if past_len else ""
            raise ValueError(
                f"Sequence length {past_len + input_ids.size(1)}{cached} exceeds max_seq_len={self.config.max_seq_len}; "
                "crop the input to the last max_seq_len tokens."
            )
        if kv_cache is not None and kv_cache.batch_size != input_ids.size(0):
            raise ValueError(
                f"The KV cache was built for batch size {kv_cache.batch_size}, but input_ids has {input_ids.size(0)} rows."
            )
        # Reading the ids' range back as Python ints splits a torch.compile graph in two, so compiled
        # code skips this check and relies on the embedding lookup, which also rejects such ids.
        checks_ids = input_ids.numel() and not torch.compiler.is_compiling()
        if checks_ids:
            lowest, highest = (int(value) for value in torch.aminmax(input_ids))
            if lowest < 0 or highest >= self.config.vocab_size:
                bad = highest if highest >= self.config.vocab_size else lowest
                raise ValueError(f"Token id {bad} is outside the vocabulary of vocab_size={self.config.vocab_size}.")
        expected_mask_shape = (input_ids.size(0), past_len + input_ids.size(1))
        if attention_mask is not None and tuple(attention_mask.shape) != expected_mask_shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {expected_mask_shape}: "
                "(batch, seq) like input_ids, plus the cached positions when a KV cache is given."
            )

    @staticmethod
    def check_logits_to_keep(logits_to_keep) -> int:
        """Return ``logits_to_keep`` as a Python int; raise a ``ValueError`` unless it is a whole number >= 0."""
        try:
            count = operator.index(logits_to_keep)  # int, NumPy integers and one-element integer tensors
        except TypeError:
            count = None
        if isinstance(logits_to_keep, bool) or count is None or count < 0:
            raise ValueError(
                f"logits_to_keep={logits_to_keep!r} is invalid; it must be a whole number >= 0 (0 keeps every position)."
            )
        return count

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_attentions: bool = False,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Return next-token logits for ``input_ids`` (batch, seq).

        ``attention_mask`` (batch, seq) marks real tokens with 1 and padding with 0; ``targets``
        (batch, seq) with -100 for ignored positions gives the mean cross-entropy loss.

        With ``kv_cache`` the input continues the cached positions: keys and values are appended
        to the cache, ``attention_mask`` covers cached and new positions (batch, cached + seq),
        and ``position_ids`` (batch or 1, seq) default to cached, cached + 1, .... Learned,
        sinusoidal and rotary positions read ``position_ids``. ALiBi and T5 biases depend on
        distances between indices only, which left padding does not change.

        ``logits_to_keep`` > 0 computes logits for the last ``logits_to_keep`` positions only
        (batch, min(logits_to_keep, seq), vocab), as slicing would. Generation needs the last
        position alone, and for a prompt the output layer over every position would cost seq
        times the work and memory.
        """
        self.check_inputs(input_ids, attention_mask, kv_cache)
        logits_to_keep = self.check_logits_to_keep(logits_to_keep)
        if logits_to_keep and targets is not None:
            raise ValueError("logits_to_keep must be 0 when targets are given: the loss needs the logits of every position.")
        past_len = kv_cache.length if kv_cache is not None else 0
        seq_len = input_ids.size(1)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=input_ids.device).unsqueeze(0)
        hidden = self.token_embedding(input_ids)  # (batch, seq, d_model)
        if self.position_embedding is not None:
            hidden = hidden + self.position_embedding(position_ids)
        hidden = self.embed_dropout(hidden)

        mask = padding_mask(attention_mask) if attention_mask is not None else None
        # Rotations and score biases are computed once here and shared by every layer.
        rotation = self.rotary(position_ids) if self.rotary is not None else None
        score_bias = None
        if self.score_bias is not None:
            score_bias = self.score_bias(seq_len, past_len + seq_len, input_ids.device)  # (1, heads, seq, k_len)
        attentions = []
        moe_stats: dict[int, MoEStats] = {}
        for layer_index, block in enumerate(self.blocks):
            layer_cache = kv_cache.layers[layer_index] if kv_cache is not None else None
            layer_moe_stats: list[MoEStats] = []
            hidden, attn_weights = block(
                hidden,
                mask=mask,
                return_weights=return_attentions,
                bias=score_bias,
                rotation=rotation,
                kv_cache=layer_cache,
                moe_stats=layer_moe_stats,
            )
            attentions.append(attn_weights)
            if layer_moe_stats:
                moe_stats[layer_index] = layer_moe_stats[0]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        hidden = self.final_norm(hidden)
        logits = self.lm_head(hidden)  # (batch, seq or logits_to_keep, vocab)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        aux_loss = sum(stats.aux_loss for stats in moe_stats.values()) if moe_stats else None
        return ModelOutput(
            logits=logits,
            loss=loss,
            attentions=attentions if return_attentions else None,
            aux_loss=aux_loss,
            moe_stats=moe_stats or None,
        )
