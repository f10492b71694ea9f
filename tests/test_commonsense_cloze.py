"""The cloze study: the format, its scoring, the fixed splits, the paired statistic, the
budget's rule, resumable training, dash-only, and a miniature of the whole study on a tiny model."""

import copy
import dataclasses
import json
import re

import numpy as np
import pytest
import test_commonsense
import torch

import lora_dash
from lora_dash.commonsense import cloze, cloze_report, cloze_run, data, model, train
from lora_dash.commonsense.__main__ import main
from lora_dash.commonsense.train import Encoded

CharTokenizer = test_commonsense.CharTokenizer
tiny_llama = test_commonsense.tiny_llama  # the fixture: a 2-layer LLaMA built from a config
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def same_losses(device: str, first: list[float], second: list[float]) -> bool:
    """Bit for bit on the CPU; on a GPU, where some kernels sum in varying order, to float rounding."""
    return first == second if device == "cpu" else np.allclose(first, second, rtol=1e-5, atol=1e-6)


@pytest.fixture
def tiny_study(tiny_llama, monkeypatch):
    """The study's model loader returns a copy of the tiny LLaMA and the character tokenizer."""
    monkeypatch.setattr(cloze, "load_smollm2", lambda cache: (CharTokenizer(), copy.deepcopy(tiny_llama).train()))


# ----------------------------------------------------------------------------------------------- data
@pytest.mark.slow  # parses all eight tasks' whole data files
def test_cloze_prompts_list_no_choices_and_winogrande_fills_the_blank():
    for task in data.TASKS:
        question = data.read_task(task, cloze=True)[0][0]
        assert all(c.startswith(" ") for c in question.continuations)
        assert len(question.prompts) == len(question.continuations) >= 2
        assert not any("Choices:" in prompt for prompt in question.prompts)
    wino = data.read_task("winogrande", cloze=True)[0][0]
    listed = data.read_task("winogrande")[0][0]
    assert wino.gold == listed.gold and len(set(wino.continuations)) == 1
    assert [prompt.endswith(option) for prompt, option in zip(wino.prompts, listed.choices, strict=True)] == [True] * 2
    arc = data.read_task("arc_e", cloze=True)[0][0]
    assert arc.prompts[0].startswith("Question: ") and arc.prompts[0].endswith("\nAnswer:")
    assert data.gold_request(arc) == (arc.prompts[arc.gold], arc.continuations[arc.gold])


def test_cloze_and_listed_formats_hold_the_same_questions_and_answers():
    for task in ("siqa", "obqa"):
        listed, listed_dropped = data.read_task(task)[0], data.read_task(task)[1:]
        cloze_questions, cloze_dropped = data.read_task(task, cloze=True)[0], data.read_task(task, cloze=True)[1:]
        assert cloze_dropped == listed_dropped and len(cloze_questions) == len(listed)
        for a, b in zip(listed, cloze_questions, strict=True):
            assert b.gold == a.gold and b.continuations == tuple(" " + c for c in a.choices)


