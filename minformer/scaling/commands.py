"""The ``minformer scaling`` commands: ``optimal``, ``count`` and ``fit``.

This module belongs to the command-line interface: it prints, and the library modules it calls do not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minformer.scaling.accounting import CONVENTIONS, config_parameters, flops_per_token
from minformer.scaling.chinchilla import LAWS, Allocation, interpolate_approach1

# Allocation exponents a (N_opt ∝ C^a) and b (D_opt ∝ C^b) of Hoffmann et al. 2022, Table 2,
# and of the Besiroglu et al. 2024 refit (beta / (alpha + beta) of its constants).
# NOTE: the Table 2 values are transcribed, not checked against the paper's PDF.
PUBLISHED_EXPONENTS = {
    "Hoffmann Approach 1": (0.50, 0.50),
    "Hoffmann Approach 2": (0.49, 0.51),
    "Hoffmann Approach 3": (0.46, 0.54),
    "Besiroglu et al. 2024": (LAWS["besiroglu2024"].params_exponent, LAWS["besiroglu2024"].tokens_exponent),
}


def format_count(value: float) -> str:
    """Write 4.04e10 as 40.4B and 1.5e12 as 1.5T; 1e15 and above in scientific notation."""
    if value >= 1e15:
        return f"{value:.3g}"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def add_scaling_parser(commands) -> None:
    """Add the ``scaling`` command and its subcommands to the CLI's subparsers."""
    scaling = commands.add_parser("scaling", help="compute-optimal allocation, FLOP accounting, Chinchilla fits")
    subcommands = scaling.add_subparsers(dest="scaling_command", required=True)

    optimal = subcommands.add_parser(
        "optimal",
        help="compute-optimal parameters and tokens under the published Chinchilla results",
        description="Give exactly one of --compute, --params, --tokens. Prints Hoffmann et al. 2022's "
        "Approach-3 law, the Besiroglu et al. 2024 refit, and Hoffmann's Table 3 (Approach 1, interpolated).",
    )
    target = optimal.add_mutually_exclusive_group(required=True)
    target.add_argument("--compute", type=float, help="training budget in FLOPs, e.g. 5.76e23")
    target.add_argument("--params", type=float, help="model size N: the budget for which N is compute-optimal")
    target.add_argument("--tokens", type=float, help="data size D: the budget for which D is compute-optimal")
    optimal.add_argument("--rounded", action="store_true",
                         help="use Approach 3's constants as printed (E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)")

    count = subcommands.add_parser("count", help="parameters and training FLOPs per token of a preset or config file")
    count.add_argument("config", help="preset name or path to a YAML config file")
    count.add_argument("--context", type=int, default=None, help="sequence length in tokens (default: model.max_seq_len)")
    count.add_argument("--vocab-size", type=int, default=None, help="vocabulary size, for presets that take it from a tokenizer")

    fit = subcommands.add_parser(
        "fit",
        help="fit Chinchilla Approaches 2 and 3 to your runs",
        description="RESULTS.jsonl holds one run per line: {\"params\": N, \"tokens\": D, \"flops\": C, \"loss\": L}; "
        "flops may be omitted (6 N D is used).",
    )
    fit.add_argument("results", help="JSON-lines file of runs")
    fit.add_argument("--out", default=None, help="folder for the PNG figures (default: a folder named after RESULTS without its extension, beside it)")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the Approach-3 intervals (default 200)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")


def command_scaling(args: argparse.Namespace) -> int:
    if args.scaling_command == "optimal":
        return command_optimal(args)
    if args.scaling_command == "count":
        return command_count(args)
    return command_fit(args)


def optimal_rows(args) -> list[tuple[str, Allocation | str]]:
    """Return (source, allocation or reason for none) for each published result."""
    law_names = ("approach3-rounded" if args.rounded else "approach3", "besiroglu2024")
    rows = []
    for name in law_names:
        law = LAWS[name]
        if args.compute is not None:
            rows.append((law.source, law.optimal(args.compute)))
        elif args.params is not None:
            rows.append((law.source, law.optimal_for_params(args.params)))
        else:
            rows.append((law.source, law.optimal_for_tokens(args.tokens)))

    column, value = next((c, v) for c, v in (("compute", args.compute), ("params", args.params), ("tokens", args.tokens)) if v is not None)
    try:
        rows.append(("Hoffmann et al. 2022, Table 3 (Approach 1)", interpolate_approach1(column, value)))
    except ValueError as error:
        rows.append(("Hoffmann et al. 2022, Table 3 (Approach 1)", str(error)))
    return rows


