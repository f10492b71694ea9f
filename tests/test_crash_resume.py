"""Crash and resume (invariant 14 under real crashes): a training process (``workers/crash_resume_run.py``)
is SIGKILLed at a random step, restarted from its last checkpoint, and must end bit-identical to a run
that never stopped: adapter, optimizer, controller and RNG states alike.

The kill step is drawn afresh each session and named in every failure message.
"""

import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lora_dash import LaunchController
from lora_dash.checkpoint import load_training_checkpoint

from helpers import assert_same, build_adapted, make_optimizer
from workers.crash_resume_run import TOTAL, T

WORKER = Path(__file__).parent / "workers" / "crash_resume_run.py"
TIMEOUT_S = 90  # per process; one takes a few seconds

pytestmark = pytest.mark.slow  # subprocesses: make test-fast leaves this file out


class Run:
    """A worker process. Its reports (``start S``, ``saved S``) arrive through a queue, so every wait has a
    timeout; every line it prints is kept for failure messages."""

    def __init__(self, folder: Path, *flags: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), str(folder), *flags],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reports: queue.Queue = queue.Queue()
        self.log: list[str] = []
        self.saved: list[int] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.log.append(line.rstrip())
            kind, _, step = line.partition(" ")
            if kind in ("start", "saved"):
                self.saved += [int(step)] if kind == "saved" else []
                self.reports.put((kind, int(step)))
        self.reports.put(None)

    def next_report(self) -> tuple[str, int]:
        report = self.reports.get(timeout=TIMEOUT_S)
        assert report is not None, "the worker exited early:\n" + "\n".join(self.log)
        return report

    def start_step(self) -> int:
        kind, step = self.next_report()
        assert kind == "start", self.log
        return step

    def wait_until_saved(self, step: int) -> None:
        while self.next_report() != ("saved", step):
            pass

    def grant_step(self) -> None:
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def finish(self) -> int:
        """Wait for the exit (killing it after ``TIMEOUT_S``) and for its last lines; the exit code."""
        try:
            self.process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.reader.join(timeout=TIMEOUT_S)
        return self.process.returncode


def run_to_the_end(folder: Path) -> int:
    """Run (or resume) without pauses; return the step it started from."""
    run = Run(folder)
    start = run.start_step()
    assert run.finish() == 0, "\n".join(run.log)
    return start


def kill_while_running_the_step_after(folder: Path, step: int) -> None:
    """Let the worker finish ``step``, allow it one more, and SIGKILL it somewhere inside that one."""
    run = Run(folder, "--gated")
    assert run.start_step() == 0
    for _ in range(step):
        run.grant_step()
    run.wait_until_saved(step)
    run.grant_step()
    time.sleep(random.uniform(0.0, 0.02))  # forward, backward, optimizer step or the save: wherever it is
    run.process.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL


def load_content(path: Path):
    return torch.load(path, weights_only=True)["content"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("uninterrupted")
    run_to_the_end(folder)
    return load_content(folder / "final.pt")


@pytest.mark.parametrize("phase", ["before-launch", "after-launch"])
def test_run_killed_at_a_random_step_resumes_bit_identical_to_an_uninterrupted_run(phase, uninterrupted, tmp_path):
    kill_after = random.randint(1, T - 2) if phase == "before-launch" else random.randint(T, TOTAL - 2)
    kill_while_running_the_step_after(tmp_path, kill_after)
    resumed_from = run_to_the_end(tmp_path)
    # The kill lands inside step kill_after + 1: that step's checkpoint may or may not have been written.
    assert resumed_from in (kill_after, kill_after + 1), f"killed during step {kill_after + 1}"
    assert (resumed_from >= T) == (phase == "after-launch"), f"resumed from step {resumed_from}"
    assert_same(load_content(tmp_path / "final.pt"), uninterrupted, f"killed during step {kill_after + 1}")


def test_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    die_at = random.randint(2, TOTAL - 1)
    run = Run(tmp_path, "--die-mid-save-at", str(die_at))
    assert run.finish() == -signal.SIGKILL, f"died saving step {die_at}: " + "\n".join(run.log)
    assert run.saved[-1] == die_at - 1
    half_written = list(tmp_path.glob(".last.pt.*.tmp"))
    assert len(half_written) == 1 and 0 < half_written[0].stat().st_size < (tmp_path / "last.pt").stat().st_size
    model = build_adapted(init_seed=3, dropout=0.1)
    optimizer = make_optimizer(model)
    controller = LaunchController(model, launch_step=T).attach(optimizer)
    load_training_checkpoint(model, optimizer, controller, tmp_path / "last.pt")
    assert controller.steps == die_at - 1, f"died saving step {die_at}"
    assert controller.launched == (die_at - 1 >= T)
