"""Tests of the mixture-of-experts layer (``minformer/moe.py``) and its use in GPT and training.

Router logits are set directly in most tests: with ``d_model == n_experts`` and an identity
router weight, the router logits equal the hidden vectors, so routing is chosen by hand.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_OVERRIDES, overrides_dict
from minformer import GPT, GPTConfig
from minformer.data.corpus import CACHE_ENV
from minformer.feedforward import ACTIVATIONS, FeedForward
from minformer.moe import MoEFeedForward, expert_capacity, moe_metrics

MOE_OVERRIDES = [
    "--model.moe_every=1",
    "--model.moe_n_experts=4",
    "--model.moe_top_k=2",
    "--model.moe_capacity_factor=1.0",
]


def identity_router_layer(n_experts: int, top_k: int, **options) -> MoEFeedForward:
    """A layer whose router logits equal its input: d_model == n_experts and an identity router."""
    torch.manual_seed(0)
    layer = MoEFeedForward(n_experts, 8, "gelu", n_experts=n_experts, top_k=top_k, **options)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(n_experts))
    return layer


def softmax_row(row: list[float]) -> list[float]:
    exps = [math.exp(value) for value in row]
    return [value / sum(exps) for value in exps]


# ---- equivalences ---------------------------------------------------------------------------


@settings(deadline=None, max_examples=15, derandomize=bool(os.environ.get("CI")))
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 5),
    d_model=st.integers(1, 12),
    activation=st.sampled_from(ACTIVATIONS),
)
def test_one_expert_top1_equals_dense_feedforward(batch, seq, d_model, activation):
    torch.manual_seed(batch * 100 + seq * 10 + d_model)
    layer = MoEFeedForward(d_model, 16, activation, n_experts=1, top_k=1).eval()
    dense = FeedForward(d_model, 16, activation).eval()
    dense.load_state_dict(layer.experts[0].state_dict())
    hidden = torch.randn(batch, seq, d_model)

    output, stats = layer(hidden)

    torch.testing.assert_close(output, dense(hidden), atol=1e-5, rtol=1e-5)
    assert stats.n_dropped == 0
    assert stats.expert_share.tolist() == [1.0]


@settings(deadline=None, max_examples=15, derandomize=bool(os.environ.get("CI")))
@given(batch=st.integers(1, 3), seq=st.integers(1, 5), n_experts=st.integers(2, 5), activation=st.sampled_from(ACTIVATIONS))
def test_all_experts_give_router_weighted_sum(batch, seq, n_experts, activation):
    torch.manual_seed(batch * 100 + seq * 10 + n_experts)
    d_model = 6
    layer = MoEFeedForward(d_model, 16, activation, n_experts=n_experts, top_k=n_experts).eval()
    hidden = torch.randn(batch, seq, d_model)

    router_probs = torch.softmax(hidden @ layer.router.weight.T, dim=-1)  # (batch, seq, n_experts)
    expected = sum(router_probs[..., index, None] * expert(hidden) for index, expert in enumerate(layer.experts))
    output, _ = layer(hidden)

    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_switch_gate_is_router_probability():
    layer = identity_router_layer(n_experts=3, top_k=1)
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 1.5]])

    output, _ = layer(logits)

    probs = [softmax_row(row) for row in logits.tolist()]
    expected_first = probs[0][0] * layer.experts[0](logits[0])
    expected_second = probs[1][2] * layer.experts[2](logits[1])
    torch.testing.assert_close(output[0], expected_first, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(output[1], expected_second, atol=1e-6, rtol=1e-5)
    # Negative twin: an unscaled expert output differs, so the gate was not renormalised to 1.
    assert not torch.allclose(output[0], layer.experts[0](logits[0]))


def test_mixtral_gates_softmax_over_chosen_logits():
    layer = identity_router_layer(n_experts=4, top_k=2)
    logits = torch.tensor([[3.0, 1.0, 2.0, -1.0]])  # chooses experts 0 and 2

    output, _ = layer(logits)

    gate_first, gate_second = softmax_row([3.0, 2.0])
    expected = gate_first * layer.experts[0](logits[0]) + gate_second * layer.experts[2](logits[0])
    torch.testing.assert_close(output[0], expected, atol=1e-6, rtol=1e-5)


# ---- auxiliary losses -----------------------------------------------------------------------


def test_balance_loss_matches_formula_on_uneven_routing():
    coef = 0.01
    layer = identity_router_layer(n_experts=2, top_k=1, balance_coef=coef)
    rows = [[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.5, 0.0]]  # experts 0, 0, 1, 0

    _, stats = layer(torch.tensor(rows))

    probs = [softmax_row(row) for row in rows]
    mean_prob = [sum(p[i] for p in probs) / 4 for i in range(2)]
    fraction = [3 / 4, 1 / 4]
    expected = coef * 2 * (fraction[0] * mean_prob[0] + fraction[1] * mean_prob[1])
    assert stats.balance_loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats.expert_share.tolist() == fraction


def test_balance_loss_matches_formula_for_top2():
    coef = 0.05
    layer = identity_router_layer(n_experts=3, top_k=2, balance_coef=coef)
    rows = [[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 3.0, 0.0]]  # {0,1}, {2,1}, {1,0}

    _, stats = layer(torch.tensor(rows))

    probs = [softmax_row(row) for row in rows]
    mean_prob = [sum(p[i] for p in probs) / 3 for i in range(3)]
    fraction = [2 / 6, 3 / 6, 1 / 6]  # of the 6 assignments
    expected = coef * 3 * sum(f * p for f, p in zip(fraction, mean_prob))
    assert stats.balance_loss.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(stats.expert_share, torch.tensor(fraction))


def test_balanced_routing_gives_exactly_coefficient():
    coef = 0.01
    uniform = identity_router_layer(n_experts=4, top_k=4, balance_coef=coef)
    _, stats = uniform(torch.zeros(8, 4))  # every probability is exactly 1/4
    assert torch.equal(stats.balance_loss.detach(), torch.tensor(coef))  # coef rounded to fp32, exactly

    # One token per expert, each preferring its own: f_i = 1/4 and, by symmetry, P_i = 1/4.
    cyclic = identity_router_layer(n_experts=4, top_k=1, balance_coef=coef)
    _, stats = cyclic(3.0 * torch.eye(4))
    assert stats.balance_loss.item() == pytest.approx(coef, rel=1e-6)


def test_z_loss_matches_formula():
    coef = 0.001
    layer = identity_router_layer(n_experts=3, top_k=1, z_loss_coef=coef)
    rows = [[2.0, 0.0, -1.0], [5.0, 4.0, 3.0]]

    _, stats = layer(torch.tensor(rows))

    expected = coef * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows) / len(rows)
    assert stats.z_loss.item() == pytest.approx(expected, rel=1e-6)


# ---- capacity -------------------------------------------------------------------------------


def test_capacity_drops_later_tokens_of_full_expert():
    layer = identity_router_layer(n_experts=4, top_k=1, capacity_factor=1.0)
    logits = torch.tensor([10.0, 0.0, 0.0, 0.0]).expand(2, 4, 4).clone()  # 8 tokens, all to expert 0
    logits += 0.1 * torch.arange(8.0).view(2, 4, 1)  # distinct tokens, same routing

    output, stats = layer(logits)

    assert expert_capacity(1.0, 8, 1, 4) == 2
    flat_output = output.reshape(8, 4)
    flat_logits = logits.reshape(8, 4)
    gate = torch.softmax(flat_logits[:2], dim=-1)[:, :1]
    torch.testing.assert_close(flat_output[:2], gate * layer.experts[0](flat_logits[:2]))
    assert torch.equal(flat_output[2:], torch.zeros(6, 4))
    assert stats.n_dropped == 6
    assert stats.dropped_fraction == 6 / 8
    assert stats.expert_share.tolist() == [1.0, 0.0, 0.0, 0.0]  # counted before dropping


def test_capacity_keeps_first_choices_before_second_choices():
    # Two experts, top-2: token t's first choice is expert t % 2. Each expert receives two first
    # choices and two second choices but holds ceil(0.5 * 4 * 2 / 2) = 2 assignments.
    layer = identity_router_layer(n_experts=2, top_k=2, capacity_factor=0.5)
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]])

    output, stats = layer(logits)

    assert stats.n_dropped == 4
    for token in range(4):
        first = token % 2
        gate = softmax_row(logits[token].tolist())[first]
        expected = gate * layer.experts[first](logits[token])
        torch.testing.assert_close(output[token], expected, atol=1e-6, rtol=1e-5)


def test_no_capacity_drops_nothing():
    layer = identity_router_layer(n_experts=4, top_k=1, capacity_factor=None)
    _, stats = layer(torch.tensor([10.0, 0.0, 0.0, 0.0]).expand(8, 4))
    assert stats.n_dropped == 0
    assert expert_capacity(0, 8, 1, 4) is None


# ---- gradients and precision ----------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
def test_main_loss_reaches_router(top_k):
    torch.manual_seed(0)
    layer = MoEFeedForward(8, 16, n_experts=4, top_k=top_k)
    output, _ = layer(torch.randn(10, 8))
    output.square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_balance_loss_reaches_router_only():
    torch.manual_seed(0)
    layer = MoEFeedForward(8, 16, n_experts=4, top_k=2, z_loss_coef=0.0)
    _, stats = layer(torch.randn(10, 8))
    stats.balance_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in layer.experts.parameters())


def test_router_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = MoEFeedForward(8, 16, n_experts=4, top_k=2)
    dtypes = {}

    def record_dtype(name):
        def hook(module, args, output):
            dtypes[name] = output.dtype  # returns None, so the output is unchanged

        return hook

    layer.router.register_forward_hook(record_dtype("router"))
    layer.experts[0].fc_in.register_forward_hook(record_dtype("expert"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(32, 8))
    assert dtypes["router"] == torch.float32
    assert dtypes["expert"] == torch.bfloat16  # autocast was active elsewhere


# ---- GPT integration ------------------------------------------------------------------------


def tiny_gpt_config(**moe) -> GPTConfig:
    return GPTConfig(vocab_size=40, max_seq_len=16, d_model=16, n_layers=4, n_heads=2, **moe)


def test_moe_every_chooses_blocks_n_minus_1_2n_minus_1():
    model = GPT(tiny_gpt_config(moe_every=2, moe_n_experts=2, moe_top_k=1))
    kinds = [isinstance(block.ffn, MoEFeedForward) for block in model.blocks]
    assert kinds == [False, True, False, True]


def test_gpt_output_has_aux_loss_and_stats():
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config(moe_every=2, moe_n_experts=4, moe_top_k=2))
    output = model(torch.randint(0, 40, (2, 16)))
    assert sorted(output.moe_stats) == [1, 3]
    expected = sum(stats.balance_loss + stats.z_loss for stats in output.moe_stats.values())
    torch.testing.assert_close(output.aux_loss, expected)

    dense_output = GPT(tiny_gpt_config())(torch.randint(0, 40, (2, 16)))
    assert dense_output.aux_loss is None
    assert dense_output.moe_stats is None


def test_active_parameters_count_top_k_experts():
    dense = GPT(tiny_gpt_config())
    switch = GPT(tiny_gpt_config(moe_every=1, moe_n_experts=4, moe_top_k=1))
    all_experts = GPT(tiny_gpt_config(moe_every=1, moe_n_experts=4, moe_top_k=4))
    router_params = 4 * 16 * 4  # n_layers * d_model * n_experts

    assert dense.num_active_parameters() == dense.num_parameters()
    assert switch.num_active_parameters() == dense.num_parameters() + router_params
    assert switch.num_parameters() > switch.num_active_parameters()
    assert all_experts.num_active_parameters() == all_experts.num_parameters()


def test_moe_metrics_names_per_layer_shares():
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config(moe_every=2, moe_n_experts=3, moe_top_k=1, moe_capacity_factor=1.0))
    metrics = moe_metrics(model(torch.randint(0, 40, (2, 16))).moe_stats)
    for layer in (1, 3):
        shares = [metrics[f"moe_layer{layer}_expert{expert}_share"] for expert in range(3)]
        assert sum(shares) == pytest.approx(1.0)
    assert "moe_layer0_expert0_share" not in metrics
    assert {"moe_balance_loss", "moe_z_loss", "moe_dropped_fraction"} <= set(metrics)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"moe_every": -1}, "moe_every"),
        ({"moe_every": 5}, "moe_every"),
        ({"moe_every": 1, "moe_n_experts": 0}, "moe_n_experts"),
        ({"moe_every": 1, "moe_top_k": 0}, "moe_top_k"),
        ({"moe_every": 1, "moe_n_experts": 2, "moe_top_k": 3}, "moe_top_k"),
        ({"moe_every": 1, "moe_capacity_factor": -1.0}, "moe_capacity_factor"),
        ({"moe_every": 1, "moe_balance_coef": -0.1}, "moe_balance_coef"),
        ({"moe_every": 1, "moe_z_loss_coef": "big"}, "moe_z_loss_coef"),
    ],
)
def test_invalid_moe_config_names_field(fields, named):
    with pytest.raises(ValueError, match=named):
        tiny_gpt_config(**fields)


def test_presets_build_moe_models():
    switch = GPTConfig.from_preset("gpt-switch-tiny", vocab_size=30)
    mixtral = GPTConfig.from_preset("gpt-mixtral-tiny", vocab_size=30)
    assert (switch.moe_top_k, switch.moe_capacity_factor, switch.moe_every) == (1, 1.25, 2)
    assert (mixtral.moe_top_k, mixtral.moe_capacity_factor, mixtral.moe_every) == (2, None, 1)
    assert GPT(mixtral).num_active_parameters() < GPT(mixtral).num_parameters()


# ---- training -------------------------------------------------------------------------------


def moe_run_config() -> dict:
    from minformer.training.config import load_run_config

    return load_run_config("gpt-tiny", overrides_dict(TINY_OVERRIDES + MOE_OVERRIDES))


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def moe_reference_run(tiny_cache, tmp_path_factory) -> Path:
    """An uninterrupted 12-step run of the tiny model with a top-2 mixture of 4 experts, capacity 1.0."""
    from minformer.training.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("moe-reference") / "run"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tiny_cache))
        assert not Trainer(moe_run_config(), run_dir).run().interrupted
    torch.set_num_threads(threads)
    return run_dir


def test_moe_run_resumes_exactly(moe_reference_run, tiny_env, tmp_path):
    from minformer.training.trainer import Trainer

    trainer = Trainer(moe_run_config(), tmp_path / "run")
    real_forward = trainer.forward_model
    forward_calls = []

    def forward_requesting_stop(inputs):
        forward_calls.append(len(inputs))
        if len(forward_calls) == 6:  # during step 6, which is then undone
            trainer.stop_requested = True
        return real_forward(inputs)

    trainer.forward_model = forward_requesting_stop
    assert trainer.run().steps_done == 5

    resumed = Trainer({}, tmp_path / "run", resume=True)
    assert isinstance(resumed.model.blocks[0].ffn, MoEFeedForward)
    assert not resumed.run().interrupted

    resumed_records = read_metrics(tmp_path / "run")
    reference_records = read_metrics(moe_reference_run)
    assert [r["step"] for r in resumed_records] == list(range(1, 13))
    assert [r["loss"] for r in resumed_records] == [r["loss"] for r in reference_records]
    assert [r["aux_loss"] for r in resumed_records] == [r["aux_loss"] for r in reference_records]


def test_metrics_record_aux_losses_and_shares(moe_reference_run):
    records = read_metrics(moe_reference_run)
    for record in records:
        assert record["aux_loss"] == pytest.approx(record["moe_balance_loss"] + record["moe_z_loss"], rel=1e-5)
        assert 0.0 <= record["moe_dropped_fraction"] < 1.0
        shares = [record[f"moe_layer0_expert{expert}_share"] for expert in range(4)]
        assert sum(shares) == pytest.approx(1.0)
    assert any(record["moe_dropped_fraction"] > 0 for record in records)  # capacity 1.0 drops some


def test_plot_experts_writes_png(moe_reference_run, tmp_path):
    from minformer.cli import main

    out_path = tmp_path / "experts.png"
    assert main(["plot", "experts", str(moe_reference_run), "--out", str(out_path)]) == 0
    assert out_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_experts_rejects_dense_run(trained_run, tmp_path, capsys):
    from minformer.cli import main

    run_dir, _ = trained_run
    assert main(["plot", "experts", str(run_dir), "--out", str(tmp_path / "experts.png")]) == 2
    assert "mixture-of-experts" in capsys.readouterr().err


def test_progress_display_shows_aux_and_dropped(capsys):
    from minformer.cli import ProgressDisplay

    record = {"step": 5, "max_steps": 10, "loss": 2.0, "lr": 1e-3, "tokens_per_second": 1000.0, "train_seconds": 1.0}
    ProgressDisplay(1)({**record, "aux_loss": 0.0123, "moe_dropped_fraction": 0.05})
    line = capsys.readouterr().err
    assert "aux 0.0123" in line
    assert "dropped 5.0%" in line

    ProgressDisplay(1)(record)
    assert "aux" not in capsys.readouterr().err
