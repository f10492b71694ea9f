"""The converged-budget study: its schedule, its forks, and the coordinates it saves."""

import json

import pytest
import torch

from helpers import require_demo_packages

require_demo_packages()

import lora_dash  # noqa: E402
from lora_dash import analysis, directions  # noqa: E402
from lora_dash.demo.data import load_rotten_tomatoes  # noqa: E402
from lora_dash.demo.train import TrainConfig, build, train  # noqa: E402
from lora_dash.reproduce import converged, converged_report  # noqa: E402
from lora_dash.reproduce.converged import ConvergedSettings  # noqa: E402

SETTINGS = ConvergedSettings(n_train=16, epochs=2, batch_size=4, n_test=16, record_steps=(1, 3), draws=9, t=3, s=4)


@pytest.fixture(scope="module")
def small_split():
    split = load_rotten_tomatoes(n_test=2000, seed=0)
    return split._replace(
        train_texts=split.train_texts[:16],
        train_labels=split.train_labels[:16],
        test_texts=split.test_texts[:16],
        test_labels=split.test_labels[:16],
    )


def test_the_schedule_warms_up_linearly_then_decays_without_reaching_zero():
    factors = [converged.schedule_factor(step, 20, 4) for step in range(1, 21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(later < earlier for earlier, later in zip(factors[3:], factors[4:]))
    assert factors[-1] == pytest.approx(1 / 17) and factors[-1] > 0


def test_the_schedule_sets_each_groups_rate_from_its_own_peak():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 10.0}])
    after_step = converged.scheduled(optimizer, steps=10, warmup=2, first_step=1)
    assert [group["lr"] for group in optimizer.param_groups] == [0.5, 5.0]
    after_step(1)  # step 2 is the peak
    assert [group["lr"] for group in optimizer.param_groups] == [1.0, 10.0]
    after_step(9)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1 / 9, 10 / 9])


@pytest.fixture(scope="module")
def family_units(small_split, tmp_path_factory):
    units = tmp_path_factory.mktemp("units")
    converged.run_lora_family(small_split, SETTINGS, 2, 5, units, log=lambda _: None)
    return units


@pytest.mark.slow
def test_a_forked_scheduled_run_is_the_scheduled_lora_dash_run_from_step_one(small_split, family_units):
    runs = json.loads((family_units / "converged-r2-seed5.json").read_text())["runs"]
    lora, forked = runs[0], runs[1]
    assert forked["method"] == "LoRA-Dash" and forked["variant"]["strategy"] == "tsd"

    steps = converged.total_steps(small_split, SETTINGS)
    config = TrainConfig(r=2, s=4, t=3, steps=steps, batch_size=4, seed=5)
    tokenizer, model, optimizer, controller = build("LoRA-Dash", config)
    after_step = converged.scheduled(optimizer, steps, converged._warmup(SETTINGS, steps), first_step=1)
    losses, launched_at = train(
        model, tokenizer, optimizer, small_split, config, controller, progress=False, on_step=lambda s, _: after_step(s)
    )
    assert steps == 8 and launched_at == 3
    assert forked["losses"] == losses  # bit for bit, with the rate changing at every step
    assert lora["losses"][:3] == losses[:3] and lora["losses"][3:] != losses[3:]


@pytest.mark.slow
def test_the_coordinate_fork_dashes_the_largest_coordinates_lora_had_at_launch(family_units):
    runs = json.loads((family_units / "converged-r2-seed5.json").read_text())["runs"]
    coordinate = next(run for run in runs if run["variant"] and run["variant"]["strategy"] == "coordinate")
    at_launch = converged.load_trajectory(family_units / "converged-r2-seed5.pt")[SETTINGS.t]
    bases = converged.pretrained_bases()
    expected = []
    for name, coords in at_launch.items():
        sigma, eligible = bases[name]
        index = directions.pick_directions(torch.zeros_like(coords), eligible, 4, "coordinate", coords=coords)
        expected.append(sorted(analysis.relative_singular_value_ranks(index, coords.numel()).tolist()))
    positions = coordinate["positions"]
    chosen = [sorted(positions[i : i + 4]) for i in range(0, len(positions), 4)]
    assert sum(chosen, []) == pytest.approx(sum(expected, []))
    tsd = next(run for run in runs if run["method"] == "LoRA-Dash")
    assert tsd["positions"] != positions  # the two selections differ, so the comparison can fail


