"""The bert-genre experiment at its --quick size, on a generated corpus whose documents are named after plays."""

from __future__ import annotations

import json
import random

import pytest

from minformer.data.corpus import CACHE_ENV, prepare_text
from minformer.experiments.bert_genre import run_bert_genre

# Two training plays per genre and the three held-out plays, each written in its genre's words.
PLAYS_BY_GENRE = {
    "comedy": ["tempest", "as_you_like_it", "twelfth_night"],
    "history": ["king_john", "henry_v", "richard_ii"],
    "tragedy": ["hamlet", "othello", "macbeth"],
}
WORDS = {
    "comedy": "love jest wedding fool song merry".split(),
    "history": "king crown war england battle lord".split(),
    "tragedy": "death blood ghost murder grave night".split(),
}


def test_quick_bert_genre_writes_results(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    rng = random.Random(0)
    sources = tmp_path / "plays"
    sources.mkdir()
    for genre, play_ids in PLAYS_BY_GENRE.items():
        for play_id in play_ids:
            lines = [" ".join(rng.choice(WORDS[genre]) for _ in range(8)) + "." for _ in range(80)]
            (sources / f"{play_id}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (sources / "pericles.txt").write_text("a play with no Folio genre.\n" * 50, encoding="utf-8")
    prepare_text([sources], "fake-plays", val_fraction=0.1)

    results = run_bert_genre(tmp_path / "out", corpus_name="fake-plays", quick=True)
    written = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))

    assert results["test_plays"] == ["macbeth", "richard_ii", "twelfth_night"]
    assert "pericles" not in results["train_plays"]
    assert len(results["train_plays"]) == 6
    assert results["test_genre_counts"] == {"comedy": 12, "history": 12, "tragedy": 12}
    assert results["accuracy"]["majority"] == 1 / 3
    for method in ("no_pretraining", "pretrained"):
        assert 0.0 <= results["accuracy"][method] <= 1.0
    assert written["accuracy"] == results["accuracy"]
    assert "masked-LM pretraining" in (tmp_path / "out" / "table.md").read_text(encoding="utf-8")

    # The pretraining is an ordinary bert-mini run: its held-out scores are those of `minformer eval`.
    pretraining = results["pretraining"]
    assert pretraining["steps"] == results["settings"]["pretrain_steps"]
    assert 0.0 <= pretraining["masked_accuracy"] <= 1.0
    assert pretraining["masked_tokens"] > 0
    assert (tmp_path / "out" / "pretrain" / "config.yaml").is_file()
    assert (tmp_path / "out" / "pretrain" / "tokenizer.json").is_file()

    # A second run reuses the finished pretraining instead of training again, and scores it the same.
    again = run_bert_genre(tmp_path / "out", corpus_name="fake-plays", quick=True)
    assert again["pretraining"]["masked_accuracy"] == pretraining["masked_accuracy"]
    assert again["pretraining"]["val_loss"] == pretraining["val_loss"]
    assert again["accuracy"] == results["accuracy"]


def test_rerun_with_other_settings_is_rejected(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    sources = tmp_path / "plays"
    sources.mkdir()
    rng = random.Random(1)
    for genre, play_ids in PLAYS_BY_GENRE.items():
        for play_id in play_ids:
            lines = [" ".join(rng.choice(WORDS[genre]) for _ in range(8)) + "." for _ in range(40)]
            (sources / f"{play_id}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare_text([sources], "fake-plays", val_fraction=0.1)
    prepare_text([sources], "other-plays", val_fraction=0.1)
    run_bert_genre(tmp_path / "out", corpus_name="fake-plays", quick=True)

    with pytest.raises(ValueError, match=r"data\.corpus is 'fake-plays' there, 'other-plays' here"):
        run_bert_genre(tmp_path / "out", corpus_name="other-plays", quick=True)
    with pytest.raises(ValueError, match=r"model\.max_seq_len is 32 there, 128 here"):
        run_bert_genre(tmp_path / "out", corpus_name="fake-plays", quick=False)
