"""When to launch: after optimizer step ``t``, counted once for the whole model."""

import warnings
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from lora_dash import distributed as shared
from lora_dash import quantized
from lora_dash.checks import check_int, check_seed
from lora_dash.directions import check_strategy
from lora_dash.inject import dash_layers, require_dash_layers
from lora_dash.layer import DashDirections, LoRADashLinear

#: How many ``.optimizer`` wrappers :meth:`LaunchController.attach` looks through (accelerate's wrapper of a
#: DeepSpeed wrapper of a torch optimizer is three); a bound, so that a self-referencing object cannot loop.
MAX_OPTIMIZER_WRAPPERS = 8


def check_launch_step(launch_step: int) -> None:
    """Validate a launch step ``t``: an int ``>= 0``."""
    check_int("launch_step", launch_step, 0)


def check_launch_options(strategy: str, seed: int, distributed: bool = True) -> None:
    """Validate :func:`launch`'s ``strategy``, ``seed`` (an int in ``[0, 2⁶³ - 1]``) and ``distributed`` (a bool)."""
    check_strategy(strategy)
    check_seed(seed)
    if not isinstance(distributed, bool):
        raise ValueError(f"distributed must be a bool, got {distributed!r}")


def layer_generators(seed: int, count: int) -> list[torch.Generator]:
    """``count`` independent CPU generators, one per layer, all determined by ``seed``.

    Layer ``i`` is seeded with the ``i``-th draw of a generator seeded with ``seed``, so nearby seeds
    (or nearby layers) do not share streams, and every process computes the same generators.
    """
    layer_seeds = torch.randint(2**62, (count,), generator=torch.Generator().manual_seed(seed))
    return [torch.Generator().manual_seed(int(layer_seed)) for layer_seed in layer_seeds]


def launch(model: nn.Module, strategy: str = "tsd", seed: int = 0, distributed: bool = True) -> dict[str, Tensor]:
    """Launch every LoRA-Dash layer of ``model`` now: all of them, or (on any error) none.

    Directions are found layer by layer (one full SVD alive at a time, only ``U_s``, ``V_s`` kept),
    and committed only once every layer has found its own.

    Under ``torch.distributed`` with more than one rank (DDP, FSDP2) the ranks share the work: each
    layer's SVD and selection runs on one rank, chosen by
    :func:`lora_dash.distributed.assign_owners` (largest ``n·m·min(n, m)`` first, to the least-loaded
    rank); under FSDP2 only that rank gathers the whole weight; each owner then broadcasts ``U_s``, ``V_s``
    and the indices (``s·(n + m) + s`` numbers a layer), so every rank commits bit for bit what it would
    have selected alone. Every rank must call this, as for any collective. An error on any rank is raised
    on every rank with the same message (that of the lowest-numbered failing layer, as one process would
    raise it) and no layer launches.

    Args:
        model: a model with LoRA-Dash layers.
        strategy: ``"tsd"`` (the method) or a baseline of
            :data:`lora_dash.directions.STRATEGIES`; see :func:`lora_dash.directions.pick_directions`.
        seed: for ``"random"``: the layer at position ``i`` of :func:`dash_layers` order draws with its
            own generator from :func:`layer_generators`, so every rank and every rerun draws the same.
        distributed: share the launch among the ranks when ``torch.distributed`` is initialised with more
            than one (the default); ``False``: every rank decomposes every layer itself (the redundant
            launch: no communication but FSDP2's all-gathers, and ``world`` times the work).

    Returns:
        The selected singular-value indices, ``(s,)`` each, by layer name.

    Raises:
        ValueError: an unknown strategy, a bad seed or ``distributed`` (before any work), no LoRA-Dash
            layer, ranks holding different layers, or a layer's update is not finite or has too few
            eligible directions (the message names it).
        RuntimeError: a layer is already launched or merged.
    """
    check_launch_options(strategy, seed, distributed)
    layers = require_dash_layers(model)
    generators = layer_generators(seed, len(layers))
    if distributed and shared.is_active():
        chosen = _find_directions_shared(layers, strategy, generators)
    else:
        chosen = {
            name: layer.find_directions(strategy=strategy, generator=generator)
            for (name, layer), generator in zip(layers.items(), generators)
        }
    for name, layer in layers.items():
        layer.launch(chosen[name])
    return {name: directions.index for name, directions in chosen.items()}


