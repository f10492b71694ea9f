"""End to end against the dense restatement (``dense_reference``): same pretrained weights, same
initial ``A``, same data, same optimizer; the real implementation and the naive one must launch on the
same directions and train to the same parameters through ``t + 30`` steps."""

import pytest
import torch
import torch.nn.functional as F

from lora_dash import dash_layers

from dense_reference import NaiveLoRADash, naive_select, train_naive
from helpers import ALPHA, R, S, batch, build_adapted, build_base, train

T = 10
EXTRA = 30
NAMES = ("fc1", "fc2", "fc3")
LR, WEIGHT_DECAY = 1e-2, 0.01  # helpers.make_optimizer
# Parameters and outputs after 40 float32 AdamW steps (lr 1e-2: up to 1e-2 per step; Adam's m/√v
# magnifies rounding where a gradient entry is near zero), observed <= 1.1e-6; singular vectors from
# two float32 SVDs by different LAPACK paths, observed <= 3.7e-6.
TOL = 1e-5


def naive_twin(model, alpha=ALPHA, **kwargs):
    """The base MLP with each adapted layer replaced by a ``NaiveLoRADash`` holding the same ``W``,
    ``b`` and initial ``A`` as ``model``'s LoRA-Dash layer of that name."""
    twin = build_base()
    layers = dash_layers(model)
    naive = []
    for name in NAMES:
        layer = layers[name]
        replacement = NaiveLoRADash(layer.base.weight, layer.base.bias, layer.lora_A, alpha, S, **kwargs)
        setattr(twin, name, replacement)
        naive.append(replacement)
    return twin, naive


def run_both(steps=T + EXTRA, planted_weights=None, **kwargs):
    """Train the implementation (controller on the optimizer hook) and its naive twin for ``steps``;
    return ``(model, twin, {name: naive layer})``."""
    model = build_adapted(**kwargs)
    if planted_weights is not None:
        with torch.no_grad():
            for name, weight in planted_weights.items():
                dash_layers(model)[name].base.weight.copy_(weight)
    twin, naive = naive_twin(model, **kwargs)
    torch.manual_seed(123)  # dropout masks: each run draws them in the same order from the same seed
    train(model, steps, launch_step=T)
    torch.manual_seed(123)
    train_naive(twin, naive, (batch(step) for step in range(1, steps + 1)), F.mse_loss, T, LR, WEIGHT_DECAY)
    return model, twin, dict(zip(NAMES, naive))


def column_signs(reference, actual):
    """``±1`` per column aligning ``actual`` to ``reference`` (singular vectors are defined up to sign)."""
    return torch.sign((reference * actual).sum(dim=0))


def assert_same_training(model, naive):
    for name, layer in dash_layers(model).items():
        twin = naive[name]
        assert layer.dash_index.tolist() == twin.index, name
        torch.testing.assert_close(layer.lora_A, twin.A, atol=TOL, rtol=0, msg=name)
        torch.testing.assert_close(layer.lora_B, twin.B, atol=TOL, rtol=0, msg=name)
        torch.testing.assert_close(layer.dash_delta, twin.delta, atol=TOL, rtol=0, msg=name)
        signs = column_signs(twin.U_s, layer.dash_U)
        assert torch.equal(signs, column_signs(twin.V_s, layer.dash_V)), f"{name}: u_i, v_i flipped apart"
        torch.testing.assert_close(layer.dash_U * signs, twin.U_s, atol=TOL, rtol=0, msg=name)
        torch.testing.assert_close(layer.dash_V * signs, twin.V_s, atol=TOL, rtol=0, msg=name)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"alpha": 5.0}, {"use_rslora": True}, {"dropout": 0.2}, {"eps": 0.5}],
    ids=["plain", "alpha-not-a-power-of-two", "rslora", "dropout", "eps"],
)
def test_training_through_the_launch_matches_the_dense_restatement(kwargs):
    model, twin, naive = run_both(**kwargs)
    assert_same_training(model, naive)
    x = batch(-1)[0]
    model.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), atol=TOL, rtol=0)


def test_rank_deficient_weight_selects_only_eligible_directions_like_the_restatement():
    gen = torch.Generator().manual_seed(7)
    low_rank = torch.randn(16, 4, generator=gen) @ torch.randn(4, 16, generator=gen)  # rank 4 of 16
    model, _, naive = run_both(planted_weights={"fc2": low_rank / 4})
    assert_same_training(model, naive)
    assert max(naive["fc2"].index) < 4  # σ_5.. are zero up to rounding: never eligible


def test_selection_at_launch_matches_the_restatement_in_float32_and_float64():
    """The launch alone, on many trained-looking updates; float64 checks the float32 ranking is not a fluke."""
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        model = build_adapted(init_seed=seed)
        for layer in dash_layers(model).values():
            with torch.no_grad():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
            chosen = layer.find_directions().index.tolist()
            delta_weight = layer.scaling * layer.lora_B @ layer.lora_A
            for dtype in (torch.float32, torch.float64):
                assert chosen == naive_select(layer.base.weight, delta_weight, S, svd_dtype=dtype)[0]


def test_restatement_dash_term_is_the_implementations_delta_weight():
    """After training, the naive dense ``ΔW`` equals ``LoRADashLinear.delta_weight()``."""
    model, _, naive = run_both(steps=T + 5)
    for name, layer in dash_layers(model).items():
        twin = naive[name]
        with torch.no_grad():
            torch.testing.assert_close(layer.delta_weight(), twin.lora_update() + twin.dash_update(), atol=TOL, rtol=0)


def test_naive_twin_starts_from_the_same_state():
    model = build_adapted()
    _, naive = naive_twin(model)
    for layer, twin in zip(dash_layers(model).values(), naive):
        assert torch.equal(layer.base.weight, twin.W) and torch.equal(layer.lora_A, twin.A)
        assert not twin.B.any() and twin.A.shape == (R, layer.in_features)
