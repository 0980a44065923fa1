"""The ``minformer scaling`` commands: ``optimal``, ``count``, ``sweep``, ``fit`` and ``plan``.

This module belongs to the command-line interface: it prints, and the library modules it calls do not.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from minformer.scaling.accounting import CONVENTIONS, config_parameters, flops_per_token
from minformer.scaling.chinchilla import LAWS, Allocation, interpolate_approach1
from minformer.scaling.sweep import FULL, FULL_ESTIMATE_MINUTES, QUICK, RUNS_FILE, parse_json_lines

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

    add_sweep_parser(subcommands)

    fit = subcommands.add_parser(
        "fit",
        help="fit Chinchilla Approaches 2 and 3 to your runs",
        description="RESULTS.jsonl holds one run per line: {\"params\": N, \"tokens\": D, \"flops\": C, \"loss\": L}; "
        "flops may be omitted (6 N D is used), and runs of one IsoFLOP profile may share a \"budget\" field "
        "(default: flops). `minformer scaling sweep` writes such a file. The fit's constants go to fit.json in --out.",
    )
    fit.add_argument("results", help="JSON-lines file of runs")
    fit.add_argument("--out", default=None, help="folder for the PNG figures and fit.json (default: a folder named after RESULTS without its extension, beside it)")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the Approach-3 intervals (default 200)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    fit.add_argument("--non-embedding", action="store_true",
                     help="fit N as non-embedding parameters (Kaplan et al. 2020) instead of all parameters (Hoffmann et al. 2022)")

    add_plan_parser(subcommands)


def add_sweep_parser(subcommands) -> None:
    budgets = ", ".join(f"{budget:.3g}" for budget in FULL.budgets)
    sweep = subcommands.add_parser(
        "sweep",
        help=f"train IsoFLOP profiles of small GPTs on Shakespeare (default grid: about {FULL_ESTIMATE_MINUTES} minutes on 2 cores)",
        description=f"Trains character-level GPTs at budgets of {budgets} FLOPs, {FULL.sizes_per_budget} model sizes each, "
        f"every run on C / (FLOPs per token) tokens, and appends each run's held-out loss to OUT/{RUNS_FILE}. "
        f"The default grid takes about {FULL_ESTIMATE_MINUTES} minutes on 2 cores, an estimate from one-thread "
        "throughput measured on a 2-core Xeon. Rerunning the command skips the runs already in the file, so an "
        f"interrupted sweep resumes. Then run `minformer scaling fit OUT/{RUNS_FILE}`.",
    )
    sweep.add_argument("--out", required=True, help=f"folder for {RUNS_FILE}")
    sweep.add_argument("--quick", action="store_true", help="tiny models, context 16, a few seconds (a smoke run)")
    sweep.add_argument("--budgets", type=float, nargs="+", default=None,
                       help=f"training budgets in FLOPs, one IsoFLOP profile each (default {budgets})")
    sweep.add_argument("--corpus", default="shakespeare", help="prepared corpus to train on (default shakespeare)")
    sweep.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default 0: torch's default)")


def add_plan_parser(subcommands) -> None:
    plan = subcommands.add_parser(
        "plan",
        help="model size, tokens and steps for training M minutes on this machine",
        description="Sets the budget C = training FLOP/s x 60 x MINUTES, splits it with a loss law "
        "(a fit.json from `scaling fit`, else an Approach-3 fit of --runs, else the Besiroglu et al. 2024 law) "
        "and prints the nearest GPT shape and its steps. FLOP/s come from --throughput, else the sweep's runs "
        "(flops / seconds of the run nearest in size), else a few seconds of timed training here.",
    )
    plan.add_argument("--minutes", type=float, required=True, help="training time in minutes")
    plan.add_argument("--fit", default=None, help="fit.json written by `minformer scaling fit`")
    plan.add_argument("--runs", default=None, help=f"the sweep's {RUNS_FILE}: its Approach-3 fit and its throughput")
    plan.add_argument("--throughput", type=float, default=None, help="training FLOP/s to assume instead of measuring")
    plan.add_argument("--context", type=int, default=None, help="sequence length (default: the runs', else the sweep's 128)")
    plan.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the runs', else the sweep's 8)")
    plan.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="training dtype when measuring (default float32)")
    plan.add_argument("--corpus", default="shakespeare", help="corpus whose character vocabulary sizes the model, without --runs (default shakespeare)")
    plan.add_argument("--measure-seconds", type=float, default=3.0, help="seconds of timed training per measured shape (default 3)")


def command_scaling(args: argparse.Namespace) -> int:
    if args.scaling_command == "optimal":
        return command_optimal(args)
    if args.scaling_command == "count":
        return command_count(args)
    if args.scaling_command == "sweep":
        return command_sweep(args)
    if args.scaling_command == "plan":
        return command_plan(args)
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


def check_output_folder(path: Path) -> None:
    """Raise a ``ValueError`` when the output folder ``path`` exists as a file."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder; give a folder for the results.")


