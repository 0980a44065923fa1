"""Tests of the encoder-decoder objectives: label smoothing, T5 span corruption, seq2seq pairs, and their runs.

Label smoothing is checked against ``torch.nn.functional.cross_entropy(label_smoothing=...)``.
Span corruption is checked against the counts of T5's ``random_spans_noise_mask`` and
``random_spans_helper``, against combinatorics (every cut of a span equally likely), and by
rebuilding each original sequence from its inputs and targets.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CORPUS, overrides_dict
from minformer.cli import main
from minformer.data.pairs import encode_pairs, pad_pair_batch
from minformer.data.span_corruption import (
    corrupt_spans,
    corrupted_lengths,
    random_segmentation,
    random_spans_noise_mask,
    raw_length_for_inputs,
)
from minformer.data.tokenizers import Seq2SeqCharTokenizer, load_tokenizer
from minformer.models.transformer import Transformer, TransformerConfig
from minformer.training.config import load_run_config, resolve_run_config
from minformer.training.objectives import (
    Seq2SeqObjective,
    SpanCorruptionObjective,
    held_out_loss,
    label_smoothed_cross_entropy,
)
from minformer.training.trainer import Trainer

SENTINELS = list(range(1000, 1100))


# ---- label smoothing ----------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_torch_with_padding_ignored(epsilon):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator) * 3
    targets = torch.randint(0, 11, (3, 5), generator=generator)
    targets[0, 3:] = -100
    targets[2, 1] = -100

    ours = label_smoothed_cross_entropy(logits, targets, epsilon)

    reference = F.cross_entropy(
        logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100, reduction="sum", label_smoothing=epsilon
    )
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_label_smoothing_changes_the_loss():
    """Negative twin: smoothing is not the plain cross-entropy."""
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(1)) * 3
    targets = torch.randint(0, 7, (2, 4), generator=torch.Generator().manual_seed(2))
    plain = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), reduction="sum")
    assert not torch.allclose(label_smoothed_cross_entropy(logits, targets, 0.1), plain)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"objective.label_smoothing": 1.0}, "objective.label_smoothing"),
        ({"objective.label_smoothing": -0.1}, "objective.label_smoothing"),
        ({"objective.noise_density": 0.0}, "objective.noise_density"),
        ({"objective.mean_noise_span_length": 0.5}, "objective.mean_noise_span_length"),
        ({"objective.pairs": "wikipedia"}, "objective.pairs"),
        ({"train.schedule": "linear"}, "train.schedule"),
    ],
)
def test_invalid_objective_fields_raise(overrides, field):
    with pytest.raises(ValueError, match=field):
        resolve_run_config(load_run_config("transformer-tiny", overrides), vocab_size=100)


@pytest.mark.parametrize(
    "preset, overrides, field",
    [
        ("t5-tiny", {"objective.kind": "span_corruption", "objective.pairs": "copy"}, "objective.pairs"),
        ("t5-tiny", {"objective.kind": "seq2seq", "objective.noise_density": 0.3}, "objective.noise_density"),
        ("t5-tiny", {"objective.kind": "seq2seq", "objective.mean_noise_span_length": 5.0}, "objective.mean_noise_span_length"),
        ("gpt-tiny", {"objective.mask_probability": 0.3}, "objective.mask_probability"),
        ("bert-tiny", {"objective.pairs": "reverse"}, "objective.pairs"),
    ],
)
def test_field_of_other_objective_rejected(preset, overrides, field):
    with pytest.raises(ValueError, match=f"{field}=.*has no effect") as error:
        resolve_run_config(load_run_config(preset, overrides), vocab_size=100)

    assert "objective.kind=" in str(error.value)


def test_label_smoothing_rejected_for_causal_lm():
    with pytest.raises(ValueError, match="label_smoothing"):
        resolve_run_config(load_run_config("gpt-tiny", {"objective.label_smoothing": 0.1}), vocab_size=100)


@pytest.mark.parametrize(
    "preset, kind, allowed",
    [("transformer-tiny", "span_corruption", False), ("t5-tiny", "span_corruption", True), ("t5-tiny", "seq2seq", True),
     ("t5-tiny", "causal_lm", False), ("gpt-tiny", "seq2seq", False)],
)
def test_objectives_fit_their_families(preset, kind, allowed):
    raw = load_run_config(preset, {"objective.kind": kind})
    if allowed:
        assert resolve_run_config(raw, vocab_size=200).objective.kind == kind
    else:
        with pytest.raises(ValueError, match="cannot train"):
            resolve_run_config(raw, vocab_size=200)


# ---- span corruption ----------------------------------------------------------------------------


def spans_of(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D boolean mask."""
    lengths, run = [], 0
    for value in mask.tolist() + [False]:
        if value:
            run += 1
        elif run:
            lengths.append(run)
            run = 0
    return lengths


