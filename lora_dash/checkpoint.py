"""Adapter files and training checkpoints that are safe to load and survive a crash while saving.

* **Adapter files** are safetensors files, the format this ecosystem uses for adapters. The body
  holds :func:`lora_dash.adapter_state_dict` (each tensor under its ``model.state_dict()`` key,
  modules that train in full included) and, for each LoRA-Dash layer, ``"<layer>.base_sketch"``:
  ``W g``, a fingerprint of its pretrained weight (below). The header's metadata holds ``format``,
  ``version``, ``phase`` (``"pre-launch"`` or ``"dash"``), ``layers`` (JSON: each layer's
  ``in/out_features``, ``r``, ``alpha``, ``s``, ``use_rslora``, ``eps``), ``trained_modules`` (JSON
  list of names) and ``checksum``. The sketches are tensors in the body, not JSON in the header:
  they keep their exact float32 bits, cost 4 bytes an entry instead of about 20 (``out_features``
  entries per layer), and are read by the same loader.
* **Training checkpoints** hold optimizer state too, so they are ``torch.save`` files, read by
  ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only.
* **Safe.** Neither format runs code when loaded: safetensors never unpickles, and a torch file with
  any other object is refused.
* **Atomic.** A save writes a temporary file in the target's folder, fsyncs it, and
  ``os.replace``\\ s it over the target: a crash at any moment leaves either the old file or the
  new one, never a mix.
* **Checked.** Neither safetensors nor ``torch.load`` notices flipped bytes inside a tensor, so
  every file carries a SHA-256 of its metadata and tensors. A load verifies it, then checks the file
  against the model (layer names, hyper-parameters, the sketch of each pretrained weight, the
  phase, the modules that train in full), and only then changes anything. Every problem is a
  ``ValueError`` naming the file and what is wrong.

A training checkpoint adds to the adapter the optimizer state, the :class:`LaunchController` state
and the RNG states (Python, NumPy, torch, CUDA), so that a resumed run is bit-identical to one that
never stopped.
"""

import hashlib
import io
import json
import math
import os
import pickle
import random
import secrets
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn

from lora_dash.inject import dash_layers, require_dash_layers, trained_modules
from lora_dash.layer import LoRADashLinear
from lora_dash.schedule import LaunchController
from lora_dash.state import adapter_state_dict, load_adapter_state_dict

ADAPTER_FORMAT = "lora_dash.adapter"
TRAINING_FORMAT = "lora_dash.training"
VERSION = 2
PHASES = ("pre-launch", "dash")
SKETCH_SUFFIX = ".base_sketch"
#: Relative tolerance of the pretrained-weight check: loose enough for a bf16 copy of the same
#: weights (relative rounding 2⁻⁹), far tighter than the distance between two different weights
#: (about √2).
BASE_RTOL = 1e-2
#: How a ``torch.save`` file starts (its zip archive, or a raw pickle of protocol 2 or later).
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def safetensors_torch() -> ModuleType:
    """``safetensors.torch``, imported on first use: files need it, the core library does not."""
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError(
            "adapter files are safetensors files: pip install safetensors "
            '(or pip install "lora-dash[files]")'
        ) from error
    return safetensors.torch


