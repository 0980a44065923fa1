"""The run config: a model section plus the data, tokenizer, objective and train sections.

Every field below is a config field that a YAML file or a ``--section.field=value`` override sets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from minformer.config import (
    CONFIG_FORMAT_VERSION,
    SECTIONS,
    apply_overrides,
    check_choice,
    check_int,
    check_positive,
    dataclass_from_dict,
    load_config_file,
)
from minformer.models import FAMILIES, config_from_dict


@dataclass(frozen=True)
class DataConfig:
    """The prepared corpus a run trains and evaluates on."""

    corpus: str = "shakespeare"
    """Name of a corpus made by `minformer prepare` (shakespeare, shakespeare-folio, or your own)."""


@dataclass(frozen=True)
class TokenizerConfig:
    """The tokenizer that turns text into token ids."""

    kind: str = "char"
    """char (one id per character of the corpus), bpe (byte-level BPE) or wordpiece (BERT's), both trained on the corpus."""
    vocab_size: int = 4096
    """Target vocabulary size when kind is bpe or wordpiece; ignored for char."""

    def __post_init__(self):
        check_choice("tokenizer.kind", self.kind, ("char", "bpe", "wordpiece"))
        check_int("tokenizer.vocab_size", self.vocab_size, minimum=257)


@dataclass(frozen=True)
class ObjectiveConfig:
    """The training objective."""

    kind: str = "causal_lm"
    """causal_lm: predict each next token; masked_lm: predict randomly chosen tokens (BERT);
    span_corruption: T5's denoising of dropped spans; seq2seq: source-to-target pairs with teacher forcing."""
    mask_probability: float = 0.15
    """masked_lm: probability that each non-special token is chosen as a target."""
    noise_density: float = 0.15
    """span_corruption: share of each window's tokens that are dropped into the target."""
    mean_noise_span_length: float = 3.0
    """span_corruption: mean length of a dropped span, in tokens."""
    pairs: str = "folio"
    """seq2seq: folio (the pairs of `minformer prepare folio`), or the synthetic copy or reverse
    task on the lines of data.corpus."""
    label_smoothing: float = 0.0
    """span_corruption and seq2seq: epsilon of label smoothing in training (0.1 in Vaswani et al. 2017);
    evaluation always reports the unsmoothed cross-entropy."""

    def __post_init__(self):
        check_choice("objective.kind", self.kind, ("causal_lm", "masked_lm", "span_corruption", "seq2seq"))
        check_positive("objective.mask_probability", self.mask_probability)
        if self.mask_probability >= 1.0:
            raise ValueError(f"objective.mask_probability={self.mask_probability} is invalid; it must be in (0, 1).")
        check_positive("objective.noise_density", self.noise_density)
        if self.noise_density >= 1.0:
            raise ValueError(f"objective.noise_density={self.noise_density} is invalid; it must be in (0, 1).")
        check_positive("objective.mean_noise_span_length", self.mean_noise_span_length)
        if self.mean_noise_span_length < 1.0:
            raise ValueError(
                f"objective.mean_noise_span_length={self.mean_noise_span_length} is invalid; it must be at least 1 token."
            )
        check_choice("objective.pairs", self.pairs, ("folio", "copy", "reverse"))
        check_positive("objective.label_smoothing", self.label_smoothing, allow_zero=True)
        if self.label_smoothing >= 1.0:
            raise ValueError(f"objective.label_smoothing={self.label_smoothing} is invalid; it must be in [0, 1).")
        if self.label_smoothing > 0 and self.kind not in ("span_corruption", "seq2seq"):
            raise ValueError(
                f"objective.label_smoothing={self.label_smoothing} is not supported with objective.kind={self.kind!r}; "
                "it applies to span_corruption and seq2seq only."
            )
        for field, kinds in OBJECTIVE_FIELD_KINDS.items():
            value = getattr(self, field)
            if self.kind not in kinds and value != OBJECTIVE_DEFAULTS[field]:
                raise ValueError(
                    f"objective.{field}={value!r} has no effect with objective.kind={self.kind!r}; it applies to "
                    f"{' and '.join(kinds)} only. Remove it or change objective.kind."
                )


OBJECTIVE_FIELD_KINDS = {
    "mask_probability": ("masked_lm",),
    "noise_density": ("span_corruption",),
    "mean_noise_span_length": ("span_corruption",),
    "pairs": ("seq2seq",),
}
"""The objective kinds that read each field; another kind rejects a value other than the default."""
OBJECTIVE_DEFAULTS = {field.name: field.default for field in dataclasses.fields(ObjectiveConfig)}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, evaluation and checkpointing."""

    device: str = "auto"
    """cpu, cuda, cuda:N, mps, or auto (cuda when available, else cpu)."""
    dtype: str = "float32"
    """float32, or bfloat16 (autocast: matrix multiplies in bf16, weights and optimizer in fp32)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    seed: int = 1337
    """Seed of the parameter initialisation, batch sampling and dropout."""
    batch_size: int = 32
    """Sequences per micro-batch."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_steps: int = 2000
    """Optimizer steps in the whole run."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warm-up."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    schedule: str = "cosine"
    """cosine: warm-up, then cosine decay to min_lr; inverse_sqrt: warm-up, then lr * sqrt(warmup_steps / step)
    (Vaswani et al. 2017, eq. 3, which is this with lr = (d_model * warmup_steps)^-0.5)."""
    warmup_steps: int = 100
    """Steps of linear warm-up from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices only (not biases, norms or embeddings' ... see optim)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.99
    """AdamW second-moment decay."""
    grad_clip: float = 1.0
    """Largest global gradient norm; 0 disables clipping."""
    eval_interval: int = 250
    """Steps between validation estimates (and checkpoints)."""
    eval_windows: int = 100
    """Validation windows used by the periodic estimate; the final evaluation uses every window."""
    checkpoint_interval: int = 250
    """Steps between checkpoints; 0 writes only the final one."""
    keep_checkpoints: int = 2
    """How many most recent checkpoints stay on disk."""
    log_interval: int = 10
    """Steps between progress lines and metrics.jsonl records."""
    threads: int = 0
    """CPU threads for torch; 0 keeps torch's default (one per core)."""

    def __post_init__(self):
        check_choice("train.dtype", self.dtype, ("float32", "bfloat16"))
        check_choice("train.compile", self.compile, (True, False))
        check_int("train.seed", self.seed, minimum=0)
        check_int("train.batch_size", self.batch_size)
        check_int("train.grad_accum_steps", self.grad_accum_steps)
        check_int("train.max_steps", self.max_steps)
        check_positive("train.lr", self.lr)
        check_positive("train.min_lr", self.min_lr, allow_zero=True)
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} is larger than train.lr={self.lr}.")
        check_int("train.warmup_steps", self.warmup_steps, minimum=0)
        check_choice("train.schedule", self.schedule, ("cosine", "inverse_sqrt"))
        if self.schedule == "inverse_sqrt" and self.warmup_steps < 1:
            raise ValueError("train.schedule='inverse_sqrt' needs train.warmup_steps of at least 1.")
        check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check_positive(f"train.{name}", value, allow_zero=True)
            if value >= 1:
                raise ValueError(f"train.{name}={value} is invalid; it must be in [0, 1).")
        check_positive("train.grad_clip", self.grad_clip, allow_zero=True)
        check_int("train.eval_interval", self.eval_interval)
        check_int("train.eval_windows", self.eval_windows)
        check_int("train.checkpoint_interval", self.checkpoint_interval, minimum=0)
        check_int("train.keep_checkpoints", self.keep_checkpoints)
        check_int("train.log_interval", self.log_interval)
        check_int("train.threads", self.threads, minimum=0)
        if not isinstance(self.device, str) or not self.device.split(":")[0] in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"train.device={self.device!r} is invalid; allowed: auto, cpu, cuda, cuda:N, mps.")


