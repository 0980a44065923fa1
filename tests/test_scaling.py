"""Tests of ``minformer.scaling``: parameter and FLOP accounting, the published Chinchilla laws, and the fits.

References: Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1 (FLOPs per token);
Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (eq. 4, Table 3, Appendix F);
Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt".
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from minformer.cli import main
from minformer.models import FAMILIES, GPT, GPTConfig
from minformer.scaling import (
    APPROACH1_TABLE,
    GOPHER_FLOPS,
    LAWS,
    LossLaw,
    approach1_optimal,
    config_parameters,
    count_parameters,
    flops_per_token,
    interpolate_approach1,
)
from minformer.scaling.fitting import IsoFLOPProfile, fit_approach2, fit_approach3, profiles_from_runs, split_convex

SMALL = dict(vocab_size=100, max_seq_len=16, d_model=32, n_layers=2, n_heads=4)
CONFIGS = {
    "gpt-tied-learned": GPTConfig(**SMALL),
    "gpt-untied": GPTConfig(**SMALL, tie_embeddings=False),
    "gpt-rope-swiglu-rmsnorm-nobias": GPTConfig(**SMALL, position="rope", activation="swiglu", norm="rmsnorm", bias=False),
    "gpt-gqa-sinusoidal": GPTConfig(**SMALL, n_kv_heads=2, position="sinusoidal"),
    "gpt-t5-bias": GPTConfig(**SMALL, position="t5"),
    "gpt-alibi-d_head": GPTConfig(**SMALL, position="alibi", d_head=16, d_ff=48),
}


def unique_numel(model: torch.nn.Module) -> int:
    """Sum the elements of distinct storages, so that tied weights count once.

    Meta tensors have no storage, so there each parameter object counts once.
    """
    storages = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        key = id(parameter) if parameter.is_meta else (parameter.data_ptr(), tuple(parameter.shape))
        storages[key] = parameter.numel()
    return sum(storages.values())


# ---- accounting ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_count_parameters_equals_tensor_sum(name):
    model = GPT(CONFIGS[name])

    assert count_parameters(model) == unique_numel(model)
    assert count_parameters(model) == sum(parameter.numel() for parameter in model.parameters())
    assert config_parameters(CONFIGS[name]) == count_parameters(model)
    assert config_parameters(CONFIGS[name], non_embedding=True) == count_parameters(model, non_embedding=True)


def test_count_parameters_counts_tied_weights_once():
    tied = GPT(CONFIGS["gpt-tied-learned"])
    untied = GPT(CONFIGS["gpt-untied"])
    output_matrix = SMALL["vocab_size"] * SMALL["d_model"]

    assert count_parameters(untied) - count_parameters(tied) == output_matrix
    assert count_parameters(tied, non_embedding=True) == count_parameters(untied, non_embedding=True)


def test_non_embedding_leaves_out_token_and_position_tables():
    model = GPT(CONFIGS["gpt-tied-learned"])
    tables = (SMALL["vocab_size"] + SMALL["max_seq_len"]) * SMALL["d_model"]

    assert count_parameters(model) - count_parameters(model, non_embedding=True) == tables
    assert count_parameters(model, non_embedding=True) == model.num_parameters(non_embedding=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_count_parameters_for_every_family_default(family):
    config_class, model_class = FAMILIES[family]
    with torch.device("meta"):
        model = model_class(config_class())

    assert count_parameters(model) == unique_numel(model)
    assert 0 < count_parameters(model, non_embedding=True) < count_parameters(model)
    assert count_parameters(model) == model.num_parameters()
    assert count_parameters(model, non_embedding=True) == model.num_parameters(non_embedding=True)
    assert flops_per_token(config_class(), 128) > 6 * count_parameters(model, non_embedding=True)
    assert flops_per_token(config_class(), 128, convention="chinchilla") > 0


def test_gpt2_small_parameter_counts():
    # GPT-2 small: 124,439,808 parameters with the output layer tied; without the 50257 x 768 token
    # and 1024 x 768 position tables, about 85M.
    config = GPTConfig()

    assert config_parameters(config) == 124_439_808
    assert config_parameters(config, non_embedding=True) == 85_056_000


def test_kaplan_flops_gpt2_small():
    config = GPTConfig()
    non_embedding = 85_056_000
    attention = 6 * 12 * 1024 * 768

    assert flops_per_token(config, 1024) == 6 * non_embedding + attention
    assert flops_per_token(config, 1024) == pytest.approx(6 * 85e6, rel=0.12)


def test_kaplan_flops_match_hand_computation():
    # Per layer: attention 4 x (32 x 32 + 32) = 4224, MLP (32 x 128 + 128) + (128 x 32 + 32) = 8352,
    # two layer norms 2 x 64 = 128, so 12,704; two layers plus the final norm: N = 25,472.
    # 6N + 6 n_layers n_ctx d_attn = 152,832 + 6 x 2 x 16 x 32 = 158,976.
    config = CONFIGS["gpt-tied-learned"]

    assert config_parameters(config, non_embedding=True) == 25_472
    assert flops_per_token(config, 16) == 158_976
    assert flops_per_token(config, 8) == 6 * 25_472 + 6 * 2 * 8 * 32


def test_chinchilla_flops_match_hand_computation():
    # Hoffmann et al. 2022, Appendix F, per sequence of 16 tokens: embeddings 2*16*100*32 = 102,400;
    # per layer QKV 2*16*32*96 = 98,304, logits 2*16*16*32 = 16,384, softmax 3*4*16*16 = 3,072,
    # values 16,384, output 2*16*32*32 = 32,768, MLP 2*16*(2*32*128) = 262,144; logits 102,400.
    # forward = 102,400 + 2 * 429,056 + 102,400 = 1,062,912; training per token = 3 * forward / 16.
    config = CONFIGS["gpt-tied-learned"]

    assert flops_per_token(config, 16, convention="chinchilla") == 3 * 1_062_912 / 16


def test_chinchilla_flops_count_gqa_and_gated_projections():
    base = GPTConfig(**SMALL)
    gqa = GPTConfig(**SMALL, n_kv_heads=2)
    gated = GPTConfig(**SMALL, activation="swiglu")
    per_token = 3 * 2 / 16  # forward FLOPs of one layer's extra term -> training FLOPs per token, times 2 layers
    removed_kv = 2 * 16 * 32 * (2 * 32 - 2 * 16)
    added_gate = 2 * 16 * 32 * 128

    assert flops_per_token(base, 16, "chinchilla") - flops_per_token(gqa, 16, "chinchilla") == removed_kv * per_token
    assert flops_per_token(gated, 16, "chinchilla") - flops_per_token(base, 16, "chinchilla") == added_gate * per_token


def test_flops_per_token_rejects_invalid_arguments():
    with pytest.raises(ValueError, match="convention='palm'"):
        flops_per_token(GPTConfig(**SMALL), 16, convention="palm")
    with pytest.raises(ValueError, match="context=0"):
        flops_per_token(GPTConfig(**SMALL), 0)


# ---- published laws ---------------------------------------------------------------------------


def test_approach3_optimum_at_gopher_budget():
    # Hoffmann et al. 2022 with unrounded constants: 40.4B parameters at 5.76e23 FLOPs.
    allocation = LAWS["approach3"].optimal(GOPHER_FLOPS)

    assert allocation.params == pytest.approx(40.4e9, rel=0.01)
    assert allocation.compute == pytest.approx(GOPHER_FLOPS, rel=1e-12)
    assert 6 * allocation.params * allocation.tokens == pytest.approx(GOPHER_FLOPS, rel=1e-12)


def test_rounded_approach3_optimum_at_gopher_budget():
    # The printed, rounded constants (beta = 0.28 for 0.2849) move the optimum to about 32B.
    params = LAWS["approach3-rounded"].optimal(GOPHER_FLOPS).params

    assert 30e9 <= params <= 34e9


@pytest.mark.parametrize("compute", np.logspace(20, 25, 11))
def test_besiroglu_tokens_per_parameter_near_20(compute):
    # Besiroglu et al. 2024: their refit implies about 20 tokens per parameter, as Approaches 1 and 2 do.
    ratio = LAWS["besiroglu2024"].optimal(compute).tokens_per_param

    assert 17 <= ratio <= 23


@pytest.mark.parametrize("name", LAWS)
def test_optimal_allocation_minimises_loss_at_fixed_compute(name):
    law = LAWS[name]
    best = law.optimal(1e22)

    for factor in (0.8, 1.25):
        params = best.params * factor
        assert law.loss(params, 1e22 / (6 * params)) > best.loss


@pytest.mark.parametrize("name", LAWS)
def test_inverse_questions_round_trip(name):
    law = LAWS[name]

    for params in (1e8, 7e10, 1e13):
        allocation = law.optimal_for_params(params)
        assert law.optimal(allocation.compute).params == pytest.approx(params, rel=1e-9)
    for tokens in (1e9, 1.4e12, 1e15):
        allocation = law.optimal_for_tokens(tokens)
        assert law.optimal(allocation.compute).tokens == pytest.approx(tokens, rel=1e-9)


def test_loss_law_rejects_non_positive_constants():
    with pytest.raises(ValueError, match="beta=0"):
        LossLaw(E=1.7, A=400, B=400, alpha=0.3, beta=0)
    with pytest.raises(ValueError, match="compute=-1"):
        LAWS["approach3"].optimal(-1)


# ---- Approach 1: Hoffmann et al. 2022, Table 3 -----------------------------------------------------


@pytest.mark.parametrize("row", APPROACH1_TABLE)
def test_approach1_reproduces_table3_rows(row):
    params, compute, tokens = row

    for column, value in (("compute", compute), ("params", params), ("tokens", tokens)):
        allocation = interpolate_approach1(column, value)
        assert (allocation.params, allocation.compute, allocation.tokens) == (params, compute, tokens)


def test_approach1_interpolation_is_monotone_between_rows():
    budgets = np.logspace(math.log10(APPROACH1_TABLE[0][1]), math.log10(APPROACH1_TABLE[-1][1]), 400)
    budgets[0], budgets[-1] = APPROACH1_TABLE[0][1], APPROACH1_TABLE[-1][1]  # undo rounding at the ends
    allocations = [approach1_optimal(float(budget)) for budget in budgets]
    params = [allocation.params for allocation in allocations]
    tokens = [allocation.tokens for allocation in allocations]

    assert all(later > earlier for earlier, later in zip(params, params[1:]))
    assert all(later > earlier for earlier, later in zip(tokens, tokens[1:]))


def test_approach1_interpolates_in_log_space():
    # Halfway in log C between the 1B and 10B rows is halfway in log N and log D.
    lower, upper = APPROACH1_TABLE[1], APPROACH1_TABLE[2]
    allocation = approach1_optimal(math.sqrt(lower[1] * upper[1]))

    assert allocation.params == pytest.approx(math.sqrt(lower[0] * upper[0]), rel=1e-12)
    assert allocation.tokens == pytest.approx(math.sqrt(lower[2] * upper[2]), rel=1e-12)


def test_approach1_inverse_round_trip():
    for params in (2e9, 70e9, 3e12):
        allocation = interpolate_approach1("params", params)
        assert approach1_optimal(allocation.compute).params == pytest.approx(params, rel=1e-9)


def test_approach1_rejects_budgets_outside_table():
    with pytest.raises(ValueError, match="outside Hoffmann et al. 2022 Table 3"):
        approach1_optimal(1e18)
    with pytest.raises(ValueError, match="outside Hoffmann et al. 2022 Table 3"):
        approach1_optimal(1e29)


# ---- fits ----------------------------------------------------------------------------------------


def synthetic_grid(law: LossLaw, seed: int, noise: float = 0.01):
    """Losses of ``law`` on 5 model sizes x 5 token counts, with Gaussian noise on the loss."""
    rng = np.random.default_rng(seed)
    params, tokens = np.meshgrid(np.logspace(7, 10, 5), np.logspace(8.5, 11.5, 5))
    losses = law.loss(params, tokens) + rng.normal(0.0, noise, params.shape)
    return params.ravel(), tokens.ravel(), losses.ravel()


def test_approach3_recovers_exponents_from_noisy_grid():
    law = LAWS["approach3"]
    fit = fit_approach3(*synthetic_grid(law, seed=0))

    assert fit.law.alpha == pytest.approx(law.alpha, rel=0.05)
    assert fit.law.beta == pytest.approx(law.beta, rel=0.05)
    assert fit.law.E == pytest.approx(law.E, rel=0.05)
    assert fit.law.params_exponent == pytest.approx(law.params_exponent, rel=0.05)
    assert fit.law.tokens_exponent == pytest.approx(law.tokens_exponent, rel=0.05)


def test_approach3_bootstrap_is_seeded_and_brackets_estimate():
    runs = synthetic_grid(LAWS["besiroglu2024"], seed=1)
    first = fit_approach3(*runs, bootstrap=8, seed=3)
    second = fit_approach3(*runs, bootstrap=8, seed=3)

    assert first.intervals == second.intervals
    assert first.intervals["alpha"][0] < first.intervals["alpha"][1]
    assert set(first.intervals) == {"E", "A", "B", "alpha", "beta", "a", "b"}


def test_approach3_rejects_too_few_runs():
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_approach3([1e8, 1e9], [1e9, 1e10], [3.0, 2.5])


def isoflop_profiles(law: LossLaw, seed: int) -> list[IsoFLOPProfile]:
    """Nine sizes per budget, off-centre around the true optimum, with noise of 0.002 on the loss."""
    rng = np.random.default_rng(seed)
    profiles = []
    for compute in np.logspace(18, 22, 5):
        params = law.optimal(compute).params * np.logspace(-0.8, 0.4, 9)
        losses = law.loss(params, compute / (6 * params)) + rng.normal(0.0, 0.002, params.shape)
        profiles.append(IsoFLOPProfile(compute=compute, params=params, losses=losses))
    return profiles


@pytest.mark.parametrize("name", ["approach3", "besiroglu2024"])
def test_approach2_recovers_allocation_exponents(name):
    law = LAWS[name]
    fit = fit_approach2(isoflop_profiles(law, seed=0))

    assert fit.params_exponent == pytest.approx(law.params_exponent, rel=0.02)
    assert fit.tokens_exponent == pytest.approx(law.tokens_exponent, rel=0.02)


def test_approach2_takes_tokens_from_runs():
    # Runs that cost 8 N FLOPs per token, not 6 N: with the runs' tokens, D_opt = C / (8 N_opt) exactly,
    # because the parabola in log D = log(C / 8) - log N mirrors the one in log N.
    law = LAWS["besiroglu2024"]
    profiles = []
    for compute in np.logspace(18, 20, 3):
        params = law.optimal(compute).params * np.logspace(-0.6, 0.6, 7)
        tokens = compute / (8 * params)
        profiles.append(IsoFLOPProfile(compute=compute, params=params, losses=law.loss(params, tokens), tokens=tokens))
    fit = fit_approach2(profiles)

    np.testing.assert_allclose(fit.optimal_tokens, fit.computes / (8 * fit.optimal_params), rtol=1e-9)


def test_split_convex_separates_profiles():
    concave = IsoFLOPProfile(compute=1e20, params=np.array([1e8, 1e9, 1e10]), losses=np.array([3.0, 3.5, 3.0]))
    convex = IsoFLOPProfile(compute=1e21, params=np.array([1e8, 1e9, 1e10]), losses=np.array([3.0, 2.5, 3.0]))

    kept, rejected = split_convex([concave, convex])

    assert [profile.compute for profile in kept] == [1e21]
    assert [profile.compute for profile in rejected] == [1e20]


def test_approach2_rejects_concave_profile():
    concave = IsoFLOPProfile(compute=1e20, params=np.array([1e8, 1e9, 1e10]), losses=np.array([3.0, 3.5, 3.0]))
    convex = IsoFLOPProfile(compute=1e21, params=np.array([1e8, 1e9, 1e10]), losses=np.array([3.0, 2.5, 3.0]))

    with pytest.raises(ValueError, match="not convex"):
        fit_approach2([concave, convex])


def test_profiles_from_runs_groups_by_budget():
    params = [1e8, 2e8, 4e8, 1e9, 1e8]
    tokens = [1e10 / 1, 1e10 / 2, 1e10 / 4, 1e10, 1e12]
    losses = [3.0, 2.9, 3.1, 3.2, 2.5]
    profiles = profiles_from_runs(params, tokens, losses)

    assert len(profiles) == 1
    assert profiles[0].compute == pytest.approx(6e18)
    assert list(profiles[0].params) == [1e8, 2e8, 4e8]


# ---- command line ------------------------------------------------------------------------------


def test_cli_optimal_prints_each_source(capsys):
    assert main(["scaling", "optimal", "--compute", "5.76e23"]) == 0
    output = capsys.readouterr().out

    assert "40.4B" in output
    assert "72.2B" in output
    assert "67B" in output and "1.5T" in output


def test_cli_optimal_rounded_and_out_of_table(capsys):
    assert main(["scaling", "optimal", "--compute", "1e30", "--rounded"]) == 0
    output = capsys.readouterr().out

    assert "(as printed)" in output
    assert "outside Hoffmann et al. 2022 Table 3" in output


def test_cli_count_gpt2(capsys):
    assert main(["scaling", "count", "gpt2"]) == 0
    output = capsys.readouterr().out

    assert "124,439,808" in output
    assert "85,056,000" in output


def test_cli_fit_writes_report_and_figures(tmp_path, capsys):
    law = LAWS["besiroglu2024"]
    results = tmp_path / "results.jsonl"
    rows = []
    for profile in isoflop_profiles(law, seed=2)[:3]:
        for params, loss in zip(profile.params, profile.losses):
            tokens = profile.compute / (6 * params)
            rows.append({"params": params, "tokens": tokens, "flops": profile.compute, "loss": loss})
    results.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")

    exit_code = main(["scaling", "fit", str(results), "--out", str(tmp_path / "figures"), "--bootstrap", "4"])
    output = capsys.readouterr().out

    assert exit_code == 0
    assert "Approach 3 on 27 runs" in output
    assert "Approach 2 on 3 IsoFLOP profiles" in output
    for name in ("loss_surface.png", "frontier.png", "isoflops.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 0


def test_cli_fit_rejects_row_without_loss(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"params": 1e8, "tokens": 1e9}) + "\n", encoding="utf-8")

    assert main(["scaling", "fit", str(results)]) == 2
    assert "missing loss" in capsys.readouterr().err
