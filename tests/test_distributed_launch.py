"""The launch shared among ranks (``lora_dash.distributed``): the assignment, and gloo runs on 2 and 3 CPU ranks.

The assignment tests are plain functions. The distributed ones start ``workers/launch_runs.py`` once per
world size (every scenario in one process per rank, DDP and FSDP2) through a TCPStore served here, and
check what the ranks wrote against one process and against the redundant launch (``distributed=False``).
"""

import itertools
import math
import random
from pathlib import Path

import pytest
import torch

import lora_dash
from lora_dash.bench import launch as bench
from lora_dash.bench.launch import MODELS, duration, fit_model, projected_seconds
from lora_dash.distributed import assign_owners, rank_loads, svd_cost

from helpers import assert_unchanged, run_gloo_workers, snapshot
from workers.launch_runs import build, plant_nan

WORKER = Path(__file__).parent / "workers" / "launch_runs.py"
TIMEOUT_S = 240  # every scenario of one world size: 35 to 60 s for 3 ranks on two busy cores
ENGINES = pytest.mark.parametrize("engine", ["ddp", "fsdp"], ids=["DDP", "FSDP2"])
DIRECTION_KEYS = ("dash_U", "dash_V", "dash_index", "dash_launched")


# ------------------------------------------------------------------------------------------ the assignment
def test_assignment_gives_the_largest_first_to_the_least_loaded_rank_ties_to_the_lowest():
    # By cost: item 1 (4), item 2 (4, a tie: by number), item 4 (3), item 3 (2), item 0 (1). Loads after each:
    # 1 → rank 0 (4, 0); 2 → rank 1 (4, 4); 4 → rank 0, the tie (7, 4); 3 → rank 1 (7, 6); 0 → rank 1 (7, 7).
    assert assign_owners([1, 4, 4, 2, 3], world=2) == [1, 0, 1, 1, 0]
    assert assign_owners([1, 4, 4, 2, 3], world=1) == [0] * 5
    assert assign_owners([5, 5], world=4) == [0, 1]  # more ranks than matrices: the first ranks work


def test_assignment_is_within_four_thirds_of_the_best_possible():
    # Longest-processing-time-first guarantees max load <= (4/3 - 1/(3·world)) · optimum; brute force the optimum.
    rng = random.Random(0)
    for _ in range(60):
        world, count = rng.choice((2, 3)), rng.randint(1, 7)
        costs = [rng.randint(1, 50) for _ in range(count)]
        best = min(max(rank_loads(costs, owners, world)) for owners in itertools.product(range(world), repeat=count))
        worst_allowed = (4 / 3 - 1 / (3 * world)) * best
        assert max(rank_loads(costs, assign_owners(costs, world), world)) <= worst_allowed + 1e-9, (costs, world)


def llama_7b_costs() -> list[int]:
    """q, k, v (4096 × 4096) and up, down (11008 × 4096, 4096 × 11008) of 32 layers."""
    return [svd_cost(4096, 4096)] * 3 * 32 + [svd_cost(11008, 4096), svd_cost(4096, 11008)] * 32


@pytest.mark.parametrize(("world", "max_over_mean"), [(8, 1.0), (64, 4.6875 / 4.1875)])
def test_llama_7b_assignment_reaches_the_optimum(world, max_over_mean):
    # In units of 4096³: 96 matrices of 1 and 64 of 2.6875, 268 in all. On 8 ranks each takes 8 large and 12
    # small ones, 33.5 = the mean. On 64 ranks one large each and 96 small over 64 ranks: some rank carries a
    # large and two small (4.6875), which no assignment avoids (two large is 5.375); the mean is 4.1875.
    loads = rank_loads(llama_7b_costs(), assign_owners(llama_7b_costs(), world), world)
    assert max(loads) / (sum(loads) / world) == pytest.approx(max_over_mean, rel=1e-12)


def test_assignment_refuses_no_ranks():
    with pytest.raises(ValueError, match="world must be >= 1"):
        assign_owners([1], world=0)


# ------------------------------------------------------------------------------------------ one process
def test_one_process_launch_is_the_same_with_or_without_distributed():
    launched = []
    for distributed in (True, False):
        model = build()
        lora_dash.launch(model, distributed=distributed)
        launched.append(lora_dash.adapter_state_dict(model))
    assert all(torch.equal(launched[0][key], launched[1][key]) for key in launched[0])


@pytest.mark.parametrize("bad", [None, 1, "yes"])
def test_distributed_must_be_a_bool_checked_before_anything(bad):
    model = build()
    before = snapshot(model)
    with pytest.raises(ValueError, match="distributed must be a bool"):
        lora_dash.launch(model, distributed=bad)
    with pytest.raises(ValueError, match="distributed must be a bool"):
        lora_dash.LaunchController(model, launch_step=0, distributed=bad)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------ gloo ranks
@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def runs(request, tmp_path_factory) -> list[dict]:
    """Every rank's results for one world size."""
    world = request.param
    out = tmp_path_factory.mktemp(f"launch{world}")
    run_gloo_workers(WORKER, world, out, TIMEOUT_S)
    return [torch.load(out / f"launch_rank{rank}.pt", weights_only=True) for rank in range(world)]


