"""🤗 Trainer in more than one process: ``LoRADashTrainer`` under DDP on two gloo CPU ranks started as torchrun
starts them, compared with one process trained on the same global batches; and the refusal of FSDP and
DeepSpeed, which no test here can run.

The ranks (``workers/trainer_runs.py``) run once per session; each test checks one property of what they wrote.
"""

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_bert import STEPS, T, Tokens
from transformers import Trainer, TrainingArguments

from lora_dash import adapter_state_dict, dash_layers, load_adapter, merge_and_unload
from lora_dash.distributed import assign_owners, svd_cost
from lora_dash.hf import ADAPTER_FILE, DEEPSPEED_REFUSAL, FSDP_REFUSAL, LoRADashTrainer

from helpers import assert_refused_and_unchanged, assert_same, logits_without_lora_dash, run_gloo_workers
from workers.trainer_runs import PROBE, build_model, make_trainer, train

WORKER = Path(__file__).parent / "workers" / "trainer_runs.py"
WORLD = 2
TIMEOUT_S = 180  # about 20 s on two busy cores
ATOL, RTOL = 1e-5, 1e-4  # one process vs. two: the same sums in another order
CHECKPOINT_FILES = sorted(
    [ADAPTER_FILE, "optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin"]
    + [f"rng_state_{rank}.pth" for rank in range(WORLD)]  # each rank's random streams, as Trainer keeps them
)
slow = pytest.mark.slow  # subprocesses: make test-fast leaves these out


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trainer_ddp")
    run_gloo_workers(WORKER, WORLD, out, TIMEOUT_S)
    return out


