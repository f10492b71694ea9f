"""`LoRADashLinear` at layer level: METHOD.md §3, §4 and the layer invariants 6–10 of §6.

Weights are planted, ``W = P diag(σ) Qᵀ`` with known orthogonal ``P``, ``Q`` (float64) and well
separated ``σ``, so the reference basis is independent of the layer's own SVD.
"""

import copy
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lora_dash import directions
from lora_dash.layer import DashDirections, LoRADashLinear

FEW = settings(max_examples=15, deadline=None)

# (out, in): tall, wide, square, and the 1×k / k×1 edge cases.
shapes = st.one_of(
    st.tuples(st.integers(5, 12), st.integers(2, 4)),
    st.tuples(st.integers(2, 4), st.integers(5, 12)),
    st.integers(2, 9).map(lambda k: (k, k)),
    st.integers(1, 9).map(lambda k: (1, k)),
    st.integers(1, 9).map(lambda k: (k, 1)),
)


@st.composite
def cases(draw) -> tuple[int, int, int, int, int]:
    """``(out, in, r, s, seed)`` with ``1 <= s <= min(out, in)``."""
    out, in_ = draw(shapes)
    r = draw(st.integers(1, 4))
    s = draw(st.integers(1, min(out, in_)))
    return out, in_, r, s, draw(st.integers(0, 2**31 - 1))


class Conv1D(nn.Module):
    """GPT-2 style: ``weight`` stored ``(in, out)``, ``y = x @ weight + bias``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


def planted(out: int, in_: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``(W, P, Q)``: ``W = P[:, :k] diag(σ) Q[:, :k]ᵀ`` in float32; ``P``, ``Q`` full and float64."""
    P = torch.linalg.qr(torch.randn(out, out, generator=gen, dtype=torch.float64)).Q
    Q = torch.linalg.qr(torch.randn(in_, in_, generator=gen, dtype=torch.float64)).Q
    k = min(out, in_)
    sigma = 3.0 * 0.7 ** torch.arange(k, dtype=torch.float64)  # gaps of 30 %: stable singular vectors
    W = (P[:, :k] * sigma) @ Q[:, :k].T
    return W.float(), P, Q


def build(out: int, in_: int, r: int, s: int, seed: int, **kwargs) -> tuple[LoRADashLinear, Tensor, Tensor]:
    """A layer on a planted W whose A and B look trained (both nonzero); returns ``(layer, P, Q)``."""
    gen = torch.Generator().manual_seed(seed)
    W, P, Q = planted(out, in_, gen)
    base = nn.Linear(in_, out)
    with torch.no_grad():
        base.weight.copy_(W)
        base.bias.copy_(torch.randn(out, generator=gen))
    layer = LoRADashLinear(base, r=r, alpha=2.0 * r, s=s, **kwargs)
    with torch.no_grad():
        layer.lora_A.copy_((2 * torch.rand(r, in_, generator=gen) - 1) / math.sqrt(in_))
        layer.lora_B.copy_(torch.randn(out, r, generator=gen))
    return layer, P, Q


