"""Helpers shared by the oracle tests. Importing this module needs neither PEFT nor transformers;
the PEFT helpers skip the calling test when PEFT is missing."""

import warnings

import pytest
from torch import Tensor, nn


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|``: the error relative to the output's largest entry."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def load_into_peft(base: nn.Module, directory) -> nn.Module:
    """``PeftModel.from_pretrained(base, directory)`` in eval mode, failing on PEFT's missing-key
    warning (PEFT warns, it does not raise)."""
    peft = pytest.importorskip("peft")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(directory))
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert not missing, missing
    return model.eval()


def peft_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's LoRA layers, by the name of the module they wrap in the user's model."""
    peft = pytest.importorskip("peft")

    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
