"""The training loop: causal-LM steps with accumulation, schedule, evaluation, checkpoints, resume.

The trainer uses the model only through its forward (``model(inputs).logits``); progress goes
to a callback, so the CLI draws the display and the library never prints.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from minformer.data.corpus import load_corpus
from minformer.data.tokenizers import BPETokenizer, CharTokenizer, Tokenizer, WordPieceTokenizer, load_tokenizer
from minformer.models import build_model
from minformer.training.checkpoint import (
    CheckpointError,
    atomic_write_text,
    decode_rng_state,
    encode_rng_state,
    latest_checkpoint,
    load_model_tensors,
    load_optimizer_state,
    read_checkpoint,
    write_checkpoint,
)
from minformer.training.config import RunConfig, resolve_run_config
from minformer.training.objectives import OBJECTIVES, held_out_loss
from minformer.training.optim import build_optimizer, inverse_sqrt_learning_rate, learning_rate

logger = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1


def set_torch_threads(count: int, name: str) -> None:
    """Set torch's thread count to ``count``, logging a warning that names ``name`` when it exceeds the usable CPUs.

    More threads than CPUs make torch's threads wait on each other, which usually slows a run down.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if count > usable:
        logger.warning("%s=%d exceeds the %d CPUs this process can use; extra threads usually slow training down.",
                       name, count, usable)
    torch.set_num_threads(count)


