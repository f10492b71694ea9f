"""The launch: :func:`launch` selects the directions of every LoRA-Dash layer and commits all or
none; :class:`LaunchController` counts optimizer steps and calls it right after step ``t``.

Integrations plug into the launch through the hooks of :mod:`lora_dash.hooks`, called by name here
(``launch_hooks["guard"](...)``); each has a default that runs while nothing else is installed.
"""

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lora_dash.checks import check_int, check_seed
from lora_dash.directions import check_strategy
from lora_dash.hooks import launch_hooks, no_evidence
from lora_dash.inject import dash_layers, require_dash_layers
from lora_dash.refusals import check_adapters_trainable, check_not_wrapped_by_peft


def check_launch_options(strategy: str, seed: int, distributed: bool = True) -> None:
    """Validate :func:`launch`'s ``strategy``, ``seed`` and ``distributed`` (a bool)."""
    check_strategy(strategy)
    check_seed(seed)
    if not isinstance(distributed, bool):
        raise ValueError(f"distributed must be a bool, got {distributed!r}")


def layer_generators(seed: int, count: int) -> list[torch.Generator]:
    """``count`` independent CPU generators, one per layer, all determined by ``seed`` (layer ``i``
    is seeded with the ``i``-th draw of a generator seeded with ``seed``, so nearby seeds share no
    streams)."""
    layer_seeds = torch.randint(2**62, (count,), generator=torch.Generator().manual_seed(seed))
    return [torch.Generator().manual_seed(int(layer_seed)) for layer_seed in layer_seeds]


