"""The demo: its data split, its model targeting, and a quick end-to-end run of `python -m lora_dash.demo`."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_dash

from helpers import require_demo_packages

require_demo_packages()

from lora_dash.demo.__main__ import parse_args  # noqa: E402
from lora_dash.demo.data import batches, load_rotten_tomatoes, read_reviews  # noqa: E402
from lora_dash.demo.model import MINILM_TARGETS, SentenceClassifier, load_minilm  # noqa: E402
from lora_dash.demo.train import TrainConfig, build, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DISTINCT_REVIEWS = 12_752  # 12,808 fresh + rotten rows, 56 of them repeats


@pytest.fixture(scope="module")
def split():
    return load_rotten_tomatoes(n_test=2000, seed=0)


# ------------------------------------------------------------------------------------------ data
def test_split_is_deterministic(split):
    again = load_rotten_tomatoes(n_test=2000, seed=0)
    assert again.train_texts == split.train_texts and again.test_texts == split.test_texts
    assert torch.equal(again.train_labels, split.train_labels) and torch.equal(again.test_labels, split.test_labels)


def test_another_seed_gives_another_split(split):
    assert load_rotten_tomatoes(n_test=2000, seed=1).test_texts != split.test_texts


def test_split_is_disjoint_and_covers_every_distinct_review_once(split):
    assert len(split.test_texts) == 2000
    assert len(split.train_texts) + len(split.test_texts) == DISTINCT_REVIEWS
    assert len(set(split.train_texts) | set(split.test_texts)) == DISTINCT_REVIEWS
    assert not set(split.train_texts) & set(split.test_texts)


def test_labels_are_the_corpus_labels(split):
    reviews = read_reviews()
    assert [reviews[text] for text in split.test_texts] == split.test_labels.tolist()
    assert [reviews[text] for text in split.train_texts] == split.train_labels.tolist()


def test_labels_are_balanced_enough_on_both_sides(split):
    for labels in (split.train_labels, split.test_labels):
        assert labels.dtype == torch.int64 and set(labels.unique().tolist()) == {0, 1}
        assert 0.5 < labels.float().mean() < 0.65  # 57.8 % fresh overall


def test_batches_visit_every_example_once_in_a_seeded_order(split):
    texts, labels = split.test_texts[:100], split.test_labels[:100]
    order = [text for chunk, _ in batches(texts, labels, 32, seed=3) for text in chunk]
    assert sorted(order) == sorted(texts) and order != texts
    assert order == [text for chunk, _ in batches(texts, labels, 32, seed=3) for text in chunk]
    assert [text for chunk, _ in batches(texts, labels, 32) for text in chunk] == sorted(texts, key=len)


def test_batches_keep_labels_with_their_texts(split):
    label_of = dict(zip(split.train_texts, split.train_labels.tolist()))
    for seed in (None, 1):
        for chunk, chunk_labels in batches(split.train_texts[:500], split.train_labels[:500], 32, seed=seed):
            assert chunk_labels.tolist() == [label_of[text] for text in chunk]


def test_bucketed_batches_pad_far_less_than_random_ones(split):
    # Padding per batch is (longest - each); bucketing should remove most of it.
    texts, labels = split.train_texts, split.train_labels

    def padding(chunks):
        return sum(max(map(len, chunk)) * len(chunk) - sum(map(len, chunk)) for chunk in chunks)

    random_chunks = [texts[i : i + 32] for i in range(0, len(texts), 32)]  # the split is already shuffled
    bucketed = [chunk for chunk, _ in batches(texts, labels, 32, seed=0)]
    assert padding(bucketed) < 0.2 * padding(random_chunks)


# ----------------------------------------------------------------------------------------- model
@pytest.mark.slow  # loads the real MiniLM
def test_minilm_targets_match_exactly_the_36_encoder_linears():
    _, encoder = load_minilm()
    model = SentenceClassifier(encoder)
    matched = {name: module for name, module in model.named_modules() if re.fullmatch(MINILM_TARGETS, name)}
    assert len(matched) == 36
    assert all(isinstance(module, torch.nn.Linear) for module in matched.values())
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert [name for name in linears if name not in matched] == ["head"]


def test_core_package_never_imports_the_demo_or_its_extras():
    # Not tqdm: torch itself imports it.
    code = (
        "import sys, lora_dash; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'transformers', 'tokenizers', 'matplotlib'} "
        "or m.startswith('lora_dash.demo')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------ command line
def test_quick_fills_only_the_flags_not_given():
    args = parse_args(["--quick", "--steps", "20"])
    assert (args.steps, args.t, args.batch_size) == (20, 4, 16)
    assert parse_args([]).steps == 250


def test_a_launch_step_past_the_budget_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--steps", "10", "--t", "10"])
    assert "--t must be in [0, --steps)" in capsys.readouterr().err


def test_alpha_is_left_to_the_config_unless_given_and_must_be_positive(capsys):
    assert parse_args([]).alpha is None and parse_args(["--alpha", "4"]).alpha == 4.0
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            parse_args(["--alpha", bad])
        assert "--alpha must be a finite number > 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ training
def test_alpha_is_twice_the_rank_unless_given():
    assert TrainConfig(r=4).effective_alpha == 8.0
    assert TrainConfig(r=4, alpha=3.0).effective_alpha == 3.0
    assert dataclasses.replace(TrainConfig(r=8), r=2).effective_alpha == 4.0  # resolved when read, not stored


@pytest.mark.slow  # loads the real MiniLM
def test_build_gives_every_adapted_layer_the_configured_alpha():
    _, model, _, _ = build("LoRA", TrainConfig(r=2, alpha=3.0))
    assert {(layer.alpha, layer.scaling) for layer in lora_dash.dash_layers(model).values()} == {(3.0, 1.5)}


@pytest.mark.slow  # loads the real MiniLM
def test_train_calls_on_step_after_every_step_and_can_run_without_bars(split, capsys):
    config = TrainConfig(steps=3, t=1, batch_size=4)
    tokenizer, model, optimizer, controller = build("LoRA-Dash", config)
    seen = []
    losses, launched_at = train(
        model,
        tokenizer,
        optimizer,
        split,
        config,
        controller,
        progress=False,
        on_step=lambda step, loss: seen.append((step, loss, controller.launched)),
    )
    assert seen == [(1, losses[0], True), (2, losses[1], True), (3, losses[2], True)]  # t = 1: launched in step 1
    assert launched_at == 1
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_bars_still_obey_tqdm_disable_in_the_environment():
    # The notebooks silence every bar with TQDM_DISABLE=1; progress=True must not override it.
    code = "from lora_dash.demo.train import progress_bar\nfor _ in progress_bar(range(3), True, desc='x'): pass"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TQDM_DISABLE": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "x:" not in done.stderr
    without = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    shown = subprocess.run([sys.executable, "-c", code], env=without, capture_output=True, text=True, check=True)
    assert "x:" in shown.stderr


# --------------------------------------------------------------------------------- the quick demo
@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lora_dash.demo", "--quick", "--alpha", "24", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done, out


@pytest.mark.slow
def test_quick_demo_exits_cleanly(quick_demo):
    done, _ = quick_demo
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_quick_demo_shows_progress_bars_for_training_launch_and_evaluation(quick_demo):
    stderr = quick_demo[0].stderr
    for bar in ("LoRA train", "LoRA-Dash train", "launch: SVD of every W", "LoRA eval", "LoRA-Dash eval"):
        assert bar in stderr


@pytest.mark.slow
def test_quick_demo_opens_with_its_own_lines_only(quick_demo):
    # transformers imports torchao, whose import logs kernel libraries it cannot load and torch's
    # deprecations: the demo silences them (model.import_transformers_models_quietly).
    done = quick_demo[0]
    assert done.stdout.startswith("Rotten Tomatoes: ")
    bars = ("LoRA train", "LoRA-Dash train", "launch: SVD of every W", "LoRA eval", "LoRA-Dash eval")
    pieces = [piece.replace("\x1b[A", "").strip() for piece in re.split(r"[\r\n]", done.stderr)]
    assert [piece for piece in pieces if piece and not piece.startswith(bars)] == []


@pytest.mark.slow
def test_quick_demo_prints_the_table_and_the_tsd_report(quick_demo):
    stdout = quick_demo[0].stdout
    assert "test acc" in stdout and "trainable params" in stdout and "steps/s" in stdout
    assert "\nLoRA " in stdout and "\nLoRA-Dash " in stdout
    assert "r=8, α=24, s=8, t=4" in stdout  # the α of --alpha, not 2r = 16
    assert "Task-specific directions: 8 per layer x 36 layers = 288" in stdout
    assert "mean |δ|" in stdout
    assert str(quick_demo[1]) in stdout.strip().splitlines()[-1]  # names its results folder last


@pytest.mark.slow
def test_quick_demo_json_holds_both_methods_and_the_launch_at_t(quick_demo):
    results = json.loads((quick_demo[1] / "results.json").read_text())
    lora, dash = results["methods"]["LoRA"], results["methods"]["LoRA-Dash"]
    for method in (lora, dash):
        assert 0.0 <= method["test_accuracy"] <= 1.0
        assert len(method["losses"]) == results["config"]["steps"]
    assert dash["launched_at_step"] == results["config"]["t"] and lora["launched_at_step"] is None
    assert results["config"]["alpha"] == 24.0  # --alpha, recorded as used
    assert dash["trainable_parameters"] == lora["trainable_parameters"] + 36 * results["config"]["s"]
    assert results["max_loss_gap_through_step_t_plus_1"] == 0.0  # δ = 0 at launch: the same computation
    assert len(results["tsd"]["layers"]) == 36


@pytest.mark.slow
def test_quick_demo_writes_its_plots(quick_demo):
    for name in ("loss.png", "ranks.png", "delta.png"):
        png = quick_demo[1] / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
