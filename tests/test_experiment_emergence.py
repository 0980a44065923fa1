"""The emergence experiment: generated addition data, its metrics, and the quick run end to end."""

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from minformer import cli
from minformer.experiments.emergence import (
    FULL,
    QUICK,
    VOCABULARY,
    EmergenceSettings,
    ModelSize,
    answer_targets,
    encode,
    encode_pairs,
    format_example,
    greedy_answers,
    model_config,
    parse_example,
    split_pairs,
    summarise_scores,
    teacher_forced_scores,
)
from minformer.models.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = replace(QUICK, digits=3, n_train=3000, n_test=500)


class AdditionOracle(torch.nn.Module):
    """Predict the next token of a well-formed example with probability ``p_true``, the rest spread evenly."""

    def __init__(self, settings: EmergenceSettings, p_true: float = 1.0):
        super().__init__()
        self.settings = settings
        self.p_true = p_true

    def forward(self, input_ids):
        batch, length = input_ids.shape
        vocab = len(VOCABULARY)
        if self.p_true == 1.0:
            probabilities = torch.zeros(batch, length, vocab)
        else:
            probabilities = torch.full((batch, length, vocab), (1 - self.p_true) / (vocab - 1))
        for row in range(batch):
            prompt = "".join(VOCABULARY[token] for token in input_ids[row, : self.settings.prompt_length - 1].tolist())
            a, b = (int(operand) for operand in prompt.split("+"))
            true_tokens = encode(format_example(a, b, self.settings.digits, self.settings.reverse_answer))
            for position in range(length):
                probabilities[row, position, true_tokens[position + 1]] = self.p_true
        return SimpleNamespace(logits=probabilities.log())  # log(0) = -inf: probability exactly 0


# ---- data ----------------------------------------------------------------------------------------


def test_train_and_test_pairs_disjoint():
    train_pairs, test_pairs = split_pairs(SETTINGS)

    assert len(train_pairs) == SETTINGS.n_train
    assert len(test_pairs) == SETTINGS.n_test
    assert len(set(train_pairs)) == SETTINGS.n_train  # drawn without replacement
    assert len(set(test_pairs)) == SETTINGS.n_test
    assert set(train_pairs).isdisjoint(test_pairs)


def test_split_is_seeded():
    assert split_pairs(SETTINGS) == split_pairs(SETTINGS)
    assert split_pairs(SETTINGS) != split_pairs(replace(SETTINGS, seed=SETTINGS.seed + 1))


def test_generated_sums_parse_back():
    train_pairs, test_pairs = split_pairs(SETTINGS)
    tokens = encode_pairs(train_pairs + test_pairs, SETTINGS)

    assert tokens.shape == (SETTINGS.n_train + SETTINGS.n_test, SETTINGS.sequence_length)
    for (a, b), row in zip(train_pairs + test_pairs, tokens.tolist()):
        text = "".join(VOCABULARY[token] for token in row)
        parsed_a, parsed_b, parsed_sum = parse_example(text, SETTINGS.reverse_answer)
        assert (parsed_a, parsed_b) == (a, b)
        assert parsed_sum == a + b  # Python's integer addition is the reference


def test_example_layout_pads_and_orders_sum():
    assert format_example(987, 65, 3) == "987+065=1052$"  # 987 + 65 = 1052
    assert format_example(987, 65, 3, reverse_answer=True) == "987+065=2501$"  # least significant digit first
    assert format_example(0, 0, 3) == "000+000=0000$"
    assert parse_example("987+065=1052$") == (987, 65, 1052)
    assert parse_example("987+065=2501$", reverse_answer=True) == (987, 65, 1052)


def test_reversed_sums_parse_back():
    settings = replace(SETTINGS, reverse_answer=True)
    pairs = split_pairs(settings)[1]

    for (a, b), row in zip(pairs, encode_pairs(pairs, settings).tolist()):
        assert parse_example("".join(VOCABULARY[token] for token in row), reverse_answer=True) == (a, b, a + b)


def test_operand_out_of_range_rejected():
    with pytest.raises(ValueError, match="operands a=1000"):
        format_example(1000, 1, 3)


def test_loss_targets_only_answer():
    tokens = encode_pairs([(123, 456)], SETTINGS)

    inputs, targets = answer_targets(tokens, SETTINGS)

    kept = [VOCABULARY[token] for token in targets[0].tolist() if token != -100]
    assert "".join(kept) == "0579$"  # 123 + 456 = 579, padded to 4 digits, then the end token
    assert inputs.shape == targets.shape == (1, SETTINGS.sequence_length - 1)


# ---- metrics -------------------------------------------------------------------------------------


def test_oracle_scores_perfectly():
    tokens = encode_pairs(split_pairs(SETTINGS)[1][:40], SETTINGS)

    scores = teacher_forced_scores(AdditionOracle(SETTINGS), tokens, SETTINGS)
    metrics = summarise_scores(scores["log_probs"], scores["forced_correct"], scores["forced_correct"])

    assert metrics["exact_match"] == 1.0
    assert metrics["per_digit_greedy"] == 1.0
    assert metrics["per_digit_forced"] == 1.0
    assert metrics["log_likelihood_per_digit"] == 0.0  # log 1
    assert metrics["log_likelihood_per_answer"] == 0.0


