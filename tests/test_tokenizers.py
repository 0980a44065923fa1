"""Tests for minformer.data.tokenizers: round trips, errors, files on disk and GPT-2 parity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minformer.data.tokenizers import (
    EOS_TOKEN,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    load_tokenizer,
)

HYPOTHESIS = settings(deadline=None, derandomize=bool(os.environ.get("CI")), max_examples=200)

CHAR_ALPHABET = "\n !',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyzéïü—"
BPE_TRAINING_TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n",
    "It's 12 o'clock; naïve café, Zürich — 東京 and 😀 too.\n",
] * 20


@pytest.fixture(scope="module")
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer(CHAR_ALPHABET)


@pytest.fixture(scope="module")
def bpe_tokenizer() -> BPETokenizer:
    return BPETokenizer.train(BPE_TRAINING_TEXTS, vocab_size=320)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """Write a GPT-2 layout: 256 byte symbols, learned merges, then <|endoftext|> as the last id."""
    trained = BPETokenizer.train(BPE_TRAINING_TEXTS, vocab_size=300, special_tokens=())
    directory = tmp_path_factory.mktemp("gpt2")
    trained.tokenizer.model.save(str(directory))

    vocab_path = directory / "vocab.json"
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    vocab[EOS_TOKEN] = len(vocab)
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return directory


# --- character tokenizer ---------------------------------------------------------------------


@HYPOTHESIS
@given(text=st.text(alphabet=CHAR_ALPHABET))
def test_char_round_trip(char_tokenizer, text):
    ids = char_tokenizer.encode(text)

    assert len(ids) == len(text)
    assert all(0 <= token_id < char_tokenizer.vocab_size for token_id in ids)
    assert char_tokenizer.decode(ids) == text


def test_char_ids_follow_sorted_alphabet():
    tokenizer = CharTokenizer.from_text("hello world")

    assert tokenizer.vocab == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tokenizer.vocab_size == 8
    assert tokenizer.eos_id is None
    assert tokenizer.encode("hello") == [3, 2, 4, 4, 5]


def test_char_encode_array_matches_encode(char_tokenizer):
    text = "Speak, speak.\né"
    array = char_tokenizer.encode_array(text)

    assert array.dtype == np.int64
    assert array.shape == (len(text),)
    assert array.tolist() == char_tokenizer.encode(text)


@pytest.mark.parametrize(
    ("text", "char", "offset"),
    [
        ("abc😀d", "'😀' (U+1F600)", 3),
        ("~", "'~' (U+007E)", 0),
        ("Speak\t", "'\\t' (U+0009)", 5),
        ("ab\ud800", "'\\ud800' (U+D800)", 2),
    ],
)
def test_char_unknown_char_message(char_tokenizer, text, char, offset):
    with pytest.raises(ValueError) as error:
        char_tokenizer.encode(text)

    assert char in str(error.value)
    assert f"offset {offset}" in str(error.value)


def test_char_unknown_reports_first_offset(char_tokenizer):
    with pytest.raises(ValueError, match=r"'~' \(U\+007E\) at offset 2"):
        char_tokenizer.encode("ab~c@")


@pytest.mark.parametrize(
    ("bad_ids", "message"),
    [
        ([0, 1, 200], "Token id 200 at position 2"),
        ([-1], "Token id -1 at position 0"),
        (np.array([3, 999]), "Token id 999 at position 1"),
    ],
)
def test_char_decode_rejects_out_of_range_id(char_tokenizer, bad_ids, message):
    with pytest.raises(ValueError, match=message):
        char_tokenizer.decode(bad_ids)


def test_char_decode_accepts_arrays_tensors_and_empty(char_tokenizer):
    ids = char_tokenizer.encode("Speak.")

    assert char_tokenizer.decode(np.array(ids)) == "Speak."
    assert char_tokenizer.decode(torch.tensor(ids)) == "Speak."
    assert char_tokenizer.decode([]) == ""


def test_char_decode_rejects_float_ids(char_tokenizer):
    with pytest.raises(ValueError, match="integer token ids"):
        char_tokenizer.decode([1.0, 2.0])


@pytest.mark.parametrize("chars", ["", ["ab"], ["\ud800"]])
def test_char_rejects_invalid_alphabet(chars):
    with pytest.raises(ValueError, match="CharTokenizer"):
        CharTokenizer(chars)


def test_char_encode_array_matches_encode_on_large_text():
    text = ("The quick brown fox jumps over the lazy dog.\n\t0123456789 \u00e9\u4e2d\n" * 20_000)
    tokenizer = CharTokenizer.from_text(text)

    ids = tokenizer.encode_array(text)

    assert ids.shape == (len(text),)
    assert ids.tolist() == tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


# --- byte-level BPE --------------------------------------------------------------------------


@HYPOTHESIS
@given(text=st.text())
def test_bpe_round_trip_any_text(bpe_tokenizer, text):
    ids = bpe_tokenizer.encode(text)

    assert all(0 <= token_id < bpe_tokenizer.vocab_size for token_id in ids)
    assert bpe_tokenizer.decode(ids) == text


@pytest.mark.parametrize(
    "text",
    ["", "😀👩‍👩‍👧", "東京と大阪", "e\u0301 a\u0308", "\x00\x01\x7f\r\n\t", "  two  spaces ", f"a{EOS_TOKEN}b"],
)
def test_bpe_round_trip_hard_cases(bpe_tokenizer, text):
    assert bpe_tokenizer.decode(bpe_tokenizer.encode(text)) == text


def test_bpe_vocab_and_eos(bpe_tokenizer):
    assert bpe_tokenizer.vocab_size == 320
    assert bpe_tokenizer.eos_id == bpe_tokenizer.tokenizer.token_to_id(EOS_TOKEN)
    assert bpe_tokenizer.encode(EOS_TOKEN) == [bpe_tokenizer.eos_id]


def test_bpe_merges_shorten_training_text(bpe_tokenizer):
    text = "First Citizen:\nBefore we proceed any further, hear me speak."

    assert len(bpe_tokenizer.encode(text)) < len(text.encode("utf-8")) // 2


def test_bpe_without_special_tokens_has_no_eos():
    tokenizer = BPETokenizer.train(BPE_TRAINING_TEXTS, vocab_size=280, special_tokens=())

    assert tokenizer.eos_id is None


def test_bpe_rejects_vocab_smaller_than_bytes():
    with pytest.raises(ValueError, match="at least 257"):
        BPETokenizer.train(BPE_TRAINING_TEXTS, vocab_size=100)


def test_bpe_decode_rejects_out_of_range_id(bpe_tokenizer):
    with pytest.raises(ValueError, match="Token id 320 at position 1"):
        bpe_tokenizer.decode([5, 320])


def test_bpe_lone_surrogate_raises_value_error(bpe_tokenizer):
    with pytest.raises(ValueError, match=r"U\+DC80\) at offset 1"):
        bpe_tokenizer.encode("a\udc80")


# --- files on disk ---------------------------------------------------------------------------

SAMPLE_TEXT = "First Citizen:\nSpeak, speak. Zürich — naïve café.\n"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_gives_identical_ids(kind, char_tokenizer, bpe_tokenizer, tmp_path):
    tokenizer = char_tokenizer if kind == "char" else bpe_tokenizer

    written = tokenizer.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(written)

    assert type(loaded) is type(tokenizer)
    assert isinstance(loaded, Tokenizer)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.eos_id == tokenizer.eos_id
    assert loaded.encode(SAMPLE_TEXT) == tokenizer.encode(SAMPLE_TEXT)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_load_from_directory(kind, char_tokenizer, bpe_tokenizer, tmp_path):
    tokenizer = char_tokenizer if kind == "char" else bpe_tokenizer

    written = tokenizer.save(tmp_path)
    loaded = load_tokenizer(tmp_path)

    assert written == tmp_path / "tokenizer.json"
    assert loaded.encode(SAMPLE_TEXT) == tokenizer.encode(SAMPLE_TEXT)


def test_char_file_format(char_tokenizer, tmp_path):
    payload = json.loads(char_tokenizer.save(tmp_path).read_text(encoding="utf-8"))

    assert payload == {"type": "char", "version": 1, "vocab": sorted(CHAR_ALPHABET)}


def test_load_prefers_tokenizer_json(gpt2_dir, char_tokenizer, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((gpt2_dir / name).read_bytes())
    char_tokenizer.save(tmp_path)

    assert isinstance(load_tokenizer(tmp_path), CharTokenizer)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2, 3]", "does not contain a JSON object"),
        ('{"type": "wordpiece"}', "not a known tokenizer \\(type 'wordpiece'\\)"),
        ('{"model": {"type": "Unigram"}}', "not a known tokenizer \\(type 'Unigram'\\)"),
        ('{"type": "char", "version": 2, "vocab": ["a"]}', "Unsupported char tokenizer version 2"),
        ('{"type": "char", "version": 1, "vocab": "ab"}', "'vocab' must be a list"),
        ('{"type": "char", "version": 1, "vocab": ["b", "a"]}', "code-point order"),
        ('{"type": "char", "version": 1, "vocab": []}', "empty alphabet"),
        ('{"model": {"type": "BPE", "vocab": 3}}', "Invalid BPE tokenizer.json"),
    ],
)
def test_load_rejects_corrupt_or_unknown_file(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(content, encoding="utf-8")

    with pytest.raises(ValueError, match=message):
        load_tokenizer(path)


def test_load_missing_file_or_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="expected tokenizer.json, or vocab.json with merges.txt"):
        load_tokenizer(tmp_path)


def test_load_corrupt_gpt2_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{broken", encoding="utf-8")
    (tmp_path / "merges.txt").write_text("", encoding="utf-8")

    with pytest.raises(ValueError, match="Invalid GPT-2 vocab.json / merges.txt"):
        load_tokenizer(tmp_path)


# --- GPT-2 vocab.json + merges.txt against transformers ---------------------------------------


@pytest.fixture(scope="module")
def gpt2_reference(gpt2_dir):
    transformers = pytest.importorskip("transformers", reason="transformers is needed for the GPT-2 reference")
    # Given a local directory, from_pretrained reads vocab.json and merges.txt from it and downloads nothing.
    return transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_dir))


@pytest.fixture(scope="module")
def gpt2_tokenizer(gpt2_dir) -> BPETokenizer:
    return load_tokenizer(gpt2_dir)


@pytest.mark.parametrize(
    "text",
    [
        "First Citizen:\nBefore we proceed any further, hear me speak.",
        " leading space and  double  spaces\n\n",
        "It's 12 o'clock; they've 345 dogs'",
        "naïve café 東京 😀",
        f"one{EOS_TOKEN}two",
        "",
    ],
)
def test_gpt2_files_match_transformers(gpt2_tokenizer, gpt2_reference, text):
    assert gpt2_tokenizer.encode(text) == gpt2_reference.encode(text)


@settings(deadline=None, derandomize=bool(os.environ.get("CI")), max_examples=100)
@given(text=st.text())
def test_gpt2_files_match_transformers_any_text(gpt2_tokenizer, gpt2_reference, text):
    assert gpt2_tokenizer.encode(text) == gpt2_reference.encode(text)


def test_gpt2_eos_is_last_id(gpt2_tokenizer, gpt2_reference):
    assert isinstance(gpt2_tokenizer, BPETokenizer)
    assert gpt2_tokenizer.eos_id == gpt2_tokenizer.vocab_size - 1
    assert gpt2_tokenizer.eos_id == gpt2_reference.eos_token_id
