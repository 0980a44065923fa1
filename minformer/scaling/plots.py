"""Figures of ``minformer scaling fit``: the fitted loss surface, IsoFLOP profiles and the efficient frontier.

Written as PNG files with matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402

from minformer.scaling.chinchilla import LAWS, LossLaw  # noqa: E402


def plot_loss_surface(law: LossLaw, runs: dict, out_path: Path) -> Path:
    """Draw contours of the fitted L(N, D) over the runs, with the compute-optimal N for each D."""
    params, tokens = np.asarray(runs["params"]), np.asarray(runs["tokens"])
    grid_params = np.logspace(np.log10(params.min()) - 0.5, np.log10(params.max()) + 0.5, 200)
    grid_tokens = np.logspace(np.log10(tokens.min()) - 0.5, np.log10(tokens.max()) + 0.5, 200)
    mesh_params, mesh_tokens = np.meshgrid(grid_params, grid_tokens)  # (tokens, params)

    figure, axes = plt.subplots(figsize=(7, 5))
    contours = axes.contourf(mesh_params, mesh_tokens, law.loss(mesh_params, mesh_tokens), levels=20, cmap="viridis")
    figure.colorbar(contours, ax=axes, label="fitted loss (nats/token)")
    axes.scatter(params, tokens, c="white", edgecolors="black", s=18, label="runs")
    frontier_params = np.array([law.optimal_for_tokens(value).params for value in grid_tokens])
    axes.plot(frontier_params, grid_tokens, color="red", label="compute-optimal N for each D")
    axes.set(xscale="log", yscale="log", xlim=(grid_params[0], grid_params[-1]), xlabel="parameters N",
             ylabel="training tokens D", title=f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}")
    axes.legend(loc="lower right")
    return save(figure, out_path)


def plot_isoflops(profiles, fit2, out_path: Path) -> Path:
    """Draw each IsoFLOP profile, its fitted parabola in log N, and the parabola's minimum."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    colours = plt.cm.plasma(np.linspace(0, 0.85, len(profiles)))
    for profile, coefficients, optimum, colour in zip(profiles, fit2.parabolas, fit2.optimal_params, colours):
        axes.scatter(profile.params, profile.losses, color=colour, s=16)
        log_grid = np.linspace(np.log(profile.params.min()), np.log(profile.params.max()), 100)
        axes.plot(np.exp(log_grid), np.polyval(coefficients, log_grid), color=colour, label=f"C = {profile.compute:.2g}")
        axes.axvline(optimum, color=colour, linestyle=":", linewidth=1)
    axes.set(xscale="log", xlabel="parameters N", ylabel="final loss (nats/token)", title="IsoFLOP profiles (Approach 2)")
    axes.legend(fontsize=8)
    return save(figure, out_path)


def plot_frontier(law: LossLaw, fit2, runs: dict, out_path: Path) -> Path:
    """Draw compute-optimal N against C for the fit, the Approach-2 power law and the published laws."""
    flops = np.asarray(runs["flops"])
    budgets = np.logspace(np.log10(flops.min()) - 1, np.log10(flops.max()) + 3, 100)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(budgets, [law.optimal(budget).params for budget in budgets], label="Approach 3 fit", color="black")
    if fit2 is not None:
        axes.plot(budgets, fit2.optimal_params_at(budgets), label="Approach 2 fit", color="black", linestyle="--")
        axes.scatter(fit2.computes, fit2.optimal_params, color="black", s=16, label="IsoFLOP minima")
    for name in ("approach3", "besiroglu2024"):
        published = LAWS[name]
        axes.plot(budgets, [published.optimal(budget).params for budget in budgets], label=published.source, alpha=0.7)
    axes.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="compute-optimal parameters N",
             title="Efficient frontier")
    axes.legend(fontsize=8)
    return save(figure, out_path)


def save(figure, out_path: Path) -> Path:
    out_path = Path(out_path)
    figure.tight_layout()
    figure.savefig(out_path, dpi=120)
    plt.close(figure)
    return out_path
