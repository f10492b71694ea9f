"""Faults during training, at model level with the controller: non-finite losses around the launch,
steps a GradScaler skips, rank-deficient weights, half-precision bases, dtype and device moves after
injection, and an optimizer that does not hold δ."""

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from lora_dash import LaunchController, dash_layers, directions, inject
from lora_dash.checkpoint import load_adapter, save_adapter

from helpers import S, assert_unchanged, batch, build_adapted, build_base, make_optimizer, snapshot, train, train_step

T = 4  # launch step


def attached(model, launch_step=T):
    optimizer = make_optimizer(model)
    return optimizer, LaunchController(model, launch_step=launch_step).attach(optimizer)


def dash_buffers(model) -> dict:
    return {
        f"{name}.{key}": getattr(layer, key).clone()
        for name, layer in dash_layers(model).items()
        for key in ("dash_U", "dash_V", "dash_index", "dash_launched")
    }


def half_precision_model(dtype):
    """The helpers' model cast to ``dtype`` and then adapted, with the helpers' AdamW."""
    model = build_base().to(dtype)
    torch.manual_seed(1)
    inject(model, r"fc\d", r=4, alpha=8.0, s=S)
    return model, make_optimizer(model)


def loss_in_model_dtype(model, step: int, micro: int):
    """``helpers.regression_loss`` with the batch in the dtype of the model's pretrained weights."""
    dtype = model.fc1.base.weight.dtype
    x, y = batch(step, micro)
    return F.mse_loss(model(x.to(dtype)).float(), y)


def poisoned_step(model, optimizer, value: float) -> None:
    """An optimizer step whose loss is ``value`` times a real loss: NaN or inf gradients everywhere."""
    model.train()
    optimizer.zero_grad()
    x, y = batch(0)
    (value * F.mse_loss(model(x), y)).backward()
    optimizer.step()


# ---------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_loss_at_the_launch_step_makes_the_launch_refuse_naming_a_layer_and_select_nothing(value):
    model = build_adapted()
    optimizer, controller = attached(model)
    train(model, T - 1, optimizer=optimizer)
    before = dash_buffers(model)
    with pytest.raises(ValueError, match=r"layer 'fc\d': the LoRA update is not finite"):
        poisoned_step(model, optimizer, value)  # step t: the post-step hook launches, and must refuse
    assert not any(layer.launched for layer in dash_layers(model).values())
    for key, buffer in dash_buffers(model).items():
        assert torch.equal(buffer, before[key]), key


def test_non_finite_loss_after_the_launch_leaves_the_selected_directions_alone():
    model = build_adapted()
    optimizer, controller = attached(model)
    train(model, T + 1, optimizer=optimizer)
    selected = dash_buffers(model)
    poisoned_step(model, optimizer, math.nan)
    train_step(model, optimizer, T + 3)
    assert controller.launched and controller.steps == T + 3
    for key, buffer in dash_buffers(model).items():  # buffers take no gradient: NaN cannot reach them
        assert torch.equal(buffer, selected[key]), key


