"""Training across the launch: when it happens (invariant 13), what moves (invariant 11), the parameter
count, the controller's contract, and the output's continuity (invariant 9) at model level."""

import gc
import re
import warnings
import weakref
from collections import Counter
from functools import partial

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

from lora_dash import (
    LaunchController,
    LoRADashLinear,
    adapter_parameters,
    adapter_state_dict,
    count_trainable_parameters,
    dash_layers,
    inject,
    launch,
    load_adapter_state_dict,
)

from helpers import (
    ALPHA,
    HIDDEN,
    R,
    S,
    assert_refused_and_unchanged,
    assert_unchanged,
    batch,
    build_adapted,
    make_optimizer,
    snapshot,
    train,
    train_step,
)

T = 5  # launch step: small, so a run of T + 20 steps is cheap
EXTRA = 20
PATHS = ["hook", "explicit"]
CHECKPOINTING = [None, True, False]  # no checkpointing; use_reentrant=True; use_reentrant=False


def make_controller(model, optimizer, path, launch_step=T):
    controller = LaunchController(model, launch_step=launch_step)
    if path == "hook":
        controller.attach(optimizer)
    return controller


def run(model, optimizer, controller, path, steps, start=1, on_step=None, **kwargs):
    """Optimizer steps ``start .. start + steps - 1``; ``on_step(step)`` after each."""
    explicit = controller if path == "explicit" else None
    train(model, steps, optimizer=optimizer, start=start, on_step=on_step, controller=explicit, **kwargs)


def spy_on_layer_launches(monkeypatch) -> Counter:
    """Count ``LoRADashLinear.launch`` calls per layer name."""
    calls: Counter = Counter()
    original = LoRADashLinear.launch

    def counting(self, *args, **kwargs):
        calls[self.name] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoRADashLinear, "launch", counting)
    return calls


# ----------------------------------------------------------------------- invariant 13: when
@pytest.mark.parametrize("use_reentrant", CHECKPOINTING)
@pytest.mark.parametrize("path", PATHS)
def test_launch_happens_right_after_optimizer_step_t(path, use_reentrant):
    # Accumulation micro-batches, eval passes and checkpoint recomputes are forwards, not steps.
    model = build_adapted()
    model.use_reentrant = use_reentrant
    optimizer = make_optimizer(model)
    controller = make_controller(model, optimizer, path)
    phases = []

    def record(step):
        layer_phases = {layer.launched for layer in dash_layers(model).values()}
        phases.append((step, controller.steps, controller.launched, layer_phases))

    run(model, optimizer, controller, path, T + EXTRA, on_step=record, accumulation=3, evaluate=True)
    expected = [(step, step, step >= T, {step >= T}) for step in range(1, T + EXTRA + 1)]
    assert phases == expected


@pytest.mark.parametrize("use_reentrant", CHECKPOINTING)
@pytest.mark.parametrize("path", PATHS)
def test_launch_happens_exactly_once(path, use_reentrant, monkeypatch):
    calls = spy_on_layer_launches(monkeypatch)
    model = build_adapted()
    model.use_reentrant = use_reentrant
    forwards = []
    model.fc2.register_forward_hook(lambda *_: forwards.append(1))
    optimizer = make_optimizer(model)
    controller = make_controller(model, optimizer, path)
    run(model, optimizer, controller, path, T + EXTRA, accumulation=3, evaluate=True)
    assert calls == Counter({name: 1 for name in dash_layers(model)})
    # The scenario is real: 3 micro-batches + 1 eval (+ 3 recomputes when checkpointing) per step.
    assert len(forwards) == (T + EXTRA) * (4 if use_reentrant is None else 7)


@pytest.mark.parametrize("path", PATHS)
def test_training_does_not_warn_when_used_as_documented(path):
    # A warning in the normal path would train users to ignore the real ones.
    model = build_adapted()
    optimizer = make_optimizer(model)
    controller = make_controller(model, optimizer, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, optimizer, controller, path, T + 3)
    assert controller.launched


