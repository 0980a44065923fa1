"""Import and export of Hugging Face checkpoints, one module per family, without importing ``transformers``.

``from_hf`` picks the family from ``config.json``'s ``model_type`` (and checks its
``architectures``); ``to_hf`` picks it from the model's class. To add a family, add a
``HFFamily`` row to ``FAMILIES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from minformer.interop import bert, gpt2, t5
from minformer.interop.files import read_hf_config
from minformer.interop.gpt2 import gpt2_config_from_hf
from minformer.models.gpt import GPT


@dataclass(frozen=True)
class HFFamily:
    """Conversion of one Hugging Face model family to and from a minformer model class."""

    model_type: str
    """``model_type`` in the family's config.json."""
    architectures: tuple[str, ...]
    """Accepted entries of config.json's ``architectures`` list."""
    model_class: type[nn.Module] | tuple[type[nn.Module], ...]
    """The minformer class (or classes, one per architecture) ``from_hf`` builds and ``to_hf`` accepts."""
    read_config: Callable[[Path], object]
    """Reads config.json as the minformer config."""
    load: Callable[[Path], nn.Module]
    """Builds the model from a checkpoint directory."""
    save: Callable[[nn.Module, Path], Path]
    """Writes the model as a checkpoint directory."""


FAMILIES = {
    gpt2.MODEL_TYPE: HFFamily(
        model_type=gpt2.MODEL_TYPE,
        architectures=gpt2.ARCHITECTURES,
        model_class=GPT,
        read_config=gpt2_config_from_hf,
        load=gpt2.load_gpt2,
        save=gpt2.save_gpt2,
    ),
    bert.MODEL_TYPE: HFFamily(
        model_type=bert.MODEL_TYPE,
        architectures=bert.ARCHITECTURES,
        model_class=tuple(bert.MODEL_CLASSES.values()),
        read_config=bert.bert_config_from_hf,
        load=bert.load_bert,
        save=bert.save_bert,
    ),
    t5.MODEL_TYPE: HFFamily(
        model_type=t5.MODEL_TYPE,
        architectures=t5.ARCHITECTURES,
        model_class=t5.T5,
        read_config=t5.t5_config_from_hf,
        load=t5.load_t5,
        save=t5.save_t5,
    ),
}


def family_for_directory(directory: Path) -> HFFamily:
    """Return the family of the checkpoint in ``directory``, raising ``ValueError`` for an unsupported one."""
    hf_config = read_hf_config(directory)
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"{directory / 'config.json'} has model_type={model_type!r}, which minformer cannot import; "
            f"supported model types: {', '.join(FAMILIES)}."
        )
    family = FAMILIES[model_type]
    unsupported = [name for name in hf_config.get("architectures") or [] if name not in family.architectures]
    if unsupported:
        raise ValueError(
            f"{directory / 'config.json'} lists architectures {unsupported}; supported {model_type} "
            f"architectures: {', '.join(family.architectures)}."
        )
    return family


def from_hf(directory: str | Path) -> nn.Module:
    """Build a minformer model, in eval mode, from a Hugging Face checkpoint directory."""
    directory = Path(directory)
    return family_for_directory(directory).load(directory)


def config_from_hf(directory: str | Path):
    """Read a Hugging Face checkpoint's config.json as the matching minformer config (e.g. ``GPTConfig``)."""
    directory = Path(directory)
    return family_for_directory(directory).read_config(directory)


def to_hf(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint (config.json, model.safetensors) in ``directory``; returns it.

    With ``tokenizer`` (a minformer tokenizer), its ``tokenizer.json`` is written too, so that the
    directory also serves ``minformer train --init-from``.
    """
    for family in FAMILIES.values():
        if isinstance(model, family.model_class):
            written = family.save(model, Path(directory))
            if tokenizer is not None:
                tokenizer.save(Path(directory) / "tokenizer.json")
            return written
    supported = ", ".join(
        model_class.__name__
        for family in FAMILIES.values()
        for model_class in (family.model_class if isinstance(family.model_class, tuple) else (family.model_class,))
    )
    raise ValueError(f"to_hf cannot export a {type(model).__name__}; supported model classes: {supported}.")


__all__ = ["FAMILIES", "HFFamily", "config_from_hf", "from_hf", "gpt2_config_from_hf", "to_hf"]
