"""Tests for minformer.data.folio and folio_align: the First Folio to modern spelling pairs.

The synthetic tests use short invented speeches whose correct alignment is known. The tests
that use the ``editions`` fixture read the prepared ``shakespeare`` and ``shakespeare-folio``
corpora from the user's cache, and skip when they are not prepared. They check the judged sample
in ``fixtures/folio_alignment_sample.json``, which stores offsets, the SHA-256 of each side and a
judgement, never the text.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from minformer.data import corpus, folio, folio_align
from minformer.data.corpus import HELD_OUT_PLAYS, PLAYS, CorpusError
from minformer.data.folio_align import fold_word, segment_text

FIXTURE = Path(__file__).parent / "fixtures" / "folio_alignment_sample.json"
# Precision measured by reading both sides of every pair of the fixture's sample.
MEASURED_PRECISION = 1.0
# Plays re-aligned to check that the current code still yields the judged pairs. They are the two
# shortest Folio texts, which keeps the test fast.
REALIGNED_PLAYS = ("comedy_of_errors", "midsummer_nights_dream")

# Invented speeches in Folio spelling and in modern spelling, line for line.
FOLIO_SPEECHES = [
    ("Gar.", "Good morrow Sir, I haue brought the Letters\nFrom our deere Cosen at the Northerne Court"),
    ("Reg.", "Vnfold the newes, and let vs heare it all"),
    ("Gar.", "The Riuer rose by night, and all the Fields\nLye vnder water to the Abbey wall"),
    ("Reg.", "Then send the Souldiers forth with Spades and Carts,\nAnd saue what Corne is left vpon the hill"),
    ("Gar.", "I will my Lord, before the Sunne be vp"),
    ("Reg.", "Goe then, and take my Signet for thy warrant,\nThat none shall stay thee on the Kings high way"),
]
MODERN_SPEECHES = [
    ("GARETH.", "Good morrow, sir; I have brought the letters\nFrom our dear cousin at the northern court."),
    ("REGAN.", "Unfold the news, and let us hear it all."),
    ("GARETH.", "The river rose by night, and all the fields\nLie under water to the abbey wall."),
    ("REGAN.", "Then send the soldiers forth with spades and carts,\nAnd save what corn is left upon the hill."),
    ("GARETH.", "I will, my lord, before the sun be up."),
    ("REGAN.", "Go then, and take my signet for thy warrant,\nThat none shall stay thee on the king's highway."),
]


def folio_document(speeches: list[tuple[str, str]]) -> str:
    """A Folio-style play text: each speech opens with an indented label."""
    return "Actus Primus. Scoena Prima.\n\n" + "".join(f"  {label} {text}\n\n" for label, text in speeches)


def modern_document(speeches: list[tuple[str, str]]) -> str:
    """A modern-style play text: each speech opens with its label alone on a line."""
    return "ACT I.\n\nSCENE I. A hall.\n\n" + "".join(f"{label}\n{text}\n\n" for label, text in speeches)


def aligned_content(folio_speeches, modern_speeches) -> list[tuple[int, ...]]:
    """Align two synthetic plays and return, for each group, the indices into FOLIO_SPEECHES and
    MODERN_SPEECHES of its speeches. A correct group pairs equal indices."""
    folio_parsed = folio.parse_folio(folio_document(folio_speeches))
    modern_parsed = folio.parse_modern(modern_document(modern_speeches))
    groups = folio_align.align_speeches(folio_parsed, modern_parsed)
    folio_ids = [FOLIO_SPEECHES.index(speech) for speech in folio_speeches]
    modern_ids = [MODERN_SPEECHES.index(speech) for speech in modern_speeches]
    return [(tuple(folio_ids[i] for i in group.folio), tuple(modern_ids[j] for j in group.modern))
            for group in groups]


def kept_pairs(folio_text: str, modern_text: str) -> list[tuple[str, str]]:
    alignment = folio.align_play("test", folio_text, modern_text)
    return [(pair["source"], pair["target"]) for pair in alignment.pairs]


# ---- the pairing table ---------------------------------------------------------------------


def test_pairing_table_has_the_35_folio_plays():
    assert len(folio.FOLIO_PAIRS) == 35
    assert set(folio.FOLIO_PAIRS) == set(PLAYS) - {"troilus_and_cressida", "pericles"}


def test_pairing_table_uses_each_editions_file_names():
    assert folio.FOLIO_PAIRS["comedy_of_errors"].folio_file == "comedy_of_errours_gut_f.txt"
    assert folio.FOLIO_PAIRS["comedy_of_errors"].modern_file == "comedy_of_errors_gut.txt"
    assert folio.FOLIO_PAIRS["twelfth_night"].folio_file == "twelfe-night_gut_f.txt"
    assert folio.FOLIO_PAIRS["king_lear"].modern_file == "lear_gut.txt"
    assert all(pair.folio_file.endswith("_gut_f.txt") for pair in folio.FOLIO_PAIRS.values())


def test_pairing_table_splits_by_play():
    val = {play for play, pair in folio.FOLIO_PAIRS.items() if pair.split == "val"}
    train = {play for play, pair in folio.FOLIO_PAIRS.items() if pair.split == "train"}
    assert val == set(HELD_OUT_PLAYS)
    assert not val & train
    assert len(train) == 32


# ---- spelling folding and parsing ----------------------------------------------------------


@pytest.mark.parametrize("folio_word, modern_word", [
    ("vnfold", "unfold"), ("selfe", "self"), ("Iustice", "justice"), ("haue", "have"),
    ("Sunne", "sun"), ("euery", "every"), ("&", "and"), ("Lye", "lie"),
])
def test_fold_word_merges_folio_and_modern_spelling(folio_word, modern_word):
    assert fold_word(folio_word) == fold_word(modern_word)


def test_fold_word_keeps_different_words_apart():
    assert fold_word("heart") != fold_word("hart")
    assert fold_word("lord") != fold_word("lady")


def test_parse_folio_reads_labels_headings_and_directions():
    text = ("Actus Primus. Scoena Prima.\n\nEnter two Watchmen.\n\n"
            "  1. Who goes there?\n   2.Out. A friend\n"
            "  Mac. Stay, and speake,\nEnter a Messenger.\nwhat newes?\n\n"
            "Scena Secunda.\n\nA Trumpet sounds.\n\n  Qui 'Tis done\n")
    speeches = folio.parse_folio(text)
    assert [speech.speaker for speech in speeches] == ["1", "2.Out", "Mac", "Qui"]
    words = [[text[token.start:token.end] for token in speech.tokens] for speech in speeches]
    assert words[0] == ["Who", "goes", "there?"]
    assert words[2] == ["Stay,", "and", "speake,", "what", "newes?"]
    # The unlabelled line after the heading belongs to no speech.
    assert words[3] == ["'Tis", "done"]


def test_parse_modern_reads_labels_brackets_and_headings():
    text = ("ACT I.\n\nSCENE I. A hall.\n\n[Enter KING and PAGE.]\n\n"
            "KING.\nCome hither, boy. [To PAGE.] What news?\n\n[Exit PAGE.]\n\nWho comes here?\n\n"
            "PAGE.  Sir, a letter.\n\nBer.\nNot I.\n\nBer.\nNor I.\n\n"
            "SCENE II. Another room.\n\nFarewell.\nThis opens no speech.\n")
    speeches = folio.parse_modern(text)
    assert [speech.speaker for speech in speeches][:4] == ["KING", "PAGE", "Ber", "Ber"]
    words = [[text[token.start:token.end] for token in speech.tokens] for speech in speeches]
    # The bracketed note is left out and the paragraph after the exit continues the speech.
    assert words[0] == ["Come", "hither,", "boy.", "What", "news?", "Who", "comes", "here?"]
    assert words[1] == ["Sir,", "a", "letter."]
    # "Farewell." occurs once, so it is text, not a label.
    assert speeches[4].speaker == ""
    assert words[4][0] == "Farewell."


# ---- speech alignment on synthetic plays ---------------------------------------------------


def test_speech_alignment_pairs_parallel_plays_one_to_one():
    groups = aligned_content(FOLIO_SPEECHES, MODERN_SPEECHES)
    assert groups == [((index,), (index,)) for index in range(6)]


def test_speech_alignment_skips_a_dropped_speech():
    modern = MODERN_SPEECHES[:2] + MODERN_SPEECHES[3:]
    groups = aligned_content(FOLIO_SPEECHES, modern)
    assert groups == [((index,), (index,)) for index in (0, 1, 3, 4, 5)]


def test_speech_alignment_joins_a_split_speech():
    # The Folio gives speeches 2 and 3 to one speaker; the modern edition splits them.
    joined = ("Gar.", FOLIO_SPEECHES[2][1] + "\n" + FOLIO_SPEECHES[3][1])
    folio_parsed = folio.parse_folio(folio_document(FOLIO_SPEECHES[:2] + [joined] + FOLIO_SPEECHES[4:]))
    modern_parsed = folio.parse_modern(modern_document(MODERN_SPEECHES))
    groups = folio_align.align_speeches(folio_parsed, modern_parsed)
    assert [(group.folio, group.modern) for group in groups] == [
        ((0,), (0,)), ((1,), (1,)), ((2,), (2, 3)), ((3,), (4,)), ((4,), (5,))]


def test_speech_alignment_never_pairs_a_reordered_pair_crosswise():
    modern = [MODERN_SPEECHES[index] for index in (0, 2, 1, 3, 4, 5)]
    groups = aligned_content(FOLIO_SPEECHES, modern)
    for folio_ids, modern_ids in groups:
        assert folio_ids == modern_ids
    aligned = {folio_ids[0] for folio_ids, _ in groups}
    # A monotone alignment keeps exactly one of the two swapped speeches.
    assert {0, 3, 4, 5} <= aligned
    assert len(aligned & {1, 2}) == 1


# ---- segments ------------------------------------------------------------------------------


def test_segments_follow_verse_lines():
    pairs = kept_pairs(folio_document(FOLIO_SPEECHES), modern_document(MODERN_SPEECHES))
    assert ("Good morrow Sir, I haue brought the Letters",
            "Good morrow, sir; I have brought the letters") in pairs
    assert ("Lye vnder water to the Abbey wall", "Lie under water to the abbey wall.") in pairs
    assert len(pairs) == 10


def test_segments_exclude_a_folio_stage_direction_line():
    # The modern edition prints the two verse lines as one, so only the direction forces a cut.
    folio_text = folio_document([("Gar.", "The Riuer rose by night, and all the Fields\n"
                                          "Enter a Messenger.\nLye vnder water to the Abbey wall")])
    modern_text = modern_document([("GARETH.", MODERN_SPEECHES[2][1].replace("\n", " "))])
    pairs = kept_pairs(folio_text, modern_text)
    assert pairs == [("The Riuer rose by night, and all the Fields",
                      "The river rose by night, and all the fields"),
                     ("Lye vnder water to the Abbey wall", "Lie under water to the abbey wall.")]


def test_one_sided_words_drop_segment():
    folio_text = folio_document([("Reg.", "Then send the Souldiers forth, Drums beate, with Spades and Carts")])
    modern_text = modern_document([("REGAN.", "Then send the soldiers forth with spades and carts.")])
    assert kept_pairs(folio_text, modern_text) == []


def test_segment_text_collapses_whitespace():
    assert segment_text("xx  a\n  b\tc yy", 2, 12) == "a b c"


# ---- prepare, load and the split -----------------------------------------------------------


@pytest.fixture
def synthetic_editions(tmp_path, monkeypatch):
    """Point the cache at an empty folder and give every paired play the synthetic texts."""
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(corpus, "prepare_shakespeare", lambda force=False: None)
    editions = {play: (folio_document(FOLIO_SPEECHES), modern_document(MODERN_SPEECHES))
                for play in folio.FOLIO_PAIRS}
    monkeypatch.setattr(folio, "load_editions", lambda: editions)
    monkeypatch.setattr(folio, "_source_hashes", lambda: {"synthetic": "0"})
    return tmp_path / "cache"


def test_load_pairs_names_the_command_before_prepare(synthetic_editions):
    with pytest.raises(CorpusError, match="minformer prepare folio"):
        folio.load_pairs("train")


def test_load_pairs_rejects_unknown_split(synthetic_editions):
    with pytest.raises(ValueError, match="'test'"):
        folio.load_pairs("test")


def test_prepare_folio_writes_splits_by_play(synthetic_editions):
    summary = folio.prepare_folio()
    train = folio.load_records("train")
    val = folio.load_records("val")
    assert {record["play"] for record in val} == set(HELD_OUT_PLAYS)
    assert not {record["play"] for record in train} & {record["play"] for record in val}
    assert summary["splits"]["val"]["pairs"] == len(val) == 3 * 10
    assert summary["splits"]["train"]["kept_speech_share"] == 1.0
    assert folio.load_pairs("val")[0] == (val[0]["source"], val[0]["target"])
    assert sorted(path.name for path in folio.pairs_dir().iterdir()) == [
        "summary.json", "train.jsonl", "val.jsonl"]


def test_prepare_folio_reuses_current_pairs(synthetic_editions, monkeypatch):
    folio.prepare_folio()

    def fail(*args):
        raise AssertionError("aligned again although the pairs are current")

    monkeypatch.setattr(folio, "align_play", fail)
    assert folio.prepare_folio()["splits"]["val"]["pairs"] == 30
    with pytest.raises(AssertionError, match="aligned again"):
        folio.prepare_folio(force=True)


def test_load_pairs_rejects_pairs_of_another_method(synthetic_editions):
    folio.prepare_folio()
    summary_path = folio.pairs_dir() / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["method_version"] = folio_align.METHOD_VERSION + 1
    summary_path.write_text(json.dumps(summary))
    with pytest.raises(CorpusError, match="--force"):
        folio.load_pairs("train")


def test_cli_prepare_folio_prints_counts(synthetic_editions, capsys):
    from minformer.cli import main

    assert main(["prepare", "folio"]) == 0
    output = capsys.readouterr().out
    assert "train: 320 pairs from 32 plays" in output
    assert "val: 30 pairs from 3 plays" in output
    assert "18 of 18 Folio speeches kept (100.0%)" in output


# ---- the real corpus and the judged sample -------------------------------------------------


@pytest.fixture(scope="module")
def editions() -> dict[str, tuple[str, str]]:
    try:
        return folio.load_editions()
    except CorpusError as error:
        pytest.skip(f"the Shakespeare corpora are not prepared: {error}")


@pytest.fixture(scope="module")
def judged_sample() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_sample_fixture_stores_no_text(judged_sample):
    fields = {"play", "folio_start", "folio_end", "modern_start", "modern_end", "folio_sha256",
              "modern_sha256", "correct"}
    assert set(judged_sample) == {"method_version", "seed", "items"}
    assert all(set(item) == fields for item in judged_sample["items"])


def test_sample_precision_is_at_least_measured(judged_sample):
    items = judged_sample["items"]
    assert len(items) >= 100
    assert judged_sample["method_version"] == folio_align.METHOD_VERSION
    precision = sum(item["correct"] for item in items) / len(items)
    assert precision >= MEASURED_PRECISION


def test_sample_spans_many_plays(judged_sample):
    assert len({item["play"] for item in judged_sample["items"]}) >= 30


def test_sample_hashes_match_corpus_text(editions, judged_sample):
    for item in judged_sample["items"]:
        folio_text, modern_text = editions[item["play"]]
        source = segment_text(folio_text, item["folio_start"], item["folio_end"])
        target = segment_text(modern_text, item["modern_start"], item["modern_end"])
        assert sha256(source) == item["folio_sha256"], item
        assert sha256(target) == item["modern_sha256"], item


def test_current_alignment_yields_judged_pairs(editions, judged_sample):
    for play in REALIGNED_PLAYS:
        alignment = folio.align_play(play, *editions[play])
        offsets = {(pair["folio_start"], pair["folio_end"], pair["modern_start"], pair["modern_end"])
                   for pair in alignment.pairs}
        judged = [item for item in judged_sample["items"] if item["play"] == play]
        assert judged
        for item in judged:
            key = (item["folio_start"], item["folio_end"], item["modern_start"], item["modern_end"])
            assert key in offsets, item


@pytest.fixture(scope="module")
def prepared_records(editions) -> dict[str, list[dict]]:
    try:
        return {split: folio.load_records(split) for split in ("train", "val")}
    except CorpusError as error:
        pytest.skip(f"the Folio pairs are not prepared or are stale ({error})")


def test_sample_is_the_seeded_draw_of_prepared_pairs(prepared_records, judged_sample):
    population = prepared_records["train"] + prepared_records["val"]
    drawn = random.Random(judged_sample["seed"]).sample(population, len(judged_sample["items"]))
    for record, item in zip(drawn, judged_sample["items"]):
        assert record["play"] == item["play"]
        assert (record["folio_start"], record["modern_start"]) == (item["folio_start"],
                                                                    item["modern_start"])
        assert sha256(record["source"]) == item["folio_sha256"]
        assert sha256(record["target"]) == item["modern_sha256"]


def test_prepared_pairs_are_split_by_play(prepared_records):
    train_plays = {record["play"] for record in prepared_records["train"]}
    val_plays = {record["play"] for record in prepared_records["val"]}
    assert val_plays == set(HELD_OUT_PLAYS)
    assert not train_plays & val_plays
    assert len(train_plays) == 32
