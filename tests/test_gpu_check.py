"""`python -m lora_dash.bench.gpu_check`: its dry run on the CPU writes every part of the report with numbers in
it, to an ignored path (the committed report and `git status` untouched), every verdict following from its
numbers; a host read slipped into the forward is caught, a part out of time says what it left out, the GPU-busy
time is the union of the device's intervals, and without CUDA the real run says so in one line.

No number is judged here: the dry run's shapes are too small to mean anything, and CI has no GPU.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from lora_dash import LoRADashLinear  # noqa: E402
from lora_dash.bench import contenders, gpu_check  # noqa: E402
from lora_dash.bench.launch import projected_seconds  # noqa: E402
from lora_dash.bench.report import Ratio, Target  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CUDA_TEST = "tests/test_faults.py::test_model_moved_to_cuda_after_injection_launches_and_loads_as_on_cpu"
NUMBER = r"\d[\d,]*(?:\.\d+)?"


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True).stdout


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, str, dict]:
    """``python -m lora_dash.bench.gpu_check --dry-run`` as a user types it (no ``--out``), in a snapshot of the
    working tree committed to a git repository of its own (so that what others edit meanwhile does not count):
    what it printed, its report, and the snapshot's ``git status`` and committed report's digest before and after.
    """
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout, to snapshot the working tree")
    snapshot = tmp_path_factory.mktemp("gpu_check") / "repo"
    for name in git(REPO, "ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0"):
        if name and (REPO / name).is_file():  # a file deleted but not yet staged is listed and absent
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, snapshot / name)
    git(snapshot, "init", "-q")
    git(snapshot, "add", "--all")
    git(snapshot, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "snapshot")
    committed = snapshot / gpu_check.DEFAULT_OUT
    before = {"status": git(snapshot, "status", "--porcelain"), "committed": digest(committed)}
    done = subprocess.run(
        [sys.executable, "-m", "lora_dash.bench.gpu_check", "--dry-run"],
        cwd=snapshot,
        env={**os.environ, "PYTHONPATH": str(snapshot)},
        capture_output=True,
        text=True,
        timeout=400,
    )
    after = {"status": git(snapshot, "status", "--porcelain", "--untracked-files=all"), "committed": digest(committed)}
    out = snapshot / gpu_check.DRY_RUN_OUT
    return done, out.read_text() if out.exists() else "", {"before": before, "after": after}


STEP_PART, MODEL_PART = (title for title, *_ in gpu_check.PARTS[1:3])


def section(report: str, title: str) -> str:
    """The body of the report's ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", report, flags=re.S | re.M)
    assert match, f"no section {title!r} in the report"
    return match.group(1)


@pytest.mark.slow
def test_a_dry_run_leaves_the_committed_report_and_git_status_as_they_were(dry_run):
    done, report, state = dry_run
    assert done.returncode == 0 and "Dry run on the CPU" in report
    assert f"report written to {gpu_check.DRY_RUN_OUT};" in done.stdout
    assert state["before"]["status"] == ""  # the snapshot starts clean
    assert state["after"]["status"] == ""  # and the dry run wrote only where git ignores
    assert state["after"]["committed"] == state["before"]["committed"]


