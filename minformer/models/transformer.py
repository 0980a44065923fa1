"""The Transformer of Vaswani et al. 2017 ("Attention Is All You Need"): an encoder-decoder with post-LN blocks.

source -> shared embedding * sqrt(d_model) + sinusoidal positions -> dropout -> n_encoder_layers blocks
target -> shared embedding * sqrt(d_model) + sinusoidal positions -> dropout -> n_decoder_layers blocks
          (causal self-attention, cross-attention over the encoder output) -> tied output projection

Each sub-layer is LayerNorm(x + Dropout(Sublayer(x))) (sec. 5.4). Source, target and output layer
share one weight matrix (sec. 3.4), so source and target use one vocabulary. The paper gives no
initialisation. We follow fairseq's Transformer: the shared matrix ~ N(0, 1/d_model), so that the
embedding scaled by sqrt(d_model) has unit variance, and Xavier-uniform linear layers with zero biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minformer.attention import BACKENDS, padding_mask
from minformer.blocks import BlockConfig, TransformerBlock
from minformer.cache import EncoderDecoderCache
from minformer.config import EncoderDecoderConfig, check_choice, check_int, check_positive
from minformer.feedforward import ACTIVATIONS
from minformer.linear import Linear
from minformer.norms import NORMS, build_norm
from minformer.positions import build_absolute_positions


@dataclass(frozen=True)
class TransformerConfig(EncoderDecoderConfig):
    """Hyperparameters of the 2017 encoder-decoder Transformer, in the vocabulary every minformer family shares."""

    vocab_size: int = 37000
    """Number of token ids, shared by source and target (37000 BPE tokens for English-German in the paper)."""
    max_seq_len: int = 512
    """Maximum source length and maximum target length: the number of rows of the position table."""
    d_model: int = 512
    """Width of the residual stream."""
    n_encoder_layers: int = 6
    """Number of encoder blocks."""
    n_decoder_layers: int = 6
    """Number of decoder blocks."""
    n_heads: int = 8
    """Number of query heads."""
    n_kv_heads: int | None = None
    """Number of key/value heads; n_heads (multi-head attention, as in the paper) when unset."""
    d_head: int | None = None
    """Width of each head; d_model // n_heads when unset."""
    d_ff: int = 2048
    """Inner width of the feed-forward network."""
    activation: str = "relu"
    """Feed-forward activation: relu (eq. 2), or another of minformer.feedforward.ACTIVATIONS."""
    norm: str = "layernorm"
    """Normalisation: layernorm (the paper) or rmsnorm."""
    norm_eps: float = 1e-6
    """Epsilon added to the variance in every norm (tensor2tensor's value; the paper gives none)."""
    norm_position: str = "post"
    """post (the paper: LayerNorm(x + Sublayer(x))) or pre (a norm before each sub-layer and at the end of each stack)."""
    position: str = "sinusoidal"
    """sinusoidal (sec. 3.5) or learned (the variant of Table 3, row E)."""
    attention_backend: str = "sdpa"
    """naive (materialises the weights) or sdpa (PyTorch's fused kernel)."""
    dropout: float = 0.1
    """P_drop of sec. 5.4: dropout on the embedding sums and on each sub-layer's output before the residual sum."""
    bias: bool = True
    """Whether linear layers and layer norms have biases."""
    tie_embeddings: bool = True
    """Whether the output projection is the shared embedding matrix (sec. 3.4); the two embeddings are always shared."""
    pad_token_id: int = 0
    """Id of the padding token."""
    eos_token_id: int = 1
    """Id of the end-of-sequence token."""
    decoder_start_token_id: int = 0
    """Id that starts every decoder input; the padding id, as in T5."""

    family = "transformer"

    def __post_init__(self):
        for field in ("vocab_size", "max_seq_len", "d_model", "n_encoder_layers", "n_decoder_layers", "n_heads", "d_ff"):
            check_int(field, getattr(self, field))
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

        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("norm", self.norm, NORMS)
        check_positive("norm_eps", self.norm_eps)
        check_choice("norm_position", self.norm_position, ("post", "pre"))
        check_choice("position", self.position, ("sinusoidal", "learned"))
        # NOTE: flash is left out because it has not been tested with the cross-attention cache.
        check_choice("attention_backend", self.attention_backend, tuple(b for b in BACKENDS if b != "flash"))
        check_choice("bias", self.bias, (True, False))
        self.check_shared_fields()

    def block_config(self, decoder: bool) -> BlockConfig:
        """Return the per-block fields: non-causal in the encoder; causal with cross-attention in the decoder."""
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
            causal=decoder,
            cross_attention=decoder,
        )


