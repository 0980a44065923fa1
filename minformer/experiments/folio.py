"""First Folio spelling to modern spelling with the 2017 Transformer and T5, scored against copying the source.

The pairs are the aligned lines of ``minformer prepare folio``. Pairs of the training plays train, and
pairs of the held-out plays (``HELD_OUT_PLAYS``) are scored. Every model reads and writes characters
through one ``Seq2SeqCharTokenizer`` built over the corpus and both splits' pairs, so the T5
pretraining and its fine-tuning share the vocabulary. Three runs are made through the same trainer
as ``minformer train``, so each one can be resumed, evaluated and used by ``minformer translate``:

- ``<out>/transformer``: the 2017 Transformer trained on the pairs (post-LN, sinusoidal positions,
  label smoothing 0.1, the inverse square-root schedule);
- ``<out>/t5-pretrain``: T5 pretrained with span corruption on the corpus's training split
  (the modern text of the training plays and poems);
- ``<out>/t5``: that T5 fine-tuned on the pairs.

Each model decodes the scored pairs greedily and with beam search. The scores are the character
error rate (Levenshtein distance over reference length, summed over the corpus), and BLEU and chrF
from ``sacrebleu``. The identity baseline (the Folio line unchanged) is scored on the same pairs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from minformer.data.corpus import HELD_OUT_PLAYS, load_corpus
from minformer.data.pairs import load_pair_split
from minformer.data.tokenizers import Seq2SeqCharTokenizer
from minformer.training.config import load_run_config, resolve_run_config
from minformer.training.objectives import Seq2SeqObjective
from minformer.training.trainer import Trainer
from minformer.translation import score, translate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolioSettings:
    """Model shape, training lengths and evaluation settings of one Folio experiment. Both models have the same shape."""

    d_model: int = 256
    n_layers: int = 2
    """Blocks in each stack (encoder and decoder)."""
    n_heads: int = 4
    d_ff: int = 1024
    max_seq_len: int = 192
    """Maximum source and target length in tokens, EOS included. Longer pairs are dropped, and the longest Folio line has 183 characters."""
    dropout: float = 0.0
    """Off, because a run draws fewer pairs (64,000) than the training split has (84,766), so the models
    underfit. In short trials, batch 32 without dropout lowered the CER faster per token than batch 64
    with dropout 0.1."""
    label_smoothing: float = 0.1
    batch_size: int = 32
    """Pairs per training step."""
    transformer_steps: int = 2000
    transformer_lr: float = 1.5e-3
    """Peak of the inverse square-root schedule, reached at the end of warm-up."""
    transformer_warmup_steps: int = 200
    pretrain_steps: int = 400
    pretrain_seq_len: int = 128
    """Span-corruption inputs, in tokens (EOS included)."""
    pretrain_batch_size: int = 32
    finetune_steps: int = 2000
    t5_lr: float = 1e-3
    """Peak of the cosine schedule, in pretraining and fine-tuning."""
    t5_warmup_steps: int = 100
    eval_pairs: int | None = 1000
    """Number of evenly spaced held-out pairs that every system is scored on. None scores them all."""
    num_beams: int = 4
    length_penalty: float = 1.0
    """alpha of beam search: a hypothesis scores its summed log-probability / (generated length) ** alpha."""
    checkpoint_interval: int = 200
    dtype: str = "bfloat16"
    threads: int = 0
    """torch threads in training. 0 keeps torch's default (one per core)."""
    seed: int = 1337


FULL = FolioSettings()
QUICK = FolioSettings(
    d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=48, batch_size=8, transformer_steps=6,
    transformer_warmup_steps=2, pretrain_steps=4, pretrain_seq_len=32, pretrain_batch_size=4, finetune_steps=6,
    t5_warmup_steps=2, eval_pairs=6, num_beams=2, checkpoint_interval=0, dtype="float32", threads=1,
)


# ---- runs ----------------------------------------------------------------------------------------


class SharedTokenizerTrainer(Trainer):
    """A ``Trainer`` for a new run that uses a given tokenizer instead of building one from its corpus."""

    def __init__(self, raw_config: dict, run_dir: Path, tokenizer: Seq2SeqCharTokenizer):
        self.shared_tokenizer = tokenizer
        super().__init__(raw_config, run_dir)

    def make_tokenizer(self, provisional, resume, init_from):
        return self.shared_tokenizer


