"""Key/value cache for autoregressive decoding.

A decoder's keys and values at earlier positions never change, so decoding one token at a time
computes only the new token's keys and values. The earlier ones are read from a preallocated
cache of shape (batch, n_kv_heads, max_len, d_head) per layer. Grouped-query and multi-query layouts store only
their n_kv_heads heads. Keys are stored after the rotary rotation, which depends on their own
position only, so cached keys stay valid as the sequence grows.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    """The preallocated keys and values of one attention layer, filled from position 0 up to ``length``."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, d_head: int, dtype=torch.float32, device=None):
        # Positions at or past ``length`` are never read, so the memory is left uninitialised.
        # Zero-filling a 1,024-position cache for GPT-2 would write 75 MB per generate call.
        self.key_cache = torch.empty(batch, n_kv_heads, max_len, d_head, dtype=dtype, device=device)
        self.value_cache = torch.empty(batch, n_kv_heads, max_len, d_head, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        """Number of positions the cache has room for."""
        return self.key_cache.size(2)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new (batch, n_kv_heads, new_len, d_head) keys and values; return all stored so far.

        The returned tensors are views of shape (batch, n_kv_heads, length, d_head), valid until
        the next ``append`` or ``reset``.
        """
        if keys.shape[:2] != self.key_cache.shape[:2] or keys.size(-1) != self.key_cache.size(-1):
            raise ValueError(
                f"Keys of shape {tuple(keys.shape)} do not fit a cache of shape {tuple(self.key_cache.shape)} "
                "(batch, n_kv_heads, max_len, d_head); build the cache for this batch and model."
            )
        end = self.length + keys.size(2)
        if end > self.max_len:
            raise ValueError(
                f"KV cache overflow: it has room for {self.max_len} positions, and appending {keys.size(2)} to "
                f"{self.length} would exceed it. Reset the cache or build a longer one."
            )
        self.key_cache.narrow(2, self.length, keys.size(2)).copy_(keys)
        self.value_cache.narrow(2, self.length, values.size(2)).copy_(values)
        self.length = end
        return self.key_cache.narrow(2, 0, end), self.value_cache.narrow(2, 0, end)


class KVCache:
    """One ``LayerKVCache`` per layer of a model; ``length`` is the number of positions already cached."""

    def __init__(
        self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, d_head: int, dtype=torch.float32, device=None
    ):
        self.layers = [LayerKVCache(batch, n_kv_heads, max_len, d_head, dtype, device) for _ in range(n_layers)]

    @classmethod
    def for_model(cls, model, batch: int, max_len: int | None = None) -> "KVCache":
        """Build an empty cache matching ``model.config`` and the dtype and device of its parameters.

        ``max_len`` defaults to the model's ``max_seq_len``.
        """
        config = model.config
        parameter = next(model.parameters())
        return cls(
            config.n_layers,
            batch,
            config.n_kv_heads,
            max_len or config.max_seq_len,
            config.d_head,
            dtype=parameter.dtype,
            device=parameter.device,
        )

    @property
    def length(self) -> int:
        """Number of positions cached, which is the same for every layer between forward passes."""
        return self.layers[0].length

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    @property
    def batch_size(self) -> int:
        return self.layers[0].key_cache.size(0)

    def reset(self) -> None:
        """Forget every cached position; the memory stays allocated and is overwritten by later appends."""
        for layer in self.layers:
            layer.length = 0


class EncoderDecoderCache:
    """Decoder state kept between decoding steps of an encoder-decoder model for one batch of sources.

    ``self_attention`` stores the keys and values of the target positions decoded so far.
    ``cross_attention`` stores, per decoder layer, the keys and values of the encoder output, which
    the first decoding step computes and every later step reuses.
    """

    def __init__(self, self_attention: KVCache, cross_attention: list[LayerKVCache]):
        self.self_attention = self_attention
        self.cross_attention = cross_attention

    @classmethod
    def for_model(cls, model, batch: int, source_len: int, max_len: int | None = None) -> "EncoderDecoderCache":
        """Build an empty cache for ``model`` (its config has ``n_decoder_layers``, ``n_heads``, ``d_head``).

        ``max_len`` (target positions) defaults to the model's ``max_seq_len``. Keys and values take
        the dtype and device of the model's parameters.
        """
        config = model.config
        parameter = next(model.parameters())
        n_kv_heads = getattr(config, "n_kv_heads", None) or config.n_heads
        self_attention = KVCache(
            config.n_decoder_layers, batch, n_kv_heads, max_len or config.max_seq_len, config.d_head,
            dtype=parameter.dtype, device=parameter.device,
        )
        cross_attention = [
            LayerKVCache(batch, n_kv_heads, source_len, config.d_head, dtype=parameter.dtype, device=parameter.device)
            for _ in range(config.n_decoder_layers)
        ]
        return cls(self_attention, cross_attention)

    @property
    def length(self) -> int:
        """Number of target positions cached."""
        return self.self_attention.length

    @property
    def has_encoder_keys(self) -> bool:
        """Whether the first step has already stored the encoder output's keys and values."""
        return self.cross_attention[0].length > 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Make row i of every self-attention cache a copy of row ``rows[i]`` (beam search).

        The cross-attention keys and values are not reordered, so ``rows`` may only map between
        rows of the same source, as in a beam search over one source.
        """
        for layer in self.self_attention.layers:
            layer.key_cache = layer.key_cache[rows]
            layer.value_cache = layer.value_cache[rows]
