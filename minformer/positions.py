"""Position information for attention models, each scheme stating how it acts.

- ``learned``: a trained table of absolute position vectors added to the token embeddings
  (GPT-2, BERT).
- ``sinusoidal``: the fixed table of Vaswani et al. 2017, sec. 3.5:
  PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)),
  added to the token embeddings.
- ``rope``: rotary position embedding (RoFormer, Su et al. 2021): each pair of query/key features
  is rotated by the angle pos * base^(-2i/d_head), so q.k depends on the distance only. Context
  extension by ``linear`` position interpolation (Chen et al. 2023), static ``ntk`` base scaling
  (bloc97, 2023) and ``yarn`` (Peng et al. 2023) changes the frequencies once, at construction.
- ``alibi``: a per-head linear penalty -m * |i - j| added to the scores (ALiBi, Press et al. 2022).
- ``t5``: a learned per-head scalar for each bucket of relative distance, added to the scores
  (T5, Raffel et al. 2020).
- ``none``: no position signal (a causal mask alone still leaks order, Haviv et al. 2022).

``ACTS_ON`` records where each scheme enters a model: ``embeddings`` (added to the input),
``queries_keys`` (rotates q and k), or ``scores`` (a bias added to attention scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "t5", "none")
ACTS_ON = {
    "learned": "embeddings",
    "sinusoidal": "embeddings",
    "rope": "queries_keys",
    "alibi": "scores",
    "t5": "scores",
    "none": "nothing",
}
ROPE_SCALINGS = (None, "linear", "ntk", "yarn")


def sinusoidal_table(n_positions: int, d_model: int) -> torch.Tensor:
    """Return the (n_positions, d_model) sinusoidal table of Vaswani et al. 2017, sec. 3.5."""
    positions = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)
    # 1 / 10000^(2i / d_model) for i = 0 .. d_model/2 - 1, computed in float64 for exactness.
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    angles = positions * inv_freq
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return table.float()


class LearnedPositions(nn.Module):
    """A trainable (max_seq_len, d_model) table looked up by position id."""

    def __init__(self, max_seq_len: int, d_model: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.weight = nn.Parameter(torch.zeros(max_seq_len, d_model))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Return position vectors of shape (*position_ids.shape, d_model)."""
        check_position_range(position_ids, self.max_seq_len)
        return nn.functional.embedding(position_ids, self.weight)


