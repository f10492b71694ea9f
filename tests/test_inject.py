"""`inject`: regex and list targeting on dotted names, in-place replacement, freezing, modules that train
in full, and strict validation."""

import re

import pytest
import torch
from torch import nn

from lora_dash import LoRADashLinear, adapter_parameters, dash_layers, inject, trained_modules

from helpers import assert_refused_and_unchanged, assert_unchanged, build_base, snapshot


class Encoder(nn.Module):
    """Names with shared prefixes (``query`` / ``query_proj``) and modules LoRA-Dash cannot wrap."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"query": nn.Linear(8, 8), "query_proj": nn.Linear(8, 6)}) for _ in range(2)
        )
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
    assert_refused_and_unchanged(lambda: inject(model, regex, r=2, s=2), model, "matches no module")


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
    assert_refused_and_unchanged(lambda: inject(model, r"b\.base", r=2, s=2), model, re.escape("'b.base'"))


def test_tied_module_matched_under_only_one_name_is_rejected_and_model_unchanged():
    # Wrapping `a` alone would leave `b` calling the bare layer, silently bypassing the adapter.
    model = nn.Module()
    model.a = model.b = nn.Linear(6, 5)
    assert_refused_and_unchanged(lambda: inject(model, "a", r=2, s=2), model, re.escape("['b']"))


# ------------------------------------------------------------------------------ bad input
def test_regex_matching_no_layer_is_rejected_and_model_unchanged():
    model = build_base()
    assert_refused_and_unchanged(lambda: inject(model, "q_proj", r=2, s=2), model, re.escape("'q_proj'"))


def test_invalid_regex_is_rejected_and_model_unchanged():
    model = build_base()
    assert_refused_and_unchanged(lambda: inject(model, "fc(1", r=2, s=2), model, re.escape("'fc(1'"))


@pytest.mark.parametrize("bad", ["act", "block", "conv", "norm"])
def test_match_that_is_not_a_linear_is_rejected_and_model_unchanged(bad):
    # `head` is a valid match too: it must not be replaced when another match is refused.
    model = Encoder()
    assert_refused_and_unchanged(lambda: inject(model, f"head|{bad}", r=2, s=2), model, re.escape(f"'{bad}'"))


@pytest.mark.parametrize("regex", ["fc1", r"fc1\.base", r"fc1(\.base)?"])
def test_injecting_twice_is_rejected_and_model_unchanged(regex):
    model = build_base()
    inject(model, "fc1", r=2, s=2)
    assert_refused_and_unchanged(lambda: inject(model, regex, r=2, s=2), model, "already adapted")


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


# ------------------------------------------------------------------------- targets as a list
@pytest.mark.parametrize(
    "targets, expected",
    [
        (["query"], {"layers.0.query", "layers.1.query"}),  # a suffix after a dot: not `query_proj`
        (["layers.1.query", "head"], {"layers.1.query", "head"}),  # whole names
        (("0.query_proj", "block.0"), {"layers.0.query_proj", "block.0"}),  # a tuple
        ({"query_proj"}, {"layers.0.query_proj", "layers.1.query_proj"}),
    ],
    ids=["suffix", "full-names", "tuple", "set"],
)
def test_list_targets_select_names_equal_to_or_ending_in_dot_plus_an_entry(targets, expected):
    model = Encoder()
    assert set(inject(model, targets, r=2, s=2)) == expected
    assert set(dash_layers(model)) == expected


@pytest.mark.parametrize("targets", [["uery"], ["layers.0.quer"], ["q_proj", "v_proj"]])
def test_list_whose_entries_are_no_dotted_suffix_matches_nothing_and_model_unchanged(targets):
    model = Encoder()
    assert_refused_and_unchanged(
        lambda: inject(model, targets, r=2, s=2), model, re.escape(f"targets {targets!r} matches no module")
    )


def test_a_list_entry_that_matches_nothing_is_warned_about_once_by_name_and_the_others_are_adapted():
    model = Encoder()
    with pytest.warns(UserWarning) as caught:
        injected = inject(model, ["query", "haed", "blok.0"], r=2, s=2)
    assert len(caught) == 1
    assert str(caught[0].message) == "targets: ['haed', 'blok.0'] match no module; the other entries do"
    assert caught[0].filename == __file__  # points at the caller's line, not into the library
    assert set(injected) == set(dash_layers(model)) == {"layers.0.query", "layers.1.query"}


def test_a_modules_to_save_entry_that_matches_nothing_is_warned_about_and_the_others_train():
    model = Encoder()
    with pytest.warns(UserWarning, match=re.escape("modules_to_save: ['haed']")):
        inject(model, ["query"], r=2, s=2, modules_to_save=["head", "haed"])
    assert set(trained_modules(model)) == {"head"}


@pytest.mark.parametrize("targets", [["query", "head"], r"layers\.\d+\.query|nothing_by_this_name"])
def test_targets_whose_every_entry_matches_or_a_regex_warn_nothing(targets, recwarn):
    inject(Encoder(), targets, r=2, s=2)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("bad", ["act", "block", "conv", "norm"])
def test_list_match_that_is_not_a_linear_is_rejected_and_model_unchanged(bad):
    model = Encoder()
    assert_refused_and_unchanged(lambda: inject(model, ["head", bad], r=2, s=2), model, re.escape(f"'{bad}'"))


@pytest.mark.parametrize("targets", [[], ["fc1", 3], [""], 7, None, {"fc1": 1}])
def test_targets_that_are_neither_a_regex_nor_a_list_of_names_are_rejected_and_model_unchanged(targets):
    model = build_base()
    assert_refused_and_unchanged(
        lambda: inject(model, targets, r=2, s=2), model, "regex string or a non-empty list of module names"
    )


# -------------------------------------------------------------------- modules that train in full
def test_modules_to_save_train_in_full_and_everything_else_stays_frozen():
    model = Encoder()
    keys_before = set(model.state_dict())
    inject(model, ["query"], r=2, s=2, modules_to_save=["head", "norm"])
    assert set(trained_modules(model)) == {"head", "norm"}
    trainable = {id(p) for p in adapter_parameters(model)}
    assert trainable == {id(p) for p in (*model.head.parameters(), *model.norm.parameters())} | {
        id(p) for layer in dash_layers(model).values() for p in layer.adapter_parameters()
    }
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in trainable), name
    # A mark, not a wrapper: the trained modules keep their names and keys.
    assert type(model.head) is nn.Linear and type(model.norm) is nn.LayerNorm
    assert {k for k in model.state_dict() if not k.startswith("layers.")} == {
        k for k in keys_before if not k.startswith("layers.")
    }


def test_modules_to_save_as_a_regex_fullmatch_names():
    model = Encoder()
    inject(model, ["query"], r=2, s=2, modules_to_save=r"layers\.\d\.query_proj")
    assert set(trained_modules(model)) == {"layers.0.query_proj", "layers.1.query_proj"}


def test_modules_trained_in_full_stay_trainable_after_a_later_injection():
    model = build_base()
    inject(model, "fc1", r=2, s=2, modules_to_save=["fc3"])
    inject(model, "fc2", r=2, s=2)  # freezes the model again; fc3 must train on
    assert set(trained_modules(model)) == {"fc3"}
    assert all(p.requires_grad for p in model.fc3.parameters())


def tied_weight_model() -> nn.Module:
    """``head.weight`` is ``proj.weight``: two modules, one parameter."""
    model = nn.Module()
    model.proj = nn.Linear(6, 6)
    model.head = nn.Linear(6, 6)
    model.head.weight = model.proj.weight
    return model


BAD_MODULES_TO_SAVE = {
    "also-a-target": (Encoder, {"targets": ["head"], "modules_to_save": ["head"]}, "'head' trains in full"),
    "contains-a-target": (Encoder, {"targets": ["query"], "modules_to_save": ["layers.0"]}, "'layers.0'"),
    "shares-a-parameter": (tied_weight_model, {"targets": "proj", "modules_to_save": "head"}, "shares a parameter"),
    "matches-nothing": (
        Encoder,
        {"targets": ["query"], "modules_to_save": ["classifier"]},
        re.escape("modules_to_save ['classifier'] matches no module"),
    ),
    "inside-another": (
        Encoder,
        {"targets": ["query"], "modules_to_save": r"block|block\.0"},
        re.escape("['block.0'] lie inside 'block'"),
    ),
    "invalid-regex": (Encoder, {"targets": ["query"], "modules_to_save": "head("}, "invalid modules_to_save regex"),
    "not-names": (Encoder, {"targets": ["query"], "modules_to_save": [1]}, "modules_to_save must be"),
}


@pytest.mark.parametrize("build, kwargs, match", BAD_MODULES_TO_SAVE.values(), ids=BAD_MODULES_TO_SAVE.keys())
def test_bad_modules_to_save_are_rejected_and_model_unchanged(build, kwargs, match):
    model = build()
    assert_refused_and_unchanged(
        lambda: inject(model, kwargs["targets"], r=2, s=2, modules_to_save=kwargs["modules_to_save"]), model, match
    )
    assert not trained_modules(model)


@pytest.mark.parametrize("inside", ["fc1.base", "fc1.dropout"])
def test_module_to_save_inside_an_adapted_layer_is_rejected_and_model_unchanged(inside):
    model = build_base()
    inject(model, "fc1", r=2, s=2)
    assert_refused_and_unchanged(
        lambda: inject(model, "fc2", r=2, s=2, modules_to_save=[inside]), model, re.escape(f"'{inside}' trains in full")
    )


def test_adapting_a_module_that_trains_in_full_is_rejected_later_too():
    model = build_base()
    inject(model, "fc1", r=2, s=2, modules_to_save=["fc3"])
    assert_refused_and_unchanged(lambda: inject(model, "fc3", r=2, s=2), model, "'fc3' trains in full")


def test_the_mark_survives_a_deep_copy_and_is_not_state():
    import copy

    model = build_base()
    inject(model, "fc1", r=2, s=2, modules_to_save=["fc3"])
    assert set(trained_modules(copy.deepcopy(model))) == {"fc3"}
    fresh = build_base()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc1.")}, strict=False)
    assert not trained_modules(fresh)  # a mark set by inject, not by loading weights
    assert torch.equal(fresh.fc3.weight, model.fc3.weight)
