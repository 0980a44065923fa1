"""Tokenizers: character-level, byte-level BPE and WordPiece, behind one small interface.

``CharTokenizer`` maps each character of a fixed alphabet to its index in the sorted alphabet.
``BPETokenizer`` is byte-level byte-pair encoding (Sennrich et al., 2016, as used by GPT-2,
Radford et al., 2019), built on the Hugging Face ``tokenizers`` library. It splits text into UTF-8
bytes first, so every string can be encoded and decoded back exactly.

A tokenizer is stored as one ``tokenizer.json``. ``load_tokenizer`` reads that file (or a
directory containing it, or a GPT-2 directory with ``vocab.json`` and ``merges.txt``) and returns
the matching class. The character format is::

    {"type": "char", "version": 1, "vocab": ["\\n", " ", "!", ...]}

where ``vocab`` lists the characters in code-point order and a character's id is its index.
The BPE format is the ``tokenizers`` library's own ``tokenizer.json``.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np

# This module is itself named ``tokenizers``, but Python 3 imports are absolute, so this line
# imports the third-party package and not this file.
import tokenizers as hf_tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

TOKENIZER_FILE = "tokenizer.json"
CHAR_FORMAT_VERSION = 1
EOS_TOKEN = "<|endoftext|>"
N_BYTES = 256
PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
BERT_SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN)


class Tokenizer(abc.ABC):
    """Interface shared by every tokenizer: text to ids, ids to text, and one file on disk."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included, so valid ids are ``0 .. vocab_size - 1``."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int | None:
        """Id of the end-of-text token, or ``None`` when the vocabulary has none."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Convert ``text`` to token ids."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Convert token ids back to text, raising ``ValueError`` on an id outside the vocabulary."""

    @abc.abstractmethod
    def to_json(self) -> str:
        """Serialize the tokenizer to the text of its ``tokenizer.json``."""

    def encode_array(self, text: str) -> np.ndarray:
        """Encode ``text`` into a 1-D ``int64`` array of shape ``(n_tokens,)``."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` at ``path`` (or inside it, if it is a directory) and return the file path."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path


def ids_to_array(ids: Iterable[int], vocab_size: int) -> np.ndarray:
    """Convert a list, array or tensor of ids to a 1-D ``int64`` array, checking each is in range."""
    if not isinstance(ids, np.ndarray):
        # tolist() also covers torch tensors on any device without importing torch here.
        ids = np.asarray(ids.tolist() if hasattr(ids, "tolist") else list(ids))
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"Expected a 1-D sequence of token ids, got an array of shape {tuple(ids.shape)}.")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"Expected integer token ids, got dtype {ids.dtype}.")

    out_of_range = (ids < 0) | (ids >= vocab_size)
    if out_of_range.any():
        position = int(np.argmax(out_of_range))
        raise ValueError(
            f"Token id {int(ids[position])} at position {position} is out of range; "
            f"this tokenizer has vocab_size={vocab_size}, so valid ids are 0..{vocab_size - 1}."
        )
    return ids.astype(np.int64, copy=False)


def describe_char(char: str) -> str:
    """Return ``char`` as its repr and code point, e.g. ``'é' (U+00E9)``."""
    return f"{char!r} (U+{ord(char):04X})"


class CharTokenizer(Tokenizer):
    """Character-level tokenizer whose ids are the positions of the characters in the sorted alphabet.

    Encoding works on code points with NumPy: the text becomes an array of UTF-32 code points and
    ``np.searchsorted`` finds each one in the sorted alphabet, so megabytes encode in milliseconds.
    """

    def __init__(self, chars: Iterable[str]):
        """Build the vocabulary from ``chars``: a string or an iterable of single characters, in any order."""
        alphabet = set(chars)
        if not alphabet:
            raise ValueError("CharTokenizer needs at least one character; got an empty alphabet.")
        for char in alphabet:
            if not isinstance(char, str) or len(char) != 1:
                raise ValueError(f"CharTokenizer alphabet entries must be single characters, got {char!r}.")
            if 0xD800 <= ord(char) <= 0xDFFF:
                # A lone surrogate is not a Unicode scalar value and cannot be written to a UTF-8 file.
                raise ValueError(f"CharTokenizer alphabet contains the lone surrogate {describe_char(char)}.")

        vocab = sorted(alphabet)
        self.vocab: list[str] = vocab
        self.char_to_id = {char: index for index, char in enumerate(vocab)}
        self.code_points = np.array([ord(char) for char in vocab], dtype=np.uint32)  # (vocab_size,), sorted

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Build a tokenizer whose alphabet is the set of characters in ``text``."""
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def eos_id(self) -> None:
        return None

    def encode(self, text: str) -> list[int]:
        """Convert each character of ``text`` to its id, raising ``ValueError`` on a character outside the alphabet."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Encode ``text`` into a 1-D ``int64`` array of shape ``(len(text),)``."""
        # surrogatepass keeps lone surrogates as code points, so they reach the unknown-character error.
        text_code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")  # (len(text),)
        ids = np.searchsorted(self.code_points, text_code_points)  # (len(text),)

        found_code_points = self.code_points[np.minimum(ids, self.vocab_size - 1)]
        unknown = found_code_points != text_code_points
        if unknown.any():
            offset = int(np.argmax(unknown))
            raise ValueError(
                f"Character {describe_char(text[offset])} at offset {offset} is not in the tokenizer's "
                f"alphabet of {self.vocab_size} characters. Build the tokenizer from text that contains it, "
                "e.g. CharTokenizer.from_text(whole_corpus)."
            )
        return ids.astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids_to_array(ids, self.vocab_size)
        return self.code_points[ids].astype("<u4").tobytes().decode("utf-32-le")

    def to_json(self) -> str:
        payload = {"type": "char", "version": CHAR_FORMAT_VERSION, "vocab": self.vocab}
        return json.dumps(payload, ensure_ascii=False, indent=1) + "\n"

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> CharTokenizer:
        """Rebuild a tokenizer from the parsed ``tokenizer.json`` written by ``save``."""
        version = payload.get("version")
        if version != CHAR_FORMAT_VERSION:
            raise ValueError(
                f"Unsupported char tokenizer version {version!r}: expected version {CHAR_FORMAT_VERSION}."
            )

        vocab = payload.get("vocab")
        if not isinstance(vocab, list) or not all(isinstance(char, str) and len(char) == 1 for char in vocab):
            raise ValueError("Invalid char tokenizer: 'vocab' must be a list of single-character strings.")
        if vocab != sorted(set(vocab)):
            # Ids are positions in the sorted alphabet, so a reordered list would silently change them.
            raise ValueError("Invalid char tokenizer: 'vocab' must list distinct characters in code-point order.")
        return cls(vocab)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class Seq2SeqCharTokenizer(Tokenizer):
    """Character-level tokenizer with the special tokens of encoder-decoder training placed before the characters.

    Ids: ``<pad>`` = 0 (also T5's decoder start token), ``</s>`` = 1 (end of sequence), then the
    span-corruption sentinels ``<extra_id_0>``, ``<extra_id_1>``, ... (T5's names), then the sorted
    alphabet. Text is encoded character by character, and a special token is never read from text.
    So a text that spells out ``</s>`` encodes to those four characters.
    """

    PAD_TOKEN = "<pad>"
    EOS_TOKEN = "</s>"
    DEFAULT_SENTINELS = 100  # as many as T5's released vocabulary has

    def __init__(self, chars: Iterable[str], n_sentinels: int = DEFAULT_SENTINELS):
        if isinstance(n_sentinels, bool) or not isinstance(n_sentinels, int) or n_sentinels < 0:
            raise ValueError(f"n_sentinels={n_sentinels!r} is invalid; expected a non-negative integer.")
        self.chars = CharTokenizer(chars)
        self.special_tokens = [self.PAD_TOKEN, self.EOS_TOKEN] + [f"<extra_id_{index}>" for index in range(n_sentinels)]
        self.n_special = len(self.special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.n_special + self.chars.vocab_size

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ..., in that order."""
        return list(range(2, self.n_special))

    @property
    def special_ids(self) -> list[int]:
        return list(range(self.n_special))

    def encode(self, text: str) -> list[int]:
        """Convert each character of ``text`` to its id, raising ``ValueError`` on a character outside the alphabet."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        return self.chars.encode_array(text) + self.n_special

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Convert ids back to text; special tokens appear by name, or not at all with ``skip_special_tokens``."""
        ids = ids_to_array(ids, self.vocab_size)
        pieces = []
        for id_ in ids.tolist():
            if id_ >= self.n_special:
                pieces.append(self.chars.vocab[id_ - self.n_special])
            elif not skip_special_tokens:
                pieces.append(self.special_tokens[id_])
        return "".join(pieces)

    def to_json(self) -> str:
        payload = {
            "type": "char_seq2seq",
            "version": CHAR_FORMAT_VERSION,
            "n_sentinels": self.n_special - 2,
            "vocab": self.chars.vocab,
        }
        return json.dumps(payload, ensure_ascii=False, indent=1) + "\n"

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Seq2SeqCharTokenizer:
        """Rebuild a tokenizer from the parsed ``tokenizer.json`` written by ``save``."""
        alphabet = CharTokenizer.from_dict({**payload, "type": "char"})
        n_sentinels = payload.get("n_sentinels")
        if isinstance(n_sentinels, bool) or not isinstance(n_sentinels, int) or n_sentinels < 0:
            raise ValueError(f"Invalid char_seq2seq tokenizer: 'n_sentinels' must be a non-negative integer, got {n_sentinels!r}.")
        return cls(alphabet.vocab, n_sentinels)

    def __repr__(self) -> str:
        return f"Seq2SeqCharTokenizer(vocab_size={self.vocab_size}, n_sentinels={self.n_special - 2})"


class BPETokenizer(Tokenizer):
    """Byte-level BPE tokenizer wrapping a ``tokenizers.Tokenizer``.

    Text is mapped to UTF-8 bytes, each byte to one of 256 printable symbols (the GPT-2 byte
    alphabet), and merges are learned over those symbols. Every byte is in the base vocabulary,
    so no text is ever unknown and ``decode(encode(text)) == text`` for any valid Unicode string.
    """

    def __init__(self, tokenizer: hf_tokenizers.Tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Iterable[str] = (EOS_TOKEN,),
        min_frequency: int = 2,
    ) -> BPETokenizer:
        """Learn merges from ``texts`` until the vocabulary (256 bytes + special tokens + merges) has ``vocab_size`` entries.

        The vocabulary can end up smaller when the texts run out of pairs seen ``min_frequency`` times.
        """
        special_tokens = list(special_tokens)
        min_vocab_size = N_BYTES + len(special_tokens)
        if vocab_size < min_vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size} is too small for byte-level BPE: it needs at least {min_vocab_size} "
                f"({N_BYTES} bytes + {len(special_tokens)} special tokens)."
            )

        tokenizer = hf_tokenizers.Tokenizer(models.BPE())
        configure_byte_level(tokenizer)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @classmethod
    def from_gpt2_files(cls, vocab_path: str | Path, merges_path: str | Path) -> BPETokenizer:
        """Load a GPT-2 style ``vocab.json`` and ``merges.txt`` with GPT-2's byte-level settings.

        ``<|endoftext|>`` becomes a special token when the vocabulary contains it, as in
        ``transformers.GPT2TokenizerFast``, so it is matched whole in the input text.
        """
        model = models.BPE.from_file(str(vocab_path), str(merges_path))
        tokenizer = hf_tokenizers.Tokenizer(model)
        configure_byte_level(tokenizer)
        if tokenizer.token_to_id(EOS_TOKEN) is not None:
            tokenizer.add_special_tokens([EOS_TOKEN])
        return cls(tokenizer)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        """Rebuild a tokenizer from the text of a ``tokenizers``-format ``tokenizer.json``."""
        try:
            tokenizer = hf_tokenizers.Tokenizer.from_str(text)
        except Exception as error:  # the library raises a bare Exception for malformed files
            raise ValueError(f"Invalid BPE tokenizer.json: {error}") from error
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.token_to_id(EOS_TOKEN)

    def encode(self, text: str) -> list[int]:
        """Convert ``text`` to ids, turning each ``<|endoftext|>`` inside the text into the single ``eos_id``."""
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        except TypeError:
            raise_on_lone_surrogate(text)
            raise

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids_to_array(ids, self.vocab_size)
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.tokenizer.to_str(pretty=True) + "\n"

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class WordPieceTokenizer(Tokenizer):
    """BERT's WordPiece tokenizer (Wu et al. 2016; Devlin et al. 2019) wrapping a ``tokenizers.Tokenizer``.

    Text is cleaned and (by default) lowercased by ``BertNormalizer``, split on whitespace and
    punctuation by ``BertPreTokenizer``, and each word is split greedily into the longest
    vocabulary pieces, continuation pieces carrying the ``##`` prefix. A word with no split
    becomes ``[UNK]``. ``encode`` wraps the ids as ``[CLS] ... [SEP]``.
    """

    def __init__(self, tokenizer: hf_tokenizers.Tokenizer):
        missing = [token for token in BERT_SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
        if missing:
            raise ValueError(f"WordPiece vocabulary lacks the BERT special tokens {missing}.")
        # A tokenizer.json may fix truncation and padding lengths; encode returns whole, unpadded texts.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, lowercase: bool = True, min_frequency: int = 2) -> WordPieceTokenizer:
        """Learn a WordPiece vocabulary of at most ``vocab_size`` entries, special tokens included, from ``texts``.

        The special tokens get the first ids in the order of ``BERT_SPECIAL_TOKENS``, so ``[PAD]`` is 0.
        """
        if vocab_size < len(BERT_SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size={vocab_size} is too small for WordPiece: the special tokens alone take {len(BERT_SPECIAL_TOKENS)}.")
        tokenizer = hf_tokenizers.Tokenizer(models.WordPiece(unk_token=UNK_TOKEN))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(BERT_SPECIAL_TOKENS), show_progress=False
        )
        tokenizer.train_from_iterator(texts, trainer)
        configure_bert_special_tokens(tokenizer)
        return cls(tokenizer)

    @classmethod
    def from_vocab_file(cls, vocab_path: str | Path, lowercase: bool = True) -> WordPieceTokenizer:
        """Load a BERT ``vocab.txt`` (one piece per line, id = line number) with BERT's normalizer and pre-tokenizer."""
        tokenizer = hf_tokenizers.Tokenizer(models.WordPiece.from_file(str(vocab_path), unk_token=UNK_TOKEN))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.add_special_tokens(list(BERT_SPECIAL_TOKENS))
        configure_bert_special_tokens(tokenizer)
        return cls(tokenizer)

    @classmethod
    def from_json(cls, text: str) -> WordPieceTokenizer:
        """Rebuild a tokenizer from the text of a ``tokenizers``-format ``tokenizer.json`` with a WordPiece model."""
        try:
            tokenizer = hf_tokenizers.Tokenizer.from_str(text)
        except Exception as error:  # the library raises a bare Exception for malformed files
            raise ValueError(f"Invalid WordPiece tokenizer.json: {error}") from error
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        """Id of ``[SEP]``, which ends every encoded sequence."""
        return self.sep_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.token_to_id(PAD_TOKEN)

    @property
    def unk_id(self) -> int:
        return self.tokenizer.token_to_id(UNK_TOKEN)

    @property
    def cls_id(self) -> int:
        return self.tokenizer.token_to_id(CLS_TOKEN)

    @property
    def sep_id(self) -> int:
        return self.tokenizer.token_to_id(SEP_TOKEN)

    @property
    def mask_id(self) -> int:
        return self.tokenizer.token_to_id(MASK_TOKEN)

    @property
    def special_ids(self) -> list[int]:
        """Ids of every BERT special token, sorted."""
        return sorted(self.tokenizer.token_to_id(token) for token in BERT_SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        """Convert ``text`` to ``[CLS]`` + WordPiece ids + ``[SEP]``."""
        return self.encode_pieces(text, add_special_tokens=True)

    def encode_pieces(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Convert ``text`` to WordPiece ids, without ``[CLS]`` and ``[SEP]`` unless ``add_special_tokens``."""
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            raise_on_lone_surrogate(text)
            raise

    def decode(self, ids: Iterable[int]) -> str:
        """Join pieces back into words; lowercasing and accent stripping are not undone."""
        ids = ids_to_array(ids, self.vocab_size)
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.tokenizer.to_str(pretty=True) + "\n"

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size})"


def configure_bert_special_tokens(tokenizer: hf_tokenizers.Tokenizer) -> None:
    """Set BERT's ``[CLS] A [SEP] (B [SEP])`` post-processor and the WordPiece decoder on ``tokenizer``."""
    cls_id, sep_id = tokenizer.token_to_id(CLS_TOKEN), tokenizer.token_to_id(SEP_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS_TOKEN} $A {SEP_TOKEN}",
        pair=f"{CLS_TOKEN} $A {SEP_TOKEN} $B:1 {SEP_TOKEN}:1",
        special_tokens=[(CLS_TOKEN, cls_id), (SEP_TOKEN, sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")


def configure_byte_level(tokenizer: hf_tokenizers.Tokenizer) -> None:
    """Set GPT-2's byte-level pre-tokenizer, decoder and post-processor on ``tokenizer``."""
    # add_prefix_space=False: GPT-2 does not insert a space before the first word, and inserting
    # one would break decode(encode(text)) == text.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)


def raise_on_lone_surrogate(text: str) -> None:
    """Raise ``ValueError`` naming the first lone surrogate in ``text``, which UTF-8 cannot encode."""
    if not isinstance(text, str):
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"Character {describe_char(text[error.start])} at offset {error.start} is a lone surrogate, "
            "which is not valid Unicode and has no UTF-8 bytes to tokenize."
        ) from error


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json``, a directory containing one, or a GPT-2 directory.

    A GPT-2 directory has ``vocab.json`` and ``merges.txt``, which are read only when the directory
    has no ``tokenizer.json``. Raises ``FileNotFoundError`` when nothing loadable is there and
    ``ValueError`` when the file is not a tokenizer this module can read.
    """
    path = Path(path)
    if path.is_dir():
        return load_tokenizer_dir(path)
    if not path.exists():
        raise FileNotFoundError(f"Tokenizer file {path} does not exist.")

    text = path.read_text(encoding="utf-8")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}), so it cannot be a tokenizer.json.") from error
    if not isinstance(payload, dict):
        raise ValueError(f"{path} does not contain a JSON object, so it cannot be a tokenizer.json.")

    if payload.get("type") == "char":
        return CharTokenizer.from_dict(payload)
    if payload.get("type") == "char_seq2seq":
        return Seq2SeqCharTokenizer.from_dict(payload)
    model = payload.get("model")
    if isinstance(model, dict) and model.get("type") == "BPE":
        return BPETokenizer.from_json(text)
    if isinstance(model, dict) and model.get("type") == "WordPiece":
        return WordPieceTokenizer.from_json(text)

    kind = payload.get("type", model.get("type") if isinstance(model, dict) else None)
    raise ValueError(
        f"{path} is not a known tokenizer (type {kind!r}). Expected a minformer char tokenizer "
        '({"type": "char", ...}) or a tokenizers-library file whose model type is "BPE" or "WordPiece".'
    )


def load_tokenizer_dir(directory: Path) -> Tokenizer:
    """Load ``directory/tokenizer.json``, or else GPT-2's ``vocab.json`` and ``merges.txt``, or else BERT's ``vocab.txt``."""
    tokenizer_path = directory / TOKENIZER_FILE
    if tokenizer_path.exists():
        return load_tokenizer(tokenizer_path)

    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    if vocab_path.exists() and merges_path.exists():
        try:
            return BPETokenizer.from_gpt2_files(vocab_path, merges_path)
        except Exception as error:  # the library raises a bare Exception for malformed files
            raise ValueError(f"Invalid GPT-2 vocab.json / merges.txt in {directory}: {error}") from error

    bert_vocab_path = directory / "vocab.txt"
    if bert_vocab_path.exists():
        try:
            return WordPieceTokenizer.from_vocab_file(bert_vocab_path)
        except Exception as error:  # the library raises a bare Exception for malformed files
            raise ValueError(f"Invalid BERT vocab.txt in {directory}: {error}") from error

    raise FileNotFoundError(
        f"No tokenizer in {directory}: expected {TOKENIZER_FILE}, or vocab.json with merges.txt, or a BERT vocab.txt."
    )
