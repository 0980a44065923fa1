"""Genre classification of Shakespeare passages with a BERT, with and without masked-LM pretraining.

Each play's genre is its section of the First Folio catalogue (comedy, history, tragedy; see
``corpus.PLAYS``). Pericles and Troilus and Cressida have no catalogue section and are left out.
The split is by play: the plays of ``HELD_OUT_PLAYS`` (one comedy, one history, one tragedy) are
the test set and every other play trains. A passage is a ``[CLS] ... [SEP]`` row of consecutive
WordPiece tokens. The experiment pretrains a BERT with masked language modelling on the corpus's
training split, through the same trainer and ``bert-mini`` preset as ``minformer train bert-mini``
(the run directory ``<out>/pretrain`` can be evaluated, sampled and resumed like any other), then
fine-tunes it to classify passages and compares its test accuracy with the same fine-tuning from
random weights and with always predicting the most common training genre.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from minformer.data.corpus import HELD_OUT_PLAYS, PLAYS, load_corpus
from minformer.data.tokenizers import WordPieceTokenizer
from minformer.models.bert import BERTConfig, BERTForSequenceClassification
from minformer.runs import read_config_yaml
from minformer.training.config import load_run_config
from minformer.training.objectives import bert_segments, held_out_masked_accuracy
from minformer.training.optim import build_optimizer, learning_rate
from minformer.training.trainer import Trainer

logger = logging.getLogger(__name__)

GENRES = ("comedy", "history", "tragedy")


@dataclass(frozen=True)
class GenreSettings:
    """Sizes of one genre experiment; the model shape is the ``bert-mini`` preset's unless overridden."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    seq_len: int = 128
    batch_size: int = 32
    pretrain_steps: int = 1500
    finetune_steps: int = 300
    max_passages_per_play: int | None = None
    pretrain_lr: float = 5e-4
    finetune_lr: float = 1e-4
    warmup_steps: int = 100
    dtype: str = "bfloat16"
    seed: int = 1337


FULL = GenreSettings()
QUICK = GenreSettings(
    vocab_size=400, d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=32, batch_size=8,
    pretrain_steps=15, finetune_steps=15, max_passages_per_play=12, warmup_steps=2, dtype="float32",
)


