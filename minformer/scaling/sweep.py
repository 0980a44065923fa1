"""IsoFLOP sweep: small character-level GPTs trained at several compute budgets, for Chinchilla's fits.

Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", Approach 2: for each
training budget C (an IsoFLOP profile), train several model sizes N, each on D = C / (FLOPs per
token) tokens with a cosine schedule as long as the run, and record the final held-out loss.
The profile's minimum is that budget's compute-optimal size. The same runs feed Approach 3,
the fit of L(N, D) = E + A / N^alpha + B / D^beta.

FLOPs per token are ``minformer.scaling.accounting.flops_per_token`` (Kaplan et al. 2020, 6N plus
the attention term). Every run is evaluated on the same evenly spaced subset of the validation
windows. Each finished run appends one JSON line to ``runs.jsonl``, flushed and fsynced, so an
interrupted sweep resumes by skipping the grid points already in the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minformer.data.corpus import load_corpus
from minformer.data.datasets import evaluation_windows
from minformer.data.tokenizers import CharTokenizer
from minformer.experiments.common import train_gpt
from minformer.models.gpt import GPT, GPTConfig
from minformer.scaling.accounting import config_parameters, flops_per_token
from minformer.training.objectives import start_ids

logger = logging.getLogger(__name__)

RUNS_FILE = "runs.jsonl"
CONVENTION = "kaplan"


@dataclass(frozen=True)
class Shape:
    """The size of one GPT of the sweep; the other config fields keep ``GPTConfig``'s defaults."""

    d_model: int
    n_layers: int
    n_heads: int

    @property
    def label(self) -> str:
        return f"d{self.d_model}-L{self.n_layers}-h{self.n_heads}"

    def config(self, vocab_size: int, context: int) -> GPTConfig:
        return GPTConfig(
            vocab_size=vocab_size, max_seq_len=context, d_model=self.d_model, n_layers=self.n_layers,
            n_heads=self.n_heads, dropout=0.0,
        )


