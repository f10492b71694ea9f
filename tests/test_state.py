"""Adapter state: resume is exact (invariant 14), loading is strict, saving copies."""

import math
import re
import warnings

import pytest
import torch

from lora_dash import (
    LaunchController,
    adapter_param_groups,
    adapter_parameters,
    adapter_state_dict,
    count_trainable_parameters,
    dash_layers,
    inject,
    load_adapter_state_dict,
    trained_module_state_dict,
)
from lora_dash.state import LAYER_STATE_KEYS

from helpers import (
    OUT,
    R,
    S,
    assert_refused_and_unchanged,
    batch,
    build_adapted,
    build_base,
    build_with_trained_head,
    make_optimizer,
    train,
)

T = 4  # launch step
TOTAL = T + 8


def train_steps(model, optimizer, start, stop):
    """Optimizer steps ``start .. stop`` (inclusive), two micro-batches each; the controller counts them."""
    train(model, stop - start + 1, optimizer=optimizer, start=start, accumulation=2)


def fresh_run(init_seed=1):
    model = build_adapted(init_seed=init_seed)
    optimizer, controller = train(model, 0, launch_step=T)
    return model, optimizer, controller


def trained_state(steps, init_seed=1):
    """The adapter state after ``steps`` optimizer steps (launched iff ``steps >= T``)."""
    model, optimizer, _ = fresh_run(init_seed)
    train_steps(model, optimizer, 1, steps)
    return adapter_state_dict(model)


# ------------------------------------------------------------------ invariant 14: resume
@pytest.mark.parametrize("save_at", [2, T, T + 3], ids=["pre-launch", "at-launch", "dash"])
def test_resume_from_checkpoint_is_bit_identical_to_an_uninterrupted_run(save_at, tmp_path):
    model, optimizer, controller = fresh_run()
    train_steps(model, optimizer, 1, TOTAL)
    uninterrupted = adapter_state_dict(model)

    model, optimizer, controller = fresh_run()
    train_steps(model, optimizer, 1, save_at)
    torch.save(
        {
            "adapter": adapter_state_dict(model),
            "controller": controller.state_dict(),
            "optimizer": optimizer.state_dict(),
        },
        tmp_path / "checkpoint.pt",
    )
    del model, optimizer, controller

    checkpoint = torch.load(tmp_path / "checkpoint.pt")
    model = build_adapted(init_seed=2)  # another A init: everything must come from the checkpoint
    assert not torch.equal(model.fc1.lora_A, checkpoint["adapter"]["fc1.lora_A"])
    load_adapter_state_dict(model, checkpoint["adapter"])
    optimizer = make_optimizer(model)
    optimizer.load_state_dict(checkpoint["optimizer"])
    controller = LaunchController(model, launch_step=T).attach(optimizer)
    controller.load_state_dict(checkpoint["controller"])
    train_steps(model, optimizer, save_at + 1, TOTAL)

    resumed = adapter_state_dict(model)
    assert controller.steps == TOTAL and controller.launched
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


def test_loaded_adapter_reproduces_the_outputs_of_the_saved_model():
    model, optimizer, _ = fresh_run()
    train_steps(model, optimizer, 1, T + 2)
    other = build_adapted(init_seed=3)
    load_adapter_state_dict(other, adapter_state_dict(model))
    probe = batch(-3, size=16)[0]
    with torch.no_grad():
        assert torch.equal(other(probe), model(probe))


# ------------------------------------------------------------------------- saving
def test_adapter_state_dict_holds_exactly_the_layer_state_keys():
    model = build_adapted()
    expected = {f"{name}.{key}" for name in dash_layers(model) for key in LAYER_STATE_KEYS}
    assert set(adapter_state_dict(model)) == expected
    assert len(expected) == 3 * len(LAYER_STATE_KEYS)


