"""Every notebook in ``notebooks/`` runs top to bottom in quick mode (``LORA_DASH_QUICK=1``).

Each one is executed in a fresh kernel with the notebooks folder as working directory; the test fails
if any cell raises. The executed copy stays in memory: the committed notebook (with the outputs of a
full run) is never overwritten.
"""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 300

pytestmark = pytest.mark.slow  # subprocesses: make test-fast leaves this file out


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda path: path.name)
def test_notebook_runs_in_quick_mode(path):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # the kernel's working directory
    )
    client.execute(env={**os.environ, "LORA_DASH_QUICK": "1"})  # raises CellExecutionError on a failed cell
