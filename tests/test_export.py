"""The exact export to plain LoRA (METHOD.md §5, invariant 12) and the PEFT-format writer, without PEFT.

The PEFT oracle itself (loading the files with ``peft``) is in ``test_oracle_peft.py``.
"""

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

from lora_dash import dash_layers, inject
from lora_dash.export import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    LoRAFactors,
    export_lora,
    pad_rank,
    peft_modules_to_save,
    peft_target_modules,
    plain_lora_factors,
    save_peft_adapter,
)

from helpers import (
    IN,
    OUT,
    R,
    S,
    assert_unchanged,
    batch,
    build_adapted,
    build_with_trained_head,
    snapshot,
    train,
)
from oracle_helpers import relative_error
from test_layer import Conv1D

T = 4
RELATIVE = 1e-5  # export parity, relative to the output's largest entry
ALPHA = 5.0  # α/r = 1.25: folding the scaling into B' rounds (a power of two would not)


def trained(model: nn.Module, steps: int) -> nn.Module:
    """``steps`` optimizer steps with the launch after step ``T`` (so ``steps > T`` ends in the dash phase)."""
    train(model, steps, launch_step=T)
    return model


class PlainLoRA(nn.Module):
    """What a LoRA server computes from the export: ``y = base(x) + dropout(x) A'ᵀ B'ᵀ`` (scaling 1)."""

    def __init__(self, layer: nn.Module, factors: LoRAFactors) -> None:
        super().__init__()
        self.base, self.dropout, self.factors = layer.base, layer.dropout, factors

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.dropout(x) @ self.factors.A.T @ self.factors.B.T


def served(model: nn.Module) -> nn.Module:
    """``model`` with every LoRA-Dash layer replaced by ``PlainLoRA`` on its export (shares base layers)."""
    factors = export_lora(model)
    for name, layer in dash_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, PlainLoRA(layer, factors[name]))
    return model


class ConvMLP(nn.Module):
    """GPT-2 layout: ``Conv1D`` layers storing ``Wᵀ``."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(nf=16, nx=IN), Conv1D(nf=OUT, nx=16)
        for conv in (self.c_fc, self.c_proj):
            nn.init.normal_(conv.weight, std=0.3)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(torch.relu(self.c_fc(x)))


def linear_adapted(**kwargs) -> nn.Module:
    """helpers' MLP, LoRA-Dash on fc1..fc3."""
    return build_adapted(alpha=ALPHA, **kwargs)


def conv_adapted() -> ConvMLP:
    torch.manual_seed(0)
    model = ConvMLP()
    inject(model, r"c_fc|c_proj", r=R, alpha=ALPHA, s=S)
    return model


# ------------------------------------------------------------------------- the factors
@pytest.mark.parametrize("steps, rank", [(T - 1, R), (T + 6, R + S)], ids=["pre-launch", "dash"])
def test_factors_have_rank_r_before_launch_and_r_plus_s_after(steps, rank):
    model = trained(linear_adapted(), steps)
    for name, factors in export_lora(model).items():
        layer = dash_layers(model)[name]
        assert factors.A.shape == (rank, layer.in_features) and factors.B.shape == (layer.out_features, rank)
        assert factors.A.dtype == factors.B.dtype == torch.float32


@pytest.mark.parametrize("build", [linear_adapted, conv_adapted], ids=["linear", "conv1d"])
@pytest.mark.parametrize("steps", [T - 1, T + 6], ids=["pre-launch", "dash"])
def test_inv12_factor_product_is_the_layers_delta_weight(build, steps):
    model = trained(build(), steps)
    for name, factors in export_lora(model).items():
        expected = dash_layers(model)[name].delta_weight().detach()
        torch.testing.assert_close(factors.B @ factors.A, expected, atol=1e-6, rtol=0)


def test_factors_stack_lora_and_dash_as_method_section_5_says():
    """``A' = [A ; V_sᵀ]``, ``B' = [(α/r)·B | U_s diag(δ)]``, term by term."""
    layer = dash_layers(trained(linear_adapted(use_rslora=True), T + 6))["fc2"]
    A, B = plain_lora_factors(layer)
    assert torch.equal(A, torch.cat([layer.lora_A, layer.dash_V.T]).detach())
    assert torch.equal(B[:, :R], (layer.scaling * layer.lora_B).detach())
    assert torch.equal(B[:, R:], (layer.dash_U * layer.dash_delta).detach())


