"""TRL's ``SFTTrainer``: a tiny LLaMA from a config with LoRA-Dash on all seven projections, an
in-memory ``datasets.Dataset`` and a word-level tokenizer built here (nothing is downloaded), under
``SFTConfig``'s defaults (bf16 autocast, gradient checkpointing, fused AdamW).

- the callback route: the launch right after global step t under gradient accumulation, from the
  A and B of that step; resume before and after t bit-identical to the run that never stopped;
  ``merge_and_unload`` → ``save_pretrained`` → a plain ``LlamaForCausalLM`` that loads without
  lora_dash and gives the trained logits;
- the mixin route (``LoRADashTrainer`` listed before ``SFTTrainer``): adapter-only checkpoints that
  resume bit-identically;
- ``peft_config=LoraConfig(target_modules="all-linear")`` with a lora_dash model: refused before
  the first step (with the mixin, before PEFT touches the model), as is a custom optimizer that
  holds no adapter.
"""

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

import huggingface_hub.constants  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402

from lora_dash import (  # noqa: E402
    adapter_state_dict,
    dash_layers,
    inject,
    launch,
    load_adapter_state_dict,
    merge_and_unload,
)
from lora_dash.hf import ADAPTER_FILE, PEFT_CONFIG_REFUSAL, LoRADashCallback, LoRADashTrainer  # noqa: E402

from helpers import (  # noqa: E402
    assert_refused_and_unchanged,
    assert_same,
    assert_same_adapter,
    callback_of,
    logits_without_lora_dash,
)

pytestmark = [
    pytest.mark.slow,  # every test trains through SFTTrainer: make test-fast leaves this file out
    # SFTConfig turns gradient checkpointing on, and TRL reads it, under names transformers now deprecates.
    pytest.mark.filterwarnings("ignore:`(is_)?gradient_checkpointing` is deprecated:FutureWarning"),
]

T = 3  # launch step
STEPS = 6  # optimizer steps per run; checkpoints every 2, so at 2 (before the launch) and 4 (after)
ACCUMULATION = 2  # micro-batches per optimizer step
MICRO_BATCH = 2  # samples per micro-batch
TARGETS = r".*\.(q|k|v|o|gate|up|down)_proj"  # all seven projections of a LLaMA block
LAYERS = 2 * 7
WORDS = "the a cat dog bird sat ran sang on under near mat log tree red blue big small".split()
SPECIAL = ["<pad>", "<eos>", "<unk>"]


class SFTDashTrainer(LoRADashTrainer, trl.SFTTrainer):
    """The mixin route: SFTTrainer's data handling, LoRADashTrainer's adapter-only checkpoints."""


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    """TRL's trainers ping the Hub when built (outside CI); tests send nothing anywhere."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS`, built in memory."""
    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_dataset(size: int = STEPS * ACCUMULATION * MICRO_BATCH) -> "datasets.Dataset":
    """``size`` sentences of 3 to 10 random words, fixed by a seed: a language-modeling dataset."""
    generator = torch.Generator().manual_seed(5)
    lengths = torch.randint(3, 11, (size,), generator=generator).tolist()
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=generator)) for n in lengths]
    return datasets.Dataset.from_dict({"text": texts})


