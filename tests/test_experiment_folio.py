"""Tests of the Folio experiment: the character error rate, the quick run, and ``minformer translate``.

Edit distances are checked against values worked out by hand. The translate command is checked
against a plain greedy loop over the model's full forward pass (no cache), written out here.
No test needs the Shakespeare corpus: the Folio pairs are replaced by pairs made from the tiny corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_CORPUS, overrides_dict
from minformer.cli import main
from minformer.data.corpus import CACHE_ENV, load_corpus
from minformer.experiments.folio import QUICK, build_tokenizer, open_run, scored_pairs, t5_configs
from minformer.runs import load
from minformer.training.config import load_run_config, resolve_run_config
from minformer.training.trainer import Trainer
from minformer.translation import character_error_rate, edit_distance, score

SEQ2SEQ_OVERRIDES = [
    "--model.d_model=32",
    "--model.n_encoder_layers=1",
    "--model.n_decoder_layers=1",
    "--model.n_heads=2",
    "--model.d_ff=64",
    "--model.max_seq_len=48",
    "--model.dropout=0.0",
    "--objective.kind=seq2seq",
    "--objective.pairs=copy",
    "--train.batch_size=8",
    "--train.max_steps=30",
    "--train.warmup_steps=5",
    "--train.lr=0.003",
    "--train.checkpoint_interval=30",
    "--train.eval_interval=30",
    "--train.eval_windows=4",
    "--train.threads=1",
    f"--data.corpus={TINY_CORPUS}",
]


def folio_spelling(line: str) -> str:
    """Spell a modern line in a Folio-like way (u -> v, y -> ie), for synthetic pairs."""
    return line.replace("u", "v").replace("y", "ie")


@pytest.fixture
def synthetic_folio(tiny_env, monkeypatch):
    """Replace the prepared Folio pairs by (Folio-like, modern) pairs of the tiny corpus's lines."""
    import minformer.data.folio as folio

    def load_pairs(split):
        lines = [line.strip() for line in load_corpus(TINY_CORPUS).text(split).splitlines() if line.strip()]
        return [(folio_spelling(line), line) for line in lines]

    monkeypatch.setattr(folio, "load_pairs", load_pairs)
    return load_pairs


@pytest.fixture(scope="session")
def seq2seq_runs(tiny_cache, tmp_path_factory):
    """Finished 30-step copy-task runs of a tiny Transformer and a tiny T5: {family: run_dir}."""
    runs = {}
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tiny_cache))
        for preset in ("transformer-tiny", "t5-tiny"):
            run_dir = tmp_path_factory.mktemp("seq2seq") / preset
            Trainer(load_run_config(preset, overrides_dict(SEQ2SEQ_OVERRIDES)), run_dir).run()
            runs[preset.split("-")[0]] = run_dir
    torch.set_num_threads(threads)
    return runs


# ---- character error rate -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "hypothesis, reference, distance",
    [
        ("", "", 0),
        ("", "abc", 3),  # three insertions
        ("abc", "", 3),  # three deletions
        ("abc", "abc", 0),
        ("kitten", "sitting", 3),  # k -> s, e -> i, insert g
        ("flaw", "lawn", 2),  # delete f, insert n
        ("vnfold", "unfold", 1),  # v -> u
        ("selfe", "self", 1),  # delete the final e
        ("ab", "ba", 2),  # no transpositions: two substitutions
        ("Stand & vnfold your selfe", "Stand and unfold yourself", 6),  # & -> and (1 sub + 2 ins), v -> u, delete space, delete e
    ],
)
def test_edit_distance_hand_cases(hypothesis, reference, distance):
    assert edit_distance(hypothesis, reference) == distance
    assert edit_distance(reference, hypothesis) == distance


def test_cer_sums_over_the_corpus():
    # Distances 1 ("abc" -> "abd") and 1 ("xy" -> "xyz") over 3 + 3 reference characters.
    assert character_error_rate(["abc", "xy"], ["abd", "xyz"]) == pytest.approx(2 / 6)
    # A corpus rate, not a mean of line rates: (0 + 4) / (1 + 4) = 0.8, where the mean would be 0.5.
    assert character_error_rate(["a", ""], ["a", "bcde"]) == pytest.approx(4 / 5)


