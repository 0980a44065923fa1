"""Tests of checkpoints (``minformer/training/checkpoint.py``) and of reading runs (``minformer/runs.py``).

A damaged checkpoint must fail with a ``CheckpointError`` that names the damaged file or tensor,
and the CLI must turn it into exit code 2 with a one-line message instead of a traceback.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import minformer
from minformer import GPT, GPTConfig
from minformer.cli import main
from minformer.training.checkpoint import (
    CheckpointError,
    atomic_write_text,
    latest_checkpoint,
    load_model_tensors,
    load_optimizer_state,
    prune_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from minformer.training.optim import build_optimizer

PACKAGE_ROOT = Path(minformer.__file__).resolve().parent


def small_model_and_optimizer():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, max_seq_len=8, d_model=16, n_layers=1, n_heads=2))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    inputs = torch.randint(0, 20, (2, 8))
    model(inputs).logits.sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A copy of the trained run that a test may damage; links stay relative."""
    source, _ = trained_run
    destination = tmp_path / "run"
    shutil.copytree(source, destination, symlinks=True)
    return destination


def assert_cli_error(argv: list[str], capsys, *fragments: str) -> str:
    """Run the CLI in this process and check exit code 2 and a one-line message with ``fragments``."""
    exit_code = main(argv)
    error = capsys.readouterr().err
    assert exit_code == 2, error
    assert error.startswith("minformer: error: ")
    assert "Traceback" not in error
    for fragment in fragments:
        assert fragment in error
    return error


# ---- writing and reading ------------------------------------------------------------------------


def test_checkpoint_round_trip_restores_model_and_optimizer(tmp_path):
    model, optimizer = small_model_and_optimizer()
    state = {"step": 7, "note": "kept"}
    folder = write_checkpoint(tmp_path, 7, model, optimizer, state)

    model_tensors, optimizer_tensors, read_state = read_checkpoint(folder)
    fresh_model = GPT(model.config)
    fresh_optimizer = build_optimizer(fresh_model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    load_model_tensors(fresh_model, model_tensors, str(folder))
    load_optimizer_state(fresh_model, fresh_optimizer, optimizer_tensors)

    assert read_state == state
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[name], tensor), name
    fresh_parameters = dict(fresh_model.named_parameters())
    for name, parameter in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh_optimizer.state[fresh_parameters[name]][key], optimizer.state[parameter][key])


def test_checkpoint_stores_tied_weight_once(tmp_path):
    model, optimizer = small_model_and_optimizer()
    assert model.lm_head.weight is model.token_embedding.weight

    model_tensors, _, _ = read_checkpoint(write_checkpoint(tmp_path, 1, model, optimizer, {}))

    assert "token_embedding.weight" in model_tensors
    assert "lm_head.weight" not in model_tensors


def test_checkpoint_layout_and_latest_link(tmp_path):
    model, optimizer = small_model_and_optimizer()
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, model, optimizer, {"step": step}, keep=2)

    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    assert (tmp_path / "latest").is_symlink()
    assert latest_checkpoint(tmp_path).name == "step-0000003"
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        assert (tmp_path / name).resolve() == (tmp_path / "checkpoints" / "step-0000003" / name).resolve()
    assert json.loads((tmp_path / "state.json").read_text()) == {"step": 3}


def test_latest_checkpoint_skips_temporary_folders(tmp_path):
    model, optimizer = small_model_and_optimizer()
    write_checkpoint(tmp_path, 4, model, optimizer, {"step": 4})
    (tmp_path / "checkpoints" / ".tmp-step-0000008-x").mkdir()
    (tmp_path / "latest").unlink()

    assert latest_checkpoint(tmp_path).name == "step-0000004"

    # A dangling link falls back to the newest complete folder as well.
    (tmp_path / "latest").symlink_to("checkpoints/step-0000099")
    assert latest_checkpoint(tmp_path).name == "step-0000004"


def test_next_checkpoint_removes_leftovers(tmp_path):
    model, optimizer = small_model_and_optimizer()
    write_checkpoint(tmp_path, 1, model, optimizer, {})
    (tmp_path / "checkpoints" / ".tmp-step-0000002-x").mkdir()
    (tmp_path / ".latest-123.tmp").symlink_to("checkpoints/step-0000002")

    write_checkpoint(tmp_path, 2, model, optimizer, {})

    assert not list((tmp_path / "checkpoints").glob(".tmp-step-*"))
    assert not list(tmp_path.glob(".latest-*.tmp"))


