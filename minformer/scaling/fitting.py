"""Fit Chinchilla's Approaches 2 and 3 (Hoffmann et al. 2022) to measured final losses.

Approach 3 fits L(N, D) = E + A / N^alpha + B / D^beta to every run at once. As in the paper, the
fit works on log-losses, log L = LSE(a - alpha log N, b - beta log D, e) with A = exp(a),
B = exp(b), E = exp(e), minimises the summed Huber loss (delta = 1e-3) of the log-loss residuals
with L-BFGS, and starts it from a grid of initialisations, keeping the best result. The Huber terms
are summed, not averaged, and the stopping tolerances are tight: with delta = 1e-3 the objective is
of order 1e-6 per run, and scipy's default tolerances stop L-BFGS-B far from the optimum.

Approach 2 fits a parabola of loss against log N to each IsoFLOP profile (runs of one budget),
takes its minimum as that budget's optimal N, and fits the power laws N_opt ∝ C^a and D_opt ∝ C^b.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from minformer.scaling.chinchilla import LossLaw

HUBER_DELTA = 1e-3

# Starting points (a, b, e, alpha, beta): alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
# a, b in {0, 5, ..., 25}; 4,500 points. NOTE: taken from descriptions of the paper's grid in
# secondary sources, not checked against the paper itself.
INIT_GRID = np.array(
    [
        (a, b, e, alpha, beta)
        for a, b, e, alpha, beta in itertools.product(
            np.arange(0, 30, 5), np.arange(0, 30, 5), np.arange(-1, 1.5, 0.5), np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5)
        )
    ],
    dtype=np.float64,
)
PARAMETER_NAMES = ("E", "A", "B", "alpha", "beta")


@dataclass
class Approach3Fit:
    """The fitted law, its objective, and bootstrap percentile intervals when requested."""

    law: LossLaw
    objective: float
    """Summed Huber loss of the log-loss residuals at the optimum."""
    n_points: int
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Name (E, A, B, alpha, beta, a, b) -> (low, high) percentile interval; a and b are the
    allocation exponents beta / (alpha + beta) and alpha / (alpha + beta)."""
    confidence: float | None = None


