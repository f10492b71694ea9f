"""Exact export of LoRA-Dash adapters to plain LoRA (METHOD.md §5), and PEFT's on-disk format.

A LoRA-Dash layer computes ``y = W x + b + (α/r)·B A x̃ + U_s diag(δ) V_sᵀ x̃``. Stacking the two
branches gives one plain LoRA layer of rank ``r' = r + s`` with scaling 1::

    B' = [(α/r)·B | U_s diag(δ)]    (out, r + s)
    A' = [A ; V_sᵀ]                 (r + s, in)
    y  = W x + b + B' A' x̃          (α' = r', so PEFT's scaling α'/r' is 1)

so any stack that serves LoRA (PEFT, vLLM, ...) serves a trained LoRA-Dash adapter with no loss.
Before launch ``U_s = V_s = 0``: the dash columns contribute exactly nothing and are left out (rank
``r``). Both branches read the same ``x̃ = dropout(x)``, so the export is exact in training too.

Modules that train in full (``inject(..., modules_to_save=...)``) are not LoRA layers: a server
takes their whole state, :func:`lora_dash.trained_module_state_dict`, beside the factors, and
:func:`save_peft_adapter` writes it in PEFT's ``modules_to_save`` layout.

The math (:func:`plain_lora_factors`, :func:`export_lora`) needs only torch. The writer
(:func:`save_peft_adapter`) imports ``safetensors`` when called; it never imports ``peft``.
"""

import json
import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lora_dash.bases import is_conv1d
from lora_dash.checkpoint import safetensors_torch
from lora_dash.inject import dash_layers, require_dash_layers, trained_modules
from lora_dash.layer import LoRADashLinear
from lora_dash.state import trained_module_state_dict

#: PEFT's file names (``peft.utils.constants``): the weights and the config that
#: ``PeftModel.from_pretrained`` reads.
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
#: The prefix PEFT puts before a module's name in saved keys: ``PeftModel.base_model`` (the LoRA
#: tuner) wraps the user's model as ``.model``.
PEFT_KEY_PREFIX = "base_model.model."
#: The submodules PEFT's LoRA layer puts under each target (``<target>.lora_A``,
#: ``<target>.lora_A.default``, ...): PEFT matches ``modules_to_save`` against every module name,
#: these included.
PEFT_LORA_CHILDREN = (
    "base_layer",
    "lora_dropout",
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
)


class LoRAFactors(NamedTuple):
    """One plain LoRA layer with scaling 1: ``ΔW = B A``.

    Shapes: ``A: (rank, in)``, ``B: (out, rank)``, both float32.
    """

    A: Tensor
    B: Tensor


def plain_lora_factors(layer: LoRADashLinear) -> LoRAFactors:
    """The plain LoRA factors that reproduce ``layer``: ``B' A' = (α/r)·B A + U_s diag(δ) V_sᵀ``.

    Once launched::

        A' = [A ; V_sᵀ]                 (r + s, in)
        B' = [(α/r)·B | U_s diag(δ)]    (out, r + s)

    and before it ``A' = A: (r, in)``, ``B' = (α/r)·B: (out, r)`` (the dash columns would be zero).
    With ``use_rslora`` the scaling ``α/√r`` is folded into ``B'`` the same way. Computed in float32
    whatever the layer's dtype. The factors do not depend on whether the layer is merged: they are
    the adapter, to be applied to the pretrained weight.

    Raises:
        ValueError: a factor is not finite (the message names the layer).
    """
    A = layer.lora_A.detach().float()
    B = layer.scaling * layer.lora_B.detach().float()
    if layer.launched:
        A = torch.cat([A, layer.dash_V.detach().float().T])
        B = torch.cat([B, layer.dash_U.detach().float() * layer.dash_delta.detach().float()], dim=1)
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ValueError(f"layer {layer.name!r}: the adapter is not finite; refusing to export it")
    return LoRAFactors(A=A, B=B)


def export_lora(model: nn.Module) -> dict[str, LoRAFactors]:
    """Every LoRA-Dash layer of ``model`` as plain LoRA factors (:func:`plain_lora_factors`), by
    name.

    Modules that train in full are not in it: :func:`lora_dash.trained_module_state_dict` gives
    their state.

    Raises:
        ValueError: the model has no LoRA-Dash layers, or a layer's adapter is not finite.
    """
    layers = require_dash_layers(model)
    return {name: plain_lora_factors(layer) for name, layer in layers.items()}


def pad_rank(factors: LoRAFactors, rank: int) -> LoRAFactors:
    """Zero-pad to a larger rank: ``A: (rank, in)``, ``B: (out, rank)``; ``B A`` is unchanged.

    PEFT's config has one ``r`` for every layer; zero rows of ``A`` and zero columns of ``B`` let
    layers of different rank (different ``r``, ``s`` or phase) share it without ``rank_pattern``.
    """
    extra = rank - factors.A.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad rank {factors.A.shape[0]} down to {rank}")
    return LoRAFactors(
        A=torch.cat([factors.A, factors.A.new_zeros(extra, factors.A.shape[1])]),
        B=torch.cat([factors.B, factors.B.new_zeros(factors.B.shape[0], extra)], dim=1),
    )