def resolve_device(name: str) -> torch.device:
    """Turn ``train.device`` into a torch device; ``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available on this machine; use --train.device=cpu.")
    return device


def build_tokenizer(config: RunConfig, corpus) -> Tokenizer:
    """Build the run's tokenizer from the corpus: every character of it, or BPE or WordPiece trained on the training split.

    An objective that needs special tokens (span corruption, seq2seq) builds its own.
    """
    objective_class = OBJECTIVES[config.objective.kind]
    if hasattr(objective_class, "build_tokenizer"):
        return objective_class.build_tokenizer(config, corpus)
    if config.tokenizer.kind == "char":
        return CharTokenizer.from_text(corpus.characters())
    if config.tokenizer.kind == "wordpiece":
        return WordPieceTokenizer.train([text for _, text in corpus.documents("train")], vocab_size=config.tokenizer.vocab_size)
    return BPETokenizer.train([text for _, text in corpus.documents("train")], vocab_size=config.tokenizer.vocab_size)


def model_section_from_checkpoint(raw_config: dict, directory: Path) -> dict:
    """Replace the model section by the shape of a Hugging Face checkpoint.

    Only ``attention_backend`` and ``dropout`` are kept from the run config, because they do not
    change the weights. The tokenizer section is set to BPE, because the checkpoint's tokenizer
    files are used.
    """
    from minformer.interop import config_from_hf

    model_section = config_from_hf(directory).to_dict()
    requested = raw_config.get("model") or {}
    for kept in ("attention_backend", "dropout"):
        if kept in requested:
            model_section[kept] = requested[kept]
    tokenizer_section = {**(raw_config.get("tokenizer") or {}), "kind": "bpe"}
    return {**raw_config, "model": model_section, "tokenizer": tokenizer_section}


@dataclass
class TrainResult:
    """Summary of a finished (or interrupted) run."""

    run_dir: Path
    steps_done: int
    max_steps: int
    n_parameters: int
    tokens_seen: int
    train_seconds: float
    tokens_per_second: float
    val_loss: float | None = None
    val_tokens: int = 0
    val_loss_per_char: float | None = None
    eval_seconds: float = 0.0
    interrupted: bool = False
    extra: dict = field(default_factory=dict)


class Trainer:
    """Causal-LM training of one run directory; ``run()`` trains to ``train.max_steps``."""

    def __init__(
        self,
        raw_config: dict,
        run_dir: Path,
        resume: bool = False,
        init_from: Path | None = None,
        on_log: Callable[[dict], None] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.on_log = on_log or (lambda record: None)
        self.stop_requested = False
        checkpoint_dir = None
        if resume:
            checkpoint_dir = self.prepare_resume()
            raw_config = self.read_run_config()
        elif (self.run_dir / "config.yaml").exists():
            raise ValueError(f"{self.run_dir} already contains a run; continue it with --resume {self.run_dir} or pick another --out.")
        if init_from is not None and not resume:
            raw_config = model_section_from_checkpoint(raw_config, Path(init_from))

        # Validate the config before reading the corpus, so that an invalid field is reported first.
        provisional = resolve_run_config(raw_config, vocab_size=1 << 30)
        self.corpus = load_corpus(provisional.data.corpus)
        self.tokenizer = self.make_tokenizer(provisional, resume, init_from)
        self.config = resolve_run_config(raw_config, vocab_size=self.tokenizer.vocab_size)
        if self.config.model.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(
                f"model.vocab_size={self.config.model.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} tokens."
            )
        train_config = self.config.train
        if train_config.threads:
            set_torch_threads(train_config.threads, "train.threads")
        self.device = resolve_device(train_config.device)
        self.autocast_dtype = torch.bfloat16 if train_config.dtype == "bfloat16" else None

        torch.manual_seed(train_config.seed)
        self.model = build_model(self.config.model)
        if init_from is not None:
            self.load_pretrained(init_from)
        self.model.to(self.device)
        self.forward_model = torch.compile(self.model) if train_config.compile else self.model
        self.optimizer = build_optimizer(
            self.model, train_config.lr, train_config.weight_decay, (train_config.beta1, train_config.beta2)
        )

        self.objective = OBJECTIVES[self.config.objective.kind].from_run(self.config, self.tokenizer, self.corpus)
        self.eval_batch_size = max(train_config.batch_size, 16)

        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        if checkpoint_dir is not None:
            self.restore(checkpoint_dir)
        else:
            if self.run_dir.exists() and not self.run_dir.is_dir():
                raise ValueError(f"--out {self.run_dir} is a file, not a folder; give a folder for the run.")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.config.save(self.run_dir / "config.yaml")
            self.tokenizer.save(self.run_dir / "tokenizer.json")
            (self.run_dir / "metrics.jsonl").write_text("", encoding="utf-8")

    # ---- set-up -----------------------------------------------------------------------------

    def prepare_resume(self) -> Path:
        if not (self.run_dir / "config.yaml").is_file():
            raise ValueError(f"Cannot resume: {self.run_dir} has no config.yaml, so it is not a run directory.")
        checkpoint_dir = latest_checkpoint(self.run_dir)
        if checkpoint_dir is None:
            # Killed before its first checkpoint: the run starts again from step 0, which gives the
            # same steps as the first attempt because every random draw comes from the config's seed.
            logger.warning("%s has no checkpoint yet; starting it from step 0", self.run_dir)
        return checkpoint_dir

    def read_run_config(self) -> dict:
        from minformer.runs import read_config_yaml

        return read_config_yaml(self.run_dir / "config.yaml")

    def make_tokenizer(self, provisional: RunConfig, resume: bool, init_from: Path | None) -> Tokenizer:
        if resume and (self.run_dir / "tokenizer.json").is_file():
            return load_tokenizer(self.run_dir / "tokenizer.json")
        if init_from is not None:
            return load_tokenizer(Path(init_from))
        return build_tokenizer(provisional, self.corpus)

    def load_pretrained(self, directory: Path) -> None:
        from minformer.interop import from_hf

        pretrained = from_hf(directory)
        load_model_tensors(self.model, dict(pretrained.state_dict()), f"--init-from {directory}")

    def restore(self, checkpoint_dir: Path) -> None:
        """Load weights, optimizer state, step counters and RNG states from a checkpoint."""
        model_tensors, optimizer_tensors, state = read_checkpoint(checkpoint_dir)
        load_model_tensors(self.model, model_tensors, str(checkpoint_dir))
        load_optimizer_state(self.model, self.optimizer, optimizer_tensors)
        try:
            self.step = int(state["step"])
            self.tokens_seen = int(state["tokens_seen"])
            self.train_seconds = float(state["train_seconds"])
            self.objective.set_state(decode_rng_state(state["data_rng"]))
            torch.set_rng_state(decode_rng_state(state["torch_rng"]))
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{checkpoint_dir / 'state.json'} is incomplete or invalid: {error!r}") from None
        self.truncate_metrics(self.step)
        logger.info("resumed %s at step %d", self.run_dir, self.step)

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics records written after ``step`` by a run that was killed before its next checkpoint."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    # ---- the loop ---------------------------------------------------------------------------

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def train_step(self, micro_batches: list[dict]) -> dict:
        """Run one optimizer step over the micro-batches, with the loss averaged over all their target tokens.

        Returns the step's metrics: ``loss`` (nats per target token) and, when the model has
        one, ``aux_loss`` (the weighted auxiliary loss, averaged over micro-batches).
        """
        n_targets = sum(self.objective.n_targets(batch) for batch in micro_batches)
        total_nats, total_aux = 0.0, 0.0
        metrics: dict = {}
        for batch in micro_batches:
            batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
            with self.autocast():
                parts = self.objective.loss(self.forward_model, batch)
            loss = parts.nats / n_targets
            if parts.aux_loss is not None:
                loss = loss + parts.aux_loss / len(micro_batches)
                total_aux += float(parts.aux_loss.detach()) / len(micro_batches)
            loss.backward()
            total_nats += float(parts.nats.detach())
            for name, value in (parts.metrics or {}).items():
                metrics[name] = metrics.get(name, 0.0) + value / len(micro_batches)
            if self.stop_requested:
                raise KeyboardInterrupt
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["loss"] = total_nats / n_targets
        if total_aux:
            metrics["aux_loss"] = total_aux
        return metrics

    def learning_rate(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based) under ``train.schedule``."""
        config = self.config.train
        if config.schedule == "inverse_sqrt":
            # Vaswani et al. 2017, eq. 3, rescaled so that its peak (at step warmup_steps) is train.lr.
            d_model = self.config.model.d_model
            peak = inverse_sqrt_learning_rate(config.warmup_steps, d_model, config.warmup_steps)
            return config.lr * inverse_sqrt_learning_rate(step + 1, d_model, config.warmup_steps) / peak
        return learning_rate(step, config.lr, config.min_lr, config.warmup_steps, config.max_steps)

    def estimate_val_loss(self) -> float:
        """Mean loss over ``train.eval_windows`` evenly spaced validation windows (the same ones every time)."""
        nats, targets = held_out_loss(
            self.model, self.objective, self.eval_batch_size, self.device, self.config.train.eval_windows, self.autocast_dtype
        )
        return nats / targets

    def run(self) -> TrainResult:
        """Train until ``train.max_steps``; Ctrl-C stops at a step boundary with a checkpoint."""
        config = self.config.train
        previous_handler = signal.getsignal(signal.SIGINT)

        def request_stop(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self.stop_requested = True

        if previous_handler is not None and threading_is_main():
            signal.signal(signal.SIGINT, request_stop)
        interrupted = False
        self.model.train()
        window_start, window_tokens = time.perf_counter(), 0
        try:
            while self.step < config.max_steps:
                data_state = self.objective.get_state()
                torch_state = torch.get_rng_state()
                lr = self.learning_rate(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                step_start = time.perf_counter()
                micro_batches = [self.objective.next_batch() for _ in range(config.grad_accum_steps)]
                tokens_per_step = sum(self.objective.n_tokens(batch) for batch in micro_batches)
                try:
                    step_metrics = self.train_step(micro_batches)
                except KeyboardInterrupt:
                    # Undo the half-done step: its gradients are dropped and the data position rewinds.
                    self.optimizer.zero_grad(set_to_none=True)
                    self.objective.set_state(data_state)
                    torch.set_rng_state(torch_state)
                    interrupted = True
                    break
                self.step += 1
                self.tokens_seen += tokens_per_step
                self.train_seconds += time.perf_counter() - step_start
                window_tokens += tokens_per_step
                record = {"step": self.step, **step_metrics, "lr": lr, "tokens_seen": self.tokens_seen}
                if self.step % config.log_interval == 0 or self.step == config.max_steps:
                    now = time.perf_counter()
                    record["tokens_per_second"] = window_tokens / max(now - window_start, 1e-9)
                    window_start, window_tokens = now, 0
                if self.step % config.eval_interval == 0 or self.step == config.max_steps:
                    record["val_loss_estimate"] = self.estimate_val_loss()
                    window_start = time.perf_counter()
                self.append_metrics(record)
                self.on_log({**record, "max_steps": config.max_steps, "train_seconds": self.train_seconds})
                if config.checkpoint_interval and self.step % config.checkpoint_interval == 0 and self.step < config.max_steps:
                    self.save_checkpoint()
                if self.stop_requested:
                    interrupted = True
                    break
        finally:
            if threading_is_main() and previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        self.save_checkpoint()
        self.draw_loss_plot()
        result = TrainResult(
            run_dir=self.run_dir,
            steps_done=self.step,
            max_steps=config.max_steps,
            n_parameters=self.model.num_parameters(),
            tokens_seen=self.tokens_seen,
            train_seconds=self.train_seconds,
            tokens_per_second=self.tokens_seen / max(self.train_seconds, 1e-9),
            interrupted=interrupted,
        )
        return result

    def append_metrics(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")

    def save_checkpoint(self) -> Path:
        state = {
            "format_version": STATE_FORMAT_VERSION,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "data_rng": encode_rng_state(self.objective.get_state()),
            "torch_rng": encode_rng_state(torch.get_rng_state()),
        }
        return write_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state, keep=self.config.train.keep_checkpoints)

    def draw_loss_plot(self) -> None:
        try:
            from minformer.plots import plot_loss

            plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        except Exception as error:  # a plot must never cost a finished run
            logger.warning("could not draw loss.png: %s", error)

    def evaluate(self) -> tuple[float, int, float]:
        """Exact validation loss in fp32: (nats per target token, targets predicted, nats per character)."""
        nats, targets = held_out_loss(self.model, self.objective, self.eval_batch_size, self.device)
        characters = getattr(self.objective, "val_characters", 0)
        return nats / targets, targets, (nats / characters if characters else float("nan"))


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