def huber(residuals: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Return the Huber loss of each residual and its derivative."""
    small = np.abs(residuals) <= delta
    loss = np.where(small, 0.5 * residuals**2, delta * (np.abs(residuals) - 0.5 * delta))
    slope = np.clip(residuals, -delta, delta)
    return loss, slope


def log_loss_terms(theta: np.ndarray, log_params: np.ndarray, log_tokens: np.ndarray) -> np.ndarray:
    """Stack the three LSE terms a - alpha log N, b - beta log D, e for parameter rows ``theta`` (..., 5).

    Returns shape (..., 3, n_points).
    """
    a, b, e, alpha, beta = (theta[..., index, None] for index in range(5))
    return np.stack(
        [a - alpha * log_params, b - beta * log_tokens, np.broadcast_to(e, (a * log_params).shape)], axis=-2
    )


def huber_objective(theta, log_params, log_tokens, log_losses, delta):
    """Return the summed Huber loss of log-loss residuals, and its gradient in (a, b, e, alpha, beta)."""
    terms = log_loss_terms(theta, log_params, log_tokens)  # (3, n_points)
    largest = terms.max(axis=0)
    predicted = largest + np.log(np.exp(terms - largest).sum(axis=0))  # LSE over the three terms
    loss, slope = huber(predicted - log_losses, delta)
    weights = np.exp(terms - predicted) * slope  # d(LSE)/d(term) times the Huber slope, (3, n_points)
    gradient = np.array(
        [
            weights[0].sum(),
            weights[1].sum(),
            weights[2].sum(),
            -(weights[0] * log_params).sum(),
            -(weights[1] * log_tokens).sum(),
        ]
    )
    return loss.sum(), gradient


def grid_objectives(log_params, log_tokens, log_losses, delta) -> np.ndarray:
    """Return the objective at every row of ``INIT_GRID`` in one vectorised pass."""
    predicted = logsumexp(log_loss_terms(INIT_GRID, log_params, log_tokens), axis=-2)  # (grid, n_points)
    return huber(predicted - log_losses, delta)[0].sum(axis=-1)


def run_lbfgs(start, log_params, log_tokens, log_losses, delta):
    # The objective is of order delta^2 per point, far below 1, and L-BFGS-B compares the decrease per
    # step with ftol * max(|f|, 1): scipy's default ftol of 2.2e-9 stops it far from the optimum.
    result = minimize(
        huber_objective,
        start,
        args=(log_params, log_tokens, log_losses, delta),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-9},
    )
    return result.x, float(result.fun)


def best_of_starts(starts, log_params, log_tokens, log_losses, delta):
    best_theta, best_objective = None, math.inf
    for start in starts:
        theta, objective = run_lbfgs(start, log_params, log_tokens, log_losses, delta)
        if np.all(np.isfinite(theta)) and objective < best_objective:
            best_theta, best_objective = theta, objective
    return best_theta, best_objective


def theta_to_law(theta: np.ndarray, name: str = "fit") -> LossLaw:
    a, b, e, alpha, beta = (float(value) for value in theta)
    return LossLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, name=name, source="fitted")


def check_runs(params, tokens, losses) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the runs as float64 arrays, raising a ``ValueError`` for mismatched or non-positive values."""
    arrays = [np.asarray(values, dtype=np.float64).ravel() for values in (params, tokens, losses)]
    if len({array.size for array in arrays}) != 1:
        raise ValueError(f"params, tokens and losses have different lengths: {[array.size for array in arrays]}.")
    for name, array in zip(("params", "tokens", "losses"), arrays):
        if not np.all(np.isfinite(array) & (array > 0)):
            raise ValueError(f"{name} contains non-positive or non-finite values; every run needs N, D, L > 0.")
    return arrays[0], arrays[1], arrays[2]


def fit_approach3(
    params,
    tokens,
    losses,
    delta: float = HUBER_DELTA,
    n_starts: int | None = 16,
    bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
) -> Approach3Fit:
    """Fit L(N, D) = E + A / N^alpha + B / D^beta to runs of ``params`` N, ``tokens`` D and final ``losses`` L.

    L-BFGS starts from the ``n_starts`` points of ``INIT_GRID`` with the lowest objective, or from
    all 4,500 with ``n_starts=None`` (about 300 times slower), and the best optimum is kept.
    ``bootstrap`` > 0 refits that many resamples of the runs (drawn with replacement, seeded by
    ``seed``), each started from the full-data optimum and from the best grid point of the
    resample, and reports ``confidence`` percentile intervals.
    """
    params, tokens, losses = check_runs(params, tokens, losses)
    if params.size < 5:
        raise ValueError(f"Approach 3 fits five constants and needs at least 5 runs, got {params.size}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} is invalid; it must be in (0, 1).")
    data = (np.log(params), np.log(tokens), np.log(losses))

    theta, objective = best_of_starts(select_starts(data, delta, n_starts), *data, delta)
    if theta is None:
        raise RuntimeError("Approach 3: L-BFGS returned no finite optimum from any initialisation.")
    fit = Approach3Fit(law=theta_to_law(theta), objective=objective, n_points=int(params.size))

    if bootstrap > 0:
        fit.intervals = bootstrap_intervals(data, theta, delta, bootstrap, confidence, seed)
        fit.confidence = confidence
    return fit


def select_starts(data, delta, n_starts):
    if n_starts is None:
        return INIT_GRID
    order = np.argsort(grid_objectives(*data, delta))
    return INIT_GRID[order[:n_starts]]


def bootstrap_intervals(data, theta, delta, n_resamples, confidence, seed):
    """Refit resamples of the runs and return percentile intervals of each constant."""
    rng = np.random.default_rng(seed)
    n_points = data[0].size
    samples = []
    for _ in range(n_resamples):
        indices = rng.integers(0, n_points, size=n_points)
        resample = tuple(column[indices] for column in data)
        starts = np.vstack([theta[None], select_starts(resample, delta, 1)])
        fitted, _ = best_of_starts(starts, *resample, delta)
        if fitted is not None:
            samples.append(fitted)

    samples = np.array(samples)  # (resamples, 5): a, b, e, alpha, beta
    alpha, beta = samples[:, 3], samples[:, 4]
    # A resample of a few runs can drive log A or log B far out, so exp overflows to inf. The
    # percentiles then return an unbounded interval end (inf or nan), and no warning is printed.
    with np.errstate(over="ignore", invalid="ignore"):
        columns = {
            "E": np.exp(samples[:, 2]),
            "A": np.exp(samples[:, 0]),
            "B": np.exp(samples[:, 1]),
            "alpha": alpha,
            "beta": beta,
            "a": beta / (alpha + beta),
            "b": alpha / (alpha + beta),
        }
        tail = 100 * (1 - confidence) / 2
        return {name: tuple(float(q) for q in np.percentile(values, [tail, 100 - tail])) for name, values in columns.items()}


# ---- Approach 2 ---------------------------------------------------------------------------


@dataclass
class IsoFLOPProfile:
    """Runs of one training budget: model sizes, their final losses, and their training tokens if known."""

    compute: float
    params: np.ndarray
    losses: np.ndarray
    tokens: np.ndarray | None = None
    """Training tokens of each run; when given, Approach 2 takes D_opt from a parabola in log D."""


@dataclass
class Approach2Fit:
    """Per-profile optima and the power laws N_opt = params_coefficient C^a, D_opt = tokens_coefficient C^b."""

    computes: np.ndarray
    optimal_params: np.ndarray
    optimal_tokens: np.ndarray
    params_exponent: float
    """a in N_opt ∝ C^a."""
    tokens_exponent: float
    """b in D_opt ∝ C^b."""
    params_coefficient: float
    tokens_coefficient: float
    parabolas: list[np.ndarray]
    """Per profile, the coefficients of loss = p0 (log N)^2 + p1 log N + p2 (numpy.polyfit order)."""

    def optimal_params_at(self, compute: float) -> float:
        return self.params_coefficient * compute**self.params_exponent

    def optimal_tokens_at(self, compute: float) -> float:
        return self.tokens_coefficient * compute**self.tokens_exponent


def parabola_minimum(log_params: np.ndarray, losses: np.ndarray, compute: float) -> tuple[float, np.ndarray]:
    """Fit loss = p0 x^2 + p1 x + p2 with x = log N and return the minimising log N and the coefficients."""
    coefficients = np.polyfit(log_params, losses, 2)
    if coefficients[0] <= 0:
        raise ValueError(
            f"The IsoFLOP profile at C={compute:.3g} is not convex in log N (curvature {coefficients[0]:.3g}); "
            "add model sizes on both sides of its minimum."
        )
    return -coefficients[1] / (2 * coefficients[0]), coefficients


def fit_approach2(profiles: list[IsoFLOPProfile]) -> Approach2Fit:
    """Fit a parabola in log N to each IsoFLOP profile, then power laws of its minima against C.

    D_opt at each budget is the minimum of a parabola of loss in log D when the profile has its
    runs' tokens (as Hoffmann et al. 2022 fit both), and C / (6 N_opt) otherwise. The minimum of a
    parabola fitted over a window is biased when the profile is not symmetric in log N, so centre
    each profile's sizes on its minimum.
    """
    if len(profiles) < 2:
        raise ValueError(f"Approach 2 needs IsoFLOP profiles at 2 or more budgets, got {len(profiles)}.")
    computes, log_optima, log_token_optima, parabolas = [], [], [], []
    for profile in profiles:
        params = np.asarray(profile.params, dtype=np.float64).ravel()
        losses = np.asarray(profile.losses, dtype=np.float64).ravel()
        check_runs(params, np.ones_like(params), losses)
        if params.size < 3:
            raise ValueError(f"The IsoFLOP profile at C={profile.compute:.3g} has {params.size} runs; a parabola needs 3.")
        log_optimum, coefficients = parabola_minimum(np.log(params), losses, profile.compute)
        if profile.tokens is None:
            log_token_optima.append(math.log(profile.compute / 6.0) - log_optimum)
        else:
            tokens = np.asarray(profile.tokens, dtype=np.float64).ravel()
            log_token_optima.append(parabola_minimum(np.log(tokens), losses, profile.compute)[0])
        computes.append(profile.compute)
        log_optima.append(log_optimum)
        parabolas.append(coefficients)

    computes = np.array(computes, dtype=np.float64)
    optimal_params = np.exp(np.array(log_optima))
    optimal_tokens = np.exp(np.array(log_token_optima))
    params_exponent, params_log_coefficient = np.polyfit(np.log(computes), np.log(optimal_params), 1)
    tokens_exponent, tokens_log_coefficient = np.polyfit(np.log(computes), np.log(optimal_tokens), 1)
    return Approach2Fit(
        computes=computes,
        optimal_params=optimal_params,
        optimal_tokens=optimal_tokens,
        params_exponent=float(params_exponent),
        tokens_exponent=float(tokens_exponent),
        params_coefficient=float(math.exp(params_log_coefficient)),
        tokens_coefficient=float(math.exp(tokens_log_coefficient)),
        parabolas=parabolas,
    )


def profiles_from_runs(params, tokens, losses, flops=None, significant_digits: int = 3) -> list[IsoFLOPProfile]:
    """Group runs into IsoFLOP profiles by their budget rounded to ``significant_digits``.

    ``flops`` defaults to 6 N D; give the sweep's nominal budgets, since runs of whole steps miss
    them slightly. Budgets with fewer than 3 runs are dropped, since no parabola fits them.
    """
    params, tokens, losses = check_runs(params, tokens, losses)
    flops = 6.0 * params * tokens if flops is None else np.asarray(flops, dtype=np.float64).ravel()
    groups: dict[float, list[int]] = {}
    for index, budget in enumerate(flops):
        groups.setdefault(float(f"{budget:.{significant_digits - 1}e}"), []).append(index)
    return [
        IsoFLOPProfile(compute=budget, params=params[indices], losses=losses[indices], tokens=tokens[indices])
        for budget, indices in sorted(groups.items())
        if len(indices) >= 3
    ]


def split_convex(profiles: list[IsoFLOPProfile]) -> tuple[list[IsoFLOPProfile], list[IsoFLOPProfile]]:
    """Split profiles into those whose parabola in log N is convex, which Approach 2 can use, and the rest."""
    convex, rejected = [], []
    for profile in profiles:
        try:
            parabola_minimum(np.log(np.asarray(profile.params, dtype=np.float64)), np.asarray(profile.losses), profile.compute)
            convex.append(profile)
        except ValueError:
            rejected.append(profile)
    return convex, rejected
