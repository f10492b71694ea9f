"""LoRA-Dash under torch.distributed: DDP and FSDP2 (``fully_shard``), two gloo processes on 127.0.0.1
started by this module, compared with one process trained on the same global batches.

The two workers (``workers/distributed_runs.py``) run once per session; each test checks one property
of what they wrote. They join through a TCPStore this process serves on a port the OS picked, so there
is no port race, and every wait is bounded.
"""

from pathlib import Path

import pytest
import torch

from lora_dash.checkpoint import load_adapter

from helpers import assert_same, build_adapted, run_gloo_workers
from workers.distributed_runs import PROBE_X, STEPS, T, single_process_run

WORKER = Path(__file__).parent / "workers" / "distributed_runs.py"
WORLD = 2
TIMEOUT_S = 240  # both scenarios; a run takes about 30 s on two busy cores
ATOL, RTOL = 1e-5, 1e-4  # one process vs. two: the same sums in another order

pytestmark = pytest.mark.slow  # subprocesses: make test-fast leaves this file out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("distributed")
    run_gloo_workers(WORKER, WORLD, out, TIMEOUT_S)
    return {
        name: [torch.load(out / f"{name}_rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
        for name in ("ddp", "fsdp")
    } | {"out": out}


@pytest.fixture(scope="module")
def single() -> dict:
    return single_process_run()


def results(runs: dict, name: str) -> list[dict]:
    for rank, result in enumerate(runs[name]):
        if "error" in result:
            pytest.fail(f"the {name} run failed on rank {rank}:\n{result['error']}")
    return runs[name]


def selected(state: dict) -> dict:
    return {key: value.tolist() for key, value in state.items() if key.endswith("dash_index")}


def assert_close_states(state: dict, reference: dict) -> None:
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, atol=ATOL, rtol=RTOL, msg=key)


EXPECTED_PHASES = [(step, step >= T) for step in range(1, STEPS + 1)]
ENGINES = pytest.mark.parametrize("engine", ["ddp", "fsdp"], ids=["DDP", "FSDP2"])


# ------------------------------------------------------------------------ DDP and FSDP2 alike
@ENGINES
def test_trains_across_the_launch_and_every_rank_launches_right_after_step_t(engine, runs):
    # DDP runs without find_unused_parameters and with no_sync micro-batches: a parameter without a
    # gradient would stop it with "expected to have finished reduction".
    for result in results(runs, engine):
        assert result["phases"] == EXPECTED_PHASES


@ENGINES
def test_every_rank_selects_the_directions_one_process_selects(engine, runs, single):
    assert [selected(result["state"]) for result in results(runs, engine)] == [selected(single["state"])] * WORLD


@ENGINES
def test_ranks_end_with_bit_identical_adapter_state(engine, runs):
    rank0, rank1 = (result["state"] for result in results(runs, engine))
    assert_same(rank0, rank1)


@ENGINES
def test_training_matches_one_process_trained_on_the_global_batches(engine, runs, single):
    result = results(runs, engine)[0]
    assert_close_states(result["state"], single["state"])
    torch.testing.assert_close(result["output"], single["output"], atol=ATOL, rtol=RTOL)


@ENGINES
def test_training_raises_no_warning(engine, runs):
    assert [result["warnings"] for result in results(runs, engine)] == [[]] * WORLD


# -------------------------------------------------------------------------------------- FSDP2
def test_fsdp2_launch_selects_singular_vectors_of_the_whole_weight_not_of_a_shard(runs, single):
    for result in results(runs, "fsdp"):
        assert result["sharded_rows"] == (8, 16)  # fc1's W really was split between the ranks
        for key, value in single["state"].items():
            if key.endswith(("dash_U", "dash_V")):
                torch.testing.assert_close(result["state"][key], value, atol=ATOL, rtol=RTOL, msg=key)


def test_fsdp2_adapter_file_reloads_into_a_fresh_sharded_model_exactly(runs):
    for result in results(runs, "fsdp"):
        assert_same(result["reloaded_state"], result["state"])
        assert torch.equal(result["reloaded_output"], result["output"])


def test_fsdp2_adapter_file_of_every_rank_loads_into_one_process_with_the_same_outputs(runs):
    result = results(runs, "fsdp")[0]
    for rank in range(WORLD):
        model = build_adapted(init_seed=5)
        load_adapter(model, runs["out"] / f"fsdp_adapter_rank{rank}.pt")
        with torch.no_grad():
            torch.testing.assert_close(model(PROBE_X), result["output"], atol=1e-6, rtol=1e-6)
