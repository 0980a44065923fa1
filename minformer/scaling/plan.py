"""Turn a loss law into a training plan: model size, tokens and steps for a number of minutes on this machine.

The budget is C = (training FLOP/s) x 60 x minutes, with FLOPs counted by
``minformer.scaling.accounting.flops_per_token`` (Kaplan et al. 2020: 6N plus the attention term).
The law's compute-optimal split of C (Hoffmann et al. 2022, eq. 4, under C = 6 N D) gives N_opt and
D_opt. The plan then picks the GPT shape whose parameter count is nearest N_opt and trains it on
C / (its FLOPs per token) tokens, a whole number of steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minformer.experiments.common import train_gpt
from minformer.models.gpt import GPT
from minformer.scaling.accounting import config_parameters, flops_per_token
from minformer.scaling.chinchilla import LAWS, Allocation, LossLaw
from minformer.scaling.sweep import CONVENTION, FULL, Shape

# Shapes the plan chooses from keep d_model / n_layers between these bounds (the sweep's shapes
# have 16 to 40), so that a size is never reached by an extreme width or depth alone.
MIN_WIDTH_PER_LAYER = 16
MAX_WIDTH_PER_LAYER = 64
HEAD_WIDTH = 32
"""d_head of the plan's shapes above d_model 64 that it divides; other shapes use 16, or 8 where 16 does not divide."""


@dataclass(frozen=True)
class Throughput:
    """Training FLOP/s and where the figure comes from."""

    flops_per_second: float
    source: str


@dataclass(frozen=True)
class Plan:
    """A compute budget, the law's optimum under it, and the shape and steps that realise it."""

    minutes: float
    throughput: Throughput
    compute: float
    """Training FLOPs C = FLOP/s x 60 x minutes."""
    optimum: Allocation
    """The law's N_opt and D_opt under C = 6 N D."""
    shape: Shape
    params: int
    """The shape's parameter count, as the law counts N."""
    flops_per_token: float
    """The shape's training FLOPs per token (Kaplan accounting)."""
    batch_size: int
    context: int
    steps: int
    predicted_loss: float
    """The law's loss for the shape's parameters and tokens."""

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.context


def check_minutes(minutes) -> float:
    """Return ``minutes`` as a float, raising a ``ValueError`` naming --minutes unless it is positive and finite."""
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not math.isfinite(minutes) or minutes <= 0:
        raise ValueError(f"--minutes={minutes!r} is invalid; give a positive, finite number of minutes, e.g. --minutes 10.")
    return float(minutes)


def heads_for(d_model: int) -> int:
    widths = (HEAD_WIDTH, 16, 8) if d_model > 64 else (16, 8)
    return d_model // next(width for width in widths if d_model % width == 0)


def approximate_params(d_model: int, n_layers: int, vocab_size: int, context: int, non_embedding: bool = False) -> float:
    """Approximate a GPT's parameter count: 12 d^2 per block, plus the token and position tables unless ``non_embedding``."""
    tables = 0 if non_embedding else (vocab_size + context) * d_model
    return 12.0 * n_layers * d_model**2 + tables


