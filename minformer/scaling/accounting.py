"""Parameter and training-FLOP accounting for scaling-law work.

Two conventions for the training cost per token:

- ``kaplan``: Kaplan et al. 2020 ("Scaling Laws for Neural Language Models"), Table 1. The forward
  pass costs 2N + 2 n_layers n_ctx d_attn per token, where N counts the non-embedding parameters
  and d_attn = n_heads * d_head. The backward pass costs twice the forward, so training costs
  6N + 6 n_layers n_ctx d_attn.
- ``chinchilla``: Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"),
  Appendix F. It counts each matrix product of the forward pass, the embedding and output layers and
  the softmax included, and again takes the backward pass as twice the forward.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from minformer.feedforward import GATED_ACTIVATIONS
from minformer.positions import LearnedPositions

CONVENTIONS = ("kaplan", "chinchilla")

# Multiply-accumulate counts as 2 FLOPs, and the backward pass costs twice the forward pass
# (Kaplan et al. 2020), so training costs 3 times the forward pass.
TRAINING_PASSES = 3


def is_embedding_parameter(module_name: str, module: nn.Module) -> bool:
    """Tell whether ``module``'s parameters are a lookup table or the output projection onto the vocabulary.

    Token and position tables are the embeddings that Kaplan et al. 2020 leave out of N. An untied
    output head (a module named ``lm_head``) is the unembedding, the transpose of such a table, so it
    is left out too. T5 relative-position biases are ``nn.Embedding`` tables and count as embeddings.
    """
    if isinstance(module, (nn.Embedding, LearnedPositions)):
        return True
    return module_name.rsplit(".", 1)[-1] == "lm_head"


def count_parameters(model: nn.Module, non_embedding: bool = False) -> int:
    """Count the model's parameter elements, a tensor shared by several modules (tied weights) once.

    With ``non_embedding=True``, leave out the parameters of token and position tables and of an
    untied output head: the N of Kaplan et al. 2020. Buffers (for example a sinusoidal table) are
    never counted, because they are not trained.
    """
    embedding_ids = set()
    if non_embedding:
        for module_name, module in model.named_modules():
            if is_embedding_parameter(module_name, module):
                embedding_ids.update(id(parameter) for parameter in module.parameters(recurse=False))

    unique = {id(parameter): parameter for parameter in model.parameters()}
    return sum(parameter.numel() for key, parameter in unique.items() if key not in embedding_ids)


def config_parameters(config, non_embedding: bool = False) -> int:
    """Count the parameters of the model ``config`` describes, without allocating its weights.

    The model is built on PyTorch's ``meta`` device, where tensors have shapes but no storage, so
    a 175B-parameter config needs no weight memory (about a second on a 2-core CPU).
    """
    from minformer.models import build_model

    try:
        with torch.device("meta"):
            model = build_model(config)
    except NotImplementedError:
        # Rotary tables are built from values, which meta tensors lack. Rotary positions have no
        # parameters, so the same config without them has the same count.
        if getattr(config, "position", None) != "rope":
            raise
        without_rope = dataclasses.replace(
            config, position="none", rope_scaling=None, rope_scaling_factor=1.0, rope_original_max_seq_len=None
        )
        with torch.device("meta"):
            model = build_model(without_rope)
    return count_parameters(model, non_embedding=non_embedding)


def attention_width(config) -> int:
    """Return d_attn = n_heads * d_head, the width of the concatenated query heads."""
    return config.n_heads * config.d_head


def kaplan_flops_per_token(config, context: int) -> float:
    """Return 6N + 6 n_layers context d_attn, the training FLOPs per token of Kaplan et al. 2020, Table 1.

    The attention term uses the whole ``context`` for every token, as Kaplan's table does, and is not
    halved for causal masking. On average a causal query attends to (context + 1) / 2 keys, and
    kernels that skip masked blocks do about half this work. Dense kernels (``naive``, ``sdpa``'s math
    path) compute the full score matrix. We keep the published count so that numbers compare with
    the paper's; call it with ``context // 2`` for the masked-block estimate.
    """
    non_embedding = config_parameters(config, non_embedding=True)
    attention = config.n_layers * context * attention_width(config)
    return TRAINING_PASSES * (2.0 * non_embedding + 2.0 * attention)


def chinchilla_flops_per_token(config, context: int) -> float:
    """Return the training FLOPs per token of Hoffmann et al. 2022, Appendix F, for a sequence of ``context``.

    Forward FLOPs per sequence of length S:

    - embeddings: 2 S vocab d_model
    - per layer, attention: query, key and value projections 2 S d_model (3 d_attn), logits
      2 S^2 d_attn, softmax 3 n_heads S^2, weighted sum of values 2 S^2 d_attn, output projection
      2 S d_attn d_model
    - per layer, feed-forward block: 2 S (2 d_model d_ff)
    - output logits: 2 S d_model vocab

    Training is 3 forward passes. Like Kaplan's count, attention covers the whole context (no
    halving for causal masking).

    Two generalisations reduce to the paper's terms for its models (multi-head attention, ungated
    feed-forward): key and value projections are 2 S d_model (n_kv_heads d_head) each, for GQA and
    MQA; and a gated feed-forward block has three d_model x d_ff matrices, not two.
    """
    d_model, vocab, seq = config.d_model, config.vocab_size, context
    d_attn = attention_width(config)
    d_kv = (getattr(config, "n_kv_heads", None) or config.n_heads) * config.d_head  # BERT has no n_kv_heads
    ffn_matrices = 3 if config.activation in GATED_ACTIVATIONS else 2

    embeddings = 2 * seq * vocab * d_model
    projections = 2 * seq * d_model * (d_attn + 2 * d_kv)
    logits_qk = 2 * seq * seq * d_attn
    softmax = 3 * config.n_heads * seq * seq
    weighted_values = 2 * seq * seq * d_attn
    out_projection = 2 * seq * d_attn * d_model
    attention = projections + logits_qk + softmax + weighted_values + out_projection
    feedforward = 2 * seq * ffn_matrices * d_model * config.d_ff
    output_logits = 2 * seq * d_model * vocab

    forward = embeddings + config.n_layers * (attention + feedforward) + output_logits
    return TRAINING_PASSES * forward / seq


def flops_per_token(config, context: int, convention: str = "kaplan") -> float:
    """Return the training FLOPs per token (forward and backward) of ``config`` at sequence length ``context``.

    ``convention`` is ``kaplan`` (6N plus the attention term, Kaplan et al. 2020, Table 1) or
    ``chinchilla`` (every matrix product, Hoffmann et al. 2022, Appendix F). Neither halves the
    attention term for causal masking; see ``kaplan_flops_per_token``.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is invalid; allowed values: {', '.join(CONVENTIONS)}.")
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        raise ValueError(f"context={context!r} is invalid; it must be a positive number of tokens.")
    if convention == "kaplan":
        return kaplan_flops_per_token(config, context)
    return chinchilla_flops_per_token(config, context)


def training_flops(config, context: int, tokens: float, convention: str = "kaplan") -> float:
    """Return the training FLOPs for ``tokens`` tokens seen in sequences of length ``context``."""
    return flops_per_token(config, context, convention) * tokens