@pytest.fixture(scope="module")
def ranks(out) -> list[dict]:
    results = [torch.load(out / f"trainer_rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    for rank, result in enumerate(results):
        if "error" in result:
            pytest.fail(f"rank {rank} failed:\n{result['error']}")
    return results


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """One process on the same global batches (all micro-batches of a step), saved as the ranks save."""
    folder = tmp_path_factory.mktemp("trainer_single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same LAPACK path for the SVDs
    try:
        trainer, recorder = make_trainer(folder, save_strategy="no")
        result = train(trainer, recorder)
        trainer.save_model(str(folder / "adapter"))
    finally:
        torch.set_num_threads(threads)
    return result | {"adapter_file": folder / "adapter" / ADAPTER_FILE}


def directions(state: dict) -> dict:
    return {key: value for key, value in state.items() if key.endswith(("dash_U", "dash_V", "dash_index"))}


def assert_close_states(state: dict, reference: dict) -> None:
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert state[key].dtype == value.dtype, key
        torch.testing.assert_close(state[key], value, atol=ATOL, rtol=RTOL, msg=key)


def adapter_file(path: Path) -> tuple[dict, dict]:
    """The tensors and the header of a safetensors adapter file."""
    with safe_open(path, "pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()


# ----------------------------------------------------------------------------------- the launch
@slow
def test_trainer_runs_ddp_and_every_rank_launches_right_after_global_step_t(ranks, single):
    expected = [(step, [step >= T]) for step in range(1, STEPS + 1)]
    assert single["phases"] == expected
    for result in ranks:
        assert result["run"]["wrapped"] == "DistributedDataParallel"
        assert result["run"]["phases"] == expected
        assert result["run"]["controller"] == {"launch_step": T, "steps": STEPS}


@slow
def test_every_rank_selects_the_directions_one_process_selects(ranks, single):
    alone = directions(single["adapter"])
    for result in ranks:
        chosen = directions(result["run"]["adapter"])
        assert_close_states(chosen, alone)
        assert all(torch.equal(chosen[key], alone[key]) for key in alone if key.endswith("dash_index"))


@slow
def test_the_launchs_svds_are_split_among_the_ranks_as_assigned_each_layer_once(ranks):
    layers = dash_layers(build_model())
    owners = assign_owners([svd_cost(layer.out_features, layer.in_features) for layer in layers.values()], WORLD)
    decomposed = [result["run"]["decomposed"] for result in ranks]
    assert sorted(sum(decomposed, [])) == sorted(layers)  # every layer, each on one rank only
    for rank in range(WORLD):
        assert sorted(decomposed[rank]) == sorted(name for name, owner in zip(layers, owners) if owner == rank)
        assert 0 < len(decomposed[rank]) < len(layers)


@slow
def test_ranks_end_bit_identical_and_match_one_process_on_the_same_global_batches(ranks, single):
    assert_same(ranks[1]["run"]["adapter"], ranks[0]["run"]["adapter"])
    assert_close_states(ranks[0]["run"]["adapter"], single["adapter"])
    torch.testing.assert_close(ranks[0]["run"]["logits"], single["logits"], atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------- checkpoints
@slow
def test_rank_0_alone_writes_the_adapter_files(ranks):
    written = [f"run/checkpoint-{step}/{ADAPTER_FILE}" for step in (2, 4, 6)] + [f"adapter/{ADAPTER_FILE}"]
    assert [result["run"]["saved"] for result in ranks] == [written, []]


@slow
def test_checkpoints_and_save_model_hold_the_adapter_and_no_model_weights(out):
    for step in (2, 4, 6):
        assert sorted(path.name for path in (out / "run" / f"checkpoint-{step}").iterdir()) == CHECKPOINT_FILES
    assert sorted(path.name for path in (out / "adapter").iterdir()) == [ADAPTER_FILE, "training_args.bin"]


@slow
def test_the_adapter_file_is_the_one_a_single_process_writes(out, ranks, single):
    tensors, header = adapter_file(out / "adapter" / ADAPTER_FILE)
    alone, alone_header = adapter_file(single["adapter_file"])
    assert header.keys() == alone_header.keys()
    assert {k: v for k, v in header.items() if k != "checksum"} == {
        k: v for k, v in alone_header.items() if k != "checksum"
    }
    assert_close_states(tensors, alone)
    fresh = build_model(init_seed=2)  # another A: only the file can make it the trained adapter
    load_adapter(fresh, out / "run" / "checkpoint-6" / ADAPTER_FILE)
    assert_same(adapter_state_dict(fresh), ranks[0]["run"]["adapter"])


# ------------------------------------------------------------------------------------- resume
@slow
@pytest.mark.parametrize("step", [2, 4], ids=["before-launch", "after-launch"])
def test_resume_on_two_ranks_is_bit_identical_to_the_uninterrupted_run(step, ranks):
    for result in ranks:
        resumed, whole = result[f"resumed{step}"], result["run"]
        assert resumed["phases"] == whole["phases"][step:]
        assert resumed["controller"] == whole["controller"]
        assert_same(resumed["adapter"], whole["adapter"])
        assert torch.equal(resumed["logits"], whole["logits"])


@slow
def test_resume_after_the_launch_decomposes_nothing_and_before_it_launches_as_the_whole_run(ranks):
    for result in ranks:
        assert result["resumed4"]["decomposed"] == []  # the directions come from the checkpoint
        assert result["resumed2"]["decomposed"] == result["run"]["decomposed"]


# ------------------------------------------------------------------------------------- serving
@slow
def test_saved_adapter_merged_loads_without_lora_dash_with_the_trained_logits(out, ranks, tmp_path):
    model = build_model(init_seed=2)
    load_adapter(model, out / "adapter" / ADAPTER_FILE)
    merged = merge_and_unload(model)
    assert not dash_layers(merged)
    merged.save_pretrained(tmp_path / "merged")
    served = logits_without_lora_dash(tmp_path / "merged", PROBE)
    torch.testing.assert_close(served, ranks[0]["run"]["logits"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ FSDP, DeepSpeed
@slow
def test_trainers_fsdp2_on_cpu_ranks_runs_ddp_instead_and_lora_dash_trainer_refuses_it(ranks):
    # Why FSDP is refused: accelerate turns Trainer's FSDP plugin on only for accelerator devices. If this
    # starts failing, accelerate runs FSDP on CPU: the same checks as DDP's above can then be written for it.
    for result in ranks:
        assert result["fsdp"] == {
            "fsdp_enabled": False,
            "distributed_type": "DistributedType.MULTI_CPU",
            "wrapped": "DistributedDataParallel",
            "refusal": FSDP_REFUSAL,
        }


def arguments(tmp_path, **overrides) -> TrainingArguments:
    return TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], **overrides)


@pytest.fixture
def trainer_constructions(monkeypatch) -> list:
    """Every call of ``Trainer.__init__`` from now on (a refusal must come before the first)."""
    calls = []
    initialize = Trainer.__init__

    def counted(self, *args, **kwargs):
        calls.append(self)
        initialize(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", counted)
    return calls


@pytest.mark.parametrize("positional", [False, True], ids=["args=", "positional"])
def test_fsdp_in_the_training_arguments_is_refused_before_trainer_is_built(positional, tmp_path, trainer_constructions):
    model = build_model()
    fsdp = arguments(tmp_path, fsdp=True, fsdp_config={"version": 2})
    construct = (lambda: LoRADashTrainer(model, fsdp)) if positional else (lambda: LoRADashTrainer(model, args=fsdp))
    assert_refused_and_unchanged(construct, model, f"^{re.escape(FSDP_REFUSAL)}$")
    assert trainer_constructions == []


def test_deepspeed_in_the_training_arguments_is_refused_before_trainer_is_built(tmp_path, trainer_constructions):
    model = build_model()
    deepspeed = arguments(tmp_path)
    # TrainingArguments(deepspeed=...) needs the deepspeed package, which is not installed here.
    deepspeed.deepspeed = {"zero_optimization": {"stage": 3}}
    assert_refused_and_unchanged(
        lambda: LoRADashTrainer(model, args=deepspeed), model, f"^{re.escape(DEEPSPEED_REFUSAL)}$"
    )
    assert trainer_constructions == []


@pytest.mark.parametrize(
    "flag, refusal", [("ACCELERATE_USE_FSDP", FSDP_REFUSAL), ("ACCELERATE_USE_DEEPSPEED", DEEPSPEED_REFUSAL)]
)
def test_accelerate_launchs_fsdp_and_deepspeed_flags_are_refused(flag, refusal, tmp_path, monkeypatch):
    # TrainingArguments with ACCELERATE_USE_DEEPSPEED set needs the deepspeed package: build them first.
    training_arguments = arguments(tmp_path)
    monkeypatch.setenv(flag, "true")  # what accelerate launch --use_fsdp / --use_deepspeed sets
    with pytest.raises(ValueError) as raised:
        LoRADashTrainer(build_model(), args=training_arguments)
    assert str(raised.value) == refusal


@pytest.mark.parametrize(
    "engine, refusal", [("is_fsdp_enabled", FSDP_REFUSAL), ("is_deepspeed_enabled", DEEPSPEED_REFUSAL)]
)
def test_an_engine_accelerate_enables_by_other_means_is_refused(engine, refusal, tmp_path, monkeypatch):
    # A configuration this module does not read (an accelerate config file, a future option): what counts
    # is what Trainer decided.
    initialize = Trainer.__init__

    def initialize_with_engine(self, *args, **kwargs):
        initialize(self, *args, **kwargs)
        setattr(self, engine, True)

    monkeypatch.setattr(Trainer, "__init__", initialize_with_engine)
    with pytest.raises(ValueError) as raised:
        LoRADashTrainer(model=build_model(), args=arguments(tmp_path), train_dataset=Tokens())
    assert str(raised.value) == refusal


def test_refusals_name_what_to_use_instead():
    for refusal in (FSDP_REFUSAL, DEEPSPEED_REFUSAL):
        assert "DDP under torchrun" in refusal and "fully_shard" in refusal and "LaunchController" in refusal