def command_sweep(args) -> int:
    from dataclasses import replace

    from minformer.cli import format_duration
    from minformer.scaling.sweep import run_sweep
    from minformer.training.trainer import set_torch_threads

    settings = QUICK if args.quick else FULL
    settings = replace(settings, corpus=args.corpus, budgets=tuple(args.budgets) if args.budgets else settings.budgets)
    if args.threads < 0:
        raise ValueError(f"--threads={args.threads} is invalid; give 0 (torch's default) or a positive count.")
    check_output_folder(Path(args.out))
    if (Path(args.out) / RUNS_FILE).exists() and not (Path(args.out) / RUNS_FILE).is_file():
        raise ValueError(f"{Path(args.out) / RUNS_FILE} is a folder; the sweep appends its runs to a file of that name.")
    if args.threads:
        set_torch_threads(args.threads, "--threads")

    start = time.perf_counter()
    rows = run_sweep(
        Path(args.out),
        settings,
        on_progress=lambda line: print(f"[{format_duration(time.perf_counter() - start)}] {line}", file=sys.stderr, flush=True),
    )
    path = Path(args.out) / RUNS_FILE
    print(f"{len(rows)} runs in {path}; fit them with: minformer scaling fit {path}")
    return 0


def read_runs(path: Path, params_key: str = "params") -> dict[str, list[float]]:
    """Read {params, tokens, flops, budget, loss} columns of a JSON-lines file of runs.

    flops defaults to 6 N D and budget to flops. ``params_key`` names the field read as N. An
    incomplete last line (a sweep interrupted while writing) is skipped with a note on stderr.
    """
    columns = {"params": [], "tokens": [], "flops": [], "budget": [], "loss": []}
    if not Path(path).is_file():
        raise ValueError(f"Results file not found: {path}; give a JSON-lines file of runs with params, tokens and loss.")
    rows, torn = parse_json_lines(Path(path))
    if torn:
        print(f"note: skipped the incomplete last line of {path} (a write cut short)", file=sys.stderr)
    for line_number, row in rows:
        missing = [key for key in (params_key, "tokens", "loss") if key not in row]
        if missing:
            raise ValueError(f"{path}:{line_number} is missing {', '.join(missing)}; each run needs {params_key}, tokens and loss.")
        params, tokens = float(row[params_key]), float(row["tokens"])
        flops = float(row.get("flops", 6.0 * params * tokens))
        columns["params"].append(params)
        columns["tokens"].append(tokens)
        columns["flops"].append(flops)
        columns["budget"].append(float(row.get("budget", flops)))
        columns["loss"].append(float(row["loss"]))
    if not columns["loss"]:
        raise ValueError(f"{path} contains no runs; run `minformer scaling sweep` first or add runs to the file.")
    check_one_recipe(path, rows)
    for column, name in (("params", params_key), ("tokens", "tokens")):
        if len(set(columns[column])) < 2:
            raise ValueError(
                f"Every run in {path} has the same {name} ({columns[column][0]:g}); a loss law needs runs of "
                f"at least two values of {name}, so the sweep must vary model size and training length."
            )
    return columns


def check_one_recipe(path: Path, rows: list[tuple[int, dict]]) -> None:
    """Raise a ``ValueError`` naming the line and fields where a run's ``recipe`` differs from the first run's.

    Runs trained with another corpus, context, batch size or learning rate follow another loss law,
    so one fit must not mix them. Rows without a recipe are not checked.
    """
    recipes = [(line_number, row["recipe"]) for line_number, row in rows if isinstance(row.get("recipe"), dict)]
    if not recipes:
        return
    first_line, first = recipes[0]
    for line_number, recipe in recipes[1:]:
        differing = sorted(key for key in set(first) | set(recipe) if first.get(key) != recipe.get(key))
        if differing:
            raise ValueError(
                f"{path}:{line_number} has another recipe than line {first_line} ({', '.join(differing)} differ); "
                "fit runs of one recipe only, by writing each recipe's runs to its own file."
            )