def test_the_cloze_split_is_fixed_disjoint_and_sized_by_the_rule():
    first, again = data.split_cloze_task("arc_c", 250, 100), data.split_cloze_task("arc_c", 250, 100)
    assert first == again
    assert (len(first.test), len(first.validation), len(first.train)) == (149, 50, 100)  # 299 questions
    keys = [{q.requests for q in part} for part in (first.train, first.validation, first.test)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    big = data.split_cloze_task("piqa", 250, 100)
    assert (len(big.test), len(big.validation)) == (250, 100)
    assert big.test == data.split_cloze_task("piqa", 250, 7).test  # the test cut does not depend on validation's


# -------------------------------------------------------------------------------------------- scoring
def _alone(llama, prompt: str, continuation: str) -> tuple[float, int]:
    sequence = train.encode(CharTokenizer(), prompt, continuation, 64)
    ids = torch.tensor([[*sequence.prompt, *sequence.target]])
    with torch.no_grad():
        log_probs = torch.log_softmax(llama(input_ids=ids).logits[0], dim=-1)
    start = len(sequence.prompt)
    return sum(log_probs[start + j - 1, token].item() for j, token in enumerate(sequence.target)), len(sequence.target)


def test_cloze_scoring_per_character_per_token_and_summed_matches_one_sequence_per_choice(tiny_llama):
    questions = [
        data.ClozeQuestion("winogrande", ("Tom beat Al so Tom", "Tom beat Al so Al"), (" won.", " won."), 0),
        data.ClozeQuestion("arc_e", ("Question: sun?\nAnswer:",) * 3, (" a star", " a big moon", " x"), 0),
        data.ClozeQuestion("arc_e", ("Question: ice?\nAnswer:",) * 2, (" cold water", " hot"), 1),
    ]
    hits = train.question_hits(tiny_llama, CharTokenizer(), questions, max_tokens=64, token_budget=50)
    for number, question in enumerate(questions):
        scored = [_alone(tiny_llama, *pair) for pair in question.requests]
        raw = torch.tensor([s for s, _ in scored])
        chars = torch.tensor([len(c) for c in question.continuations], dtype=torch.float64)
        tokens = torch.tensor([n for _, n in scored], dtype=torch.float64)
        expected = {"acc": raw / chars, "acc_per_token": raw / tokens, "acc_raw": raw}
        for metric in train.METRICS:
            assert hits[metric][number] == (int(expected[metric].argmax()) == question.gold), (number, metric)
    result = train.accuracy(questions, hits)
    assert result["arc_e"]["n"] == 2 and set(result["average"]) == set(train.METRICS)


def test_training_on_the_cloze_format_puts_the_loss_on_the_gold_continuation():
    question = data.ClozeQuestion("winogrande", ("A so A", "A so B"), (" won.", " won."), 1)
    prompt, continuation = data.gold_request(question)
    encoded = train.encode(CharTokenizer(), prompt, continuation, 64)
    batch = train.collate([encoded], pad_id=0)
    assert encoded == Encoded(tuple(3 + ord(c) % 61 for c in "A so B"), tuple(3 + ord(c) % 61 for c in " won."))
    assert (batch["labels"][0] != train.IGNORE).sum() == len(" won.")


# --------------------------------------------------------------------------------------- statistics
def test_the_paired_bootstrap_is_exact_when_runs_agree_and_centres_on_the_paired_difference():
    rng = np.random.default_rng(1)
    a = {task: rng.integers(0, 2, 200).astype(float) for task in ("piqa", "obqa")}
    assert cloze_report.paired_bootstrap([a], [a], 500) == {"mean": 0.0, "ci95_low": 0.0, "ci95_high": 0.0}
    better = {task: np.maximum(values, rng.integers(0, 2, 200)) for task, values in a.items()}
    result = cloze_report.paired_bootstrap([better], [a], 2000)
    gain = cloze_report.average(better) - cloze_report.average(a)
    assert result["mean"] == pytest.approx(gain) and 0 < result["ci95_low"] < gain < result["ci95_high"]
    assert cloze_report.paired_bootstrap([better], [a], 2000) == result  # seeded
    with pytest.raises(ValueError, match="as many pairs"):
        cloze_report.paired_bootstrap([a, a], [a], 10)


def test_the_paired_bootstrap_also_resamples_seeds():
    one = {"piqa": np.ones(100)}
    zero = {"piqa": np.zeros(100)}
    # Two seeds, one +100 points ahead and one level: the questions alone carry no noise, the seeds do.
    result = cloze_report.paired_bootstrap([one, zero], [zero, zero], 2000)
    assert result["mean"] == 50.0 and result["ci95_low"] == 0.0 and result["ci95_high"] == 100.0


def test_the_paired_bootstrap_equals_a_resample_by_resample_loop_and_shares_its_draws():
    rng = np.random.default_rng(2)
    first = [{"piqa": rng.integers(0, 2, 30).astype(float), "arc_e": rng.integers(0, 2, 20).astype(float)}]
    first.append({task: 1 - values for task, values in first[0].items()})
    second = [{task: rng.integers(0, 2, len(values)).astype(float) for task, values in first[0].items()}] * 2
    result = cloze_report.paired_bootstrap(first, second, 300, seed=5)
    # The same draws, in the documented order, applied one resample at a time.
    draw = np.random.default_rng(5)
    pair_counts = draw.multinomial(2, [0.5, 0.5], size=300)
    question_counts = [draw.multinomial(n, [1 / n] * n, size=300) for n in (30, 20)]
    totals = []
    for i in range(300):
        per_task = []
        for task, counts in zip(first[0], question_counts, strict=True):
            gaps = [(counts[i] * (a[task] - b[task])).sum() / len(counts[i]) for a, b in zip(first, second)]
            per_task.append(np.dot(pair_counts[i], gaps) / 2)
        totals.append(100 * np.mean(per_task))
    low, high = np.percentile(totals, [2.5, 97.5])
    assert result["ci95_low"] == pytest.approx(low, abs=1e-9) and result["ci95_high"] == pytest.approx(high, abs=1e-9)
    # A second comparison on questions of the same sizes reuses the plan: same draws, no new ones.
    before = cloze_report.resampling_plan.cache_info().hits
    assert cloze_report.paired_bootstrap(second, first, 300, seed=5)["ci95_low"] == pytest.approx(-high, abs=1e-9)
    assert cloze_report.resampling_plan.cache_info().hits == before + 1


def test_the_most_frequent_position_baseline_answers_each_task_s_commonest_gold():
    questions = [
        data.ClozeQuestion(task, ("p",) * 2, (" a", " b"), gold)
        for task, gold in [("boolq", 1), ("boolq", 1), ("boolq", 0), ("piqa", 0), ("piqa", 1)]
    ]
    hits = cloze_report.most_frequent_hits(questions)
    assert hits["boolq"].tolist() == [1, 1, 0] and hits["piqa"].tolist() == [1, 0]  # a tie goes to position 0


def _curve_units(validation, accuracies: dict[int, float], settings) -> dict:
    """Units whose validation hits get ``accuracy`` of each task's questions right (the first ones)."""

    def scores(value):
        hits = {}
        for task in dict.fromkeys(q.task for q in validation):
            n = sum(q.task == task for q in validation)
            right = round(value * n)
            hits[task] = dict.fromkeys(train.METRICS, "1" * right + "0" * (n - right))
        return {"hits": hits, "fingerprint": cloze.fingerprint(validation)}

    units = {"zeroshot": {"validation": scores(0.3)}}
    for steps, value in accuracies.items():
        units[f"curve-r{settings.curve_rank}-seed{settings.curve_seed}-step{steps}"] = {"validation": scores(value)}
    return units


@pytest.mark.slow  # parses all eight tasks' whole data files
def test_the_budget_is_the_smallest_step_count_that_clears_both_baselines():
    settings = cloze.ClozeSettings(max_test=20, max_validation=40, curve_steps=(100, 200, 400), resamples=500)
    cut = cloze.splits(settings)
    _, validation, _ = cloze.parts(cut)
    choice = cloze_report.choose_budget(
        _curve_units(validation, {100: 0.3, 200: 0.9, 400: 0.95}, settings), settings, cut
    )
    assert choice["steps"] == 200 and [row["clears"] for row in choice["curve"]] == [False, True, True]
    assert choice["reason"] == "chosen by the rule"
    partial = _curve_units(validation, {100: 0.3, 200: 0.9}, settings)  # 400 not yet run: 200 stands
    assert cloze_report.choose_budget(partial, settings, cut)["reason"] == "chosen by the rule"
    late = _curve_units(validation, {200: 0.9, 400: 0.95}, settings)  # step 100 has not run
    assert cloze_report.choose_budget(late, settings, cut)["steps"] is None
    assert cloze_report.choose_budget(late, settings, cut, forced=400)["steps"] == 400
    stale = _curve_units(validation[1:], {100: 0.9}, settings)
    with pytest.raises(ValueError, match="scored on other questions"):
        cloze_report.choose_budget(stale, settings, cut)


# ---------------------------------------------------------------------------------------- training
@pytest.mark.slow  # trains the study's model through its resumable runs: make test only
@pytest.mark.parametrize("device", DEVICES)
def test_a_lora_run_resumed_from_its_saved_state_equals_one_run_straight(tiny_study, tmp_path, device):
    settings = dataclasses.replace(cloze.QUICK, device=device)
    questions, _, _ = cloze.parts(cloze.splits(settings))
    straight = cloze.trained_lora(settings, 2, 0, 4, tmp_path / "a", questions)
    cloze.trained_lora(settings, 2, 0, 2, tmp_path / "b", questions)
    assert cloze.state_path(tmp_path / "b", 2, 0, 2).exists()
    resumed = cloze.trained_lora(settings, 2, 0, 4, tmp_path / "b", questions)
    assert resumed["first_step"] == 3 and same_losses(device, resumed["losses"], straight["losses"])
    for name, value in straight["state"]["parameters"].items():
        assert value.device.type == device
        if device == "cpu":
            assert torch.equal(resumed["state"]["parameters"][name], value), name
        else:
            torch.testing.assert_close(resumed["state"]["parameters"][name], value, msg=name)
    assert cloze.trained_lora(settings, 2, 0, 4, tmp_path / "b", questions)["first_step"] == 5  # nothing to train


@pytest.mark.slow  # trains the study's model (test_behaviour_gaps checks δ's gradient fast)
@pytest.mark.parametrize("device", DEVICES)
def test_dash_only_trains_delta_alone_and_leaves_a_b_and_their_adam_state_untouched(tiny_study, tmp_path, device):
    settings = dataclasses.replace(cloze.QUICK, device=device)
    questions, _, _ = cloze.parts(cloze.splits(settings))
    state = cloze.trained_lora(settings, 2, 0, 2, tmp_path, questions)["state"]
    _, dash_only, optimizer, scheduler = cloze._fork(settings, 2, 0, tmp_path, state, dash_only=True)
    layers = lora_dash.dash_layers(dash_only)
    before = {name: (layer.lora_A.clone(), layer.lora_B.clone()) for name, layer in layers.items()}
    adam = {name: copy.deepcopy(optimizer.state[layer.lora_A]) for name, layer in layers.items()}
    train.train_steps(dash_only, CharTokenizer(), optimizer, scheduler, questions, 4, 2, 0, 96, first_step=3)
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A, before[name][0]) and torch.equal(layer.lora_B, before[name][1])
        assert torch.equal(optimizer.state[layer.lora_A]["exp_avg"], adam[name]["exp_avg"])
        assert layer.dash_delta.abs().sum() > 0
    assert sum(p.numel() for p in dash_only.parameters() if p.requires_grad) == settings.s * len(layers)


