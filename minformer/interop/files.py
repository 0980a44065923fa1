"""The files of a Hugging Face checkpoint directory, read and written without ``transformers``.

A directory contains ``config.json`` and the weights in one of four layouts: ``model.safetensors``,
sharded safetensors listed in ``model.safetensors.index.json``, ``pytorch_model.bin``, or sharded
``.bin`` files listed in ``pytorch_model.bin.index.json``. The ``.bin`` files are pickles, so they
are read only through ``torch.load(weights_only=True)``, which rebuilds tensors and plain
containers and rejects any other object.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minformer.training.checkpoint import atomic_write_text

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"


def read_hf_config(directory: str | Path) -> dict:
    """Read ``directory/config.json`` as a dict, raising ``FileNotFoundError`` or ``ValueError`` when unusable."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; a Hugging Face checkpoint directory needs a config.json.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must contain a JSON object, got {type(config).__name__}.")
    return config


def read_hf_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of the checkpoint in ``directory``, preferring safetensors over ``.bin`` files."""
    directory = Path(directory)
    if (directory / SAFETENSORS_FILE).is_file():
        return read_safetensors(directory / SAFETENSORS_FILE)
    if (directory / SAFETENSORS_INDEX_FILE).is_file():
        return read_sharded(directory, SAFETENSORS_INDEX_FILE, read_safetensors)
    if (directory / PICKLE_FILE).is_file():
        return read_pickled_tensors(directory / PICKLE_FILE)
    if (directory / PICKLE_INDEX_FILE).is_file():
        return read_sharded(directory, PICKLE_INDEX_FILE, read_pickled_tensors)
    raise FileNotFoundError(
        f"No weights found in {directory}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX_FILE}, "
        f"{PICKLE_FILE} or {PICKLE_INDEX_FILE}."
    )


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read one safetensors file onto the CPU."""
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None


def read_pickled_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``pytorch_model.bin`` state dict with the restricted unpickler (``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Rejected {path}: it contains objects other than tensors and plain containers "
            f"(only weights_only unpickling is allowed): {error}"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path} is not a readable PyTorch state dict: {error}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} contains a {type(state).__name__}, expected a state dict of name -> tensor.")
    for name, tensor in state.items():
        if not isinstance(name, str) or not torch.is_tensor(tensor):
            raise ValueError(f"{path} entry {name!r} is a {type(tensor).__name__}, expected a tensor under a string name.")
    return state


def read_sharded(directory: Path, index_name: str, read_shard) -> dict[str, torch.Tensor]:
    """Read the shards listed in an index file's ``weight_map`` and check that they contain every listed tensor."""
    index_path = directory / index_name
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index_path} is not a valid index file with a weight_map: {error!r}") from None

    tensors = {}
    for shard_name in sorted(set(weight_map.values())):
        # Shards must sit in the directory itself; a path in the index could point anywhere.
        if not isinstance(shard_name, str) or Path(shard_name).name != shard_name:
            raise ValueError(f"{index_path} names shard {shard_name!r}; expected a file name inside {directory}.")
        shard_path = directory / shard_name
        if not shard_path.is_file():
            raise FileNotFoundError(f"Shard {shard_path} listed in {index_path} does not exist.")
        tensors.update(read_shard(shard_path))

    missing = sorted(name for name in weight_map if name not in tensors)
    if missing:
        raise ValueError(f"{index_path} lists tensors that its shards do not contain: {missing[:5]}.")
    return tensors


def write_hf_checkpoint(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``model.safetensors`` and then ``config.json`` into ``directory``, each by one atomic rename.

    Each file is whole or absent at any moment; a reader between the two renames sees new weights
    with the old config.json, if there was one. Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(directory / SAFETENSORS_FILE, tensors)
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save ``tensors`` to ``path`` through a temporary file in the same folder and one rename."""
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        # transformers rejects a safetensors file whose metadata lacks a framework format.
        save_file(tensors, temp_name, metadata={"format": "pt"})
        with open(temp_name, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