def test_prune_never_deletes_latest(tmp_path):
    model, optimizer = small_model_and_optimizer()
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, model, optimizer, {}, keep=3)
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").symlink_to("checkpoints/step-0000001")

    prune_checkpoints(tmp_path, keep=1)

    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["step-0000001", "step-0000003"]


def test_atomic_write_text_leaves_no_temporary_file(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "first")
    atomic_write_text(tmp_path / "a.txt", "second")

    assert (tmp_path / "a.txt").read_text() == "second"
    assert [path.name for path in tmp_path.iterdir()] == ["a.txt"]


# ---- damaged checkpoints ------------------------------------------------------------------------


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as file:
        file.truncate(size)


@pytest.mark.parametrize(
    "file_name, keep_fraction",
    [("model.safetensors", 0.0), ("model.safetensors", 0.5), ("optimizer.safetensors", 0.9), ("state.json", 0.5)],
)
def test_truncated_file_is_named(run_copy, file_name, keep_fraction):
    checkpoint_dir = latest_checkpoint(run_copy)
    damaged = checkpoint_dir / file_name
    truncate(damaged, int(damaged.stat().st_size * keep_fraction))

    with pytest.raises(CheckpointError) as raised:
        read_checkpoint(checkpoint_dir)

    assert str(damaged) in str(raised.value)


def test_load_rejects_truncated_weights(run_copy):
    damaged = latest_checkpoint(run_copy) / "model.safetensors"
    truncate(damaged, damaged.stat().st_size // 2)

    with pytest.raises(CheckpointError, match=re.escape(str(damaged))):
        minformer.load(run_copy)


@pytest.mark.parametrize("file_name", ["model.safetensors", "state.json"])
def test_cli_rejects_truncated_checkpoint(run_copy, tiny_env, capsys, file_name):
    damaged = latest_checkpoint(run_copy) / file_name
    truncate(damaged, damaged.stat().st_size // 2)
    metrics_before = (run_copy / "metrics.jsonl").read_text()

    assert_cli_error(["eval", str(run_copy)], capsys, str(damaged))
    assert_cli_error(["sample", str(run_copy), "--max-new-tokens", "2"], capsys, str(damaged))
    assert_cli_error(["train", "--resume", str(run_copy)], capsys, str(damaged))

    assert (run_copy / "metrics.jsonl").read_text() == metrics_before


def test_missing_checkpoint_file_is_named(run_copy, tiny_env, capsys):
    (latest_checkpoint(run_copy) / "optimizer.safetensors").unlink()

    assert_cli_error(["train", "--resume", str(run_copy)], capsys, "optimizer.safetensors")


def test_checkpoint_that_does_not_fit_config_names_tensor(run_copy, tiny_env, capsys):
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config["model"]["d_ff"] = 2 * config["model"]["d_ff"]
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))

    with pytest.raises(CheckpointError, match=r"tensor blocks\.0\.ffn\.fc_\w+\.(weight|bias) has shape"):
        minformer.load(run_copy)
    assert_cli_error(["eval", str(run_copy)], capsys, "blocks.0.ffn.fc_")


def test_checkpoint_with_missing_layer_names_tensors(run_copy):
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config["model"]["n_layers"] = 2
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))

    with pytest.raises(CheckpointError, match=r"missing \['blocks\.1\."):
        minformer.load(run_copy)


def test_no_file_is_unpickled():
    """Checkpoints use safetensors and JSON; any ``torch.load`` must use the restricted unpickler."""
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        assert not re.search(r"\bpickle\.loads?\(|\bUnpickler\(|allow_pickle\s*=\s*True", source), path
        for call in re.finditer(r"torch\.load\(", source):
            arguments = source[call.end() : source.find(")", call.end())]
            assert "weights_only=True" in arguments, f"{path}: torch.load without weights_only=True"
    checkpoint_source = (PACKAGE_ROOT / "training" / "checkpoint.py").read_text()
    assert "torch.load(" not in checkpoint_source


# ---- minformer.load -----------------------------------------------------------------------------


def test_load_matches_trained_model(trained_run):
    run_dir, trainer = trained_run
    model, tokenizer = minformer.load(run_dir)

    assert not model.training
    assert tokenizer.to_json() == trainer.tokenizer.to_json()
    inputs = torch.tensor([tokenizer.encode("The king and the queen.")[:16]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(inputs).logits
        actual = model(inputs).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_load_of_folder_without_run_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        minformer.load(tmp_path)