def test_half_sure_oracle_log_likelihood():
    tokens = encode_pairs(split_pairs(SETTINGS)[1][:40], SETTINGS)

    scores = teacher_forced_scores(AdditionOracle(SETTINGS, p_true=0.5), tokens, SETTINGS)
    metrics = summarise_scores(scores["log_probs"], scores["forced_correct"], scores["forced_correct"])

    assert metrics["per_digit_forced"] == 1.0  # 0.5 is still the largest probability
    assert metrics["log_likelihood_per_digit"] == pytest.approx(math.log(0.5), rel=1e-6)
    assert metrics["log_likelihood_per_answer"] == pytest.approx(SETTINGS.answer_digits * math.log(0.5), rel=1e-6)


def test_exact_match_at_most_per_digit():
    generator = torch.Generator().manual_seed(0)
    for p_correct in (0.1, 0.5, 0.9, 0.99):
        correct = torch.rand(200, 5, generator=generator) < p_correct
        metrics = summarise_scores(torch.zeros(200, 5), correct, correct)

        assert metrics["exact_match"] <= metrics["per_digit_greedy"]


def test_one_wrong_digit_zeroes_exact_match():
    correct = torch.ones(10, 4, dtype=torch.bool)
    correct[:, 2] = False

    metrics = summarise_scores(torch.zeros(10, 4), correct, correct)

    assert metrics["exact_match"] == 0.0
    assert metrics["per_digit_greedy"] == 0.75


def test_metric_shapes_must_match():
    with pytest.raises(ValueError, match="one \\(n_answers, answer_digits\\) shape"):
        summarise_scores(torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.bool), torch.ones(3, 5, dtype=torch.bool))


def test_greedy_answers_match_argmax_of_forward():
    # Reference: the full forward pass without a cache, run on the greedy continuation itself.
    torch.manual_seed(0)
    model = GPT(model_config(ModelSize(32, 2, 2), SETTINGS)).eval()
    tokens = encode_pairs(split_pairs(SETTINGS)[1][:8], SETTINGS)

    answers = greedy_answers(model, tokens, SETTINGS)

    continued = torch.cat([tokens[:, : SETTINGS.prompt_length], answers], dim=1)
    with torch.no_grad():
        logits = model(continued[:, :-1]).logits[:, SETTINGS.prompt_length - 1 :]
    top_two = logits.topk(2, dim=-1).values
    assert bool(((top_two[..., 0] - top_two[..., 1]) > 1e-4).all())  # no near-ties to flip the argmax
    assert torch.equal(answers, logits.argmax(dim=-1))


# ---- settings and the command line ---------------------------------------------------------------


def test_full_sizes_span_two_orders_of_magnitude():
    parameters = [count for count in (GPT(model_config(size, FULL)).num_parameters() for size in FULL.sizes)]

    assert len(FULL.sizes) >= 5
    assert parameters == sorted(parameters)
    assert parameters[-1] / parameters[0] >= 100


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"digits": 0}, "digits=0"),
        ({"n_train": 99, "n_test": 2, "digits": 1}, "n_train + n_test = 101"),
        ({"sizes": ()}, "sizes is empty"),
        ({"warmup_steps": 20}, "warmup_steps=20"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"reverse_answer": 1}, "reverse_answer=1"),
    ],
)
def test_invalid_settings_name_field(overrides, fragment):
    with pytest.raises(ValueError, match=fragment.replace("+", "\\+")):
        replace(QUICK, **overrides)


def test_quick_emergence_writes_outputs(tmp_path, capsys):
    out = tmp_path / "emergence"

    assert cli.main(["experiment", "emergence", "--quick", "--out", str(out)]) == 0

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [row["size"] for row in results["rows"]] == [size.name for size in QUICK.sizes]
    for row in results["rows"]:
        assert 0.0 <= row["exact_match"] <= row["per_digit_greedy"] <= 1.0
        per_answer = results["answer_digits"] * row["log_likelihood_per_digit"]
        assert row["log_likelihood_per_answer"] == pytest.approx(per_answer)
        assert row["parameters"] > row["non_embedding_parameters"] > 0
        by_position = row["greedy_accuracy_by_position"]
        assert len(by_position) == results["answer_digits"]
        assert sum(by_position) / len(by_position) == pytest.approx(row["per_digit_greedy"])
    table = (out / "table.md").read_text(encoding="utf-8")
    assert "| d16-L1 |" in table
    assert (out / "emergence.png").stat().st_size > 0
    assert "| d32-L1 |" in capsys.readouterr().out


def test_out_file_rejected(tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text("{}", encoding="utf-8")

    assert cli.main(["experiment", "emergence", "--quick", "--out", str(out)]) == 2

    error = capsys.readouterr().err
    assert error.startswith("minformer: error: ")
    assert "is a file" in error
    assert out.read_text(encoding="utf-8") == "{}"


def test_corpus_option_rejected(tmp_path, capsys):
    out = tmp_path / "emergence"

    assert cli.main(["experiment", "emergence", "--quick", "--corpus", "tiny", "--out", str(out)]) == 2

    error = capsys.readouterr().err
    assert "--corpus" in error
    assert "generates its own" in error
    assert not out.exists()


def test_missing_out_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["experiment", "emergence", "--quick"])

    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err
