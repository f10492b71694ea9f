"""The README and docs/API.md: their snippets run as written and do what they say; their links resolve."""

import re
from pathlib import Path

import pytest
import torch

from helpers import logits_without_lora_dash

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
API = ROOT / "docs" / "API.md"


def run_snippet(after: str, path: Path = README) -> dict:
    """Execute the first ```python block that follows the text ``after`` in ``path``; return its namespace."""
    text = path.read_text()
    block = re.compile(r"```python\n(.*?)```", re.S).search(text, text.index(after)).group(1)
    namespace: dict = {}
    exec(compile(block, str(path), "exec"), namespace)
    return namespace


def test_readme_quickstart_runs_and_launches_after_step_10():
    namespace = run_snippet("# lora-dash")
    controller, model = namespace["controller"], namespace["model"]
    assert controller.launched and controller.steps == 30
    assert model[0].dash_index.min() >= 0
    assert model[0].dash_delta.abs().sum() > 0  # δ trained during the 20 dash steps


@pytest.mark.slow  # trains through 🤗 Trainer
def test_readme_trainer_snippet_saves_an_adapter_that_serves_the_trained_logits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_snippet("**🤗 Trainer.**")
    model, served, merged = namespace["model"], namespace["served"], namespace["merged"]
    assert all(layer.launched for layer in namespace["lora_dash"].dash_layers(model).values())
    assert namespace["trainer"].state.global_step == 12
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir() if p.suffix == ".safetensors") == [
        "lora_dash_adapter.safetensors"
    ]
    probe = torch.randint(0, 100, (3, 8))
    with torch.no_grad():
        trained = model.eval()(input_ids=probe).logits
        # `merged` is `served` with the adapter folded into W: the same logits up to float32 rounding
        torch.testing.assert_close(merged.eval()(input_ids=probe).logits, trained, rtol=1e-5, atol=1e-6)
    assert merged is served and not namespace["lora_dash"].dash_layers(merged)
    torch.testing.assert_close(logits_without_lora_dash(tmp_path / "merged", probe), trained, rtol=1e-5, atol=1e-6)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons (a Trainer made earlier in this process leaves its own)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_readme_accelerate_snippet_counts_30_real_steps_and_launches(fresh_accelerate_state, capsys):
    namespace = run_snippet("**accelerate.**")
    assert namespace["controller"].steps == 30 and namespace["controller"].launched
    assert capsys.readouterr().out.strip() == "30 True"


def test_readme_quantized_snippet_trains_launches_saves_and_merges(tmp_path, monkeypatch):
    import bitsandbytes as bnb

    monkeypatch.chdir(tmp_path)
    namespace = run_snippet("## Quantized bases (QLoRA-style)", path=API)
    model, merged = namespace["model"], namespace["merged"]
    assert namespace["controller"].launched
    assert (tmp_path / "adapter.safetensors").is_file()
    assert model is merged and all(type(merged[i]) is torch.nn.Linear for i in (0, 2))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())


def test_readme_is_a_front_door_of_at_most_12_kb():
    assert len(README.read_bytes()) <= 12_000


def without_fences(markdown: str) -> str:
    """The text outside fenced code blocks, where a line starting with '#' is a heading."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets GitHub's suffix -1, -2, ..."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", without_fences(markdown), re.M):
        slug = github_slug(heading)
        seen[slug] = seen.get(slug, -1) + 1
    return {slug if i == 0 else f"{slug}-{i}" for slug, count in seen.items() for i in range(count + 1)}


def dangling_links(path: Path) -> list[str]:
    """The relative links in ``path`` whose file, or whose #anchor in a markdown file, does not exist."""
    prose = re.sub(r"`[^`\n]*`", "", without_fences(path.read_text()))  # links in code are not links
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            bad.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            bad.append(target)
    return bad


def test_github_slug_follows_githubs_rules():
    assert github_slug("Quantized bases (QLoRA-style)") == "quantized-bases-qlora-style"
    assert github_slug("The paper's own benchmark in miniature: SmolLM2-135M") == (
        "the-papers-own-benchmark-in-miniature-smollm2-135m"
    )
    assert github_slug("3.1 Step 1: pre-launch") == "31-step-1-pre-launch"
    assert github_slug("`modules_to_save`") == "modules_to_save"


PAGES = [*sorted(ROOT.glob("*.md")), *sorted((ROOT / "docs").glob("*.md"))]  # README.md, docs/API.md, ...


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file_and_heading(path):
    assert dangling_links(path) == []


def test_link_check_finds_a_missing_file_a_missing_heading_and_passes_a_good_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n\n## A section (beta)\n\n## Top\n\n## The `inject` call\n\n"
        "[ok](#a-section-beta) [ok](page.md#top-1) [ok](#the-inject-call) [web](https://example.com)\n"
        "[gone](missing.md) [no heading](page.md#nowhere) [self](#top-2) `[code](code.md)`\n"
        "```python\n# [not a heading](a.md)\nx = a[0](1)\n```\n"
    )
    assert dangling_links(page) == ["missing.md", "page.md#nowhere", "#top-2"]
