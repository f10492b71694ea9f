"""The adapter's own state: its parameters, an adapter-only state dict, and strict loading.

"The adapter" is every LoRA-Dash layer's ``A``, ``B``, ``δ`` and launch buffers, plus the whole
state of every module that trains in full (``inject(..., modules_to_save=...)``, see
:func:`lora_dash.inject.trained_modules`). Keys are those of ``model.state_dict()``.
"""

from typing import Any

import torch
from torch import Tensor, nn

from lora_dash.bases import full_tensor, is_sharded
from lora_dash.checks import check_number
from lora_dash.inject import dash_layers, require_dash_layers, trained_modules
from lora_dash.layer import LoRADashLinear

#: What one layer saves: the trainable A, B, δ and the launch's buffers U_s, V_s, indices and phase.
LAYER_STATE_KEYS = (
    "lora_A",
    "lora_B",
    "dash_delta",
    "dash_U",
    "dash_V",
    "dash_index",
    "dash_launched",
)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What trains: every LoRA-Dash layer's ``A``, ``B``, ``δ``, then every parameter of the modules
    that train in full. Build the optimizer from these."""
    layers = dash_layers(model).values()
    factors = [p for layer in layers for p in layer.adapter_parameters()]
    return factors + _trained_parameters(model)


def _trained_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the modules that train in full, each once (two may share a parameter)."""
    modules = trained_modules(model).values()
    return list(dict.fromkeys(p for module in modules for p in module.parameters()))


