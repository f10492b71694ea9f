"""The README's snippets run as written and do what they say."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def run_snippet(after: str) -> dict:
    """Execute the first ```python block that follows the text ``after`` in the README; return its namespace."""
    text = README.read_text()
    block = re.compile(r"```python\n(.*?)```", re.S).search(text, text.index(after)).group(1)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
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
    code = (
        "import sys, torch; sys.modules['lora_dash'] = None\n"
        "from transformers import BertForSequenceClassification\n"
        f"model = BertForSequenceClassification.from_pretrained({str(tmp_path / 'merged')!r}).eval()\n"
        f"torch.save(model(input_ids=torch.tensor({probe.tolist()})).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), trained, rtol=1e-5, atol=1e-6)


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
    namespace = run_snippet("**Quantized bases (QLoRA-style).**")
    model, merged = namespace["model"], namespace["merged"]
    assert namespace["controller"].launched
    assert (tmp_path / "adapter.safetensors").is_file()
    assert model is merged and all(type(merged[i]) is torch.nn.Linear for i in (0, 2))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
