"""Length extrapolation: train one small GPT per position scheme at a short context, evaluate longer.

Every scheme gets the same model shape, data, seed and number of steps at the training context;
each model is then scored on the held-out plays at several evaluation contexts with the exact
validation loss (non-overlapping windows, every held-out token predicted once). Press et al. 2022
(ALiBi, Figure 1) report that sinusoidal positions degrade quickly past the training length,
rotary positions somewhat later, and ALiBi and T5's relative bias hold their loss.
Learned positions have no vectors past their table, so those cells read ``n/a``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minformer.data.corpus import load_corpus
from minformer.data.datasets import evaluation_windows
from minformer.data.tokenizers import CharTokenizer
from minformer.models.gpt import GPT, GPTConfig
from minformer.training.objectives import start_ids
from minformer.experiments.common import train_gpt

logger = logging.getLogger(__name__)

SCHEMES = ("learned", "sinusoidal", "rope", "alibi", "t5", "none")


@dataclass(frozen=True)
class ExtrapolationSettings:
    """Sizes of one extrapolation run."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    train_context: int = 128
    eval_contexts: tuple[int, ...] = (128, 256, 512, 1024)
    batch_size: int = 32
    steps: int = 600
    lr: float = 2e-3
    warmup_steps: int = 50
    seed: int = 1337
    dtype: str = "bfloat16"


FULL = ExtrapolationSettings()
QUICK = ExtrapolationSettings(
    d_model=32, n_layers=1, n_heads=2, train_context=16, eval_contexts=(16, 32, 64), batch_size=8, steps=20, dtype="float32"
)


def model_config(scheme: str, vocab_size: int, settings: ExtrapolationSettings) -> GPTConfig:
    """Return the shared model shape with ``scheme``; learned positions get a table of the training context only."""
    table = settings.train_context if scheme == "learned" else max(settings.eval_contexts)
    return GPTConfig(
        vocab_size=vocab_size,
        max_seq_len=table,
        d_model=settings.d_model,
        n_layers=settings.n_layers,
        n_heads=settings.n_heads,
        position=scheme,
    )


def train_scheme(scheme: str, tokenizer, train_tokens, settings: ExtrapolationSettings) -> tuple[GPT, float, float]:
    """Train one model; returns (model, final training loss, seconds)."""
    torch.manual_seed(settings.seed)
    model = GPT(model_config(scheme, tokenizer.vocab_size, settings))
    loss_value, seconds, _ = train_gpt(
        model, train_tokens, settings.train_context, settings.batch_size, settings.steps, settings.lr,
        settings.warmup_steps, settings.seed, settings.dtype,
    )
    return model, loss_value, seconds


@torch.no_grad()
def exact_loss(model: GPT, tokens, context: int, first_ids: list[int], batch_size: int = 8) -> float:
    """Exact validation loss (nats per token) with non-overlapping windows of ``context`` tokens, in fp32."""
    inputs, targets = evaluation_windows(tokens, context, first_ids)
    total_nats, total_targets = 0.0, 0
    for start in range(0, len(inputs), batch_size):
        logits = model(inputs[start : start + batch_size]).logits
        batch_targets = targets[start : start + batch_size]
        total_nats += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch_targets.reshape(-1), ignore_index=-100, reduction="sum"))
        total_targets += int((batch_targets != -100).sum())
    return total_nats / total_targets


def run_extrapolation(
    out_dir: Path, corpus_name: str = "shakespeare", quick: bool = False, schemes=SCHEMES, on_progress=None
) -> dict:
    """Train and evaluate every scheme; write results.json, table.md and extrapolation.png into ``out_dir``.

    ``on_progress`` receives one line of text after each scheme is trained and evaluated.
    """
    settings = QUICK if quick else FULL
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(corpus_name)
    tokenizer = CharTokenizer.from_text(corpus.characters())
    train_tokens = tokenizer.encode_array(corpus.text("train"))
    val_tokens = tokenizer.encode_array(corpus.text("val"))
    first_ids = start_ids(tokenizer)

    rows = []
    for scheme in schemes:
        model, train_loss, seconds = train_scheme(scheme, tokenizer, train_tokens, settings)
        losses = {}
        for context in settings.eval_contexts:
            if context > model.config.max_seq_len:
                losses[context] = None  # a learned table has no vectors past its training length
            else:
                losses[context] = exact_loss(model, val_tokens, context, first_ids)
        rows.append({"scheme": scheme, "train_loss": train_loss, "train_seconds": seconds, "val_loss": losses})
        summary = ", ".join(f"{context}: {'n/a' if value is None else f'{value:.4f}'}" for context, value in losses.items())
        logger.info("%s: %s", scheme, summary)
        if on_progress is not None:
            on_progress(f"{scheme}: trained in {seconds:.0f} s; validation loss by context {summary}")

    results = {"settings": asdict(settings), "corpus": corpus_name, "val_tokens": len(val_tokens), "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out_dir / "table.md").write_text(format_table(results), encoding="utf-8")
    plot_extrapolation(results, out_dir / "extrapolation.png")
    return results


def format_table(results: dict) -> str:
    """Markdown table: one row per scheme, one column per evaluation context."""
    settings = results["settings"]
    contexts = settings["eval_contexts"]
    header = "| position | " + " | ".join(f"val loss @ {context}" for context in contexts) + " | train s |"
    lines = [
        f"Validation loss (nats per character) on the held-out text of the corpus `{results['corpus']}`, "
        f"models trained at context {settings['train_context']} for {settings['steps']} steps "
        f"(d_model {settings['d_model']}, {settings['n_layers']} layers, {settings['n_heads']} heads).",
        "",
        header,
        "| --- | " + " | ".join("---:" for _ in contexts) + " | ---: |",
    ]
    for row in results["rows"]:
        cells = []
        for context in contexts:
            value = row["val_loss"].get(str(context), row["val_loss"].get(context))
            cells.append("n/a (no position past the table)" if value is None else f"{value:.4f}")
        lines.append(f"| {row['scheme']} | " + " | ".join(cells) + f" | {row['train_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_extrapolation(results: dict, path: Path) -> None:
    """Validation loss against evaluation context, one line per scheme."""
    from minformer.plots import plt

    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    contexts = results["settings"]["eval_contexts"]
    for row in results["rows"]:
        points = [(context, row["val_loss"].get(context, row["val_loss"].get(str(context)))) for context in contexts]
        points = [(context, value) for context, value in points if value is not None]
        axes.plot([context for context, _ in points], [value for _, value in points], "o-", label=row["scheme"])
    axes.axvline(results["settings"]["train_context"], color="grey", linestyle=":", label="training context")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("evaluation context (tokens)")
    axes.set_ylabel("validation loss (nats per character)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
