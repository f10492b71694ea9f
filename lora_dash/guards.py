"""Warnings for a launch wired wrong, where the run would otherwise go on without a word.

- A controller nothing steps (never attached, never stepped) cannot launch: the model trains as
  plain LoRA. Until a controller counts a step, one global optimizer post-step hook (nothing on the
  forward or backward) warns once if optimizers holding the model's first adapter parameter have
  stepped it more than ``t`` times while it has not launched. It cannot see steps of an optimizer
  built from other parameter objects (e.g. the shards of a model sharded after the controller was
  built), nor tell apart steps that a fused optimizer skipped on a grad-scaler overflow.
- A step past ``t`` with a layer not launched (one injected after the launch, say): that layer
  trains as plain LoRA.
- At the launch, an attached optimizer that holds no δ of some layer: the dash will not train.
- One step after the launch, a δ still exactly zero although its gradient is not: no optimizer
  stepped it (what an explicit ``controller.step()`` cannot see at the launch).

:func:`guard` is installed as the launch hook ``"guard"`` when this module is imported.
"""

import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from lora_dash import hooks
from lora_dash.inject import dash_layers
from lora_dash.schedule import LaunchController

#: The watch of each controller that has not counted a step yet.
_watches: "weakref.WeakKeyDictionary[LaunchController, UncountedStepsWatch]" = (
    weakref.WeakKeyDictionary()
)


def guard(event: str, controller: LaunchController) -> None:
    """Warn about ``controller`` at ``event`` (see :data:`lora_dash.schedule.launch_hooks`); changes
    nothing."""
    if event == "built":
        _watches[controller] = UncountedStepsWatch(controller.model, controller.launch_step)
        return
    if event == "loaded":
        # A resumed run: the optimizer has stepped as often as the controller says.
        watch = _watches.get(controller)
        if watch is not None:
            watch.seen = controller.steps
        return
    if event == "pending":
        pending = [
            name for name, layer in dash_layers(controller.model).items() if not layer.launched
        ]
        warnings.warn(
            f"LoRA-Dash: optimizer steps are past launch_step={controller.launch_step} but "
            f"layers {pending} have not launched; they are training as plain LoRA",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    watch = _watches.pop(controller, None)
    if watch is not None:
        watch.stop()
    if event == "launched" and controller.optimizers:
        _warn_if_delta_is_not_held(controller)
    elif event == "stepped" and controller.steps == controller.launch_step + 1:
        _warn_if_delta_did_not_move(controller)


def _warn_if_delta_is_not_held(controller: LaunchController) -> None:
    held = {
        id(p)
        for optimizer in controller.optimizers
        for group in optimizer.param_groups
        for p in group["params"]
    }
    untrained = [
        name
        for name, layer in dash_layers(controller.model).items()
        if id(layer.dash_delta) not in held
    ]
    if untrained:
        warnings.warn(
            f"LoRA-Dash: no attached optimizer holds δ of layers {untrained}; the dash will not "
            "train. Build the optimizer from lora_dash.adapter_parameters(model). With "
            "transformers.Trainer: pass LoRADashCallback in callbacks= so that it is there when "
            "train() builds the optimizer, and build a custom optimizer (optimizers=(...)) from "
            "lora_dash.adapter_parameters(model).",
            RuntimeWarning,
            stacklevel=4,
        )


def _warn_if_delta_did_not_move(controller: LaunchController) -> None:
    frozen = [
        name
        for name, layer in dash_layers(controller.model).items()
        if layer.launched
        and layer.dash_delta.grad is not None
        and bool(layer.dash_delta.grad.any())
        and bool(layer.dash_delta.grad.isfinite().all())  # not a step a grad scaler skipped
        and not bool(layer.dash_delta.any())
    ]
    if frozen:
        warnings.warn(
            f"LoRA-Dash: δ of layers {frozen} did not move in the optimizer step after the launch "
            "although its gradient is non-zero; the dash is not training. Build the optimizer from "
            "lora_dash.adapter_parameters(model).",
            RuntimeWarning,
            stacklevel=4,
        )


class UncountedStepsWatch:
    """Warns once when a model that has not launched is stepped more than ``launch_step`` times.

    One global optimizer post-step hook serves every watch, so watching costs nothing on the forward
    or backward, and nothing at all once no watch is left (the controller stops its watch when it
    counts). A hook cannot be removed while the hooks run, so a watch that ends there (it warned, or
    its model is gone) only leaves :attr:`active`; the hook goes with the next :meth:`stop` that
    finds none left. A watch holds its model weakly: one whose controller was dropped still warns
    (nothing counts the run), one whose model is gone ends.
    """

    active: list["UncountedStepsWatch"] = []
    hook: Any = None

    def __init__(self, model: nn.Module, launch_step: int) -> None:
        layer = next(iter(dash_layers(model).values()))
        self._model, self._layer = weakref.ref(model), weakref.ref(layer)
        self._launch_step = launch_step
        self.seen = 0
        UncountedStepsWatch.active.append(self)
        if UncountedStepsWatch.hook is None:
            UncountedStepsWatch.hook = register_optimizer_step_post_hook(
                UncountedStepsWatch._after_optimizer_step
            )

    def stop(self) -> None:
        """End this watch; call it outside optimizer hooks.

        A controller's own step hook is fine: it runs before the global ones.
        """
        if self in UncountedStepsWatch.active:
            UncountedStepsWatch.active.remove(self)
        if not UncountedStepsWatch.active and UncountedStepsWatch.hook is not None:
            UncountedStepsWatch.hook.remove()
            UncountedStepsWatch.hook = None

    @staticmethod
    def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for watch in list(UncountedStepsWatch.active):
            if watch._ended_by(optimizer):
                UncountedStepsWatch.active.remove(watch)

    def _ended_by(self, optimizer: torch.optim.Optimizer) -> bool:
        """Count ``optimizer``'s step if it trains the model, and warn past ``launch_step``.

        Returns True when the watch is done.
        """
        model, layer = self._model(), self._layer()
        if model is None or layer is None:
            return True
        if not any(p is layer.lora_A for group in optimizer.param_groups for p in group["params"]):
            return False  # another model's optimizer
        self.seen += 1
        if self.seen <= self._launch_step:
            return False
        # All launched means another controller launched it: no warning then.
        if not all(module.launched for module in dash_layers(model).values()):
            warnings.warn(
                f"LoRA-Dash: optimizers have stepped the model's adapters {self.seen} times, past "
                f"launch_step={self._launch_step}, but its LaunchController counted no step, so "
                "nothing launched and the model trains as plain LoRA. Call "
                "controller.attach(optimizer) or controller.step() after each optimizer step; with "
                "transformers.Trainer use lora_dash.hf.LoRADashCallback.",
                RuntimeWarning,
                stacklevel=4,
            )
        return True


hooks.set_launch_hook("guard", guard)