def test_adapter_state_dict_is_a_copy_that_later_training_does_not_change():
    model, optimizer, _ = fresh_run()
    train_steps(model, optimizer, 1, 2)
    saved = adapter_state_dict(model)
    reference = {key: value.clone() for key, value in saved.items()}
    train_steps(model, optimizer, 3, T + 2)  # across the launch: every saved tensor changes in the model
    now = adapter_state_dict(model)
    assert all(not torch.equal(now[key], reference[key]) for key in reference)
    for key, value in reference.items():
        assert torch.equal(saved[key], value), key


# ----------------------------------------------------------------------- bad loads
def missing(state):
    del state["fc2.lora_B"]
    return "fc2.lora_B"


def unexpected(state):
    state["fc4.lora_A"] = torch.zeros(R, 3)
    return "fc4.lora_A"


def wrong_shape(state):
    state["fc1.lora_A"] = torch.zeros(R + 1, state["fc1.lora_A"].shape[1])
    return "fc1.lora_A"


def transposed(state):
    state["fc3.lora_B"] = state["fc3.lora_B"].T.contiguous()
    return "fc3.lora_B"


def not_a_tensor(state):
    state["fc3.dash_delta"] = state["fc3.dash_delta"].tolist()
    return "fc3.dash_delta"


def index_out_of_range(state):
    state["fc3.dash_index"][0] = OUT  # k = min(in, out) of fc3 (16 → 10): one past the last index
    return "fc3.dash_index"


def index_negative(state):
    state["fc3.dash_index"][1] = -1
    return "fc3.dash_index"


def index_repeated(state):
    state["fc3.dash_index"][2] = state["fc3.dash_index"][0]
    return "fc3.dash_index"


@pytest.mark.parametrize(
    "corrupt",
    [missing, unexpected, wrong_shape, transposed, not_a_tensor, index_out_of_range, index_negative, index_repeated],
)
@pytest.mark.parametrize("target_launched", [False, True], ids=["into-pre-launch", "into-launched"])
def test_bad_adapter_state_is_rejected_naming_the_key_and_model_unchanged(corrupt, target_launched):
    state = trained_state(T + 2)
    key = corrupt(state)
    target = build_adapted(init_seed=3)
    if target_launched:
        LaunchController(target, launch_step=0)
    assert_refused_and_unchanged(lambda: load_adapter_state_dict(target, state), target, re.escape(repr(key)))


def test_adapter_state_mixing_launched_and_pre_launch_layers_is_rejected():
    # fc2 is a valid pre-launch layer and fc1, fc3 valid launched ones: only the mix is wrong.
    state = trained_state(T + 2)
    pre_launch = trained_state(2)
    for key in LAYER_STATE_KEYS:
        state[f"fc2.{key}"] = pre_launch[f"fc2.{key}"]
    target = build_adapted(init_seed=3)
    assert_refused_and_unchanged(lambda: load_adapter_state_dict(target, state), target, "'fc2'")


def test_pre_launch_adapter_state_with_a_non_zero_dash_is_rejected():
    state = trained_state(2)
    state["fc1.dash_delta"][0] = 0.25  # δ cannot move before launch
    target = build_adapted(init_seed=3)
    assert_refused_and_unchanged(lambda: load_adapter_state_dict(target, state), target, "'fc1'")


def test_loading_into_a_merged_layer_is_refused_and_model_unchanged():
    state = trained_state(T + 2)
    target = build_adapted(init_seed=3)
    LaunchController(target, launch_step=0)
    target.fc2.merge()
    assert_refused_and_unchanged(lambda: load_adapter_state_dict(target, state), target, "'fc2'", error=RuntimeError)


# ------------------------------------------------------------------ controller state
@pytest.mark.parametrize(
    "state",
    [{"launch_step": T}, {"steps": 2}, {"launch_step": T, "steps": 2, "epoch": 0}, {"launch_step": T, "step": 2}],
    ids=["no-steps", "no-launch_step", "extra-key", "misspelt-key"],
)
def test_controller_state_with_wrong_keys_is_rejected(state):
    _, _, controller = fresh_run()
    with pytest.raises(ValueError, match="keys"):
        controller.load_state_dict(state)
    assert controller.steps == 0