def _whole_on(layer: LoRADashLinear, owner: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(W, A, B)`` of ``layer``, whole, on rank ``owner``; ``None`` elsewhere. Every rank must call it: a
    sharded tensor is gathered to ``owner`` (:func:`lora_dash.distributed.gather_to`)."""
    gather = partial(shared.gather_to, dst=owner)
    A, B = gather(layer.lora_A), gather(layer.lora_B)
    if quantized.is_quantized(layer.base) and dist.get_rank() != owner:
        return None  # dequantized by its owner alone, as one process would
    weight = layer.base_weight(gather)
    return None if weight is None else (weight, A, B)


def _find_directions_shared(
    layers: dict[str, LoRADashLinear], strategy: str, generators: list[torch.Generator]
) -> dict[str, DashDirections]:
    """:func:`launch`'s selection shared among the ranks of the default group (a collective).

    Rounds: in round ``j`` every rank gathers (if sharded) and then decomposes its ``j``-th layer, largest
    first, so each rank holds one whole weight and one full SVD at a time, and the ranks decompose in
    parallel. A rank that failed skips its later layers but keeps joining the gathers. Then the ranks agree on
    the first error, and each owner broadcasts its selections.
    """
    items = list(layers.values())
    rank, world = dist.get_rank(), dist.get_world_size()
    device = items[0].dash_U.device  # where the adapter lives: a tensor the process group can send
    layout = repr([(name, layer.out_features, layer.in_features, layer.s) for name, layer in layers.items()])
    shared.check_same_on_every_rank(
        layout,
        "their LoRA-Dash layers (names, shapes or s); where each rank holds its own layers (pipeline "
        "stages), launch with distributed=False",
        device,
    )
    errors: dict[int, Exception] = {}
    for index, layer in enumerate(items):
        try:
            layer.check_launchable()
        except RuntimeError as error:
            errors[index] = error
            break
    shared.raise_first_error(errors, len(items), device)

    costs = [shared.svd_cost(layer.out_features, layer.in_features) for layer in items]
    owners = shared.assign_owners(costs, world)
    queues = [[index for index in shared.cost_order(costs) if owners[index] == owner] for owner in range(world)]
    found: dict[int, DashDirections] = {}
    for round_index in range(max(map(len, queues))):
        own = None
        for owner, queue in enumerate(queues):
            if round_index < len(queue):
                index = queue[round_index]
                try:
                    whole = _whole_on(items[index], owner)
                except Exception as error:  # a quantized weight that fails to dequantize on its owner
                    errors[index], whole = error, None
                if whole is not None:
                    own = index, whole
        if own is not None and own[0] < min(errors, default=len(items)):
            index, whole = own
            try:
                found[index] = items[index].directions_from(*whole, strategy=strategy, generator=generators[index])
            except Exception as error:  # raised on every rank below, once the ranks agree
                errors[index] = error
        own = whole = None  # the whole weight goes before the next round gathers another
    shared.raise_first_error(errors, len(items), device)

    chosen: dict[int, DashDirections] = {}
    for owner, queue in enumerate(queues):
        if rank == owner:
            mine = [found[index] for index in queue]
        else:
            mine = [
                DashDirections(
                    U_s=torch.empty_like(items[index].dash_U, dtype=torch.float32),
                    V_s=torch.empty_like(items[index].dash_V, dtype=torch.float32),
                    index=torch.empty_like(items[index].dash_index),
                )
                for index in queue
            ]
        vectors = shared.broadcast_from([v.to(device) for d in mine for v in (d.U_s, d.V_s)], src=owner)
        indices = shared.broadcast_from([d.index.to(device) for d in mine], src=owner)
        for position, index in enumerate(queue):
            chosen[index] = DashDirections(
                U_s=vectors[2 * position], V_s=vectors[2 * position + 1], index=indices[position]
            )
    return {name: chosen[index] for index, name in enumerate(layers)}


class LaunchController:
    """Counts optimizer steps for a whole model and launches every layer right after step ``t``.

    The count and phase are state (``state_dict``), so resuming a run launches at the same step.
    Forward passes, evaluation, gradient-accumulation micro-batches and activation-checkpoint
    recomputes do not count; only optimizer steps do, and with :meth:`attach` only real ones: a step
    that a grad scaler skips on overflow is not a step.

    Usage::

        controller = LaunchController(model, launch_step=100).attach(optimizer)  # post-step hook
        # or, in a custom loop: call controller.step() after each optimizer step.
        # with transformers.Trainer: lora_dash.hf.LoRADashCallback(launch_step=100)

    The phase is kept as a Python value, read from the model's buffers at construction, when
    :attr:`steps` is assigned (as :meth:`load_state_dict` does) and, until the launch, at each step from
    ``t`` on; after the launch :meth:`step` reads no tensor (no host–device synchronisation), except once,
    one step after the launch, to check that every layer launched and that δ trains. So an adapter
    state loaded into the model behind the controller's back later than that is not noticed: resume
    with :func:`lora_dash.load_training_checkpoint`, or load the controller's state too.

    A controller that is never attached and never stepped cannot launch anything. Until it is, it
    watches every optimizer step (a global post-step hook, nothing on the forward or backward) and
    warns once if optimizers that hold the model's first adapter parameter have stepped more than
    ``t`` times while the model has not launched. It cannot see steps of an optimizer built from other
    parameter objects (e.g. the shards of a model sharded after the controller was built), nor
    tell apart steps that a fused optimizer skipped on a grad-scaler overflow.

    Args:
        model: a model with LoRA-Dash layers (see :func:`inject`).
        launch_step: ``t >= 0``; ``0`` launches at once (``ΔW = 0``, so the ``s`` largest σ are chosen).
        strategy, seed, distributed: how :func:`launch` chooses the directions (default: the method's TSDs,
            shared among the ranks under ``torch.distributed``). They are arguments, not saved state: pass
            the same ones when resuming.
        log_evidence: if given (e.g. ``print`` or ``logger.info``), right after the launch it receives two
            lines, :func:`lora_dash.analysis.evidence_summary` of
            :func:`lora_dash.analysis.model_null_evidence` for ``"tsd"`` and for ``"coordinate"``: whether
            the LoRA update the directions were chosen from says more than isotropic noise. That costs
            two SVDs per layer and the null's draws, at the launch only; None (default) computes nothing.
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
        check_launch_step(launch_step)
        check_launch_options(strategy, seed, distributed)
        if log_evidence is not None and not callable(log_evidence):
            raise ValueError(f"log_evidence must be callable or None, got {type(log_evidence).__name__}")
        layers = require_dash_layers(model)
        self.log_evidence = log_evidence
        self.model = model
        self.launch_step = launch_step
        self.strategy, self.seed, self.distributed = strategy, seed, distributed
        self._optimizers: list[torch.optim.Optimizer] = []
        self._hooks: list[Any] = []
        self._watch: _UncountedStepsWatch | None = None
        self.steps = 0  # reads the phase
        if launch_step == 0 and not self._launched:
            self.launch()
        elif not self._launched:
            self._watch = _UncountedStepsWatch(model, next(iter(layers.values())), launch_step)

    @property
    def launched(self) -> bool:
        """Whether every LoRA-Dash layer of the model is in the dash phase (read from the model's buffers)."""
        return all(layer.launched for layer in dash_layers(self.model).values())

    @property
    def steps(self) -> int:
        """Optimizer steps counted so far. Assigning it (a resume, a rollback) re-reads the phase from the model."""
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = value
        self._launched = self.launched

    def attach(self, optimizer: Any) -> "LaunchController":
        """Count every real step of ``optimizer`` (a post-step hook), and reset δ's state in it at launch.

        ``optimizer`` is a ``torch.optim.Optimizer`` or a wrapper that exposes the real one as
        ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, the optimizer of ``transformers.Trainer``),
        unwrapped as many times as needed. A step that ``torch.amp.GradScaler`` skips on overflow is
        not counted: the scaler does not call ``step()`` then, or (for an optimizer that skips inside its
        own step, such as fused Adam) it sets ``found_inf``, which is read until the launch; after the
        launch such a skipped step is counted, to keep the steps free of host–device synchronisation.

        Raises:
            ValueError: ``optimizer`` is not an optimizer and wraps none (e.g. ``trainer.optimizer``
                before ``train()`` builds it: use :class:`lora_dash.hf.LoRADashCallback`).
        """
        inner = optimizer
        for _ in range(MAX_OPTIMIZER_WRAPPERS):
            if getattr(inner, "optimizer", None) is None:
                break
            inner = inner.optimizer
        if not (callable(getattr(inner, "register_step_post_hook", None)) and hasattr(inner, "param_groups")):
            raise ValueError(
                f"attach() needs a torch optimizer or a wrapper exposing one as .optimizer, got "
                f"{type(optimizer).__name__}; transformers.Trainer builds its optimizer in train(): use "
                "lora_dash.hf.LoRADashCallback"
            )
        self._stop_watching()
        self._optimizers.append(inner)
        self._hooks.append(inner.register_step_post_hook(self._after_optimizer_step))
        return self

    def detach(self) -> None:
        """Remove the hooks of every attached optimizer."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._optimizers = [], []

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # GradScaler sets found_inf on an optimizer that skips inside its own step (fused Adam).
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and not self._launched and bool(found_inf):
            return
        self.step()

    def step(self) -> None:
        """Record one optimizer step; launch if it was step ``t``; one step later, check that the dash trains.

        Before step ``t`` and after the launch this is Python arithmetic only (no tensor is read).
        """
        if self._watch is not None:
            self._stop_watching()
        self._steps += 1
        if self._steps < self.launch_step:
            return
        if self._launched:
            if self._steps == self.launch_step + 1:
                self._warn_if_dash_is_not_training()
            return
        self._launched = self.launched  # launched outside the controller (launch(model), a loaded state)?
        if self._launched:
            return
        if self._steps == self.launch_step:
            self.launch()
        else:
            self._warn_pending()

    def launch(self) -> dict[str, Tensor]:
        """Launch now (see :func:`launch`, with this controller's strategy, seed and ``distributed``) and give
        δ a fresh optimizer state in attached optimizers.

        Before launch ``U_s = V_s = 0``, so δ's gradient was zero; an Adam-style state built from those
        zeros (and its step count) would skew δ's first updates, so it is dropped.
        """
        selected = launch(self.model, self.strategy, self.seed, self.distributed)
        if self.log_evidence is not None:
            self._log_evidence()
        self._launched = True
        self._stop_watching()
        deltas = [layer.dash_delta for layer in dash_layers(self.model).values()]
        for optimizer in self._optimizers:
            for delta in deltas:
                optimizer.state.pop(delta, None)
        if self._optimizers:
            held = {
                id(p) for optimizer in self._optimizers for group in optimizer.param_groups for p in group["params"]
            }
            untrained = [name for name, layer in dash_layers(self.model).items() if id(layer.dash_delta) not in held]
            if untrained:
                warnings.warn(
                    f"LoRA-Dash: no attached optimizer holds δ of layers {untrained}; the dash will not "
                    "train. Build the optimizer from lora_dash.adapter_parameters(model).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return selected

    def _log_evidence(self) -> None:
        # Imported here: the analysis module builds on this one (layer_generators).
        from lora_dash.analysis import evidence_summary, model_null_evidence

        for strategy in ("tsd", "coordinate"):
            try:
                summary = evidence_summary(model_null_evidence(self.model, strategy, seed=self.seed))
            except ValueError as error:  # e.g. launch_step=0: ΔW = 0 has no top-s share; the launch stands
                summary = f"not computed: {error}"
            self.log_evidence(f"LoRA-Dash launch, null evidence ({strategy}): {summary}")

    def _stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def _warn_pending(self) -> None:
        pending = [name for name, layer in dash_layers(self.model).items() if not layer.launched]
        warnings.warn(
            f"LoRA-Dash: optimizer step {self._steps} is past launch_step={self.launch_step} but "
            f"layers {pending} have not launched; they are training as plain LoRA",
            RuntimeWarning,
            stacklevel=3,
        )

    def _warn_if_dash_is_not_training(self) -> None:
        """The one-off check one step after the launch (it reads tensors): a layer injected since has not
        launched; or δ is still exactly zero despite a non-zero gradient, which happens only if no
        optimizer stepped it (the case an explicit ``step()`` cannot see at launch)."""
        layers = dash_layers(self.model)
        if not all(layer.launched for layer in layers.values()):
            self._launched = False
            self._warn_pending()
            return
        frozen = [
            name
            for name, layer in layers.items()
            if layer.dash_delta.grad is not None
            and bool(layer.dash_delta.grad.any())
            and not bool(layer.dash_delta.any())
        ]
        if frozen:
            warnings.warn(
                f"LoRA-Dash: δ of layers {frozen} did not move in the optimizer step after the launch although "
                "its gradient is non-zero; the dash is not training. Build the optimizer from "
                "lora_dash.adapter_parameters(model).",
                RuntimeWarning,
                stacklevel=3,
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
        check_int("steps", steps, 0)
        if steps >= self.launch_step and not self.launched:  # launched before t is fine: an explicit launch()
            raise ValueError(
                f"state is at step {steps} with launch_step={self.launch_step}, but the model is not launched; "
                "load the adapter state first"
            )
        self.steps = steps  # re-reads the phase


class _UncountedStepsWatch:
    """Warns once when optimizers step a model more than ``launch_step`` times and it has not launched.

    One global optimizer post-step hook serves every watch, so watching costs nothing on the forward or
    backward, and nothing at all once no watch is left (the controller stops its watch when it counts).
    A hook cannot be removed while the hooks run, so a watch that ends there (it warned, or its model is
    gone) only leaves :attr:`active`; the hook goes with the next :meth:`stop` that finds none left.
    A watch holds its model weakly: one whose controller was dropped still warns (nothing counts the
    run), one whose model is gone ends.
    """

    active: list["_UncountedStepsWatch"] = []
    hook: Any = None

    def __init__(self, model: nn.Module, layer: nn.Module, launch_step: int) -> None:
        self._model, self._layer = weakref.ref(model), weakref.ref(layer)
        self._launch_step = launch_step
        self._seen = 0
        _UncountedStepsWatch.active.append(self)
        if _UncountedStepsWatch.hook is None:
            _UncountedStepsWatch.hook = register_optimizer_step_post_hook(_UncountedStepsWatch._after_optimizer_step)

    def stop(self) -> None:
        """End this watch; call it outside optimizer hooks (a controller's own step hook is fine: it runs
        before the global ones)."""
        if self in _UncountedStepsWatch.active:
            _UncountedStepsWatch.active.remove(self)
        if not _UncountedStepsWatch.active and _UncountedStepsWatch.hook is not None:
            _UncountedStepsWatch.hook.remove()
            _UncountedStepsWatch.hook = None

    @staticmethod
    def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for watch in list(_UncountedStepsWatch.active):
            if watch._ended_by(optimizer):
                _UncountedStepsWatch.active.remove(watch)

    def _ended_by(self, optimizer: torch.optim.Optimizer) -> bool:
        """Count ``optimizer``'s step if it trains the model; warn past ``launch_step``; True when done."""
        model, layer = self._model(), self._layer()
        if model is None or layer is None:
            return True
        if not any(p is layer.lora_A for group in optimizer.param_groups for p in group["params"]):
            return False  # another model's optimizer
        self._seen += 1
        if self._seen <= self._launch_step:
            return False
        if not all(module.launched for module in dash_layers(model).values()):  # another controller launched it?
            warnings.warn(
                f"LoRA-Dash: optimizers have stepped the model's adapters {self._seen} times, past "
                f"launch_step={self._launch_step}, but its LaunchController counted no step, so nothing "
                "launched and the model trains as plain LoRA. Call controller.attach(optimizer) or "
                "controller.step() after each optimizer step; with transformers.Trainer use "
                "lora_dash.hf.LoRADashCallback.",
                RuntimeWarning,
                stacklevel=4,
            )
        return True