@pytest.mark.parametrize("length", [20, 50, 100, 141, 568])
def test_noise_share_and_span_count_follow_t5(length):
    generator = torch.Generator().manual_seed(length)
    for _ in range(50):
        mask = random_spans_noise_mask(length, 0.15, 3.0, generator)

        # T5: num_noise_tokens = round(length * 0.15); num_noise_spans = round(num_noise_tokens / 3).
        assert int(mask.sum()) == round(length * 0.15)
        assert len(spans_of(mask)) == max(round(round(length * 0.15) / 3), 1)
        assert not bool(mask[0])  # segments alternate starting with kept tokens
        assert bool(mask[-1])  # and end with a dropped span


def test_mean_span_length_is_three_over_many_draws():
    generator = torch.Generator().manual_seed(0)
    lengths = []
    for _ in range(400):
        lengths += spans_of(random_spans_noise_mask(200, 0.15, 3.0, generator))

    assert sum(lengths) / len(lengths) == pytest.approx(3.0, abs=0.01)  # 30 noise tokens in 10 spans per draw
    assert max(lengths) > 6  # spans vary in length, they are not all 3


def test_every_segmentation_is_equally_likely():
    # 6 items in 3 non-empty segments: C(5, 2) = 10 compositions, each with probability 1/10.
    generator = torch.Generator().manual_seed(3)
    counts = collections.Counter(tuple(random_segmentation(6, 3, generator).tolist()) for _ in range(5000))

    assert len(counts) == math.comb(5, 2)
    assert all(sum(composition) == 6 and min(composition) >= 1 for composition in counts)
    assert all(abs(count - 500) < 90 for count in counts.values())  # about 4 standard deviations


def test_one_token_sequence_has_no_noise():
    mask = random_spans_noise_mask(1, 0.15, 3.0, torch.Generator().manual_seed(0))
    assert mask.tolist() == [False]


def test_raw_length_matches_t5_for_512_inputs():
    # T5's random_spans_helper logs tokens_length=568 inputs_length=512 targets_length=114 for noise
    # density 0.15 and mean span length 3.
    assert raw_length_for_inputs(512, 0.15, 3.0) == 568
    assert corrupted_lengths(568, 0.15, 3.0) == (512, 114)


def reconstruct(inputs: list[int], targets: list[int], sentinels: list[int], eos_id: int) -> list[int]:
    """Put each target span back in place of its sentinel in the inputs."""
    spans, current = {}, None
    for token in targets[:-1]:
        if token in sentinels:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    assert targets[-1] == eos_id
    assert inputs[-1] == eos_id
    rebuilt = []
    for token in inputs[:-1]:
        rebuilt += spans[token] if token in sentinels else [token]
    return rebuilt


@pytest.mark.parametrize("length", [1, 2, 7, 64, 141])
def test_inputs_and_targets_rebuild_the_original(length):
    generator = torch.Generator().manual_seed(length)
    for _ in range(20):
        tokens = torch.randint(2, 90, (length,), generator=generator)
        mask = random_spans_noise_mask(length, 0.15, 3.0, generator)
        inputs, targets = corrupt_spans(tokens, mask, SENTINELS, eos_id=1)

        assert reconstruct(inputs.tolist(), targets.tolist(), SENTINELS, 1) == tokens.tolist()
        n_spans = len(spans_of(mask))
        # Sentinels appear in order, once per span, in both the inputs and the targets.
        assert [token for token in inputs.tolist() if token in SENTINELS] == SENTINELS[:n_spans]
        assert [token for token in targets.tolist() if token in SENTINELS] == SENTINELS[:n_spans]
        assert len(inputs) == length - int(mask.sum()) + n_spans + 1


def test_corruption_of_a_known_mask():
    tokens = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17])
    mask = torch.tensor([0, 0, 1, 1, 0, 0, 0, 1], dtype=torch.bool)

    inputs, targets = corrupt_spans(tokens, mask, [100, 101], eos_id=1)

    assert inputs.tolist() == [10, 11, 100, 14, 15, 16, 101, 1]
    assert targets.tolist() == [100, 12, 13, 101, 17, 1]


def test_too_few_sentinels_raise():
    mask = torch.tensor([0, 1, 0, 1, 0, 1], dtype=torch.bool)
    with pytest.raises(ValueError, match="sentinel"):
        corrupt_spans(torch.arange(6), mask, [100, 101], eos_id=1)