def candidate_shapes(vocab_size: int, context: int, max_d_model: int = 4096) -> list[Shape]:
    """Return every shape with d_model a multiple of 8 (of 16 from 128) and MIN..MAX_WIDTH_PER_LAYER of width per layer."""
    shapes = []
    widths = [*range(32, 128, 8), *range(128, max_d_model + 1, 16)]
    for d_model in widths:
        for n_layers in range(1, d_model // MIN_WIDTH_PER_LAYER + 1):
            if d_model / n_layers <= MAX_WIDTH_PER_LAYER:
                shapes.append(Shape(d_model, n_layers, heads_for(d_model)))
    return shapes


def closest_shape(params: float, vocab_size: int, context: int, non_embedding: bool = False) -> tuple[Shape, int]:
    """Return the candidate shape whose actual parameter count is nearest ``params`` in log scale, and that count.

    The 12 d^2 approximation picks the 24 nearest candidates, and their counts from
    ``config_parameters`` (non-embedding counts with ``non_embedding``) decide. Ties within 1% go to
    the shape nearest 32 of width per layer.
    """
    candidates = candidate_shapes(vocab_size, context)
    candidates.sort(key=lambda shape: abs(math.log(
        approximate_params(shape.d_model, shape.n_layers, vocab_size, context, non_embedding) / params)))
    scored = []
    for shape in candidates[:24]:
        count = config_parameters(shape.config(vocab_size, context), non_embedding=non_embedding)
        aspect = abs(math.log(shape.d_model / shape.n_layers / 32))
        scored.append((round(abs(math.log(count / params)), 2), aspect, count, shape))
    _, _, count, shape = min(scored, key=lambda item: item[:3])
    return shape, count


def measure_throughput(shape: Shape, vocab_size: int, context: int, batch_size: int, dtype: str, seconds: float = 3.0) -> Throughput:
    """Time training steps of ``shape`` on random tokens for about ``seconds``; return model FLOP/s.

    Two warm-up steps are timed to size the measured run and are not counted. Throughput does not
    depend on the token values, so random ids stand in for a corpus.
    """
    config = shape.config(vocab_size, context)
    tokens = np.random.default_rng(0).integers(0, vocab_size, size=max(100_000, 4 * batch_size * (context + 1)))
    torch.manual_seed(0)
    model = GPT(config)
    _, warmup_seconds, _ = train_gpt(model, tokens, context, batch_size, 2, 1e-3, 1, 0, dtype)
    steps = int(min(500, max(3, seconds / max(warmup_seconds / 2, 1e-6))))
    _, elapsed, _ = train_gpt(model, tokens, context, batch_size, steps, 1e-3, 1, 0, dtype)
    rate = flops_per_token(config, context, CONVENTION) * steps * batch_size * context / elapsed
    source = f"measured: {steps} steps of {shape.label}, batch {batch_size} x {context}, {dtype}, {torch.get_num_threads()} thread(s)"
    return Throughput(rate, source)


def throughput_from_runs(rows: list[dict], params: float) -> Throughput:
    """Return the FLOP/s (flops / seconds) of the run whose parameter count is nearest ``params``."""
    timed = [row for row in rows if row.get("seconds", 0) > 0 and row.get("flops", 0) > 0]
    if not timed:
        raise ValueError("The runs file has no run with flops and seconds; measure instead (leave out --runs).")
    nearest = min(timed, key=lambda row: abs(math.log(float(row["params"]) / params)))
    rate = float(nearest["flops"]) / float(nearest["seconds"])
    return Throughput(rate, f"from the sweep's run of {float(nearest['params']):,.0f} parameters ({nearest.get('point', 'unnamed')})")


def make_plan(law: LossLaw, minutes: float, throughput_for, vocab_size: int, context: int, batch_size: int,
              non_embedding: bool = False) -> Plan:
    """Size the run for ``minutes`` of training under ``law``, whose N counts non-embedding parameters if ``non_embedding``.

    ``throughput_for(shape)`` returns the ``Throughput`` of a shape (None: a representative shape).
    FLOP/s depend on the size, and the size on the budget, so the plan is refined until the chosen
    shape's own throughput gives back the same shape (at most 3 rounds).
    """
    minutes = check_minutes(minutes)
    throughput, throughput_shape = throughput_for(None), None
    for _ in range(3):
        optimum = law.optimal(throughput.flops_per_second * 60.0 * minutes)
        shape, _ = closest_shape(optimum.params, vocab_size, context, non_embedding)
        if shape == throughput_shape:
            break
        throughput, throughput_shape = throughput_for(shape), shape

    compute = throughput.flops_per_second * 60.0 * minutes
    optimum = law.optimal(compute)
    shape, params = closest_shape(optimum.params, vocab_size, context, non_embedding)
    per_token = flops_per_token(shape.config(vocab_size, context), context, CONVENTION)
    steps = max(1, round(compute / per_token / (batch_size * context)))
    return Plan(
        minutes=minutes, throughput=throughput, compute=compute, optimum=optimum, shape=shape, params=params,
        flops_per_token=per_token, batch_size=batch_size, context=context, steps=steps,
        predicted_loss=law.loss(params, steps * batch_size * context),
    )


# ---- inputs and report -------------------------------------------------------------------------

FALLBACK_LAW = "besiroglu2024"
REPRESENTATIVE_SHAPE = Shape(128, 4, heads_for(128))
"""Shape timed first when the plan measures throughput, before the budget's own size is known."""


@dataclass(frozen=True)
class PlanInputs:
    """Inputs of ``make_plan``: the loss law, the throughput source and the run's vocabulary, context and batch."""

    law: LossLaw
    law_source: str
    throughput_for: Callable[[Shape | None], Throughput]
    vocab_size: int
    context: int
    batch_size: int
    non_embedding: bool = False
    """Whether the law's N counts non-embedding parameters only."""
    lr: float = 2e-3
    """Peak learning rate of the runs behind the law; the suggested command decays it to a tenth, as the sweep does."""
    corpus: str = "shakespeare"


def load_fit_law(path: Path) -> tuple[LossLaw, dict]:
    """Read the Approach-3 law of a fit.json written by ``minformer scaling fit``; return it and the whole record."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--fit file not found: {path}; run `minformer scaling fit RUNS` first, which writes fit.json.")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--fit file {path} is not valid JSON ({error}); give a fit.json written by `minformer scaling fit`.") from None
    constants = record.get("approach3") if isinstance(record, dict) else None
    if not isinstance(constants, dict):
        raise ValueError(f"{path} has no 'approach3' section; give a fit.json written by `minformer scaling fit`.")
    missing = [name for name in ("E", "A", "B", "alpha", "beta") if name not in constants]
    if missing:
        raise ValueError(f"{path} has no Approach-3 {', '.join(missing)}; give a fit.json written by `minformer scaling fit`.")
    for name in ("E", "A", "B", "alpha", "beta"):
        value = constants[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: approach3.{name} is {value!r}, not a number; give a fit.json written by `minformer scaling fit`.")
    law = LossLaw(**{name: float(constants[name]) for name in ("E", "A", "B", "alpha", "beta")}, name="fit",
                  source=f"Approach 3 fitted to {record.get('runs', 'unnamed runs')} ({record.get('n_runs', '?')} runs), from {path}")
    return law, record


def run_shape_defaults(rows: list[dict]) -> dict:
    """Return vocab_size, context, batch_size, lr and corpus shared by the sweep's runs (absent where they differ or are missing)."""
    values = {
        "vocab_size": {row.get("shape", {}).get("vocab_size") for row in rows},
        "context": {row.get("shape", {}).get("context") for row in rows},
        "batch_size": {row.get("recipe", {}).get("batch_size") for row in rows},
        "lr": {row.get("recipe", {}).get("lr") for row in rows},
        "corpus": {row.get("recipe", {}).get("corpus") for row in rows},
    }
    return {name: found.pop() for name, found in values.items() if len(found) == 1 and None not in found}


def check_positive_int(option: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option}={value!r} is invalid; give a positive whole number.")
    return value


def plan_inputs(fit_path=None, runs_path=None, throughput=None, context=None, batch_size=None, dtype="float32",
                corpus="shakespeare", measure_seconds=3.0) -> PlanInputs:
    """Choose the law (``fit_path``, else a fit of ``runs_path``, else a published law) and the throughput source.

    Throughput is ``throughput`` FLOP/s when given, else the runs' flops / seconds, else a timed
    training of ``measure_seconds`` per shape on this machine.
    """
    from minformer.scaling.fitting import fit_approach3
    from minformer.scaling.sweep import read_runs_file

    if throughput is not None and not (math.isfinite(throughput) and throughput > 0):
        raise ValueError(f"--throughput={throughput!r} is invalid; give a positive number of FLOP/s.")
    if not (math.isfinite(measure_seconds) and measure_seconds > 0):
        raise ValueError(f"--measure-seconds={measure_seconds!r} is invalid; give a positive number of seconds.")

    rows, record = [], {}
    if runs_path is not None:
        if not Path(runs_path).is_file():
            raise ValueError(f"--runs file not found: {runs_path}; run `minformer scaling sweep --out DIR` first.")
        rows, _ = read_runs_file(Path(runs_path))
        if not rows:
            raise ValueError(f"--runs file {runs_path} contains no runs; let `minformer scaling sweep` finish some first.")
    if fit_path is not None:
        law, record = load_fit_law(Path(fit_path))
        source = law.source
    elif rows:
        fit = fit_approach3([row["params"] for row in rows], [row["tokens"] for row in rows], [row["loss"] for row in rows])
        law, source = fit.law, f"Approach 3 fitted to {runs_path} ({fit.n_points} runs)"
    else:
        law = LAWS[FALLBACK_LAW]
        source = (f"no --fit or --runs given, so the published law: {law.source}. It was fitted to token-level "
                  "language models of 10^7 to 10^10 parameters, so for a small character-level model it is a rough guide only")

    defaults = {**record.get("run_defaults", {}), **run_shape_defaults(rows)}
    if "vocab_size" not in defaults:
        from minformer.data.corpus import load_corpus
        from minformer.data.tokenizers import CharTokenizer

        defaults["vocab_size"] = CharTokenizer.from_text(load_corpus(corpus).characters()).vocab_size
    context = check_positive_int("--context", context if context is not None else defaults.get("context", FULL.context))
    batch_size = check_positive_int("--batch-size", batch_size if batch_size is not None else defaults.get("batch_size", FULL.batch_size))
    vocab_size = defaults["vocab_size"]

    if throughput is not None:
        def throughput_for(shape):
            return Throughput(throughput, "given with --throughput")
    elif any(row.get("seconds") for row in rows):
        median_params = float(np.median([float(row["params"]) for row in rows]))

        def throughput_for(shape):
            params = median_params if shape is None else config_parameters(shape.config(vocab_size, context))
            return throughput_from_runs(rows, params)
    else:
        measured = {}

        def throughput_for(shape):
            shape = shape or REPRESENTATIVE_SHAPE
            if shape not in measured:
                measured[shape] = measure_throughput(shape, vocab_size, context, batch_size, dtype, measure_seconds)
            return measured[shape]

    non_embedding = record.get("params_key") == "non_embedding_params"
    return PlanInputs(law, source, throughput_for, vocab_size, context, batch_size, non_embedding,
                      lr=float(defaults.get("lr", 2e-3)), corpus=defaults.get("corpus", corpus))


def format_plan(plan: Plan, inputs: PlanInputs, dtype: str = "float32") -> str:
    """Return the plan as lines of text: the law, the budget, the optimum, the shape, the steps and a train command.

    The command trains the demo's preset with the plan's shape and the sweep's schedule (5% warm-up,
    cosine decay to a tenth of the peak learning rate).
    """
    optimum, shape = plan.optimum, plan.shape
    counted = "non-embedding parameters" if inputs.non_embedding else "parameters"
    offset = 100.0 * (plan.params / optimum.params - 1.0)
    warmup = max(1, round(0.05 * plan.steps))
    command = (
        f"minformer train gpt-shakespeare-cpu --model.d_model={shape.d_model} --model.n_layers={shape.n_layers} "
        f"--model.n_heads={shape.n_heads} --model.max_seq_len={plan.context} --train.batch_size={plan.batch_size} "
        f"--train.max_steps={plan.steps} --train.warmup_steps={warmup} --train.lr={inputs.lr:g} "
        f"--train.min_lr={inputs.lr / 10:g} --train.dtype={dtype}"
    )
    if inputs.corpus != "shakespeare":
        command += f" --data.corpus={inputs.corpus}"
    notes = []
    if not 0.5 <= plan.params / optimum.params <= 2.0:
        side = "smallest" if plan.params > optimum.params else "largest"
        notes.append(
            f"note:        the shape has {plan.params / optimum.params:.3g}x N_opt because it is the {side} one the plan "
            "builds, so the budget lies outside what the plan can size well and the predicted loss is off the optimum"
        )
    return "\n".join([
        f"law:         {inputs.law_source}",
        f"throughput:  {plan.throughput.flops_per_second:.3g} FLOP/s ({plan.throughput.source})",
        f"budget:      C = {plan.throughput.flops_per_second:.3g} FLOP/s x 60 s x {plan.minutes:g} min = {plan.compute:.3g} FLOPs",
        f"optimum:     N_opt = {optimum.params:,.0f} {counted}, D_opt = {optimum.tokens:,.0f} tokens "
        f"({optimum.tokens_per_param:.1f} tokens per parameter, under C = 6 N D), predicted loss {optimum.loss:.3f}",
        f"shape:       d_model {shape.d_model}, n_layers {shape.n_layers}, n_heads {shape.n_heads}: "
        f"{plan.params:,} {counted} ({offset:+.0f}% from N_opt)",
        f"training:    {plan.steps:,} steps x batch {plan.batch_size} x context {plan.context} = {plan.tokens:,} tokens "
        f"(C / {plan.flops_per_token:.3g} FLOPs per token of this shape), predicted loss {plan.predicted_loss:.3f}",
        f"command:     {command}",
        *notes,
    ])