@dataclass
class Passages:
    """Labelled passages: input_ids and attention_mask (n_passages, seq_len), labels (n_passages,), and the play of each."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    plays: list[str]


def genre_plays(corpus) -> dict[str, tuple[str, str]]:
    """Map each document of a known play with a genre to ``(genre, text)``, from both splits."""
    plays = {}
    for split in ("train", "val"):
        for doc_id, text in corpus.documents(split):
            play = PLAYS.get(Path(doc_id).stem)
            if play is not None and play.genre is not None:
                plays[play.id] = (play.genre, text)
    return plays


def build_passages(plays: dict[str, tuple[str, str]], tokenizer: WordPieceTokenizer, settings: GenreSettings) -> Passages:
    """Cut each play into whole passages of ``seq_len`` tokens, evenly thinned to ``max_passages_per_play``."""
    rows, masks, labels, names = [], [], [], []
    for play_id in sorted(plays):
        genre, text = plays[play_id]
        pieces = np.asarray(tokenizer.encode_pieces(text), dtype=np.int64)
        body_length = settings.seq_len - 2
        pieces = pieces[: len(pieces) // body_length * body_length]  # whole passages only, so none is padded
        if len(pieces) == 0:
            continue
        input_ids, attention_mask = bert_segments(pieces, body_length, tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id)
        if settings.max_passages_per_play is not None and len(input_ids) > settings.max_passages_per_play:
            keep = torch.linspace(0, len(input_ids) - 1, settings.max_passages_per_play).round().long()
            input_ids, attention_mask = input_ids[keep], attention_mask[keep]
        rows.append(input_ids)
        masks.append(attention_mask)
        labels += [GENRES.index(genre)] * len(input_ids)
        names += [play_id] * len(input_ids)
    return Passages(torch.cat(rows), torch.cat(masks), torch.tensor(labels), names)


def pretraining_overrides(settings: GenreSettings, corpus_name: str) -> dict:
    """Return the ``bert-mini`` overrides of the pretraining run: the settings' shape, length and schedule."""
    return {
        "data.corpus": corpus_name,
        "tokenizer.vocab_size": settings.vocab_size,
        "model.max_seq_len": settings.seq_len,
        "model.d_model": settings.d_model,
        "model.n_layers": settings.n_layers,
        "model.n_heads": settings.n_heads,
        "model.d_ff": settings.d_ff,
        "train.batch_size": settings.batch_size,
        "train.max_steps": settings.pretrain_steps,
        "train.lr": settings.pretrain_lr,
        "train.min_lr": settings.pretrain_lr / 10,
        "train.warmup_steps": settings.warmup_steps,
        "train.dtype": settings.dtype,
        "train.seed": settings.seed,
        # One held-out evaluation and one checkpoint, at the end; the scores are computed once below.
        "train.eval_interval": settings.pretrain_steps,
        "train.checkpoint_interval": settings.pretrain_steps,
        "train.log_interval": max(settings.pretrain_steps // 10, 1),
    }


def check_saved_pretraining(run_dir: Path, overrides: dict) -> None:
    """Raise a ``ValueError`` when the run in ``run_dir`` was made with settings other than ``overrides``.

    A rerun reuses or resumes the pretraining run, which is only right when it is the same run:
    a --quick run or another corpus left in the folder would otherwise be scored as this one.
    """
    saved = read_config_yaml(run_dir / "config.yaml")
    differences = []
    for dotted, expected in overrides.items():
        section, field = dotted.split(".", 1)
        found = (saved.get(section) or {}).get(field)
        if found != expected:
            differences.append(f"{dotted} is {found!r} there, {expected!r} here")
    if differences:
        raise ValueError(
            f"{run_dir} contains a pretraining run made with other settings ({'; '.join(differences)}); "
            "give another --out, or delete that folder to pretrain again."
        )


def pretrain(run_dir: Path, settings: GenreSettings, corpus_name: str) -> tuple[Trainer, dict]:
    """Pretrain (or resume, or reuse a finished) ``bert-mini`` run in ``run_dir``; return it and its held-out scores."""
    overrides = pretraining_overrides(settings, corpus_name)
    if (run_dir / "config.yaml").exists():
        check_saved_pretraining(run_dir, overrides)
        trainer = Trainer({}, run_dir, resume=True)
    else:
        trainer = Trainer(load_run_config("bert-mini", overrides), run_dir)
    result = trainer.run()
    if result.interrupted:
        raise KeyboardInterrupt(f"pretraining interrupted at step {result.steps_done}; rerun the experiment to resume it")
    val_loss, masked_tokens, _ = trainer.evaluate()
    scores = {
        "val_loss": val_loss,
        "masked_tokens": masked_tokens,
        "masked_accuracy": held_out_masked_accuracy(trainer.model, trainer.objective, trainer.eval_batch_size, trainer.device),
        "train_seconds": result.train_seconds,
        "steps": result.steps_done,
    }
    return trainer, scores


def optimizer_step(model, optimizer, loss: torch.Tensor, step: int, lr: float, settings: GenreSettings, total_steps: int) -> None:
    """Back-propagate ``loss`` and take one AdamW step at the warm-up and cosine learning rate of ``step``."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, lr, lr / 10, settings.warmup_steps, total_steps)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def finetune(encoder_state: dict | None, config: BERTConfig, train: Passages, settings: GenreSettings) -> BERTForSequenceClassification:
    """Fine-tune a classifier of shape ``config`` on ``train``, from ``encoder_state`` (a BERT state dict) or random weights."""
    torch.manual_seed(settings.seed + 1)
    model = BERTForSequenceClassification(config)
    if encoder_state is not None:
        # The masked-LM model has no pooler, so the pooler starts from random weights either way.
        missing, unexpected = model.bert.load_state_dict(encoder_state, strict=False)
        if unexpected or any(not name.startswith("pooler.") for name in missing):
            raise RuntimeError(f"The pretrained encoder does not fit the classifier: missing {missing}, unexpected {unexpected}.")
    model.train()
    optimizer = build_optimizer(model, settings.finetune_lr, 0.01, (0.9, 0.999))
    generator = torch.Generator().manual_seed(settings.seed + 2)
    for step in range(settings.finetune_steps):
        index = torch.randint(len(train.labels), (settings.batch_size,), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.dtype == "bfloat16"):
            loss = model(train.input_ids[index], labels=train.labels[index], attention_mask=train.attention_mask[index]).loss
        optimizer_step(model, optimizer, loss, step, settings.finetune_lr, settings, settings.finetune_steps)
    return model.eval()


@torch.no_grad()
def accuracy(model: BERTForSequenceClassification, passages: Passages, batch_size: int = 64) -> float:
    """Return the share of ``passages`` whose genre ``model`` predicts."""
    correct = 0
    for start in range(0, len(passages.labels), batch_size):
        window = slice(start, start + batch_size)
        logits = model(passages.input_ids[window], attention_mask=passages.attention_mask[window]).logits
        correct += int((logits.argmax(dim=-1) == passages.labels[window]).sum())
    return correct / len(passages.labels)


def run_bert_genre(out_dir: Path, corpus_name: str = "shakespeare", quick: bool = False) -> dict:
    """Run the experiment; write results.json and table.md into ``out_dir`` and return the results."""
    settings = QUICK if quick else FULL
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plays = genre_plays(load_corpus(corpus_name))
    train_plays = {play: value for play, value in plays.items() if play not in HELD_OUT_PLAYS}
    test_plays = {play: value for play, value in plays.items() if play in HELD_OUT_PLAYS}
    if not train_plays or not test_plays:
        raise ValueError(
            f"The bert-genre experiment classifies Shakespeare's plays by genre, so it needs the `shakespeare` corpus "
            f"(or one with the same play documents); corpus {corpus_name!r} has {len(train_plays)} labelled training "
            f"plays and {len(test_plays)} of the held-out plays ({', '.join(HELD_OUT_PLAYS)})."
        )

    start = time.perf_counter()
    trainer, pretraining = pretrain(out_dir / "pretrain", settings, corpus_name)
    pretrain_seconds = time.perf_counter() - start
    tokenizer = trainer.tokenizer
    train, test = build_passages(train_plays, tokenizer, settings), build_passages(test_plays, tokenizer, settings)
    classifier_config = dataclasses.replace(trainer.config.model, n_labels=len(GENRES))
    encoder_state = trainer.model.bert.state_dict()

    start = time.perf_counter()
    with_pretraining = accuracy(finetune(encoder_state, classifier_config, train, settings), test)
    without_pretraining = accuracy(finetune(None, classifier_config, train, settings), test)
    finetune_seconds = time.perf_counter() - start

    majority = Counter(train.labels.tolist()).most_common(1)[0][0]
    majority_accuracy = int((test.labels == majority).sum()) / len(test.labels)
    results = {
        "settings": asdict(settings),
        "corpus": corpus_name,
        "train_plays": sorted(train_plays),
        "test_plays": sorted(test_plays),
        "train_passages": len(train.labels),
        "test_passages": len(test.labels),
        "test_genre_counts": {GENRES[label]: count for label, count in sorted(Counter(test.labels.tolist()).items())},
        "majority_genre": GENRES[majority],
        "pretraining": pretraining,
        "pretrain_seconds": pretrain_seconds,
        "finetune_seconds": finetune_seconds,
        "accuracy": {"majority": majority_accuracy, "no_pretraining": without_pretraining, "pretrained": with_pretraining},
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out_dir / "table.md").write_text(format_table(results), encoding="utf-8")
    logger.info("genre accuracy: %s", results["accuracy"])
    return results


def format_table(results: dict) -> str:
    """Return a Markdown table of test accuracy per method."""
    accuracy_by_method, pretraining = results["accuracy"], results["pretraining"]
    lines = [
        f"Genre accuracy on {results['test_passages']} passages of the held-out plays "
        f"({', '.join(results['test_plays'])}), fine-tuned on {results['train_passages']} passages "
        f"of {len(results['train_plays'])} training plays of `{results['corpus']}`.",
        "",
        "| method | test accuracy |",
        "| --- | ---: |",
        f"| majority genre ({results['majority_genre']}) | {accuracy_by_method['majority']:.3f} |",
        f"| BERT, no pretraining | {accuracy_by_method['no_pretraining']:.3f} |",
        f"| BERT, masked-LM pretraining | {accuracy_by_method['pretrained']:.3f} |",
        "",
        f"Masked-LM pretraining ({pretraining['steps']} steps, {results['pretrain_seconds'] / 60:.1f} min; "
        f"fine-tuning both classifiers {results['finetune_seconds'] / 60:.1f} min): held-out masked-token accuracy "
        f"{pretraining['masked_accuracy']:.4f}, loss {pretraining['val_loss']:.4f} nats over "
        f"{pretraining['masked_tokens']:,} masked tokens of the held-out plays.",
    ]
    return "\n".join(lines) + "\n"
