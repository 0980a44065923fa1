"""BERT: a bidirectional Transformer encoder (Devlin et al. 2019, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding").

tokens -> word + learned position + token type embeddings -> LayerNorm -> dropout
       -> n_layers post-LN encoder blocks (non-causal self-attention)
       -> pooler: tanh(W h_[CLS] + b) on the first token.

Task heads: ``BERTForMaskedLM`` (dense + GELU + LayerNorm, then a decoder tied to the word
embeddings with its own bias; sec. 3.1 task 1) and ``BERTForSequenceClassification`` (dropout and
a linear layer on the pooled output; sec. 4.1). Initialisation follows the released BERT code:
weights ~ N(0, init_std), zero biases, unit LayerNorm weights, and a zero embedding row for the
padding token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minformer.attention import BACKENDS, padding_mask
from minformer.blocks import BlockConfig, TransformerBlock
from minformer.config import FamilyConfig, check_choice, check_int, check_positive
from minformer.feedforward import activation_fn
from minformer.norms import NORMS, build_norm
from minformer.positions import LearnedPositions

# Non-gated activations only: the masked-LM transform applies the same activation elementwise.
BERT_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


@dataclass(frozen=True)
class BERTConfig(FamilyConfig):
    """Hyperparameters of a BERT encoder, in the vocabulary every minformer family shares."""

    vocab_size: int = 30522
    """Number of token ids."""
    max_seq_len: int = 512
    """Maximum sequence length the model accepts (size of the learned position table)."""
    d_model: int = 768
    """Width of the residual stream."""
    n_layers: int = 12
    """Number of encoder blocks."""
    n_heads: int = 12
    """Number of attention heads."""
    d_head: int | None = None
    """Width of each head; d_model // n_heads when unset."""
    d_ff: int | None = None
    """Inner width of the feed-forward network; 4 * d_model when unset."""
    activation: str = "gelu"
    """Activation of the feed-forward network and the masked-LM transform; BERT uses the exact erf GELU."""
    norm: str = "layernorm"
    """Normalisation: layernorm or rmsnorm."""
    norm_eps: float = 1e-12
    """Epsilon added to the variance in every norm (embeddings, blocks and masked-LM head)."""
    norm_position: str = "post"
    """Only post: BERT normalises after each residual addition and has no final norm."""
    position: str = "learned"
    """Only learned: BERT's trainable absolute position table."""
    type_vocab_size: int = 2
    """Number of token types (segments A and B) in the token type embedding."""
    pad_token_id: int = 0
    """Id of the padding token, whose embedding row starts at zero."""
    n_labels: int = 2
    """Number of classes of BERTForSequenceClassification."""
    attention_backend: str = "sdpa"
    """naive (materialises the weights) or sdpa (PyTorch's fused kernel)."""
    dropout: float = 0.1
    """Dropout on embeddings, attention weights, residual branches and the classifier input."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation."""

    family = "bert"

    def __post_init__(self):
        for field in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "type_vocab_size", "n_labels"):
            check_int(field, getattr(self, field))
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
        check_choice("activation", self.activation, BERT_ACTIVATIONS)
        check_choice("norm", self.norm, NORMS)
        check_positive("norm_eps", self.norm_eps)
        check_choice("norm_position", self.norm_position, ("post",))
        check_choice("position", self.position, ("learned",))
        check_int("pad_token_id", self.pad_token_id, minimum=0)
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} is outside the vocabulary of vocab_size={self.vocab_size}.")
        check_choice("attention_backend", self.attention_backend, BACKENDS)
        check_positive("dropout", self.dropout, allow_zero=True)
        if self.dropout >= 1.0:
            raise ValueError(f"dropout={self.dropout} is invalid; it must be in [0, 1).")
        check_positive("init_std", self.init_std)


    def block_config(self) -> BlockConfig:
        """Return the per-block fields: bidirectional post-LN self-attention with biases."""
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
            bias=True,
            causal=False,
        )


@dataclass
class BERTOutput:
    """Output of a BERT forward pass.

    ``hidden_states`` (batch, seq, d_model) is the output of the last encoder layer, and
    ``pooled_output`` (batch, d_model) is None without a pooler. ``logits`` is (batch, seq, vocab)
    for masked LM, (batch, n_labels) for classification and None for the bare encoder. ``loss`` is
    the mean cross-entropy when targets are given, and ``attentions`` the per-layer weights when
    requested (naive backend only).
    """

    hidden_states: torch.Tensor
    pooled_output: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    attentions: list[torch.Tensor] | None = None