# ------------------------------------------------------------------------------- adapter files
def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter (every LoRA-Dash layer, both phases, and every module that trains in full)
    to ``path`` as a safetensors file, atomically.

    Under FSDP2 every rank must call it (the shards are gathered); give each rank its own path or
    let one rank's call write. Pass the unwrapped model (``ddp.module``) so that names carry no
    ``module.`` prefix.

    Raises:
        ImportError: ``safetensors`` is not installed.
        ValueError: no LoRA-Dash layer, or layers in different phases. Nothing is written then.
        RuntimeError: a layer is merged (its base would fingerprint as ``W + ΔW``).
    """
    save = safetensors_torch().save
    content = _adapter_content(model)
    metadata = {"format": ADAPTER_FORMAT, "version": str(VERSION), **content["metadata"]}
    metadata["checksum"] = _checksum({"metadata": metadata, "tensors": content["tensors"]})
    data = save(content["tensors"], metadata=metadata)
    _write(path, lambda file: file.write(data))


def load_adapter(model: nn.Module, path: str | os.PathLike, check_base: bool = True) -> None:
    """Load an adapter file written by :func:`save_adapter` into ``model``: all of it, or (on
    error) nothing.

    Build the model and ``inject`` exactly as in training (same targets, hyper-parameters and
    ``modules_to_save``), then call this.

    Args:
        check_base: refuse a file saved for another pretrained weight (``‖W' g − W g‖ > 1e-2 ‖W g‖``
            for a fixed probe ``g``); ``False`` loads it anyway, e.g. onto a fine-tuned variant.

    Raises:
        ImportError: ``safetensors`` is not installed.
        ValueError: a file that is not a LoRA-Dash adapter file (a ``torch.save`` file is refused
            without being unpickled), is truncated or corrupted, or does not fit the model (names,
            shapes, hyper-parameters, pretrained weights, phase, modules that train in full).
        RuntimeError: a target layer is merged.
        OSError: the file cannot be read.
    """
    load = safetensors_torch().load
    # An OSError (missing file, a folder, no permission) passes through.
    with open(path, "rb") as file:
        data = file.read()
    try:
        tensors = load(data)
    except Exception as error:  # safetensors raises its own SafetensorError, or others on odd input
        if data.startswith(TORCH_FILE_STARTS):
            raise ValueError(
                f"{path}: refused: it looks like a torch.save (pickle) file, not a safetensors "
                "adapter file, and was not unpickled (a training checkpoint loads with "
                "load_training_checkpoint)"
            ) from error
        raise ValueError(
            f"{path}: unreadable, truncated or corrupted ({type(error).__name__}: {error})"
        ) from error
    # safetensors has just parsed this header: an 8-byte little-endian length, then JSON.
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    metadata = dict(header.get("__metadata__") or {})
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(
            f"{path}: is not a LoRA-Dash adapter file (its header says format "
            f"{metadata.get('format')!r}, expected {ADAPTER_FORMAT!r})"
        )
    if metadata.get("version") != str(VERSION):
        raise ValueError(
            f"{path}: has format version {metadata.get('version')!r}; this library reads {VERSION}"
        )
    checksum = metadata.pop("checksum", None)
    if checksum != _checksum({"metadata": metadata, "tensors": tensors}):
        raise ValueError(
            f"{path}: corrupted: its metadata and tensors do not match its SHA-256 checksum"
        )
    del metadata["format"], metadata["version"]
    _load_adapter_content(model, {"metadata": metadata, "tensors": tensors}, path, check_base)


# -------------------------------------------------------------------------- training checkpoints
def save_training_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    controller: LaunchController,
    path: str | os.PathLike,
) -> None:
    """Write all a bit-identical resume needs: the adapter, optimizer, controller and RNG states."""
    content = {
        "adapter": _adapter_content(model),
        "optimizer": optimizer.state_dict(),
        "controller": controller.state_dict(),
        "rng": _rng_state(),
    }
    payload = {
        "format": TRAINING_FORMAT,
        "version": VERSION,
        "content": content,
        "checksum": _checksum(content),
    }
    _write(path, lambda file: torch.save(payload, file))


def load_training_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    controller: LaunchController,
    path: str | os.PathLike,
) -> None:
    """Restore a checkpoint of :func:`save_training_checkpoint`: all of it, or (on error) nothing.

    Build the model, inject, build the optimizer from :func:`lora_dash.adapter_parameters` and the
    controller (attached or not) exactly as in the first run, then call this.

    Raises:
        ValueError: as :func:`load_adapter`; also an optimizer or controller state that does not fit
            (another ``launch_step``; a step count that disagrees with the adapter's phase).
    """
    content = _read(path, TRAINING_FORMAT)
    parts = {"adapter", "optimizer", "controller", "rng"}
    is_checkpoint = isinstance(content, dict) and set(content) == parts
    _expect(is_checkpoint, path, "is not a training checkpoint")
    _check_optimizer_state(optimizer, content["optimizer"], path)
    before = adapter_state_dict(model), controller.steps, _rng_state()
    # Loading the adapter is all or nothing by itself; what follows is undone by hand on error.
    _load_adapter_content(model, content["adapter"], path, check_base=True)
    try:
        # The controller checks its step count against the phase just loaded, and the optimizer
        # checks its groups before it changes anything.
        controller.load_state_dict(content["controller"])
        _set_rng_state(content["rng"])
        optimizer.load_state_dict(content["optimizer"])
    except Exception as error:  # put back what was loaded, so the caller's objects are as they were
        load_adapter_state_dict(model, before[0])
        controller.steps = before[1]
        _set_rng_state(before[2])
        raise ValueError(f"{path}: {error}") from error


# ------------------------------------------------------------------------------------ content
def _layer_config(layer: LoRADashLinear) -> dict[str, Any]:
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "r": layer.r,
        "alpha": layer.alpha,
        "s": layer.s,
        "use_rslora": layer.use_rslora,
        "eps": layer.eps,
    }


def _base_sketch(layer: LoRADashLinear) -> Tensor:
    """``W g`` in float32 for the fixed probe ``g_j = sin(√2 (j + 1))``: a fingerprint of the
    pretrained weight that needs no RNG (so it does not change with torch's generators) and costs
    one mat-vec."""
    probe = torch.sin(math.sqrt(2) * torch.arange(1, layer.in_features + 1, dtype=torch.float64))
    weight = layer.base_weight().detach().float()
    return (weight @ probe.to(weight)).cpu()


def _adapter_content(model: nn.Module) -> dict[str, Any]:
    """``{"metadata": {str: str}, "tensors": {str: Tensor}}``: the header entries and body of an
    adapter file (less format, version and checksum); a training checkpoint holds it as it is."""
    layers = require_dash_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:  # a merged base would fingerprint as W + ΔW
        raise RuntimeError(f"layers {merged} are merged; unmerge() before saving")
    launched = {name: layer.launched for name, layer in layers.items()}
    # load_adapter_state_dict refuses layers in mixed phases: do not write such a state.
    if len(set(launched.values())) > 1:
        raise ValueError(
            f"the layers are in different phases (launched: {launched}); launch all or none"
        )
    metadata = {
        "phase": PHASES[next(iter(launched.values()))],
        "layers": json.dumps({name: _layer_config(layer) for name, layer in layers.items()}),
        "trained_modules": json.dumps(list(trained_modules(model))),
    }
    # safetensors writes contiguous CPU tensors only.
    tensors = {key: value.cpu().contiguous() for key, value in adapter_state_dict(model).items()}
    tensors.update({name + SKETCH_SUFFIX: _base_sketch(layer) for name, layer in layers.items()})
    return {"metadata": metadata, "tensors": tensors}


def _load_adapter_content(
    model: nn.Module, content: Any, path: str | os.PathLike, check_base: bool
) -> None:
    _expect(
        isinstance(content, dict)
        and set(content) == {"metadata", "tensors"}
        and isinstance(content["metadata"], dict)
        and isinstance(content["tensors"], dict),
        path,
        "is not a LoRA-Dash adapter",
    )
    metadata, tensors = content["metadata"], content["tensors"]
    layers, saved = dash_layers(model), _header_entry(metadata, "layers", dict, path)
    if set(saved) != set(layers):
        raise ValueError(
            f"{path}: the adapter is for layers {sorted(saved)}, the model has {sorted(layers)}"
        )
    saved_trained = _header_entry(metadata, "trained_modules", list, path)
    trained = list(trained_modules(model))
    if sorted(map(str, saved_trained)) != sorted(trained):
        raise ValueError(
            f"{path}: the adapter trains modules {saved_trained} in full, the model {trained}; "
            "inject with the same modules_to_save"
        )
    for name, layer in layers.items():
        info = saved[name]
        _expect(isinstance(info, dict), path, f"has no configuration for layer {name!r}")
        expected = _layer_config(layer)
        differs = [key for key, value in expected.items() if info.get(key) != value]
        if differs:
            described = ", ".join(
                f"{key}={info.get(key)!r} (model: {expected[key]!r})" for key in differs
            )
            raise ValueError(f"{path}: layer {name!r} was saved with {described}")
        if check_base and not layer.merged:  # a merged layer is refused below, with its own message
            _check_base(name, layer, tensors.get(name + SKETCH_SUFFIX), path)
    sketches = {name + SKETCH_SUFFIX for name in layers}
    state = {key: value for key, value in tensors.items() if key not in sketches}
    phase = metadata.get("phase")
    _expect(phase in PHASES, path, f"has phase {phase!r} in its header, expected one of {PHASES}")
    for name in layers:
        flag = state.get(f"{name}.dash_launched")
        if isinstance(flag, Tensor) and flag.numel() == 1 and PHASES[bool(flag)] != phase:
            layer_phase = PHASES[bool(flag)]
            raise ValueError(
                f"{path}: its header says phase {phase!r}, but layer {name!r} is {layer_phase}"
            )
    try:
        load_adapter_state_dict(model, state)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def _header_entry(metadata: dict, key: str, kind: type, path: str | os.PathLike) -> Any:
    """The JSON header entry ``key``, which must decode to a ``kind``."""
    try:
        value = json.loads(metadata[key])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{path}: its header has no valid {key!r} entry ({type(error).__name__}: {error})"
        ) from error
    problem = f"its header entry {key!r} is not a JSON {kind.__name__}"
    _expect(isinstance(value, kind), path, problem)
    return value


def _check_base(name: str, layer: LoRADashLinear, saved: Any, path: str | os.PathLike) -> None:
    _expect(
        isinstance(saved, Tensor)
        and saved.shape == (layer.out_features,)
        and saved.dtype == torch.float32,
        path,
        f"has no valid pretrained-weight sketch for layer {name!r}",
    )
    distance = torch.linalg.vector_norm(_base_sketch(layer) - saved)
    size = torch.linalg.vector_norm(saved)
    if not distance <= BASE_RTOL * size:
        raise ValueError(
            f"{path}: layer {name!r} was saved for another pretrained weight "
            f"(‖W'g − Wg‖ / ‖Wg‖ = {float(distance / size):.3g} > {BASE_RTOL}); load it into the "
            "model it was trained on, or pass check_base=False to load it anyway (as for an "
            "adapter trained on a quantized copy of this weight, or the reverse: they differ by "
            "the quantization error, about 0.1 at 4 bits)"
        )


def _check_optimizer_state(
    optimizer: torch.optim.Optimizer, state: Any, path: str | os.PathLike
) -> None:
    """What ``optimizer.load_state_dict`` leaves unchecked: every state tensor has its parameter's
    shape."""
    _expect(
        isinstance(state, dict)
        and isinstance(state.get("state"), dict)
        and isinstance(state.get("param_groups"), list),
        path,
        "holds no optimizer state",
    )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entries in state["state"].items():
        _expect(
            isinstance(index, int) and 0 <= index < len(params) and isinstance(entries, dict),
            path,
            f"holds optimizer state for parameter {index!r}; the optimizer has {len(params)}",
        )
        for key, value in entries.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise ValueError(
                    f"{path}: optimizer state {key!r} of parameter {index} has shape "
                    f"{tuple(value.shape)}, the parameter {tuple(params[index].shape)}"
                )


# ---------------------------------------------------------------------------------------- RNG
def _rng_state() -> dict[str, Any]:
    # NumPy's generator key is stored as a tensor: a weights_only load takes no NumPy array.
    numpy_state = np.random.get_state(legacy=False)
    key = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {**numpy_state["state"], "key": key}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    numpy_state = state["numpy"]
    key = numpy_state["state"]["key"].numpy().astype(np.uint32)
    random.setstate(state["python"])
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ file I/O
def _write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """``write`` a temporary file beside ``path``, fsync it, ``os.replace`` it over ``path``, and
    fsync the folder."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # Mode 0o666 less the umask, as open() gives.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
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
    """The verified ``content`` of a ``torch.save`` file of ``file_format``: a training
    checkpoint."""
    # An OSError (missing file, a folder, no permission) passes through.
    with open(path, "rb") as file:
        data = file.read()
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file makes the unpickler raise almost anything
        # weights_only raises UnpicklingError for a forbidden object.
        if isinstance(error, pickle.UnpicklingError):
            raise ValueError(
                f"{path}: refused: it holds objects other than tensors and plain containers (which "
                "could run code when loaded), or it is truncated or corrupted"
            ) from error
        raise ValueError(
            f"{path}: unreadable, truncated or corrupted ({type(error).__name__}: {error})"
        ) from error
    fields = {"format", "version", "content", "checksum"}
    _expect(isinstance(payload, dict) and set(payload) == fields, path, "is not a LoRA-Dash file")
    if payload["format"] != file_format:
        raise ValueError(f"{path}: is a {payload['format']!r} file, expected {file_format!r}")
    if payload["version"] != VERSION:
        raise ValueError(
            f"{path}: has format version {payload['version']!r}; this library reads {VERSION}"
        )
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
    """Feed ``hasher`` a canonical encoding of nested dicts, lists, tuples, tensors and scalars."""
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
