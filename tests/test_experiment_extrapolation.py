"""The extrapolation experiment's quick size runs end to end on the tiny corpus."""

import json

import pytest

from minformer import cli
from minformer.experiments.extrapolation import QUICK, SCHEMES

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_extrapolation_writes_table_and_plot(tiny_env, tmp_path, capsys):
    out = tmp_path / "extrapolation"

    assert cli.main(["experiment", "extrapolation", "--quick", "--corpus", "tiny", "--out", str(out)]) == 0

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [row["scheme"] for row in results["rows"]] == list(SCHEMES)
    learned = results["rows"][0]["val_loss"]
    assert learned[str(QUICK.train_context)] is not None
    assert learned[str(max(QUICK.eval_contexts))] is None  # the learned table ends at the training context
    for row in results["rows"][1:]:
        assert all(value is not None and value > 0 for value in row["val_loss"].values())
    table = (out / "table.md").read_text(encoding="utf-8")
    assert "n/a (no position past the table)" in table
    assert (out / "extrapolation.png").stat().st_size > 0