class BERTEmbeddings(nn.Module):
    """Sum of word, position and token type embeddings, then LayerNorm and dropout (sec. 3, Figure 2)."""

    def __init__(self, config: BERTConfig):
        super().__init__()
        self.word_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = LearnedPositions(config.max_seq_len, config.d_model)
        self.token_type_embedding = nn.Embedding(config.type_vocab_size, config.d_model)
        self.norm = build_norm(config.norm, config.d_model, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        embedded = (
            self.word_embedding(input_ids) + self.position_embedding(position_ids) + self.token_type_embedding(token_type_ids)
        )  # (batch, seq, d_model)
        return self.dropout(self.norm(embedded))


class BERT(nn.Module):
    """The BERT encoder with an optional pooler, built from ``BERTConfig``."""

    def __init__(self, config: BERTConfig, with_pooler: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BERTEmbeddings(config)
        self.blocks = nn.ModuleList(TransformerBlock(config.block_config()) for _ in range(config.n_layers))
        self.pooler = nn.Linear(config.d_model, config.d_model) if with_pooler else None
        init_bert_weights(self, config)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Count parameters once each; ``non_embedding`` leaves out the three embedding tables."""
        return count_parameters(self, self.embeddings if non_embedding else None)

    def check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None
    ) -> None:
        """Raise a ``ValueError`` for token ids, lengths, masks or token types the model cannot take."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}.")
        if input_ids.size(1) > self.config.max_seq_len:
            raise ValueError(
                f"Sequence length {input_ids.size(1)} exceeds max_seq_len={self.config.max_seq_len}; "
                "truncate the input or split it into segments of at most max_seq_len tokens."
            )
        check_id_range("Token id", input_ids, self.config.vocab_size, "vocab_size")
        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if tensor is not None and tuple(tensor.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}, expected {tuple(input_ids.shape)}: (batch, seq) like input_ids."
                )
        if token_type_ids is not None:
            check_id_range("Token type id", token_type_ids, self.config.type_vocab_size, "type_vocab_size")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_attentions: bool = False,
    ) -> BERTOutput:
        """Encode ``input_ids`` (batch, seq).

        ``attention_mask`` (batch, seq) marks real tokens with 1 and padding with 0; no token
        attends to padding, so padding never changes the outputs at real tokens. ``token_type_ids``
        default to 0 (segment A) and ``position_ids`` to 0 .. seq - 1.
        """
        self.check_inputs(input_ids, attention_mask, token_type_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        hidden = self.embeddings(input_ids, token_type_ids, position_ids)  # (batch, seq, d_model)

        mask = padding_mask(attention_mask) if attention_mask is not None else None  # (batch, 1, 1, seq)
        token_index = real_token_index(attention_mask) if mask is not None else None
        attentions = []
        if token_index is None:
            for block in self.blocks:
                hidden, attn_weights = block(hidden, mask=mask, return_weights=return_attentions)
                attentions.append(attn_weights)
        else:
            batch, seq, d_model = hidden.shape
            packed = hidden.reshape(batch * seq, d_model).index_select(0, token_index)  # (n_real, d_model)
            for block in self.blocks:
                packed, attn_weights = block.forward_packed(packed, token_index, (batch, seq), mask, return_attentions)
                attentions.append(attn_weights)
            # Padding positions come out as zeros; no real token depends on them.
            hidden = packed.new_zeros(batch * seq, d_model).index_copy_(0, token_index, packed).view(batch, seq, d_model)

        pooled = torch.tanh(self.pooler(hidden[:, 0])) if self.pooler is not None else None  # (batch, d_model)
        return BERTOutput(hidden_states=hidden, pooled_output=pooled, attentions=attentions if return_attentions else None)


def real_token_index(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Return the flat indices of the real tokens of ``attention_mask`` (batch, seq) for inference, else None.

    Without gradients, every layer then runs on the real tokens only, except attention itself.
    Training keeps the full computation, so that gradients stay those of the plain model; under
    ``torch.compile`` the data-dependent index would split the graph.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    return attention_mask.reshape(-1).nonzero().squeeze(1)


class MaskedLMHead(nn.Module):
    """The masked-LM transform (dense, activation, LayerNorm) and the output bias of the tied decoder."""

    def __init__(self, config: BERTConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.act = activation_fn(config.activation)
        self.norm = build_norm(config.norm, config.d_model, config.norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embedding: torch.Tensor) -> torch.Tensor:
        """Map (batch, seq, d_model) to logits (batch, seq, vocab) through the word embedding matrix."""
        transformed = self.norm(self.act(self.dense(hidden)))
        return F.linear(transformed, word_embedding, self.bias)


class BERTForMaskedLM(nn.Module):
    """BERT with the masked-LM head; the decoder reuses the word embedding matrix (weight tying)."""

    def __init__(self, config: BERTConfig):
        super().__init__()
        self.config = config
        # As in BERT's released masked-LM model, the pooler is unused here and left out.
        self.bert = BERT(config, with_pooler=False)
        self.mlm_head = MaskedLMHead(config)
        init_bert_weights(self.mlm_head, config)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Count parameters once each; ``non_embedding`` leaves out the three embedding tables."""
        return count_parameters(self, self.bert.embeddings if non_embedding else None)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_attentions: bool = False,
    ) -> BERTOutput:
        """Return vocabulary logits at every position; ``targets`` (batch, seq), -100 where not masked, give the loss."""
        output = self.bert(input_ids, attention_mask, token_type_ids, position_ids, return_attentions)
        output.logits = self.mlm_head(output.hidden_states, self.bert.embeddings.word_embedding.weight)
        if targets is not None:
            if tuple(targets.shape) != tuple(input_ids.shape):
                raise ValueError(f"targets has shape {tuple(targets.shape)}, expected {tuple(input_ids.shape)} like input_ids.")
            output.loss = F.cross_entropy(
                output.logits.float().reshape(-1, output.logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
        return output


class BERTForSequenceClassification(nn.Module):
    """BERT with dropout and a linear classifier on the pooled first-token output."""

    def __init__(self, config: BERTConfig):
        super().__init__()
        self.config = config
        self.bert = BERT(config, with_pooler=True)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.d_model, config.n_labels)
        init_bert_weights(self.classifier, config)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Count parameters once each; ``non_embedding`` leaves out the three embedding tables."""
        return count_parameters(self, self.bert.embeddings if non_embedding else None)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_attentions: bool = False,
    ) -> BERTOutput:
        """Return class logits (batch, n_labels); ``labels`` (batch,) give the mean cross-entropy."""
        output = self.bert(input_ids, attention_mask, token_type_ids, position_ids, return_attentions)
        output.logits = self.classifier(self.dropout(output.pooled_output))
        if labels is not None:
            if tuple(labels.shape) != (input_ids.size(0),):
                raise ValueError(f"labels has shape {tuple(labels.shape)}, expected ({input_ids.size(0)},): one class per row.")
            check_id_range("Label", labels, self.config.n_labels, "n_labels")
            output.loss = F.cross_entropy(output.logits.float(), labels)
        return output


def check_id_range(what: str, ids: torch.Tensor, size: int, field: str) -> None:
    """Raise a ``ValueError`` naming an id of ``ids`` outside ``0 .. size - 1`` (the largest, else the smallest)."""
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= size:
        bad = high if high >= size else low
        raise ValueError(f"{what} {bad} is outside the range 0..{size - 1} set by {field}={size}.")


def init_bert_weights(module: nn.Module, config: BERTConfig) -> None:
    """Initialise linear and embedding weights of ``module`` from N(0, init_std) and zero its linear biases.

    Norms keep the unit weights and zero biases they are built with.
    """
    for submodule in module.modules():
        if isinstance(submodule, nn.Linear):
            nn.init.normal_(submodule.weight, mean=0.0, std=config.init_std)
            if submodule.bias is not None:
                nn.init.zeros_(submodule.bias)
        elif isinstance(submodule, (nn.Embedding, LearnedPositions)):
            nn.init.normal_(submodule.weight, mean=0.0, std=config.init_std)
    if isinstance(module, BERT):
        with torch.no_grad():
            module.embeddings.word_embedding.weight[config.pad_token_id].zero_()


def count_parameters(model: nn.Module, embeddings: BERTEmbeddings | None) -> int:
    """Count the parameters of ``model`` once each, less those of ``embeddings`` when given."""
    unique = {id(parameter): parameter for parameter in model.parameters()}
    total = sum(parameter.numel() for parameter in unique.values())
    if embeddings is not None:
        total -= sum(parameter.numel() for parameter in embeddings.parameters() if parameter.dim() == 2)
    return total
