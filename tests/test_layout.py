"""The layout of docs/METHOD.md §13: the method in a few files read in order, integrations around it,
imports pointing inward, and no module rewiring another.

Imports are read from the source (every ``import``, at module level or inside a function), so a lazy
import inside a function counts as much as one at the top.
"""

import ast
from pathlib import Path

import pytest

import lora_dash

PACKAGE = Path(lora_dash.__file__).parent
#: The method, in reading order; each may import the ones before it.
METHOD = ["checks", "directions", "bases", "fused", "layer", "refusals", "inject", "hooks", "schedule"]
#: The integrations: they may import the method and each other, never a program.
INTEGRATIONS = [
    "state",
    "quantized",
    "distributed",
    "merge",
    "analysis",
    "guards",
    "checkpoint",
    "export",
    "hf",
]
#: The programs built on the library.
PROGRAMS = ["demo", "bench", "reproduce", "commonsense"]
#: What "reads in one sitting" stands for: the four files that hold the method's ideas, and any one
#: method file (about 15 minutes of reading each).
METHOD_LINES = 1100
FILE_LINES = 400


def module_name(path: Path) -> str:
    """``lora_dash/bench/harness.py`` → ``"bench.harness"``; a package's ``__init__`` is the package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The modules of the package that ``path`` imports (``from lora_dash import x`` names module ``x`` when
    there is one; ``import lora_dash`` alone is ``"__init__"``, the front door)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from lora_dash.x import y` imports module x.y if there is one, else module x.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "lora_dash" or (
                name.startswith("lora_dash.") and name.count(".") == 1 and name.removeprefix("lora_dash.") not in known
            ):
                found.add("__init__")
            elif name.startswith("lora_dash."):
                inner = name.removeprefix("lora_dash.")
                while inner and inner not in known:
                    inner = inner.rpartition(".")[0]
                if inner:
                    found.add(inner)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, known) - {module_name(path)} for path in paths}


def top(module: str) -> str:
    return module.split(".")[0]


def test_every_module_of_the_package_has_a_place_in_the_layout():
    placed = {*METHOD, *INTEGRATIONS, *PROGRAMS, "__init__"}
    assert {top(module) for module in import_graph()} == placed


@pytest.mark.parametrize("position", range(len(METHOD)), ids=METHOD)
def test_a_method_file_imports_only_the_method_files_before_it(position):
    allowed = set(METHOD[:position])
    assert import_graph()[METHOD[position]] <= allowed


@pytest.mark.parametrize("integration", INTEGRATIONS)
def test_an_integration_imports_no_program_and_not_the_front_door(integration):
    imported = {top(module) for module in import_graph()[integration]}
    assert not imported & {*PROGRAMS, "__init__"}


def test_the_package_has_no_import_circle():
    graph = {module: targets - {"__init__"} for module, targets in import_graph().items()}
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", f"import circle: {' -> '.join([*path, module, target])}"
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def file_lines(name: str) -> int:
    return len((PACKAGE / f"{name}.py").read_text().splitlines())


def test_the_method_reads_in_one_sitting():
    lines = sum(file_lines(name) for name in ("directions", "layer", "inject", "schedule"))
    assert lines <= METHOD_LINES, f"directions, layer, inject and schedule hold {lines} lines"
    longest = max(METHOD, key=file_lines)
    assert file_lines(longest) <= FILE_LINES, f"{longest}.py holds {file_lines(longest)} lines"


def test_importing_the_package_installs_every_hook_of_the_method():
    from lora_dash import analysis, bases, distributed, guards, quantized, schedule

    assert bases._weight_reader is quantized.dequantized_weight
    assert schedule.launch_hooks == {
        "shared_selection": distributed.select_shared,
        "evidence": analysis.launch_evidence,
        "guard": guards.guard,
    }


def assigned_module_attributes(path: Path) -> list[str]:
    """``module.name = ...`` statements of ``path`` whose target is a module of the package it
    imported as ``from lora_dash import module`` (or ``import lora_dash.module as module``)."""
    tree = ast.parse(path.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "lora_dash":
            modules |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            modules |= {alias.asname for alias in node.names if alias.name.startswith("lora_dash.")}
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                if target.value.id in modules:
                    found.append(f"{target.value.id}.{target.attr}")
    return found


def test_no_module_of_the_package_assigns_into_another():
    rewired = {module_name(path): assigned_module_attributes(path) for path in sorted(PACKAGE.rglob("*.py"))}
    assert {module: names for module, names in rewired.items() if names} == {}


def test_the_rewiring_reader_sees_an_assignment(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("from lora_dash import layer, schedule\nschedule.guard = print\n")
    assert assigned_module_attributes(source) == ["schedule.guard"]


def test_the_import_reader_sees_a_lazy_import_and_a_circle(tmp_path):
    # The checks above would pass vacuously if the reader missed imports: show it finds one inside a function.
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from lora_dash.hf import LoRADashTrainer\n    from lora_dash import schedule\n")
    assert imported_modules(source, {"hf", "schedule"}) == {"hf", "schedule"}
    source.write_text("import torch\nfrom lora_dash import inject\n")
    assert imported_modules(source, {"hf", "schedule"}) == {"__init__"}