# ----------------------------------------------------------------------- invariant 11: what
@pytest.mark.parametrize("path", PATHS)
def test_only_adapter_parameters_change_under_training(path):
    model = build_adapted()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = make_optimizer(model)
    controller = make_controller(model, optimizer, path)
    run(model, optimizer, controller, path, T + EXTRA, accumulation=3)
    assert controller.launched
    for name, p in model.named_parameters():
        trained = name.rsplit(".", 1)[-1] in {"lora_A", "lora_B", "dash_delta"}
        # Base weights and biases are bit-identical; every adapter tensor has moved.
        assert torch.equal(p, before[name]) != trained, name


def test_delta_is_zero_before_launch_and_trains_after():
    model = build_adapted()
    optimizer = make_optimizer(model)
    controller = make_controller(model, optimizer, "hook")
    history = []
    run(
        model,
        optimizer,
        controller,
        "hook",
        T + EXTRA,
        on_step=lambda step: history.append(
            (step, [layer.dash_delta.detach().clone() for layer in dash_layers(model).values()])
        ),
    )
    for step, deltas in history:
        for delta in deltas:
            if step <= T:  # pre-launch, and the launch step itself (δ = 0 at launch)
                assert not delta.any(), step
            else:
                assert delta.ne(0).all(), step


# ------------------------------------------------------------------------ parameter count
def test_trainable_parameter_count_is_lora_before_launch_plus_s_per_layer_after():
    model = build_adapted()
    layers = dash_layers(model).values()
    lora = sum(R * (layer.in_features + layer.out_features) for layer in layers)
    assert lora == sum(R * sum(layer.base.weight.shape) for layer in layers)
    assert count_trainable_parameters(model) == lora
    optimizer = make_optimizer(model)
    controller = make_controller(model, optimizer, "hook")
    run(model, optimizer, controller, "hook", T - 1)
    assert count_trainable_parameters(model) == lora
    run(model, optimizer, controller, "hook", 1, start=T)
    assert count_trainable_parameters(model) == lora + S * len(layers)
    for layer in layers:  # δ alone trains on (the dash-only variant)
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)
    assert count_trainable_parameters(model) == S * len(layers)


# ----------------------------------------------------------------------------- controller
@pytest.mark.parametrize("launch_step", [-1, -100, 2.0, 2.5, "5", None])
def test_invalid_launch_step_is_rejected(launch_step):
    model = build_adapted()
    with pytest.raises(ValueError, match=re.escape(repr(launch_step))):
        LaunchController(model, launch_step=launch_step)


def test_launch_step_zero_launches_at_construction():
    model = build_adapted()
    controller = LaunchController(model, launch_step=0)
    assert controller.launched
    assert all(layer.launched for layer in dash_layers(model).values())


def test_manual_launch_selects_s_directions_in_every_layer():
    model = build_adapted()
    selected = launch(model)
    assert set(selected) == set(dash_layers(model))
    for name, layer in dash_layers(model).items():
        assert layer.launched
        assert selected[name].shape == (S,)
        assert torch.equal(layer.dash_index, selected[name])


def test_second_launch_raises_and_changes_no_layer():
    model = build_adapted()
    launch(model)
    with torch.no_grad():  # make δ non-zero so that a re-launch resetting it would show
        for layer in dash_layers(model).values():
            layer.dash_delta.fill_(0.5)
    assert_refused_and_unchanged(lambda: launch(model), model, "already launched", error=RuntimeError)


def test_controller_gives_delta_a_fresh_adam_state_at_launch():
    # Before launch δ's gradient is zero; Adam's step count and moments from then must not carry over.
    model = build_adapted()
    optimizer = make_optimizer(model)
    controller = make_controller(model, optimizer, "hook")
    run(model, optimizer, controller, "hook", T + 3)
    for layer in dash_layers(model).values():
        assert float(optimizer.state[layer.dash_delta]["step"]) == 3
        assert float(optimizer.state[layer.lora_A]["step"]) == T + 3


