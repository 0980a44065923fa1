"""Config plumbing shared by every family: validated frozen dataclasses, YAML presets, overrides.

A config file is YAML with the sections ``model`` (which names its ``family``), ``data``,
``tokenizer``, ``objective`` and ``train``. Presets are such files shipped as package data in
``minformer/configs/NAME.yaml``. Overrides are ``section.field=value`` strings; an unknown
section or field raises a ``ValueError`` that lists the close matches.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

CONFIG_FORMAT_VERSION = 1
SECTIONS = ("model", "data", "tokenizer", "objective", "train")


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads exponent floats without a dot (``6e-4``) as numbers.

    PyYAML follows YAML 1.1, where ``6e-4`` is a string; YAML 1.2 and every other tool read it as a
    number, and learning rates are habitually written that way.
    """


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML ``text`` with ``ConfigLoader`` (safe: plain data only, no Python objects)."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader


def close_matches_hint(name: str, candidates) -> str:
    """Return a ' Did you mean ...?' suffix naming the candidates closest to ``name``.

    A candidate that is the initials of ``name``'s words also matches (``learning_rate`` finds ``lr``).
    """
    candidates = list(candidates)
    matches = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    initials = "".join(word[0] for word in name.split("_") if word)
    if len(initials) > 1 and initials in candidates and initials not in matches:
        matches.insert(0, initials)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(match) for match in matches) + "?"


def check_choice(field: str, value: Any, allowed) -> None:
    """Raise a ``ValueError`` naming ``field`` when ``value`` is not one of ``allowed``."""
    # Compared with types too, so that 1 is not taken for True nor 0.0 for 0.
    if not any(type(value) is type(choice) and value == choice for choice in allowed):
        raise ValueError(f"{field}={value!r} is invalid; allowed values: {', '.join(map(repr, allowed))}.")


def check_positive(field: str, value: Any, allow_zero: bool = False) -> None:
    """Raise a ``ValueError`` naming ``field`` unless ``value`` is a positive (or non-negative) number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}={value!r} is invalid; expected a number.")
    if not math.isfinite(value):
        raise ValueError(f"{field}={value!r} is invalid; expected a finite number.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{field}={value!r} is invalid; it must be {bound}.")


def check_int(field: str, value: Any, minimum: int = 1) -> None:
    """Raise a ``ValueError`` naming ``field`` unless ``value`` is an integer of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}={value!r} is invalid; expected an integer.")
    if value < minimum:
        raise ValueError(f"{field}={value!r} is invalid; it must be at least {minimum}.")


def dataclass_from_dict(cls, values: Mapping[str, Any], section: str):
    """Build dataclass ``cls`` from ``values``, rejecting unknown keys with close matches."""
    field_names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in field_names:
            hint = close_matches_hint(key, field_names)
            raise ValueError(f"Unknown field '{section}.{key}'.{hint} Known fields: {', '.join(field_names)}.")
    return cls(**dict(values))


def load_preset(name: str) -> dict:
    """Load a preset shipped with minformer by name (never a path), as a plain dict."""
    names = preset_names()
    if name not in names:
        hint = close_matches_hint(str(name), names)
        raise ValueError(f"Unknown preset {str(name)!r}.{hint} Available presets: {', '.join(names)}.")
    return load_config_file(name)


class FamilyConfig:
    """Mixin of every family's config dataclass: reading a ``model`` section or a preset, and writing one.

    The subclass sets ``family`` (a class attribute, not a field) and is a frozen dataclass.
    """

    family: str = ""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Build from a ``model`` section; its ``family`` key, if present, must be this class's family."""
        values = dict(values)
        family = values.pop("family", cls.family)
        if family != cls.family:
            raise ValueError(f"model.family={family!r} does not match {cls.__name__} (family {cls.family!r}).")
        return dataclass_from_dict(cls, values, "model")

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """Return the ``model`` section of preset ``name``, with field overrides applied."""
        model_section = dict(load_preset(name).get("model") or {})
        model_section.update(overrides)
        if model_section.get("vocab_size") is None:
            raise ValueError(
                f"Preset {name!r} takes vocab_size from its tokenizer; pass it, "
                f"e.g. {cls.__name__}.from_preset({name!r}, vocab_size=tokenizer.vocab_size)."
            )
        return cls.from_dict(model_section)

    def to_dict(self) -> dict:
        """Return the config as a ``model`` section, with its family."""
        return {"family": self.family, **dataclasses.asdict(self)}