def test_cer_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        character_error_rate(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="references are empty"):
        character_error_rate([""], [""])


def test_identity_scores_perfectly_when_source_is_target():
    lines = ["Stand and unfold yourself.", "Long live the king!", "Who's there?"]

    scores = score(lines, lines)

    assert scores["cer"] == 0.0
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)


def test_identity_scores_worse_when_spelling_differs():
    """Negative twin: changed spellings raise the CER and lower BLEU and chrF."""
    lines = ["Stand and unfold yourself.", "Long live the king!", "Who's there?"]

    scores = score([folio_spelling(line.replace("self", "selfe")) for line in lines], lines)

    assert scores["cer"] > 0.0
    assert scores["bleu"] < 100.0
    assert scores["chrf"] < 100.0


# ---- the quick experiment -------------------------------------------------------------------------


def test_quick_experiment_writes_results_and_table(synthetic_folio, tmp_path, capsys):
    out = tmp_path / "folio"

    exit_code = main(["experiment", "folio", "--out", str(out), "--quick", "--corpus", TINY_CORPUS])

    assert exit_code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    systems = ["identity", "transformer greedy", "transformer beam", "t5 greedy", "t5 beam"]
    assert sorted(results["systems"]) == sorted(systems)
    for name in systems:
        for metric in ("cer", "bleu", "chrf"):
            assert results["systems"][name][metric] >= 0.0
    assert results["training"]["transformer"]["steps"] == QUICK.transformer_steps
    assert results["training"]["t5_pretrain"]["steps"] == QUICK.pretrain_steps
    assert results["training"]["t5_finetune"]["steps"] == QUICK.finetune_steps

    pairs, _ = scored_pairs(load_corpus(TINY_CORPUS), QUICK.max_seq_len, QUICK.eval_pairs)
    assert results["scored_pairs"] == len(pairs) == QUICK.eval_pairs
    expected_cer = character_error_rate([source for source, _ in pairs], [target for _, target in pairs])
    assert results["systems"]["identity"]["cer"] == pytest.approx(expected_cer)
    assert expected_cer > 0

    table = (out / "table.md").read_text(encoding="utf-8")
    for label in ("identity", "transformer, greedy", "transformer, beam 2", "t5, greedy", "t5, beam 2"):
        assert f"| {label}" in table
    for run in ("transformer", "t5-pretrain", "t5"):
        assert (out / run / "model.safetensors").exists()


def test_t5_finetuning_starts_from_pretrained_weights(synthetic_folio, tmp_path, one_thread):
    corpus = load_corpus(TINY_CORPUS)
    tokenizer = build_tokenizer(corpus, TINY_CORPUS)
    pretrain_config, finetune_config = t5_configs(QUICK, TINY_CORPUS)
    pretrain = open_run(tmp_path / "t5-pretrain", pretrain_config, tokenizer)
    pretrain.run()
    pretrained = {name: tensor.clone() for name, tensor in pretrain.model.state_dict().items()}

    open_run(tmp_path / "t5", finetune_config, tokenizer, on_start=lambda trainer: trainer.model.load_state_dict(pretrained))
    # A rerun resumes from the step-0 checkpoint, so it too starts from the pretrained weights.
    resumed = open_run(tmp_path / "t5", finetune_config, tokenizer)

    assert resumed.step == 0
    for name, tensor in resumed.model.state_dict().items():
        torch.testing.assert_close(tensor, pretrained[name], atol=0, rtol=0)


def test_rerun_reuses_runs_and_rejects_other_settings(synthetic_folio, tmp_path, capsys):
    out = tmp_path / "folio"
    assert main(["experiment", "folio", "--out", str(out), "--quick", "--corpus", TINY_CORPUS]) == 0
    first = json.loads((out / "results.json").read_text(encoding="utf-8"))
    metrics_before = (out / "transformer" / "metrics.jsonl").read_text(encoding="utf-8")

    assert main(["experiment", "folio", "--out", str(out), "--quick", "--corpus", TINY_CORPUS]) == 0

    second = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert (out / "transformer" / "metrics.jsonl").read_text(encoding="utf-8") == metrics_before
    for name, row in first["systems"].items():
        for metric in ("cer", "bleu", "chrf"):
            assert second["systems"][name][metric] == row[metric], (name, metric)

    # A full run into the folder of the quick one must not resume the quick runs.
    capsys.readouterr()
    assert main(["experiment", "folio", "--out", str(out), "--corpus", TINY_CORPUS]) == 2
    assert "made with other settings" in capsys.readouterr().err