SECTION_CLASSES = {
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "objective": ObjectiveConfig,
    "train": TrainConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """A whole run: the model config of one family and the four other sections."""

    model: object
    data: DataConfig
    tokenizer: TokenizerConfig
    objective: ObjectiveConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        """Return the resolved config as written to a run's config.yaml."""
        return {
            "format_version": CONFIG_FORMAT_VERSION,
            "model": self.model.to_dict(),
            **{name: dataclasses.asdict(getattr(self, name)) for name in SECTION_CLASSES},
        }

    def save(self, path: Path) -> None:
        """Write config.yaml atomically (temporary file, then rename)."""
        from minformer.training.checkpoint import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def known_fields(model_section: dict) -> dict[str, list[str]]:
    """Field names per section, the model's taken from its family's config class."""
    family = model_section.get("family", "gpt")
    model_class = FAMILIES.get(family, FAMILIES["gpt"])[0]
    fields = {"model": ["family"] + [f.name for f in dataclasses.fields(model_class)]}
    for name, cls in SECTION_CLASSES.items():
        fields[name] = [f.name for f in dataclasses.fields(cls)]
    return fields


# The objectives each family can train with: a bidirectional encoder would see the very token a
# causal-LM target is scored on, and a decoder-only model has no masked-LM head.
OBJECTIVES_BY_FAMILY = {
    "gpt": ("causal_lm",),
    "bert": ("masked_lm",),
    "t5": ("span_corruption", "seq2seq"),
    "transformer": ("seq2seq",),
}


def check_objective_fits_family(config: "RunConfig") -> None:
    """Raise a ``ValueError`` when ``objective.kind`` cannot train ``model.family``."""
    allowed = OBJECTIVES_BY_FAMILY.get(config.model.family)
    if allowed == ():
        raise ValueError(
            f"minformer train has no objective for model.family={config.model.family!r} yet; "
            "train it from Python with the model's forward (labels give the loss)."
        )
    if allowed is not None and config.objective.kind not in allowed:
        raise ValueError(
            f"objective.kind={config.objective.kind!r} cannot train model.family={config.model.family!r}; "
            f"allowed objectives for {config.model.family}: {', '.join(allowed)}."
        )


def model_section_with_family(model_section, overrides: dict | None) -> dict:
    """Return the model section with an overridden ``family`` applied, so that other overrides are checked against it."""
    if not isinstance(model_section, dict):
        raise ValueError(f"The model section must be a mapping of field: value, found {type(model_section).__name__}.")
    if overrides and "model.family" in overrides:
        return {**model_section, "family": overrides["model.family"]}
    return model_section


def resolve_run_config(raw: dict, overrides: dict | None = None, vocab_size: int | None = None) -> RunConfig:
    """Validate a raw config dict (with overrides) into a ``RunConfig``.

    ``vocab_size`` fills ``model.vocab_size`` when the file leaves it unset (char-level presets
    take it from the tokenizer built on the corpus).
    """
    raw = {key: value for key, value in raw.items() if key != "format_version"}
    if "model" not in raw or not raw["model"]:
        raise ValueError("The config has no 'model' section; it must name at least model.family.")
    merged = apply_overrides(raw, overrides or {}, known_fields(model_section_with_family(raw["model"], overrides)))
    model_section = dict(merged["model"])
    if model_section.get("vocab_size") is None:
        if vocab_size is None:
            raise ValueError("model.vocab_size is unset; it is taken from the tokenizer once one is built.")
        model_section["vocab_size"] = vocab_size
    sections = {
        name: dataclass_from_dict(cls, merged.get(name) or {}, name) for name, cls in SECTION_CLASSES.items()
    }
    config = RunConfig(model=config_from_dict(model_section), **sections)
    check_objective_fits_family(config)
    return config


def load_run_config(name_or_path: str, overrides: dict | None = None) -> dict:
    """Load a preset or YAML file and check its overrides; returns the raw merged dict."""
    raw = load_config_file(name_or_path)
    if "model" not in raw:
        raise ValueError(f"{name_or_path} has no 'model' section.")
    merged = apply_overrides(raw, overrides or {}, known_fields(model_section_with_family(raw["model"], overrides)))
    return {section: merged[section] for section in SECTIONS}