def test_step_skipped_by_grad_scaler_for_an_inf_gradient_is_not_counted():
    # GradScaler skips optimizer.step() on inf/NaN gradients; a skipped step must not bring the launch closer.
    model = build_adapted()
    optimizer, controller = attached(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    launched_after = []
    for step in range(1, T + 3):
        optimizer.zero_grad()
        x, y = batch(step)
        loss = F.mse_loss(model(x), y) * (math.inf if step == 2 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        launched_after.append(controller.launched)
    assert controller.steps == T + 1
    assert launched_after == [False] * T + [True, True]  # step 2 was skipped: the launch is one step later
    assert all(torch.isfinite(p).all() for layer in dash_layers(model).values() for p in layer.adapter_parameters())


# ---------------------------------------------------------------------------- rank-deficient W
def with_fc2_weight(rank: int):
    """The helpers' model with fc2's W replaced by a rank-``rank`` matrix."""
    model = build_base()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        left, right = torch.randn(16, rank, generator=gen), torch.randn(rank, 16, generator=gen)
        model.fc2.weight.copy_(left @ right)
    torch.manual_seed(1)
    inject(model, r"fc\d", r=4, alpha=8.0, s=S)
    return model


def test_rank_deficient_weight_launches_on_its_nonzero_singular_directions_only():
    rank = S + 1
    model = with_fc2_weight(rank)
    optimizer, controller = attached(model)
    train(model, T + 3, optimizer=optimizer)
    assert controller.launched
    assert set(model.fc2.dash_index.tolist()) <= set(range(rank))  # σ sorted descending: zeros come last
    assert all(torch.isfinite(p).all() for p in model.fc2.adapter_parameters())
    assert model.fc2.dash_delta.ne(0).all()


@pytest.mark.parametrize("rank", [S - 1, 0])
def test_weight_of_rank_below_s_makes_the_launch_refuse_naming_the_layer_and_launch_no_layer(rank):
    model = with_fc2_weight(rank)
    optimizer, controller = attached(model)
    train(model, T - 1, optimizer=optimizer)
    before = dash_buffers(model)
    with pytest.raises(ValueError, match=re.escape(f"layer 'fc2': only {rank} of 16 directions are eligible")):
        train_step(model, optimizer, T)
    assert not any(layer.launched for layer in dash_layers(model).values())
    for key, buffer in dash_buffers(model).items():
        assert torch.equal(buffer, before[key]), key


# ------------------------------------------------------------------------ half-precision bases
HALF = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


@HALF
def test_half_precision_base_selects_at_launch_what_float32_selects_from_the_same_values(dtype):
    model, optimizer = half_precision_model(dtype)
    controller = LaunchController(model, launch_step=T)  # explicit steps: look between step t and its launch
    train(model, T, optimizer=optimizer, loss=loss_in_model_dtype)
    expected = {}
    for name, layer in dash_layers(model).items():  # the reference math on float32 copies of the same values
        U, sigma, V = directions.svd_basis(layer.base_weight().float())
        coords = directions.coordinates_from_factors(layer.lora_B.float(), layer.lora_A.float(), layer.scaling, U, V)
        eligible = directions.eligible_directions(sigma, tuple(layer.base_weight().shape))
        expected[name] = directions.select_directions(directions.change_rates(coords, sigma, eligible), eligible, S)
    for _ in range(T):
        controller.step()
    for name, layer in dash_layers(model).items():
        assert torch.equal(layer.dash_index, expected[name]), name


@HALF
def test_half_precision_base_trains_float32_adapters_across_the_launch_without_nan(dtype):
    # Adam with its default eps (1e-8 is 0 in fp16) would turn a zero gradient into 0/0 in a half adapter.
    model, optimizer = half_precision_model(dtype)
    controller = LaunchController(model, launch_step=T).attach(optimizer)
    train(model, T + 3, optimizer=optimizer, loss=loss_in_model_dtype)
    assert controller.launched
    for layer in dash_layers(model).values():
        assert layer.base.weight.dtype == dtype
        for tensor in (*layer.adapter_parameters(), layer.dash_U, layer.dash_V):
            assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
        assert layer.dash_delta.ne(0).all()
    assert model(batch(-1)[0].to(dtype)).dtype == dtype


# ------------------------------------------------------------------------ moves after injection
@HALF
def test_casting_an_adapted_model_to_half_precision_keeps_its_adapters_in_float32(dtype):
    # The layer's contract (float32 adapters on a half base) must survive model.to(dtype) after inject.
    model = build_adapted()
    optimizer, controller = attached(model)
    train(model, T + 1, optimizer=optimizer)
    indices = {name: layer.dash_index.clone() for name, layer in dash_layers(model).items()}
    model.to(dtype)
    for name, layer in dash_layers(model).items():
        assert layer.base.weight.dtype == dtype
        assert {t.dtype for t in (*layer.adapter_parameters(), layer.dash_U, layer.dash_V)} == {torch.float32}, name
        assert layer.dash_index.dtype == torch.long and torch.equal(layer.dash_index, indices[name])
        assert layer.dash_launched.dtype == torch.bool and layer.launched


def test_adapted_model_cast_to_float16_trains_across_the_launch_without_nan():
    model = build_adapted()
    optimizer, controller = attached(model)
    model.half()
    train(model, T + 2, optimizer=optimizer, loss=loss_in_model_dtype)
    assert controller.launched
    assert all(torch.isfinite(p).all() for p in optimizer.param_groups[0]["params"])


def test_optimizer_built_before_a_dtype_move_still_trains_every_adapter_tensor():
    # Module.to keeps the Parameter objects, so the optimizer's references stay valid.
    model = build_adapted()
    optimizer, controller = attached(model)
    model.to(torch.float64)
    before = {id(p): p.detach().clone() for p in optimizer.param_groups[0]["params"]}
    train(model, T + 2, optimizer=optimizer, loss=loss_in_model_dtype)
    assert controller.launched and model.fc1.dash_U.dtype == torch.float64
    for p in optimizer.param_groups[0]["params"]:
        assert p.dtype == torch.float64 and not torch.equal(p, before[id(p)])


def launched_model_and_its_outputs():
    """A model trained past the launch, a probe batch, and the model's float32 outputs on it."""
    model = build_adapted()
    optimizer, _ = attached(model)
    train(model, T + 2, optimizer=optimizer)
    probe = batch(-1, size=16)[0]
    with torch.no_grad():
        return model, probe, model(probe)


def test_dtype_round_trip_of_a_launched_model_keeps_its_directions_phase_and_outputs():
    model, probe, expected = launched_model_and_its_outputs()
    state = snapshot(model)
    model.to(torch.float64).to(torch.float32)  # float32 → float64 → float32 is exact
    assert_unchanged(model, state)
    with torch.no_grad():
        assert torch.equal(model(probe), expected)


def test_launched_model_cast_to_bfloat16_computes_what_it_computed_in_float32():
    model, probe, expected = launched_model_and_its_outputs()
    model.to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(model(probe.bfloat16()).float(), expected, atol=0.05, rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_moved_to_cuda_after_injection_launches_and_loads_as_on_cpu(tmp_path):
    cpu = build_adapted()
    gpu = build_adapted().cuda()
    for model in (cpu, gpu):
        optimizer, _ = attached(model)
        for step in range(1, T + 3):
            model.train()
            optimizer.zero_grad()
            x, y = batch(step)
            F.mse_loss(model(x.to(model.fc1.lora_A.device)), y.to(model.fc1.lora_A.device)).backward()
            optimizer.step()
    for name, layer in dash_layers(gpu).items():
        assert layer.dash_U.is_cuda and torch.equal(layer.dash_index.cpu(), dash_layers(cpu)[name].dash_index)
    save_adapter(gpu, tmp_path / "adapter.safetensors")
    fresh = build_adapted(init_seed=2).cuda()
    load_adapter(fresh, tmp_path / "adapter.safetensors")
    probe = batch(-1, size=16)[0].cuda()
    with torch.no_grad():
        assert torch.equal(fresh(probe), gpu(probe))


# ------------------------------------------------------------------------- δ not in the optimizer
def test_explicit_controller_warns_when_delta_does_not_train_after_the_launch():
    # Without an attached optimizer the controller cannot look into it at launch, but one step later
    # it sees δ still at zero although δ has a gradient: the dash is silently not training.
    model = build_adapted()
    layers = dash_layers(model)
    lora_only = torch.optim.AdamW([p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)], lr=1e-2)
    controller = LaunchController(model, launch_step=T)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, T + 2, optimizer=lora_only, controller=controller)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any(all(f"'{name}'" in message for name in layers) and "δ" in message for message in messages), messages


def test_explicit_controller_with_delta_in_the_optimizer_does_not_warn():
    model = build_adapted()
    optimizer = make_optimizer(model)
    controller = LaunchController(model, launch_step=T)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, T + 2, optimizer=optimizer, controller=controller)
    assert controller.launched