# --------------------------------------------------------------------------------- the whole study
@pytest.mark.slow  # the whole study in miniature
def test_the_cloze_miniature_runs_resumes_and_reports(tiny_study, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--cloze", "--quick", "--out", str(out), "--cache", str(cache), "--threads", "1"]
    main([*argv, "--budget", "4", "--t", "2", "--max-units", "3"])
    assert sorted(p.stem for p in (out / "units").iterdir()) == [
        "curve-r2-seed0-step2",
        "curve-r2-seed0-step4",
        "zeroshot",
    ]
    main([*argv, "--budget", "4", "--t", "2"])
    units = cloze_report.load_units(out)
    lora, dash, dash_only = (units[f"r2-seed0-{m}"] for m in cloze.METHODS)
    assert dash["losses"][:2] == lora["losses"][:2] == dash_only["losses"][:2]  # forked after step 2
    assert dash["losses"] != lora["losses"] and dash_only["losses"] != dash["losses"]
    assert units["curve-r2-seed0-step4"]["first_step"] == 3  # resumed from the step-2 state
    assert lora["first_step"] == 5 and lora["losses"] == units["curve-r2-seed0-step4"]["losses"]  # the curve's run
    summary = json.loads((out / "summary.json").read_text())
    for field in ("zero_shot_avg", "most_frequent_avg", "seeds", "test_questions_per_task", "steps"):
        assert summary[field] is not None, field
    for field in ("lora_avg", "dash_avg", "dash_only_avg"):
        assert set(summary[field]) == {"2"} and 0 <= summary[field]["2"] <= 100
    for field in (
        "dash_minus_lora",
        "dash_only_minus_lora",
        "dash_only_minus_dash",
        "lora_minus_zero_shot",
        "lora_minus_most_frequent",
    ):
        assert set(summary[field]["2"]) == {"mean", "ci95_low", "ci95_high"}
    seed_0 = summary["per_seed_avg"]["2"]["0"]
    assert seed_0 == {
        "lora": summary["lora_avg"]["2"],
        "dash": summary["dash_avg"]["2"],
        "dash_only": summary["dash_only_avg"]["2"],
    }
    assert f"| 2 | 0 | {seed_0['lora']:.2f} | {seed_0['dash']:.2f} |" in (out / "tables.md").read_text()
    assert summary["steps"] == 4 and summary["t"] == 2 and summary["units_missing"] == []
    assert summary["budget"]["reason"].startswith("forced")
    assert dash_only["trainable_parameters"] == 2 * 10 and dash["trainable_parameters"] > lora["trainable_parameters"]
    stamp = {path.name: path.stat().st_mtime_ns for path in (out / "units").iterdir()}
    (out / "summary.json").unlink()
    main([*argv, "--report-only"])
    assert {path.name: path.stat().st_mtime_ns for path in (out / "units").iterdir()} == stamp
    assert json.loads((out / "summary.json").read_text()) == summary
    assert "| LoRA-Dash r=2 (1 seed) |" in (out / "tables.md").read_text()
    after = sum(dash["losses"][2:]) / 2
    assert f"- LoRA-Dash r=2 (1 seed): {after:.4f}" in (out / "tables.md").read_text()


@pytest.mark.slow  # the whole study in miniature, run in three invocations
def test_processes_with_disjoint_only_patterns_share_one_study(tiny_study, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--cloze", "--quick", "--out", str(out), "--cache", str(cache), "--threads", "1"]
    main([*argv, "--until", "curve", "--only", "zeroshot|curve-r2-seed0-step2"])
    assert sorted(p.name for p in (out / "units").iterdir()) == ["curve-r2-seed0-step2.json", "zeroshot.json"]
    main([*argv, "--budget", "4", "--t", "2", "--only", "r2-seed0-(lora|dash)"])  # not dash_only
    assert {p.stem for p in (out / "units").iterdir()} >= {"r2-seed0-lora", "r2-seed0-dash"}
    assert not (out / "units" / "r2-seed0-dash_only.json").exists()
    main([*argv, "--budget", "4", "--t", "2"])  # dash_only, then the rest of the curve
    summary = json.loads((out / "summary.json").read_text())
    assert summary["units_missing"] == [] and not list(out.rglob("*.tmp"))
    # The decision keeps the curve it saw; the tables show the curve as it stands, the later point too.
    assert [row["steps"] for row in summary["budget"]["curve"]] == [2]
    assert [row["steps"] for row in summary["curve"]["curve"]] == [2, 4]
    assert re.search(r"^\| 4 \| [\d.]+ \|", (out / "tables.md").read_text(), flags=re.M)
    record = (out / "budget.json").read_text()
    with pytest.raises(SystemExit, match=r"records the comparison at 4 steps with t = 2; --t 3 would be another"):
        main([*argv, "--budget", "4", "--t", "3"])
    assert (out / "budget.json").read_text() == record


def test_a_bad_only_pattern_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--cloze", "--quick", "--out", str(tmp_path / "out"), "--only", "r4-(seed"])
    assert "--only" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow  # the whole study in miniature, twice
@CUDA
def test_the_cloze_miniature_runs_on_cuda_and_starts_where_the_cpu_run_starts(tiny_study, tmp_path):
    units = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        argv = ["--cloze", "--quick", "--out", str(out), "--cache", str(tmp_path / device / "cache")]
        main([*argv, "--threads", "1", "--budget", "4", "--t", "2", "--device", device])
        units[device] = cloze_report.load_units(out)
    lora, dash = units["cuda"]["r2-seed0-lora"], units["cuda"]["r2-seed0-dash"]
    assert lora["settings"]["device"] == "cuda" and units["cpu"]["r2-seed0-lora"]["settings"]["device"] == "cpu"
    assert dash["losses"][:2] == lora["losses"][:2]  # forked after step 2
    # A is drawn by each device's own generator, but B = 0 at step 1: both start from the same model.
    assert np.isclose(lora["losses"][0], units["cpu"]["r2-seed0-lora"]["losses"][0], rtol=1e-5)
    assert json.loads((tmp_path / "cuda" / "summary.json").read_text())["units_missing"] == []


@pytest.mark.slow  # the study up to its zero-shot unit
def test_without_a_budget_the_summary_marks_the_comparison_missing(tiny_study, tmp_path):
    out = tmp_path / "out"
    main(["--cloze", "--quick", "--out", str(out), "--cache", str(tmp_path), "--threads", "1", "--until", "zeroshot"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lora_avg"] == {"2": None} and summary["dash_minus_lora"] == {"2": None}
    assert summary["steps"] is None and "r2-seed0-dash_only" in summary["units_missing"]
    assert re.search(r"\| zero-shot \| [\d.]+ \|", (out / "tables.md").read_text())


def test_the_study_adapts_the_same_matrices_as_the_listed_study():
    assert cloze.TARGETS == model.TARGETS


@pytest.mark.slow  # trains the study's model three times
@pytest.mark.parametrize("device", DEVICES)
def test_a_forked_lora_dash_run_equals_one_launched_by_its_controller(tiny_study, tmp_path, device):
    """The pairing the comparison relies on: LoRA-Dash forked from the saved LoRA state after step t is
    the run a model launched at t by its controller makes, bit for bit (on a GPU, to float rounding)."""
    settings = dataclasses.replace(cloze.QUICK, device=device)
    questions, _, _ = cloze.parts(cloze.splits(settings))
    state = cloze.trained_lora(settings, 2, 0, 2, tmp_path, questions)["state"]
    tokenizer, forked, optimizer, scheduler = cloze._fork(settings, 2, 0, tmp_path, state, dash_only=False)
    after = train.train_steps(forked, tokenizer, optimizer, scheduler, questions, 4, 2, 0, 96, first_step=3)
    tokenizer, straight, optimizer, scheduler = cloze._build(settings, 2, 0, tmp_path)
    lora_dash.LaunchController(straight, launch_step=2).attach(optimizer)
    launched = train.train_steps(straight, tokenizer, optimizer, scheduler, questions, 4, 2, 0, 96)
    assert same_losses(device, state["losses"] + after, launched)


@pytest.mark.slow  # the study in miniature, twice
def test_once_the_curve_chooses_a_budget_the_comparison_runs_before_the_rest_of_the_curve(
    tiny_study, tmp_path, monkeypatch
):
    def rule(units, settings, cut, forced=None):  # chooses 2 steps as soon as that curve unit is in
        steps = 2 if "curve-r2-seed0-step2" in units else None
        return {"rule": "test", "curve": [], "steps": steps, "reason": "test"} | dict.fromkeys(
            ("zero_shot_validation_avg", "most_frequent_validation_avg")
        )

    monkeypatch.setattr(cloze_run, "choose_budget", rule)
    monkeypatch.setattr(cloze_report, "choose_budget", rule)
    out = tmp_path / "out"
    argv = ["--cloze", "--quick", "--out", str(out), "--cache", str(tmp_path), "--threads", "1", "--t", "1"]
    main([*argv, "--max-units", "5"])
    assert sorted(path.stem for path in (out / "units").iterdir()) == sorted(
        ["zeroshot", "curve-r2-seed0-step2", "r2-seed0-lora", "r2-seed0-dash", "r2-seed0-dash_only"]
    )
    assert json.loads((out / "budget.json").read_text())["steps"] == 2
    assert json.loads((out / "budget.json").read_text())["t"] == 1
    main(argv[:-2])  # then the rest of the curve; without --t, since budget.json records it
    assert (out / "units" / "curve-r2-seed0-step4.json").exists()


def test_a_run_that_answers_one_position_on_a_task_is_flagged_there():
    questions = [
        data.ClozeQuestion(task, ("p",) * n, tuple(f" {c}" for c in "abcd"[:n]), gold)
        for task, n, gold in [("boolq", 2, 0), ("boolq", 2, 1), ("boolq", 2, 1), ("obqa", 4, 2), ("obqa", 4, 0)]
    ]
    always_no = {"boolq": np.array([0.0, 1.0, 1.0]), "obqa": np.array([1.0, 1.0])}
    assert cloze_report.constant_answers(always_no, questions) == {"boolq": 1}
    assert cloze_report.constant_answers({"obqa": np.array([0.0, 1.0])}, questions) == {"obqa": 0}