def test_warns_past_launch_step_when_a_layer_injected_after_launch_has_not_launched():
    model = build_adapted()
    optimizer = make_optimizer(model)
    controller = make_controller(model, optimizer, "explicit")
    model.extra = torch.nn.Linear(6, 6)
    run(model, optimizer, controller, "explicit", T)
    assert controller.launched
    inject(model, "extra", r=2, s=2)
    optimizer.step()
    with pytest.warns(RuntimeWarning, match="'extra'"):
        controller.step()


def test_controller_rewound_with_a_pre_launch_adapter_state_launches_again_at_t():
    # After the launch the controller keeps the phase in Python; loading its state re-reads the model.
    model = build_adapted()
    optimizer = make_optimizer(model)
    controller = make_controller(model, optimizer, "hook")
    run(model, optimizer, controller, "hook", 2)
    pre_launch, counted = adapter_state_dict(model), controller.state_dict()
    run(model, optimizer, controller, "hook", T, start=3)
    assert controller.launched
    load_adapter_state_dict(model, pre_launch)
    controller.load_state_dict(counted)
    run(model, optimizer, controller, "hook", T - 3, start=3)
    assert not any(layer.launched for layer in dash_layers(model).values())
    run(model, optimizer, controller, "hook", 1, start=T)
    assert (controller.steps, controller.launched) == (T, True)


def test_warns_when_attached_optimizer_does_not_hold_delta():
    model = build_adapted()
    layers = dash_layers(model)
    optimizer = torch.optim.AdamW([p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)], lr=1e-2)
    controller = LaunchController(model, launch_step=T).attach(optimizer)
    run(model, optimizer, controller, "hook", T - 1)
    with pytest.warns(RuntimeWarning, match=re.escape(str(list(layers)))):
        train_step(model, optimizer, T)
    assert controller.launched


def test_launch_is_all_or_nothing_when_one_layer_update_is_not_finite():
    model = build_adapted()
    optimizer = make_optimizer(model)
    run(model, optimizer, make_controller(model, optimizer, "hook", launch_step=100), "hook", 3)
    with torch.no_grad():
        model.fc2.lora_B[0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape("'fc2'")):
        launch(model)
    assert not any(layer.launched for layer in dash_layers(model).values())
    assert_unchanged(model, before)


# ------------------------------------------------------------------------ direction strategies
def test_controller_launches_with_its_strategy():
    model = build_adapted()
    optimizer = make_optimizer(model)
    controller = LaunchController(model, launch_step=T, strategy="smallest_sigma").attach(optimizer)
    run(model, optimizer, controller, "hook", T)
    assert controller.launched
    for layer in dash_layers(model).values():  # Gaussian weights: every direction is eligible
        k = min(layer.in_features, layer.out_features)
        assert layer.dash_index.tolist() == list(range(k - 1, k - 1 - S, -1))


def test_controller_state_dict_keeps_its_keys_with_a_strategy():
    controller = LaunchController(build_adapted(), launch_step=T, strategy="random", seed=3)
    assert set(controller.state_dict()) == {"launch_step", "steps"}


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"strategy": "top_s"}, "top_s"),
        ({"strategy": "largest"}, "largest"),
        ({"strategy": "random", "seed": -1}, -1),
        ({"seed": 1.5}, 1.5),
    ],
)
@pytest.mark.parametrize("entry", ["launch", "controller"])
def test_launch_and_controller_reject_bad_strategy_or_seed_before_launching(entry, kwargs, bad):
    # Naming the valid strategies is pick_directions' own test; here: refused at both entries, nothing changed.
    model = build_adapted()
    if entry == "launch":
        start = partial(launch, model, **kwargs)
    else:  # launch_step=0 would launch at construction
        start = partial(LaunchController, model, launch_step=0, **kwargs)
    assert_refused_and_unchanged(start, model, re.escape(repr(bad)))


def test_random_launch_differs_across_layers_and_seeds_and_repeats_on_an_identical_model():
    def draws(seed):
        # Layers of one shape: a generator shared or seeded alike would give every layer the same draw.
        torch.manual_seed(0)
        model = nn.Sequential(*(nn.Linear(HIDDEN, HIDDEN) for _ in range(4)))
        inject(model, r"\d", r=R, alpha=ALPHA, s=6)
        return {name: index.tolist() for name, index in launch(model, "random", seed).items()}

    first = draws(seed=5)
    assert len({tuple(index) for index in first.values()}) == len(first)  # each layer its own generator
    assert draws(seed=5) == first
    assert draws(seed=6) != first