@pytest.mark.slow
def test_saved_coordinates_are_those_of_the_lora_update_on_the_pretrained_basis(small_split, tmp_path):
    config = TrainConfig(r=2, s=4, steps=3, batch_size=4, seed=1)
    tokenizer, model, optimizer, _ = build("LoRA", config)
    recorder = converged.CoordinateRecorder(model, {2, 3}, lora=True)
    train(model, tokenizer, optimizer, small_split, config, progress=False, on_step=lambda step, _: recorder(step))
    recorder.save(tmp_path / "unit.pt")
    saved = converged.load_trajectory(tmp_path / "unit.pt")
    assert list(saved) == [2, 3]
    for name, layer in lora_dash.dash_layers(model).items():
        U, _, V = directions.svd_basis(layer.base_weight())
        dense = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
        torch.testing.assert_close(saved[3][name], directions.coordinates(dense, U, V), rtol=1e-4, atol=1e-7)
        assert not torch.equal(saved[2][name], saved[3][name])
    assert set(saved[3]) == set(converged.pretrained_bases())


# ---------------------------------------------------------------------------------------- report
def test_null_overlaps_are_the_papers_recall_and_accuracy_row_by_row():
    generator = torch.Generator().manual_seed(0)
    scores, true = torch.rand(20, 50, generator=generator), torch.rand(50, generator=generator)
    eligible = torch.ones(50, dtype=torch.bool)
    eligible[-5:] = False
    recall, accuracy = converged_report.top_overlaps(scores, true, eligible)
    for row in range(20):
        assert recall[row] == analysis.tsd_recall(scores[row], true, eligible, eligible)
        assert accuracy[row] == analysis.tsd_accuracy(scores[row], true, eligible, eligible)


def _bases(k: int, layers: int) -> dict:
    sigma = torch.linspace(2, 1, k)  # flat: a steep spectrum lets the 1/σ weighting alone match the reference
    return {f"layer{i}": (sigma, torch.ones(k, dtype=torch.bool)) for i in range(layers)}


@pytest.mark.parametrize("strategy", ["tsd", "coordinate"])
def test_a_prediction_equal_to_the_reference_beats_every_null_draw(strategy):
    bases = _bases(64, 3)
    reference = {name: torch.randn(64, generator=torch.Generator().manual_seed(i)) for i, name in enumerate(bases)}
    null = converged_report.null_overlaps(reference, bases, strategy, 8, draws=49)
    scores = converged_report.overlap_with_null(reference, reference, bases, strategy, null)
    assert scores["recall"] == scores["accuracy"] == 1.0
    assert scores["p_recall"] == scores["p_accuracy"] == 1 / 50
    assert scores["null_recall"] < 0.7


def test_a_prediction_drawn_from_the_null_is_not_flagged_more_often_than_alpha():
    bases = _bases(64, 2)
    reference = {name: torch.randn(64, generator=torch.Generator().manual_seed(i)) for i, name in enumerate(bases)}
    generator = torch.Generator().manual_seed(7)
    p_values = []
    for trial in range(60):
        noise = analysis.null_coordinates(2, 64, 4, generator).float()
        predicted = {name: noise[i] for i, name in enumerate(bases)}
        null = converged_report.null_overlaps(reference, bases, "coordinate", 4, 99, seed=trial)
        p_values.append(
            converged_report.overlap_with_null(predicted, reference, bases, "coordinate", null)["p_accuracy"]
        )
    # Exact under the null: P(p <= 0.05) <= 0.05; 60 trials see at most a handful (binomial 99.9 % bound: 9).
    assert sum(p <= 0.05 for p in p_values) <= 9