def span_objective(train_tokens, val_tokens, input_length: int = 32, batch_size: int = 4, seed: int = 0):
    return SpanCorruptionObjective(
        np.asarray(train_tokens), np.asarray(val_tokens), input_length, batch_size, seed, 0.15, 3.0, SENTINELS,
        eos_id=1, pad_id=0, decoder_start_id=0,
    )


def test_span_batches_cover_held_out_tokens():
    val_tokens = list(range(2, 102))  # 100 held-out tokens
    objective = span_objective(list(range(2, 502)), val_tokens)

    batch = objective.next_batch()
    assert batch["input_ids"].shape == (4, 32)  # raw windows sized so the corrupted inputs are exactly 32
    assert bool(batch["attention_mask"].all())
    assert torch.equal(batch["decoder_input_ids"][:, 1:], batch["targets"][:, :-1])
    # Every held-out token is in exactly one row, as an input or a target.
    rebuilt = [token for inputs, targets in objective.val_rows for token in reconstruct(inputs, targets, SENTINELS, 1)]
    assert rebuilt == val_tokens


def test_span_objective_state_replays_batches():
    objective = span_objective(list(range(2, 502)), list(range(2, 102)))
    objective.next_batch()
    state = objective.get_state()
    expected = objective.next_batch()

    objective.set_state(state)
    replayed = objective.next_batch()

    for name, tensor in expected.items():
        assert torch.equal(replayed[name], tensor), name


# ---- seq2seq pairs ------------------------------------------------------------------------------


