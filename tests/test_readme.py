"""The README's quickstart runs as written and does what it says."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs_and_launches_after_step_10():
    quickstart = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(quickstart, str(README), "exec"), namespace)
    controller, model = namespace["controller"], namespace["model"]
    assert controller.launched and controller.steps == 30
    assert model[0].dash_index.min() >= 0
    assert model[0].dash_delta.abs().sum() > 0  # δ trained during the 20 dash steps
