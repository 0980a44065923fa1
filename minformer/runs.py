"""Reading a run directory: its config, tokenizer and latest weights.

``minformer.load(run_dir)`` returns ``(model, tokenizer)`` in eval mode, the same objects that
``minformer sample``, ``eval`` and ``--resume`` use.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from minformer.config import load_yaml
from minformer.data.tokenizers import Tokenizer, load_tokenizer
from minformer.models import build_model
from minformer.training.checkpoint import CheckpointError, latest_checkpoint, load_model_tensors, read_checkpoint
from minformer.training.config import RunConfig, resolve_run_config


def read_config_yaml(path: Path) -> dict:
    """Read a run's ``config.yaml`` as a dict, raising ``ValueError`` naming the file when it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} is not a run directory: config.yaml not found.")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not contain a config mapping.")
    return raw


def read_run_config(run_dir: Path) -> RunConfig:
    """Parse ``run_dir/config.yaml`` into a validated ``RunConfig``."""
    return resolve_run_config(read_config_yaml(Path(run_dir) / "config.yaml"))


def load(run_dir: str | Path, device: str = "cpu"):
    """Load ``(model, tokenizer)`` from the latest checkpoint of ``run_dir``, model in eval mode."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    tokenizer: Tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    checkpoint_dir = latest_checkpoint(run_dir)
    if checkpoint_dir is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet; train it first.")
    model_tensors, _, _ = read_checkpoint(checkpoint_dir)
    model = build_model(config.model)
    load_model_tensors(model, model_tensors, str(checkpoint_dir))
    return model.to(device).eval(), tokenizer
