"""`inject`: regex targeting on dotted names, in-place replacement, freezing, and strict validation."""

import re

import pytest
from torch import nn

from helpers import assert_unchanged, build_base, snapshot
from lora_dash import LoRADashLinear, adapter_parameters, dash_layers, inject


class Encoder(nn.Module):
    """Names with shared prefixes (``query`` / ``query_proj``) and modules LoRA-Dash cannot wrap."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"query": nn.Linear(8, 8), "query_proj": nn.Linear(8, 6)})
                                    for _ in range(2))
        self.norm = nn.LayerNorm(8)
        self.act = nn.ReLU()
        self.block = nn.Sequential(nn.Linear(8, 8))
        self.conv = nn.Conv2d(2, 4, kernel_size=3)
        self.head = nn.Linear(8, 4)


def test_fullmatch_selects_exactly_the_named_layers():
    model = Encoder()
    injected = inject(model, r"layers\.\d+\.query", r=2, s=2)
    # `layers.0.query_proj` starts with the pattern's match but is not fully matched.
    assert set(injected) == {"layers.0.query", "layers.1.query"}
    assert set(dash_layers(model)) == {"layers.0.query", "layers.1.query"}
    assert type(model.layers[0]["query_proj"]) is nn.Linear


@pytest.mark.parametrize("regex", ["fc", "c1", "c", r"fc1\.", r"fc\d\d"])
def test_prefix_or_substring_of_a_name_matches_nothing(regex):
    model = build_base()
    before = snapshot(model)
    with pytest.raises(ValueError, match="matches no module"):
        inject(model, regex, r=2, s=2)
    assert_unchanged(model, before)


def test_layers_are_replaced_in_place_and_wrap_the_original_module():
    model = build_base()
    originals = {"fc1": model.fc1, "fc3": model.fc3}
    injected = inject(model, r"fc1|fc3", r=2, s=2)
    assert set(injected) == set(originals)
    for name, layer in injected.items():
        assert isinstance(layer, LoRADashLinear)
        assert model.get_submodule(name) is layer
        assert layer.base is originals[name]  # the same object, not a copy
    assert type(model.fc2) is nn.Linear


def test_every_parameter_but_the_adapters_is_frozen():
    model = Encoder()
    inject(model, r"layers\.0\.query|head", r=2, s=2)
    adapter_ids = {id(p) for p in adapter_parameters(model)}
    assert len(adapter_ids) == 2 * 3  # A, B, δ per injected layer
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in adapter_ids), name


def test_adapters_of_an_earlier_injection_stay_trainable():
    model = build_base()
    inject(model, "fc1", r=2, s=2)
    inject(model, "fc2", r=2, s=2)  # freezes the model again; fc1's adapter must survive that
    assert all(p.requires_grad for p in adapter_parameters(model))
    assert len(adapter_parameters(model)) == 2 * 3


def test_tied_module_gets_one_wrapper():
    model = nn.Module()
    model.a = model.b = nn.Linear(6, 5)
    injected = inject(model, "a|b", r=2, s=2)
    assert injected["a"] is injected["b"] is model.a is model.b
    assert len(dash_layers(model)) == 1


def test_linear_inside_a_tied_wrapper_cannot_be_adapted_under_its_second_name():
    # `b.base` is the same module as `a.base`: already inside a LoRA-Dash layer, so refused.
    model = nn.Module()
    model.a = model.b = nn.Linear(6, 5)
    inject(model, "a|b", r=2, s=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape("'b.base'")):
        inject(model, r"b\.base", r=2, s=2)
    assert_unchanged(model, before)


def test_tied_module_matched_under_only_one_name_is_rejected_and_model_unchanged():
    # Wrapping `a` alone would leave `b` calling the bare layer, silently bypassing the adapter.
    model = nn.Module()
    model.a = model.b = nn.Linear(6, 5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape("['b']")):
        inject(model, "a", r=2, s=2)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------ bad input
def test_regex_matching_no_layer_is_rejected_and_model_unchanged():
    model = build_base()
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape("'q_proj'")):
        inject(model, "q_proj", r=2, s=2)
    assert_unchanged(model, before)


def test_invalid_regex_is_rejected_and_model_unchanged():
    model = build_base()
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape("'fc(1'")):
        inject(model, "fc(1", r=2, s=2)
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad", ["act", "block", "conv", "norm"])
def test_match_that_is_not_a_linear_is_rejected_and_model_unchanged(bad):
    # `head` is a valid match too: it must not be replaced when another match is refused.
    model = Encoder()
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(f"'{bad}'")):
        inject(model, f"head|{bad}", r=2, s=2)
    assert_unchanged(model, before)


@pytest.mark.parametrize("regex", ["fc1", r"fc1\.base", r"fc1(\.base)?"])
def test_injecting_twice_is_rejected_and_model_unchanged(regex):
    model = build_base()
    inject(model, "fc1", r=2, s=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already adapted"):
        inject(model, regex, r=2, s=2)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"r": 0}, "r must be"),
        ({"r": -3}, "r must be"),
        ({"s": 0}, "s must be"),
        ({"s": -1}, "s must be"),
        ({"dropout": -0.1}, "dropout must be"),
    ],
)
def test_invalid_hyperparameter_is_rejected_and_model_unchanged(kwargs, shown):
    model = build_base()
    before = snapshot(model)
    (value,) = kwargs.values()
    with pytest.raises(ValueError, match=re.escape(shown)) as error:
        inject(model, r"fc\d", **{"r": 2, "s": 2, **kwargs})
    assert repr(value) in str(error.value)
    assert "'fc1'" in str(error.value)  # names the first offending module
    assert_unchanged(model, before)


def test_s_larger_than_one_layers_rank_rejects_every_layer():
    # min(in, out) is 12 for fc1, 16 for fc2, 10 for fc3: s = 11 only fits fc1 and fc2.
    model = build_base()
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape("'fc3'")) as error:
        inject(model, r"fc\d", r=2, s=11)
    assert "11" in str(error.value)
    assert_unchanged(model, before)
    assert not dash_layers(model)

