"""Adapter files and training checkpoints that are safe to load and survive a crash while saving.

* **Safe.** Files are written by ``torch.save`` and read by ``torch.load(weights_only=True)``, which
  unpickles tensors and plain containers only: a file from a stranger cannot run code.
* **Atomic.** A save writes a temporary file in the target's folder, fsyncs it, and ``os.replace``\\ s it
  over the target: a crash at any moment leaves either the old file or the new one, never a mix.
* **Checked.** ``torch.load`` does not notice flipped bytes inside a tensor, so every file carries a
  SHA-256 of its content. A load verifies it, then checks the file against the model (layer names,
  ``in/out``, ``r``, ``α``, ``s``, ``use_rslora``, ``eps``, and a sketch ``W g`` of each pretrained weight),
  and only then changes anything. Every problem is a ``ValueError`` naming the file and what is wrong.

An adapter file holds what :func:`lora_dash.adapter_state_dict` holds; a training checkpoint adds the
optimizer state, the :class:`LaunchController` state and the RNG states (Python, NumPy, torch, CUDA),
so that a resumed run is bit-identical to one that never stopped.
"""

import hashlib
import io
import math
import os
import pickle
import random
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lora_dash.inject import dash_layers
from lora_dash.layer import LoRADashLinear
from lora_dash.schedule import LaunchController
from lora_dash.state import adapter_state_dict, load_adapter_state_dict

ADAPTER_FORMAT = "lora_dash.adapter"
TRAINING_FORMAT = "lora_dash.training"
VERSION = 1
#: Relative tolerance of the pretrained-weight check: loose enough for a bf16 copy of the same weights
#: (relative rounding 2⁻⁹), far tighter than the distance between two different weights (about √2).
BASE_RTOL = 1e-2


