"""T5: an encoder-decoder Transformer with relative position biases (Raffel et al. 2020, "Exploring
the Limits of Transfer Learning with a Unified Text-to-Text Transformer").

source -> shared embedding -> dropout -> n_encoder_layers pre-RMSNorm blocks -> RMSNorm -> dropout
target -> shared embedding -> dropout -> n_decoder_layers pre-RMSNorm blocks (causal self-attention,
          cross-attention over the encoder output) -> RMSNorm -> dropout -> LM head

Each stack learns one table of relative position biases (bidirectional in the encoder, causal in
the decoder), computed once per forward pass and added to the self-attention scores of every
layer. Cross-attention has no position bias. Attention scores are not scaled by 1/sqrt(d_head):
T5 folds that factor into the initialisation of the query projection. T5 v1.0 ties the LM head
to the shared embedding and multiplies the decoder output by d_model^-0.5 first; T5 v1.1 has an
untied head, no rescaling and a gated tanh-GELU feed-forward.
"""

from __future__ import annotations

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
from minformer.positions import T5RelativeBias


@dataclass(frozen=True)
class T5Config(EncoderDecoderConfig):
    """Hyperparameters of a T5 encoder-decoder, in the vocabulary every minformer family shares."""

    vocab_size: int = 32128
    """Number of token ids, shared by source and target."""
    max_seq_len: int = 512
    """Maximum target length a decoding cache is built for; relative positions set no hard limit."""
    d_model: int = 512
    """Width of the residual stream."""
    n_encoder_layers: int = 6
    """Number of encoder blocks."""
    n_decoder_layers: int = 6
    """Number of decoder blocks."""
    n_heads: int = 8
    """Number of attention heads."""
    d_head: int = 64
    """Width of each head (T5's d_kv); independent of d_model // n_heads."""
    d_ff: int = 2048
    """Inner width of the feed-forward network."""
    activation: str = "relu"
    """Feed-forward activation: relu (T5 v1.0) or geglu_tanh (T5 v1.1), or another of ACTIVATIONS."""
    norm: str = "rmsnorm"
    """Normalisation: rmsnorm (T5) or layernorm."""
    norm_eps: float = 1e-6
    """Epsilon added to the mean square in every norm."""
    norm_position: str = "pre"
    """Only pre: T5 normalises the input of each sub-layer and the output of each stack."""
    position: str = "t5"
    """Only t5: learned relative position biases."""
    t5_num_buckets: int = 32
    """Number of relative-distance buckets of each stack's bias table."""
    t5_max_distance: int = 128
    """Distance from which all keys share the last bucket."""
    attention_backend: str = "sdpa"
    """naive (materialises the weights) or sdpa (PyTorch's fused kernel)."""
    dropout: float = 0.1
    """Dropout on embeddings, attention weights, feed-forward activations, residual branches and stack outputs."""
    tie_embeddings: bool = True
    """True (v1.0): the LM head is the shared embedding, applied to d_model^-0.5 times the decoder output.
    False (v1.1): an untied LM head and no rescaling."""
    pad_token_id: int = 0
    """Id of the padding token."""
    decoder_start_token_id: int = 0
    """Id that starts every decoder input; T5 uses the padding id."""
    eos_token_id: int = 1
    """Id of the end-of-sequence token."""
    init_factor: float = 1.0
    """Multiplier on the standard deviations of T5's initialisation (transformers' initializer_factor)."""

    family = "t5"

    def __post_init__(self):
        for field in ("vocab_size", "max_seq_len", "d_model", "n_encoder_layers", "n_decoder_layers", "n_heads"):
            check_int(field, getattr(self, field))
        check_int("d_head", self.d_head)
        check_int("d_ff", self.d_ff)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("norm", self.norm, NORMS)
        check_positive("norm_eps", self.norm_eps)
        check_choice("norm_position", self.norm_position, ("pre",))
        check_choice("position", self.position, ("t5",))
        check_int("t5_num_buckets", self.t5_num_buckets, minimum=2)
        check_int("t5_max_distance", self.t5_max_distance)
        if self.t5_max_distance <= self.t5_num_buckets // 2:
            raise ValueError(
                f"t5_max_distance={self.t5_max_distance} is invalid; it must exceed t5_num_buckets // 2 = "
                f"{self.t5_num_buckets // 2}, the number of distances bucketed exactly."
            )
        # NOTE: flash is left out because it has not been tested with T5's bias and cross-attention cache.
        check_choice("attention_backend", self.attention_backend, tuple(b for b in BACKENDS if b != "flash"))
        self.check_shared_fields()
        check_positive("init_factor", self.init_factor)


    def block_config(self, decoder: bool) -> BlockConfig:
        """Return the per-block fields: no biases, unscaled scores; causal with cross-attention in the decoder."""
        return BlockConfig(
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_kv_heads=self.n_heads,
            d_head=self.d_head,
            d_ff=self.d_ff,
            activation=self.activation,
            norm=self.norm,
            norm_eps=self.norm_eps,
            norm_position=self.norm_position,
            attention_backend=self.attention_backend,
            dropout=self.dropout,
            bias=False,
            causal=decoder,
            cross_attention=decoder,
            attention_scale=1.0,
        )


