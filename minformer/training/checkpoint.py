"""Checkpoints: safetensors weights and optimizer state, JSON training state, written atomically.

Layout inside a run directory::

    checkpoints/step-000500/{model,optimizer}.safetensors, state.json
    latest -> checkpoints/step-000500          (symbolic link, replaced by one rename)
    model.safetensors -> latest/model.safetensors, and the same for optimizer and state

A checkpoint folder is written under a temporary name and renamed into place; then a new
``latest`` link is made under a temporary name and renamed over the old one. Both renames are
atomic, so a run killed at any moment leaves the previous checkpoint whole and reachable.
Nothing here unpickles: tensors come from safetensors, the rest from JSON.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or does not fit the model."""


def current_umask() -> int:
    """Return the process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file readable by its owner only; a run is shared like any other file.
        os.chmod(temp_name, 0o666 & ~current_umask())
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def model_state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the model's persistent tensors by name, with tied weights stored once (under the first name)."""
    tensors, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors


def optimizer_state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Flatten AdamW state to ``{param_name}.{exp_avg|exp_avg_sq|step}`` tensors."""
    names = {}
    for name, parameter in model.named_parameters(remove_duplicate=True):
        names[id(parameter)] = name
    tensors = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                value = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"{names[id(parameter)]}.{key}"] = value.detach().contiguous().cpu()
    return tensors


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict) -> None:
    """Restore AdamW state written by ``optimizer_state_tensors``."""
    for name, parameter in model.named_parameters(remove_duplicate=True):
        state = {}
        for key in ("exp_avg", "exp_avg_sq", "step"):
            full_name = f"{name}.{key}"
            if full_name in tensors:
                value = tensors[full_name]
                state[key] = value.to(parameter.device) if key != "step" else value.clone()
        if state:
            if state["exp_avg"].shape != parameter.shape:
                raise CheckpointError(f"Optimizer state for {name} has shape {tuple(state['exp_avg'].shape)}, "
                                      f"but the parameter has {tuple(parameter.shape)}.")
            optimizer.state[parameter] = state


def encode_rng_state(state: torch.Tensor) -> str:
    """A generator state (uint8 tensor) as base64 text for state.json."""
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def decode_rng_state(text: str) -> torch.Tensor:
    """Inverse of ``encode_rng_state``."""
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def write_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep: int = 2) -> Path:
    """Write the checkpoint of optimizer step ``step`` and point ``latest`` at it atomically."""
    run_dir = Path(run_dir)
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"step-{step:07d}"
    temp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:07d}-", dir=checkpoints))
    os.chmod(temp, 0o777 & ~current_umask())  # mkdtemp makes it owner-only
    try:
        save_file(model_state_tensors(model), str(temp / "model.safetensors"))
        save_file(optimizer_state_tensors(model, optimizer), str(temp / "optimizer.safetensors"))
        (temp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        for name in CHECKPOINT_FILES:
            with open(temp / name, "rb") as file:
                os.fsync(file.fileno())
        if final.exists():
            # The same step was saved before (Ctrl-C right after a checkpoint): that folder contains
            # the same weights and data position, and deleting it first would open a window with
            # no checkpoint of this step.
            shutil.rmtree(temp)
        else:
            os.replace(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    point_latest(run_dir, final)
    prune_checkpoints(run_dir, keep)
    return final


def point_latest(run_dir: Path, checkpoint_dir: Path) -> None:
    """Make ``run_dir/latest`` and the top-level file links point at ``checkpoint_dir``, by renames."""
    link_temp = run_dir / f".latest-{os.getpid()}.tmp"
    link_temp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(checkpoint_dir, run_dir), link_temp)
    os.replace(link_temp, run_dir / "latest")
    for name in CHECKPOINT_FILES:
        top = run_dir / name
        if not top.is_symlink():
            top.unlink(missing_ok=True)
            os.symlink(os.path.join("latest", name), top)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temporary folders are not listed)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.is_dir() and path.name.startswith("step-"))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and temporary folders and links left by killed runs."""
    latest = latest_checkpoint(run_dir)
    for path in complete_checkpoints(run_dir)[:-keep]:
        if latest is None or path.resolve() != latest.resolve():
            shutil.rmtree(path, ignore_errors=True)
    for path in (Path(run_dir) / "checkpoints").glob(".tmp-step-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in Path(run_dir).glob(".latest-*.tmp"):
        path.unlink(missing_ok=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Return the checkpoint ``latest`` points at, else the newest complete one, else None."""
    link = Path(run_dir) / "latest"
    if link.is_symlink() and link.resolve().is_dir():
        return link.resolve()
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_checkpoint(checkpoint_dir: Path) -> tuple[dict, dict, dict]:
    """Read ``(model tensors, optimizer tensors, state)``, raising ``CheckpointError`` on damage."""
    checkpoint_dir = Path(checkpoint_dir)
    for name in CHECKPOINT_FILES:
        if not (checkpoint_dir / name).is_file():
            raise CheckpointError(f"Checkpoint {checkpoint_dir} is missing {name}.")
    model_tensors = read_tensor_file(checkpoint_dir / "model.safetensors")
    optimizer_tensors = read_tensor_file(checkpoint_dir / "optimizer.safetensors")
    try:
        state = json.loads((checkpoint_dir / "state.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{checkpoint_dir / 'state.json'} is corrupt: {error}") from None
    return model_tensors, optimizer_tensors, state


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """Read one safetensors file, raising ``CheckpointError`` that names the file on damage."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupt or truncated: {error}") from None


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``model``, raising ``CheckpointError`` naming any missing, extra or misshapen tensor."""
    expected = model_state_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    for name, tensor in tensors.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the config expects {tuple(expected[name].shape)}."
            )
    model.load_state_dict(tensors, strict=False)