@dataclass
class Seq2SeqOutput:
    """Outputs of an encoder-decoder forward pass.

    ``logits`` (batch, target_len, vocab); ``encoder_hidden_states`` (batch, source_len, d_model);
    ``loss`` the mean cross-entropy over labels other than -100 when labels are given.
    """

    logits: torch.Tensor
    encoder_hidden_states: torch.Tensor
    loss: torch.Tensor | None = None


class TransformerStack(nn.Module):
    """The encoder or the decoder: a stack of blocks, with a final norm only when blocks are pre-LN."""

    def __init__(self, config: TransformerConfig, decoder: bool):
        super().__init__()
        n_layers = config.n_decoder_layers if decoder else config.n_encoder_layers
        self.blocks = nn.ModuleList(TransformerBlock(config.block_config(decoder)) for _ in range(n_layers))
        for block in self.blocks:
            # Sec. 5.4 drops sub-layer outputs and embedding sums only, not the attention weights.
            for attention in (block.attn, block.cross_attn):
                if attention is not None:
                    attention.dropout = 0.0
        # A post-LN block already ends in a norm; a pre-LN stack needs one on its output.
        pre_norm = config.norm_position == "pre"
        self.final_norm = build_norm(config.norm, config.d_model, config.norm_eps, config.bias) if pre_norm else None

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
    ) -> torch.Tensor:
        """Run the stack on embedded tokens (batch, seq, d_model); ``memory`` and ``cache`` are for the decoder only."""
        if cache is not None and cache.has_encoder_keys:
            memory = memory[:, :0]  # keys and values of the encoder output are already in the cache
        for layer_index, block in enumerate(self.blocks):
            hidden, _ = block(
                hidden,
                mask=mask,
                memory=memory,
                memory_mask=memory_mask,
                kv_cache=cache.self_attention.layers[layer_index] if cache is not None else None,
                memory_kv_cache=cache.cross_attention[layer_index] if cache is not None else None,
            )
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return hidden