@dataclass
class T5Output:
    """Outputs of a T5 forward pass.

    ``logits`` (batch, target_len, vocab); ``loss`` the mean cross-entropy over labels other than
    -100 when labels are given; ``encoder_hidden_states`` (batch, source_len, d_model), the
    encoder output after its final norm.
    """

    logits: torch.Tensor
    encoder_hidden_states: torch.Tensor
    loss: torch.Tensor | None = None


class T5DecoderCache(EncoderDecoderCache):
    """Decoder state kept between decoding steps for one batch of sources (see ``EncoderDecoderCache``).

    ``self_attention`` stores the keys and values of the target positions decoded so far.
    ``cross_attention`` stores, per decoder layer, the keys and values of the encoder output, which
    the first step computes and every later step reuses.
    """


class T5Stack(nn.Module):
    """A stack of pre-RMSNorm blocks with one relative bias table, a final norm and dropout."""

    def __init__(self, config: T5Config, decoder: bool):
        super().__init__()
        n_layers = config.n_decoder_layers if decoder else config.n_encoder_layers
        self.relative_bias = T5RelativeBias(
            config.n_heads, config.t5_num_buckets, config.t5_max_distance, bidirectional=not decoder
        )
        self.blocks = nn.ModuleList(TransformerBlock(config.block_config(decoder)) for _ in range(n_layers))
        for block in self.blocks:
            # T5 drops feed-forward activations before the output projection as well.
            block.ffn.dropout = nn.Dropout(config.dropout)
        self.final_norm = build_norm(config.norm, config.d_model, config.norm_eps, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        embedded: torch.Tensor,
        mask: torch.Tensor | None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: T5DecoderCache | None = None,
    ) -> torch.Tensor:
        """Run the stack on embedded tokens (batch, seq, d_model); ``cache`` is for the decoder only."""
        past_len = cache.length if cache is not None else 0
        seq_len = embedded.size(1)
        score_bias = self.relative_bias(seq_len, past_len + seq_len, embedded.device)  # (1, heads, seq, k_len)

        if cache is not None and cache.has_encoder_keys:
            memory = memory[:, :0]  # keys and values of the encoder output are already in the cache

        hidden = self.dropout(embedded)
        for layer_index, block in enumerate(self.blocks):
            hidden, _ = block(
                hidden,
                mask=mask,
                memory=memory,
                memory_mask=memory_mask,
                bias=score_bias,
                kv_cache=cache.self_attention.layers[layer_index] if cache is not None else None,
                memory_kv_cache=cache.cross_attention[layer_index] if cache is not None else None,
            )
        return self.dropout(self.final_norm(hidden))


