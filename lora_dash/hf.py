"""LoRA-Dash with 🤗 ``transformers.Trainer`` (and TRL's ``SFTTrainer``, a subclass): the launch at
global step ``t``, exact resume, adapter-only saves.

* :class:`LoRADashCallback` launches right after optimizer step ``t`` (gradient accumulation,
  evaluation and skipped fp16 steps do not count), gives δ a fresh optimizer state then, and stores
  its step count in every checkpoint's ``trainer_state.json``, so
  ``trainer.train(resume_from_checkpoint=...)`` from a checkpoint taken before or after the launch
  is the run that never stopped.
* :class:`LoRADashTrainer` is a ``Trainer`` whose checkpoints and ``save_model`` hold only the
  adapter (:data:`ADAPTER_FILE`, written by :func:`lora_dash.save_adapter`), not the base model, and
  resume from them. To use a saved adapter: build the base model, :func:`lora_dash.inject` with the
  arguments of training, then :func:`lora_dash.load_adapter` the file. It also trains a model loaded
  with a ``quantization_config`` (bitsandbytes, torchao), which a plain ``Trainer`` refuses.

Both refuse, before the first step, a model that would train as something else
(:mod:`lora_dash.refusals`): PEFT layers nested with ours (a trainer's ``peft_config``), frozen
adapters, an optimizer that holds none of them. docs/TRL.md shows both with ``SFTTrainer``.

Nothing in the core imports this module; it needs the ``hf`` extra (transformers and accelerate).
"""

import os
from typing import Any

import torch
from torch import nn

try:
    from accelerate.utils import parse_flag_from_env
    from transformers import Trainer, TrainerCallback
    from transformers.trainer import TRAINING_ARGS_NAME
    from transformers.trainer_callback import ExportableState
except ImportError as error:  # one line that names the fix, not a traceback from deep inside
    fix = 'lora_dash.hf needs the hf extra: pip install "lora-dash[hf]"'
    raise ImportError(f"{fix} (missing: {error.name})") from None

from lora_dash.checkpoint import load_adapter, save_adapter
from lora_dash.checks import check_int
from lora_dash.inject import dash_layers
from lora_dash.refusals import check_adapters_trainable, check_not_wrapped_by_peft
from lora_dash.schedule import LaunchController, check_launch_options

#: The file that :class:`LoRADashTrainer` writes into each checkpoint and ``save_model`` folder. Not
#: PEFT's ``adapter_model.safetensors``: Trainer would take that for a PEFT adapter.
ADAPTER_FILE = "lora_dash_adapter.safetensors"
#: PEFT's private flag, read by ``Trainer.__init__`` (``validate_quantization_for_training``) as
#: "adapters are attached"; :class:`LoRADashTrainer` sets it on a quantized model for the
#: constructor only.
PEFT_FLAG = "_hf_peft_config_loaded"
#: Why :class:`LoRADashTrainer` refuses FSDP, and what to use instead.
FSDP_REFUSAL = (
    "LoRADashTrainer does not support FSDP: it is untested, since Trainer cannot run FSDP on CPU "
    "(accelerate enables its FSDP plugin only on GPUs and other accelerators, and on CPU silently "
    "wraps the model in DDP instead), and Trainer's FSDP checkpoints write the whole model. Use "
    "LoRADashTrainer without fsdp (one process, or DDP under torchrun), or shard with FSDP2 in "
    "your own loop: torch.distributed.fsdp.fully_shard on every LoRA-Dash layer and on the model, "
    "and a lora_dash.LaunchController attached to your optimizer (docs/API.md, Distributed "
    "training)"
)
#: Why :class:`LoRADashTrainer` refuses DeepSpeed, and what to use instead.
DEEPSPEED_REFUSAL = (
    "LoRADashTrainer does not support DeepSpeed: it is untested, since DeepSpeed is not installed "
    "where lora_dash is tested, and DeepSpeed checkpoints the whole model through its own engine. "
    "Use LoRADashTrainer without deepspeed (one process, or DDP under torchrun), or shard with "
    "FSDP2 in your own loop: torch.distributed.fsdp.fully_shard and a lora_dash.LaunchController "
    "(docs/API.md, Distributed training)"
)
#: Why :class:`LoRADashTrainer` refuses a ``peft_config`` (TRL's trainers take one), and what to do.
PEFT_CONFIG_REFUSAL = (
    "LoRADashTrainer got a peft_config: PEFT would wrap the linear layer inside each LoRA-Dash "
    "layer it matches and freeze A, B and δ, so training would run as plain PEFT LoRA. Drop "
    "peft_config: lora_dash already adapts the model (it is left as it was)"
)
# The model had no flag of its own (only the class default), as opposed to one set to False.
_ABSENT = object()