# ------------------------------------------------------------------------------- adapter files
def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every LoRA-Dash layer's adapter state (both phases) to ``path``, atomically.

    Under FSDP2 every rank must call it (the shards are gathered); give each rank its own path or
    let one rank's call write. Pass the unwrapped model (``ddp.module``) so names carry no ``module.``.
    """
    _write(path, ADAPTER_FORMAT, _adapter_content(model))


def load_adapter(model: nn.Module, path: str | os.PathLike, check_base: bool = True) -> None:
    """Load an adapter file written by :func:`save_adapter` into ``model``: all of it, or (on error) nothing.

    Args:
        check_base: refuse a file saved for another pretrained weight (``‖W' g − W g‖ > 1e-2 ‖W g‖``
            for a fixed probe ``g``); ``False`` loads it anyway, e.g. onto a fine-tuned variant.

    Raises:
        ValueError: a file that is not a LoRA-Dash adapter, holds anything but tensors and plain
            containers, is truncated or corrupted, or does not fit the model (names, shapes,
            hyper-parameters, pretrained weights, phase).
        RuntimeError: a target layer is merged.
        OSError: the file cannot be read.
    """
    content = _read(path, ADAPTER_FORMAT)
    _load_adapter_content(model, content, path, check_base)


# -------------------------------------------------------------------------- training checkpoints
def save_training_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, controller: LaunchController, path: str | os.PathLike
) -> None:
    """Write everything a bit-identical resume needs: adapter, optimizer, controller and RNG states."""
    content = {
        "adapter": _adapter_content(model),
        "optimizer": optimizer.state_dict(),
        "controller": controller.state_dict(),
        "rng": _rng_state(),
    }
    _write(path, TRAINING_FORMAT, content)


def load_training_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, controller: LaunchController, path: str | os.PathLike
) -> None:
    """Restore a checkpoint of :func:`save_training_checkpoint`: all of it, or (on error) nothing.

    Build the model, inject, build the optimizer from :func:`lora_dash.adapter_parameters` and the
    controller (attached or not) exactly as in the first run, then call this.

    Raises:
        ValueError: as :func:`load_adapter`; also an optimizer or controller state that does not fit
            (another ``launch_step``; a step count that disagrees with the adapter's phase).
    """
    content = _read(path, TRAINING_FORMAT)
    _expect(isinstance(content, dict) and set(content) == {"adapter", "optimizer", "controller", "rng"},
            path, "is not a training checkpoint")
    _check_optimizer_state(optimizer, content["optimizer"], path)
    before = adapter_state_dict(model), controller.steps, _rng_state()
    _load_adapter_content(model, content["adapter"], path, check_base=True)  # all or nothing by itself
    try:
        controller.load_state_dict(content["controller"])  # checks the step count against the loaded phase
        _set_rng_state(content["rng"])
        optimizer.load_state_dict(content["optimizer"])  # checks its groups before it changes anything
    except Exception as error:  # put back what was loaded, so the caller's objects are as they were
        load_adapter_state_dict(model, before[0])
        controller.steps = before[1]
        _set_rng_state(before[2])
        raise ValueError(f"{path}: {error}") from error


# ------------------------------------------------------------------------------------ content
def _layer_config(layer: LoRADashLinear) -> dict[str, Any]:
    return {"in_features": layer.in_features, "out_features": layer.out_features, "r": layer.r,
            "alpha": layer.alpha, "s": layer.s, "use_rslora": layer.use_rslora, "eps": layer.eps}


def _base_sketch(layer: LoRADashLinear) -> Tensor:
    """``W g`` in float32 for the fixed probe ``g_j = sin(√2 (j + 1))``: a fingerprint of the pretrained
    weight that needs no RNG (so it does not change with torch's generators) and costs one mat-vec."""
    probe = torch.sin(math.sqrt(2) * torch.arange(1, layer.in_features + 1, dtype=torch.float64))
    weight = layer.base_weight().detach().float()
    return (weight @ probe.to(weight)).cpu()


def _adapter_content(model: nn.Module) -> dict[str, Any]:
    layers = dash_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA-Dash layers; call inject() first")
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:  # a merged base would fingerprint as W + ΔW
        raise RuntimeError(f"layers {merged} are merged; unmerge() before saving")
    return {
        "layers": {name: {**_layer_config(layer), "base_sketch": _base_sketch(layer)}
                   for name, layer in layers.items()},
        "state": {key: value.cpu() for key, value in adapter_state_dict(model).items()},
    }


def _load_adapter_content(model: nn.Module, content: Any, path: str | os.PathLike, check_base: bool) -> None:
    _expect(isinstance(content, dict) and set(content) == {"layers", "state"}
            and isinstance(content["layers"], dict) and isinstance(content["state"], dict),
            path, "is not a LoRA-Dash adapter")
    layers, saved = dash_layers(model), content["layers"]
    if set(saved) != set(layers):
        raise ValueError(f"{path}: the adapter is for layers {sorted(saved)}, the model has {sorted(layers)}")
    for name, layer in layers.items():
        info = saved[name]
        _expect(isinstance(info, dict), path, f"has no configuration for layer {name!r}")
        expected = _layer_config(layer)
        differs = {key: (info.get(key), value) for key, value in expected.items() if info.get(key) != value}
        if differs:
            described = ", ".join(f"{key}={saved!r} (model: {current!r})"
                                  for key, (saved, current) in differs.items())
            raise ValueError(f"{path}: layer {name!r} was saved with {described}")
        if check_base and not layer.merged:  # a merged layer is refused below, with its own message
            _check_base(name, layer, info.get("base_sketch"), path)
    try:
        load_adapter_state_dict(model, content["state"])
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def _check_base(name: str, layer: LoRADashLinear, saved: Any, path: str | os.PathLike) -> None:
    _expect(isinstance(saved, Tensor) and saved.shape == (layer.out_features,) and saved.dtype == torch.float32,
            path, f"has no valid pretrained-weight sketch for layer {name!r}")
    distance = torch.linalg.vector_norm(_base_sketch(layer) - saved)
    if not distance <= BASE_RTOL * torch.linalg.vector_norm(saved):
        raise ValueError(
            f"{path}: layer {name!r} was saved for another pretrained weight (‖W'g − Wg‖ / ‖Wg‖ = "
            f"{float(distance / torch.linalg.vector_norm(saved)):.3g} > {BASE_RTOL}); load it into the model it "
            "was trained on, or pass check_base=False to load it anyway"
        )


def _check_optimizer_state(optimizer: torch.optim.Optimizer, state: Any, path: str | os.PathLike) -> None:
    """What ``optimizer.load_state_dict`` leaves unchecked: every state tensor has its parameter's shape."""
    _expect(isinstance(state, dict) and isinstance(state.get("state"), dict)
            and isinstance(state.get("param_groups"), list), path, "holds no optimizer state")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entries in state["state"].items():
        _expect(isinstance(index, int) and 0 <= index < len(params) and isinstance(entries, dict),
                path, f"holds optimizer state for parameter {index!r}; the optimizer has {len(params)}")
        for key, value in entries.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise ValueError(f"{path}: optimizer state {key!r} of parameter {index} has shape "
                                 f"{tuple(value.shape)}, the parameter {tuple(params[index].shape)}")


# ---------------------------------------------------------------------------------------- RNG
def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {**numpy_state["state"],
                                           "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    numpy_state = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"],
                                                  "key": numpy_state["state"]["key"].numpy().astype(np.uint32)}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ file I/O
def _write(path: str | os.PathLike, file_format: str, content: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, ``os.replace``, fsync the folder."""
    path = Path(path)
    payload = {"format": file_format, "version": VERSION, "content": content, "checksum": _checksum(content)}
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, as for open()
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable; other systems cannot open a folder
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _read(path: str | os.PathLike, file_format: str) -> Any:
    """The verified ``content`` of a file written by :func:`_write` with ``file_format``."""
    with open(path, "rb") as file:  # OSError (missing file, a folder, no permission) passes through
        data = file.read()
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file makes the unpickler raise almost anything
        if isinstance(error, pickle.UnpicklingError):  # what weights_only raises for a forbidden object
            raise ValueError(f"{path}: refused: it holds objects other than tensors and plain containers (which "
                             "could run code when loaded), or it is truncated or corrupted") from error
        raise ValueError(f"{path}: unreadable, truncated or corrupted ({type(error).__name__}: {error})") from error
    _expect(isinstance(payload, dict) and set(payload) == {"format", "version", "content", "checksum"},
            path, "is not a LoRA-Dash file")
    if payload["format"] != file_format:
        raise ValueError(f"{path}: is a {payload['format']!r} file, expected {file_format!r}")
    if payload["version"] != VERSION:
        raise ValueError(f"{path}: has format version {payload['version']!r}; this library reads {VERSION}")
    if payload["checksum"] != _checksum(payload["content"]):
        raise ValueError(f"{path}: corrupted: its content does not match its SHA-256 checksum")
    return payload["content"]


def _expect(condition: bool, path: str | os.PathLike, problem: str) -> None:
    if not condition:
        raise ValueError(f"{path}: {problem}")


def _checksum(content: Any) -> str:
    hasher = hashlib.sha256()
    _digest(content, hasher)
    return "sha256:" + hasher.hexdigest()


def _digest(value: Any, hasher: Any) -> None:
    """Feed a canonical encoding of nested dicts, lists, tuples, tensors and scalars to ``hasher``."""
    if isinstance(value, Tensor):
        tensor = value.detach().cpu().contiguous()
        hasher.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}:".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        hasher.update(f"dict {len(value)}:".encode())
        for key in sorted(value, key=repr):
            _digest(key, hasher)
            _digest(value[key], hasher)
    elif isinstance(value, (list, tuple)):
        hasher.update(f"{type(value).__name__} {len(value)}:".encode())
        for item in value:
            _digest(item, hasher)
    else:
        hasher.update(f"{type(value).__name__} {value!r};".encode())
