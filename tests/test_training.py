"""Tests of the training loop, optimizer, schedule and evaluation windows (``minformer/training``).

Resume tests compare every per-step loss bitwise (JSON floats compared with ``==``) against an
uninterrupted run of the same config at one CPU thread, because a resumed run must perform
exactly the optimizer steps that the killed one had left.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO_ROOT, TINY_OVERRIDES, overrides_dict, run_cli, subprocess_env
from minformer import GPT, GPTConfig
from minformer.data.datasets import evaluation_windows
from minformer.training import trainer as trainer_module
from minformer.training.checkpoint import latest_checkpoint, read_checkpoint
from minformer.training.config import load_run_config
from minformer.training.optim import build_optimizer, learning_rate
from minformer.training.trainer import Trainer

MAX_STEPS = 12
FAULT_SCRIPT = Path(__file__).resolve().parent / "fault_injection.py"


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(run_dir)}


def progress_steps(stderr: str) -> list[int]:
    """Step numbers of the CLI's progress lines, in the order printed."""
    return [int(match) for match in re.findall(r"^step\s+(\d+)/\d+", stderr, flags=re.MULTILINE)]


def checkpoint_step(run_dir: Path) -> int:
    return int(read_checkpoint(latest_checkpoint(run_dir))[2]["step"])