def adapter_param_groups(
    model: nn.Module, lr: float, delta_lr_scale: float = 1.0, weight_decay: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: every ``A`` and ``B`` (and every parameter of the modules that
    train in full) at ``lr``, every ``δ`` at ``lr · delta_lr_scale``.

    ``δ`` are only ``s`` scalars per layer, each added to a singular value ``σ_i`` of ``W``, while
    ``A`` and ``B`` are ``r·(in + out)`` entries of an update scaled by ``α/r``: the two need not
    want the same step size. The paper trains everything with one learning rate
    (``delta_lr_scale = 1``, the default); a separate scale is beyond the paper, for experiments.
    Learning-rate schedulers scale each group's ``lr`` from its own initial value, so the ratio is
    kept.

    Usage: ``torch.optim.AdamW(adapter_param_groups(model, lr=2e-4, delta_lr_scale=10.0))``.

    Returns:
        Two groups, with ``"weight_decay"`` in both only when given::

            [{"params": [A, B, …, trained…], "lr": lr},
             {"params": [δ, …], "lr": lr · delta_lr_scale}]

        Together they hold :func:`adapter_parameters`, each once.

    Raises:
        ValueError: ``lr`` or ``delta_lr_scale`` not a finite number ``> 0``, or no LoRA-Dash layer.
    """
    check_number("lr", lr, positive=True)
    check_number("delta_lr_scale", delta_lr_scale, positive=True)
    layers = require_dash_layers(model).values()
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    factors = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
    deltas = [layer.dash_delta for layer in layers]
    return [
        {"params": factors + _trained_parameters(model), "lr": lr, **decay},
        {"params": deltas, "lr": lr * delta_lr_scale, **decay},
    ]


def count_trainable_parameters(model: nn.Module) -> int:
    """Degrees of freedom the adapters train: ``r·(in + out)`` per layer, plus ``s`` once launched,
    plus every parameter of the modules that train in full. A factor frozen by hand
    (``requires_grad`` off, as when δ alone trains after the launch) is not counted.

    ``δ`` exists from construction, but before launch ``U_s = V_s = 0`` and it cannot move the
    output, so it is counted from the launch on, as in the paper.
    """
    total = sum(p.numel() for p in _trained_parameters(model))
    for layer in dash_layers(model).values():
        factors = (layer.lora_A, layer.lora_B)
        total += sum(factor.numel() for factor in factors if factor.requires_grad)
        if layer.launched and layer.dash_delta.requires_grad:
            total += layer.s
    return total


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every layer's adapter state, keyed ``"<layer name>.<key>"`` for each key of
    ``LAYER_STATE_KEYS``, followed by :func:`trained_module_state_dict`. Every key is the model's
    own ``state_dict()`` key.

    Always whole tensors: under FSDP2 the shards are gathered, so every rank must call it.
    """
    tensors = _adapter_tensors(model)
    return {key: full_tensor(value).detach().clone() for key, value in tensors.items()}


def trained_module_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the state (parameters and persistent buffers) of every module that trains in full,
    keyed as in ``model.state_dict()``, e.g.
    ``{"classifier.weight": (out, in), "classifier.bias": (out,)}``.

    What a server needs beside the LoRA factors of :func:`lora_dash.export_lora`. Under FSDP2 the
    shards are gathered, so every rank must call it.
    """
    tensors = _trained_tensors(model)
    return {key: full_tensor(value).detach().clone() for key, value in tensors.items()}


def _adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The live tensors :func:`adapter_state_dict` copies, by key."""
    layers = {
        f"{name}.{key}": getattr(layer, key)
        for name, layer in dash_layers(model).items()
        for key in LAYER_STATE_KEYS
    }
    return {**layers, **_trained_tensors(model)}


def _trained_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The live state tensors of the modules that train in full, keyed as in ``state_dict()``."""
    return {
        f"{name}.{key}": value
        for name, module in trained_modules(model).items()
        for key, value in module.state_dict(keep_vars=True).items()
    }


def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load an adapter state dict (:func:`adapter_state_dict`), strictly: every problem is reported
    before anything is copied.

    Raises:
        ValueError: missing or unexpected keys, a non-tensor value, a wrong shape, or an
            inconsistent phase (layers that disagree on whether they launched; a launched layer
            without valid indices; a pre-launch layer with non-zero dash state). The message names
            the key.
        RuntimeError: a target layer is merged.
    """
    layers = require_dash_layers(model)
    targets = _adapter_tensors(model)
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"adapter state mismatch: missing keys {missing}, unexpected keys {unexpected}"
        )
    for key, target in targets.items():
        value = state[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"adapter state {key!r} is a {type(value).__name__}, not a tensor")
        if value.shape != target.shape:
            shape, expected = tuple(value.shape), tuple(target.shape)
            raise ValueError(f"adapter state {key!r} has shape {shape}, expected {expected}")
    phases = {name: bool(state[f"{name}.dash_launched"]) for name in layers}
    if len(set(phases.values())) > 1:
        raise ValueError(f"adapter state mixes launched and pre-launch layers: {phases}")
    for name, layer in layers.items():
        _check_phase(name, layer, {key: state[f"{name}.{key}"] for key in LAYER_STATE_KEYS})

    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(_like(target, state[key]))
    for layer in layers.values():
        layer.restore_phase()


def _check_phase(name: str, layer: LoRADashLinear, state: dict[str, Tensor]) -> None:
    if layer.merged:
        raise RuntimeError(f"layer {name!r} is merged; unmerge() before loading adapter state")
    index = state["dash_index"]
    if bool(state["dash_launched"]):
        k = min(layer.in_features, layer.out_features)
        if not ((0 <= index) & (index < k)).all() or index.unique().numel() != index.numel():
            raise ValueError(
                f"adapter state {name + '.dash_index'!r} is launched but holds {index.tolist()}"
            )
        return
    # Before the launch nothing is selected yet: no index, and U_s, V_s and δ all zero.
    dash_tensors = (state["dash_U"], state["dash_V"], state["dash_delta"])
    if (index != -1).any() or any(tensor.any() for tensor in dash_tensors):
        raise ValueError(f"adapter state for {name!r} is pre-launch but has non-zero dash state")


def _like(target: Tensor, value: Tensor) -> Tensor:
    """``value`` laid out as ``target``: sharded like it when it is a DTensor. Each rank holds the
    whole ``value``, so each keeps its own shard without communicating."""
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(
            value.to(target.device), target.device_mesh, target.placements, src_data_rank=None
        )
    return value