def test_controller_state_with_another_launch_step_is_rejected():
    _, _, controller = fresh_run()
    with pytest.raises(ValueError, match=f"launch_step={T + 1}"):
        controller.load_state_dict({"launch_step": T + 1, "steps": 1})
    assert controller.steps == 0


@pytest.mark.parametrize("steps", [T, T + 3])
def test_controller_steps_past_t_with_a_model_that_has_not_launched_are_rejected(steps):
    # The reverse (launched, steps < t) is legitimate: an explicit launch() before step t.
    _, _, controller = fresh_run()
    with pytest.raises(ValueError, match=f"step {steps}"):
        controller.load_state_dict({"launch_step": T, "steps": steps})
    assert controller.steps == 0


@pytest.mark.parametrize("steps", [-1, 2.0, "2", None, True])
def test_controller_steps_that_are_not_a_count_are_rejected(steps):
    _, _, controller = fresh_run()
    with pytest.raises(ValueError, match=re.escape(repr(steps))):
        controller.load_state_dict({"launch_step": T, "steps": steps})
    assert controller.steps == 0


# ------------------------------------------------------------------ parameter groups (δ's own lr)
def test_param_groups_hold_every_adapter_parameter_exactly_once():
    model = build_adapted()
    lora, dash = adapter_param_groups(model, lr=1e-3)
    grouped = [id(p) for group in (lora, dash) for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in adapter_parameters(model))
    assert len(set(grouped)) == len(grouped)
    assert {id(p) for p in dash["params"]} == {id(layer.dash_delta) for layer in dash_layers(model).values()}


