"""Every notebook in ``notebooks/`` runs top to bottom in quick mode (``LORA_DASH_QUICK=1``), and neither
that run nor the committed outputs carry the environment's import-time noise.

Each one is executed in a fresh kernel with the notebooks folder as working directory; the test fails
if any cell raises. The executed copy stays in memory: the committed notebook (with the outputs of a
full run) is never overwritten.
"""

import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
# What transformers' import of torchao printed before the demo silenced it (lora_dash.demo.model):
# kernel libraries torchao's wheel cannot load here, and torch's deprecation of its Enum registrations.
NOISE = re.compile(r"Failed to load .*\.so|_pytree\.py|is an Enum subclass")


def stderr_of(notebook) -> str:
    """Everything the notebook's cells wrote to stderr, as saved in its outputs."""
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stderr"
    )


def noise_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if NOISE.search(line)]


def test_noise_pattern_matches_the_lines_it_stands_for():
    seen = (
        "Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load this library\n"
        "W1129 18:18:30.849000 26926 torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum subclass\n"
    )
    assert noise_lines(seen) == seen.splitlines()
    assert noise_lines("full fine-tuning: 120 steps in 1395 s, test accuracy 0.793\n") == []


@pytest.mark.parametrize("path", PATHS, ids=lambda path: path.name)
def test_saved_outputs_hold_no_environment_noise(path):
    assert noise_lines(stderr_of(nbformat.read(path, as_version=4))) == []


@pytest.mark.slow  # a kernel per notebook: make test-fast leaves it out
@pytest.mark.parametrize("path", PATHS, ids=lambda path: path.name)
def test_notebook_runs_in_quick_mode_without_environment_noise(path):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # the kernel's working directory
    )
    client.execute(env={**os.environ, "LORA_DASH_QUICK": "1"})  # raises CellExecutionError on a failed cell
    assert noise_lines(stderr_of(notebook)) == []