def scenario(runs: list[dict], name: str) -> list[dict]:
    for rank, results in enumerate(runs):
        if "error_trace" in results[name]:
            pytest.fail(f"scenario {name} failed on rank {rank}:\n{results[name]['error_trace']}")
    return [results[name] for results in runs]


def directions_of(state: dict) -> dict:
    return {key: value for key, value in state.items() if key.endswith(DIRECTION_KEYS)}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.slow
@ENGINES
def test_every_rank_commits_bit_for_bit_what_one_process_selects(engine, runs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same LAPACK path, so the same bits
    try:
        for result in scenario(runs, f"train_shared_{engine}"):
            alone = build()
            lora_dash.load_adapter_state_dict(alone, result["before_launch"])
            lora_dash.launch(alone)
            assert_identical(directions_of(result["launched"]), directions_of(lora_dash.adapter_state_dict(alone)))
            assert all(bool(value) for key, value in result["launched"].items() if key.endswith("dash_launched"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@ENGINES
def test_training_after_the_shared_launch_is_bit_identical_to_the_redundant_launch(engine, runs):
    for shared, redundant in zip(scenario(runs, f"train_shared_{engine}"), scenario(runs, f"train_redundant_{engine}")):
        assert_identical(shared["launched"], redundant["launched"])
        assert_identical(shared["final"], redundant["final"])
        assert torch.equal(shared["output"], redundant["output"])


@pytest.mark.slow
@ENGINES
def test_each_weight_is_decomposed_once_by_its_owner(engine, runs):
    world = len(runs)
    layers = list(lora_dash.dash_layers(build()).values())
    shapes = [(layer.out_features, layer.in_features) for layer in layers]
    owners = assign_owners([svd_cost(*shape) for shape in shapes], world)
    shared = scenario(runs, f"train_shared_{engine}")
    for rank, result in enumerate(shared):
        assert sorted(result["svd_shapes"]) == sorted(shape for shape, owner in zip(shapes, owners) if owner == rank)
    for result in scenario(runs, f"train_redundant_{engine}"):
        assert sorted(result["svd_shapes"]) == sorted(shapes)  # the counter sees every SVD


@pytest.mark.slow
def test_fsdp2_only_the_owner_holds_a_whole_weight(runs):
    world, count = len(runs), len(lora_dash.dash_layers(build()))
    for shared, redundant in zip(scenario(runs, "train_shared_fsdp"), scenario(runs, "train_redundant_fsdp")):
        assert shared["local_rows"] == math.ceil(24 / world)  # layer "2" (24 × 40) really is sharded
        assert redundant["full_tensors"] == 3 * count  # W, A and B of every layer, on every rank
        assert shared["full_tensors"] == 0  # gathered to the owner instead


@pytest.mark.slow
@ENGINES
def test_random_strategy_draws_what_one_process_draws(engine, runs):
    for result in scenario(runs, f"random_{engine}"):
        assert_identical(result[True], result[False])


@pytest.mark.slow
def test_ranks_holding_different_layers_all_refuse_to_launch(runs):
    for result in scenario(runs, "disagree_layers"):
        assert result["error"] == (
            "ValueError",
            "the ranks differ in their LoRA-Dash layers (names, shapes or s); where each rank holds "
            "its own layers (pipeline stages), launch with distributed=False",
        )
        assert not any(result["launched"].values())


@pytest.mark.slow
def test_a_layer_launched_on_one_rank_alone_stops_every_rank(runs):
    last = len(runs) - 1
    for rank, result in enumerate(scenario(runs, "disagree_phase")):
        assert result["error"] == ("RuntimeError", "layer '0' is already launched; launch happens once")
        assert result["launched"] == {name: rank == last and name == "0" for name in result["launched"]}


def one_process_error(planted: list[str]) -> str:
    model = build()
    for name in planted:
        plant_nan(model, name, rank=0, on_rank=0)
    with pytest.raises(ValueError) as caught:
        lora_dash.launch(model)
    return str(caught.value)


@pytest.mark.slow
@ENGINES
@pytest.mark.parametrize("where", ["one", "every"], ids=["one rank fails", "every rank fails"])
def test_an_error_on_any_rank_is_raised_on_every_rank_and_nothing_launches(engine, where, runs):
    results = scenario(runs, f"error_{where}_{engine}")
    expected = one_process_error(results[0]["planted"])  # the lowest-numbered failing layer's
    assert len(results[0]["planted"]) == (1 if where == "one" else len(runs))
    for result in results:
        assert result["error"] == ("ValueError", expected)
        assert result["launched_after_error"] == [False] * len(result["launched_after_error"])
        assert result["buffers_untouched"]
        # The ranks are still in step: the repaired model launches, as the redundant launch would.
        assert_identical(result["relaunched"], result["relaunched_redundant"])
        assert all(bool(value) for key, value in result["relaunched"].items() if key.endswith("dash_launched"))


# ------------------------------------------------------------------------------------------ the launch benchmark
ONE_TERM, TWO_TERMS = bench.COST_MODELS


def test_fits_recover_the_constants_of_timings_that_follow_the_model():
    a, b = 3e-11, 7e-11
    shapes = ((1024, 1024), (2048, 512), (512, 4096))
    seconds = {shape: a * svd_cost(*shape) for shape in shapes} | {(64, 64): 1.0}  # (64, 64): left out
    constants, residuals = fit_model(seconds, ONE_TERM, min_side=512)
    assert constants == pytest.approx((a,), rel=1e-9)
    assert residuals[(1024, 1024)] == pytest.approx(0, abs=1e-9)
    assert residuals[(64, 64)] == pytest.approx(a * svd_cost(64, 64) - 1)
    seconds = {shape: a * svd_cost(*shape) + b * min(shape) ** 3 for shape in shapes}
    assert fit_model(seconds, TWO_TERMS, min_side=512)[0] == pytest.approx((a, b), rel=1e-9)
    # Off the model: the fit minimises the relative error; at 2 and 0.5 times the model a·c/t is 0.5 and 2.
    seconds = {(1024, 1024): 2 * a * svd_cost(1024, 1024), (2048, 512): 0.5 * a * svd_cost(2048, 512)}
    assert fit_model(seconds, ONE_TERM, min_side=512)[0] == pytest.approx((a * (0.5 + 2) / (0.25 + 4),), rel=1e-9)


def test_projection_is_the_largest_rank_time_under_the_launch_assignment():
    llama = next(shapes for name, shapes in MODELS.items() if name.startswith("LLaMA-7B"))
    assert sorted(svd_cost(*shape) for shape in llama) == sorted(llama_7b_costs())
    unit = svd_cost(4096, 4096)
    for world, units in ((1, 268), (8, 33.5), (64, 4.6875)):
        assert projected_seconds(ONE_TERM, (2.0,), llama, world) == pytest.approx(2.0 * units * unit, rel=1e-12)
    # Every 7B matrix has min(n, m) = 4096, so with t = k³ each costs one unit; on 64 ranks the assignment by
    # n·m·min gives every rank a large matrix, then 96 small ones one or two each: three matrices at most.
    assert projected_seconds(TWO_TERMS, (0.0, 1.0), llama, 64) == pytest.approx(3 * unit, rel=1e-12)


def test_svd_costs_report_measures_fits_and_projects(monkeypatch, capsys):
    a = 1e-10  # timings that follow the first model exactly: it fits them, and projects a × the largest load
    monkeypatch.setattr(bench, "time_svds", lambda shapes, repeats: {shape: a * svd_cost(*shape) for shape in shapes})
    threads = torch.get_num_threads()
    try:
        bench.main(["--svd-costs", "--quick"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    rows = table_rows("\n".join(lines))
    for shape in ("64×64", "128×128", "128×256"):  # "fit (relative residual)", the residual ±0.0 %
        assert float(rows[shape][1].split("(")[1].rstrip("%)")) == 0
    llama = [line for line in lines if line.startswith("| LLaMA-7B") and f"| {ONE_TERM.name} |" in line]
    assert llama[0].endswith(
        " | ".join(duration(a * units * svd_cost(4096, 4096)) for units in (268, 33.5, 4.6875)) + " |"
    )
    assert duration(a * 268 * svd_cost(4096, 4096)) == "30.7 min"  # 268 · 4096³ · 1e-10 s = 1842 s
    assert sum(line.startswith(("| LLaMA-7B", "| 70B")) for line in lines) == 2 * len(bench.COST_MODELS)


def test_svd_timings_are_positive():
    seconds = bench.time_svds(((8, 8), (16, 8)), repeats=1)
    assert set(seconds) == {(8, 8), (16, 8)} and all(value > 0 for value in seconds.values())


def test_scaling_table_has_every_world_and_its_share_of_the_cost(monkeypatch):
    monkeypatch.setattr(bench, "time_launch", lambda world, settings: {"shared": [1.0, 0.5], "redundant": [3.0, 1.0]})
    rows = table_rows(bench.bench_scaling(bench.FULL))
    # Two blocks of q, k, v 1024² and up, down 2752×1024, in units of 1024³: 6 × 1 and 4 × 2.6875, 16.75 in all.
    # 2 ranks: two large and three small each, half. 3 ranks: 2.6875 × 2 | 2.6875 + 3 × 1 | the same: 5.6875.
    assert [rows[world][-1] for world in ("1", "2", "3")] == ["1.000", "0.500", f"{5.6875 / 16.75:.3f}"]
    assert rows["2"][:-1] == ["1.00", "3.00", "3.00", "0.50", "1.00", "2.00"]


@pytest.mark.slow
def test_timed_launches_on_gloo_ranks_are_positive(runs):
    for result in scenario(runs, "bench"):
        assert set(result) == {"shared", "redundant"}
        assert all(math.isfinite(value) and value > 0 for values in result.values() for value in values)


def table_rows(text: str) -> dict[str, list[str]]:
    """The markdown table rows of ``text``, by their first cell."""
    return {
        cells[0]: cells[1:]
        for line in text.splitlines()
        if line.startswith("| ")
        for cells in [[cell.strip() for cell in line.strip("| ").split(" | ")]]
    }