def test_delta_group_lr_is_scaled_and_weight_decay_appears_only_when_given():
    model = build_adapted()
    lora, dash = adapter_param_groups(model, lr=2e-4, delta_lr_scale=50.0)
    assert (lora["lr"], dash["lr"]) == (2e-4, 2e-4 * 50.0)
    assert "weight_decay" not in lora and "weight_decay" not in dash
    lora, dash = adapter_param_groups(model, lr=2e-4, weight_decay=0.01)
    assert lora["weight_decay"] == dash["weight_decay"] == 0.01
    assert dash["lr"] == lora["lr"]


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"lr": 0.0}, 0.0),
        ({"lr": -1e-3}, -0.001),
        ({"lr": math.nan}, math.nan),
        ({"lr": True}, True),
        ({"delta_lr_scale": 0}, 0),
        ({"delta_lr_scale": math.inf}, math.inf),
        ({"delta_lr_scale": "2"}, "2"),
    ],
)
def test_param_groups_reject_a_non_positive_or_non_finite_lr_or_scale(kwargs, bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        adapter_param_groups(build_adapted(), **{"lr": 1e-3, **kwargs})


def test_param_groups_of_a_model_without_dash_layers_are_refused():
    with pytest.raises(ValueError, match="no LoRA-Dash layers"):
        adapter_param_groups(torch.nn.Linear(3, 3), lr=1e-3)


def test_param_groups_train_with_adamw_and_a_controller():
    model = build_adapted()
    optimizer = torch.optim.AdamW(adapter_param_groups(model, lr=1e-2, delta_lr_scale=3.0, weight_decay=0.01))
    controller = LaunchController(model, launch_step=T).attach(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "no attached optimizer holds δ"
        train_steps(model, optimizer, 1, T + 2)
    assert controller.launched
    assert all(layer.dash_delta.ne(0).all() for layer in dash_layers(model).values())


def test_first_delta_update_after_launch_is_minus_scaled_lr_times_its_gradient():
    lr, scale = 1e-2, 7.0
    model = build_adapted()
    optimizer = torch.optim.SGD(adapter_param_groups(model, lr=lr, delta_lr_scale=scale))
    LaunchController(model, launch_step=T).attach(optimizer)
    train_steps(model, optimizer, 1, T)
    assert all(layer.launched for layer in dash_layers(model).values())
    deltas = [layer.dash_delta for layer in dash_layers(model).values()]
    assert not any(delta.any() for delta in deltas)  # δ = 0 at launch
    optimizer.zero_grad()
    x, y = batch(T + 1)
    torch.nn.functional.mse_loss(model(x), y).backward()
    gradients = [delta.grad.clone() for delta in deltas]
    optimizer.step()
    for delta, gradient in zip(deltas, gradients, strict=True):
        assert gradient.any()
        torch.testing.assert_close(delta.detach(), -(lr * scale) * gradient, rtol=1e-6, atol=0)


# ------------------------------------------------------------------ modules that train in full
def test_adapter_state_of_a_model_with_a_head_holds_its_whole_state_under_the_models_own_keys():
    model = build_with_trained_head()
    state = adapter_state_dict(model)
    expected = {f"{name}.{key}" for name in ("fc1", "fc2") for key in LAYER_STATE_KEYS} | {"fc3.weight", "fc3.bias"}
    assert set(state) == expected
    model_state = model.state_dict()
    assert all(torch.equal(value, model_state[key]) for key, value in state.items())
    assert trained_module_state_dict(model).keys() == {"fc3.weight", "fc3.bias"}
    state["fc3.weight"].add_(1.0)  # a copy
    assert not torch.equal(state["fc3.weight"], model.fc3.weight)


def test_head_state_loads_and_reproduces_the_trained_outputs():
    model = build_with_trained_head()
    optimizer = make_optimizer(model)
    LaunchController(model, launch_step=T).attach(optimizer)
    train_steps(model, optimizer, 1, T + 2)
    assert not torch.equal(model.fc3.weight, build_base().fc3.weight)  # the head trained
    other = build_with_trained_head(init_seed=3)
    load_adapter_state_dict(other, adapter_state_dict(model))
    probe = batch(-3, size=16)[0]
    with torch.no_grad():
        assert torch.equal(other(probe), model(probe))


@pytest.mark.parametrize(
    "corrupt",
    [lambda state: state.pop("fc3.bias"), lambda state: state.update({"fc3.weight": torch.zeros(OUT, 3)})],
    ids=["missing", "wrong-shape"],
)
def test_bad_head_state_is_rejected_naming_the_key_and_model_unchanged(corrupt):
    state = adapter_state_dict(build_with_trained_head())
    corrupt(state)
    target = build_with_trained_head(init_seed=3)
    assert_refused_and_unchanged(lambda: load_adapter_state_dict(target, state), target, "fc3")


def test_head_state_into_a_model_without_that_head_is_rejected_as_unexpected():
    state = adapter_state_dict(build_with_trained_head())
    target = build_base()
    inject(target, r"fc1|fc2", r=R, s=S)
    with pytest.raises(ValueError, match=re.escape("unexpected keys ['fc3.bias', 'fc3.weight']")):
        load_adapter_state_dict(target, state)


def test_head_parameters_train_in_the_lr_group_and_count_as_trainable():
    model = build_with_trained_head()
    head = [model.fc3.weight, model.fc3.bias]
    assert [id(p) for p in adapter_parameters(model)[-2:]] == [id(p) for p in head]
    lora, dash = adapter_param_groups(model, lr=1e-3, delta_lr_scale=5.0)
    assert [id(p) for p in lora["params"][-2:]] == [id(p) for p in head]
    assert not {id(p) for p in head} & {id(p) for p in dash["params"]}
    lora_only = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in dash_layers(model).values())
    assert count_trainable_parameters(model) == lora_only + model.fc3.weight.numel() + model.fc3.bias.numel()


def test_a_parameter_shared_by_two_modules_that_train_in_full_is_listed_once():
    model = build_base()
    model.fc4 = torch.nn.Linear(16, 10)
    model.fc4.weight = model.fc3.weight
    inject(model, "fc1", r=R, s=S, modules_to_save=["fc3", "fc4"])
    ids = [id(p) for p in adapter_parameters(model)]
    assert len(ids) == len(set(ids)) == 3 + 3  # A, B, δ; fc3 weight and bias, fc4 bias
    torch.optim.AdamW(adapter_parameters(model))  # no "duplicate parameters" error
