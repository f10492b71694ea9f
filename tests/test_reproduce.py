"""The reproduction study: forked runs equal runs from scratch, its data, its statistics, its quick run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import require_demo_packages

require_demo_packages()

import lora_dash  # noqa: E402
from lora_dash.demo.data import load_convention_sentences, load_rotten_tomatoes, speech_sentences  # noqa: E402
from lora_dash.demo.model import MINILM_TARGETS  # noqa: E402
from lora_dash.demo.train import TrainConfig, build, train  # noqa: E402
from lora_dash.reproduce import plan  # noqa: E402
from lora_dash.reproduce.plan import Family, Settings, Variant  # noqa: E402
from lora_dash.reproduce.report import mean_std, paired  # noqa: E402
from lora_dash.reproduce.runner import run_family  # noqa: E402
from lora_dash.reproduce.study import run_study  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- forking
@pytest.fixture(scope="module")
def small_split():
    split = load_rotten_tomatoes(n_test=2000, seed=0)
    return split._replace(test_texts=split.test_texts[:16], test_labels=split.test_labels[:16])


@pytest.mark.slow
def test_a_forked_lora_dash_run_is_the_run_from_step_one(small_split):
    # The study never trains LoRA-Dash from step 1: it forks the LoRA run at t. That must change nothing.
    settings = Settings(steps=6, short_steps=4, batch_size=4, n_test=16)
    family = Family("rotten_tomatoes", r=2, seed=3, variants=(Variant(t=3, s=4),), default=Variant(t=3, s=4))
    lora, forked = run_family(family, small_split, settings, MINILM_TARGETS, log=lambda _: None)

    config = TrainConfig(r=2, s=4, t=3, steps=6, batch_size=4, seed=3)
    tokenizer, model, optimizer, controller = build("LoRA-Dash", config)
    losses, launched_at = train(model, tokenizer, optimizer, small_split, config, controller, progress=False)

    assert launched_at == 3
    assert forked["losses"] == losses  # bit for bit: same batches, dropout masks, AdamW states
    assert lora["losses"][:3] == losses[:3] and lora["losses"][3:] != losses[3:]
    chosen = {name: layer.dash_index.tolist() for name, layer in lora_dash.dash_layers(model).items()}
    assert len(forked["positions"]) == 4 * len(chosen)
    assert forked["trainable_parameters"] == lora_dash.count_trainable_parameters(model)


@pytest.mark.slow
def test_an_evaluation_at_or_before_the_launch_is_the_lora_runs(small_split):
    settings = Settings(steps=5, short_steps=2, batch_size=4, n_test=16)
    family = Family("rotten_tomatoes", r=2, seed=0, variants=(Variant(t=3),), default=Variant(t=3))
    lora, dash = run_family(family, small_split, settings, MINILM_TARGETS, log=lambda _: None)
    assert dash["accuracy"]["2"] == lora["accuracy"]["2"]
    assert set(dash["accuracy"]) == {"2", "5"}


def test_variant_labels_name_only_what_differs_from_the_studys_default():
    default = Variant(t=100)
    assert Variant(t=100).label(default) == "LoRA-Dash"
    assert Variant(t=25).label(default) == "LoRA-Dash t=25"
    assert Variant(strategy="random", delta_lr_scale=10.0).label(default) == (
        "LoRA-Dash strategy=random delta_lr_scale=10"
    )


# ----------------------------------------------------------------------------------- the plan
def test_every_experiment_of_the_plan_runs_with_every_seed():
    families = plan.families(plan.FULL, seeds=(0, 1, 2))
    for seed in (0, 1, 2):
        mine = [family for family in families if family.seed == seed]
        rt = {family.r: family for family in mine if family.task == "rotten_tomatoes"}
        assert set(rt) == {2, 4, 8, 16, 32}
        assert all(rt[r].variants for r in (2, 4, 8, 16)) and not rt[32].variants
        labels = {variant.label(rt[8].default) for variant in rt[8].variants}
        assert {
            "LoRA-Dash",
            "LoRA-Dash strategy=largest_sigma",
            "LoRA-Dash strategy=smallest_sigma",
            "LoRA-Dash strategy=random",
            "LoRA-Dash t=25",
            "LoRA-Dash t=50",
            "LoRA-Dash t=150",
            "LoRA-Dash s=2",
            "LoRA-Dash s=4",
            "LoRA-Dash s=16",
        } <= labels
        assert all(rt[r].record_tsd for r in (2, 4, 8, 16))
        assert {family.r for family in mine if family.task == "convention"} == {2, 8}
    assert len({family.key for family in families}) == len(families)


# ------------------------------------------------------------------------------- second task
def test_convention_split_holds_out_whole_speeches_and_both_parties():
    split = load_convention_sentences(seed=0)
    assert not set(split.train_texts) & set(split.test_texts)
    assert len(split.train_texts) > 4000 and len(split.test_texts) > 800
    for labels in (split.train_labels, split.test_labels):
        assert set(labels.tolist()) == {0, 1}
    assert load_convention_sentences(seed=0).test_texts == split.test_texts
    assert load_convention_sentences(seed=1).test_texts != split.test_texts


def test_speeches_are_cut_into_sentences_of_at_least_eight_words():
    text = "Thank you. Thank you so much.\nWe built this country together, one road and one school at a time! Yes."
    assert speech_sentences(text) == ["We built this country together, one road and one school at a time!"]


# ---------------------------------------------------------------------------------- statistics
def test_mean_std_is_in_percent_with_a_sample_standard_deviation():
    assert mean_std([0.80, 0.82, 0.84]) == "82.00 ± 2.00"
    assert mean_std([0.5]) == "50.00"


def test_paired_differences_count_the_seeds_with_a_gain():
    assert paired([0.01, -0.01, 0.03]) == "+1.00 ± 2.00 (2/3)"
    assert paired([]) == "–"


def test_float_noise_around_zero_is_neither_a_gain_nor_a_negative_zero():
    # Two averages of the same accuracies summed in another order differ by about 1e-17.
    noise = (0.1 + 0.2 + 0.3) - (0.3 + 0.2 + 0.1)
    assert noise != 0.0
    assert paired([noise, noise]) == "+0.00 ± 0.00 (0/2)"
    assert paired([-abs(noise)]) == "+0.00 (0/1)"
    assert mean_std([-abs(noise)], 1.0, 5) == "0.00000"
    assert paired([0.0001, -0.0001]) == "+0.00 ± 0.01 (1/2)"


# -------------------------------------------------------------------------------- quick study
@pytest.mark.slow
def test_quick_study_runs_every_experiment_and_writes_its_tables_and_plots(tmp_path, capsys):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lora_dash.reproduce", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    methods = {(run["task"], run["r"], run["method"]) for run in results["runs"]}
    assert {("convention", 2, "LoRA-Dash"), ("convention", 8, "LoRA"), ("rotten_tomatoes", 32, "LoRA")} <= methods
    assert ("rotten_tomatoes", 8, "LoRA-Dash strategy=random") in methods
    tables = (tmp_path / "tables.md").read_text()
    for heading in ("Claim 1", "Claim 2", "Claim 3", "Claim 4", "Claim 5", "Beyond the paper", "converged budget"):
        assert heading in tables
    for name in ("accuracy_by_rank.png", "tsd_prediction.png", "ft_spectrum.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A rerun finds every unit on disk and runs nothing.
    run_study(tmp_path, quick=True, seeds=(0,), workers=1)
    assert "0 fine-tuning references, 0 of 7 families and 0 of 2 converged-budget units" in capsys.readouterr().out


def test_report_only_without_a_study_is_refused(tmp_path, capsys):
    from lora_dash.reproduce.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--report-only", "--out", str(tmp_path)])
    assert "--report-only needs" in capsys.readouterr().err
    assert not (tmp_path / "units").exists()