# ------------------------------------------------------------------------ invariant 9: output
def test_model_output_is_identical_just_before_and_just_after_launch():
    model = build_adapted()
    optimizer = make_optimizer(model)
    controller = make_controller(model, optimizer, "explicit")
    run(model, optimizer, controller, "explicit", T - 1)
    probe = batch(-2, size=32)[0]
    # Optimizer step t, then the output, then the launch the controller makes at step t.
    train_step(model, optimizer, T)
    with torch.no_grad():
        just_before = model(probe)
        controller.step()
        assert controller.launched
        just_after = model(probe)
    assert torch.equal(just_before, just_after)
    assert all(layer.lora_B.any() for layer in dash_layers(model).values())  # a real update at launch


# ------------------------------------------------- wrapped optimizers and steps a grad scaler skips
class Wrapper:
    """What accelerate's, Trainer's and DeepSpeed's optimizer wrappers share: the real one as ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad()


def test_attach_counts_the_steps_of_an_optimizer_wrapped_twice_and_resets_delta_in_it():
    model = build_adapted()
    optimizer = make_optimizer(model)
    wrapped = Wrapper(Wrapper(optimizer))
    controller = LaunchController(model, launch_step=T).attach(wrapped)
    run(model, wrapped, controller, "hook", T + 2)
    assert (controller.steps, controller.launched) == (T + 2, True)
    for layer in dash_layers(model).values():
        assert float(optimizer.state[layer.dash_delta]["step"]) == 2


@pytest.mark.parametrize("not_an_optimizer", [None, object(), Wrapper(None)], ids=["None", "object", "empty-wrapper"])
def test_attach_refuses_what_is_not_an_optimizer_and_wraps_none(not_an_optimizer):
    controller = LaunchController(build_adapted(), launch_step=T)
    with pytest.raises(ValueError, match="LoRADashCallback"):
        controller.attach(not_an_optimizer)
    assert controller.optimizers == [] and controller._hooks == []


def scaled_step(model, optimizer, scaler, step, overflow, scaler_for_backward=None):
    """One step under a grad scaler; ``overflow`` plants an inf gradient, so the scaler skips the step.
    ``scaler=None``: the optimizer steps through its own scaler (``scaler_for_backward``)."""
    optimizer.zero_grad()
    x, y = batch(step)
    (scaler or scaler_for_backward).scale(F.mse_loss(model(x), y)).backward()
    if overflow:
        model.fc1.lora_B.grad[0, 0] = float("inf")
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


@pytest.fixture
def accelerator():
    """An accelerate ``Accelerator`` on the CPU, accumulating 2 micro-batches; its shared state is reset after."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True, gradient_accumulation_steps=2)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_attach_counts_only_the_real_steps_of_accelerates_optimizer_under_accumulation(accelerator):
    from accelerate.optimizer import AcceleratedOptimizer

    model = build_adapted()
    model, optimizer = accelerator.prepare(model, make_optimizer(model))
    assert isinstance(optimizer, AcceleratedOptimizer)
    controller = LaunchController(model, launch_step=T).attach(optimizer)
    counted = []
    for micro in range(2 * (T + 2)):
        with accelerator.accumulate(model):
            x, y = batch(micro)
            accelerator.backward(F.mse_loss(model(x), y))
            optimizer.step()  # steps the real optimizer on every second micro-batch only
            optimizer.zero_grad()
        counted.append((controller.steps, controller.launched))
    assert counted == [((micro + 1) // 2, (micro + 1) // 2 >= T) for micro in range(2 * (T + 2))]


def wrap_for(wrapper, optimizer, request):
    """``optimizer`` as is, or inside accelerate's wrapper with a CPU grad scaler (what fp16 training builds)."""
    if wrapper == "torch":
        return optimizer, torch.amp.GradScaler("cpu")
    from accelerate.optimizer import AcceleratedOptimizer

    request.getfixturevalue("accelerator")
    wrapped = AcceleratedOptimizer(optimizer, scaler=torch.amp.GradScaler("cpu"))
    return wrapped, wrapped.scaler


# Plain AdamW: the scaler does not call step(). Fused AdamW: it calls step() with found_inf set.
# accelerate's wrapper steps through the scaler (its step_was_skipped misses the fused case).
@pytest.mark.parametrize("wrapper", ["torch", "accelerate"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_a_step_the_grad_scaler_skips_is_not_counted(fused, wrapper, request):
    model = build_adapted()
    optimizer, scaler = wrap_for(wrapper, torch.optim.AdamW(adapter_parameters(model), lr=1e-2, fused=fused), request)
    controller = LaunchController(model, launch_step=T).attach(optimizer)
    counted = []
    for call in range(1, T + 2):
        before = model.fc2.lora_A.detach().clone()
        if wrapper == "torch":
            scaled_step(model, optimizer, scaler, call, overflow=call == 2)
        else:  # AcceleratedOptimizer.step() calls scaler.step and scaler.update itself
            scaled_step(model, optimizer, None, call, overflow=call == 2, scaler_for_backward=scaler)
        assert torch.equal(model.fc2.lora_A, before) == (call == 2)  # the skip is real
        counted.append((controller.steps, controller.launched))
    assert counted == [(1, False), (1, False)] + [(step, step == T) for step in range(2, T + 1)]


# --------------------------------------------------------- no tensor reads in step() after the launch
def spy_on_tensor_reads(monkeypatch) -> list[str]:
    """Record every read of a tensor's value into Python (a layer's phase is a Python bool)."""
    reads: list[str] = []
    for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return reads


def test_step_reads_no_tensor_before_t_nor_after_the_one_off_check_after_the_launch(monkeypatch):
    # On a GPU every read is a host-device synchronisation; after the launch the phase lives in Python.
    model = build_adapted()
    optimizer = make_optimizer(model)
    controller = LaunchController(model, launch_step=T)
    reads = {}
    for step in range(1, T + 8):
        train_step(model, optimizer, step)
        with monkeypatch.context() as patch:
            seen = spy_on_tensor_reads(patch)
            controller.step()
        reads[step] = seen
    assert controller.launched
    # The launch at t and the one-off check at t + 1 do read (so the spy sees reads); no other step does.
    assert reads[T] and "__bool__" in reads[T + 1]
    assert {step: seen for step, seen in reads.items() if seen} == {T: reads[T], T + 1: reads[T + 1]}


# ----------------------------------------------------------- a controller nobody attached or stepped
def test_a_controller_never_attached_nor_stepped_warns_once_past_t_even_under_compile():
    torch._dynamo.reset()
    model = build_adapted()
    compiled = torch.compile(model, backend="eager")
    optimizer = make_optimizer(model)
    LaunchController(model, launch_step=T)  # built, then forgotten: the run would silently stay plain LoRA
    torch._dynamo.utils.counters.clear()
    warned = []
    for step in range(1, T + 5):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer.zero_grad()
            F.mse_loss(compiled(batch(step)[0]), batch(step)[1]).backward()
            optimizer.step()
        warned += [(step, str(warning.message)) for warning in caught if warning.category is RuntimeWarning]
    assert [step for step, _ in warned] == [T + 1]
    assert f"{T + 1} times, past launch_step={T}" in warned[0][1] and "counted no step" in warned[0][1]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the watch is not on the forward


def test_an_idle_controller_is_silent_when_another_one_launches_the_model():
    model = build_adapted()
    optimizer = make_optimizer(model)
    LaunchController(model, launch_step=T)
    controller = LaunchController(model, launch_step=T).attach(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, optimizer, controller, "hook", T + 3)
    assert controller.launched


def test_an_idle_controller_does_not_keep_its_model_alive():
    model = build_adapted()
    LaunchController(model, launch_step=T)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