@pytest.mark.parametrize("build", [linear_adapted, conv_adapted], ids=["linear", "conv1d"])
@pytest.mark.parametrize("steps", [T - 1, T + 6], ids=["pre-launch", "dash"])
def test_inv12_plain_lora_forward_of_the_export_reproduces_the_outputs(build, steps):
    model = trained(build(), steps).eval()
    x = batch(-1)[0]
    with torch.no_grad():
        expected = model(x)
        assert relative_error(served(model)(x), expected) <= RELATIVE


def test_export_is_exact_in_training_with_dropout_because_both_branches_share_one_mask():
    model = trained(linear_adapted(dropout=0.3), T + 6).train()
    x = batch(-1)[0]
    with torch.no_grad():
        torch.manual_seed(5)
        expected = model(x)
        torch.manual_seed(5)
        assert relative_error(served(model)(x), expected) <= RELATIVE


def test_factors_are_float32_for_a_bfloat16_layer_and_match_its_update():
    model = trained(linear_adapted(), T + 6).to(torch.bfloat16)
    for name, factors in export_lora(model).items():
        layer = dash_layers(model)[name]
        assert factors.A.dtype == torch.float32
        torch.testing.assert_close(factors.B @ factors.A, layer.delta_weight(), atol=1e-6, rtol=0)


def test_export_changes_nothing_and_ignores_merging():
    model = trained(linear_adapted(), T + 6)
    before = snapshot(model)
    factors = export_lora(model)
    assert_unchanged(model, before)
    for layer in dash_layers(model).values():
        layer.merge()
    for name, merged in export_lora(model).items():
        assert torch.equal(merged.A, factors[name].A) and torch.equal(merged.B, factors[name].B)


def test_non_finite_adapter_is_refused_naming_the_layer():
    model = trained(linear_adapted(), T + 2)
    with torch.no_grad():
        dash_layers(model)["fc2"].dash_delta[0] = float("nan")
    with pytest.raises(ValueError, match="'fc2'.*not finite"):
        export_lora(model)


def test_model_without_adapters_is_refused():
    with pytest.raises(ValueError, match="no LoRA-Dash layers"):
        export_lora(nn.Linear(3, 3))


def test_padding_with_zero_rank_keeps_the_product():
    factors = plain_lora_factors(dash_layers(trained(linear_adapted(), T + 2))["fc1"])
    padded = pad_rank(factors, R + S + 5)
    assert padded.A.shape[0] == padded.B.shape[1] == R + S + 5
    assert not padded.A[R + S :].any() and not padded.B[:, R + S :].any()
    assert torch.equal(padded.B @ padded.A, factors.B @ factors.A)
    with pytest.raises(ValueError, match="cannot pad"):
        pad_rank(factors, R)


# ------------------------------------------------------------------------- the writer
needs_safetensors = pytest.mark.skipif(
    importlib.util.find_spec("safetensors") is None, reason="the writer needs safetensors (the oracle extra)"
)


def read_adapter(directory) -> tuple[dict[str, Tensor], dict, dict]:
    import safetensors
    from safetensors.torch import load_file

    with safetensors.safe_open(str(directory / WEIGHTS_NAME), "pt") as handle:
        metadata = handle.metadata()
    return load_file(str(directory / WEIGHTS_NAME)), json.loads((directory / CONFIG_NAME).read_text()), metadata


@needs_safetensors
def test_writer_uses_peft_key_names_rank_and_scaling_one(tmp_path):
    model = trained(linear_adapted(), T + 3)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="toy/mlp")
    tensors, config, metadata = read_adapter(tmp_path / "adapter")
    factors = export_lora(model)
    assert set(tensors) == {f"base_model.model.{name}.lora_{ab}.weight" for name in factors for ab in "AB"}
    for name, layer_factors in factors.items():
        assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], layer_factors.A)
        assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], layer_factors.B)
    assert metadata == {"format": "pt"}
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == R + S
    assert config["target_modules"] == ["fc1", "fc2", "fc3"]
    assert config["fan_in_fan_out"] is False and config["use_rslora"] is False
    assert config["base_model_name_or_path"] == "toy/mlp" and config["lora_dropout"] == 0.0