class Transformer(nn.Module):
    """The 2017 encoder-decoder Transformer with its output layer, built from ``TransformerConfig``."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = build_absolute_positions(config.position, config.max_seq_len, config.d_model)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.encoder = TransformerStack(config, decoder=False)
        self.decoder = TransformerStack(config, decoder=True)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.shared.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the shared matrix and any learned position table from N(0, 1/d_model).

        Linear layers get Xavier-uniform weights and zero biases, and norm gains stay 1.
        """
        std = self.config.d_model**-0.5
        nn.init.normal_(self.shared.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        if hasattr(self.positions, "weight"):
            nn.init.normal_(self.positions.weight, std=std)
        for stack in (self.encoder, self.decoder):
            for module in stack.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Count parameters once each (a tied output layer once).

        ``non_embedding`` leaves out the shared embedding, a learned position table and an untied
        output layer, the tables that ``minformer.scaling.count_parameters`` also leaves out.
        """
        unique = {id(parameter): parameter for parameter in self.parameters()}
        total = sum(parameter.numel() for parameter in unique.values())
        if not non_embedding:
            return total
        tables = [self.shared.weight]
        if hasattr(self.positions, "weight"):
            tables.append(self.positions.weight)
        if not self.config.tie_embeddings:
            tables.append(self.lm_head.weight)
        return total - sum(table.numel() for table in tables)

    def check_ids(self, name: str, ids: torch.Tensor, allow_empty: bool = False) -> None:
        """Raise a ``ValueError`` unless ``ids`` is a (batch, seq) integer tensor of token ids in the vocabulary."""
        if ids.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, seq), got {tuple(ids.shape)}.")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}.")
        if ids.size(1) == 0 and not allow_empty:
            raise ValueError(f"{name} is empty; it needs at least one token per row.")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= self.config.vocab_size else int(ids.min())
            raise ValueError(f"Token id {bad} in {name} is outside the vocabulary of vocab_size={self.config.vocab_size}.")

    def embed(self, ids: torch.Tensor, first_position: int = 0) -> torch.Tensor:
        """Return Dropout(E[ids] * sqrt(d_model) + PE) (sec. 3.4-3.5, 5.4) for ids (batch, seq) starting at ``first_position``."""
        position_ids = torch.arange(first_position, first_position + ids.size(1), device=ids.device)
        embedded = self.shared(ids) * math.sqrt(self.config.d_model) + self.positions(position_ids)  # (batch, seq, d_model)
        return self.embed_dropout(embedded)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the encoder output (batch, source_len, d_model) for ``input_ids`` (batch, source_len).

        ``attention_mask`` (batch, source_len) marks real tokens with 1 and padding with 0. A source
        longer than ``max_seq_len`` raises a ``ValueError``; it is never truncated silently.
        """
        self.check_ids("input_ids", input_ids)
        check_mask_shape("attention_mask", attention_mask, tuple(input_ids.shape))
        if input_ids.size(1) > self.config.max_seq_len:
            raise ValueError(
                f"input_ids has {input_ids.size(1)} tokens, more than max_seq_len={self.config.max_seq_len}; "
                f"truncate or split the source to at most {self.config.max_seq_len} tokens."
            )
        mask = padding_mask(attention_mask) if attention_mask is not None else None  # (batch, 1, 1, source_len)
        return self.encoder(self.embed(input_ids), mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
    ) -> torch.Tensor:
        """Return logits (batch, target_len, vocab) for ``decoder_input_ids`` given the encoder output.

        ``attention_mask`` is the source padding mask. ``decoder_attention_mask`` marks real
        target tokens. With ``cache`` the new tokens continue the cached ones at the next
        positions, so the mask covers the cached and the new positions (batch, cached + target_len).
        """
        self.check_ids("decoder_input_ids", decoder_input_ids)
        past_len = cache.length if cache is not None else 0
        batch, target_len = decoder_input_ids.shape
        if past_len + target_len > self.config.max_seq_len:
            raise ValueError(
                f"The target reaches {past_len + target_len} positions, more than max_seq_len={self.config.max_seq_len}; "
                f"decode at most {self.config.max_seq_len} tokens."
            )
        check_mask_shape("decoder_attention_mask", decoder_attention_mask, (batch, past_len + target_len))
        check_mask_shape("attention_mask", attention_mask, tuple(encoder_hidden_states.shape[:2]))
        self_mask = padding_mask(decoder_attention_mask) if decoder_attention_mask is not None else None
        memory_mask = padding_mask(attention_mask) if attention_mask is not None else None

        hidden = self.decoder(
            self.embed(decoder_input_ids, first_position=past_len), self_mask, encoder_hidden_states, memory_mask, cache
        )  # (batch, target_len, d_model)
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Seq2SeqOutput:
        """Encode ``input_ids`` and decode ``decoder_input_ids`` (default: ``shift_right(labels)``).

        ``labels`` (batch, target_len), -100 where ignored, give the mean cross-entropy loss,
        without label smoothing (the training objective applies that).
        """
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("Transformer.forward needs decoder_input_ids or labels (which are shifted right to make them).")
            decoder_input_ids = self.shift_right(labels)
        encoder_hidden_states = self.encode(input_ids, attention_mask)
        logits = self.decode(decoder_input_ids, encoder_hidden_states, attention_mask, decoder_attention_mask)

        loss = None
        if labels is not None:
            if tuple(labels.shape) != tuple(decoder_input_ids.shape):
                raise ValueError(
                    f"labels has shape {tuple(labels.shape)}, expected {tuple(decoder_input_ids.shape)} like decoder_input_ids."
                )
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        return Seq2SeqOutput(logits=logits, encoder_hidden_states=encoder_hidden_states, loss=loss)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Return decoder inputs for ``labels``: the start token, then the labels without their last
        position, with ignored (-100) labels replaced by the padding id (teacher forcing)."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)


def check_mask_shape(name: str, mask: torch.Tensor | None, expected: tuple[int, ...]) -> None:
    """Raise a ``ValueError`` when a given padding mask does not have the ``expected`` shape."""
    if mask is not None and tuple(mask.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(expected)}.")
