"""🤗 Trainer: the launch right after global step t under gradient accumulation, exact resume from
checkpoints before and after the launch, adapter-only checkpoints, a base loaded 4-bit quantized.
(accelerate's optimizer wrapper on its own: tests/test_training.py.)"""

import copy
import dataclasses
import importlib
import os
import random
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_quantized import S, bnb, expected_selection, library_dequantized
from tiny_bert import ACCUMULATION, STEPS, TARGETS, T, Tokens, build_base, build_model, training_arguments
from transformers import (
    BertForSequenceClassification,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
)

from lora_dash import adapter_state_dict, dash_layers, inject, load_adapter
from lora_dash.hf import ADAPTER_FILE, PEFT_FLAG, LoRADashCallback, LoRADashTrainer

from helpers import assert_same, assert_same_adapter, assert_unchanged, callback_of, snapshot

pytestmark = pytest.mark.slow  # every test trains through 🤗 Trainer: make test-fast leaves this file out


def train(output_dir, trainer_class=Trainer, resume=None, callback=None, **overrides):
    """Train ``build_model()`` with a LoRADashCallback (by default at ``T``); returns the trainer."""
    callback = LoRADashCallback(launch_step=T) if callback is None else callback
    arguments = training_arguments(output_dir, **overrides)
    trainer = trainer_class(model=build_model(), args=arguments, train_dataset=Tokens(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


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
    trainer = Trainer(
        model=model,
        args=training_arguments(tmp_path, save_strategy="no"),
        train_dataset=Tokens(),
        callbacks=[LoRADashCallback(launch_step=T), recorder],
    )
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
    trainer = Trainer(
        model=build_model(), args=training_arguments(tmp_path / "plain", max_steps=2), train_dataset=Tokens()
    )
    trainer.train()
    with pytest.raises(ValueError, match="saved without LoRADashCallback"):
        train(tmp_path / "resumed", resume=tmp_path / "plain" / "checkpoint-2")


def build_model_on_other_weights() -> BertForSequenceClassification:
    """``build_model()``'s architecture and adapters on other "pretrained" weights (another seed): a node that
    restarts with another checkpoint of the base model."""
    config = build_base().config
    torch.manual_seed(7)
    model = BertForSequenceClassification(config)
    torch.manual_seed(1)
    inject(model, TARGETS, r=4, alpha=8, s=2)
    return model


def trainer_state(trainer) -> dict:
    """What a refused resume must leave as it was besides the model, by value: the optimizer's and the learning-rate
    schedule's state dicts, the LoRA-Dash controller (the same object, its state and phase), the Trainer's state,
    and the random streams."""
    controller = callback_of(trainer).controller
    return {
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "lr_scheduler": copy.deepcopy(trainer.lr_scheduler.state_dict()),
        "controller": (id(controller), {**controller.state_dict(), "launched": controller.launched}),
        "trainer_state": dataclasses.asdict(trainer.state),
        "rng": (random.getstate(), torch.from_numpy(np.random.get_state()[1].astype(np.int64)), torch.get_rng_state()),
    }


@pytest.mark.parametrize("checkpoint", [2, 4], ids=["before-launch", "after-launch"])
def test_resume_onto_other_pretrained_weights_is_refused_naming_the_layer_and_leaves_the_trainer_as_it_was(
    checkpoint, run_of, tmp_path
):
    _, output_dir = run_of(LoRADashTrainer)
    trainer = LoRADashTrainer(
        model=build_model_on_other_weights(),
        args=training_arguments(tmp_path, max_steps=T + 1, save_strategy="no"),
        train_dataset=Tokens(),
        callbacks=[LoRADashCallback(launch_step=T)],
    )
    trainer.train()  # a run of its own first, launched: its model, optimizer, controller and state must survive
    before_model, before = snapshot(trainer.model), trainer_state(trainer)
    with pytest.raises(
        ValueError,
        match=rf"{ADAPTER_FILE}: layer 'bert\.encoder\.layer\.0\.attention\.self\.query' "
        "was saved for another pretrained weight",
    ):
        trainer.train(resume_from_checkpoint=str(output_dir / f"checkpoint-{checkpoint}"))
    assert_unchanged(trainer.model, before_model)
    assert_same(trainer_state(trainer), before, "trainer")


@pytest.mark.parametrize(
    "kwargs, bad", [({"launch_step": -1}, "-1"), ({"strategy": "top"}, "'top'"), ({"seed": 1.5}, "1.5")]
)
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
        assert sorted(os.listdir(folder)) == sorted(
            [ADAPTER_FILE, "optimizer.pt", "rng_state.pth", "scheduler.pt", "trainer_state.json", "training_args.bin"]
        )
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
    trainer = LoRADashTrainer(
        model=model,
        args=training_arguments(
            tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="rank"
        ),
        train_dataset=Tokens(),
        eval_dataset=Tokens(2),
        compute_metrics=lambda _: {"rank": next(ranks)},
        callbacks=[LoRADashCallback(T)],
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    reference = build_model(init_seed=2)
    load_adapter(reference, tmp_path / "checkpoint-4" / ADAPTER_FILE)
    assert_same_adapter(reference, model)


# ------------------------------------------------------------------------------- missing extra
def test_importing_without_transformers_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an absent package looks like to import
    monkeypatch.delitem(sys.modules, "lora_dash.hf")
    expected = 'lora_dash.hf needs the hf extra: pip install "lora-dash[hf]" (missing: transformers)'
    with pytest.raises(ImportError) as raised:
        importlib.import_module("lora_dash.hf")
    assert str(raised.value) == expected


# --------------------------------------------------------------- a base loaded 4-bit quantized
LLAMA_TARGETS = r".*\.(q_proj|v_proj)"


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A two-layer Llama written by ``save_pretrained``: the "pretrained" checkpoint, loaded quantized below.
    Hidden size 64: bitsandbytes' CPU kernel needs ``in_features`` to be a multiple of its 64-wide blocks."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load_llama(folder, quantized: bool = True, init_seed: int = 1) -> LlamaForCausalLM:
    """The saved Llama loaded with a bitsandbytes nf4 ``quantization_config`` (or in float32), injected."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if quantized else None
    model = LlamaForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")
    torch.manual_seed(init_seed)
    inject(model, LLAMA_TARGETS, r=4, alpha=8, s=S)
    return model


def causal_tokens(size: int = STEPS * ACCUMULATION * 2) -> list[dict]:
    return [{"input_ids": ids, "labels": ids} for ids in Tokens(size).ids]


class SelectionAtLaunch(TrainerCallback):
    """What ``lora_dash.directions`` selects from given weights and the ``A``, ``B`` that global step t left
    (the launch ran in that step's optimizer hook, just before ``on_step_end``)."""

    def __init__(self, weights: dict) -> None:
        self.weights, self.expected = weights, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == T:
            self.expected = {
                name: expected_selection(self.weights[name], layer) for name, layer in dash_layers(model).items()
            }


@pytest.fixture(scope="module")
def quantized_run(llama_folder, tmp_path_factory):
    """LoRADashTrainer on the 4-bit Llama: ``STEPS`` steps, launch at ``T``, then ``save_model``."""
    model = load_llama(llama_folder)
    bases = {name: layer.base for name, layer in dash_layers(model).items()}
    dequantized = {name: library_dequantized("bnb-nf4", base).float() for name, base in bases.items()}
    codes = {name: base.weight.data.clone() for name, base in bases.items()}
    selection = SelectionAtLaunch(dequantized)
    output_dir = tmp_path_factory.mktemp("quantized")
    trainer = LoRADashTrainer(
        model=model,
        args=training_arguments(output_dir, save_strategy="no"),
        train_dataset=causal_tokens(),
        callbacks=[LoRADashCallback(T), selection],
    )
    flag_after_init = vars(model).get(PEFT_FLAG, "absent")
    trainer.train()
    trainer.save_model(output_dir / "adapter")
    return SimpleNamespace(
        trainer=trainer,
        model=model,
        bases=bases,
        codes=codes,
        expected=selection.expected,
        flag_after_init=flag_after_init,
        adapter=output_dir / "adapter" / ADAPTER_FILE,
    )


def test_a_plain_trainer_refuses_a_4bit_model_even_with_the_callback(llama_folder, tmp_path):
    # Why LoRADashTrainer exists for quantized bases: the refusal comes before any callback runs.
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(
            model=load_llama(llama_folder),
            args=training_arguments(tmp_path),
            train_dataset=causal_tokens(),
            callbacks=[LoRADashCallback(T)],
        )


def test_lora_dash_trainer_trains_a_4bit_model_and_launches_on_the_dequantized_weight(quantized_run):
    assert quantized_run.model.is_quantized
    for name, base in quantized_run.bases.items():  # quantized on CPU, at load: packed 4-bit codes
        assert type(base) is bnb.nn.Linear4bit and base.weight.bnb_quantized and base.weight.dtype == torch.uint8
        assert torch.equal(base.weight.data, quantized_run.codes[name]), name
    assert callback_of(quantized_run.trainer).controller.state_dict() == {"launch_step": T, "steps": STEPS}
    for name, layer in dash_layers(quantized_run.model).items():
        index, U_s, V_s = quantized_run.expected[name]
        assert layer.launched and layer.dash_index.tolist() == index.tolist(), name
        torch.testing.assert_close(layer.dash_U, U_s, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.dash_V, V_s, rtol=0, atol=1e-6)
        assert layer.dash_delta.ne(0).all(), name  # δ trained after the launch


def test_lora_dash_trainer_leaves_no_peft_flag_on_the_model(quantized_run):
    assert quantized_run.flag_after_init == "absent" and PEFT_FLAG not in vars(quantized_run.model)
    assert quantized_run.model._hf_peft_config_loaded is False  # transformers' class default, as before


@pytest.mark.parametrize("fails", [False, True], ids=["constructed", "constructor-raises"])
def test_the_peft_flag_is_set_only_inside_trainers_constructor(fails, llama_folder, tmp_path, monkeypatch):
    model = load_llama(llama_folder)
    model._hf_peft_config_loaded = False  # the model's own value is what must come back
    seen = []
    initialize = Trainer.__init__

    def recording_initialize(self, model, *args, **kwargs):
        seen.append(model._hf_peft_config_loaded)
        if fails:
            raise RuntimeError("constructor failed")
        initialize(self, model, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", recording_initialize)
    if fails:
        with pytest.raises(RuntimeError, match="constructor failed"):
            LoRADashTrainer(model=model, args=training_arguments(tmp_path))
    else:
        LoRADashTrainer(model=model, args=training_arguments(tmp_path))
    assert seen == [True] and vars(model)[PEFT_FLAG] is False


def test_lora_dash_trainer_refuses_a_model_without_lora_dash_layers(tmp_path):
    with pytest.raises(ValueError, match=r"BertForSequenceClassification has none: call lora_dash.inject"):
        LoRADashTrainer(model=build_base(), args=training_arguments(tmp_path))


def test_a_saved_adapter_loaded_into_a_fresh_4bit_base_gives_the_trained_logits(quantized_run, llama_folder):
    fresh = load_llama(llama_folder, init_seed=2).eval()  # another A: only the file can make it the trained model
    probe = Tokens(4).ids
    with torch.no_grad():
        expected = quantized_run.model.eval()(input_ids=probe).logits
        assert not torch.equal(fresh(input_ids=probe).logits, expected)
        load_adapter(fresh, quantized_run.adapter)
        assert torch.equal(fresh(input_ids=probe).logits, expected)


def test_an_adapter_trained_on_the_4bit_base_loads_into_the_float_base_with_check_base_false(
    quantized_run, llama_folder
):
    float_model = load_llama(llama_folder, quantized=False, init_seed=2)
    with pytest.raises(ValueError, match=r"check_base=False .*quantized copy of this weight"):
        load_adapter(float_model, quantized_run.adapter)
    load_adapter(float_model, quantized_run.adapter, check_base=False)
    assert_same_adapter(quantized_run.model, float_model)


def test_a_training_step_after_bitsandbytes_repacked_a_layer_for_cpu_inference_is_refused(llama_folder, tmp_path):
    """bitsandbytes repacks a Linear4bit at an eval-mode forward without gradients on AVX512-BF16 CPUs, and its
    kernel then passes no gradient back; done here by its own function, so the test runs on every CPU."""
    model = load_llama(llama_folder)
    down = model.model.layers[1].mlp.down_proj  # not adapted: it still stops the gradient of the layers before it
    down.weight.data, down.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        down.weight.data, down.weight.quant_state
    )
    before = adapter_state_dict(model)
    trainer = LoRADashTrainer(
        model=model,
        args=training_arguments(tmp_path, save_strategy="no"),
        train_dataset=causal_tokens(),
        callbacks=[LoRADashCallback(T)],
    )
    refusal = r"1 4-bit layers \(first: 'model.layers.1.mlp.down_proj'\).*support_avx512bf16_for_cpu = False"
    with pytest.raises(RuntimeError, match=refusal):
        trainer.train()
    after = adapter_state_dict(model)
    assert all(torch.equal(before[key], after[key]) for key in before)