@pytest.fixture(scope="module")
def reference_run(tiny_cache, tmp_path_factory) -> Path:
    """An uninterrupted 12-step CLI run of the tiny config."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli(["train", "gpt-tiny", "--out", str(run_dir), *TINY_OVERRIDES], tiny_cache)
    assert result.returncode == 0, result.stderr
    return run_dir


def assert_resumes_exactly(run_dir: Path, reference_dir: Path, cache: Path) -> None:
    """Resume ``run_dir`` through the CLI and compare it step by step with ``reference_dir``."""
    resumed_from = checkpoint_step(run_dir)
    assert 0 < resumed_from < MAX_STEPS

    result = run_cli(["train", "--resume", str(run_dir)], cache)

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert progress_steps(result.stderr)[0] == resumed_from + 1
    steps = [record["step"] for record in read_metrics(run_dir)]
    assert steps == list(range(1, MAX_STEPS + 1))
    assert losses_by_step(run_dir) == losses_by_step(reference_dir)
    assert checkpoint_step(run_dir) == MAX_STEPS
    assert not list((run_dir / "checkpoints").glob(".tmp-step-*"))
    assert not list(run_dir.glob(".latest-*.tmp"))


def start_with_fault(mode: str, run_dir: Path, cache: Path) -> subprocess.Popen:
    command = [sys.executable, str(FAULT_SCRIPT), mode, "train", "gpt-tiny", "--out", str(run_dir), *TINY_OVERRIDES]
    return subprocess.Popen(
        command, env=subprocess_env(cache), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


# ---- resume after SIGKILL -------------------------------------------------------------------


def test_resume_after_sigkill_between_checkpoints(reference_run, tiny_cache, tmp_path):
    run_dir = tmp_path / "run"
    process = start_with_fault("slow-steps", run_dir, tiny_cache)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "checkpoints" / "step-0000004").is_dir():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the step-4 checkpoint never appeared"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.communicate(timeout=60)

    assert process.returncode == -signal.SIGKILL
    assert checkpoint_step(run_dir) == 4
    assert_resumes_exactly(run_dir, reference_run, tiny_cache)


def test_resume_after_sigkill_while_writing_checkpoint(reference_run, tiny_cache, tmp_path):
    run_dir = tmp_path / "run"
    process = start_with_fault("kill-during-second-checkpoint", run_dir, tiny_cache)
    process.communicate(timeout=120)

    assert process.returncode == -signal.SIGKILL
    partial = list((run_dir / "checkpoints").glob(".tmp-step-0000008-*"))
    assert len(partial) == 1
    assert (partial[0] / "model.safetensors").is_file()
    assert not (partial[0] / "state.json").exists()
    assert checkpoint_step(run_dir) == 4
    assert max(losses_by_step(run_dir)) == 8  # steps 5-8 were logged and must be dropped

    # Leftovers of another killed process: a half-written folder and a dangling temporary link.
    stale_folder = run_dir / "checkpoints" / ".tmp-step-0000999-stale"
    stale_folder.mkdir()
    (stale_folder / "model.safetensors").write_bytes(b"\x00" * 10)
    os.symlink("checkpoints/step-0000999", run_dir / ".latest-999999.tmp")
    (run_dir / "latest").unlink()  # without the link, the newest complete folder is chosen

    assert latest_checkpoint(run_dir).name == "step-0000004"
    assert_resumes_exactly(run_dir, reference_run, tiny_cache)


def test_resume_after_sigkill_before_latest_link_moves(reference_run, tiny_cache, tmp_path):
    run_dir = tmp_path / "run"
    process = start_with_fault("kill-before-second-latest-link", run_dir, tiny_cache)
    process.communicate(timeout=120)

    assert process.returncode == -signal.SIGKILL
    assert len(list(run_dir.glob(".latest-*.tmp"))) == 1
    assert (run_dir / "checkpoints" / "step-0000008").is_dir()
    assert_resumes_exactly(run_dir, reference_run, tiny_cache)


# ---- Ctrl-C -----------------------------------------------------------------------------------


def accumulation_config() -> dict:
    overrides = overrides_dict(TINY_OVERRIDES + ["--train.grad_accum_steps=3"])
    return load_run_config("gpt-tiny", overrides)


def test_stop_during_accumulation_resumes_exactly(tiny_env, tmp_path):
    reference = Trainer(accumulation_config(), tmp_path / "reference")
    assert not reference.run().interrupted

    trainer = Trainer(accumulation_config(), tmp_path / "run")
    real_forward = trainer.forward_model
    forward_calls = []

    def forward_requesting_stop(inputs):
        forward_calls.append(len(inputs))
        if len(forward_calls) == 3 * 5 + 2:  # the 2nd micro-batch of step 6
            trainer.stop_requested = True
        return real_forward(inputs)

    trainer.forward_model = forward_requesting_stop
    result = trainer.run()

    assert result.interrupted
    assert result.steps_done == 5
    assert checkpoint_step(tmp_path / "run") == 5
    assert sorted(losses_by_step(tmp_path / "run")) == [1, 2, 3, 4, 5]

    resumed = Trainer({}, tmp_path / "run", resume=True)
    assert resumed.step == 5
    assert not resumed.run().interrupted
    assert losses_by_step(tmp_path / "run") == losses_by_step(tmp_path / "reference")


def test_sigint_exits_130_with_whole_checkpoint(tiny_cache, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith(("--train.max_steps", "--train.eval_interval"))]
    overrides += ["--train.max_steps=1000000", "--train.eval_interval=1000000", "--train.checkpoint_interval=0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "minformer.cli", "train", "gpt-tiny", "--out", str(run_dir), *overrides],
        env=subprocess_env(tiny_cache),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not re.search(r'"step": 3\b', (run_dir / "metrics.jsonl").read_text() if (run_dir / "metrics.jsonl").exists() else ""):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "training never reached step 3"
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"minformer train --resume {run_dir}" in stderr
    model_tensors, optimizer_tensors, state = read_checkpoint(latest_checkpoint(run_dir))
    assert model_tensors and optimizer_tensors
    assert state["step"] == max(losses_by_step(run_dir))
    assert sorted(losses_by_step(run_dir)) == list(range(1, state["step"] + 1))


def test_training_into_existing_run_is_rejected(trained_run, tiny_env):
    run_dir, _ = trained_run
    config_before = (run_dir / "config.yaml").read_text()

    with pytest.raises(ValueError, match="--resume"):
        Trainer(load_run_config("gpt-tiny", overrides_dict(TINY_OVERRIDES)), run_dir)

    assert (run_dir / "config.yaml").read_text() == config_before


# ---- optimisation -------------------------------------------------------------------------------


def test_tiny_model_overfits_fixed_batch(one_thread):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=16, max_seq_len=16, d_model=32, n_layers=1, n_heads=4)
    model = GPT(config)
    optimizer = build_optimizer(model, lr=3e-3, weight_decay=0.0, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (4, 17), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    losses = []
    for _ in range(300):
        logits = model(inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, 16), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if losses[-1] < 0.05:
            break

    assert losses[-1] < 0.05, f"loss after {len(losses)} steps: {losses[-1]:.4f}"
    assert losses[0] > 2.0  # starts near ln(16)


def test_learning_rate_warmup_is_linear():
    lr, warmup = 1e-3, 10
    rates = [learning_rate(step, lr, 1e-4, warmup, 100) for step in range(warmup)]

    assert rates[0] == pytest.approx(lr / warmup)
    assert rates[-1] == pytest.approx(lr)
    differences = np.diff(rates)
    np.testing.assert_allclose(differences, lr / warmup, rtol=1e-9)


def test_learning_rate_cosine_decays_to_min_lr():
    lr, min_lr, warmup, max_steps = 1e-3, 1e-4, 10, 100
    rates = [learning_rate(step, lr, min_lr, warmup, max_steps) for step in range(warmup, max_steps + 1)]

    assert rates[0] == pytest.approx(lr)
    assert rates[-1] == pytest.approx(min_lr, abs=1e-12)
    assert all(later <= earlier for earlier, later in zip(rates, rates[1:]))
    assert all(rate >= min_lr for rate in rates)
    middle = learning_rate(warmup + (max_steps - warmup) // 2, lr, min_lr, warmup, max_steps)
    assert middle == pytest.approx((lr + min_lr) / 2)


def test_learning_rate_without_warmup_starts_at_lr():
    assert learning_rate(0, 1e-3, 1e-4, 0, 100) == pytest.approx(1e-3)


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(vocab_size=20, max_seq_len=8, d_model=16, n_layers=2, n_heads=2, tie_embeddings=True))
    assert model.lm_head.weight is model.token_embedding.weight
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    decayed, not_decayed = optimizer.param_groups

    assert decayed["weight_decay"] == 0.1
    assert not_decayed["weight_decay"] == 0.0
    assert decayed["params"] and not_decayed["params"]
    assert all(parameter.dim() >= 2 for parameter in decayed["params"])
    assert all(parameter.dim() < 2 for parameter in not_decayed["params"])

    all_params = decayed["params"] + not_decayed["params"]
    ids = [id(parameter) for parameter in all_params]
    assert len(ids) == len(set(ids))
    assert ids.count(id(model.token_embedding.weight)) == 1
    assert set(ids) == {id(parameter) for parameter in model.parameters()}
    assert sum(parameter.numel() for parameter in all_params) == model.num_parameters()


class GradientRecorder:
    """Stands in for the optimizer: records the accumulated gradients instead of stepping."""

    def __init__(self, model):
        self.model = model
        self.gradients = None
        self.param_groups = []

    def step(self):
        self.gradients = {name: parameter.grad.clone() for name, parameter in self.model.named_parameters()}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def micro_batches_with_ignored_targets(vocab_size: int, context: int):
    """Three micro-batches with 0, 11 and 37 of their targets ignored (-100)."""
    generator = torch.Generator().manual_seed(3)
    batches = []
    for n_ignored in (0, 11, 37):
        inputs = torch.randint(0, vocab_size, (4, context), generator=generator)
        targets = torch.randint(0, vocab_size, (4, context), generator=generator)
        targets.view(-1)[torch.randperm(targets.numel(), generator=generator)[:n_ignored]] = -100
        batches.append({"input_ids": inputs, "targets": targets})
    return batches


def relative_max_difference(actual: dict, expected: dict) -> float:
    largest_difference = max(float((actual[name] - expected[name]).abs().max()) for name in expected)
    largest_reference = max(float(expected[name].abs().max()) for name in expected)
    return largest_difference / largest_reference


def test_accumulated_gradient_is_mean_over_all_target_tokens(tiny_env, tmp_path):
    config = load_run_config("gpt-tiny", overrides_dict(TINY_OVERRIDES + ["--train.grad_clip=0"]))
    trainer = Trainer(config, tmp_path / "run")
    model = trainer.model
    trainer.optimizer = GradientRecorder(model)
    batches = micro_batches_with_ignored_targets(model.config.vocab_size, model.config.max_seq_len)

    trainer.train_step(batches)

    inputs = torch.cat([batch["input_ids"] for batch in batches])
    targets = torch.cat([batch["targets"] for batch in batches])
    logits = model(inputs).logits
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100).backward()
    expected = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    assert relative_max_difference(trainer.optimizer.gradients, expected) <= 1e-5

    # Negative twin: averaging the per-micro-batch means weights tokens unequally and is measurably off.
    model.zero_grad(set_to_none=True)
    for batch in batches:
        batch_inputs, batch_targets = batch["input_ids"], batch["targets"]
        batch_logits = model(batch_inputs).logits
        loss = F.cross_entropy(batch_logits.reshape(-1, batch_logits.size(-1)), batch_targets.reshape(-1), ignore_index=-100)
        (loss / len(batches)).backward()
    mean_of_means = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    assert relative_max_difference(mean_of_means, expected) > 1e-3


# ---- evaluation windows -------------------------------------------------------------------------


def check_windows_cover_stream(tokens: np.ndarray, context: int, start_ids: list[int]) -> None:
    inputs, targets = evaluation_windows(tokens, context, start_ids)
    stream = torch.tensor(list(start_ids) + tokens.tolist(), dtype=torch.int64)

    assert inputs.shape == targets.shape
    assert inputs.shape[1] == context
    assert int((targets != -100).sum()) == len(tokens)
    assert torch.equal(targets[targets != -100], stream[1:])
    assert torch.equal(inputs.reshape(-1)[: len(tokens)], stream[:-1])
    assert inputs.shape[0] == math.ceil(len(tokens) / context)


def test_evaluation_windows_predict_every_token_once():
    check_windows_cover_stream(np.arange(1, 34), context=8, start_ids=[0])


@settings(deadline=None, derandomize=bool(os.environ.get("CI")), max_examples=200)
@given(
    n_tokens=st.integers(min_value=1, max_value=300),
    context=st.integers(min_value=1, max_value=64),
    start_id=st.integers(min_value=0, max_value=60),
)
def test_evaluation_windows_cover_any_stream(n_tokens, context, start_id):
    tokens = (np.arange(n_tokens) * 7 + 3) % 50
    check_windows_cover_stream(tokens, context, start_ids=[start_id])


def test_evaluation_windows_reject_empty_stream():
    with pytest.raises(ValueError, match="empty"):
        evaluation_windows(np.array([], dtype=np.int64), 8, [])


def test_resume_without_checkpoint_starts_from_step_zero(tiny_env, tmp_path):
    # A run killed before its first checkpoint holds config.yaml and tokenizer.json only.
    reference = Trainer(load_run_config("gpt-tiny", overrides_dict(TINY_OVERRIDES)), tmp_path / "reference")
    reference.run()
    killed = Trainer(load_run_config("gpt-tiny", overrides_dict(TINY_OVERRIDES)), tmp_path / "killed")
    assert not (tmp_path / "killed" / "checkpoints").exists()

    resumed = Trainer({}, tmp_path / "killed", resume=True)
    resumed.run()

    def losses(run_dir):
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]

    assert killed.step == 0
    assert losses(tmp_path / "killed") == losses(tmp_path / "reference")


def test_threads_above_cpus_warn(monkeypatch, caplog):
    monkeypatch.setattr(trainer_module.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    before = torch.get_num_threads()
    try:
        with caplog.at_level("WARNING", logger="minformer.training.trainer"):
            trainer_module.set_torch_threads(2, "train.threads")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

    assert "train.threads=2 exceeds the 1 CPUs" in caplog.text


def test_threads_within_cpus_do_not_warn(monkeypatch, caplog):
    monkeypatch.setattr(trainer_module.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = torch.get_num_threads()
    try:
        with caplog.at_level("WARNING", logger="minformer.training.trainer"):
            trainer_module.set_torch_threads(1, "train.threads")
    finally:
        torch.set_num_threads(before)

    assert "exceeds" not in caplog.text