def ladder(*sizes: tuple[int, int], head_width: int = 16) -> tuple[Shape, ...]:
    """Turn (d_model, n_layers) pairs into shapes with heads of ``head_width``, else of 8, else one head."""
    shapes = []
    for d_model, n_layers in sizes:
        width = next((width for width in (head_width, 8) if d_model % width == 0 and d_model >= width), d_model)
        shapes.append(Shape(d_model, n_layers, d_model // width))
    return tuple(shapes)


# Model sizes about a factor sqrt(2) apart in parameters (at vocabulary 84, context 128: 2.7k to 3.7M).
LADDER = ladder(
    (8, 1), (12, 1), (16, 1), (24, 1), (32, 1), (32, 2), (40, 2), (48, 2), (56, 2), (64, 2), (64, 3), (80, 3),
    (96, 3), (96, 4), (112, 4), (128, 4), (144, 5), (160, 5), (192, 5), (192, 6), (224, 6),
)


@dataclass(frozen=True)
class SweepSettings:
    """The grid and the training recipe shared by every run of a sweep."""

    budgets: tuple[float, ...]
    """Training budgets C in FLOPs, one IsoFLOP profile each."""
    shapes: tuple[Shape, ...] = LADDER
    """The model sizes a profile picks from."""
    sizes_per_budget: int = 5
    """Model sizes trained per budget."""
    size_ratio: float = 2.0
    """Target ratio of parameters between neighbouring sizes of a profile."""
    tokens_per_param: float = 20.0
    """Guess of the compute-optimal D / N that centres each profile: N_centre = sqrt(C / (6 x this))."""
    context: int = 128
    batch_size: int = 32
    lr: float = 2e-3
    """Peak learning rate; cosine decay to lr / 10 over each run."""
    warmup_fraction: float = 0.05
    dtype: str = "float32"
    """float32, or bfloat16 for CPU autocast."""
    seed: int = 1337
    eval_windows: int = 128
    """Validation windows of ``context`` tokens, evenly spaced over the split, shared by every run."""
    corpus: str = "shakespeare"

    def __post_init__(self):
        if not self.budgets:
            raise ValueError("budgets is empty; give at least one training budget in FLOPs.")
        for budget in self.budgets:
            if not math.isfinite(budget) or budget <= 0:
                raise ValueError(f"budget={budget!r} is invalid; each budget must be a positive number of FLOPs.")
        if self.sizes_per_budget < 3:
            raise ValueError(f"sizes_per_budget={self.sizes_per_budget} is invalid; a parabola needs at least 3 sizes.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} is invalid; allowed values: float32, bfloat16.")

    def recipe(self) -> dict:
        """Return the settings that make runs comparable; a resumed sweep must match them."""
        fields = ("context", "batch_size", "lr", "warmup_fraction", "dtype", "seed", "eval_windows", "corpus")
        return {name: getattr(self, name) for name in fields}


# The default grid: 4 budgets spanning one decade, 5 sizes each, 20 runs. In pilot runs on Shakespeare
# the best size was 12k parameters at 3e11 FLOPs and at most 20k at 1e12 FLOPs. That is some 400
# tokens per parameter, far from Chinchilla's 20, because at these budgets a model is limited by its
# optimizer steps. A batch of 8 sequences gave a lower loss than 32 at the same FLOPs (1.91 against 2.10 for
# 20k parameters at 1e12 FLOPs).
FULL = SweepSettings(budgets=(1.7e11, 3.7e11, 8e11, 1.7e12), tokens_per_param=400.0, batch_size=8)
QUICK = SweepSettings(
    budgets=(1e8, 3e8),
    shapes=ladder((8, 1), (16, 1), (24, 1), (32, 1), (48, 1), head_width=8),
    sizes_per_budget=3,
    tokens_per_param=1.0,
    context=16,
    batch_size=8,
    eval_windows=16,
)

# Training throughput in FLOP/s (Kaplan accounting, float32, batch 8 x context 128, one thread), measured
# on a 2-core Intel Xeon with AMX. Each figure is `train_gpt` over 200 steps (40 from d96), after a few
# warm-up steps, divided by the process's CPU time. CPU time stood in for wall time because other
# jobs shared the machine. These are estimates for one idle core: the tiny shapes spend about 3 ms
# per step on overhead, and two idle cores train the larger shapes faster.
MEASURED_FLOPS_PER_SECOND = {
    "d8-L1-h1": 3.92e9, "d12-L1-h1": 5.98e9, "d16-L1-h1": 9.18e9, "d24-L1-h3": 1.21e10, "d32-L1-h2": 1.86e10,
    "d32-L2-h2": 2.54e10, "d40-L2-h5": 2.63e10, "d48-L2-h3": 3.77e10, "d56-L2-h7": 3.30e10, "d64-L2-h4": 4.76e10,
    "d64-L3-h4": 4.89e10, "d80-L3-h5": 5.59e10, "d96-L3-h6": 6.21e10, "d96-L4-h6": 6.33e10, "d112-L4-h7": 6.17e10,
    "d128-L4-h8": 7.27e10, "d144-L5-h9": 7.66e10, "d160-L5-h10": 8.04e10, "d192-L5-h12": 8.82e10,
    "d192-L6-h12": 8.55e10, "d224-L6-h14": 9.26e10,
}
# Minutes that estimate_minutes(FULL) gives; the `--help` text quotes it, and a test keeps them equal.
FULL_ESTIMATE_MINUTES = 18


@dataclass(frozen=True)
class GridPoint:
    """One run of the sweep: a model shape trained for a whole number of steps near ``budget`` FLOPs."""

    budget: float
    shape: Shape
    params: int
    non_embedding_params: int
    flops_per_token: float
    steps: int
    tokens: int

    @property
    def key(self) -> str:
        return f"C={self.budget:.6g}/{self.shape.label}"

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens


@lru_cache(maxsize=None)
def shape_counts(shape: Shape, vocab_size: int, context: int) -> tuple[int, int, float]:
    """Return (parameters, non-embedding parameters, training FLOPs per token) of ``shape``."""
    config = shape.config(vocab_size, context)
    return config_parameters(config), config_parameters(config, non_embedding=True), flops_per_token(config, context, CONVENTION)


def profile_shapes(budget: float, settings: SweepSettings, vocab_size: int) -> list[Shape]:
    """Pick distinct shapes, in increasing size, nearest to the targets N_centre x size_ratio^k, k centred on 0.

    N_centre = sqrt(C / (6 tokens_per_param)) is where C = 6 N D puts D / N at ``tokens_per_param``.
    The shapes minimise the summed squared distance in log N to the targets (a small dynamic programme
    over the ordered ladder), so that neighbouring targets never share a shape.
    """
    centre = math.sqrt(budget / (6.0 * settings.tokens_per_param))
    counts = sorted((shape_counts(shape, vocab_size, settings.context)[0], shape) for shape in settings.shapes)
    if not counts[0][0] <= centre <= counts[-1][0] or len(counts) < settings.sizes_per_budget:
        raise ValueError(
            f"budget={budget:.3g} FLOPs centres its profile on {centre:,.0f} parameters, outside the sweep's shapes "
            f"({counts[0][0]:,} to {counts[-1][0]:,}) or beyond their number; choose a budget nearer the defaults."
        )

    middle = (settings.sizes_per_budget - 1) / 2
    log_targets = [math.log(centre) + (index - middle) * math.log(settings.size_ratio) for index in range(settings.sizes_per_budget)]
    log_counts = [math.log(count) for count, _ in counts]
    # best[j][i]: the least cost of matching targets 0..j to increasing shapes, target j taking shape i.
    best = [[(log_counts[i] - log_targets[0]) ** 2 for i in range(len(counts))]]
    previous = []
    for target in log_targets[1:]:
        row, links = [], []
        for i in range(len(counts)):
            earlier = min(range(i), key=lambda k: best[-1][k], default=None)
            row.append(math.inf if earlier is None else best[-1][earlier] + (log_counts[i] - target) ** 2)
            links.append(earlier)
        best.append(row)
        previous.append(links)

    index = min(range(len(counts)), key=lambda i: best[-1][i])
    chosen = [index]
    for links in reversed(previous):
        index = links[index]
        chosen.append(index)
    return [counts[i][1] for i in reversed(chosen)]


def plan_grid(settings: SweepSettings, vocab_size: int) -> list[GridPoint]:
    """Return every run of the sweep, budgets in increasing order, each profile's sizes in increasing order."""
    tokens_per_step = settings.batch_size * settings.context
    points = []
    for budget in sorted(set(settings.budgets)):
        for shape in profile_shapes(budget, settings, vocab_size):
            params, non_embedding, per_token = shape_counts(shape, vocab_size, settings.context)
            steps = round(budget / per_token / tokens_per_step)
            if steps < 10:
                raise ValueError(
                    f"budget={budget:.3g} FLOPs gives {shape.label} only {steps} steps of {tokens_per_step} tokens; "
                    "raise the budget or lower the batch size."
                )
            points.append(GridPoint(budget, shape, params, non_embedding, per_token, steps, steps * tokens_per_step))
    return points


def estimate_seconds(points: list[GridPoint]) -> float | None:
    """Estimate the sweep's training time from ``MEASURED_FLOPS_PER_SECOND``; None if a shape was never measured."""
    if any(point.shape.label not in MEASURED_FLOPS_PER_SECOND for point in points):
        return None
    return sum(point.flops / MEASURED_FLOPS_PER_SECOND[point.shape.label] for point in points)


def estimate_minutes(settings: SweepSettings, vocab_size: int = 84) -> float | None:
    """Estimate the minutes of a sweep; the Shakespeare character vocabulary has 84 symbols."""
    seconds = estimate_seconds(plan_grid(settings, vocab_size))
    return None if seconds is None else seconds / 60.0


# ---- the runs file -----------------------------------------------------------------------------


def parse_json_lines(path: Path) -> tuple[list[tuple[int, dict]], bool]:
    """Parse a JSON-lines file into (line number, row) pairs; also return whether an incomplete last line was dropped.

    A last line without its newline that is not valid JSON is a write cut short by an interrupted
    sweep, and is dropped. Invalid JSON anywhere else raises a ``ValueError`` naming the line.
    """
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    rows, torn = [], False
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if line_number == len(lines) and not text.endswith("\n"):
                torn = True
                continue
            raise ValueError(f"{path}:{line_number} is not valid JSON ({error.msg}); fix or delete that line.") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{line_number} is not a JSON object; each line must be one run.")
        rows.append((line_number, row))
    return rows, torn


def read_runs_file(path: Path) -> tuple[list[dict], bool]:
    """Read a sweep's runs file, if it exists; return (rows, whether an incomplete last line was dropped)."""
    if not Path(path).exists():
        return [], False
    numbered, torn = parse_json_lines(path)
    return [row for _, row in numbered], torn


def drop_incomplete_last_line(path: Path) -> None:
    """Truncate ``path`` after its last newline, removing a line whose write was cut short."""
    data = Path(path).read_bytes()
    os.truncate(path, data.rfind(b"\n") + 1)


def append_run(path: Path, row: dict) -> None:
    """Append ``row`` as one JSON line, then flush and fsync, so that a finished run survives a crash."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def check_recipe(rows: list[dict], settings: SweepSettings, path: Path) -> None:
    """Raise a ``ValueError`` if rows in the file were trained with another recipe than ``settings``."""
    recipe = settings.recipe()
    for row in rows:
        if row.get("recipe") != recipe:
            raise ValueError(
                f"{path} contains runs of another sweep recipe ({row.get('recipe')}) than this one ({recipe}); "
                "their losses are not comparable. Choose another --out folder."
            )


# ---- training and evaluation -------------------------------------------------------------------


def validation_subset(val_tokens, context: int, first_ids: list[int], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``count`` evenly spaced full validation windows (inputs, targets), each (count, context).

    The padded last window is left out, so every chosen window scores ``context`` tokens.
    """
    inputs, targets = evaluation_windows(val_tokens, context, first_ids)
    full_windows = max(1, len(inputs) - 1)
    indices = torch.from_numpy(np.unique(np.linspace(0, full_windows - 1, min(count, full_windows)).round().astype(np.int64)))
    return inputs[indices], targets[indices]


@torch.no_grad()
def held_out_loss(model: GPT, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 32) -> float:
    """Return the mean cross-entropy (nats per token) over the windows, in float32."""
    model.eval()
    total_nats, total_targets = 0.0, 0
    for start in range(0, len(inputs), batch_size):
        logits = model(inputs[start : start + batch_size]).logits.float()
        batch_targets = targets[start : start + batch_size]
        total_nats += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch_targets.reshape(-1), ignore_index=-100, reduction="sum"))
        total_targets += int((batch_targets != -100).sum())
    return total_nats / total_targets