def command_optimal(args) -> int:
    rows = list(optimal_rows(args))  # computed first, so that invalid input fails before the header prints
    header = f"{'source':<48} {'FLOPs':>9} {'params':>8} {'tokens':>8} {'tokens/param':>12} {'loss':>6}"
    print(header)
    print("-" * len(header))
    for source, allocation in rows:
        if isinstance(allocation, str):
            print(f"{source:<48} {allocation}")
            continue
        loss = f"{allocation.loss:.3f}" if allocation.loss is not None else "-"
        print(
            f"{source:<48} {allocation.compute:>9.3g} {format_count(allocation.params):>8} "
            f"{format_count(allocation.tokens):>8} {allocation.tokens_per_param:>12.1f} {loss:>6}"
        )
    print("C = 6 N D for the laws; Table 3's rows are printed values, rounded, and interpolated in log space.")
    return 0


def command_count(args) -> int:
    from minformer.config import load_config_file
    from minformer.models import config_from_dict

    model_section = dict(load_config_file(args.config).get("model") or {})
    if args.vocab_size is not None:
        model_section["vocab_size"] = args.vocab_size
    if model_section.get("vocab_size") is None:
        raise ValueError(f"{args.config!r} takes vocab_size from its tokenizer; pass --vocab-size V.")
    config = config_from_dict(model_section)
    context = args.context if args.context is not None else config.max_seq_len

    print(f"parameters:               {config_parameters(config):,}")
    print(f"non-embedding parameters: {config_parameters(config, non_embedding=True):,}")
    for convention in CONVENTIONS:
        print(f"training FLOPs per token ({convention}, context {context}): {flops_per_token(config, context, convention):.4g}")
    return 0


def read_runs(path: Path) -> dict[str, list[float]]:
    """Read {params, tokens, flops, loss} rows of a JSON-lines file; flops defaults to 6 N D."""
    columns = {"params": [], "tokens": [], "flops": [], "loss": []}
    if not Path(path).is_file():
        raise ValueError(f"Results file not found: {path}; give a JSON-lines file of runs with params, tokens and loss.")
    for line_number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [key for key in ("params", "tokens", "loss") if key not in row]
        if missing:
            raise ValueError(f"{path}:{line_number} is missing {', '.join(missing)}; each run needs params, tokens and loss.")
        columns["params"].append(float(row["params"]))
        columns["tokens"].append(float(row["tokens"]))
        columns["flops"].append(float(row.get("flops", 6.0 * float(row["params"]) * float(row["tokens"]))))
        columns["loss"].append(float(row["loss"]))
    return columns


def command_fit(args) -> int:
    from minformer.scaling.fitting import fit_approach2, fit_approach3, profiles_from_runs
    from minformer.scaling.plots import plot_frontier, plot_isoflops, plot_loss_surface

    runs = read_runs(Path(args.results))
    out = Path(args.out) if args.out else Path(args.results).with_suffix("")
    out.mkdir(parents=True, exist_ok=True)

    fit3 = fit_approach3(runs["params"], runs["tokens"], runs["loss"], bootstrap=args.bootstrap, seed=args.seed)
    law = fit3.law
    print(f"Approach 3 on {fit3.n_points} runs (Huber objective {fit3.objective:.3g}):")
    for name in ("E", "A", "B", "alpha", "beta"):
        interval = fit3.intervals.get(name)
        suffix = f"  [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else ""
        print(f"  {name:<6} {getattr(law, name):.4g}{suffix}")
    exponents = {"a": law.params_exponent, "b": law.tokens_exponent}
    for name, value in exponents.items():
        interval = fit3.intervals.get(name)
        suffix = f"  [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else ""
        print(f"  {name:<6} {value:.4f}{suffix}")
    if fit3.confidence is not None:
        print(f"  (brackets: {fit3.confidence:.0%} bootstrap percentile intervals over {args.bootstrap} resamples)")

    profiles = profiles_from_runs(runs["params"], runs["tokens"], runs["loss"], flops=runs["flops"])
    fit2 = None
    if len(profiles) >= 2:
        fit2 = fit_approach2(profiles)
        print(f"Approach 2 on {len(profiles)} IsoFLOP profiles: a = {fit2.params_exponent:.4f}, b = {fit2.tokens_exponent:.4f}")
    else:
        print("Approach 2 skipped: it needs 2 or more budgets with 3 or more runs each.")

    print("Published exponents (a, b):")
    for source, (a, b) in PUBLISHED_EXPONENTS.items():
        print(f"  {source:<24} a = {a:.3f}, b = {b:.3f}")

    figures = [plot_loss_surface(law, runs, out / "loss_surface.png"), plot_frontier(law, fit2, runs, out / "frontier.png")]
    if fit2 is not None:
        figures.append(plot_isoflops(profiles, fit2, out / "isoflops.png"))
    print("figures: " + ", ".join(str(path) for path in figures))
    return 0
