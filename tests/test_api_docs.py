"""docs/API.md's reference names every public name of lora_dash, and every name it lists exists.

Public means: every entry of ``lora_dash.__all__``; every function and class without a leading
underscore that a public module defines (the modules ``__all__`` exports, and ``lora_dash.hf``); and
every method and property without a leading underscore that a class of ``__all__`` defines itself
(not the ``nn.Module`` hooks it overrides, such as ``forward``). The reference lists them in tables
whose first cell starts with the name in backticks, relative to ``lora_dash``: ``inject(...)``,
``directions.svd_basis(...)``, ``LaunchController.steps``.
"""

import importlib
import inspect
import re
from pathlib import Path

import pytest
from torch import nn

import lora_dash

API = Path(__file__).resolve().parents[1] / "docs" / "API.md"
REFERENCE_HEADING = "## Reference: every public name"
EXTRA_PUBLIC_MODULES = ("hf",)  # public, but not imported by `import lora_dash` (it needs transformers)


def public_modules() -> dict[str, object]:
    """``{"analysis": module, ...}``: the modules ``lora_dash.__all__`` exports, and ``lora_dash.hf``."""
    modules = {name: getattr(lora_dash, name) for name in lora_dash.__all__}
    modules = {name: module for name, module in modules.items() if inspect.ismodule(module)}
    for name in EXTRA_PUBLIC_MODULES:
        modules[name] = importlib.import_module(f"lora_dash.{name}")
    return modules


def own_members(cls: type) -> list[str]:
    """Methods and properties ``cls`` defines, less the hooks of a base class it overrides."""
    inherited = {name for base in cls.__mro__[1:] if base is not object for name in vars(base)}
    kinds = (property, classmethod, staticmethod)
    return [
        name
        for name, value in vars(cls).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or isinstance(value, kinds))
        and name not in inherited
    ]


def public_names() -> set[str]:
    """Every public name, as the reference writes it (relative to ``lora_dash``)."""
    names = set(lora_dash.__all__)
    for module_name, module in public_modules().items():
        for name, value in vars(module).items():
            defined_here = getattr(value, "__module__", None) == module.__name__
            if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value)) and defined_here:
                names.add(f"{module_name}.{name}")
    for name in lora_dash.__all__:
        value = getattr(lora_dash, name)
        if inspect.isclass(value):
            names.update(f"{name}.{member}" for member in own_members(value))
    return names


def documented_names() -> list[str]:
    """The names in the first cell of every table row of the reference section, in order."""
    text = API.read_text()
    assert REFERENCE_HEADING in text, f"docs/API.md has no section {REFERENCE_HEADING!r}"
    section = text.split(REFERENCE_HEADING, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([A-Za-z_][\w.]*)", section, re.M)


def instances() -> dict[str, object]:
    """A live layer and controller: some of their documented members are set in ``__init__``."""
    model = nn.Sequential(nn.Linear(8, 8))
    lora_dash.inject(model, "0", r=2, alpha=4, s=2)
    return {"LoRADashLinear": model[0], "LaunchController": lora_dash.LaunchController(model, launch_step=1)}


def resolves(name: str, live: dict[str, object]) -> bool:
    """Whether ``lora_dash.<name>`` exists (a class member may live on an instance only)."""
    head, *rest = name.split(".")
    if head in EXTRA_PUBLIC_MODULES:
        importlib.import_module(f"lora_dash.{head}")
    owner = lora_dash
    for part in [head, *rest]:
        if hasattr(owner, part):
            owner = getattr(owner, part)
        elif part != head and owner is getattr(lora_dash, head, None) and hasattr(live.get(head), part):
            owner = getattr(live[head], part)
        else:
            return False
    return True


def test_the_discovered_public_surface_is_the_real_one():
    # Guards the two tests below against passing on an empty or broken discovery.
    names = public_names()
    for expected in (
        "inject",
        "analysis",
        "DashDirections",
        "LaunchController.detach",
        "LaunchController.launch_now",
        "directions.select_task_directions",
        "directions.score_directions",
        "distributed.assign_owners",
        "hf.LoRADashTrainer",
    ):
        assert expected in names
    assert "LoRADashLinear.forward" not in names  # an nn.Module hook, not API of its own
    assert len(names) > 80


def test_every_public_name_is_in_the_reference():
    missing = sorted(public_names() - set(documented_names()))
    assert missing == [], f"public but not in docs/API.md's reference: {missing}"


def test_every_name_in_the_reference_exists():
    live = instances()
    gone = [name for name in documented_names() if not resolves(name, live)]
    assert gone == [], f"in docs/API.md's reference but not in lora_dash: {gone}"


def test_the_reference_lists_each_name_once():
    listed = documented_names()
    assert sorted({name for name in listed if listed.count(name) > 1}) == []


@pytest.mark.parametrize("name", ["inject", "hf.ADAPTER_FILE", "LaunchController.steps", "LoRADashLinear.lora_A"])
def test_resolution_finds_functions_constants_and_instance_attributes(name):
    assert resolves(name, instances())


def test_resolution_rejects_a_name_that_is_not_there():
    assert not resolves("directions.no_such_function", instances())
    assert not resolves("LaunchController.no_such_member", instances())
