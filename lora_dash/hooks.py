"""The named hooks through which integrations extend the launch, with the defaults that run while
nothing else is installed. The core calls them by name (``launch_hooks["guard"](...)``);
``import lora_dash`` installs all three through :func:`set_launch_hook`.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lora_dash.directions import DashDirections
from lora_dash.layer import LoRADashLinear


def select_each_alone(
    layers: dict[str, LoRADashLinear], strategy: str, generators: list[torch.Generator]
) -> dict[str, DashDirections] | None:
    """The default ``"shared_selection"``: nothing to share (one process), so ``None``."""
    return None


def no_evidence(model: nn.Module, seed: int) -> list[str]:
    """The default ``"evidence"``: there is no evidence to log without an analysis installed."""
    raise RuntimeError("no launch evidence is installed (import lora_dash.analysis)")


def no_guard(event: str, controller: Any) -> None:
    """The default ``"guard"``: no warnings."""


#: The launch's hooks, each with the default that runs while nothing else is installed
#: (:func:`set_launch_hook`); ``import lora_dash`` installs all three:
#:
#: - ``"shared_selection"`` ``(layers, strategy, generators) -> {name: DashDirections} | None``: a
#:   selection shared among ``torch.distributed`` ranks (:mod:`lora_dash.distributed`);
#: - ``"evidence"`` ``(model, seed) -> lines``: what ``log_evidence`` receives after the launch
#:   (:mod:`lora_dash.analysis`);
#: - ``"guard"`` ``(event, controller)`` at ``"built"``, ``"loaded"``, ``"stepped"``,
#:   ``"launched"`` and ``"pending"``: warnings for a launch wired wrong (:mod:`lora_dash.guards`);
#:   it never changes the run.
launch_hooks: dict[str, Callable[..., Any]] = {
    "shared_selection": select_each_alone,
    "evidence": no_evidence,
    "guard": no_guard,
}


def set_launch_hook(name: str, hook: Callable[..., Any]) -> None:
    """Install ``hook`` as the launch's hook ``name`` (one of :data:`launch_hooks`)."""
    if name not in launch_hooks:
        raise ValueError(f"unknown launch hook {name!r}; hooks are {sorted(launch_hooks)}")
    launch_hooks[name] = hook


__all__ = ["launch_hooks", "no_evidence", "no_guard", "select_each_alone", "set_launch_hook"]
