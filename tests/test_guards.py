"""The launch's guards warn when a run is wired wrong, and only then: once, not on every step; not
for a step a grad scaler skipped; and counting a resumed run's steps from where it resumed."""

import warnings

import pytest
import torch

from lora_dash import LaunchController, inject

from helpers import build_adapted, make_optimizer, regression_loss, train_step

T = 4


def runtime_warnings(record: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning) and text in str(w.message)]


def test_a_layer_that_did_not_launch_is_warned_about_once_not_on_every_later_step():
    model = build_adapted()
    optimizer = make_optimizer(model)
    controller = LaunchController(model, launch_step=T)
    for step in range(1, T + 1):
        train_step(model, optimizer, step, controller=controller)
    model.extra = torch.nn.Linear(6, 6)
    inject(model, "extra", r=2, s=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(T + 1, T + 6):
            train_step(model, optimizer, step, controller=controller)
    assert len(runtime_warnings(record, "have not launched")) == 1


def test_a_step_the_grad_scaler_skips_right_after_the_launch_raises_no_false_alarm():
    model = build_adapted()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)  # skips inside its step
    scaler = torch.amp.GradScaler("cpu")
    controller = LaunchController(model, launch_step=T).attach(optimizer)

    def scaled_step(step: int, overflow: bool) -> None:
        optimizer.zero_grad()
        loss = regression_loss(model, step, 0)
        if overflow:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for step in range(1, T + 1):
        scaled_step(step, overflow=False)
    assert controller.launched
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        scaled_step(T + 1, overflow=True)  # skipped: not a step
        assert controller.steps == T
        scaled_step(T + 2, overflow=False)
    assert controller.steps == T + 1
    assert runtime_warnings(record, "did not move") == []


def test_a_controller_rebuilt_for_a_resumed_run_counts_unseen_steps_from_where_it_resumed():
    model = build_adapted()
    optimizer = make_optimizer(model)
    launch_step, resumed_at = 10, 6
    controller = LaunchController(model, launch_step=launch_step).attach(optimizer)
    for step in range(1, resumed_at + 1):
        train_step(model, optimizer, step)
    state = controller.state_dict()
    controller.detach()

    rebuilt = LaunchController(model, launch_step=launch_step)  # never attached nor stepped: a bug
    rebuilt.load_state_dict(state)
    unseen = launch_step - resumed_at + 1  # the step that passes t
    with pytest.warns(RuntimeWarning, match="counted no step"):
        for step in range(resumed_at + 1, resumed_at + unseen + 1):
            train_step(model, optimizer, step)
    assert not rebuilt.launched


def test_the_warning_about_delta_outside_the_optimizer_names_the_fix_for_a_trainer_too():
    model = build_adapted()
    factors = [p for name, p in model.named_parameters() if "lora_" in name]
    optimizer = torch.optim.AdamW(factors, lr=1e-2)
    LaunchController(model, launch_step=T).attach(optimizer)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(1, T + 1):
            train_step(model, optimizer, step)
    [message] = runtime_warnings(record, "no attached optimizer holds δ")
    assert "lora_dash.adapter_parameters(model)" in message
    assert "callbacks=" in message and "optimizers=(...)" in message  # the Trainer's two cases
