"""Refusals for a model or optimizer that would train as something other than LoRA-Dash.

Each check reads the model (and optimizers) and raises a ``ValueError`` that says what happened
and what to do. It changes nothing: a caller runs it before the first step, and a refused run is
as it was.

* :func:`check_not_wrapped_by_peft`: PEFT's tuner layers and LoRA-Dash layers nest. The usual
  cause: ``SFTTrainer(..., peft_config=LoraConfig(target_modules="all-linear"))`` on an injected
  model. PEFT finds the ``nn.Linear`` kept inside each ``LoRADashLinear``, wraps it, and freezes
  every other parameter, ``A``, ``B`` and ``δ`` included: training runs as plain PEFT LoRA.
* :func:`check_no_peft_adapters`: :func:`lora_dash.inject` on a model PEFT has already adapted.
* :func:`check_adapters_trainable`: adapters frozen, or optimizers that hold none of them.

PEFT is never imported here: its tuner layers are recognised through its base class
``peft.tuners.tuners_utils.BaseTunerLayer``, looked up in ``sys.modules`` (a model cannot hold one
unless PEFT was imported). Of lora_dash, only :mod:`lora_dash.layer` is imported, so that
:mod:`lora_dash.inject` and :mod:`lora_dash.schedule` can call these checks.
"""

import sys
from collections.abc import Iterable
from typing import Any

from torch import nn

from lora_dash.layer import LoRADashLinear

#: What to do when PEFT adapts a model that lora_dash adapts.
DROP_PEFT = (
    "drop `peft_config` (or the get_peft_model call): lora_dash already adapts the model. PEFT "
    "changes the model in place, so build it again and call lora_dash.inject once"
)


def peft_tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every PEFT tuner layer in ``model`` (PEFT's wrappers of a base layer), by dotted name."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:  # PEFT was never imported: no module can be one of its layers
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, tuners.BaseTunerLayer)}


def check_not_wrapped_by_peft(model: nn.Module) -> None:
    """Refuse PEFT tuner layers inside LoRA-Dash layers, and LoRA-Dash layers inside PEFT's.

    Either way two adapters stack on one weight, and PEFT has frozen what it did not create.

    Raises:
        ValueError: naming the first such layer and how many there are.
    """
    tuners = peft_tuner_layers(model)
    if not tuners:
        return
    ours = _dash_layers(model)
    tuner_ids = {id(module) for module in tuners.values()}
    ours_ids = {id(layer) for layer in ours.values()}
    wrapped = [name for name, layer in ours.items() if _holds(layer, tuner_ids)]
    if wrapped:
        raise ValueError(
            f"PEFT has wrapped the linear layer inside {_some(wrapped, 'LoRA-Dash layers')}: "
            "PEFT's LoRA would train there instead, and PEFT froze A, B and δ. This is what "
            'passing peft_config (e.g. LoraConfig(target_modules="all-linear")) to a trainer '
            f"together with a lora_dash model does. Fix: {DROP_PEFT}"
        )
    wrapping = [name for name, tuner in tuners.items() if _holds(tuner, ours_ids)]
    if wrapping:
        raise ValueError(
            f"{_some(wrapping, 'PEFT tuner layers')} hold LoRA-Dash layers: two adapters would "
            "train on one weight. Inject LoRA-Dash into the plain model, without PEFT: "
            f"{DROP_PEFT}"
        )


def check_no_peft_adapters(model: nn.Module) -> None:
    """Refuse a model that PEFT has already adapted: :func:`lora_dash.inject` adapts plain models.

    Raises:
        ValueError: naming the first PEFT tuner layer and how many there are.
    """
    tuners = list(peft_tuner_layers(model))
    if tuners:
        raise ValueError(
            f"the model already holds {_some(tuners, 'PEFT tuner layers')}; lora_dash adapts a "
            "plain model. Inject into the model without PEFT's adapters (PEFT's merge_and_unload() "
            "folds trained ones into the weights first)"
        )


def check_adapters_trainable(model: nn.Module, optimizers: Iterable[Any] = ()) -> None:
    """Refuse LoRA-Dash layers that cannot train: every adapter parameter frozen, or not optimized.

    A layer none of whose ``A``, ``B``, ``δ`` has ``requires_grad`` never moves, and its launch
    picks directions from an update that stayed zero. Optimizers that hold none of the model's
    adapter parameters train something else. Layers frozen in part (``δ`` alone after the launch,
    say) and optimizers that hold some of the adapters pass.

    Args:
        model: a model with LoRA-Dash layers (one without any passes).
        optimizers: ``torch.optim.Optimizer``\\ s, or wrappers exposing ``param_groups``
            (accelerate's, Trainer's); none (default) checks ``requires_grad`` only.

    Raises:
        ValueError: naming the first frozen layer, or saying that the optimizers hold none.
    """
    layers = _dash_layers(model)
    frozen = [name for name, layer in layers.items() if not _trains(layer)]
    if frozen:
        raise ValueError(
            f"A, B and δ of {_some(frozen, 'LoRA-Dash layers')} are frozen (requires_grad=False), "
            "so they would not train. PEFT freezes them when it adapts the model too (peft_config, "
            f"get_peft_model): {DROP_PEFT}. Otherwise set requires_grad on "
            "lora_dash.adapter_parameters(model) after freezing the model"
        )
    optimizers = list(optimizers)
    if not optimizers or not layers:
        return
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    held = {id(p) for group in groups for p in group["params"]}
    adapters = [p for layer in layers.values() for p in layer.adapter_parameters()]
    if not any(id(p) in held for p in adapters):
        raise ValueError(
            f"the optimizer holds none of the A, B, δ of the model's {len(layers)} LoRA-Dash "
            "layers, so LoRA-Dash would not train. Build the optimizer from "
            "lora_dash.adapter_parameters(model) (or lora_dash.adapter_param_groups(model, lr)); "
            "with transformers.Trainer, a custom optimizer passed as optimizers=(...) must be "
            "built that way too"
        )


def _dash_layers(model: nn.Module) -> dict[str, LoRADashLinear]:
    """The LoRA-Dash layers by dotted name, as :func:`lora_dash.inject.dash_layers` gives them;
    written out here so that :mod:`lora_dash.inject` can import this module."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRADashLinear)}


def _trains(layer: nn.Module) -> bool:
    """Whether any of the layer's ``A``, ``B``, ``δ`` has ``requires_grad``."""
    return any(p.requires_grad for p in layer.adapter_parameters())


def _holds(module: nn.Module, ids: set[int]) -> bool:
    """Whether one of ``module``'s submodules (not itself) is among ``ids``."""
    return any(id(sub) in ids for sub in module.modules() if sub is not module)


def _some(names: list[str], what: str) -> str:
    """``"3 LoRA-Dash layers (first: 'a.b')"``: how many and the first name, in a short message."""
    return f"{len(names)} {what} (first: {names[0]!r})"
