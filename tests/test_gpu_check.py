"""`python -m lora_dash.bench.gpu_check`: its dry run on the CPU writes every part of the report with numbers in
it, a host read slipped into the forward is caught, a part out of time says what it left out, and without CUDA
the real run says so in one line.

No number is judged here: the dry run's shapes are too small to mean anything, and CI has no GPU.
"""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from lora_dash import LoRADashLinear  # noqa: E402
from lora_dash.bench import gpu_check  # noqa: E402
from lora_dash.bench.launch import projected_seconds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CUDA_TEST = "tests/test_faults.py::test_model_moved_to_cuda_after_injection_launches_and_loads_as_on_cpu"
NUMBER = r"\d[\d,]*(?:\.\d+)?"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, str]:
    """``python -m lora_dash.bench.gpu_check --dry-run``: what it printed, and its report."""
    out = tmp_path_factory.mktemp("gpu_check") / "report.md"
    done = subprocess.run(
        [sys.executable, "-m", "lora_dash.bench.gpu_check", "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, out.read_text() if out.exists() else ""


def section(report: str, title: str) -> str:
    """The body of the report's ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", report, flags=re.S | re.M)
    assert match, f"no section {title!r} in the report"
    return match.group(1)


@pytest.mark.slow
def test_dry_run_exits_0_and_reports_every_part_ok(dry_run):
    done, report = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Dry run on the CPU" in report
    for title, *_ in gpu_check.PARTS:
        assert f"] {title}: ok in" in done.stdout
        section(report, title)
    assert re.search(r"^Total \d+ s; every part ran \(a dry run: .* need CUDA\)\.$", report, flags=re.M)


@pytest.mark.slow
def test_dry_run_runs_exactly_the_tests_that_need_cuda(dry_run):
    body = section(dry_run[1], "CUDA tests")
    rows = re.findall(r"^\| `([^`]+)` \| (\w+) \|$", body, flags=re.M)
    assert (CUDA_TEST, "passed" if torch.cuda.is_available() else "skipped") in rows
    assert not [test for test, _ in rows if "test_gpu_check" in test]  # this file's tests need no CUDA
    assert re.search(rf"\*\*{len(rows)} tests?: \d+ passed, 0 failed, \d+ skipped\*\*", body)


@pytest.mark.slow
def test_dry_run_reports_step_times_and_exact_tensor_bytes_at_every_shape(dry_run):
    body = section(dry_run[1], "bf16 training step against PEFT's LoRA")
    for out_features, in_features in gpu_check.DRY_RUN.layer_shapes:
        case = f"{out_features}×{in_features}, {gpu_check.DRY_RUN.tokens} tokens"
        for name in gpu_check.STEP_CONTENDERS:
            time_ms = re.search(rf"^\| {case} \| {re.escape(name)} \| ({NUMBER}) ms \(", body, flags=re.M)
            assert time_ms and float(time_ms.group(1)) > 0, (case, name)
        for name in gpu_check.MEMORY_CONTENDERS:
            row = re.search(rf"^\| {case} \| {re.escape(name)} \|((?: {NUMBER} B \|){{5}})$", body, flags=re.M)
            assert row, (case, name)
            module, gradients, state, saved, step = (int(v.replace(",", "")) for v in re.findall(NUMBER, row[1]))
            assert step == gradients + state + saved > 0 and module > 0
        band = re.search(rf"^\| {case} \| ours dash / PEFT LoRA \| {NUMBER} \| ± ({NUMBER}) \| ≤ 1.02 \|", body, re.M)
        assert band and float(band.group(1)) >= 0
    assert "Not measured: the CPU has no allocator counters" in body


@pytest.mark.slow
def test_dry_run_finds_no_host_read_after_the_launch(dry_run):
    body = section(dry_run[1], "Host–device synchronisations after the launch")
    steps = gpu_check.DRY_RUN.sync_steps
    assert f"**0 in {steps} steps** (none)" in body
    assert "not checked on this device" in body  # the sync debug mode is CUDA's alone: said, not passed


@pytest.mark.slow
def test_dry_run_times_every_block_shape_and_projects_7b_and_70b(dry_run):
    body = section(dry_run[1], "The launch's SVDs on the device, and the 7B / 70B projection")
    hidden, ffn = gpu_check.DRY_RUN.block
    for out_features, in_features in gpu_check.llama_block_linears(hidden, ffn):
        row = re.search(rf"^\| {out_features}×{in_features} \| yes \| (\d+) \| ({NUMBER}) \(", body, flags=re.M)
        assert row and int(row[1]) >= 1 and float(row[2]) > 0
    assert re.search(rf"\*\*One block\*\* \(7 matrices: .*`lora_dash.launch` of that block .*: {NUMBER} ms", body)
    for model in gpu_check.PROJECTED:
        for cost_model in gpu_check.COST_MODELS:
            assert re.search(rf"^\| {re.escape(model)} \| \d+ \| {re.escape(cost_model.name)} \|", body, re.M)


def test_a_host_read_in_the_forward_is_counted_and_fails_the_sync_check(monkeypatch):
    forward = LoRADashLinear.forward

    def forward_reading_the_phase(self, x):
        self.dash_launched.item()  # a tensor read on the host: a synchronisation on a GPU
        return forward(self, x)

    monkeypatch.setattr(LoRADashLinear, "forward", forward_reading_the_phase)
    settings = gpu_check.DRY_RUN
    body, ok = gpu_check.sync_section(settings, time.monotonic() + 60)
    steps, layers = settings.sync_steps, len(settings.layer_shapes)
    assert not ok
    assert f"**{steps * layers} in {steps} steps** (_local_scalar_dense ×{steps * layers})" in body


def test_the_sync_check_passes_without_the_host_read():
    body, ok = gpu_check.sync_section(gpu_check.DRY_RUN, time.monotonic() + 60)
    assert ok, body


def test_svds_out_of_time_are_named_and_the_part_is_not_ok():
    body, ok = gpu_check.svd_section(gpu_check.DRY_RUN, deadline=time.monotonic())
    assert not ok
    untimed = re.search(r"^Not timed, out of time: (.*)\.$", body, flags=re.M)
    hidden, ffn = gpu_check.DRY_RUN.block
    assert untimed and f"{hidden}×{hidden}" in untimed[1] and f"{ffn}×{hidden}" in untimed[1]
    assert "not fitted" in body


def test_step_shapes_out_of_time_are_named_and_the_part_is_not_ok():
    body, ok = gpu_check.step_section(gpu_check.DRY_RUN, deadline=time.monotonic())
    shapes = ", ".join(f"{o}×{i}" for o, i in gpu_check.DRY_RUN.layer_shapes)
    assert not ok and f"**Not measured, out of time: {shapes}.**" in body


def test_the_measured_cost_model_projects_the_summed_times_on_one_gpu_and_the_busiest_share_on_two():
    medians = {(8, 4): 3.0, (4, 8): 2.0, (4, 4): 0.5}
    model, constants = gpu_check.measured_cost_model(medians)
    shapes = [(8, 4), (4, 8), (4, 4), (4, 4)]
    assert projected_seconds(model, constants, shapes, 1) == pytest.approx(6.0)
    # The launch assigns by n·m·min(n, m) (128, 128, 64, 64), largest first to the least-loaded rank, ties to
    # rank 0: rank 0 takes 8×4 and a 4×4 (3.5 s), rank 1 takes 4×8 and the other 4×4 (2.5 s).
    assert projected_seconds(model, constants, shapes, 2) == pytest.approx(3.5)


def test_without_cuda_the_real_run_says_so_in_one_line_and_writes_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "report.md")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and "no CUDA device" in printed
    assert not (tmp_path / "report.md").exists()