def launch(
    model: nn.Module, strategy: str = "tsd", seed: int = 0, distributed: bool = True
) -> dict[str, Tensor]:
    """Launch every LoRA-Dash layer of ``model`` now: all of them, or (on any error) none.

    Directions are found layer by layer (one full SVD alive at a time, only ``U_s``, ``V_s`` kept),
    and committed only once every layer has found its own. Under ``torch.distributed`` every rank
    must call this: the ranks share the SVDs (``launch_hooks["shared_selection"]``), every rank
    commits bit for bit what one process would, and an error on any rank is raised on every rank.

    Args:
        model: a model with LoRA-Dash layers.
        strategy: ``"tsd"`` (the method) or a baseline of :data:`lora_dash.directions.STRATEGIES`.
        seed: for ``"random"``: layer ``i`` (in :func:`dash_layers` order) draws with generator
            ``i`` of :func:`layer_generators`, so every rank and every rerun draws the same.
        distributed: share the launch among more than one rank (the default); ``False``: every rank
            decomposes every layer itself (``world`` times the work, no communication but FSDP2's
            gathers).

    Returns:
        The selected singular-value indices, ``(s,)`` each, by layer name.

    Raises:
        ValueError: an unknown strategy, a bad seed or ``distributed`` (before any work), no
            LoRA-Dash layer, ranks holding different layers, or a layer's update is not finite or
            has too few eligible directions (the message names it).
        RuntimeError: a layer is already launched or merged.
    """
    check_launch_options(strategy, seed, distributed)
    layers = require_dash_layers(model)
    generators = layer_generators(seed, len(layers))
    chosen = None
    if distributed:
        chosen = launch_hooks["shared_selection"](layers, strategy, generators)
    if chosen is None:
        chosen = {
            name: layer.find_directions(strategy=strategy, generator=generator)
            for (name, layer), generator in zip(layers.items(), generators)
        }
    for name, layer in layers.items():
        layer.launch(chosen[name])
    return {name: directions.index for name, directions in chosen.items()}


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside ``optimizer``: itself, or what its ``.optimizer`` attributes wrap
    (accelerate's and Trainer's wrappers; accelerate's of DeepSpeed's is three deep).

    Raises:
        ValueError: ``optimizer`` is not an optimizer and wraps none (e.g. ``trainer.optimizer``
            before ``train()`` builds it: use :class:`lora_dash.hf.LoRADashCallback`).
    """
    inner = optimizer
    for _ in range(8):  # a bound against a cycle
        if getattr(inner, "optimizer", None) is None:
            break
        inner = inner.optimizer
    if not (
        callable(getattr(inner, "register_step_post_hook", None)) and hasattr(inner, "param_groups")
    ):
        raise ValueError(
            "attach() needs a torch optimizer or a wrapper exposing one as .optimizer, got "
            f"{type(optimizer).__name__}; transformers.Trainer builds its optimizer in train(): "
            "use lora_dash.hf.LoRADashCallback"
        )
    return inner


class LaunchController:
    """Counts optimizer steps for a whole model and launches every layer right after step ``t``.

    The count is state (``state_dict``), so resuming a run launches at the same step. Forward
    passes, evaluation, gradient-accumulation micro-batches and activation-checkpoint recomputes do
    not count; only optimizer steps do, and with :meth:`attach` only real ones: a step that a grad
    scaler skips on overflow is not a step.

    Usage::

        controller = LaunchController(model, launch_step=100).attach(optimizer)  # post-step hook
        # or, in a custom loop: call controller.step() after each optimizer step.
        # with transformers.Trainer: lora_dash.hf.LoRADashCallback(launch_step=100)

    The phase is read from the layers (:attr:`LoRADashLinear.launched`, a Python bool: no tensor
    read, no host–device synchronisation). A controller that nothing steps cannot launch:
    :mod:`lora_dash.guards` warns when optimizers pass ``t`` unseen.

    Args:
        model: a model with LoRA-Dash layers (see :func:`inject`).
        launch_step: ``t >= 0``; ``0`` launches at once (``ΔW = 0``, so the ``s`` largest σ are
            chosen).
        strategy, seed, distributed: how :func:`launch` chooses the directions (default: the
            method's TSDs, shared among the ranks under ``torch.distributed``). They are arguments,
            not saved state: pass the same ones when resuming.
        log_evidence: if given (e.g. ``print`` or ``logger.info``), right after the launch it
            receives the lines of the ``"evidence"`` hook: whether the LoRA update the directions
            were chosen from says more than isotropic noise
            (:func:`lora_dash.analysis.launch_evidence`). None (default) computes nothing.

    Raises:
        ValueError: a bad argument, no LoRA-Dash layer, or ``log_evidence`` with no evidence hook
            installed.
    """

    def __init__(
        self,
        model: nn.Module,
        launch_step: int = 100,
        strategy: str = "tsd",
        seed: int = 0,
        distributed: bool = True,
        log_evidence: Callable[[str], Any] | None = None,
    ) -> None:
        check_int("launch_step", launch_step, 0)
        check_launch_options(strategy, seed, distributed)
        if log_evidence is not None and not callable(log_evidence):
            raise ValueError(
                f"log_evidence must be callable or None, got {type(log_evidence).__name__}"
            )
        if log_evidence is not None and launch_hooks["evidence"] is no_evidence:
            raise ValueError("log_evidence needs the launch evidence: import lora_dash.analysis")
        require_dash_layers(model)
        self.model = model
        self.launch_step = launch_step
        self.strategy, self.seed, self.distributed = strategy, seed, distributed
        self.log_evidence = log_evidence
        self.steps = 0  #: optimizer steps counted so far
        self.optimizers: list[torch.optim.Optimizer] = []  # the attached ones, unwrapped
        self._hooks: list[Any] = []
        if self.launched:
            return
        if launch_step == 0:
            self.launch_now()
        else:
            launch_hooks["guard"]("built", self)

    @property
    def launched(self) -> bool:
        """Whether every LoRA-Dash layer of the model is in the dash phase."""
        return all(layer.launched for layer in dash_layers(self.model).values())

    def attach(self, optimizer: Any) -> "LaunchController":
        """Count every real step of ``optimizer`` (a post-step hook), and reset δ's state in it at
        the launch. ``optimizer`` may be a wrapper (:func:`unwrap_optimizer`).

        Refused (``ValueError``, nothing attached) when the model would not train as LoRA-Dash:
        PEFT's layers nested with ours, adapters frozen, or an optimizer holding none of them
        (:mod:`lora_dash.refusals`).

        A step that ``torch.amp.GradScaler`` skips on overflow is not counted. For an optimizer that
        skips inside its own step (fused Adam), the scaler's ``found_inf`` is read up to the step
        after the launch; later, to stay free of host–device synchronisation, such a step counts.
        """
        inner = unwrap_optimizer(optimizer)
        check_not_wrapped_by_peft(self.model)  # PEFT would train its own LoRA instead
        check_adapters_trainable(self.model, [inner])
        self.optimizers.append(inner)
        self._hooks.append(inner.register_step_post_hook(self._after_optimizer_step))
        return self

    def detach(self) -> None:
        """Remove the hooks of every attached optimizer."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self.optimizers = [], []

    def _after_optimizer_step(
        self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any
    ) -> None:
        # GradScaler sets found_inf on an optimizer that skips inside its own step (fused Adam).
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and self.steps <= self.launch_step and bool(found_inf):
            return
        self.step()

    def step(self) -> None:
        """Record one optimizer step: before ``t`` nothing more; at ``t`` the launch; one step
        after it, a look for layers that did not launch. No tensor is read."""
        self.steps += 1
        launch_hooks["guard"]("stepped", self)
        if self.steps < self.launch_step:
            return  # before t: plain LoRA
        if self.steps == self.launch_step:
            if not self.launched:  # launched early by an explicit launch_now() or launch(model)
                self.launch_now()
            return
        if self.steps == self.launch_step + 1 and not self.launched:
            launch_hooks["guard"]("pending", self)  # after t: a layer injected since, say

    def launch_now(self) -> dict[str, Tensor]:
        """Launch now (:func:`launch` with this controller's strategy, seed and ``distributed``) and
        give δ a fresh state in attached optimizers.

        Before the launch ``U_s = V_s = 0``, so δ's gradient was zero; an Adam-style state built
        from those zeros (and its step count) would skew δ's first updates, so it is dropped.
        """
        selected = launch(self.model, self.strategy, self.seed, self.distributed)
        if self.log_evidence is not None:
            for line in launch_hooks["evidence"](self.model, self.seed):
                self.log_evidence(line)
        for optimizer in self.optimizers:
            for layer in dash_layers(self.model).values():
                optimizer.state.pop(layer.dash_delta, None)
        launch_hooks["guard"]("launched", self)
        return selected

    def launch(self) -> dict[str, Tensor]:
        """Deprecated alias of :meth:`launch_now` (kept for one release)."""
        warnings.warn(
            "LaunchController.launch() is renamed launch_now()", DeprecationWarning, stacklevel=2
        )
        return self.launch_now()

    def state_dict(self) -> dict[str, int]:
        """``{"launch_step": t, "steps": optimizer steps so far}``."""
        return {"launch_step": self.launch_step, "steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the step count; the model's adapter state must be loaded first.

        Raises:
            ValueError: missing or unexpected keys, a different ``launch_step``, or a step count at
                or past ``launch_step`` with a model that has not launched (a model launched early,
                by an explicit :meth:`launch_now`, may have any step count).
        """
        expected = {"launch_step", "steps"}
        if set(state) != expected:
            raise ValueError(f"controller state keys {sorted(state)} != {sorted(expected)}")
        if state["launch_step"] != self.launch_step:
            raise ValueError(
                f"state has launch_step={state['launch_step']}, this controller {self.launch_step}"
            )
        steps = state["steps"]
        check_int("steps", steps, 0)
        if steps >= self.launch_step and not self.launched:
            raise ValueError(
                f"state is at step {steps} with launch_step={self.launch_step}, but the model is "
                "not launched; load the adapter state first"
            )
        self.steps = steps
        launch_hooks["guard"]("loaded", self)
