"""Tests of ``minformer scaling sweep`` (resumable IsoFLOP runs) and ``minformer scaling plan``.

References: Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", eq. 4 (the
compute-optimal N and D of a loss law under C = 6 N D); Besiroglu et al. 2024 (the fallback law).
"""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

from minformer.cli import main
from minformer.data.corpus import CACHE_ENV
from minformer.models.gpt import GPT
from minformer.scaling import LAWS, LossLaw
from minformer.scaling.plan import Throughput, closest_shape, make_plan
from minformer.scaling.sweep import FULL, FULL_ESTIMATE_MINUTES, QUICK, RUNS_FILE, estimate_minutes, plan_grid

QUICK_POINTS = 6  # 2 budgets x 3 sizes


@pytest.fixture(scope="module")
def quick_sweep(tiny_cache, tmp_path_factory):
    """Run the quick sweep on the tiny corpus once; return the folder that contains its runs file."""
    out = tmp_path_factory.mktemp("sweep") / "quick"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tiny_cache))
        assert main(["scaling", "sweep", "--quick", "--corpus", "tiny", "--out", str(out)]) == 0
    torch.set_num_threads(threads)
    return out


def read_lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def copy_sweep(quick_sweep, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(quick_sweep, out)
    return out


def sweep_again(out, capsys) -> str:
    """Rerun the quick sweep into ``out`` and return its progress output (stderr)."""
    assert main(["scaling", "sweep", "--quick", "--corpus", "tiny", "--out", str(out)]) == 0
    return capsys.readouterr().err


# ---- the grid --------------------------------------------------------------------------------


def test_default_grid_profiles_and_budgets():
    points = plan_grid(FULL, vocab_size=84)
    budgets = sorted(FULL.budgets)

    assert len(points) == len(budgets) * FULL.sizes_per_budget
    for budget in budgets:
        profile = [point for point in points if point.budget == budget]
        sizes = [point.params for point in profile]
        assert len(profile) == FULL.sizes_per_budget
        assert sizes == sorted(set(sizes))
        for point in profile:
            # Whole steps miss the budget by at most half a step's FLOPs.
            half_step = 0.5 * point.flops_per_token * FULL.batch_size * FULL.context
            assert abs(point.flops - budget) <= half_step
            assert point.steps >= 100


def test_help_quotes_grid_estimate(capsys):
    assert FULL_ESTIMATE_MINUTES == round(estimate_minutes(FULL))

    with pytest.raises(SystemExit):
        main(["scaling", "sweep", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())

    assert f"about {FULL_ESTIMATE_MINUTES} minutes on 2 cores" in help_text


def test_budget_outside_shapes_is_rejected(tiny_env, tmp_path, capsys):
    assert main(["scaling", "sweep", "--quick", "--corpus", "tiny", "--budgets", "1e15", "--out", str(tmp_path)]) == 2
    assert "budget=1e+15" in capsys.readouterr().err


# ---- the runs file ---------------------------------------------------------------------------


def test_quick_sweep_writes_one_row_per_point(quick_sweep):
    rows = [json.loads(line) for line in read_lines(quick_sweep / RUNS_FILE)]
    tokens_per_step = QUICK.batch_size * QUICK.context

    assert len(rows) == QUICK_POINTS
    assert len({row["point"] for row in rows}) == QUICK_POINTS
    assert {row["budget"] for row in rows} == set(QUICK.budgets)
    for row in rows:
        assert row["tokens"] == row["steps"] * tokens_per_step
        assert row["flops"] == pytest.approx(row["flops_per_token"] * row["tokens"])
        assert abs(row["flops"] - row["budget"]) <= 0.5 * row["flops_per_token"] * tokens_per_step
        assert 0 < row["non_embedding_params"] < row["params"]
        assert 0 < row["loss"] < 10
        assert row["seconds"] > 0
        assert row["recipe"] == {**QUICK.recipe(), "corpus": "tiny"}


def test_sweep_rows_match_model_parameter_counts(quick_sweep):
    for line in read_lines(quick_sweep / RUNS_FILE):
        row = json.loads(line)
        shape = row["shape"]
        model = model_from_shape(shape)
        assert row["params"] == model.num_parameters()
        assert row["non_embedding_params"] == model.num_parameters(non_embedding=True)


def model_from_shape(shape: dict) -> GPT:
    from minformer.models.gpt import GPTConfig

    return GPT(GPTConfig(vocab_size=shape["vocab_size"], max_seq_len=shape["context"], d_model=shape["d_model"],
                         n_layers=shape["n_layers"], n_heads=shape["n_heads"]))


def test_sweep_resumes_after_truncation(quick_sweep, tiny_env, one_thread, tmp_path, capsys):
    out = copy_sweep(quick_sweep, tmp_path)
    original = read_lines(out / RUNS_FILE)
    (out / RUNS_FILE).write_text(original[0] + "\n", encoding="utf-8")

    progress = sweep_again(out, capsys)
    resumed = read_lines(out / RUNS_FILE)

    assert f"1 already in {out / RUNS_FILE}, {QUICK_POINTS - 1} to train" in progress
    assert len(re.findall(r"\] \[\d/\d\] C=", progress)) == QUICK_POINTS - 1
    assert resumed[0] == original[0]
    assert len(resumed) == QUICK_POINTS
    assert {json.loads(line)["point"] for line in resumed} == {json.loads(line)["point"] for line in original}
    # Seeded runs on one thread reproduce their losses, so the resumed file equals the uninterrupted one.
    losses = {json.loads(line)["point"]: json.loads(line)["loss"] for line in original}
    for line in resumed[1:]:
        row = json.loads(line)
        assert row["loss"] == pytest.approx(losses[row["point"]], rel=1e-5)


def test_complete_sweep_trains_nothing(quick_sweep, tiny_env, tmp_path, capsys):
    out = copy_sweep(quick_sweep, tmp_path)
    before = (out / RUNS_FILE).read_bytes()

    progress = sweep_again(out, capsys)

    assert f"{QUICK_POINTS} already in" in progress
    assert "0 to train" in progress
    assert (out / RUNS_FILE).read_bytes() == before


def test_sweep_drops_torn_last_line(quick_sweep, tiny_env, one_thread, tmp_path, capsys):
    out = copy_sweep(quick_sweep, tmp_path)
    original = read_lines(out / RUNS_FILE)
    torn = "\n".join(original[:2]) + "\n" + original[2][: len(original[2]) // 2]
    (out / RUNS_FILE).write_text(torn, encoding="utf-8")

    progress = sweep_again(out, capsys)
    resumed = read_lines(out / RUNS_FILE)

    assert "dropped an incomplete last line" in progress
    assert f"2 already in {out / RUNS_FILE}" in progress
    assert resumed[:2] == original[:2]
    assert [json.loads(line)["point"] for line in resumed] == [json.loads(line)["point"] for line in original]


def test_fit_skips_torn_last_line(quick_sweep, tmp_path, capsys):
    original = read_lines(quick_sweep / RUNS_FILE)
    results = tmp_path / RUNS_FILE
    results.write_text("\n".join(original) + "\n" + original[0][:40], encoding="utf-8")

    assert main(["scaling", "fit", str(results), "--bootstrap", "0"]) == 0
    captured = capsys.readouterr()

    assert "skipped the incomplete last line" in captured.err
    assert f"Approach 3 on {QUICK_POINTS} runs" in captured.out


def test_sweep_rejects_invalid_middle_line(quick_sweep, tiny_env, tmp_path, capsys):
    out = copy_sweep(quick_sweep, tmp_path)
    lines = read_lines(out / RUNS_FILE)
    (out / RUNS_FILE).write_text("\n".join(["{not json", *lines[1:]]) + "\n", encoding="utf-8")

    assert main(["scaling", "sweep", "--quick", "--corpus", "tiny", "--out", str(out)]) == 2
    assert f"{out / RUNS_FILE}:1 is not valid JSON" in capsys.readouterr().err


def test_sweep_rejects_runs_of_another_recipe(quick_sweep, tiny_env, tmp_path, capsys):
    out = copy_sweep(quick_sweep, tmp_path)
    rows = [json.loads(line) for line in read_lines(out / RUNS_FILE)]
    rows[0]["recipe"]["lr"] = 1e-3
    (out / RUNS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    assert main(["scaling", "sweep", "--quick", "--corpus", "tiny", "--out", str(out)]) == 2
    assert "another sweep recipe" in capsys.readouterr().err


def test_fit_reads_sweep_runs(quick_sweep, tmp_path, capsys):
    figures = tmp_path / "figures"

    assert main(["scaling", "fit", str(quick_sweep / RUNS_FILE), "--out", str(figures), "--bootstrap", "4"]) == 0
    output = capsys.readouterr().out

    assert f"Approach 3 on {QUICK_POINTS} runs" in output
    assert "Approach 2" in output
    assert "Hoffmann Approach 3      a = 0.460, b = 0.540" in output
    for name in ("loss_surface.png", "frontier.png"):
        assert (figures / name).stat().st_size > 0
    record = json.loads((figures / "fit.json").read_text(encoding="utf-8"))
    assert record["n_runs"] == QUICK_POINTS
    assert record["run_defaults"] == {"vocab_size": record["run_defaults"]["vocab_size"], "context": QUICK.context,
                                      "batch_size": QUICK.batch_size, "lr": QUICK.lr, "corpus": "tiny"}


# ---- the plan --------------------------------------------------------------------------------


def fixed_throughput(rate: float):
    return lambda shape: Throughput(rate, "fixed")


def test_plan_optimum_is_law_optimum():
    # Hoffmann et al. 2022, eq. 4: N_opt = G (C/6)^(beta/(alpha+beta)) and D_opt = C / (6 N_opt).
    law = LAWS["besiroglu2024"]
    plan = make_plan(law, 10, fixed_throughput(1e10), vocab_size=84, context=128, batch_size=32)
    compute = 1e10 * 60 * 10
    expected_params = law.G * (compute / 6) ** (law.beta / (law.alpha + law.beta))

    assert plan.compute == pytest.approx(compute, rel=1e-12)
    assert plan.optimum.params == pytest.approx(expected_params, rel=1e-9)
    assert 6 * plan.optimum.params * plan.optimum.tokens == pytest.approx(compute, rel=1e-9)
    assert plan.tokens == plan.steps * 32 * 128
    assert abs(plan.tokens * plan.flops_per_token - compute) <= 0.5 * plan.flops_per_token * 32 * 128


def test_plan_shape_count_is_model_count():
    for target in (2e4, 3e5, 5e6):
        shape, count = closest_shape(target, vocab_size=84, context=128)
        with torch.device("meta"):
            model = GPT(shape.config(84, 128))

        assert count == model.num_parameters()
        assert abs(math.log(count / target)) < math.log(1.1)


def synthetic_runs(law: LossLaw, path, flops_per_second: float) -> None:
    """Write noise-free runs of ``law`` on 5 sizes x 5 token counts, timed at ``flops_per_second``."""
    rows = []
    for params in np.logspace(4, 6, 5):
        for tokens in np.logspace(6, 8, 5):
            flops = 6 * params * tokens
            rows.append({"params": params, "tokens": tokens, "flops": flops, "loss": law.loss(params, tokens),
                         "seconds": flops / flops_per_second, "shape": {"vocab_size": 84, "context": 128}})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def printed_optimum(output: str) -> tuple[float, float]:
    match = re.search(r"N_opt = ([\d,]+) parameters, D_opt = ([\d,]+) tokens", output)
    return float(match.group(1).replace(",", "")), float(match.group(2).replace(",", ""))


def test_plan_from_synthetic_runs_gives_law_optimum(tmp_path, capsys):
    law = LAWS["besiroglu2024"]
    runs = tmp_path / RUNS_FILE
    synthetic_runs(law, runs, flops_per_second=2e9)

    assert main(["scaling", "plan", "--minutes", "5", "--runs", str(runs)]) == 0
    output = capsys.readouterr().out
    expected = law.optimal(2e9 * 60 * 5)
    params, tokens = printed_optimum(output)

    assert "Approach 3 fitted to" in output
    assert "2e+09 FLOP/s (from the sweep's run" in output
    assert params == pytest.approx(expected.params, rel=0.01)
    assert tokens == pytest.approx(expected.tokens, rel=0.01)


def test_plan_reads_fit_file(tmp_path, capsys):
    law = LAWS["besiroglu2024"]
    runs = tmp_path / RUNS_FILE
    synthetic_runs(law, runs, flops_per_second=2e9)
    assert main(["scaling", "fit", str(runs), "--out", str(tmp_path / "fit"), "--bootstrap", "0"]) == 0
    capsys.readouterr()

    assert main(["scaling", "plan", "--minutes", "5", "--fit", str(tmp_path / "fit" / "fit.json"), "--throughput", "2e9"]) == 0
    output = capsys.readouterr().out
    params, _ = printed_optimum(output)

    assert "fit.json" in output
    assert "given with --throughput" in output
    assert params == pytest.approx(law.optimal(2e9 * 60 * 5).params, rel=0.01)


def test_plan_falls_back_to_published_law(tiny_env, capsys):
    assert main(["scaling", "plan", "--minutes", "2", "--throughput", "1e10", "--corpus", "tiny"]) == 0
    output = capsys.readouterr().out
    params, _ = printed_optimum(output)

    assert "no --fit or --runs given" in output
    assert "Besiroglu et al. 2024" in output
    assert params == pytest.approx(LAWS["besiroglu2024"].optimal(1e10 * 120).params, rel=1e-3)


def test_plan_notes_budget_below_smallest_shape(tiny_env, capsys):
    assert main(["scaling", "plan", "--minutes", "0.0001", "--throughput", "1e9", "--corpus", "tiny"]) == 0
    output = capsys.readouterr().out

    assert "note:" in output
    assert "smallest one the plan builds" in output


def test_plan_without_note_near_optimum(tiny_env, capsys):
    assert main(["scaling", "plan", "--minutes", "2", "--throughput", "1e10", "--corpus", "tiny"]) == 0

    assert "note:" not in capsys.readouterr().out


def test_plan_measures_throughput(tiny_env, one_thread, capsys):
    arguments = ["--minutes", "1", "--corpus", "tiny", "--context", "16", "--batch-size", "4", "--measure-seconds", "0.2"]
    assert main(["scaling", "plan", *arguments]) == 0
    output = capsys.readouterr().out

    assert "(measured: " in output
    assert "batch 4 x 16" in output
    rate = float(re.search(r"throughput:\s+([\d.e+]+) FLOP/s", output).group(1))
    assert rate > 0


@pytest.mark.parametrize("minutes", ["0", "-5", "nan", "inf"])
def test_plan_rejects_invalid_minutes(minutes, capsys):
    assert main(["scaling", "plan", f"--minutes={minutes}", "--throughput", "1e10"]) == 2
    error = capsys.readouterr().err

    assert "--minutes=" in error
    assert "positive, finite number of minutes" in error


# ---- invalid output paths and result files ---------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["scaling", "sweep", "--quick", "--out"],
        ["experiment", "emergence", "--quick", "--out"],
        ["experiment", "bert-genre", "--quick", "--out"],
        ["experiment", "moe", "--quick", "--out"],
    ],
)
def test_out_that_is_a_file_is_rejected(tmp_path, capsys, command):
    target = tmp_path / "a-file"
    target.write_text("not a folder\n", encoding="utf-8")

    assert main([*command, str(target)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_fit_out_that_is_a_file_is_rejected(tmp_path, capsys):
    results = tmp_path / "runs.jsonl"
    results.write_text("", encoding="utf-8")
    target = tmp_path / "a-file"
    target.write_text("not a folder\n", encoding="utf-8")

    assert main(["scaling", "fit", str(results), "--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_runs_file_that_is_a_folder_is_rejected(tmp_path, capsys):
    (tmp_path / RUNS_FILE).mkdir()

    assert main(["scaling", "sweep", "--quick", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("value", [None, "x", True])
def test_plan_fit_with_invalid_constant_names_it(tmp_path, capsys, value):
    fit = {"approach3": {"E": 1.5, "A": 100.0, "B": 100.0, "alpha": 0.3, "beta": value}}
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(fit), encoding="utf-8")

    assert main(["scaling", "plan", "--minutes", "1", "--throughput", "1e9", "--fit", str(path)]) == 2
    assert "approach3.beta" in capsys.readouterr().err


def test_plan_rejects_invalid_fit_json(tmp_path, capsys):
    path = tmp_path / "fit.json"
    path.write_text("garbage", encoding="utf-8")

    assert main(["scaling", "plan", "--minutes", "1", "--throughput", "1e9", "--fit", str(path)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_plan_with_empty_runs_file_is_rejected(tmp_path, capsys):
    path = tmp_path / RUNS_FILE
    path.write_text("", encoding="utf-8")

    assert main(["scaling", "plan", "--minutes", "1", "--throughput", "1e9", "--runs", str(path)]) == 2
    assert "contains no runs" in capsys.readouterr().err


def test_fit_rejects_runs_of_one_size(tmp_path, capsys):
    results = tmp_path / "runs.jsonl"
    rows = [{"params": 1e5, "tokens": tokens, "loss": 2.0 + 1e6 / tokens} for tokens in np.logspace(6, 8, 6)]
    results.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    assert main(["scaling", "fit", str(results), "--out", str(tmp_path / "fit"), "--bootstrap", "0"]) == 2
    error = capsys.readouterr().err

    assert "same params" in error
    assert "at least two values" in error


def test_fit_rejects_mixed_recipes(tmp_path, capsys):
    law = LAWS["besiroglu2024"]
    results = tmp_path / "runs.jsonl"
    synthetic_runs(law, results, flops_per_second=2e9)
    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    for index, row in enumerate(rows):
        row["recipe"] = {"context": 128, "lr": 0.002 if index < 20 else 0.001, "corpus": "shakespeare"}
    results.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    assert main(["scaling", "fit", str(results), "--out", str(tmp_path / "fit"), "--bootstrap", "0"]) == 2
    error = capsys.readouterr().err

    assert "runs.jsonl:21 has another recipe than line 1" in error
    assert "(lr differ)" in error