def set_delta(layer: LoRADashLinear, seed: int) -> None:
    """Give δ nonzero values, as training after launch would."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.dash_delta.copy_(torch.randn(layer.s, generator=gen).to(layer.dash_delta.dtype))


def inputs(in_: int, seed: int, rows: int = 7) -> Tensor:
    return torch.randn(rows, in_, generator=torch.Generator().manual_seed(seed + 2))


def dash_state(layer: LoRADashLinear) -> list[Tensor]:
    return [t.detach().clone() for t in (layer.dash_U, layer.dash_V, layer.dash_index, layer.dash_delta)]


def assert_dash_state(layer: LoRADashLinear, state: list[Tensor]) -> None:
    for now, before in zip(dash_state(layer), state):
        assert torch.equal(now, before)


def assert_not_launched(layer: LoRADashLinear) -> None:
    assert not layer.launched
    assert not layer.dash_U.any() and not layer.dash_V.any() and not layer.dash_delta.any()
    assert (layer.dash_index == -1).all()


# ------------------------------------------------------------------------------------------ init
@FEW
@given(shape=shapes, r=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_init_A_is_within_the_kaiming_uniform_a_sqrt5_bound(shape, r, seed):
    out, in_ = shape
    torch.manual_seed(seed)
    A = LoRADashLinear(nn.Linear(in_, out), r=r, s=1).lora_A.detach()
    bound = math.sqrt(2 / (1 + 5)) * math.sqrt(3 / in_)  # gain(a=√5)·√(3/fan_in) = 1/√in
    assert math.isclose(bound, 1 / math.sqrt(in_))
    assert A.abs().max() <= bound
    assert A.numel() == 1 or A.std() > 0  # drawn, not constant


def test_init_A_fills_the_kaiming_interval_uniformly():
    torch.manual_seed(0)
    A = LoRADashLinear(nn.Linear(256, 4), r=64, s=1).lora_A.detach()  # 16384 draws
    bound = 1 / 16
    assert A.min() < -0.99 * bound and A.max() > 0.99 * bound
    assert abs(A.mean().item()) < 0.02 * bound
    assert A.var().item() == pytest.approx(bound**2 / 3, rel=0.05)  # the variance of U(-b, b)


@FEW
@given(shape=shapes, r=st.integers(1, 4))
def test_init_B_delta_zero_and_dash_buffers_empty_before_launch(shape, r):
    out, in_ = shape
    layer = LoRADashLinear(nn.Linear(in_, out), r=r, s=min(out, in_))
    k = min(out, in_)
    assert torch.equal(layer.lora_B, torch.zeros(out, r))
    assert torch.equal(layer.dash_delta, torch.zeros(k))
    assert torch.equal(layer.dash_U, torch.zeros(out, k))
    assert torch.equal(layer.dash_V, torch.zeros(in_, k))
    assert torch.equal(layer.dash_index, torch.full((k,), -1))
    assert not layer.launched


@pytest.mark.parametrize("r, alpha", [(1, 1.0), (4, 8.0), (8, 16.0), (16, 3.0)])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_is_alpha_over_r_or_alpha_over_sqrt_r_with_rslora(r, alpha, use_rslora):
    base = nn.Linear(6, 5)
    layer = LoRADashLinear(base, r=r, alpha=alpha, s=2, use_rslora=use_rslora)
    expected = alpha / math.sqrt(r) if use_rslora else alpha / r
    assert layer.scaling == pytest.approx(expected, rel=1e-12)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6)
    lora = x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x) - base(x), expected * lora, rtol=1e-5, atol=1e-5)


@FEW
@given(case=cases(), dropout=st.sampled_from([0.0, 0.3]))
def test_fresh_layer_output_equals_base_output_exactly(case, dropout):
    out, in_, r, s, seed = case
    base = nn.Linear(in_, out)
    reference = copy.deepcopy(base)
    layer = LoRADashLinear(base, r=r, s=s, dropout=dropout).train()
    x = inputs(in_, seed)
    assert torch.equal(layer(x), reference(x))


# ---------------------------------------------------------------------------------------- Conv1D
def conv1d_and_linear_pair(out: int, in_: int, r: int, s: int, seed: int):
    """The same layer twice: around a ``Conv1D`` holding ``Wᵀ`` and around an ``nn.Linear`` holding ``W``."""
    linear, _, _ = build(out, in_, r, s, seed)
    conv = Conv1D(nf=out, nx=in_)
    with torch.no_grad():
        conv.weight.copy_(linear.base.weight.T)
        conv.bias.copy_(linear.base.bias)
    on_conv = LoRADashLinear(conv, r=r, alpha=2.0 * r, s=s)
    with torch.no_grad():
        on_conv.lora_A.copy_(linear.lora_A)
        on_conv.lora_B.copy_(linear.lora_B)
    return on_conv, linear


@FEW
@given(case=cases())
def test_conv1d_layer_matches_linear_with_transposed_weight(case):
    out, in_, r, s, seed = case
    on_conv, linear = conv1d_and_linear_pair(out, in_, r, s, seed)
    assert (on_conv.in_features, on_conv.out_features) == (in_, out)
    x = inputs(in_, seed)
    torch.testing.assert_close(on_conv(x), linear(x), rtol=1e-5, atol=1e-5)

    on_conv.launch()
    linear.launch()
    assert torch.equal(on_conv.dash_index, linear.dash_index)
    torch.testing.assert_close(on_conv.dash_U, linear.dash_U, rtol=0, atol=1e-5)
    torch.testing.assert_close(on_conv.dash_V, linear.dash_V, rtol=0, atol=1e-5)

    set_delta(on_conv, seed)
    set_delta(linear, seed)
    torch.testing.assert_close(on_conv.delta_weight(), linear.delta_weight(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(on_conv(x), linear(x), rtol=1e-5, atol=1e-5)


@FEW
@given(case=cases())
def test_conv1d_merge_adds_transposed_update_to_in_out_storage(case):
    out, in_, r, s, seed = case
    on_conv, _ = conv1d_and_linear_pair(out, in_, r, s, seed)
    on_conv.launch()
    set_delta(on_conv, seed)
    x = inputs(in_, seed)
    unmerged = on_conv(x)
    expected = on_conv.base.weight.detach().clone() + on_conv.delta_weight().detach().T

    on_conv.merge()
    assert on_conv.base.weight.shape == (in_, out)
    torch.testing.assert_close(on_conv.base.weight.detach(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(on_conv(x), unmerged, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ invariant 6
@FEW
@given(case=cases(), log2_c=st.integers(-6, 6).filter(bool))
def test_inv6_rescaling_B_by_c_and_A_by_1_over_c_selects_the_same_directions(case, log2_c):
    out, in_, r, s, seed = case
    layer, _, _ = build(out, in_, r, s, seed)
    rescaled = copy.deepcopy(layer)
    c = 2.0**log2_c  # a power of two: (cB)(A/c) is then bit-identical to BA, so no near-tie can flip
    with torch.no_grad():
        rescaled.lora_B.mul_(c)
        rescaled.lora_A.div_(c)
    layer.launch()
    rescaled.launch()
    assert torch.equal(rescaled.dash_index, layer.dash_index)
    assert torch.equal(rescaled.dash_U, layer.dash_U)
    assert torch.equal(rescaled.dash_V, layer.dash_V)


@FEW
@given(case=cases())
def test_inv6_launch_uses_the_pretrained_W_not_W_plus_delta(case):
    out, in_, r, s, seed = case
    layer, _, _ = build(out, in_, r, s, seed)
    W = layer.base.weight.detach().clone()
    update = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    layer.launch()

    U, sigma, V = directions.svd_basis(W)
    eligible = directions.eligible_directions(sigma, (out, in_))
    rates = directions.change_rates(directions.coordinates(update, U, V), sigma, eligible)  # dense path
    expected = directions.select_directions(rates, eligible, s)
    assert torch.equal(layer.dash_index, expected)
    # U_s, V_s are singular pairs of W itself: W V_s = U_s diag(σ_idx), Wᵀ U_s = V_s diag(σ_idx).
    torch.testing.assert_close(W @ layer.dash_V, layer.dash_U * sigma[expected], rtol=0, atol=1e-5)
    torch.testing.assert_close(W.T @ layer.dash_U, layer.dash_V * sigma[expected], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ invariant 7
@FEW
@given(case=cases())
def test_inv7_dash_update_is_delta_on_the_selected_diagonal_of_Ws_basis(case):
    out, in_, r, s, seed = case
    layer, P, Q = build(out, in_, r, s, seed)
    layer.launch()
    set_delta(layer, seed)
    lora = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    dash = (layer.delta_weight().detach() - lora).double()

    on_basis = P.T @ dash @ Q  # (out, in) in W's full singular basis
    expected = torch.zeros(out, in_, dtype=torch.float64)
    expected[layer.dash_index, layer.dash_index] = layer.dash_delta.detach().double()
    scale = 1 + lora.abs().max().item()  # the subtraction above cancels at this scale
    torch.testing.assert_close(on_basis, expected, rtol=0, atol=1e-5 * scale)


# ------------------------------------------------------------------------------------ invariant 8
@FEW
@given(case=cases())
def test_inv8_delta_gradient_is_the_weight_gradient_on_the_selected_directions(case):
    out, in_, r, s, seed = case
    layer, _, _ = build(out, in_, r, s, seed)
    layer.launch()
    set_delta(layer, seed)
    x = inputs(in_, seed)
    target = torch.randn(x.shape[0], out, generator=torch.Generator().manual_seed(seed + 3))

    def loss(y: Tensor) -> Tensor:
        return (y.tanh() * target).sum()

    loss(layer(x)).backward()
    # The same function as a dense layer whose weight W_eff is a leaf: G = ∂L/∂W_eff.
    W_eff = (layer.base.weight + layer.delta_weight()).detach().requires_grad_()
    loss(x @ W_eff.T + layer.base.bias.detach()).backward()
    G = W_eff.grad
    expected = torch.einsum("os,oi,is->s", layer.dash_U, G, layer.dash_V)  # u_iᵀ G v_i
    atol = 1e-5 * (1 + G.abs().max().item())
    torch.testing.assert_close(layer.dash_delta.grad, expected, rtol=1e-4, atol=atol)


# ------------------------------------------------------------------------------------ invariant 9
@FEW
@given(case=cases(), dropout=st.sampled_from([0.0, 0.3]))
def test_inv9_output_is_identical_just_before_and_just_after_launch(case, dropout):
    out, in_, r, s, seed = case
    layer, _, _ = build(out, in_, r, s, seed, dropout=dropout)
    set_delta(layer, seed)  # a δ set before the launch (a loaded state, a user) moves nothing while U_s = V_s = 0
    layer.train()
    x = inputs(in_, seed)
    torch.manual_seed(seed)  # the same dropout mask for both calls
    before = layer(x)
    layer.launch()
    assert not layer.dash_delta.any()  # the launch zeroes δ
    torch.manual_seed(seed)
    after = layer(x)
    # δ = 0 at launch makes every dash product an exact zero, so nothing can round differently:
    # bitwise equality is required, not closeness.
    assert torch.equal(before, after)


# ----------------------------------------------------------------------------------- invariant 10
def launched_layer(case) -> tuple[LoRADashLinear, Tensor]:
    out, in_, r, s, seed = case
    layer, _, _ = build(out, in_, r, s, seed)
    layer.launch()
    set_delta(layer, seed)
    return layer, inputs(in_, seed)


@FEW
@given(case=cases())
def test_inv10_merged_forward_equals_unmerged_forward(case):
    layer, x = launched_layer(case)
    unmerged = layer(x).detach()
    layer.merge()
    assert layer.merged
    merged = layer(x).detach()
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5 * (1 + unmerged.abs().max().item()))


@FEW
@given(case=cases())
def test_inv10_unmerge_restores_W_to_float32_rounding(case):
    layer, _ = launched_layer(case)
    W = layer.base.weight.detach().clone()
    update_scale = layer.delta_weight().abs().max().item()
    layer.merge()
    assert not torch.equal(layer.base.weight, W)
    layer.unmerge()
    assert not layer.merged
    rounding = 4 * torch.finfo(torch.float32).eps * (W.abs().max().item() + update_scale)
    torch.testing.assert_close(layer.base.weight.detach(), W, rtol=0, atol=rounding)


def test_inv10_merge_twice_raises_and_leaves_the_weight_unchanged():
    layer, _ = launched_layer((5, 4, 2, 2, 0))
    layer.merge()
    W = layer.base.weight.detach().clone()
    with pytest.raises(RuntimeError):
        layer.merge()
    assert torch.equal(layer.base.weight, W) and layer.merged


def test_inv10_unmerge_when_not_merged_raises_and_leaves_the_weight_unchanged():
    layer, _ = launched_layer((5, 4, 2, 2, 0))
    W = layer.base.weight.detach().clone()
    with pytest.raises(RuntimeError):
        layer.unmerge()
    assert torch.equal(layer.base.weight, W) and not layer.merged


def test_inv10_launch_while_merged_raises_and_changes_nothing():
    layer, _, _ = build(5, 4, 2, 2, 0)
    layer.merge()
    W = layer.base.weight.detach().clone()
    with pytest.raises(RuntimeError):
        layer.launch()
    assert_not_launched(layer)
    assert torch.equal(layer.base.weight, W) and layer.merged


def test_inv10_launch_twice_raises_and_leaves_the_buffers_unchanged():
    layer, _ = launched_layer((6, 5, 2, 3, 0))  # δ already trained away from zero
    state = dash_state(layer)
    with pytest.raises(RuntimeError):
        layer.launch()
    with pytest.raises(RuntimeError):  # also with directions supplied by the caller
        layer.launch(DashDirections(U_s=state[0], V_s=state[1], index=state[2]))
    assert_dash_state(layer, state)
    assert layer.launched


# -------------------------------------------------------------------------------- launch errors
@pytest.mark.parametrize(
    "tensor, value", [("lora_A", math.nan), ("lora_B", math.inf), ("lora_B", math.nan), ("base.weight", math.inf)]
)
def test_non_finite_update_or_weight_at_launch_raises_naming_the_layer_and_changes_nothing(tensor, value):
    layer, _, _ = build(6, 5, 2, 3, 0)
    layer.name = "encoder.layer.3.attention.query"
    with torch.no_grad():
        layer.get_parameter(tensor)[1, 0] = value
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    with pytest.raises(ValueError, match=re.escape(layer.name)):
        layer.launch()
    assert_not_launched(layer)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "weight, s",
    [
        (torch.outer(torch.tensor([1.0, 2, -3, 4, 5, 6]), torch.tensor([1.0, -2, 3, 1])), 2),  # rank 1
        (torch.zeros(6, 4), 1),  # rank 0
    ],
)
def test_fewer_than_s_eligible_directions_raises_naming_the_layer_and_changes_nothing(weight, s):
    base = nn.Linear(4, 6)
    with torch.no_grad():
        base.weight.copy_(weight)
    layer = LoRADashLinear(base, r=2, s=s)
    layer.name = "blocks.0.mlp.fc"
    with torch.no_grad():
        layer.lora_B.normal_()
    with pytest.raises(ValueError, match=re.escape(layer.name)):
        layer.launch()
    assert_not_launched(layer)


# ------------------------------------------------------------------------- direction strategies
@FEW
@given(case=cases())
def test_find_directions_defaults_to_the_tsd_strategy(case):
    layer, _, _ = build(*case)
    default, tsd = layer.find_directions(), layer.find_directions(strategy="tsd")
    for a, b in zip(default, tsd):
        assert torch.equal(a, b)


@FEW
@given(case=cases())
def test_sigma_strategies_choose_singular_pairs_at_the_ends_of_the_spectrum(case):
    out, in_, r, s, seed = case
    layer, _, _ = build(out, in_, r, s, seed)
    W, k = layer.base.weight.detach(), min(out, in_)
    _, sigma, _ = directions.svd_basis(W)
    for strategy, expected in (("largest_sigma", range(s)), ("smallest_sigma", range(k - 1, k - 1 - s, -1))):
        U_s, V_s, index = layer.find_directions(strategy=strategy)
        assert index.tolist() == list(expected)
        torch.testing.assert_close(W @ V_s, U_s * sigma[index], rtol=0, atol=1e-5)


def test_sigma_strategies_skip_ineligible_directions():
    base = nn.Linear(4, 6)
    rank_2 = torch.outer(torch.arange(1.0, 7), torch.ones(4)) + torch.outer(torch.ones(6), torch.arange(4.0))
    with torch.no_grad():  # σ_3 = σ_4 = 0 (to rounding): not eligible
        base.weight.copy_(rank_2)
    layer = LoRADashLinear(base, r=2, s=2)
    assert layer.find_directions(strategy="smallest_sigma").index.tolist() == [1, 0]
    assert layer.find_directions(strategy="largest_sigma").index.tolist() == [0, 1]


def test_random_strategy_on_a_layer_is_reproducible_with_the_generator_seed():
    layer, _, _ = build(32, 24, 2, 6, 0)

    def draw(seed: int) -> list[int]:
        return layer.find_directions(strategy="random", generator=torch.Generator().manual_seed(seed)).index.tolist()

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_random_strategy_without_a_generator_raises_naming_the_layer_and_changes_nothing():
    layer, _, _ = build(6, 5, 2, 3, 0)
    layer.name = "blocks.1.attn.proj"
    with pytest.raises(ValueError, match=re.escape(layer.name)):
        layer.find_directions(strategy="random")
    assert_not_launched(layer)


def test_unknown_strategy_is_rejected_before_any_work_and_the_layer_is_not_launched(monkeypatch):
    layer, _, _ = build(6, 5, 2, 3, 0)
    monkeypatch.setattr(directions, "svd_basis", lambda *_, **__: pytest.fail("SVD before validation"))
    with pytest.raises(ValueError, match="'sigma'.*'tsd'"):
        layer.find_directions(strategy="sigma")
    assert_not_launched(layer)


# ------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
@settings(max_examples=8, deadline=None)
@given(case=cases())
def test_half_precision_launch_selects_as_float32_and_forward_keeps_dtype(dtype, tol, case):
    out, in_, r, s, seed = case
    layer, _, _ = build(out, in_, r, s, seed)
    half = copy.deepcopy(layer).to(dtype)
    single = copy.deepcopy(half).float()  # the float32 copy of exactly the same half values
    assert half.lora_A.dtype == torch.float32 and half.base.weight.dtype == dtype  # adapters stay float32

    half.launch()
    single.launch()
    assert torch.equal(half.dash_index, single.dash_index)
    set_delta(single, seed)
    with torch.no_grad():  # the same δ in both, as representable in the half dtype
        half.dash_delta.copy_(single.dash_delta)
        single.dash_delta.copy_(half.dash_delta.float())

    x = inputs(in_, seed).to(dtype)
    y = half(x)
    assert y.dtype == dtype
    reference = single(x.float())
    torch.testing.assert_close(y.float(), reference, rtol=0, atol=tol * (1 + reference.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cast_to_half_keeps_existing_gradients_in_the_adapters_dtype(dtype):
    layer, _, _ = build(6, 5, 2, 3, 0)
    layer.launch()
    set_delta(layer, 0)
    layer(inputs(5, 0)).square().sum().backward()
    grads = [p.grad.clone() for p in layer.adapter_parameters()]
    layer.to(dtype)  # Module.to casts each gradient with its tensor; the adapter's go back to float32 together
    for p, grad in zip(layer.adapter_parameters(), grads):
        assert p.dtype == p.grad.dtype == torch.float32
        assert torch.equal(p.grad, grad.to(dtype).float())


# -------------------------------------------------------------------------------------- dropout
def launched_with_dropout(p: float, in_: int) -> LoRADashLinear:
    layer, _, _ = build(4, in_, 2, 3, 0, dropout=p)
    layer.launch()
    set_delta(layer, 0)
    return layer


def test_dropout_mask_is_shared_by_the_lora_and_dash_branches():
    p, in_ = 0.5, 5
    layer = launched_with_dropout(p, in_).train()
    lora = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    dash = layer.delta_weight().detach() - lora

    # One-hot rows: with one mask a row's adapter output is dropped or kept whole, never one branch only.
    x = torch.eye(in_).repeat(40, 1) * torch.linspace(1, 2, 40 * in_)[:, None]
    torch.manual_seed(0)
    adapter = (layer(x) - layer.base(x)).detach()
    kept = x / (1 - p)
    dropped = adapter.abs().amax(dim=1) < 1e-6
    whole = torch.isclose(adapter, kept @ (lora + dash).T, rtol=1e-4, atol=1e-5).all(dim=1)
    assert (dropped | whole).all()
    assert dropped.any() and whole.any()  # dropout is really on in train mode


def test_dropout_is_off_in_eval_mode():
    layer = launched_with_dropout(0.5, 5).eval()
    x = inputs(5, 0)
    expected = layer.base(x) + x @ layer.delta_weight().T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(x), layer(x))


# ---------------------------------------------------------------------------------- constructor
@pytest.mark.parametrize(
    "base, kwargs",
    [
        (nn.Linear(6, 4), {"r": 0}),
        (nn.Linear(6, 4), {"r": -2}),
        (nn.Linear(6, 4), {"r": 2.0}),
        (nn.Linear(6, 4), {"r": True}),  # a bool is an int to isinstance, but not a rank
        (nn.Linear(6, 4), {"s": 0}),
        (nn.Linear(6, 4), {"s": -1}),
        (nn.Linear(6, 4), {"s": True}),
        (nn.Linear(6, 4), {"s": 5}),  # > min(in, out) = 4
        (nn.Linear(4, 6), {"s": 5}),
        (nn.Linear(6, 4), {"dropout": -0.1}),
        (nn.Linear(6, 4), {"dropout": 1.0}),
        (nn.Linear(6, 4), {"eps": -1e-6}),
        (nn.Linear(6, 4), {"eps": math.nan}),  # would only fail at launch, as "rates are not finite"
        (nn.Conv2d(4, 6, 1), {}),
    ],
    ids=[
        "r=0",
        "r<0",
        "r-float",
        "r-bool",
        "s=0",
        "s<0",
        "s-bool",
        "s>in",
        "s>out",
        "dropout<0",
        "dropout=1",
        "eps<0",
        "eps-nan",
        "conv2d",
    ],
)
def test_constructor_rejects_bad_arguments_with_ValueError(base, kwargs):
    with pytest.raises(ValueError):
        LoRADashLinear(base, **{"r": 2, "s": 2, **kwargs})


def test_constructor_takes_eps_as_any_finite_real_number_numpy_scalars_included():
    for eps in (0, 0.5, np.float32(0.5)):
        assert LoRADashLinear(nn.Linear(6, 4), r=2, s=2, eps=eps).eps == eps


# --------------------------------------------------------------------------- repr and trainables
def test_repr_shows_shape_hyperparameters_phase_and_merge_state():
    layer, _, _ = build(4, 6, 2, 3, 0)
    text = repr(layer)
    for part in ("in=6", "out=4", "r=2", "alpha=4", "s=3", "phase=pre-launch", "merged=False"):
        assert part in text
    layer.launch()
    assert "phase=dash" in repr(layer) and "pre-launch" not in repr(layer)
    layer.merge()
    assert "merged=True" in repr(layer)


def test_only_A_B_and_delta_are_trainable_and_the_base_is_frozen():
    layer, x = launched_layer((4, 6, 2, 3, 0))
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "dash_delta"}
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    layer(x).square().sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert all(p.grad is not None for p in (layer.lora_A, layer.lora_B, layer.dash_delta))
