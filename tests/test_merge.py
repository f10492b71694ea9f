"""`merge_and_unload`: every adapter folded into its base, the plain base modules back in place.

The headline property: a merged and unloaded model saved with ``save_pretrained`` is an ordinary
checkpoint, loaded by ``from_pretrained`` in a process where lora_dash cannot be imported, with the
same logits as the trained adapted model. Quantized bases are tested in test_quantized.py.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import lora_dash  # noqa: E402
from lora_dash import (  # noqa: E402
    LoRADashLinear,
    dash_layers,
    inject,
    merge_and_unload,
)

from helpers import assert_refused_and_unchanged, train  # noqa: E402

T, EXTRA = 2, 3
VOCAB, SEQ = 64, 12


def tokens(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(step))


def train_across_the_launch(model: nn.Module, loss) -> None:
    """``T`` LoRA steps, the launch, then ``EXTRA`` dash steps, so ``B A ≠ 0`` and ``δ ≠ 0``."""
    train(model, T + EXTRA, launch_step=T, start=0, loss=loss)
    model.eval()
    assert all(layer.launched and layer.dash_delta.abs().min() > 0 for layer in dash_layers(model).values())


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(config)
    torch.manual_seed(1)
    inject(model, r"bert\.encoder\.layer\.\d+\.(attention\.self\.(query|value)|output\.dense)", r=4, alpha=8.0, s=3)
    train_across_the_launch(model, lambda m, step, micro: m(input_ids=tokens(step), labels=torch.arange(4) % 3).loss)
    return model


def gpt2() -> nn.Module:
    """GPT-2's ``Conv1D`` stores ``Wᵀ``; ``c_attn`` is adapted."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config)
    torch.manual_seed(1)
    inject(model, r"transformer\.h\.\d+\.attn\.c_(attn|proj)", r=4, alpha=8.0, s=3)
    train_across_the_launch(model, lambda m, step, micro: m(input_ids=tokens(step), labels=tokens(step)).loss)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens(-1)).logits


LOAD_WITHOUT_LORA_DASH = textwrap.dedent("""
    import json, sys
    sys.modules["lora_dash"] = None  # any import of lora_dash now raises ImportError
    try:
        import lora_dash
    except ImportError:
        pass
    else:
        raise SystemExit("lora_dash is importable")
    import torch, transformers
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(sys.argv[1], output_loading_info=True)
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model.eval()(input_ids=ids).logits, sys.argv[3])
    print(json.dumps({key: sorted(value) for key, value in info.items()}))
""")


@pytest.mark.slow
def test_merged_bert_saved_with_save_pretrained_loads_without_lora_dash_with_the_same_logits(tmp_path):
    model = bert()
    expected = logits(model)
    assert merge_and_unload(model) is model
    assert not dash_layers(model)
    model.save_pretrained(tmp_path / "merged")
    torch.save(tokens(-1), tmp_path / "ids.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_LORA_DASH,
            str(tmp_path / "merged"),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "logits.pt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info  # an ordinary checkpoint
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)


def test_every_base_is_put_back_holding_W_plus_delta_W():
    model = bert()
    layers = dash_layers(model)
    expected = {name: layer.base.weight + layer.delta_weight() for name, layer in layers.items()}
    bases = {name: layer.base for name, layer in layers.items()}
    merge_and_unload(model)
    for name, base in bases.items():
        assert model.get_submodule(name) is base and type(base) is nn.Linear
        torch.testing.assert_close(base.weight, expected[name], rtol=0, atol=1e-6)


def test_conv1d_bases_are_unloaded_with_the_transposed_update_and_the_same_logits():
    model = gpt2()
    expected_logits = logits(model)
    layers = dash_layers(model)
    expected = {name: layer.base.weight + layer.delta_weight().T for name, layer in layers.items()}
    merge_and_unload(model)
    for name, weight in expected.items():
        base = model.get_submodule(name)
        assert isinstance(base, transformers.pytorch_utils.Conv1D)
        torch.testing.assert_close(base.weight, weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), expected_logits, rtol=1e-5, atol=1e-5)


def test_an_already_merged_layer_is_unloaded_as_it_is_not_merged_twice():
    model = bert()
    name, layer = next(iter(dash_layers(model).items()))
    expected = layer.base.weight + layer.delta_weight()
    layer.merge()
    merge_and_unload(model)
    torch.testing.assert_close(model.get_submodule(name).weight, expected, rtol=0, atol=1e-6)


class Tied(nn.Module):
    """One linear registered under two names, applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = self.first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def test_a_tied_module_is_replaced_under_both_names_by_the_same_merged_base():
    torch.manual_seed(0)
    model = Tied()
    base = model.first
    inject(model, "first|second", r=2, alpha=4.0, s=2)
    layer = model.first
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8)
    expected = model(x).detach()
    merge_and_unload(model)
    assert model.first is base and model.second is base
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_a_lone_layer_returns_its_merged_base():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = LoRADashLinear(base, r=2, s=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6)
    expected = layer(x).detach()
    assert merge_and_unload(layer) is base
    torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-6)


def test_a_model_without_lora_dash_layers_is_refused_and_unchanged():
    model = nn.Sequential(nn.Linear(4, 4))
    assert_refused_and_unchanged(lambda: merge_and_unload(model), model, "no LoRA-Dash layers")


def test_merge_and_unload_is_exported_at_the_top_level():
    assert lora_dash.merge_and_unload is merge_and_unload and "merge_and_unload" in lora_dash.__all__