# ---- minformer translate ----------------------------------------------------------------------------


def greedy_by_full_forward(model, tokenizer, text: str, max_new_tokens: int) -> str:
    """Greedy decoding written out: rerun the whole forward pass for each new token, stop at EOS."""
    source = torch.tensor([tokenizer.encode(text) + [tokenizer.eos_id]])
    target = [model.config.decoder_start_token_id]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(source, decoder_input_ids=torch.tensor([target])).logits[0, -1]
            top_two = logits.topk(2).values
            assert float(top_two[0] - top_two[1]) > 1e-4, "near-tie between the two best tokens"
            token = int(logits.argmax())
            if token == tokenizer.eos_id:
                break
            target.append(token)
    return tokenizer.decode(target[1:], skip_special_tokens=True)


@pytest.mark.parametrize("family", ["transformer", "t5"])
def test_translate_greedy_matches_full_forward_loop(seq2seq_runs, family, capsys, one_thread):
    run_dir = seq2seq_runs[family]
    model, tokenizer = load(run_dir)
    text = "The king and the queen."

    exit_code = main(["translate", str(run_dir), "  The king   and the queen. ", "--beams", "1", "--max-new-tokens", "30"])

    captured = capsys.readouterr()
    assert exit_code == 0, captured.err
    assert captured.out == greedy_by_full_forward(model, tokenizer, text, 30) + "\n"


def test_translate_beam_prints_one_line(seq2seq_runs, capsys, one_thread):
    exit_code = main(["translate", str(seq2seq_runs["transformer"]), "The king.", "--beams", "3"])

    captured = capsys.readouterr()
    assert exit_code == 0, captured.err
    assert captured.out.count("\n") == 1


def bert_config_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "bert"
    run_dir.mkdir()
    raw = load_run_config("bert-tiny", {"objective.kind": "masked_lm", "tokenizer.kind": "wordpiece"})
    resolve_run_config(raw, vocab_size=300).save(run_dir / "config.yaml")
    return run_dir


def span_corruption_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "t5-span"
    run_dir.mkdir()
    raw = load_run_config("t5-tiny", {"objective.kind": "span_corruption"})
    resolve_run_config(raw, vocab_size=300).save(run_dir / "config.yaml")
    return run_dir


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["", ], "The source text is empty"),
        (["   "], "The source text is empty"),
        (["the king " * 10], "accepts at most 47"),
        (["the king §"], "'§', which the run's tokenizer does not have"),
        (["the king", "--beams", "0"], "--beams=0 is invalid"),
        (["the king", "--beams", "-2"], "--beams=-2 is invalid"),
        (["the king", "--beams", "100000"], "--beams=100000 is larger than the model's vocabulary"),
        (["the king", "--max-new-tokens", "0"], "--max-new-tokens=0 is invalid"),
        (["the king", "--max-new-tokens", "49"], "exceeds the decoder's model.max_seq_len=48"),
        (["the king", "--length-penalty", "nan"], "--length-penalty=nan is invalid"),
        (["the king", "--length-penalty", "inf"], "--length-penalty=inf is invalid"),
    ],
)
def test_translate_rejects_bad_input(seq2seq_runs, arguments, message, capsys, one_thread):
    exit_code = main(["translate", str(seq2seq_runs["transformer"]), *arguments])

    assert exit_code == 2
    assert message in capsys.readouterr().err


def test_translate_rejects_runs_that_do_not_translate(trained_run, tmp_path, capsys):
    gpt_run, _ = trained_run
    cases = [
        (gpt_run, "contains a gpt model"),
        (bert_config_run(tmp_path), "contains a bert model"),
        (span_corruption_run(tmp_path), "objective.kind=span_corruption"),
        (tmp_path / "missing", "not found"),
    ]
    for run_dir, message in cases:
        assert main(["translate", str(run_dir), "the king"]) == 2
        assert message in capsys.readouterr().err, run_dir