def peft_target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """PEFT's ``target_modules`` that selects exactly ``names`` in the unwrapped model.

    PEFT matches a list entry ``t`` to module ``k`` when ``k == t`` or ``k`` ends with ``"." + t``.
    The list of full names is therefore exact unless another module's name ends with
    ``"." + <a target>`` (e.g. ``"1.0"`` against ``"0"`` in nested ``nn.Sequential``); then a regex
    of the escaped names is returned instead, which PEFT ``fullmatch``es against each name.
    """
    layers = dash_layers(model)
    others = [k for k in plain_module_names(model) if k not in layers]
    if any(k.endswith("." + name) for k in others for name in names):
        return "|".join(re.escape(name) for name in names)
    return list(names)


def peft_modules_to_save(model: nn.Module) -> list[str] | None:
    """PEFT's ``modules_to_save`` selecting exactly the modules of ``model`` that train in full;
    ``None`` when there are none.

    PEFT wraps every module whose name ends with an entry, as a plain string suffix (``"head"``
    selects ``"lm_head"`` too), in the model where its LoRA layers are already in place. The full
    names are the narrowest entries there are, so when one of them is a suffix of another module's
    name no list can select exactly the right modules, and this refuses.

    Raises:
        ValueError: a module's name is a suffix of another module's name (both are named).
    """
    names = list(trained_modules(model))
    if not names:
        return None
    peft_names = plain_module_names(model) + [
        f"{layer}.{child}{default}"
        for layer in dash_layers(model)
        for child in PEFT_LORA_CHILDREN
        for default in ("", ".default")
    ]
    clashes = {name: [k for k in peft_names if k != name and k.endswith(name)] for name in names}
    clashes = {name: others for name, others in clashes.items() if others}
    if clashes:
        raise ValueError(
            f"PEFT selects modules_to_save by name suffix, and these modules that train in full "
            f"would also select others (name: others): {clashes}; PEFT cannot load such an adapter"
        )
    return names


def plain_module_names(model: nn.Module) -> list[str]:
    """The module names of ``model`` as a plain model has them, the insides of LoRA-Dash layers
    left out."""
    adapters = dash_layers(model).values()
    inside_adapters = {id(sub) for layer in adapters for sub in layer.modules() if sub is not layer}
    return [k for k, module in model.named_modules() if k and id(module) not in inside_adapters]


def save_peft_adapter(
    model: nn.Module,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the export of ``model`` as a PEFT LoRA adapter, loaded back with
    ``PeftModel.from_pretrained(base, directory)``.

    Files, as PEFT's ``save_pretrained`` writes them:

    - ``adapter_model.safetensors``: for every layer, float32,
      ``base_model.model.<layer name>.lora_A.weight`` ``(r', in)`` and ``...lora_B.weight``
      ``(out, r')``. For every module that trains in full, its state in its own dtype, as
      ``get_peft_model_state_dict`` saves a ``modules_to_save`` module:
      ``base_model.model.<module name>.<key>`` (e.g. ``base_model.model.classifier.weight``).
    - ``adapter_config.json``: ``peft_type "LORA"``; ``r = lora_alpha = r'`` (scaling 1); the layer
      names as ``target_modules``; ``fan_in_fan_out`` true when a layer is a GPT-2 ``Conv1D`` (PEFT
      corrects it per layer, with a warning, in a model that mixes ``Conv1D`` and ``nn.Linear``);
      the layers' ``lora_dropout``; the names of the modules that train in full as
      ``modules_to_save`` (:func:`peft_modules_to_save`).

    ``r'`` is the largest rank among the layers (``r + s`` once launched, ``r`` before); smaller
    layers are zero-padded to it (:func:`pad_rank`). ``base`` must be the pretrained model without
    adapters, with the same module names as ``model``.

    Returns:
        The directory (created if missing).

    Raises:
        ImportError: ``safetensors`` is missing.
        ValueError: no LoRA-Dash layers, a non-finite adapter, layers with different dropout (PEFT
            has one), or a module that trains in full whose name PEFT would also match elsewhere.
            Nothing is written then.
    """
    save_file = safetensors_torch().save_file
    factors = export_lora(model)
    modules_to_save = peft_modules_to_save(model)
    layers = dash_layers(model)
    dropouts = {
        name: layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0
        for name, layer in layers.items()
    }
    if len(set(dropouts.values())) > 1:
        raise ValueError(
            f"PEFT has one lora_dropout for all layers, but the layers differ: {dropouts}"
        )
    rank = max(f.A.shape[0] for f in factors.values())
    tensors = {}
    for name, layer_factors in factors.items():
        padded = pad_rank(layer_factors, rank)
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = padded.A.contiguous()
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = padded.B.contiguous()
    trained = trained_module_state_dict(model)
    tensors.update({PEFT_KEY_PREFIX + key: value.contiguous() for key, value in trained.items()})
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "target_modules": peft_target_modules(model, list(factors)),
        "fan_in_fan_out": any(is_conv1d(layer.base) for layer in layers.values()),
        "lora_dropout": next(iter(dropouts.values())),
        "bias": "none",
        "use_dora": False,
        "modules_to_save": modules_to_save,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory
