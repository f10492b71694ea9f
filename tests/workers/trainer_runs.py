"""One rank of ``tests/test_hf_distributed.py``: ``LoRADashTrainer`` under DDP, started as ``torchrun`` starts
it, and the single-process run it is compared with. Run as ``python trainer_runs.py RANK WORLD STORE_PORT
OUT_DIR``.

A rank sets the environment ``torchrun`` gives its workers (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``, and ``TORCHELASTIC_USE_AGENT_STORE``: every rank joins the store the test
serves, as torchrun's agent serves it) and lets accelerate create the gloo group, as under torchrun. It trains
without stopping (checkpoints at 2, 4 and 6, the launch right after global step ``T``) and saves the model;
resumes from the checkpoints at 2 and 4; asks for Trainer's FSDP2 (:func:`fsdp_request`); and writes
``OUT_DIR/trainer_rank{RANK}.pt``: one entry for each, or ``{"error": traceback}``.

Two records need no hook in the library: the layers this rank decomposed at the launch (``find_directions``,
which the shared launch calls on a layer's owner alone, wrapped) and the adapter files this rank wrote
(``save_adapter`` as ``lora_dash.hf`` calls it, wrapped).
"""

import os
import sys
import traceback
from functools import partial
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]  # this checkout's lora_dash, whatever is installed
import tiny_bert  # noqa: E402
from tiny_bert import T, Tokens, training_arguments  # noqa: E402

from lora_dash import adapter_state_dict, dash_layers  # noqa: E402
from lora_dash import hf as lora_dash_hf  # noqa: E402
from lora_dash.hf import LoRADashCallback, LoRADashTrainer  # noqa: E402
from lora_dash.layer import LoRADashLinear  # noqa: E402

from workers import gloo_group  # noqa: E402

#: Two sizes of layer (32 × 32 and 48 × 32), so the assignment of SVDs to ranks is not a plain alternation.
TARGETS = r".*\.(query|value|intermediate\.dense)"
PROBE = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(9))
#: Without dropout: ranks draw their own masks, one process draws others; the comparison is about the sums.
build_model = partial(tiny_bert.build_model, targets=TARGETS, dropout=0.0)


class PhaseRecorder(TrainerCallback):
    """The phase of every layer at the end of each global step."""

    def __init__(self) -> None:
        self.phases = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.phases.append((state.global_step, sorted({layer.launched for layer in dash_layers(model).values()})))


def make_trainer(output_dir: Path, world: int = 1, **overrides) -> tuple[LoRADashTrainer, PhaseRecorder]:
    """``LoRADashTrainer`` on ``build_model()``, launching after ``T``, with a :class:`PhaseRecorder`."""
    recorder = PhaseRecorder()
    callbacks = [LoRADashCallback(launch_step=T), recorder]
    trainer = LoRADashTrainer(
        model=build_model(),
        args=training_arguments(output_dir, world, **overrides),
        train_dataset=Tokens(),
        callbacks=callbacks,
    )
    return trainer, recorder


def train(trainer: LoRADashTrainer, recorder: PhaseRecorder, resume: Path | None = None) -> dict:
    """Train (resuming from ``resume`` if given); what the tests compare."""
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, LoRADashCallback)]
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    return {
        "phases": recorder.phases,
        "adapter": adapter_state_dict(model),
        "logits": logits,
        "controller": callback.controller.state_dict(),
    }


# ------------------------------------------------------------------------------------------ one rank
def torchrun_environment(rank: int, world: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }


class Spy:
    """What this rank did during one run: the layers it decomposed (at the launch) and the adapter files it wrote."""

    def __init__(self, out: Path) -> None:
        self.model, self.decomposed, self.saved = None, [], []
        find_directions, save_adapter = LoRADashLinear.find_directions, lora_dash_hf.save_adapter

        def recorded_find_directions(layer, *args, **kwargs):
            self.decomposed += [name for name, each in dash_layers(self.model).items() if each is layer]
            return find_directions(layer, *args, **kwargs)

        def recorded_save_adapter(model, path):
            self.saved.append(os.path.relpath(path, out))
            save_adapter(model, path)

        LoRADashLinear.find_directions = recorded_find_directions
        lora_dash_hf.save_adapter = recorded_save_adapter

    def watch(self, model) -> None:
        self.model, self.decomposed, self.saved = model, [], []


def fsdp_request(output_dir: Path, world: int) -> dict:
    """Trainer's FSDP2 configuration on these CPU ranks: what a plain ``Trainer`` makes of it in one step, and
    what ``LoRADashTrainer`` says."""
    fsdp = {"fsdp": True, "fsdp_config": {"version": 2}, "save_strategy": "no", "max_steps": 1}
    plain = Trainer(model=build_model(), args=training_arguments(output_dir, world, **fsdp), train_dataset=Tokens())
    plain.train()
    result = {
        "fsdp_enabled": plain.is_fsdp_enabled,
        "distributed_type": str(plain.accelerator.state.distributed_type),
        "wrapped": type(plain.model_wrapped).__name__,
    }
    try:
        make_trainer(output_dir, world, **fsdp)  # its TrainingArguments reset accelerate's state: read it first
    except ValueError as error:
        return result | {"refusal": str(error)}
    return result | {"refusal": None}


def main(rank: int, world: int, port: int, out: Path) -> None:
    """The uninterrupted run (then ``save_model``), and the runs resumed from its checkpoints at 2 and 4."""
    os.environ.update(torchrun_environment(rank, world, port))
    torch.set_num_threads(1)  # the ranks share two cores
    spy = Spy(out)
    runs = {
        "run": (None, {}),
        **{f"resumed{step}": (out / "run" / f"checkpoint-{step}", {"save_strategy": "no"}) for step in (2, 4)},
    }
    results = {}
    try:
        for name, (resume, overrides) in runs.items():
            trainer, recorder = make_trainer(out / name, world, **overrides)
            spy.watch(trainer.model)
            results[name] = train(trainer, recorder, resume)
            if name == "run":
                trainer.save_model(str(out / "adapter"))
            results[name] |= {
                "decomposed": spy.decomposed,
                "saved": spy.saved,
                "wrapped": type(trainer.model_wrapped).__name__,
            }
        results["fsdp"] = fsdp_request(out / "fsdp", world)
    except Exception:  # reported by the test that reads the result
        results = {"error": traceback.format_exc()}
    torch.save(results, out / f"trainer_rank{rank}.pt")
    gloo_group.leave()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