@needs_safetensors
def test_writer_sets_fan_in_fan_out_for_conv1d(tmp_path):
    save_peft_adapter(trained(conv_adapted(), T + 3), tmp_path)
    assert read_adapter(tmp_path)[1]["fan_in_fan_out"] is True


@needs_safetensors
def test_writer_pads_layers_of_different_rank_to_the_largest(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    inject(model, "0", r=2, s=1)
    inject(model, "2", r=5, s=3)
    dash_layers(model)["0"].launch()  # phases may differ too: "0" has rank 3, "2" rank 5
    save_peft_adapter(model, tmp_path)
    tensors, config, _ = read_adapter(tmp_path)
    assert config["r"] == config["lora_alpha"] == 5 and config["rank_pattern"] == {}
    for name, factors in export_lora(model).items():
        A, B = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
        assert A.shape[0] == B.shape[1] == 5
        torch.testing.assert_close(B @ A, factors.B @ factors.A, atol=0, rtol=0)


def test_target_modules_are_a_list_of_names_unless_a_suffix_is_ambiguous():
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    inject(flat, "0", r=2, s=1)
    assert peft_target_modules(flat, ["0"]) == ["0"]
    nested = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))  # "1.0" ends with ".0"
    inject(nested, r"0|1\.0", r=2, s=1)
    assert peft_target_modules(nested, ["0", "1.0"]) == ["0", "1.0"]  # both adapted: the list is exact
    nested = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
    inject(nested, "0", r=2, s=1)
    assert peft_target_modules(nested, ["0"]) == "0"  # a regex PEFT fullmatches: only "0" itself


@needs_safetensors
def test_writer_refuses_layers_with_different_dropout_and_writes_nothing(tmp_path):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    inject(model, "0", r=2, s=1, dropout=0.1)
    inject(model, "2", r=2, s=1)
    with pytest.raises(ValueError, match="one lora_dropout"):
        save_peft_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@needs_safetensors
def test_writer_carries_a_head_in_peft_modules_to_save_layout(tmp_path):
    model = trained(build_with_trained_head(), T + 3)
    save_peft_adapter(model, tmp_path)
    tensors, config, _ = read_adapter(tmp_path)
    assert config["modules_to_save"] == ["fc3"] and config["target_modules"] == ["fc1", "fc2"]
    assert {k for k in tensors if "lora_" not in k} == {"base_model.model.fc3.weight", "base_model.model.fc3.bias"}
    assert torch.equal(tensors["base_model.model.fc3.weight"], model.fc3.weight)
    assert torch.equal(tensors["base_model.model.fc3.bias"], model.fc3.bias)


class Heads(nn.Module):
    """Names PEFT's suffix rule confuses: ``head`` ends ``lm_head``; ``A`` ends ``fc.lora_A`` once PEFT adapts
    ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head, self.lm_head, self.A = nn.Linear(6, 6), nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)


@pytest.mark.parametrize("saved, clash", [("head", "lm_head"), ("A", "fc.lora_A")])
def test_writer_refuses_a_module_to_save_whose_name_peft_would_also_match_elsewhere_and_writes_nothing(
    saved, clash, tmp_path
):
    model = Heads()
    inject(model, ["fc"], r=2, s=1, modules_to_save=[saved])  # exact for inject: a dot before a suffix
    with pytest.raises(ValueError, match=re.escape(f"{{'{saved}': ['{clash}'")):
        save_peft_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_modules_to_save_are_the_full_names_when_no_other_name_ends_with_them():
    model = Heads()
    inject(model, ["fc"], r=2, s=1, modules_to_save=["lm_head"])
    assert peft_modules_to_save(model) == ["lm_head"]
    assert peft_modules_to_save(build_adapted()) is None


def test_writer_without_safetensors_names_what_to_install_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        save_peft_adapter(trained(linear_adapted(), 1), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_importing_the_library_and_export_loads_no_peft_safetensors_or_transformers():
    code = (
        "import sys, lora_dash, lora_dash.export\n"
        "print(sorted(m for m in ('peft', 'safetensors', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
