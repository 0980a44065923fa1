"""Shared fixtures: a tiny prepared corpus in a private cache, and one short training run.

The corpus is a few KB of generated sentences, prepared with ``prepare_text``, so that no test
needs the Shakespeare download.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minformer.data.corpus import CACHE_ENV, prepare_text

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CORPUS = "tiny"
TINY_WORDS = "the king queen lord lady sword crown night day love death fool honour".split()

# A model of about 14k parameters that trains 12 steps in well under a second on one thread.
TINY_OVERRIDES = [
    "--model.d_model=32",
    "--model.n_layers=1",
    "--model.max_seq_len=16",
    "--train.batch_size=4",
    "--train.max_steps=12",
    "--train.checkpoint_interval=4",
    "--train.eval_interval=4",
    "--train.log_interval=1",
    "--train.threads=1",
    f"--data.corpus={TINY_CORPUS}",
]


def overrides_dict(overrides: list[str]) -> dict:
    """Turn ``['--section.field=value', ...]`` into the dict that ``load_run_config`` takes."""
    from minformer.cli import parse_overrides

    return parse_overrides(overrides)


def tiny_text(n_lines: int = 300, seed: int = 0) -> str:
    """Generate about 9 KB of short sentences over a 13-word vocabulary."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 8))]
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A cache folder that contains the prepared corpus ``tiny``."""
    cache = tmp_path_factory.mktemp("minformer-cache")
    source = cache.parent / "tiny.txt"
    source.write_text(tiny_text(), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache))
        prepare_text([source], TINY_CORPUS, val_fraction=0.1)
    return cache


@pytest.fixture
def tiny_env(tiny_cache, monkeypatch) -> Path:
    """Point ``MINFORMER_CACHE`` at the tiny cache for one test, and restore torch's thread count after it."""
    monkeypatch.setenv(CACHE_ENV, str(tiny_cache))
    threads = torch.get_num_threads()
    yield tiny_cache
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Run torch on one thread: on a loaded two-core machine, two threads make tiny models far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env(cache: Path) -> dict:
    """The environment of a CLI subprocess: this one, with the tiny cache and one thread."""
    env = dict(os.environ)
    env[CACHE_ENV] = str(cache)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_cli(args: list[str], cache: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m minformer.cli ARGS`` to completion and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "minformer.cli", *args],
        env=subprocess_env(cache),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def trained_run(tiny_cache, tmp_path_factory):
    """A finished 12-step run of the tiny model, trained in this process: ``(run_dir, trainer)``."""
    from minformer.training.config import load_run_config
    from minformer.training.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tiny_cache))
        trainer = Trainer(load_run_config("gpt-tiny", overrides_dict(TINY_OVERRIDES)), run_dir)
        trainer.run()
    torch.set_num_threads(threads)
    return run_dir, trainer