def print_approach3(fit3, bootstrap: int) -> None:
    law = fit3.law
    print(f"Approach 3 on {fit3.n_points} runs (Huber objective {fit3.objective:.3g}):")
    values = {"E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta}
    for name, value in values.items():
        interval = fit3.intervals.get(name)
        suffix = f"  [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else ""
        print(f"  {name:<6} {value:.4g}{suffix}")
    exponents = {"a": law.params_exponent, "b": law.tokens_exponent}
    for name, value in exponents.items():
        interval = fit3.intervals.get(name)
        suffix = f"  [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else ""
        print(f"  {name:<6} {value:.4f}{suffix}")
    if fit3.confidence is not None:
        print(f"  (brackets: {fit3.confidence:.0%} bootstrap percentile intervals over {bootstrap} resamples)")


def fit_profiles(runs: dict):
    """Fit Approach 2 to the convex IsoFLOP profiles of ``runs`` and print it; return (profiles, fit or None)."""
    from minformer.scaling.fitting import fit_approach2, profiles_from_runs, split_convex

    profiles, rejected = split_convex(profiles_from_runs(runs["params"], runs["tokens"], runs["loss"], flops=runs["budget"]))
    for profile in rejected:
        print(f"IsoFLOP profile at C={profile.compute:.3g} skipped: its loss is not convex in log N (add sizes on both sides of its minimum).")
    if len(profiles) < 2:
        print("Approach 2 skipped: it needs 2 or more budgets with 3 or more runs each and a convex profile.")
        return profiles, None

    fit2 = fit_approach2(profiles)
    print(f"Approach 2 on {len(profiles)} IsoFLOP profiles: a = {fit2.params_exponent:.4f}, b = {fit2.tokens_exponent:.4f}")
    for profile, optimum in zip(profiles, fit2.optimal_params):
        inside = profile.params.min() <= optimum <= profile.params.max()
        print(f"  C={profile.compute:.3g}: N_opt = {format_count(optimum)}" + ("" if inside else " (outside the profile's sizes: extrapolated)"))
    return profiles, fit2


def finite_or_none(value: float) -> float | None:
    """Return ``value``, or None (JSON null) for inf and nan, which strict JSON cannot hold."""
    return value if math.isfinite(value) else None


def fit_record(args, fit3, fit2) -> dict:
    """Return the contents of fit.json: both fits, and the runs' vocabulary, context, batch size, lr and corpus for ``scaling plan``."""
    from minformer.scaling.plan import run_shape_defaults
    from minformer.scaling.sweep import read_runs_file

    law = fit3.law
    record = {
        "runs": str(args.results),
        "n_runs": fit3.n_points,
        "params_key": "non_embedding_params" if args.non_embedding else "params",
        "approach3": {
            "E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta,
            "a": law.params_exponent, "b": law.tokens_exponent, "objective": fit3.objective,
            "intervals": {name: [finite_or_none(low), finite_or_none(high)] for name, (low, high) in fit3.intervals.items()},
            "confidence": fit3.confidence,
        },
        "approach2": None,
        "run_defaults": run_shape_defaults(read_runs_file(Path(args.results))[0]),
    }
    if fit2 is not None:
        record["approach2"] = {
            "a": fit2.params_exponent, "b": fit2.tokens_exponent,
            "params_coefficient": fit2.params_coefficient, "tokens_coefficient": fit2.tokens_coefficient,
            "budgets": fit2.computes.tolist(), "optimal_params": fit2.optimal_params.tolist(),
            "optimal_tokens": fit2.optimal_tokens.tolist(),
        }
    return record


def command_fit(args) -> int:
    from minformer.scaling.fitting import fit_approach3
    from minformer.scaling.plots import plot_frontier, plot_isoflops, plot_loss_surface

    out = Path(args.out) if args.out else Path(args.results).with_suffix("")
    check_output_folder(out)
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap={args.bootstrap} is invalid; give 0 (no intervals) or a number of resamples.")
    runs = read_runs(Path(args.results), "non_embedding_params" if args.non_embedding else "params")
    out.mkdir(parents=True, exist_ok=True)

    fit3 = fit_approach3(runs["params"], runs["tokens"], runs["loss"], bootstrap=args.bootstrap, seed=args.seed)
    print_approach3(fit3, args.bootstrap)
    profiles, fit2 = fit_profiles(runs)

    print("Published exponents (a, b):")
    for source, (a, b) in PUBLISHED_EXPONENTS.items():
        print(f"  {source:<24} a = {a:.3f}, b = {b:.3f}")

    law = fit3.law
    figures = [plot_loss_surface(law, runs, out / "loss_surface.png"), plot_frontier(law, fit2, runs, out / "frontier.png")]
    if fit2 is not None:
        figures.append(plot_isoflops(profiles, fit2, out / "isoflops.png"))
    (out / "fit.json").write_text(json.dumps(fit_record(args, fit3, fit2), indent=1) + "\n", encoding="utf-8")
    print("figures: " + ", ".join(str(path) for path in figures))
    print(f"fit: {out / 'fit.json'}")
    return 0


def command_plan(args) -> int:
    from minformer.scaling.plan import check_minutes, format_plan, make_plan, plan_inputs

    check_minutes(args.minutes)  # before any fit or measurement
    inputs = plan_inputs(args.fit, args.runs, args.throughput, args.context, args.batch_size, args.dtype, args.corpus,
                         args.measure_seconds)
    plan = make_plan(inputs.law, args.minutes, inputs.throughput_for, inputs.vocab_size, inputs.context, inputs.batch_size,
                     inputs.non_embedding)
    print(format_plan(plan, inputs, args.dtype))
    return 0
