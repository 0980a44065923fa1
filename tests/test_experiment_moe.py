"""The dense-versus-MoE experiment's quick size runs end to end on the tiny corpus, and the MoE benchmark's quick mode runs."""

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from minformer import cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_moe_experiment_writes_table(tiny_env, tmp_path):
    out = tmp_path / "moe"

    assert cli.main(["experiment", "moe", "--quick", "--corpus", "tiny", "--out", str(out)]) == 0

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    dense, moe = results["rows"]
    assert (dense["model"], moe["model"]) == ("dense", "moe")
    assert dense["active_parameters"] == dense["total_parameters"]
    assert moe["total_parameters"] > moe["active_parameters"]
    settings = results["settings"]
    router_parameters = settings["n_layers"] * settings["d_model"] * settings["n_experts"]
    extra_output_biases = settings["n_layers"] * settings["d_model"] * (settings["top_k"] - 1)  # one per chosen expert
    assert moe["active_parameters"] == dense["active_parameters"] + router_parameters + extra_output_biases
    assert dense["max_expert_load"] is None
    assert moe["max_expert_load"] >= 1.0
    assert all(row["val_loss"] > 0 for row in results["rows"])
    table = (out / "table.md").read_text(encoding="utf-8")
    assert "| moe |" in table


def test_moe_benchmark_quick_prints_ratio():
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "moe.py"), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 0, completed.stderr
    assert "| dense |" in completed.stdout
    assert "| moe |" in completed.stdout
    assert "moe / dense throughput ratio:" in completed.stdout
