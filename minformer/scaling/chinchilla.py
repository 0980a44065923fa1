"""Compute-optimal model size and data under the published Chinchilla results.

Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (arXiv:2203.15556), model the
final loss as L(N, D) = E + A / N^alpha + B / D^beta. Minimising it under the budget
C = 6 N D gives (eq. 4)

    N_opt(C) = G (C/6)^(beta/(alpha+beta)),   D_opt(C) = G^-1 (C/6)^(alpha/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta)).

``LAWS`` contains the paper's Approach-3 fit (unrounded and as printed) and the refit of Besiroglu et
al. 2024, "Chinchilla Scaling: A replication attempt" (arXiv:2404.10102). ``APPROACH1_TABLE`` is the
paper's Table 3, used as data and interpolated in log space, not fitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Allocation:
    """A compute budget split into parameters and training tokens, with the predicted loss if known."""

    compute: float
    """Training FLOPs."""
    params: float
    """Model parameters N."""
    tokens: float
    """Training tokens D."""
    loss: float | None = None
    """Predicted final loss in nats per token; None where the source predicts none (Table 3)."""

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


@dataclass(frozen=True)
class LossLaw:
    """The parametric loss L(N, D) = E + A / N^alpha + B / D^beta of Hoffmann et al. 2022 (Approach 3)."""

    E: float
    """Irreducible loss, in nats per token."""
    A: float
    """Scale of the model-size term."""
    B: float
    """Scale of the data term."""
    alpha: float
    """Exponent of the model-size term."""
    beta: float
    """Exponent of the data term."""
    name: str = "law"
    """Short label for tables and plots."""
    source: str = ""
    """Source of the constants."""

    def __post_init__(self):
        for field in ("E", "A", "B", "alpha", "beta"):
            value = getattr(self, field)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{field}={value!r} is invalid; a loss law needs a positive finite {field}.")

    def loss(self, params: float, tokens: float) -> float:
        """Return the predicted loss of ``params`` parameters trained on ``tokens`` tokens."""
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    @property
    def params_exponent(self) -> float:
        """a in N_opt ∝ C^a: beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def tokens_exponent(self) -> float:
        """b in D_opt ∝ C^b: alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """G = (alpha A / (beta B))^(1/(alpha+beta)) of Hoffmann et al. 2022, eq. 4."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def allocation(self, params: float, tokens: float) -> Allocation:
        return Allocation(6.0 * params * tokens, params, tokens, self.loss(params, tokens))

    def optimal(self, compute: float) -> Allocation:
        """Return the N and D that minimise the loss under ``compute`` = 6 N D FLOPs (eq. 4)."""
        check_positive("compute", compute)
        params = self.G * (compute / 6.0) ** self.params_exponent
        return self.allocation(params, compute / 6.0 / params)

    def optimal_for_params(self, params: float) -> Allocation:
        """Return the budget, and its tokens, for which ``params`` is the compute-optimal size."""
        check_positive("params", params)
        half_flops = (params / self.G) ** (1.0 / self.params_exponent)  # C / 6
        return self.allocation(params, half_flops / params)

    def optimal_for_tokens(self, tokens: float) -> Allocation:
        """Return the budget, and its model size, for which ``tokens`` is the compute-optimal data size."""
        check_positive("tokens", tokens)
        half_flops = (tokens * self.G) ** (1.0 / self.tokens_exponent)  # C / 6
        return self.allocation(half_flops / tokens, tokens)


def check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid; it must be a positive finite number.")


HOFFMANN = "Hoffmann et al. 2022, Approach 3"
LAWS = {
    # The fit's constants unrounded; the paper's text prints them rounded (next entry).
    # NOTE: transcribed from secondary sources, not checked against the paper's LaTeX source.
    "approach3": LossLaw(
        E=1.69337, A=406.401, B=410.723, alpha=0.33917084, beta=0.2849083,
        name="approach3", source=f"{HOFFMANN} (unrounded)",
    ),
    # Rounding beta from 0.2849 to 0.28 moves the optimum at Gopher's budget from about 40B to 32B.
    "approach3-rounded": LossLaw(
        E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
        name="approach3-rounded", source=f"{HOFFMANN} (as printed)",
    ),
    "besiroglu2024": LossLaw(
        E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
        name="besiroglu2024", source="Besiroglu et al. 2024, replication of Approach 3",
    ),
}

# Hoffmann et al. 2022, Table 3: Approach-1 projections of compute-optimal training.
# (parameters, training FLOPs, training tokens), transcribed; the values are rounded as printed,
# so 6 N D differs from the FLOPs column by up to 5 % (67B x 1.5T gives 6.03e23, not 5.76e23).
APPROACH1_TABLE = (
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
)
APPROACH1_COLUMNS = ("params", "compute", "tokens")

# Gopher's training budget, at which Hoffmann et al. 2022 trained Chinchilla (70B parameters, 1.4T tokens).
GOPHER_FLOPS = 5.76e23


def interpolate_approach1(column: str, value: float) -> Allocation:
    """Interpolate Table 3 at ``value`` of ``column`` (params, compute or tokens), linearly in log space.

    A value equal to a row's returns that row exactly. Values outside the table raise a
    ``ValueError``, because Table 3 is data and this is no fit to extrapolate from.
    """
    if column not in APPROACH1_COLUMNS:
        raise ValueError(f"column={column!r} is invalid; allowed values: {', '.join(APPROACH1_COLUMNS)}.")
    check_positive(column, value)
    index = APPROACH1_COLUMNS.index(column)
    keys = [row[index] for row in APPROACH1_TABLE]
    if not keys[0] <= value <= keys[-1]:
        raise ValueError(
            f"{column}={value:.3g} is outside Hoffmann et al. 2022 Table 3 ({keys[0]:.3g} to {keys[-1]:.3g}); "
            "Approach 1 gives no projection there."
        )

    for row in APPROACH1_TABLE:
        if row[index] == value:
            return Allocation(compute=row[1], params=row[0], tokens=row[2])

    upper = next(i for i, key in enumerate(keys) if key > value)
    lower_row, upper_row = APPROACH1_TABLE[upper - 1], APPROACH1_TABLE[upper]
    weight = math.log(value / lower_row[index]) / math.log(upper_row[index] / lower_row[index])
    params, compute, tokens = (
        math.exp((1 - weight) * math.log(low) + weight * math.log(high)) for low, high in zip(lower_row, upper_row)
    )
    return Allocation(compute=compute, params=params, tokens=tokens)


def approach1_optimal(compute: float) -> Allocation:
    """Return Table 3's compute-optimal parameters and tokens at ``compute`` FLOPs (log interpolation)."""
    return interpolate_approach1("compute", compute)