class LoRADashCallback(TrainerCallback, ExportableState):
    """Makes ``transformers.Trainer`` launch LoRA-Dash right after optimizer step ``launch_step``.

    At ``on_train_begin`` it builds a :class:`lora_dash.LaunchController` for the Trainer's model
    and attaches it to the Trainer's optimizer (built by then, from every parameter with
    ``requires_grad``: ``A``, ``B`` and ``δ`` after :func:`lora_dash.inject`). The controller counts
    real optimizer steps, so with no fp16 overflow the launch comes right after global step ``t``;
    it drops δ's optimizer state at the launch. The step count is saved in ``trainer_state.json``
    (``stateful_callbacks``) and restored from it when training resumes; the phase comes with the
    model (its buffers), so a resume before or after the launch continues exactly.

    Usage::

        lora_dash.inject(model, r".*\\.(query|value)", r=8, alpha=16, s=8)
        callback = LoRADashCallback(launch_step=100)
        trainer = Trainer(model, args, train_dataset=data, callbacks=[callback])

    With a model loaded with a ``quantization_config`` (bitsandbytes, torchao), use it with
    :class:`LoRADashTrainer`: a plain ``Trainer`` refuses such a model in its constructor, before
    any callback runs.

    Args:
        launch_step, strategy, seed: as for :class:`lora_dash.LaunchController`. Resume with the
            same ones: a checkpoint saved with others is refused.

    Attributes:
        controller: the :class:`lora_dash.LaunchController` of the current (or last) ``train()``;
            ``None`` before the first.
    """

    def __init__(self, launch_step: int = 100, strategy: str = "tsd", seed: int = 0) -> None:
        check_int("launch_step", launch_step, 0)
        check_launch_options(strategy, seed)
        self.launch_step, self.strategy, self.seed = launch_step, strategy, seed
        self.controller: LaunchController | None = None

    def state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` keeps: the arguments and the controller's ``state_dict``.

        ``"attributes"`` stays empty: the step count belongs to the controller, built at
        ``on_train_begin`` from the ``"controller"`` entry (also when Trainer re-creates callbacks
        from ``"args"``, with ``restore_callback_states_from_checkpoint``).
        """
        controller = {"launch_step": self.launch_step, "steps": 0}
        if self.controller:
            controller = self.controller.state_dict()
        return {"args": self._arguments(), "attributes": {}, "controller": controller}

    def on_init_end(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Refuse, as the Trainer is built, a model that PEFT has wrapped around or inside
        LoRA-Dash layers (a trainer's ``peft_config``): see
        :func:`lora_dash.refusals.check_not_wrapped_by_peft`."""
        if model is not None:
            check_not_wrapped_by_peft(model)

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Build the controller, restore its count from the (resumed) Trainer state, attach it.

        Before that, nothing changed yet, it refuses a model that cannot train as LoRA-Dash
        (:mod:`lora_dash.refusals`): PEFT layers nested with ours, adapters all frozen, or an
        optimizer (a custom one, say) that holds none of them.

        Raises:
            ValueError: several ``LoRADashCallback``\\ s; a resumed checkpoint saved without this
                callback or with other arguments; no model or optimizer; a refusal above; as
                :meth:`LaunchController.load_state_dict`.
        """
        saved = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(saved, list):
            raise ValueError("a Trainer takes one LoRADashCallback; it has several")
        # A fresh TrainerState lists this callback: only a resumed one can lack it.
        if saved is None:
            raise ValueError(
                f"the checkpoint being resumed (global step {state.global_step}) was saved without "
                "LoRADashCallback, so the optimizer steps already taken toward launch_step are "
                "unknown"
            )
        if saved.get("args") != self._arguments():
            raise ValueError(
                "the checkpoint being resumed was trained with "
                f"LoRADashCallback{saved.get('args')}, this callback has {self._arguments()}; "
                "resume with the same arguments"
            )
        if model is None or optimizer is None:
            needs = "LoRADashCallback needs the Trainer's model and optimizer"
            raise ValueError(f"{needs} at on_train_begin")
        check_not_wrapped_by_peft(model)
        check_adapters_trainable(model, [optimizer])
        if self.controller is not None:  # a previous train() that did not reach on_train_end
            self.controller.detach()
        controller = LaunchController(model, self.launch_step, self.strategy, self.seed)
        controller.load_state_dict(saved["controller"])
        self.controller = controller.attach(optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Stop counting: the next ``train()`` builds a new optimizer wrapper and attaches anew."""
        if self.controller is not None:
            self.controller.detach()

    def _arguments(self) -> dict[str, Any]:
        return {"launch_step": self.launch_step, "strategy": self.strategy, "seed": self.seed}


class LoRADashTrainer(Trainer):
    """A ``transformers.Trainer`` that saves only the adapter and resumes from it.

    ``save_model`` and every checkpoint write :data:`ADAPTER_FILE` (:func:`lora_dash.save_adapter`:
    every LoRA-Dash layer's ``A``, ``B``, ``δ`` and launch buffers, and the modules trained in
    full), the processing class if any and the training arguments: no base weights. Resuming
    (``train(resume_from_checkpoint=...)``) and ``load_best_model_at_end`` load that file with
    :func:`lora_dash.load_adapter`, which refuses an adapter saved for another base model; a folder
    without it is left to ``Trainer``. Checkpoints still hold the optimizer, scheduler, RNG and
    Trainer state, so a resume is exact. Combine with another Trainer subclass by listing this one
    first, ``class MyTrainer(LoRADashTrainer, OtherTrainer)`` (TRL's ``SFTTrainer``, say).

    **Processes.** One process, or DDP under ``torchrun`` (or ``accelerate launch``): every rank
    counts the same optimizer steps and launches after the same global step, the launch's SVDs are
    shared among the ranks (:mod:`lora_dash.distributed`), and only the process that saves writes
    the files. FSDP and DeepSpeed are refused before ``Trainer.__init__`` runs
    (:data:`FSDP_REFUSAL`, :data:`DEEPSPEED_REFUSAL`): neither can run here to be tested, and both
    checkpoint through paths that write the whole model.

    **Quantized bases.** ``Trainer.__init__`` refuses a model loaded with a ``quantization_config``
    (bitsandbytes 4-bit or 8-bit, torchao) unless PEFT adapters are attached: it knows adapters only
    by PEFT's private flag ``model._hf_peft_config_loaded``. A model with LoRA-Dash layers has
    trainable adapters, so this class sets that flag for the duration of ``Trainer.__init__`` only,
    and puts back what was there before (also if the constructor raises): the flag also changes
    ``save_pretrained`` and input gradients, so it is not left on the model. As for PEFT adapters,
    Trainer then also skips its checks that the quantization method supports training and that the
    model is not compiled. A plain ``Trainer`` with :class:`LoRADashCallback` cannot do this: its
    constructor refuses such a model before any callback runs.

    **bitsandbytes 4-bit on CPU.** On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``
    in place for its inference kernel at the first eval-mode forward without gradients (an
    evaluation, say), and that kernel passes no gradient back: every adapter before it would
    silently stop training. A training step on a model with a repacked layer is therefore refused.
    To evaluate during training on such a CPU, set ``support_avx512bf16_for_cpu = False`` on every
    ``Linear4bit`` of a freshly loaded model first.

    **PEFT.** A ``peft_config`` (TRL's ``SFTTrainer`` and its kin take one) is refused before the
    parent constructor runs, so PEFT never touches the model (:data:`PEFT_CONFIG_REFUSAL`). After
    it, the model is refused if PEFT layers nest with LoRA-Dash layers, if every adapter parameter
    of a layer is frozen, or if a custom optimizer (``optimizers=(optimizer, scheduler)``) holds
    none of them (:mod:`lora_dash.refusals`).

    Raises:
        ValueError: ``model`` has no LoRA-Dash layers (call :func:`lora_dash.inject` first); FSDP
            or DeepSpeed is asked for (``args.fsdp``, ``args.deepspeed``, accelerate's
            ``ACCELERATE_USE_FSDP`` or ``ACCELERATE_USE_DEEPSPEED``) or enabled by accelerate; a
            ``peft_config``; a refusal of :mod:`lora_dash.refusals`.
        RuntimeError: at a training step, a bitsandbytes layer repacked for the CPU inference
            kernel.
    """

    def __init__(self, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> None:
        # With model_init (model=None) Trainer builds the model itself: nothing to check yet.
        if model is not None and not dash_layers(model):
            raise ValueError(
                f"LoRADashTrainer needs a model with LoRA-Dash layers; {type(model).__name__} has "
                "none: call lora_dash.inject(model, ...) first"
            )
        if kwargs.get("peft_config") is not None:
            raise ValueError(PEFT_CONFIG_REFUSAL)
        arguments = kwargs.get("args", args[0] if args else None)
        fsdp = bool(getattr(arguments, "fsdp", None)) or parse_flag_from_env("ACCELERATE_USE_FSDP")
        deepspeed = bool(getattr(arguments, "deepspeed", None))
        deepspeed = deepspeed or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
        _refuse_sharded_engines(fsdp, deepspeed)
        if not getattr(model, "is_quantized", False):
            super().__init__(model, *args, **kwargs)
        else:
            previous = vars(model).get(PEFT_FLAG, _ABSENT)
            setattr(model, PEFT_FLAG, True)
            try:
                super().__init__(model, *args, **kwargs)
            finally:
                if previous is _ABSENT:
                    delattr(model, PEFT_FLAG)
                else:
                    setattr(model, PEFT_FLAG, previous)
        _refuse_sharded_engines(fsdp=self.is_fsdp_enabled, deepspeed=self.is_deepspeed_enabled)
        check_not_wrapped_by_peft(self.model)
        # A custom optimizer is here already; Trainer builds its own in train().
        custom = [] if self.optimizer is None else [self.optimizer]
        check_adapters_trainable(self.model, custom)

    def training_step(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``Trainer.training_step``, refused on a model whose gradients a repacked 4-bit layer
        would stop."""
        packed = [name for name, m in model.named_modules() if _packed_for_cpu_inference(m)]
        if packed:
            raise RuntimeError(
                f"bitsandbytes repacked {len(packed)} 4-bit layers (first: {packed[0]!r}) for "
                "its CPU inference kernel at an eval-mode forward without gradients; that kernel "
                "passes no gradient back, so the adapters would stop training. Load the model "
                "again and set support_avx512bf16_for_cpu = False on its Linear4bit layers before "
                "evaluating or training"
            )
        return super().training_step(model, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter, not ``state_dict`` (the whole model's); only the process that saves
        writes."""
        output_dir = self.args.output_dir if output_dir is None else output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(self.model, os.path.join(output_dir, ADAPTER_FILE))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, checkpoint: str, model: nn.Module | None = None) -> None:
        path = os.path.join(checkpoint, ADAPTER_FILE)
        if not os.path.isfile(path):
            super()._load_from_checkpoint(checkpoint, model)
            return
        load_adapter(self.model if model is None else model, path)

    def _load_best_model(self) -> None:
        path = os.path.join(self.state.best_model_checkpoint, ADAPTER_FILE)
        if not os.path.isfile(path):
            super()._load_best_model()
            return
        load_adapter(self.model, path)


def _refuse_sharded_engines(fsdp: bool, deepspeed: bool) -> None:
    if fsdp:
        raise ValueError(FSDP_REFUSAL)
    if deepspeed:
        raise ValueError(DEEPSPEED_REFUSAL)


def _packed_for_cpu_inference(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` whose weight is in the layout of its CPU inference kernel."""
    quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(quant_state, "packing_format_for_cpu", False))