@pytest.mark.slow
def test_dry_run_exits_0_and_reports_every_part_ok(dry_run):
    done, report, _ = dry_run
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
    body = section(dry_run[1], STEP_PART)
    for tokens in gpu_check.DRY_RUN.layer_tokens:
        for out_features, in_features in gpu_check.DRY_RUN.layer_shapes:
            case = f"{out_features}×{in_features}, {tokens:,} tokens"
            for name in gpu_check.STEP_CONTENDERS:
                time_ms = re.search(rf"^\| {case} \| {re.escape(name)} \| ({NUMBER}) ms \(", body, flags=re.M)
                assert time_ms and float(time_ms.group(1)) > 0, (case, name)
            saved = {}
            for name in gpu_check.MEMORY_CONTENDERS:
                row = re.search(rf"^\| {case} \| {re.escape(name)} \|((?: {NUMBER} B \|){{4}})$", body, flags=re.M)
                assert row, (case, name)
                module, gradients, state, saved[name] = (int(v.replace(",", "")) for v in re.findall(NUMBER, row[1]))
                assert module > 0 and gradients > 0 and state > 0
            # PEFT's LoRA over the bf16 base keeps the float32 x and x Aᵀ: counted exactly.
            assert saved[contenders.PEFT] == 4 * tokens * (in_features + contenders.R)
            for name in (contenders.PRE, contenders.DASH):
                band = re.search(
                    rf"^\| {case} \| {re.escape(name)} / PEFT LoRA \| {NUMBER} \| ± ({NUMBER}) \| ≤ 1.02 \|", body, re.M
                )
                assert band and float(band.group(1)) >= 0, (case, name)
                assert re.search(
                    rf"^\| {case} \| {re.escape(name)} / PEFT LoRA \| {NUMBER} \| — \| ≤ 0.6 \|", body, re.M
                )
    assert "Not measured: the CPU has no allocator counters" in body


@pytest.mark.slow
def test_dry_run_trains_the_whole_model_in_three_passes_against_peft(dry_run):
    body = section(dry_run[1], MODEL_PART)
    settings = gpu_check.DRY_RUN
    assert f"{settings.model.layers * len(gpu_check.LLAMA_PROJECTIONS)} layers" in body
    for batch, tokens in settings.model_batches:
        case = f"{batch} × {tokens:,} tokens"
        for name in gpu_check.MEMORY_CONTENDERS:
            wall = re.search(rf"^\| {case} \| {re.escape(name)} \| ({NUMBER}) ms \(", body, flags=re.M)
            assert wall and float(wall[1]) > 0, (case, name)
        for name in (contenders.PRE, contenders.DASH):
            assert re.search(rf"^\| {case} \| {re.escape(name)} / PEFT LoRA \| {NUMBER} \| — \| ≤ 1 \|", body, re.M)
            passes = re.findall(rf"^\| {case}, pass (\d) \| {re.escape(name)} / PEFT LoRA \| {NUMBER} \|", body, re.M)
            assert passes == [str(index + 1) for index in range(settings.model_passes)]
    assert body.count("Not measured: it needs CUDA") == 2  # the GPU-busy time and the peak memory


@pytest.mark.slow
def test_every_verdict_of_the_dry_run_follows_from_its_numbers(dry_run):
    rows = re.findall(
        rf"^\| [^|]+ \| [^|]+ / [^|]+ \| ({NUMBER}) \| (—|± {NUMBER}) \| ([≤≥]) ({NUMBER}) \| "
        r"(PASS|MISS|UNRESOLVED) \|$",
        dry_run[1],
        flags=re.M,
    )
    settings = gpu_check.DRY_RUN
    # Per layer case: both phases' time (≤ 1.02) and saved bytes (≤ 0.6); per model batch: both phases' wall time.
    assert len(rows) == 4 * len(settings.layer_tokens) * len(settings.layer_shapes) + 2 * len(settings.model_batches)
    for value, band, sign, bound, verdict in rows:
        target = Target(float(bound), at_most=sign == "≤")
        width = None if band == "—" else float(band.removeprefix("± "))
        if width is None and abs(float(value) - target.bound) < 1e-3:
            continue  # on its bound at the printed rounding
        assert Ratio("s", "c", "a", "b", float(value), target, width).verdict == verdict


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
    settings = gpu_check.DRY_RUN
    cases = ", ".join(f"{o}×{i} on {t:,} tokens" for t in settings.layer_tokens for o, i in settings.layer_shapes)
    assert not ok and f"**Not measured, out of time: {cases}.**" in body


@pytest.mark.parametrize(
    "intervals, busy",
    [
        ([], 0.0),
        ([(0, 10), (20, 25)], 15.0),  # apart: summed
        ([(0, 10), (5, 12)], 12.0),  # overlapping: counted once
        ([(5, 6), (0, 10), (10, 11)], 11.0),  # nested, then touching
    ],
)
def test_gpu_busy_time_is_the_union_of_the_device_intervals(intervals, busy):
    assert gpu_check.busy_microseconds(intervals) == busy


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
