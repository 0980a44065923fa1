"""The minformer-against-transformers comparison runs every workload at a tiny size.

The correctness checks run exactly as in the full benchmark: the same loss at step 0, the same
encoder outputs and the same greedy tokens as ``transformers`` on the same weights. Times are
never asserted.
"""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO_ROOT

pytest.importorskip("transformers")
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import compare  # noqa: E402  (after the path insert)
import compare_workloads as workloads  # noqa: E402
from compare_measure import GEMM_FP32, Machine, Row, bf16_support, format_table  # noqa: E402

from minformer.generation import generate  # noqa: E402
from minformer.models.gpt import GPT, GPTConfig  # noqa: E402


@pytest.fixture()
def settings(tmp_path):
    has_bf16, reason = bf16_support()
    return workloads.Settings(
        quick=True, warmup=1, repeats=1, generation_repeats=1, compile=False, bf16=has_bf16,
        bf16_reason=reason, workdir=tmp_path,
    )


def assert_measured(rows: list[Row]) -> None:
    """Every row is measured with a passed check, except bf16 rows on a CPU without bf16."""
    assert rows
    for row in rows:
        if row.status.startswith("n/a"):
            assert "bf16" in row.workload
            continue
        assert row.status == "ok", f"{row.workload}: {row.status}"
        assert row.ours > 0
        assert row.peer > 0
        assert row.check


def test_gpt_training_rows_pass_checks(settings):
    rows = workloads.training_rows(workloads.gpt_training_pair(settings), settings, workloads.TARGETS["gpt_train"])

    assert_measured(rows)
    assert [row.peer_name for row in rows] == ["transformers", "transformers fp32", "transformers bf16"]
    assert rows[0].check.startswith("step-0 loss")


def test_t5_training_row_passes_check(settings):
    pair = workloads.t5_training_pair(settings)
    rows = workloads.training_rows(pair, settings, workloads.TARGETS["t5_train"], variants=False)

    assert_measured(rows)
    assert len(rows) == 1
    workloads.add_matrix_product_bound(rows[0], pair, settings)
    assert "matrix products per step" in rows[0].bound


def test_linear_step_products_recorded():
    """One linear layer's training step runs three products: x W^T + b forward, and one each for dx and dW."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    inputs = torch.randn(5, 4, requires_grad=True)  # without a gradient for x, backward skips dx

    def step():
        layer.zero_grad()
        layer(inputs).square().sum().backward()

    products = workloads.recorded_matrix_products(step)

    assert sorted(name for name, _ in products) == ["aten::addmm", "aten::mm", "aten::mm"]
    forward_shapes = [shapes for name, shapes in products if name == "aten::addmm"][0]
    assert forward_shapes == [[3], [5, 4], [4, 3]]
    backward_shapes = sorted(shapes for name, shapes in products if name == "aten::mm")
    assert backward_shapes == sorted([[[5, 3], [3, 4]], [[3, 5], [5, 4]]])


def test_bert_inference_row_passes_check(settings):
    rows = workloads.bert_rows(settings)

    assert_measured(rows)
    assert "at real positions" in rows[0].check


def test_generation_rows_agree_on_greedy_tokens(settings):
    rows = workloads.generation_rows(settings)

    assert_measured(rows)
    assert rows[0].check == "greedy tokens equal: 8/8"
    for row in rows:
        if row.status == "ok":
            assert "ms per token" in row.bound
            assert "x the peer" in row.bound


def test_mismatched_peer_fails_row(settings, monkeypatch):
    """A peer whose weights differ from minformer's must fail the row instead of printing speeds."""
    real_hf_copy = workloads.hf_copy

    def perturbed_copy(model, hf_class, workdir, name):
        peer = real_hf_copy(model, hf_class, workdir, name)
        with torch.no_grad():
            for parameter in peer.parameters():
                parameter.add_(0.05)
        return peer

    monkeypatch.setattr(workloads, "hf_copy", perturbed_copy)
    rows = workloads.training_rows(workloads.gpt_training_pair(settings), settings, workloads.TARGETS["gpt_train"])
    bert_rows = workloads.bert_rows(settings)

    assert len(rows) == 1
    assert rows[0].status.startswith("FAILED: step-0 losses differ")
    assert rows[0].ours is None
    assert rows[0].peer is None
    assert bert_rows[0].status.startswith("FAILED: encoder outputs differ")


def test_compile_failure_skips_row_with_reason(settings, monkeypatch):
    def failing_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", failing_compile)
    row = workloads.compiled_training_row(workloads.gpt_training_pair(settings), settings)

    assert row.status.startswith("skipped: torch.compile failed")
    assert "no C++ compiler found" in row.status
    assert row.ratio is None


def test_failed_row_prints_no_speed():
    machine = Machine(
        cores=2, threads=2, torch_version="x", cpu="x86_64", bf16=False, bf16_reason="none",
        gemm_fp32=100e9, gemm_bf16=None, bandwidth=10e9,
    )
    good = Row("good", "tokens/s", ours=300.0, peer=200.0, target=1.1, work_per_unit=1e8, roofline=GEMM_FP32)
    failed = Row("bad", "tokens/s", ours=300.0, peer=200.0, status="FAILED: losses differ")

    table = format_table([good, failed], machine)

    assert good.ratio == pytest.approx(1.5)
    assert good.roofline_fraction(machine, good.ours) == pytest.approx(0.3)  # 3e10 FLOP/s of 1e11
    assert good.target_met(machine) == "yes"
    assert failed.ratio is None
    assert "| bad | tokens/s | FAILED: losses differ |" in table
    assert "300" not in table.splitlines()[-1]


def test_compare_script_quick_writes_report_and_plots(tmp_path):
    threads = torch.get_num_threads()
    report_path = tmp_path / "compare.md"
    try:
        exit_code = compare.main(["--quick", "--no-compile", "--threads", "1", "--only", "moe,growth", "--out", str(report_path)])
    finally:
        torch.set_num_threads(threads)

    report = report_path.read_text(encoding="utf-8")
    assert exit_code == 0
    assert "measured limits: fp32 matmul" in report
    assert "| MoE layer (8 experts, top-2), forward + backward |" in report
    assert "| width | parameters | minformer tokens/s | transformers tokens/s | ratio |" in report
    assert "FAILED" not in report
    assert (tmp_path / "compare_width.png").stat().st_size > 0
    assert (tmp_path / "compare_context.png").stat().st_size > 0


def test_generate_compile_option_reuses_one_wrapper(monkeypatch):
    """``generate(compile=True)`` runs the model through one cached torch.compile wrapper."""
    calls = []

    def fake_compile(model, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=31, max_seq_len=16, d_model=16, n_layers=1, n_heads=2))
    keys_before = list(model.state_dict())
    prompt = torch.tensor([[1, 2, 3]])

    eager = generate(model, prompt, 4, temperature=0)
    first = generate(model, prompt, 4, temperature=0, compile=True)
    second = generate(model, prompt, 4, temperature=0, compile=True)

    assert calls == [{"dynamic": True}]
    assert torch.equal(first, eager)
    assert torch.equal(second, eager)
    assert list(model.state_dict()) == keys_before

