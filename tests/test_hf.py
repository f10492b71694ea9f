"""🤗 Trainer: the launch right after global step t under gradient accumulation, exact resume from
checkpoints before and after the launch, adapter-only checkpoints. (accelerate's optimizer wrapper on
its own: tests/test_training.py.)"""

import importlib
import os
import sys

import pytest
import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from lora_dash import adapter_state_dict, dash_layers, inject, load_adapter
from lora_dash.hf import ADAPTER_FILE, LoRADashCallback, LoRADashTrainer

T = 3  # launch step
STEPS = 6  # optimizer steps per run; checkpoints every 2, so at 2 (before the launch) and 4 (after)
ACCUMULATION = 4
TARGETS = r".*\.(query|value)"


def build_base() -> BertForSequenceClassification:
    """A two-layer BERT classifier from a config: the same "pretrained" weights (and head) for every call."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(config)


def build_model(init_seed: int = 1) -> BertForSequenceClassification:
    model = build_base()
    torch.manual_seed(init_seed)
    inject(model, TARGETS, r=4, alpha=8, s=2)
    return model


class Tokens(Dataset):
    """Random token ids and labels, fixed by a seed."""

    def __init__(self, size: int = STEPS * ACCUMULATION * 2) -> None:
        generator = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, 64, (size, 8), generator=generator)
        self.labels = torch.randint(0, 3, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def training_arguments(output_dir, **overrides) -> TrainingArguments:
    settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=ACCUMULATION, max_steps=STEPS,
                    learning_rate=1e-2, save_strategy="steps", save_steps=2, logging_strategy="no", report_to=[],
                    use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    return TrainingArguments(str(output_dir), **{**settings, **overrides})


def train(output_dir, trainer_class=Trainer, resume=None, callback=None, **overrides):
    """Train ``build_model()`` with a LoRADashCallback (by default at ``T``); returns the trainer."""
    callback = LoRADashCallback(launch_step=T) if callback is None else callback
    arguments = training_arguments(output_dir, **overrides)
    trainer = trainer_class(model=build_model(), args=arguments, train_dataset=Tokens(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def assert_same_adapter(expected_model, actual_model) -> None:
    """Every adapter tensor (A, B, δ, U_s, V_s, indices, phase) bit-identical."""
    expected, actual = adapter_state_dict(expected_model), adapter_state_dict(actual_model)
    assert expected.keys() == actual.keys()
    assert {key for key in expected if not torch.equal(expected[key], actual[key])} == set()


def callback_of(trainer) -> LoRADashCallback:
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, LoRADashCallback)]
    return callback


@pytest.fixture(scope="module")
def run_of(tmp_path_factory):
    """``run_of(trainer_class)``: a whole run with its checkpoints (at 2, 4, 6), made once per class."""
    runs = {}

    def run(trainer_class):
        if trainer_class not in runs:
            output_dir = tmp_path_factory.mktemp(trainer_class.__name__)
            runs[trainer_class] = train(output_dir, trainer_class), output_dir
        return runs[trainer_class]

    return run


# ---------------------------------------------------------------- the launch, right after global step t
class PhaseRecorder(TrainerCallback):
    """The phase at the end of every global step, and the forward passes (micro-batches) in between."""

    def __init__(self, model) -> None:
        self.phases, self.forwards = [], 0
        model.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        phase = {layer.launched for layer in dash_layers(model).values()}
        self.phases.append((state.global_step, self.forwards, phase))


def test_callback_launches_right_after_global_step_t_under_gradient_accumulation(tmp_path):
    model = build_model()
    recorder = PhaseRecorder(model)
    trainer = Trainer(model=model, args=training_arguments(tmp_path, save_strategy="no"), train_dataset=Tokens(),
                      callbacks=[LoRADashCallback(launch_step=T), recorder])
    trainer.train()
    assert recorder.phases == [(step, ACCUMULATION * step, {step >= T}) for step in range(1, STEPS + 1)]
    # The Trainer's optimizer holds δ, gave it a fresh state at the launch, and δ trains from then on.
    optimizer = trainer.optimizer.optimizer
    for layer in dash_layers(model).values():
        assert float(optimizer.state[layer.dash_delta]["step"]) == STEPS - T
        assert float(optimizer.state[layer.lora_A]["step"]) == STEPS
        assert layer.dash_delta.ne(0).all()
    assert callback_of(trainer).controller.state_dict() == {"launch_step": T, "steps": STEPS}


# -------------------------------------------------------------------------------- exact resume
# Trainer's checkpoints hold the whole model; LoRADashTrainer's only the adapter.
@pytest.mark.parametrize("trainer_class", [Trainer, LoRADashTrainer], ids=["Trainer", "LoRADashTrainer"])
@pytest.mark.parametrize("checkpoint", [2, 4], ids=["before-launch", "after-launch"])
def test_resume_from_a_checkpoint_is_bit_identical_to_an_uninterrupted_run(checkpoint, trainer_class, run_of, tmp_path):
    trainer, output_dir = run_of(trainer_class)
    resumed = train(tmp_path, trainer_class, resume=output_dir / f"checkpoint-{checkpoint}")
    assert_same_adapter(trainer.model, resumed.model)
    for name, layer in dash_layers(resumed.model).items():  # the same directions, selected at the same step
        assert layer.dash_index.tolist() == dash_layers(trainer.model)[name].dash_index.tolist()
    assert callback_of(resumed).controller.state_dict() == callback_of(trainer).controller.state_dict()


def test_resume_is_exact_when_trainer_recreates_the_callback_from_its_saved_state(run_of, tmp_path):
    # restore_callback_states_from_checkpoint: Trainer replaces the callback by LoRADashCallback(**saved args).
    trainer, output_dir = run_of(Trainer)
    resumed = train(tmp_path, Trainer, resume=output_dir / "checkpoint-2", restore_callback_states_from_checkpoint=True)
    assert_same_adapter(trainer.model, resumed.model)


def test_resume_with_other_callback_arguments_is_refused(run_of, tmp_path):
    _, output_dir = run_of(LoRADashTrainer)
    with pytest.raises(ValueError, match="launch_step': 4"):
        train(tmp_path, LoRADashTrainer, resume=output_dir / "checkpoint-2", callback=LoRADashCallback(launch_step=4))


def test_resume_from_a_checkpoint_saved_without_the_callback_is_refused(tmp_path):
    trainer = Trainer(model=build_model(), args=training_arguments(tmp_path / "plain", max_steps=2),
                      train_dataset=Tokens())
    trainer.train()
    with pytest.raises(ValueError, match="saved without LoRADashCallback"):
        train(tmp_path / "resumed", resume=tmp_path / "plain" / "checkpoint-2")


@pytest.mark.parametrize("kwargs, bad", [({"launch_step": -1}, "-1"), ({"strategy": "top"}, "'top'"),
                                         ({"seed": 1.5}, "1.5")])
def test_callback_rejects_bad_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        LoRADashCallback(**kwargs)


# ---------------------------------------------------------------------- adapter-only checkpoints
def base_weight_bytes(model) -> int:
    adapter = set(adapter_state_dict(model))
    return sum(value.numel() * value.element_size() for key, value in model.state_dict().items() if key not in adapter)


def test_adapter_only_checkpoints_hold_no_base_weights(run_of, tmp_path):
    trainer, output_dir = run_of(LoRADashTrainer)
    trainer.save_model(tmp_path)
    for folder in [output_dir / f"checkpoint-{step}" for step in (2, 4, 6)]:
        assert sorted(os.listdir(folder)) == sorted([ADAPTER_FILE, "optimizer.pt", "rng_state.pth", "scheduler.pt",
                                                     "trainer_state.json", "training_args.bin"])
    assert sorted(os.listdir(tmp_path)) == [ADAPTER_FILE, "training_args.bin"]
    # The adapter file is a fraction of the base weights it leaves out (~11 kB here against ~75 kB).
    assert os.path.getsize(tmp_path / ADAPTER_FILE) < base_weight_bytes(trainer.model) / 4


def test_a_saved_adapter_loaded_into_a_fresh_base_gives_the_trained_logits(run_of, tmp_path):
    trainer, _ = run_of(LoRADashTrainer)
    trainer.save_model(tmp_path)
    fresh = build_model(init_seed=2).eval()  # the same base with another A: only the file can make it the trained model
    probe = Tokens(4).ids
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=probe).logits
        assert not torch.equal(fresh(input_ids=probe).logits, expected)
        load_adapter(fresh, tmp_path / ADAPTER_FILE)
        assert torch.equal(fresh(input_ids=probe).logits, expected)


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    # A metric that ranks the evaluations at steps 2, 4, 6 as 1, 3, 2: the best checkpoint is 4, not the
    # last one, which stays in the model unless the best adapter is loaded back.
    ranks = iter([1.0, 3.0, 2.0])
    model = build_model()
    trainer = LoRADashTrainer(model=model, args=training_arguments(
        tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="rank"),
        train_dataset=Tokens(), eval_dataset=Tokens(2), compute_metrics=lambda _: {"rank": next(ranks)},
        callbacks=[LoRADashCallback(T)])
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    reference = build_model(init_seed=2)
    load_adapter(reference, tmp_path / "checkpoint-4" / ADAPTER_FILE)
    assert_same_adapter(reference, model)


@pytest.mark.parametrize("engine", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_lora_dash_trainer_refuses_fsdp_and_deepspeed(engine, tmp_path, monkeypatch):
    # Both need a process group to enable; what matters is the check on what Trainer decided.
    initialize = Trainer.__init__

    def initialize_with_engine(self, *args, **kwargs):
        initialize(self, *args, **kwargs)
        setattr(self, engine, True)

    monkeypatch.setattr(Trainer, "__init__", initialize_with_engine)
    with pytest.raises(ValueError, match="FSDP and DeepSpeed"):
        LoRADashTrainer(model=build_model(), args=training_arguments(tmp_path), train_dataset=Tokens())


# ------------------------------------------------------------------------------- missing extra
def test_importing_without_transformers_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an absent package looks like to import
    monkeypatch.delitem(sys.modules, "lora_dash.hf")
    expected = 'lora_dash.hf needs the hf extra: pip install "lora-dash[hf]" (missing: transformers)'
    with pytest.raises(ImportError) as raised:
        importlib.import_module("lora_dash.hf")
    assert str(raised.value) == expected
