"""Dense GPT against a mixture-of-experts GPT with the same active parameters per token.

Both models share the shape, data, seed, optimizer and number of training tokens. The dense model's
feed-forward has inner width d_ff. Every block of the MoE model has ``n_experts`` experts of inner
width d_ff / top_k, and each token runs top_k of them. So a token meets as many feed-forward
weights in both models. The MoE model adds its routers (d_model * n_experts weights per block)
and top_k - 1 extra output biases of d_model per block.
The MoE model has about n_experts / top_k times the feed-forward parameters in total. The table
reports the exact validation loss, total and active parameters, training tokens per second and
the experts' load at the end of training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minformer.data.corpus import load_corpus
from minformer.data.tokenizers import CharTokenizer
from minformer.experiments.common import train_gpt
from minformer.experiments.extrapolation import exact_loss
from minformer.models.gpt import GPT, GPTConfig
from minformer.training.objectives import start_ids

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoESettings:
    """Sizes of one dense-versus-MoE run."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    """Inner width of the dense feed-forward; each expert gets d_ff // top_k."""
    n_experts: int = 8
    top_k: int = 2
    capacity_factor: float | None = None
    context: int = 128
    batch_size: int = 32
    steps: int = 800
    lr: float = 2e-3
    warmup_steps: int = 50
    seed: int = 1337
    dtype: str = "bfloat16"


FULL = MoESettings()
QUICK = MoESettings(
    d_model=32, n_layers=1, n_heads=2, d_ff=64, n_experts=4, context=16, batch_size=8, steps=20, warmup_steps=2,
    dtype="float32",
)


def model_configs(vocab_size: int, settings: MoESettings) -> dict[str, GPTConfig]:
    """Return the dense and the MoE model config, equal except for the feed-forward."""
    if settings.d_ff % settings.top_k != 0:
        raise ValueError(f"d_ff={settings.d_ff} must be divisible by top_k={settings.top_k} to split it among experts.")
    shared = dict(
        vocab_size=vocab_size, max_seq_len=settings.context, d_model=settings.d_model,
        n_layers=settings.n_layers, n_heads=settings.n_heads,
    )
    return {
        "dense": GPTConfig(d_ff=settings.d_ff, **shared),
        "moe": GPTConfig(
            d_ff=settings.d_ff // settings.top_k,
            moe_every=1,
            moe_n_experts=settings.n_experts,
            moe_top_k=settings.top_k,
            moe_capacity_factor=settings.capacity_factor,
            **shared,
        ),
    }


def train_model(config: GPTConfig, train_tokens, settings: MoESettings) -> dict:
    """Train one model; returns the model, its last training loss, seconds and last batch's expert shares."""
    torch.manual_seed(settings.seed)
    model = GPT(config)
    loss_value, seconds, output = train_gpt(
        model, train_tokens, settings.context, settings.batch_size, settings.steps, settings.lr,
        settings.warmup_steps, settings.seed, settings.dtype,
    )
    expert_shares = None
    if output is not None and output.moe_stats:
        expert_shares = {layer: stats.expert_share.tolist() for layer, stats in output.moe_stats.items()}
    return {"model": model, "train_loss": loss_value, "train_seconds": seconds, "expert_shares": expert_shares}


def max_load(expert_shares: dict | None) -> float | None:
    """Return the busiest expert's share times n_experts, averaged over layers: 1.0 is perfectly balanced."""
    if not expert_shares:
        return None
    loads = [max(shares) * len(shares) for shares in expert_shares.values()]
    return sum(loads) / len(loads)


def run_moe_experiment(out_dir: Path, corpus_name: str = "shakespeare", quick: bool = False) -> dict:
    """Train and evaluate the dense and the MoE model; write results.json and table.md into ``out_dir``."""
    settings = QUICK if quick else FULL
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(corpus_name)
    tokenizer = CharTokenizer.from_text(corpus.characters())
    train_tokens = tokenizer.encode_array(corpus.text("train"))
    val_tokens = tokenizer.encode_array(corpus.text("val"))
    tokens_trained = settings.steps * settings.batch_size * settings.context

    rows = []
    for name, config in model_configs(tokenizer.vocab_size, settings).items():
        trained = train_model(config, train_tokens, settings)
        model = trained["model"]
        rows.append({
            "model": name,
            "val_loss": exact_loss(model, val_tokens, settings.context, start_ids(tokenizer)),
            "train_loss": trained["train_loss"],
            "total_parameters": model.num_parameters(),
            "active_parameters": model.num_active_parameters(),
            "tokens_per_second": tokens_trained / trained["train_seconds"],
            "train_seconds": trained["train_seconds"],
            "expert_shares": trained["expert_shares"],
            "max_expert_load": max_load(trained["expert_shares"]),
        })
        logger.info("%s: validation loss %.4f", name, rows[-1]["val_loss"])

    results = {"settings": asdict(settings), "corpus": corpus_name, "tokens_trained": tokens_trained, "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out_dir / "table.md").write_text(format_table(results), encoding="utf-8")
    return results


def format_table(results: dict) -> str:
    """Return a Markdown table with one row per model."""
    settings = results["settings"]
    lines = [
        f"Dense GPT and MoE GPT ({settings['n_experts']} experts, top-{settings['top_k']}, every block) on "
        f"`{results['corpus']}`, each trained on {results['tokens_trained']:,} tokens "
        f"(d_model {settings['d_model']}, {settings['n_layers']} layers, context {settings['context']}, {settings['dtype']}). "
        "Validation loss is exact, in nats per character. Max expert load is the busiest expert's share of the "
        "last training batch times n_experts, averaged over layers (1.00 is perfectly balanced).",
        "",
        "| model | val loss | total params | active params | tokens/s | max expert load |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        load = "n/a" if row["max_expert_load"] is None else f"{row['max_expert_load']:.2f}"
        lines.append(
            f"| {row['model']} | {row['val_loss']:.4f} | {row['total_parameters']:,} | {row['active_parameters']:,} | "
            f"{row['tokens_per_second']:,.0f} | {load} |"
        )
    return "\n".join(lines) + "\n"