def build_base() -> LlamaForCausalLM:
    """A two-layer LLaMA from a config: the same "pretrained" weights for every call."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def build_model(init_seed: int = 1) -> LlamaForCausalLM:
    """:func:`build_base` with LoRA-Dash (r 4, α 8, s 2) on all seven projections; ``init_seed``
    drives the A init only."""
    model = build_base()
    torch.manual_seed(init_seed)
    inject(model, TARGETS, r=4, alpha=8, s=2)
    return model


def sft_config(output_dir, **overrides) -> "trl.SFTConfig":
    """``STEPS`` optimizer steps of ``ACCUMULATION`` micro-batches, checkpoints every 2, on CPU;
    SFTConfig's own defaults otherwise (bf16, gradient checkpointing, fused AdamW)."""
    settings = dict(
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS,
        learning_rate=1e-2,
        max_length=16,
        save_strategy="steps",
        save_steps=2,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    return trl.SFTConfig(str(output_dir), **{**settings, **overrides})


def make_trainer(output_dir, trainer_class=trl.SFTTrainer, model=None, callbacks=None, args=None, **kwargs):
    """An SFT trainer on :func:`build_model` (or ``model``) with a LoRADashCallback at ``T`` (or
    ``callbacks``) and :func:`sft_config` (or ``args``); ``kwargs`` go to the trainer."""
    return trainer_class(
        model=build_model() if model is None else model,
        args=sft_config(output_dir) if args is None else args,
        train_dataset=build_dataset(),
        processing_class=build_tokenizer(),
        callbacks=[LoRADashCallback(launch_step=T)] if callbacks is None else callbacks,
        **kwargs,
    )


@pytest.fixture(scope="module")
def run_of(tmp_path_factory):
    """``run_of(trainer_class)``: a whole run with its checkpoints (at 2, 4, 6), made once per class."""
    runs = {}

    def run(trainer_class):
        if trainer_class not in runs:
            output_dir = tmp_path_factory.mktemp(trainer_class.__name__)
            trainer = make_trainer(output_dir, trainer_class)
            trainer.train()
            runs[trainer_class] = trainer, output_dir
        return runs[trainer_class]

    return run


# ---------------------------------------------------------------- the launch, right after global step t
class PhaseRecorder(TrainerCallback):
    """The phase at the end of every global step, the forward passes (micro-batches) in between, and
    the A, B of every layer at the end of step ``T`` (the launch ran in that step's optimizer hook)."""

    def __init__(self, model) -> None:
        self.phases, self.forwards, self.factors = [], 0, None
        model.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        phase = {layer.launched for layer in dash_layers(model).values()}
        self.phases.append((state.global_step, self.forwards, phase))
        if state.global_step == T:
            self.factors = {
                name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
                for name, layer in dash_layers(model).items()
            }


def test_the_launch_lands_right_after_global_step_t_under_gradient_accumulation(tmp_path):
    model = build_model()
    recorder = PhaseRecorder(model)
    trainer = make_trainer(
        tmp_path,
        model=model,
        callbacks=[LoRADashCallback(launch_step=T), recorder],
        args=sft_config(tmp_path, save_strategy="no"),
    )
    assert trainer.args.bf16 and trainer.args.gradient_checkpointing  # SFTConfig's defaults are what runs
    trainer.train()
    assert recorder.phases == [(step, ACCUMULATION * step, {step >= T}) for step in range(1, STEPS + 1)]
    # The directions are those the A and B of global step t select: a fresh copy given them launches alike.
    reference = build_model(init_seed=2)
    for name, layer in dash_layers(reference).items():
        A, B = recorder.factors[name]
        layer.lora_A.data.copy_(A)
        layer.lora_B.data.copy_(B)
    launch(reference)
    trained = dash_layers(model)
    assert len(trained) == LAYERS
    for name, layer in dash_layers(reference).items():
        assert torch.equal(layer.dash_index, trained[name].dash_index), name
        assert torch.equal(layer.dash_U, trained[name].dash_U) and torch.equal(layer.dash_V, trained[name].dash_V), name
    # The Trainer's optimizer holds δ, gave it a fresh state at the launch, and δ trains from then on.
    optimizer = trainer.optimizer.optimizer
    for layer in trained.values():
        assert float(optimizer.state[layer.dash_delta]["step"]) == STEPS - T
        assert float(optimizer.state[layer.lora_A]["step"]) == STEPS
        assert layer.dash_delta.ne(0).all()
    assert callback_of(trainer).controller.state_dict() == {"launch_step": T, "steps": STEPS}


# -------------------------------------------------------------------------------- exact resume
# SFTTrainer's checkpoints hold the whole model; the mixin's only the adapter.
@pytest.mark.parametrize("trainer_class", [trl.SFTTrainer, SFTDashTrainer], ids=["SFTTrainer", "mixin"])
@pytest.mark.parametrize("checkpoint", [2, 4], ids=["before-launch", "after-launch"])
def test_resume_from_a_checkpoint_is_bit_identical_to_an_uninterrupted_run(checkpoint, trainer_class, run_of, tmp_path):
    trainer, output_dir = run_of(trainer_class)
    resumed = make_trainer(tmp_path, trainer_class)
    resumed.train(resume_from_checkpoint=str(output_dir / f"checkpoint-{checkpoint}"))
    assert_same_adapter(trainer.model, resumed.model)
    assert_same(resumed.model.state_dict(), trainer.model.state_dict(), "model")
    for layer in dash_layers(resumed.model).values():
        assert layer.launched and layer.dash_delta.ne(0).all()  # not a run that stayed plain LoRA
    assert callback_of(resumed).controller.state_dict() == callback_of(trainer).controller.state_dict()


def test_the_mixin_writes_adapter_only_checkpoints(run_of, tmp_path):
    trainer, output_dir = run_of(SFTDashTrainer)
    trainer.save_model(tmp_path)
    adapter_keys = set(adapter_state_dict(trainer.model))
    base_keys = set(trainer.model.state_dict()) - adapter_keys  # embeddings, norms, every frozen W
    for folder in [output_dir / f"checkpoint-{step}" for step in (2, 4, 6)] + [tmp_path]:
        files = set(os.listdir(folder))
        assert ADAPTER_FILE in files and not files & {"model.safetensors", "pytorch_model.bin"}, folder
        with safe_open(folder / ADAPTER_FILE, "pt") as saved:
            keys = set(saved.keys())
        assert adapter_keys <= keys and not keys & base_keys, folder
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(os.listdir(output_dir / "checkpoint-2"))


# ------------------------------------------------------------------- merged, served without lora_dash
def test_merge_and_unload_gives_a_plain_llama_that_loads_without_lora_dash(run_of, tmp_path):
    trainer, _ = run_of(trl.SFTTrainer)
    # The trained adapter on a fresh model: accelerate left trainer.model's forward under bf16 autocast.
    model = build_model(init_seed=2).eval()
    load_adapter_state_dict(model, adapter_state_dict(trainer.model))
    probe = build_tokenizer()(["the cat sat on the mat", "a big red bird sang"], padding=True).input_ids
    probe = torch.tensor(probe)
    with torch.no_grad():
        trained = model(input_ids=probe).logits
        assert not torch.allclose(build_base().eval()(input_ids=probe).logits, trained, atol=1e-3)
    merged = merge_and_unload(model)
    assert type(merged) is LlamaForCausalLM and not dash_layers(merged)
    merged.save_pretrained(tmp_path / "merged")
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as saved:
        assert set(saved.keys()) == set(build_base().state_dict())  # the keys of a plain LLaMA, no more
    served = logits_without_lora_dash(tmp_path / "merged", probe, "LlamaForCausalLM")
    torch.testing.assert_close(served, trained, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- the refusal of PEFT on top
def all_linear() -> "peft.LoraConfig":
    return peft.LoraConfig(target_modules="all-linear", r=4, lora_alpha=8)


def test_peft_config_on_a_lora_dash_model_is_refused_before_the_first_step(tmp_path):
    model = build_model()
    before = adapter_state_dict(model)
    with pytest.raises(
        ValueError, match=r"PEFT has wrapped the linear layer inside 14 LoRA-Dash layers.*drop `peft_config`"
    ):
        make_trainer(tmp_path, model=model, peft_config=all_linear())
    assert_same(adapter_state_dict(model), before, "adapter")  # PEFT rewired the model; no step changed it
    assert not any(layer.launched for layer in dash_layers(model).values())


def test_peft_config_is_refused_at_train_begin_when_the_callback_comes_after_construction(tmp_path):
    model = build_model()
    trainer = make_trainer(tmp_path, model=model, callbacks=[], peft_config=all_linear())
    trainer.add_callback(LoRADashCallback(launch_step=T))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match=r"PEFT has wrapped the linear layer inside 14 LoRA-Dash layers"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert_same({name: p.detach() for name, p in trainer.model.named_parameters()}, before, "parameters")


def test_the_mixin_refuses_peft_config_before_peft_touches_the_model(tmp_path):
    model = build_model()

    def build() -> None:
        make_trainer(tmp_path, SFTDashTrainer, model=model, peft_config=all_linear())

    assert_refused_and_unchanged(build, model, re.escape(PEFT_CONFIG_REFUSAL))


def test_a_custom_optimizer_that_holds_no_adapter_is_refused_before_the_first_step(tmp_path):
    model = build_model()
    optimizer = torch.optim.AdamW(model.lm_head.parameters(), lr=1e-2)
    trainer = make_trainer(tmp_path, model=model, optimizers=(optimizer, None))
    call = trainer.train
    assert_refused_and_unchanged(call, model, r"the optimizer holds none of the A, B, δ of the model's 14")
    assert trainer.state.global_step == 0


# ------------------------------------------------------------------------------ docs/TRL.md as written
def run_docs_snippet(heading: str, namespace: dict) -> dict:
    """Execute the first ```python block under ``heading`` in docs/TRL.md in ``namespace``; return it."""
    path = Path(__file__).resolve().parents[1] / "docs" / "TRL.md"
    text = path.read_text()
    block = re.compile(r"```python\n(.*?)```", re.S).search(text, text.index(f"\n{heading}\n")).group(1)
    exec(compile(block, str(path), "exec"), namespace)
    return namespace


def docs_inputs(output_dir) -> dict:
    """What the page's set-up block loads from the Hub, built here instead: the tiny LLaMA, not injected."""
    args = sft_config(output_dir, save_steps=3)
    return {"model": build_base(), "tokenizer": build_tokenizer(), "dataset": build_dataset(), "args": args}


def test_the_docs_callback_route_runs_and_saves_a_merged_plain_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_docs_snippet("## The callback route", docs_inputs(tmp_path / "out"))
    assert namespace["trainer"].state.global_step == STEPS
    assert type(namespace["merged"]) is LlamaForCausalLM and not dash_layers(namespace["merged"])
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir("smollm2-dash-merged"))


def test_the_docs_mixin_route_runs_and_saves_the_adapter_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_docs_snippet("## The mixin route", docs_inputs(tmp_path / "out"))
    trainer = namespace["trainer"]
    assert isinstance(trainer, LoRADashTrainer) and len(dash_layers(trainer.model)) == LAYERS
    for folder in (tmp_path / "out", tmp_path / "out" / "checkpoint-3"):
        files = set(os.listdir(folder))
        assert ADAPTER_FILE in files and "model.safetensors" not in files, folder