def preset_names() -> list[str]:
    """List the names of every preset shipped in ``minformer/configs``."""
    folder = resources.files("minformer") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config_file(name_or_path: str | Path) -> dict:
    """Load a preset by name, or a YAML config file by path, as a plain dict."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ValueError(f"Config file not found: {path}.")
        text = path.read_text(encoding="utf-8")
        source = str(path)
    else:
        names = preset_names()
        if str(name_or_path) not in names:
            hint = close_matches_hint(str(name_or_path), names)
            raise ValueError(f"Unknown preset {str(name_or_path)!r}.{hint} Available presets: {', '.join(names)}.")
        text = (resources.files("minformer") / "configs" / f"{name_or_path}.yaml").read_text(encoding="utf-8")
        source = f"preset {name_or_path}"
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"Invalid YAML in {source}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source} must contain a mapping of sections, found {type(data).__name__}.")
    for section in data:
        if section not in SECTIONS and section != "format_version":
            hint = close_matches_hint(str(section), SECTIONS)
            raise ValueError(f"Unknown section {section!r} in {source}.{hint} Sections: {', '.join(SECTIONS)}.")
        if section in SECTIONS and data[section] is not None and not isinstance(data[section], dict):
            raise ValueError(
                f"Section {section!r} in {source} must be a mapping of field: value, found {type(data[section]).__name__}."
            )
    if data.get("format_version", CONFIG_FORMAT_VERSION) != CONFIG_FORMAT_VERSION:
        raise ValueError(
            f"{source} has format_version={data['format_version']!r}; this minformer reads format_version "
            f"{CONFIG_FORMAT_VERSION}."
        )
    return data


def parse_override_value(text: str) -> Any:
    """Parse the value of a ``--section.field=value`` override with YAML scalar rules."""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def apply_overrides(config: dict, overrides: Mapping[str, Any], known_fields: Mapping[str, list[str]]) -> dict:
    """Return a copy of ``config`` with ``{'section.field': value}`` overrides applied.

    ``known_fields`` maps each section to its field names, so that a typo fails here with the
    close matches instead of being silently ignored.
    """
    for section in SECTIONS:
        if config.get(section) is not None and not isinstance(config[section], dict):
            raise ValueError(f"Section {section!r} must be a mapping of field: value, found {type(config[section]).__name__}.")
    result = {section: dict(config.get(section) or {}) for section in SECTIONS}
    for dotted, value in overrides.items():
        section, _, field = dotted.partition(".")
        if section not in known_fields:
            hint = close_matches_hint(section, known_fields)
            raise ValueError(f"Unknown section {section!r} in override '--{dotted}'.{hint}")
        if not field:
            raise ValueError(f"Override '--{dotted}' must have the form --section.field=value.")
        if field not in known_fields[section]:
            hint = close_matches_hint(field, known_fields[section])
            raise ValueError(f"Unknown field '{section}.{field}' in override '--{dotted}'.{hint}")
        result[section][field] = value
    return result


class EncoderDecoderConfig(FamilyConfig):
    """Mixin of the encoder-decoder configs (T5 and the 2017 Transformer): the fields both validate alike.

    The subclass has the fields n_encoder_layers, n_decoder_layers, vocab_size, dropout,
    tie_embeddings, pad_token_id, eos_token_id and decoder_start_token_id.
    """

    @property
    def n_layers(self) -> int:
        """Total number of blocks in both stacks.

        NOTE: FLOPs estimates in ``minformer.scaling`` multiply per-layer costs by this number and so
        leave out the cross-attention of the decoder blocks.
        """
        return self.n_encoder_layers + self.n_decoder_layers

    def check_shared_fields(self) -> None:
        """Raise a ``ValueError`` naming the field when dropout, tie_embeddings or a special token id is invalid."""
        check_positive("dropout", self.dropout, allow_zero=True)
        if self.dropout >= 1.0:
            raise ValueError(f"dropout={self.dropout} is invalid; it must be in [0, 1).")
        check_choice("tie_embeddings", self.tie_embeddings, (True, False))
        for field in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            check_int(field, getattr(self, field), minimum=0)
            if getattr(self, field) >= self.vocab_size:
                raise ValueError(f"{field}={getattr(self, field)} is outside the vocabulary of vocab_size={self.vocab_size}.")