class SinusoidalPositions(nn.Module):
    """The fixed sinusoidal table, stored as a non-persistent buffer (it is never trained)."""

    def __init__(self, max_seq_len: int, d_model: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.register_buffer("table", sinusoidal_table(max_seq_len, d_model), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        check_position_range(position_ids, self.max_seq_len)
        return self.table[position_ids]


def check_position_range(position_ids: torch.Tensor, max_seq_len: int) -> None:
    """Raise a ``ValueError`` when a position id falls outside a table of ``max_seq_len`` rows.

    Skipped under ``torch.compile``, because reading the range back to Python splits the graph;
    the table lookup itself still rejects an index outside the table.
    """
    if position_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    largest = int(position_ids.max())
    smallest = int(position_ids.min())
    if largest >= max_seq_len or smallest < 0:
        raise ValueError(
            f"Position id {largest if largest >= max_seq_len else smallest} is outside the position table "
            f"of max_seq_len={max_seq_len}; crop the input to at most {max_seq_len} tokens."
        )


def build_absolute_positions(kind: str, max_seq_len: int, d_model: int) -> nn.Module | None:
    """Build the module that adds absolute positions to embeddings, or None for other schemes."""
    if kind not in POSITIONS:
        raise ValueError(f"position={kind!r} is invalid; allowed values: {', '.join(POSITIONS)}.")
    if kind == "learned":
        return LearnedPositions(max_seq_len, d_model)
    if kind == "sinusoidal":
        return SinusoidalPositions(max_seq_len, d_model)
    return None


# --- Rotary position embedding --------------------------------------------------------------


def yarn_attention_factor(factor: float) -> float:
    """Return YaRN's attention temperature correction 0.1 ln(s) + 1 (Peng et al. 2023), 1 for s <= 1."""
    return 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0


def yarn_ramp(d_head: int, base: float, original_max_seq_len: int, beta_fast: float, beta_slow: float) -> torch.Tensor:
    """Return YaRN's per-frequency ramp in [0, 1]: 0 keeps a frequency, 1 interpolates it fully.

    A frequency that turns more than ``beta_fast`` times over the original context is kept, one
    that turns fewer than ``beta_slow`` times is divided by the factor, and those between are
    blended linearly (Peng et al. 2023). The bounds are rounded outwards to whole
    dimensions, as in the released YaRN code and Hugging Face's ``truncate=True`` default.
    """

    def dimension_for_rotations(n_rotations: float) -> float:
        return d_head * math.log(original_max_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dimension_for_rotations(beta_fast)), 0)
    high = min(math.ceil(dimension_for_rotations(beta_slow)), d_head - 1)
    if low == high:
        high += 0.001  # keeps the ramp finite when both bounds land on one dimension
    pair_index = torch.arange(d_head // 2, dtype=torch.float64, device="cpu")
    return ((pair_index - low) / (high - low)).clamp(0.0, 1.0)


def rope_inverse_frequencies(
    d_head: int,
    base: float = 10000.0,
    scaling: str | None = None,
    factor: float = 1.0,
    original_max_seq_len: int | None = None,
    yarn_beta_fast: float = 32.0,
    yarn_beta_slow: float = 1.0,
) -> torch.Tensor:
    """Return the (d_head // 2,) float64 inverse frequencies theta_i = base^(-2i/d_head), scaled.

    - ``linear``: theta_i / factor, i.e. positions divided by the factor (Chen et al. 2023).
    - ``ntk``: base * factor^(d/(d-2)), which stretches the lowest frequency by exactly the factor
      and leaves the highest nearly unchanged (bloc97, 2023; static, never length-dependent).
    - ``yarn``: per-frequency blend of theta_i and theta_i / factor (see ``yarn_ramp``).
    """
    if scaling not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling={scaling!r} is invalid; allowed values: {', '.join(map(repr, ROPE_SCALINGS))}.")
    if scaling == "ntk":
        base = base * factor ** (d_head / (d_head - 2))
    # On the CPU explicitly: a model built under torch.device("meta") still needs real numbers here.
    exponents = torch.arange(0, d_head, 2, dtype=torch.float64, device="cpu") / d_head
    inv_freq = 1.0 / base**exponents
    if scaling == "linear":
        inv_freq = inv_freq / factor
    if scaling == "yarn":
        if original_max_seq_len is None:
            raise ValueError("rope_scaling='yarn' needs rope_original_max_seq_len, the context length trained on.")
        ramp = yarn_ramp(d_head, base, original_max_seq_len, yarn_beta_fast, yarn_beta_slow)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1.0 - ramp)
    return inv_freq


def rotate_half(features: torch.Tensor) -> torch.Tensor:
    """Map (x1, x2) to (-x2, x1) where x1, x2 are the two halves of the last dimension."""
    first, second = features.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotate_pairs(features: torch.Tensor) -> torch.Tensor:
    """Map each adjacent pair (x_2i, x_2i+1) of the last dimension to (-x_2i+1, x_2i)."""
    even, odd = features[..., 0::2], features[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


@dataclass
class Rotation:
    """The cos and sin of every rotation angle for one forward pass, shared by all layers.

    ``cos`` and ``sin`` have shape (batch or 1, 1, seq, d_head), float32, already multiplied by
    the attention factor (1 except for YaRN). ``interleaved`` pairs features (2i, 2i+1) as in
    the RoFormer and Meta Llama code; otherwise (i, i + d_head/2) as in GPT-NeoX and Hugging Face.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool = False

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """Rotate (batch, heads, seq, d_head) queries or keys; computed in float32, returned in their dtype."""
        rotate = rotate_pairs if self.interleaved else rotate_half
        rotated = features.float() * self.cos + rotate(features.float()) * self.sin
        return rotated.to(features.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with optional static context-extension scaling.

    The inverse frequencies are fixed at construction and kept as float64 Python data instead of a
    buffer, so that ``model.to(torch.bfloat16)`` cannot round them. Angles are computed in float64
    (float32 on devices without it, such as MPS) and only their cos and sin are cast to float32.
    """

    def __init__(
        self,
        d_head: int,
        base: float = 10000.0,
        interleaved: bool = False,
        scaling: str | None = None,
        scaling_factor: float = 1.0,
        original_max_seq_len: int | None = None,
        yarn_beta_fast: float = 32.0,
        yarn_beta_slow: float = 1.0,
    ):
        super().__init__()
        if d_head % 2 != 0:
            raise ValueError(f"d_head={d_head} is invalid for position='rope'; rotary pairs need an even d_head.")
        self.d_head = d_head
        self.interleaved = interleaved
        inv_freq = rope_inverse_frequencies(
            d_head, base, scaling, scaling_factor, original_max_seq_len, yarn_beta_fast, yarn_beta_slow
        )
        self.inv_freq = tuple(inv_freq.tolist())
        self.attention_factor = yarn_attention_factor(scaling_factor) if scaling == "yarn" else 1.0

    def forward(self, position_ids: torch.Tensor) -> Rotation:
        """Return the rotation for position ids of shape (batch or 1, seq)."""
        device = position_ids.device
        angle_dtype = torch.float32 if device.type == "mps" else torch.float64
        inv_freq = torch.tensor(self.inv_freq, dtype=angle_dtype, device=device)
        angles = position_ids.to(angle_dtype)[..., None] * inv_freq  # (batch, seq, d_head / 2)
        if self.interleaved:
            angles = angles.repeat_interleave(2, dim=-1)  # (batch, seq, d_head): theta_0, theta_0, theta_1, ...
        else:
            angles = torch.cat((angles, angles), dim=-1)  # (batch, seq, d_head): theta_0, theta_1, ..., theta_0, ...
        cos = (angles.cos() * self.attention_factor).float()[:, None]  # (batch, 1, seq, d_head)
        sin = (angles.sin() * self.attention_factor).float()[:, None]
        return Rotation(cos, sin, self.interleaved)


# --- Score biases: ALiBi and T5 relative positions ------------------------------------------


def alibi_slopes(n_heads: int) -> list[float]:
    """Return the ALiBi slope of each head (Press et al. 2022).

    For n a power of two the slopes are the geometric sequence starting at 2^(-8/n) with that
    ratio (1/2, 1/4, ..., 1/256 for 8 heads). Otherwise the authors' released code takes all slopes
    for the largest power of two below n, then every other slope of the next power of two.
    """
    if n_heads < 1:
        raise ValueError(f"n_heads={n_heads} is invalid for ALiBi; it must be at least 1.")

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (head + 1) for head in range(n)]

    if n_heads & (n_heads - 1) == 0:
        return power_of_two_slopes(n_heads)
    closest_power = 2 ** math.floor(math.log2(n_heads))
    extra = alibi_slopes(2 * closest_power)[0::2][: n_heads - closest_power]
    return power_of_two_slopes(closest_power) + extra


def relative_positions(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Return (q_len, k_len) key position minus query position, the last query aligned with the last key."""
    query_positions = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    key_positions = torch.arange(k_len, device=device)[None, :]
    return key_positions - query_positions


class ALiBi(nn.Module):
    """Attention with linear biases: adds -slope_h * |i - j| to the scores of head h.

    The distance is symmetric, so an encoder gets the bidirectional form and a causal decoder,
    whose mask hides j > i, the one-sided form of Press et al. The slopes are Python floats, so no
    dtype cast of the model rounds them.
    """

    def __init__(self, n_heads: int, causal: bool = False):
        super().__init__()
        self.slopes = tuple(alibi_slopes(n_heads))
        self.causal = causal

    def forward(self, q_len: int, k_len: int, device=None) -> torch.Tensor:
        """Return the float32 bias for queries that end at the last key.

        Bidirectional: (1, heads, q_len, k_len) = -slope * |i - j|. Causal: (1, heads, 1, k_len) =
        -slope * (k_len - 1 - j), which differs from -slope * (i - j) by a constant per query row.
        Softmax ignores such a constant, so the attention is the same, and the bias stays linear in
        length (BLOOM uses the same form).
        """
        slopes = torch.tensor(self.slopes, dtype=torch.float32, device=device)[:, None, None]
        if self.causal:
            distances_to_last = (k_len - 1 - torch.arange(k_len, device=device)).float()[None, :]  # (1, k_len)
            return (-slopes * distances_to_last)[None]  # (1, heads, 1, k_len)
        distances = relative_positions(q_len, k_len, device).abs().float()
        return (-slopes * distances)[None]


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """Bucket each relative position (key minus query) as T5 does (Raffel et al. 2020; Mesh TensorFlow).

    Bidirectional attention gives half the buckets to keys after the query. In each direction the
    first half of the buckets hold the distances 0, 1, ... exactly and the rest grow
    logarithmically up to ``max_distance``, beyond which all share the last bucket. Causal
    attention buckets only keys at or before the query and puts later keys in bucket 0.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp_min(0)

    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32 like the Mesh TensorFlow original, so that distances on a bucket boundary round the
    # same way as in released T5 checkpoints.
    log_ratio = torch.log(distance.clamp_min(1).float() / max_exact) / math.log(max_distance / max_exact)
    large_bucket = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large_bucket = large_bucket.clamp_max(num_buckets - 1)
    return buckets + torch.where(is_small, distance, large_bucket)


class T5RelativeBias(nn.Module):
    """A learned (num_buckets, n_heads) table of score biases, looked up by relative-position bucket.

    ``relative_attention_bias`` keeps the parameter name of T5 checkpoints.
    """

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = False):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, n_heads)

    def forward(self, q_len: int, k_len: int, device=None) -> torch.Tensor:
        """Return the (1, heads, q_len, k_len) bias for queries that end at the last key."""
        buckets = relative_position_bucket(
            relative_positions(q_len, k_len, device), self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, heads, q_len, k_len)


def build_rotary(config) -> RotaryEmbedding | None:
    """Build the rotary embedding a config's ``position`` and ``rope_*`` fields describe, or None."""
    if config.position != "rope":
        return None
    return RotaryEmbedding(
        config.d_head,
        base=config.rope_base,
        interleaved=config.rope_interleaved,
        scaling=config.rope_scaling,
        scaling_factor=config.rope_scaling_factor,
        original_max_seq_len=config.rope_original_max_seq_len,
        yarn_beta_fast=config.rope_yarn_beta_fast,
        yarn_beta_slow=config.rope_yarn_beta_slow,
    )


def build_score_bias(config, bidirectional: bool) -> nn.Module | None:
    """Build the score-bias module (ALiBi or T5) a config's ``position`` names, or None for other schemes."""
    if config.position == "alibi":
        return ALiBi(config.n_heads, causal=not bidirectional)
    if config.position == "t5":
        return T5RelativeBias(config.n_heads, config.t5_num_buckets, config.t5_max_distance, bidirectional)
    return None