class T5(nn.Module):
    """T5 encoder-decoder with its LM head, built from ``T5Config``."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, decoder=False)
        self.decoder = T5Stack(config, decoder=True)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.shared.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as transformers 5.25's T5 does: each weight ~ N(0, factor / sqrt(fan_in)), the shared
        embedding ~ N(0, factor), queries ~ N(0, factor / sqrt(d_model * d_head)), norms at 1."""
        factor, d_model = self.config.init_factor, self.config.d_model
        nn.init.normal_(self.shared.weight, std=factor)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=factor)
        for stack in (self.encoder, self.decoder):
            nn.init.normal_(stack.relative_bias.relative_attention_bias.weight, std=factor * d_model**-0.5)
            for block in stack.blocks:
                for attention in (block.attn, block.cross_attn):
                    if attention is None:
                        continue
                    nn.init.normal_(attention.q_proj.weight, std=factor * (d_model * self.config.d_head) ** -0.5)
                    nn.init.normal_(attention.k_proj.weight, std=factor * d_model**-0.5)
                    nn.init.normal_(attention.v_proj.weight, std=factor * d_model**-0.5)
                    nn.init.normal_(attention.out_proj.weight, std=factor * (self.config.n_heads * self.config.d_head) ** -0.5)
                for projection in (block.ffn.fc_in, block.ffn.fc_gate):
                    if projection is not None:
                        nn.init.normal_(projection.weight, std=factor * d_model**-0.5)
                nn.init.normal_(block.ffn.fc_out.weight, std=factor * self.config.d_ff**-0.5)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Count parameters once each (a tied head once).

        ``non_embedding`` leaves out the shared embedding, an untied LM head and the two relative
        bias tables, the tables that ``minformer.scaling.count_parameters`` also leaves out.
        """
        unique = {id(parameter): parameter for parameter in self.parameters()}
        total = sum(parameter.numel() for parameter in unique.values())
        if not non_embedding:
            return total
        tables = [self.shared.weight] + [stack.relative_bias.relative_attention_bias.weight for stack in (self.encoder, self.decoder)]
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

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the encoder output (batch, source_len, d_model) for ``input_ids`` (batch, source_len).

        ``attention_mask`` (batch, source_len) marks real tokens with 1 and padding with 0.
        """
        self.check_ids("input_ids", input_ids)
        check_mask_shape("attention_mask", attention_mask, tuple(input_ids.shape))
        mask = padding_mask(attention_mask) if attention_mask is not None else None  # (batch, 1, 1, source_len)
        return self.encoder(self.shared(input_ids), mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        cache: T5DecoderCache | None = None,
    ) -> torch.Tensor:
        """Return logits (batch, target_len, vocab) for ``decoder_input_ids`` given the encoder output.

        ``attention_mask`` is the source padding mask. ``decoder_attention_mask`` marks real
        target tokens. With ``cache`` the new tokens continue the cached ones, so the mask covers
        the cached and the new positions (batch, cached + target_len).
        """
        self.check_ids("decoder_input_ids", decoder_input_ids)
        past_len = cache.length if cache is not None else 0
        batch, target_len = decoder_input_ids.shape
        check_mask_shape("decoder_attention_mask", decoder_attention_mask, (batch, past_len + target_len))
        check_mask_shape("attention_mask", attention_mask, tuple(encoder_hidden_states.shape[:2]))
        self_mask = padding_mask(decoder_attention_mask) if decoder_attention_mask is not None else None
        memory_mask = padding_mask(attention_mask) if attention_mask is not None else None

        hidden = self.decoder(
            self.shared(decoder_input_ids), self_mask, encoder_hidden_states, memory_mask, cache
        )  # (batch, target_len, d_model)
        if self.config.tie_embeddings:
            # T5 v1.0 rescales before the tied head, so that logits keep the scale of the N(0, 1) embedding.
            hidden = hidden * self.config.d_model**-0.5
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> T5Output:
        """Encode ``input_ids`` and decode ``decoder_input_ids`` (default: ``shift_right(labels)``).

        ``labels`` (batch, target_len), -100 where ignored, give the mean cross-entropy loss.
        """
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5.forward needs decoder_input_ids or labels (which are shifted right to make them).")
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
        return T5Output(logits=logits, encoder_hidden_states=encoder_hidden_states, loss=loss)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Return decoder inputs for ``labels``: the start token, then the labels without their last
        position, with ignored (-100) labels replaced by the padding id."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)


def check_mask_shape(name: str, mask: torch.Tensor | None, expected: tuple[int, ...]) -> None:
    """Raise a ``ValueError`` when a given padding mask does not have the ``expected`` shape."""
    if mask is not None and tuple(mask.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(expected)}.")