def train_point(point: GridPoint, settings: SweepSettings, vocab_size: int, train_tokens, validation) -> dict:
    """Train and evaluate one grid point; return its row for the runs file."""
    torch.manual_seed(settings.seed)
    model = GPT(point.shape.config(vocab_size, settings.context))
    warmup_steps = max(1, round(settings.warmup_fraction * point.steps))
    cpu_start = time.process_time()
    train_loss, seconds, _ = train_gpt(
        model, train_tokens, settings.context, settings.batch_size, point.steps, settings.lr, warmup_steps,
        settings.seed, settings.dtype,
    )
    cpu_seconds = time.process_time() - cpu_start
    return {
        "point": point.key,
        "budget": point.budget,
        "params": point.params,
        "non_embedding_params": point.non_embedding_params,
        "tokens": point.tokens,
        "flops": point.flops,
        "flops_per_token": point.flops_per_token,
        "convention": CONVENTION,
        "loss": held_out_loss(model, *validation),
        "train_loss": train_loss,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "steps": point.steps,
        "shape": {**asdict(point.shape), "context": settings.context, "vocab_size": vocab_size},
        "recipe": settings.recipe(),
        "threads": torch.get_num_threads(),
    }


def run_sweep(out_dir: Path, settings: SweepSettings, on_progress=None) -> list[dict]:
    """Train every grid point not yet in ``out_dir/runs.jsonl`` and append its row; return all rows.

    ``on_progress`` receives one line of text before the first run and after each run.
    """
    report = on_progress or (lambda line: logger.info("%s", line))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RUNS_FILE

    rows, torn = read_runs_file(path)
    if torn:
        drop_incomplete_last_line(path)
        report(f"dropped an incomplete last line of {path} (a write cut short); that run trains again")
    check_recipe(rows, settings, path)

    corpus = load_corpus(settings.corpus)
    tokenizer = CharTokenizer.from_text(corpus.characters())
    train_tokens = tokenizer.encode_array(corpus.text("train"))
    validation = validation_subset(tokenizer.encode_array(corpus.text("val")), settings.context, start_ids(tokenizer), settings.eval_windows)

    points = plan_grid(settings, tokenizer.vocab_size)
    done = {row.get("point") for row in rows}
    pending = [point for point in points if point.key not in done]
    estimate = estimate_seconds(pending)
    summary = f"{len(points)} runs in the grid, {len(points) - len(pending)} already in {path}, {len(pending)} to train"
    report(summary + (f", estimated {estimate / 60:.0f} minutes" if estimate is not None else ""))

    for index, point in enumerate(pending, start=1):
        row = train_point(point, settings, tokenizer.vocab_size, train_tokens, validation)
        append_run(path, row)
        rows.append(row)
        report(
            f"[{index}/{len(pending)}] C={point.budget:.3g} {point.shape.label}: N={point.params:,}, "
            f"D={point.tokens:,} tokens ({point.steps} steps), loss {row['loss']:.4f}, {row['seconds']:.1f} s"
        )
    return rows
