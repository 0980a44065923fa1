"""How speed grows with model width and with context length, as tables and PNG plots.

- Training tokens/s against width, minformer and transformers on the same weights: the GPT
  training workload's shape (6 layers, context 256, batch 8) with one head per 64 features.
- Decoding time per token against context length, with and without the KV cache, for a GPT of
  the training shape with a 1024-token context. The cached step feeds one token against a cache
  already filled to the context length. The uncached step runs the whole context again.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from compare_measure import median_seconds
from minformer.cache import KVCache
from minformer.models.gpt import GPT, GPTConfig
from compare_workloads import LOSS_TOLERANCE, Settings, gpt_pair_for_config, relative_difference, step_zero_losses, time_training

WIDTHS = (128, 256, 384, 512, 768)
CONTEXTS = (64, 128, 256, 512, 1024)


def width_growth(settings: Settings) -> list[dict]:
    """Return one record per width: minformer and transformers training tokens/s, or the failed check."""
    widths = (16, 32) if settings.quick else WIDTHS
    records = []
    for width in widths:
        if settings.quick:
            config = GPTConfig(vocab_size=65, max_seq_len=16, d_model=width, n_layers=1, n_heads=2, dropout=0.0)
            batch_size = 2
        else:
            config = GPTConfig(vocab_size=65, max_seq_len=256, d_model=width, n_layers=6, n_heads=width // 64, dropout=0.0)
            batch_size = 8
        pair = gpt_pair_for_config(config, batch_size, settings, "GPT training")
        ours_loss, peer_loss = step_zero_losses(pair, None)
        record = {
            "width": width, "parameters": pair.ours.num_parameters(), "ours": None, "peer": None, "status": "ok",
            "layers": config.n_layers, "context": config.max_seq_len, "batch": batch_size,
        }
        if relative_difference(ours_loss, peer_loss) > LOSS_TOLERANCE:
            record["status"] = f"FAILED: step-0 losses {ours_loss:.5f} and {peer_loss:.5f} differ"
            records.append(record)
            continue
        # One warm-up and two timed steps per side keep the five widths to an estimated minute on 2 idle cores.
        short = dataclasses.replace(settings, warmup=1, repeats=1 if settings.quick else 2)
        ours_seconds, peer_seconds, _, _ = time_training(pair, short, None, False)
        record["ours"] = pair.tokens_per_step / ours_seconds
        record["peer"] = pair.tokens_per_step / peer_seconds
        records.append(record)
    return records


def cached_step_seconds(model: GPT, context: int, repeats: int) -> float:
    """Return the median seconds of decoding one token against a cache holding ``context - 1`` positions."""
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(2))
    cache = KVCache.for_model(model, 1, context)
    with torch.inference_mode():
        model(tokens[:, :-1], kv_cache=cache)
        durations = []
        for _ in range(repeats + 1):
            for layer in cache.layers:
                layer.length = context - 1  # forget the previous timed step, keep the prefilled positions
            start = time.perf_counter()
            model(tokens[:, -1:], kv_cache=cache)
            durations.append(time.perf_counter() - start)
    return statistics.median(durations[1:])


def uncached_step_seconds(model: GPT, context: int, repeats: int) -> float:
    """Return the median seconds of one decoding step without a cache: a forward pass over the whole context."""
    tokens = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(2))

    def step():
        with torch.inference_mode():
            model(tokens)

    return median_seconds(step, warmup=1, repeats=repeats)


def context_growth(settings: Settings) -> list[dict]:
    """Return one record per context length: milliseconds per decoded token with and without the cache."""
    if settings.quick:
        config = GPTConfig(vocab_size=65, max_seq_len=32, d_model=32, n_layers=1, n_heads=2)
        contexts = (8, 16, 32)
    else:
        config = GPTConfig(vocab_size=65, max_seq_len=1024, d_model=384, n_layers=6, n_heads=6)
        contexts = CONTEXTS
    torch.manual_seed(0)
    model = GPT(config).eval()
    repeats = 2 if settings.quick else 5
    records = []
    for context in contexts:
        records.append(
            {
                "context": context,
                "layers": config.n_layers,
                "width": config.d_model,
                "cached_ms": 1000 * cached_step_seconds(model, context, repeats),
                "uncached_ms": 1000 * uncached_step_seconds(model, context, repeats),
            }
        )
    return records


def width_shape(records: list[dict]) -> str:
    """Return the fixed part of the width sweep's shape, such as "6 layers, context 256, batch 8"."""
    first = records[0]
    return f"{first['layers']} layer{'s' if first['layers'] != 1 else ''}, context {first['context']}, batch {first['batch']}"


def context_shape(records: list[dict]) -> str:
    """Return the fixed part of the context sweep's shape, such as "6 layers, width 384"."""
    first = records[0]
    return f"{first['layers']} layer{'s' if first['layers'] != 1 else ''}, width {first['width']}"


def format_width_table(records: list[dict]) -> str:
    lines = [
        "| width | parameters | minformer tokens/s | transformers tokens/s | ratio |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for record in records:
        if record["status"] != "ok":
            lines.append(f"| {record['width']} | {record['parameters']:,} | {record['status']} | | |")
            continue
        ratio = record["ours"] / record["peer"]
        lines.append(
            f"| {record['width']} | {record['parameters']:,} | {record['ours']:,.0f} | {record['peer']:,.0f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def format_context_table(records: list[dict]) -> str:
    lines = [
        "| context | cached ms/token | uncached ms/token | uncached / cached |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for record in records:
        ratio = record["uncached_ms"] / record["cached_ms"]
        lines.append(f"| {record['context']} | {record['cached_ms']:.2f} | {record['uncached_ms']:.2f} | {ratio:.1f}x |")
    return "\n".join(lines)


def plot_growth(width_records: list[dict], context_records: list[dict], directory) -> list:
    """Draw the two growth plots as PNG files in ``directory``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    paths = []

    figure, axes = plt.subplots(figsize=(6, 4))
    measured = [record for record in width_records if record["status"] == "ok"]
    widths = [record["width"] for record in measured]
    axes.plot(widths, [record["ours"] for record in measured], marker="o", label="minformer")
    axes.plot(widths, [record["peer"] for record in measured], marker="s", label="transformers")
    axes.set_xlabel(f"model width (d_model), {width_shape(width_records)}")
    axes.set_ylabel("training tokens/s (fp32)")
    axes.set_yscale("log")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    paths.append(directory / "compare_width.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(6, 4))
    contexts = [record["context"] for record in context_records]
    axes.plot(contexts, [record["cached_ms"] for record in context_records], marker="o", label="with KV cache")
    axes.plot(contexts, [record["uncached_ms"] for record in context_records], marker="s", label="without cache")
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("ms per decoded token (minformer, fp32)")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    paths.append(directory / "compare_context.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)
    return paths
