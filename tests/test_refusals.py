"""``lora_dash.refusals``: PEFT nested with LoRA-Dash, PEFT adapters before ``inject``, frozen adapters and
optimizers that hold none; each refused with a message that names the fix, the model left as it was.
(Through TRL's SFTTrainer: tests/test_trl.py.)"""

import subprocess
import sys

import pytest
import torch

from lora_dash import adapter_parameters, dash_layers
from lora_dash.layer import LoRADashLinear
from lora_dash.refusals import (
    check_adapters_trainable,
    check_no_peft_adapters,
    check_not_wrapped_by_peft,
    peft_tuner_layers,
)

from helpers import assert_refused_and_unchanged, build_adapted, build_base

peft = pytest.importorskip("peft")


def peft_lora(model, targets: list[str]):
    """PEFT's LoRA put into ``model`` in place, as ``get_peft_model`` and a trainer's ``peft_config`` do."""
    return peft.inject_adapter_in_model(peft.LoraConfig(target_modules=targets, r=2), model)


def test_a_lora_dash_model_and_a_plain_one_pass():
    for model in (build_adapted(), build_base()):
        check_not_wrapped_by_peft(model)
        check_no_peft_adapters(model)
        check_adapters_trainable(model)


def test_peft_lora_inside_lora_dash_layers_is_refused_naming_the_fix():
    model = peft_lora(build_adapted(), ["base"])  # "fc1.base" ...: the nn.Linear inside each LoRADashLinear
    assert set(peft_tuner_layers(model)) == {"fc1.base", "fc2.base", "fc3.base"}
    assert_refused_and_unchanged(
        lambda: check_not_wrapped_by_peft(model),
        model,
        r"PEFT has wrapped the linear layer inside 3 LoRA-Dash layers \(first: 'fc1'\).*drop `peft_config`",
    )


def test_lora_dash_inside_peft_tuner_layers_is_refused():
    model = peft_lora(build_base(), ["fc2"])
    model.fc2.base_layer = LoRADashLinear(model.fc2.base_layer, r=2, s=2)
    assert_refused_and_unchanged(
        lambda: check_not_wrapped_by_peft(model),
        model,
        r"1 PEFT tuner layers \(first: 'fc2'\) hold LoRA-Dash layers",
    )


def test_a_model_peft_has_adapted_is_refused_for_inject():
    model = peft_lora(build_base(), ["fc1", "fc3"])
    with pytest.raises(ValueError, match=r"already holds 2 PEFT tuner layers \(first: 'fc1'\).*merge_and_unload"):
        check_no_peft_adapters(model)


def test_without_peft_imported_nothing_is_a_tuner_layer(monkeypatch):
    model = peft_lora(build_base(), ["fc1"])
    monkeypatch.delitem(sys.modules, "peft.tuners.tuners_utils")
    assert peft_tuner_layers(model) == {}


@pytest.mark.slow  # a fresh interpreter: seconds to import torch
def test_importing_the_refusals_imports_neither_peft_nor_transformers():
    code = "import sys, lora_dash.refusals; print(sorted({'peft', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert result.stdout.strip() == "[]"


def test_a_layer_whose_adapters_are_all_frozen_is_refused():
    model = build_adapted()
    for p in dash_layers(model)["fc2"].adapter_parameters():
        p.requires_grad_(False)
    assert_refused_and_unchanged(
        lambda: check_adapters_trainable(model),
        model,
        r"A, B and δ of 1 LoRA-Dash layers \(first: 'fc2'\) are frozen.*lora_dash.adapter_parameters\(model\)",
    )


def test_a_layer_frozen_in_part_passes():
    model = build_adapted()  # δ alone trains, as after the launch in a dash-only run
    for layer in dash_layers(model).values():
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)
    check_adapters_trainable(model)


def test_an_optimizer_that_holds_no_adapter_is_refused_and_one_that_holds_some_passes():
    model = build_adapted()
    other = torch.optim.AdamW(build_base().parameters())
    assert_refused_and_unchanged(
        lambda: check_adapters_trainable(model, [other]),
        model,
        r"the optimizer holds none of the A, B, δ of the model's 3 LoRA-Dash layers.*adapter_parameters\(model\)",
    )
    check_adapters_trainable(model, [torch.optim.AdamW(adapter_parameters(model))])
    check_adapters_trainable(model, [other, torch.optim.SGD([dash_layers(model)["fc1"].lora_A], lr=0.1)])


def test_an_optimizer_wrapper_is_read_through_its_param_groups():
    model = build_adapted()

    class Wrapper:  # what accelerate's AcceleratedOptimizer exposes
        def __init__(self, optimizer):
            self.optimizer = optimizer
            self.param_groups = optimizer.param_groups

    check_adapters_trainable(model, [Wrapper(torch.optim.AdamW(adapter_parameters(model)))])
    with pytest.raises(ValueError, match="holds none"):
        check_adapters_trainable(model, [Wrapper(torch.optim.AdamW(build_base().parameters()))])