def build_tokenizer(corpus, corpus_name: str) -> Seq2SeqCharTokenizer:
    """Build the one tokenizer of every run: all characters of the corpus and of both splits' Folio pairs."""
    config = resolve_run_config(load_run_config("transformer-tiny", {"data.corpus": corpus_name}), vocab_size=1 << 30)
    return Seq2SeqObjective.build_tokenizer(config, corpus)


def shape_overrides(settings: FolioSettings, corpus_name: str) -> dict:
    """Return the overrides that both families share: corpus, model shape, precision and logging."""
    return {
        "data.corpus": corpus_name,
        "model.d_model": settings.d_model,
        "model.n_encoder_layers": settings.n_layers,
        "model.n_decoder_layers": settings.n_layers,
        "model.n_heads": settings.n_heads,
        "model.d_ff": settings.d_ff,
        "model.max_seq_len": settings.max_seq_len,
        "model.dropout": settings.dropout,
        "train.dtype": settings.dtype,
        "train.seed": settings.seed,
        "train.threads": settings.threads,
        "train.checkpoint_interval": settings.checkpoint_interval,
        "train.eval_windows": 50,
    }


def schedule_overrides(steps: int, batch_size: int, lr: float, warmup_steps: int) -> dict:
    """Return the train-section overrides of a run of ``steps`` steps with one validation estimate, at the end."""
    return {
        "train.max_steps": steps,
        "train.batch_size": batch_size,
        "train.lr": lr,
        "train.min_lr": lr / 10,
        "train.warmup_steps": warmup_steps,
        "train.eval_interval": steps,
        "train.log_interval": max(steps // 20, 1),
    }


def transformer_config(settings: FolioSettings, corpus_name: str) -> dict:
    """Return the raw config of the Transformer run: the ``transformer-tiny`` recipe at the settings' shape."""
    overrides = {
        **shape_overrides(settings, corpus_name),
        **schedule_overrides(settings.transformer_steps, settings.batch_size, settings.transformer_lr,
                             settings.transformer_warmup_steps),
        "objective.kind": "seq2seq",
        "objective.pairs": "folio",
        "objective.label_smoothing": settings.label_smoothing,
    }
    return load_run_config("transformer-tiny", overrides)


def t5_configs(settings: FolioSettings, corpus_name: str) -> tuple[dict, dict]:
    """Return the raw configs of the T5 span-corruption pretraining and the fine-tuning on the pairs.

    Both use AdamW with warm-up and cosine decay (T5 itself used Adafactor) and the same model
    shape, so the pretrained weights load into the fine-tuning run. The pretraining's
    ``max_seq_len`` is its input length, which sets no model weight.
    """
    t5 = {
        **shape_overrides(settings, corpus_name),
        "model.d_head": settings.d_model // settings.n_heads,
        "train.weight_decay": 0.0,
    }
    pretrain = {
        **t5,
        **schedule_overrides(settings.pretrain_steps, settings.pretrain_batch_size, settings.t5_lr, settings.t5_warmup_steps),
        "model.max_seq_len": settings.pretrain_seq_len,
        "objective.kind": "span_corruption",
    }
    finetune = {
        **t5,
        **schedule_overrides(settings.finetune_steps, settings.batch_size, settings.t5_lr, settings.t5_warmup_steps),
        "objective.kind": "seq2seq",
        "objective.pairs": "folio",
        "objective.label_smoothing": settings.label_smoothing,
    }
    return load_run_config("t5-tiny", pretrain), load_run_config("t5-tiny", finetune)


def open_run(run_dir: Path, raw_config: dict, tokenizer: Seq2SeqCharTokenizer,
             on_start: Callable[[Trainer], None] | None = None) -> Trainer:
    """Start the run in ``run_dir`` with the shared tokenizer, or resume it if it exists.

    ``on_start`` prepares a new run's model before its step-0 checkpoint (the T5 fine-tuning loads
    the pretrained weights there, so that a resumed run never starts from random weights).
    """
    if (run_dir / "config.yaml").exists():
        trainer = Trainer({}, run_dir, resume=True)
        if trainer.tokenizer.to_json() != tokenizer.to_json():
            raise ValueError(
                f"{run_dir} was trained with another alphabet than the corpus and pairs have now; "
                "delete it or give the experiment a new --out folder."
            )
        expected = resolve_run_config(raw_config, vocab_size=tokenizer.vocab_size).to_dict()
        if trainer.config.to_dict() != expected:
            raise ValueError(
                f"{run_dir} was made with other settings (for example by a --quick run); "
                "delete it or give the experiment a new --out folder."
            )
        return trainer
    trainer = SharedTokenizerTrainer(raw_config, run_dir, tokenizer)
    if on_start is not None:
        on_start(trainer)
        trainer.save_checkpoint()
    return trainer


def train_run(trainer: Trainer, name: str, on_progress: Callable[[str], None]) -> dict:
    """Train ``trainer`` to its last step and return its summary, with the exact held-out loss."""
    max_steps = trainer.config.train.max_steps

    def report(record: dict) -> None:
        if "tokens_per_second" in record:
            on_progress(f"{name}: step {record['step']}/{max_steps}, loss {record['loss']:.4f}, "
                        f"{record['tokens_per_second']:,.0f} tokens/s")

    trainer.on_log = report
    on_progress(f"{name}: {trainer.model.num_parameters():,} parameters, {trainer.objective.describe()}")
    if trainer.step < max_steps:  # a finished run, met again by a rerun, is only evaluated
        result = trainer.run()
        if result.interrupted:
            raise KeyboardInterrupt(f"{name} interrupted at step {result.steps_done}; rerun the experiment to resume it")
    val_loss, val_tokens, _ = trainer.evaluate()
    return {
        "run_dir": str(trainer.run_dir),
        "steps": trainer.step,
        "parameters": trainer.model.num_parameters(),
        "tokens_seen": trainer.tokens_seen,
        "train_seconds": trainer.train_seconds,
        "tokens_per_second": trainer.tokens_seen / max(trainer.train_seconds, 1e-9),
        "val_loss": val_loss,
        "val_tokens": val_tokens,
    }


def evaluate_model(model, tokenizer, pairs: list[tuple[str, str]], settings: FolioSettings) -> dict:
    """Score greedy and beam-search translations of ``pairs``; returns scores, decoding seconds and examples per method."""
    model.eval()
    sources = [source for source, _ in pairs]
    references = [target for _, target in pairs]
    results = {}
    for method, num_beams in (("greedy", 1), ("beam", settings.num_beams)):
        start = time.perf_counter()
        hypotheses = translate(model, tokenizer, sources, num_beams=num_beams, length_penalty=settings.length_penalty)
        results[method] = {
            **score(hypotheses, references),
            "decode_seconds": time.perf_counter() - start,
            "examples": hypotheses[:5],
        }
    return results


def scored_pairs(corpus, max_seq_len: int, eval_pairs: int | None) -> tuple[list[tuple[str, str]], int]:
    """Return the evenly spaced held-out pairs whose sides fit ``max_seq_len`` characters with EOS, and how many fit."""
    fitting = [(source, target) for source, target in load_pair_split("folio", "val", corpus)
               if max(len(source), len(target)) + 1 <= max_seq_len]
    if not fitting:
        raise ValueError("No held-out Folio pair fits the models; run `minformer prepare folio` first.")
    if eval_pairs is None or eval_pairs >= len(fitting):
        return fitting, len(fitting)
    chosen = torch.linspace(0, len(fitting) - 1, eval_pairs).round().long().unique().tolist()
    return [fitting[index] for index in chosen], len(fitting)


def train_models(out_dir: Path, settings: FolioSettings, corpus_name: str, tokenizer: Seq2SeqCharTokenizer,
                 on_progress: Callable[[str], None]) -> tuple[dict, dict]:
    """Train (or resume, or reuse) the three runs; return the two translation models and the run summaries."""
    pretrain_config, finetune_config = t5_configs(settings, corpus_name)
    summaries = {}

    transformer = open_run(out_dir / "transformer", transformer_config(settings, corpus_name), tokenizer)
    summaries["transformer"] = train_run(transformer, "transformer", on_progress)
    models = {"transformer": transformer.model}
    del transformer  # drops the encoded pairs before the next run encodes its own

    pretrain = open_run(out_dir / "t5-pretrain", pretrain_config, tokenizer)
    summaries["t5_pretrain"] = train_run(pretrain, "t5 pretraining", on_progress)
    pretrained_weights = pretrain.model.state_dict()
    del pretrain

    finetune = open_run(out_dir / "t5", finetune_config, tokenizer,
                        on_start=lambda trainer: trainer.model.load_state_dict(pretrained_weights))
    summaries["t5_finetune"] = train_run(finetune, "t5 fine-tuning", on_progress)
    models["t5"] = finetune.model
    return models, summaries


def run_folio(out_dir: Path, corpus_name: str = "shakespeare", quick: bool = False,
              on_progress: Callable[[str], None] | None = None) -> dict:
    """Run the experiment; write results.json and table.md into ``out_dir`` and return the results."""
    settings = QUICK if quick else FULL
    on_progress = on_progress or (lambda line: logger.info(line))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    corpus = load_corpus(corpus_name)
    tokenizer = build_tokenizer(corpus, corpus_name)
    models, training = train_models(out_dir, settings, corpus_name, tokenizer, on_progress)

    pairs, n_fitting = scored_pairs(corpus, settings.max_seq_len, settings.eval_pairs)
    on_progress(f"scoring {len(pairs)} of {n_fitting} held-out pairs")
    references = [target for _, target in pairs]
    systems = {"identity": score([source for source, _ in pairs], references)}
    for name, model in models.items():
        for method, scores in evaluate_model(model.cpu(), tokenizer, pairs, settings).items():
            systems[f"{name} {method}"] = scores
            on_progress(f"{name} {method}: CER {scores['cer']:.4f}, BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f} "
                        f"({scores['decode_seconds']:.0f} s)")

    results = {
        "settings": asdict(settings),
        "corpus": corpus_name,
        "held_out_plays": list(HELD_OUT_PLAYS),
        "scored_pairs": len(pairs),
        "held_out_pairs": n_fitting,
        "vocab_size": tokenizer.vocab_size,
        "examples": {"source": [source for source, _ in pairs[:5]], "reference": references[:5]},
        "training": training,
        "systems": systems,
        "wall_seconds": time.perf_counter() - start,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "table.md").write_text(format_table(results), encoding="utf-8")
    return results


def format_table(results: dict) -> str:
    """Return a Markdown table of CER, BLEU and chrF per system, with training minutes."""
    settings, training, systems = results["settings"], results["training"], results["systems"]
    t5_minutes = (training["t5_pretrain"]["train_seconds"] + training["t5_finetune"]["train_seconds"]) / 60
    minutes = {"identity": 0.0, "transformer": training["transformer"]["train_seconds"] / 60, "t5": t5_minutes}
    beam = f"beam {settings['num_beams']}, alpha {settings['length_penalty']:g}"
    decode_seconds = sum(row.get("decode_seconds", 0.0) for row in systems.values())
    lines = [
        f"Folio to modern spelling on {results['scored_pairs']} evenly spaced of the {results['held_out_pairs']} "
        f"held-out pairs ({', '.join(results['held_out_plays'])}).",
        "",
        "| system | CER | BLEU | chrF | training minutes |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, label in (("identity", "identity (Folio text unchanged)"), ("transformer greedy", "transformer, greedy"),
                       ("transformer beam", f"transformer, {beam}"), ("t5 greedy", "t5, greedy"),
                       ("t5 beam", f"t5, {beam}")):
        row = systems[key]
        lines.append(f"| {label} | {row['cer']:.4f} | {row['bleu']:.2f} | {row['chrf']:.2f} | "
                     f"{minutes[key.split()[0]]:.1f} |")
    lines += [
        "",
        f"T5 minutes are span-corruption pretraining ({training['t5_pretrain']['train_seconds'] / 60:.1f}) plus "
        f"fine-tuning ({training['t5_finetune']['train_seconds'] / 60:.1f}). Both models: d_model {settings['d_model']}, "
        f"{settings['n_layers']} + {settings['n_layers']} layers, {settings['n_heads']} heads, d_ff {settings['d_ff']}. "
        f"CER is the summed Levenshtein distance over the summed reference length; BLEU and chrF are sacrebleu's "
        f"corpus scores.",
        "",
        f"Decoding the scored pairs took {decode_seconds / 60:.1f} min (both models, greedy and beam search). "
        f"The whole experiment took {results['wall_seconds'] / 60:.1f} min of wall time.",
    ]
    return "\n".join(lines) + "\n"