def test_pairs_pad_for_teacher_forcing():
    batch = pad_pair_batch([([5, 6, 1], [7, 1]), ([8, 1], [9, 9, 9, 1])], pad_id=0, decoder_start_id=0)

    assert batch["input_ids"].tolist() == [[5, 6, 1], [8, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["targets"].tolist() == [[7, 1, -100, -100], [9, 9, 9, 1]]
    assert batch["decoder_input_ids"].tolist() == [[0, 7, 0, 0], [0, 9, 9, 9]]


def test_pairs_longer_than_max_len_are_dropped():
    tokenizer = Seq2SeqCharTokenizer("abcdef", n_sentinels=0)
    kept, dropped = encode_pairs([("abc", "abc"), ("abcdef", "a"), ("a", "abcdef")], tokenizer.encode, tokenizer.eos_id, 4)

    assert dropped == 2
    assert kept == [(tokenizer.encode("abc") + [1], tokenizer.encode("abc") + [1])]


def test_seq2seq_tokenizer_round_trips_through_its_file(tmp_path):
    tokenizer = Seq2SeqCharTokenizer("hello world", n_sentinels=3)
    loaded = load_tokenizer(tokenizer.save(tmp_path))

    assert isinstance(loaded, Seq2SeqCharTokenizer)
    assert (loaded.pad_id, loaded.eos_id, loaded.sentinel_ids) == (0, 1, [2, 3, 4])
    assert loaded.decode(loaded.encode("hello") + [1, 0], skip_special_tokens=True) == "hello"
    assert loaded.decode([2] + loaded.encode("o")) == "<extra_id_0>o"


def random_words(count: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    alphabet = "abcdef"
    words = []
    for _ in range(count):
        length = int(torch.randint(3, 9, (1,), generator=generator))
        words.append("".join(alphabet[int(index)] for index in torch.randint(0, 6, (length,), generator=generator)))
    return words


def test_tiny_transformer_learns_to_copy(one_thread):
    tokenizer = Seq2SeqCharTokenizer("abcdef", n_sentinels=0)
    train = [(word, word) for word in random_words(2000, seed=0)]
    val = [(word, word) for word in random_words(64, seed=1)]
    objective = Seq2SeqObjective.from_pairs(train, val, tokenizer, max_len=16, batch_size=32, seed=0, decoder_start_id=0)
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=tokenizer.vocab_size, max_seq_len=16, d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=2,
        d_ff=64, dropout=0.0,
    )
    model = Transformer(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    nats, targets = held_out_loss(model, objective, 64, "cpu")
    initial_loss = nats / targets

    for _ in range(200):
        batch = objective.next_batch()
        loss = objective.loss(model, batch).nats / objective.n_targets(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    nats, targets = held_out_loss(model, objective, 64, "cpu")

    # About ln(8) = 2.1 or more at initialisation; 0.04 to 0.06 after 200 steps with seeds 0, 1 and 2.
    assert initial_loss > 1.5
    assert nats / targets < 0.15


def test_objective_smooths_labels_only_in_training():
    tokenizer = Seq2SeqCharTokenizer("abc", n_sentinels=0)
    pairs = [("ab", "ba"), ("c", "cc")]
    smoothed = Seq2SeqObjective.from_pairs(pairs, pairs, tokenizer, 8, 2, 0, decoder_start_id=0, label_smoothing=0.1)
    plain = Seq2SeqObjective.from_pairs(pairs, pairs, tokenizer, 8, 2, 0, decoder_start_id=0)
    model = Transformer(TransformerConfig(vocab_size=5, max_seq_len=8, d_model=16, n_encoder_layers=1,
                                          n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.0))
    batch = next(plain.eval_batches(2))

    model.train()
    training = [objective.loss(model, batch).nats for objective in (smoothed, plain)]
    model.eval()
    evaluation = [objective.loss(model, batch).nats for objective in (smoothed, plain)]

    assert not torch.allclose(training[0], training[1])
    torch.testing.assert_close(evaluation[0], evaluation[1])


# ---- runs ---------------------------------------------------------------------------------------

RUN_OVERRIDES = [
    "--model.d_model=32",
    "--model.n_encoder_layers=1",
    "--model.n_decoder_layers=1",
    "--model.n_heads=2",
    "--model.d_ff=64",
    "--model.max_seq_len=48",
    "--train.batch_size=4",
    "--train.max_steps=8",
    "--train.warmup_steps=2",
    "--train.checkpoint_interval=4",
    "--train.eval_interval=4",
    "--train.eval_windows=4",
    "--train.log_interval=1",
    "--train.threads=1",
    f"--data.corpus={TINY_CORPUS}",
]


def read_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("transformer-tiny", ["--objective.kind=seq2seq", "--objective.pairs=reverse"]),
        ("t5-tiny", ["--objective.kind=span_corruption"]),
    ],
)
def test_cli_trains_encoder_decoder(tiny_env, tmp_path, capsys, preset, overrides):
    run_dir = tmp_path / "run"

    exit_code = main(["train", preset, "--out", str(run_dir), *RUN_OVERRIDES, *overrides])

    error = capsys.readouterr().err
    assert exit_code == 0, error
    report = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    assert math.isfinite(report["val_loss"])
    assert report["val_tokens"] > 0
    assert isinstance(load_tokenizer(run_dir / "tokenizer.json"), Seq2SeqCharTokenizer)


def test_seq2seq_eval_is_the_exact_held_out_loss(tiny_env, tmp_path):
    trainer = Trainer(load_run_config("transformer-tiny", overrides_dict(RUN_OVERRIDES + ["--objective.pairs=copy"])),
                      tmp_path / "run")
    trainer.run()

    val_loss, val_tokens, _ = trainer.evaluate()

    model = trainer.model.eval()
    total_nats, total_targets = 0.0, 0
    with torch.no_grad():
        for source, target in trainer.objective.val_rows:
            logits = model(torch.tensor([source]), decoder_input_ids=torch.tensor([[0] + target[:-1]])).logits
            total_nats += float(F.cross_entropy(logits[0], torch.tensor(target), reduction="sum"))
            total_targets += len(target)
    assert val_tokens == total_targets
    assert val_loss == pytest.approx(total_nats / total_targets, rel=1e-5)


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("transformer-tiny", ["--objective.pairs=reverse", "--model.dropout=0.1"]),
        ("t5-tiny", ["--objective.kind=span_corruption"]),
    ],
)
def test_stopped_run_resumes_exactly(tiny_env, tmp_path, preset, overrides):
    raw = load_run_config(preset, overrides_dict(RUN_OVERRIDES + overrides))
    Trainer(raw, tmp_path / "reference").run()

    trainer = Trainer(raw, tmp_path / "run")
    trainer.on_log = lambda record: setattr(trainer, "stop_requested", record["step"] == 5)
    result = trainer.run()
    assert result.interrupted and result.steps_done == 5

    resumed = Trainer({}, tmp_path / "run", resume=True)
    assert resumed.step == 5
    resumed.run()

    assert read_losses(tmp_path / "run") == read_losses(tmp_path / "reference")
    assert sorted(read_losses(tmp_path / "run")) == list(range(1, 9))


def test_inverse_sqrt_schedule_in_the_trainer(tiny_env, tmp_path):
    d_model, warmup = 32, 2
    trainer = Trainer(load_run_config("transformer-tiny", overrides_dict(RUN_OVERRIDES + ["--objective.pairs=copy",
                      f"--train.lr={(d_model * warmup) ** -0.5}"])), tmp_path / "run")

    for step in range(6):
        # Vaswani et al. 2017, eq. 3, at 1-based step s = step + 1.
        s = step + 1
        assert trainer.learning_rate(step) == pytest.approx(d_model**-0.5 * min(s**-0.5, s * warmup**-1.5), rel=1e-9)
