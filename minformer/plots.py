"""Figures the CLI draws, written as PNG files with matplotlib's non-interactive Agg backend."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl file, skipping a last line cut short by a kill."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss(metrics_path: Path, out_path: Path) -> Path:
    """Draw training loss per step and the validation estimates against step."""
    records = read_metrics(metrics_path)
    figure, axes = plt.subplots(figsize=(7, 4.2))
    steps = [record["step"] for record in records if "loss" in record]
    losses = [record["loss"] for record in records if "loss" in record]
    axes.plot(steps, losses, linewidth=0.8, label="training loss")
    val = [(record["step"], record["val_loss_estimate"]) for record in records if "val_loss_estimate" in record]
    if val:
        axes.plot([step for step, _ in val], [loss for _, loss in val], "o-", label="validation loss (estimate)")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return Path(out_path)


def plot_positions(out_dir: Path, d_model: int = 64, n_positions: int = 128, n_heads: int = 8) -> list[Path]:
    """Draw each position scheme as it acts: the sinusoidal table, a RoPE rotation, ALiBi biases
    and T5 buckets. Returns the PNG paths."""
    import torch

    from minformer.positions import ALiBi, RotaryEmbedding, relative_position_bucket, relative_positions, sinusoidal_table

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    figure, axes = plt.subplots(figsize=(7, 4))
    image = axes.imshow(sinusoidal_table(n_positions, d_model).T.numpy(), aspect="auto", cmap="RdBu", origin="lower")
    axes.set_xlabel("position")
    axes.set_ylabel("embedding dimension")
    axes.set_title("Sinusoidal positions: PE(pos, 2i) = sin(pos / 10000^(2i/d))")
    figure.colorbar(image)
    paths.append(save(figure, out_dir / "positions_sinusoidal.png"))

    # RoPE rotates each 2-D pair of a query by position * frequency: draw the angle per pair.
    rotary = RotaryEmbedding(d_model)
    rotation = rotary(torch.arange(n_positions)[None])
    angles = torch.atan2(rotation.sin[0, 0], rotation.cos[0, 0])[:, : d_model // 2]  # (positions, pairs)
    figure, axes = plt.subplots(figsize=(7, 4))
    image = axes.imshow(angles.T.numpy(), aspect="auto", cmap="twilight", origin="lower")
    axes.set_xlabel("position")
    axes.set_ylabel("rotated pair (fast to slow)")
    axes.set_title("RoPE: rotation angle of each query/key pair")
    figure.colorbar(image, label="angle (radians, wrapped)")
    paths.append(save(figure, out_dir / "positions_rope.png"))

    bias = ALiBi(n_heads)(32, 32)[0]  # (heads, q, k)
    figure, grid = plt.subplots(2, n_heads // 2, figsize=(10, 4.5))
    for head, axes in enumerate(grid.flat):
        axes.imshow(bias[head].masked_fill(torch.ones(32, 32).triu(1).bool(), float("nan")).numpy(), cmap="viridis")
        axes.set_title(f"head {head}", fontsize=8)
        axes.axis("off")
    figure.suptitle("ALiBi: -slope * (query - key) added to causal scores")
    paths.append(save(figure, out_dir / "positions_alibi.png"))

    distances = relative_positions(1, 2 * n_positions + 1)[0] + n_positions  # key - query, centred
    figure, axes = plt.subplots(figsize=(7, 4))
    for bidirectional in (True, False):
        buckets = relative_position_bucket(distances, bidirectional=bidirectional)
        axes.plot(distances.tolist(), buckets.tolist(), label="bidirectional (encoder)" if bidirectional else "causal (decoder)")
    axes.set_xlabel("relative position (key - query)")
    axes.set_ylabel("bucket")
    axes.set_title("T5 relative-position buckets (32 buckets, max distance 128)")
    axes.legend()
    axes.grid(alpha=0.3)
    paths.append(save(figure, out_dir / "positions_t5_buckets.png"))
    return paths


def plot_attention_maps(attentions: list, tokens: list[str], out_path: Path) -> Path:
    """Draw a grid of attention maps, one row per layer and one column per head.

    ``attentions`` holds one (heads, seq, seq) tensor per layer.
    """
    n_layers, n_heads = len(attentions), attentions[0].shape[0]
    figure, grid = plt.subplots(n_layers, n_heads, figsize=(2.2 * n_heads, 2.2 * n_layers), squeeze=False)
    for layer, layer_maps in enumerate(attentions):
        for head in range(n_heads):
            axes = grid[layer][head]
            axes.imshow(layer_maps[head].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            axes.set_xticks([])
            axes.set_yticks([])
            if layer == 0:
                axes.set_title(f"head {head}", fontsize=8)
            if head == 0:
                axes.set_ylabel(f"layer {layer}", fontsize=8)
    figure.suptitle(f"attention weights over {len(tokens)} tokens (rows: queries, columns: keys)")
    return save(figure, Path(out_path))


def save(figure, path: Path) -> Path:
    """Write a figure as PNG and close it."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def plot_expert_load(metrics_path: Path, out_path: Path) -> Path:
    """Draw each expert's share of its layer's assignments against step, one panel per mixture-of-experts layer.

    Reads the ``moe_layer{L}_expert{E}_share`` fields of a metrics.jsonl file; a horizontal line
    marks the uniform share 1 / n_experts.
    """
    import re

    records = read_metrics(metrics_path)
    share_name = re.compile(r"moe_layer(\d+)_expert(\d+)_share$")
    experts_by_layer: dict[int, set[int]] = {}
    for record in records:
        for name in record:
            match = share_name.match(name)
            if match:
                experts_by_layer.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if not experts_by_layer:
        raise ValueError(f"{metrics_path} has no moe_layer*_expert*_share fields; is it a mixture-of-experts run?")

    layers = sorted(experts_by_layer)
    figure, grid = plt.subplots(len(layers), 1, figsize=(7, 2.8 * len(layers)), squeeze=False)
    for axes, layer in zip(grid[:, 0], layers):
        experts = sorted(experts_by_layer[layer])
        for expert in experts:
            name = f"moe_layer{layer}_expert{expert}_share"
            points = [(record["step"], record[name]) for record in records if name in record]
            axes.plot([step for step, _ in points], [share for _, share in points], linewidth=0.8, label=f"expert {expert}")
        axes.axhline(1 / len(experts), color="black", linestyle="--", linewidth=0.8, label="uniform")
        axes.set_title(f"block {layer}", fontsize=9)
        axes.set_ylabel("share of assignments")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, ncol=min(len(experts) + 1, 5))
    grid[-1, 0].set_xlabel("optimizer step")
    figure.suptitle("load per expert (before capacity dropping)")
    return save(figure, Path(out_path))
