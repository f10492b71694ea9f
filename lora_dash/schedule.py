"""When to launch: after optimizer step ``t``, counted once for the whole model."""

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lora_dash.directions import check_strategy
from lora_dash.inject import dash_layers


def check_launch_options(strategy: str, seed: int) -> None:
    """Validate :func:`launch`'s ``strategy`` and ``seed`` (an int in ``[0, 2⁶³)``)."""
    check_strategy(strategy)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")


def layer_generators(seed: int, count: int) -> list[torch.Generator]:
    """``count`` independent CPU generators, one per layer, all determined by ``seed``.

    Layer ``i`` is seeded with the ``i``-th draw of a generator seeded with ``seed``, so nearby seeds
    (or nearby layers) do not share streams, and every process computes the same generators.
    """
    layer_seeds = torch.randint(2**62, (count,), generator=torch.Generator().manual_seed(seed))
    return [torch.Generator().manual_seed(int(layer_seed)) for layer_seed in layer_seeds]


def launch(model: nn.Module, strategy: str = "tsd", seed: int = 0) -> dict[str, Tensor]:
    """Launch every LoRA-Dash layer of ``model`` now: all of them, or (on any error) none.

    Directions are found layer by layer (one full SVD alive at a time, only ``U_s``, ``V_s`` kept),
    and committed only once every layer has found its own.

    Args:
        model: a model with LoRA-Dash layers.
        strategy: ``"tsd"`` (the method) or a baseline of
            :data:`lora_dash.directions.STRATEGIES`; see :func:`lora_dash.directions.pick_directions`.
        seed: for ``"random"``: the layer at position ``i`` of :func:`dash_layers` order draws with its
            own generator from :func:`layer_generators`, so every rank and every rerun draws the same.

    Returns:
        The selected singular-value indices, ``(s,)`` each, by layer name.

    Raises:
        ValueError: an unknown strategy or a bad seed (before any work), no LoRA-Dash layer, or a
            layer's update is not finite or has too few eligible directions (the message names it).
        RuntimeError: a layer is already launched or merged.
    """
    check_launch_options(strategy, seed)
    layers = dash_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA-Dash layers; call inject() first")
    generators = layer_generators(seed, len(layers))
    chosen = {
        name: layer.find_directions(strategy=strategy, generator=generator)
        for (name, layer), generator in zip(layers.items(), generators)
    }
    for name, layer in layers.items():
        layer.launch(chosen[name])
    return {name: directions.index for name, directions in chosen.items()}


class LaunchController:
    """Counts optimizer steps for a whole model and launches every layer right after step ``t``.

    The count and phase are state (``state_dict``), so resuming a run launches at the same step.
    Forward passes, evaluation, gradient-accumulation micro-batches and activation-checkpoint
    recomputes do not count; only optimizer steps do.

    Usage::

        controller = LaunchController(model, launch_step=100).attach(optimizer)  # post-step hook
        # or, in a custom loop: call controller.step() after each optimizer step.

    Args:
        model: a model with LoRA-Dash layers (see :func:`inject`).
        launch_step: ``t >= 0``; ``0`` launches at once (``ΔW = 0``, so the ``s`` largest σ are chosen).
        strategy, seed: how :func:`launch` chooses the directions (default: the method's TSDs). They are
            arguments, not saved state: pass the same ones when resuming.
    """

    def __init__(self, model: nn.Module, launch_step: int = 100, strategy: str = "tsd", seed: int = 0) -> None:
        if isinstance(launch_step, bool) or not isinstance(launch_step, int) or launch_step < 0:
            raise ValueError(f"launch_step must be an int >= 0, got {launch_step!r}")
        check_launch_options(strategy, seed)
        if not dash_layers(model):
            raise ValueError("the model has no LoRA-Dash layers; call inject() first")
        self.model = model
        self.launch_step = launch_step
        self.strategy, self.seed = strategy, seed
        self.steps = 0
        self._optimizers: list[torch.optim.Optimizer] = []
        self._hooks: list[Any] = []
        if launch_step == 0 and not self.launched:
            self.launch()

    @property
    def launched(self) -> bool:
        """Whether every LoRA-Dash layer of the model is in the dash phase."""
        return all(layer.launched for layer in dash_layers(self.model).values())

    def attach(self, optimizer: torch.optim.Optimizer) -> "LaunchController":
        """Count every ``optimizer.step()`` (a post-step hook), and reset δ's state in it at launch."""
        self._optimizers.append(optimizer)
        self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.step()))
        return self

    def detach(self) -> None:
        """Remove the hooks of every attached optimizer."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._optimizers = [], []

    def step(self) -> None:
        """Record one optimizer step; launch if it was step ``t``; one step later, check that δ trains."""
        self.steps += 1
        if self.steps == self.launch_step + 1 and self.launched:
            self._warn_if_delta_did_not_move()
        if self.steps == self.launch_step and not self.launched:
            self.launch()
        elif self.steps > self.launch_step and not self.launched:
            pending = [name for name, layer in dash_layers(self.model).items() if not layer.launched]
            warnings.warn(
                f"LoRA-Dash: optimizer step {self.steps} is past launch_step={self.launch_step} but "
                f"layers {pending} have not launched; they are training as plain LoRA",
                RuntimeWarning,
                stacklevel=2,
            )

    def launch(self) -> dict[str, Tensor]:
        """Launch now (see :func:`launch`, with this controller's strategy and seed) and give δ a fresh
        optimizer state in attached optimizers.

        Before launch ``U_s = V_s = 0``, so δ's gradient was zero; an Adam-style state built from those
        zeros (and its step count) would skew δ's first updates, so it is dropped.
        """
        selected = launch(self.model, self.strategy, self.seed)
        deltas = [layer.dash_delta for layer in dash_layers(self.model).values()]
        for optimizer in self._optimizers:
            for delta in deltas:
                optimizer.state.pop(delta, None)
        if self._optimizers:
            held = {id(p) for optimizer in self._optimizers for group in optimizer.param_groups for p in group["params"]}
            untrained = [name for name, layer in dash_layers(self.model).items() if id(layer.dash_delta) not in held]
            if untrained:
                warnings.warn(
                    f"LoRA-Dash: no attached optimizer holds δ of layers {untrained}; the dash will not "
                    "train. Build the optimizer from lora_dash.adapter_parameters(model).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return selected

    def _warn_if_delta_did_not_move(self) -> None:
        """δ is zero at launch; after the next optimizer step it is still exactly zero despite a non-zero
        gradient only if no optimizer stepped it (the case an explicit ``step()`` cannot see at launch)."""
        frozen = [
            name for name, layer in dash_layers(self.model).items()
            if layer.dash_delta.grad is not None and bool(layer.dash_delta.grad.any())
            and not bool(layer.dash_delta.any())
        ]
        if frozen:
            warnings.warn(
                f"LoRA-Dash: δ of layers {frozen} did not move in the optimizer step after the launch although "
                "its gradient is non-zero; the dash is not training. Build the optimizer from "
                "lora_dash.adapter_parameters(model).",
                RuntimeWarning,
                stacklevel=2,
            )

    def state_dict(self) -> dict[str, int]:
        """``{"launch_step": t, "steps": optimizer steps so far}``."""
        return {"launch_step": self.launch_step, "steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the step count; the model's adapter state must be loaded first.

        Raises:
            ValueError: missing or unexpected keys, a different ``launch_step``, or a step count at or
                past ``launch_step`` with a model that has not launched (a model launched early, by an
                explicit :meth:`launch`, may have any step count).
        """
        expected = {"launch_step", "steps"}
        if set(state) != expected:
            raise ValueError(f"controller state keys {sorted(state)} != {sorted(expected)}")
        if state["launch_step"] != self.launch_step:
            raise ValueError(f"state has launch_step={state['launch_step']}, this controller {self.launch_step}")
        steps = state["steps"]
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if steps >= self.launch_step and not self.launched:  # launched before t is fine: an explicit launch()
            raise ValueError(
                f"state is at step {steps} with launch_step={self.launch_step}, but the model is not launched; "
                "load the adapter state first"
            )
        self.steps = steps
