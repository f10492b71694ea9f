"""Property tests of the pure math in ``lora_dash.directions`` (METHOD.md §2-§4, §6).

Every matrix is built from a hypothesis-drawn seed with a ``torch.Generator``, so examples are
deterministic and shrink to small shapes. Exactness checks run in float64 with tolerances relative to
the scale of the matrices involved. Oracles are independent dense computations (``Uᵀ ΔW V``,
``U diag(σ) Vᵀ``, Python's ``sorted``), never the function under test.
"""

import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_dash.directions import (
    STRATEGIES,
    change_rates,
    coordinates,
    coordinates_from_factors,
    dash_update,
    eligible_directions,
    pick_directions,
    score_directions,
    select_directions,
    select_task_directions,
    svd_basis,
)

from conftest import F64, FAST, THOROUGH, gaussian, generator, orthonormal, seeds

REL = 1e-12  # float64 rounding on matrices of at most 24 x 24, with margin

# --- strategies -----------------------------------------------------------------------------------

decades = st.integers(-12, 12).map(lambda e: 10.0**e)


@st.composite
def shapes(draw, kinds=("tall", "wide", "square", "row", "column")):
    """(n, m) covering tall, wide, square, 1 x k and k x 1."""
    kind = draw(st.sampled_from(kinds))
    a, b = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    if kind == "square":
        return a, a
    if kind == "row":
        return 1, a
    if kind == "column":
        return a, 1
    short, long = sorted((a, b))
    if short == long:  # a strictly tall or wide shape
        long += 1
    return (long, short) if kind == "tall" else (short, long)


@st.composite
def weights(draw, shape=None):
    """A float64 weight: Gaussian, rank-deficient (thin factors) or with repeated singular values."""
    n, m = draw(shape if shape is not None else shapes())
    k = min(n, m)
    gen = torch.Generator().manual_seed(draw(seeds))
    structure = draw(st.sampled_from(("gaussian", "low_rank", "repeated")))
    if structure == "gaussian":
        W = gaussian(gen, n, m)
    elif structure == "low_rank":
        r = draw(st.integers(1, max(1, k - 1)))
        W = gaussian(gen, n, r) @ gaussian(gen, r, m)
    else:
        # Repeats and exact zeros: the singular vectors of a repeated block are not unique.
        rest = draw(st.lists(st.sampled_from((1.0, 0.5, 0.0)), min_size=k - 1, max_size=k - 1))
        sigma = torch.tensor([1.0, *sorted(rest, reverse=True)], dtype=F64)
        W = orthonormal(gen, n, k) @ torch.diag(sigma) @ orthonormal(gen, m, k).mT
    return W * draw(decades)


@st.composite
def separated_weights(draw, shape=None):
    """W = U diag(σ) Vᵀ with distinct σ, gaps >= σ_1 / 96: a basis unique up to column signs."""
    n, m = draw(shape if shape is not None else shapes())
    k = min(n, m)
    gen = torch.Generator().manual_seed(draw(seeds))
    levels = draw(st.lists(st.integers(1, 4 * k), min_size=k, max_size=k, unique=True))
    sigma = torch.tensor(sorted(levels, reverse=True), dtype=F64) * draw(decades)
    U, V = orthonormal(gen, n, k), orthonormal(gen, m, k)
    return U @ torch.diag(sigma) @ V.mT, U, sigma, V


@st.composite
def updates(draw, n: int, m: int):
    """A dense float64 ΔW of shape (n, m) at any scale."""
    gen = torch.Generator().manual_seed(draw(seeds))
    return gaussian(gen, n, m) * draw(decades)


@st.composite
def lora_factors(draw, n: int, m: int):
    """(B, A, scaling) for ΔW = scaling · B A with rank 1..8."""
    gen = torch.Generator().manual_seed(draw(seeds))
    r = draw(st.integers(1, 8))
    B = gaussian(gen, n, r) * draw(decades)
    A = gaussian(gen, r, m) * draw(decades)
    return B, A, draw(st.sampled_from((0.5, 1.0, 2.0, 1 / math.sqrt(8), 16.0)))


RATES = st.floats(0.0, 1e6, allow_nan=False)


@st.composite
def rate_vectors(draw, values=RATES):
    """(rates, eligible) as given to select_directions; rates may tie."""
    k = draw(st.integers(1, 24))
    rates = torch.tensor(draw(st.lists(values, min_size=k, max_size=k)), dtype=F64)
    eligible = torch.tensor(draw(st.lists(st.booleans(), min_size=k, max_size=k)))
    return rates, eligible


def basis64(W: torch.Tensor):
    return svd_basis(W, dtype=F64)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, scale: float, rel: float = REL) -> None:
    """Max-abs error within ``rel`` of the problem's scale (0 scale demands exact zeros)."""
    error = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert error <= rel * scale, f"error {error:.3e} > {rel:.0e} x scale {scale:.3e}"


def fro(M: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(M).item()


def expected_selection(rates: torch.Tensor, eligible: torch.Tensor, s: int) -> list[int]:
    """Oracle for the stable rule: larger rate first, then lower index; eligible only."""
    candidates = [i for i in range(rates.numel()) if eligible[i]]
    return sorted(candidates, key=lambda i: (-rates[i].item(), i))[:s]


# --- svd_basis ------------------------------------------------------------------------------------


@THOROUGH
@given(weights())
def test_svd_basis_is_a_thin_svd(W):
    """U diag(σ) Vᵀ = W with orthonormal U, V, σ descending and >= 0, k = min(n, m) columns."""
    n, m = W.shape
    k = min(n, m)
    U, sigma, V = basis64(W)
    assert U.shape == (n, k) and sigma.shape == (k,) and V.shape == (m, k)
    assert_close(U @ torch.diag(sigma) @ V.mT, W, fro(W))
    assert_close(U.mT @ U, torch.eye(k, dtype=F64), 1.0)
    assert_close(V.mT @ V, torch.eye(k, dtype=F64), 1.0)
    assert (sigma >= 0).all() and (sigma[:-1] >= sigma[1:]).all()


@FAST
@given(separated_weights(shape=shapes(kinds=("wide", "row"))))
def test_wide_svd_matches_tall_svd(planted):
    """The transpose route for wide W gives the basis a direct SVD of the wide matrix gives."""
    W = planted[0]
    U, sigma, V = basis64(W)
    U_ref, sigma_ref, Vh_ref = torch.linalg.svd(W, full_matrices=False)
    assert U.shape == U_ref.shape and V.shape == Vh_ref.mT.shape
    assert_close(sigma, sigma_ref, sigma_ref[0].item())
    # Columns agree up to sign: |<u_i, u_i_ref>| = 1.
    assert_close((U * U_ref).sum(0).abs(), torch.ones_like(sigma), 1.0, rel=1e-9)
    assert_close((V * Vh_ref.mT).sum(0).abs(), torch.ones_like(sigma), 1.0, rel=1e-9)


@FAST
@given(separated_weights())
def test_transposed_weight_swaps_U_and_V(planted):
    """svd_basis(Wᵀ) = (V, σ, U) of svd_basis(W), up to column signs: layout is only a transpose."""
    W = planted[0]
    U, sigma, V = basis64(W)
    U_t, sigma_t, V_t = basis64(W.mT)
    assert_close(sigma_t, sigma, sigma[0].item())
    assert_close((U_t * V).sum(0).abs(), torch.ones_like(sigma), 1.0, rel=1e-9)
    assert_close((V_t * U).sum(0).abs(), torch.ones_like(sigma), 1.0, rel=1e-9)


@FAST
@given(weights(), st.sampled_from((torch.float16, torch.bfloat16)), st.integers(-2, 2))
def test_svd_basis_is_float32_for_half_inputs(W, half, decade):
    """fp16/bf16 weights are decomposed in float32 (float32-accurate, not half-accurate)."""
    W_half = (W / W.abs().max().clamp_min(1e-300) * 10.0**decade).to(half)
    U, sigma, V = svd_basis(W_half)
    assert U.dtype == sigma.dtype == V.dtype == torch.float32
    W32 = W_half.float()
    assert_close(U @ torch.diag(sigma) @ V.mT, W32, fro(W32), rel=1e-5)


@FAST
@given(weights())
def test_svd_basis_defaults_to_float32_for_float64_inputs(W):
    """The default SVD dtype is float32 whatever the weight's dtype (METHOD §3)."""
    assert all(t.dtype == torch.float32 for t in svd_basis(W))


@FAST
@given(weights(), st.sampled_from((torch.float16, torch.bfloat16, torch.float32, F64)))
def test_float64_on_request(W, input_dtype):
    """dtype=float64 gives a float64, float64-accurate SVD of the weight as given."""
    W_in = (W / W.abs().max().clamp_min(1e-300)).to(input_dtype)
    U, sigma, V = svd_basis(W_in, dtype=F64)
    assert U.dtype == sigma.dtype == V.dtype == F64
    W64 = W_in.to(F64)
    assert_close(U @ torch.diag(sigma) @ V.mT, W64, fro(W64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.complex64])
def test_unsupported_svd_dtype_raises(dtype):
    with pytest.raises(ValueError, match=re.escape(str(dtype))):
        svd_basis(torch.ones(3, 2), dtype=dtype)


@pytest.mark.parametrize("shape", [(), (4,), (2, 3, 4), (1, 1, 1, 1)])
def test_non_2d_weight_raises(shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        svd_basis(torch.ones(shape))


# --- coordinates (invariants 1, 3, 6) -------------------------------------------------------------


@THOROUGH
@given(st.data())
def test_dense_coordinates_are_the_diagonal_of_the_projection(data):
    """Invariant 1: c_i = u_iᵀ ΔW v_i = diag(Uᵀ ΔW V)_i."""
    W = data.draw(weights())
    dW = data.draw(updates(*W.shape))
    U, _, V = basis64(W)
    assert_close(coordinates(dW, U, V), torch.diagonal(U.mT @ dW @ V), fro(dW))


@THOROUGH
@given(st.data())
def test_factored_coordinates_equal_dense_coordinates(data):
    """Invariant 1: the O(k·r·(n+m)) factored formula agrees with diag(Uᵀ (scaling·B A) V)."""
    W = data.draw(weights())
    B, A, scaling = data.draw(lora_factors(*W.shape))
    U, _, V = basis64(W)
    dense = torch.diagonal(U.mT @ (scaling * B @ A) @ V)
    scale = scaling * fro(B) * fro(A)
    assert_close(coordinates_from_factors(B, A, scaling, U, V), dense, scale)


@FAST
@given(weights())
def test_coordinates_of_the_weight_are_its_singular_values(W):
    """p_i(W) = σ_i (METHOD §1)."""
    U, sigma, V = basis64(W)
    assert_close(coordinates(W, U, V), sigma, fro(W))


@FAST
@given(st.data())
def test_coordinates_recover_a_diagonal_update(data):
    """ΔW = U diag(a) Vᵀ on W's own basis has coordinates exactly a (any W, repeats included)."""
    W = data.draw(weights())
    U, _, V = basis64(W)
    gen = torch.Generator().manual_seed(data.draw(seeds))
    a = gaussian(gen, U.shape[1]) * data.draw(decades)
    assert_close(coordinates(U @ torch.diag(a) @ V.mT, U, V), a, a.abs().max().item(), rel=1e-11)


@THOROUGH
@given(st.data())
def test_coordinates_energy_is_bounded_by_frobenius_norm(data):
    """Invariant 3: Σ c_i² <= ‖ΔW‖_F², for a dense update and for LoRA factors."""
    W = data.draw(weights())
    n, m = W.shape
    U, _, V = basis64(W)
    dW = data.draw(updates(n, m))
    assert coordinates(dW, U, V).square().sum().item() <= fro(dW) ** 2 * (1 + REL)
    B, A, scaling = data.draw(lora_factors(n, m))
    c = coordinates_from_factors(B, A, scaling, U, V)
    rounding = REL * (scaling * fro(B) * fro(A)) ** 2
    assert c.square().sum().item() <= fro(scaling * B @ A) ** 2 + rounding


@FAST
@given(st.data(), st.floats(1e-3, 1e3))
def test_only_the_product_BA_matters(data, c):
    """Invariant 6 (function level): (c·B, A/c) has the coordinates of (B, A)."""
    W = data.draw(weights())
    B, A, scaling = data.draw(lora_factors(*W.shape))
    U, _, V = basis64(W)
    expected = coordinates_from_factors(B, A, scaling, U, V)
    actual = coordinates_from_factors(c * B, A / c, scaling, U, V)
    assert_close(actual, expected, scaling * fro(B) * fro(A))


# --- sign and scale invariances (invariants 2, 4) -------------------------------------------------


@THOROUGH
@given(st.data())
def test_sign_flip_of_a_singular_pair_changes_nothing(data):
    """Invariant 2: negating (u_i, v_i) leaves c, ρ, the selection and the dash term unchanged."""
    W = data.draw(weights())
    n, m = W.shape
    U, sigma, V = basis64(W)
    k = sigma.numel()
    i = data.draw(st.integers(0, k - 1))
    flip = torch.ones(k, dtype=F64)
    flip[i] = -1.0
    U_f, V_f = U * flip, V * flip
    dW = data.draw(updates(n, m))
    B, A, scaling = data.draw(lora_factors(n, m))
    eligible = eligible_directions(sigma, (n, m))

    c, c_f = coordinates(dW, U, V), coordinates(dW, U_f, V_f)
    assert torch.equal(c, c_f)
    assert torch.equal(coordinates_from_factors(B, A, scaling, U, V), coordinates_from_factors(B, A, scaling, U_f, V_f))
    rates, rates_f = change_rates(c, sigma, eligible), change_rates(c_f, sigma, eligible)
    assert torch.equal(rates, rates_f)
    s = min(data.draw(st.integers(1, k)), int(eligible.sum()))
    if s >= 1:
        index = select_directions(rates, eligible, s)
        assert torch.equal(index, select_directions(rates_f, eligible, s))
        delta = torch.randn(s, generator=torch.Generator().manual_seed(data.draw(seeds)), dtype=F64)
        flipped = dash_update(U_f[:, index], delta, V_f[:, index])
        assert_close(flipped, dash_update(U[:, index], delta, V[:, index]), 0.0)


@THOROUGH
@given(st.data(), st.integers(-30, 30), st.sampled_from((0.0, 1e-3, 1.0)))
def test_positive_rescaling_keeps_the_ranking(data, exponent, eps):
    """Invariant 4: 2^e·ΔW (an exact rescaling) scales every rate by 2^e and keeps the selection."""
    W = data.draw(weights())
    dW = data.draw(updates(*W.shape))
    U, sigma, V = basis64(W)
    eligible = eligible_directions(sigma, tuple(W.shape))
    factor = 2.0**exponent
    rates = change_rates(coordinates(dW, U, V), sigma, eligible, eps)
    scaled = change_rates(coordinates(factor * dW, U, V), sigma, eligible, eps)
    assert torch.equal(scaled, factor * rates)
    for s in range(1, int(eligible.sum()) + 1):
        assert torch.equal(select_directions(scaled, eligible, s), select_directions(rates, eligible, s))


@THOROUGH
@given(weights(), st.one_of(st.just(0.0), st.floats(1e-6, 1e3), st.floats(-1e3, -1e-6)))
def test_update_proportional_to_weight_has_uniform_rate(W, lam):
    """Invariant 4: ΔW = λW gives ρ_i = |λ| on every eligible direction (repeated σ included).

    c_i = λσ_i holds to rounding at the scale of σ_1, so ρ_i = |λ| to rounding relative to σ_1/σ_i.
    """
    U, sigma, V = basis64(W)
    eligible = eligible_directions(sigma, tuple(W.shape))
    rates = change_rates(coordinates(lam * W, U, V), sigma, eligible)
    deviation = (rates[eligible] - abs(lam)).abs() * sigma[eligible]
    assert (deviation <= REL * abs(lam) * fro(W)).all()
    well_conditioned = rates[eligible & (sigma >= 1e-3 * sigma[0])]
    assert_close(well_conditioned, torch.full_like(well_conditioned, abs(lam)), abs(lam), rel=1e-9)


# --- planted selection (invariant 5) --------------------------------------------------------------


@THOROUGH
@given(st.data(), st.sampled_from((torch.float32, F64)), st.booleans())
def test_planted_update_selects_top_rates(data, svd_dtype, factored):
    """Invariant 5: for ΔW = Σ a_i u_i v_iᵀ the selection is the top s of |a_i|/σ_i, in that order."""
    W, U, sigma, V = data.draw(separated_weights())
    k = sigma.numel()
    targets = torch.tensor(data.draw(st.permutations(range(1, k + 1))), dtype=F64)  # distinct rates
    signs = torch.tensor(data.draw(st.lists(st.sampled_from((-1.0, 1.0)), min_size=k, max_size=k)), dtype=F64)
    a = signs * targets * sigma * data.draw(decades)
    s = data.draw(st.integers(1, k))

    U_w, sigma_w, V_w = svd_basis(W, dtype=svd_dtype)
    if factored:  # the same ΔW as LoRA factors B = U diag(a), A = Vᵀ
        c = coordinates_from_factors(U * a, V.mT, 1.0, U_w, V_w)
    else:
        c = coordinates(U @ torch.diag(a) @ V.mT, U_w, V_w)
    eligible = eligible_directions(sigma_w, tuple(W.shape))
    index = select_directions(change_rates(c, sigma_w, eligible), eligible, s)
    assert index.tolist() == torch.argsort(targets, descending=True)[:s].tolist()


# --- the dash term (invariant 7, METHOD §3.4) -----------------------------------------------------


@st.composite
def dash_cases(draw):
    """W, its float64 basis, a selection of s distinct indices and δ."""
    W = draw(weights())
    U, sigma, V = basis64(W)
    k = sigma.numel()
    index = torch.tensor(draw(st.permutations(range(k)))[: draw(st.integers(1, k))])
    gen = torch.Generator().manual_seed(draw(seeds))
    delta = gaussian(gen, index.numel()) * draw(decades)
    return W, U, sigma, V, index, delta


@THOROUGH
@given(dash_cases())
def test_dash_update_is_diagonal_on_the_weight_basis(case):
    """Invariant 7: Uᵀ ΔW_dash V is δ on the selected diagonal entries and 0 everywhere else."""
    _, U, sigma, V, index, delta = case
    k = sigma.numel()
    dash = dash_update(U[:, index], delta, V[:, index])
    assert dash.shape == (U.shape[0], V.shape[0])
    expected = torch.zeros(k, k, dtype=F64)
    expected[index, index] = delta
    assert_close(U.mT @ dash @ V, expected, delta.abs().max().item())


@FAST
@given(dash_cases())
def test_dash_update_moves_only_the_selected_singular_values(case):
    """METHOD §3.4: W + U_s diag(δ) V_sᵀ = U diag(σ + δ·1_sel) Vᵀ."""
    W, U, sigma, V, index, delta = case
    moved = sigma.clone()
    moved[index] += delta
    dashed = W + dash_update(U[:, index], delta, V[:, index])
    assert_close(dashed, U @ torch.diag(moved) @ V.mT, fro(W) + delta.abs().sum().item())


# --- eligibility ----------------------------------------------------------------------------------


@st.composite
def sigmas_around_the_tolerance(draw):
    """(σ, shape, tolerance) with entries on, just above and just below σ_1·max(n, m)·ε."""
    dtype = draw(st.sampled_from((torch.float32, F64)))
    n, m = draw(shapes())
    k = min(n, m)
    # σ_1 with few mantissa bits, so σ_1·max(n, m)·ε is exact in either dtype.
    sigma_1 = draw(st.integers(1, 1000)) * 2.0 ** draw(st.integers(-40, 40))
    tolerance = sigma_1 * max(n, m) * torch.finfo(dtype).eps
    at = torch.tensor(tolerance, dtype=dtype)
    above = torch.nextafter(at, torch.tensor(math.inf, dtype=dtype)).item()
    below = torch.nextafter(at, torch.tensor(0.0, dtype=dtype)).item()
    options = (sigma_1, 8 * tolerance, 2 * tolerance, above, tolerance, below, tolerance / 2, 0.0)
    rest = draw(st.lists(st.sampled_from(options), min_size=k - 1, max_size=k - 1))
    sigma = torch.tensor([sigma_1, *sorted(rest, reverse=True)], dtype=dtype)
    return sigma, (n, m), tolerance


@THOROUGH
@given(sigmas_around_the_tolerance())
def test_eligibility_is_sigma_above_the_numerical_rank_tolerance(case):
    """σ_i is eligible iff σ_i > σ_1·max(n, m)·ε_machine (strict; ε of σ's dtype)."""
    sigma, shape, tolerance = case
    expected = [value > tolerance for value in sigma.tolist()]
    assert eligible_directions(sigma, shape).tolist() == expected


@FAST
@given(shapes(), st.sampled_from((torch.float16, torch.float32, F64)), st.integers(1, 24), seeds)
def test_zero_weight_has_no_eligible_direction(shape, dtype, s, seed):
    """A zero W: nothing eligible, every rate 0 (not NaN), and any selection is refused."""
    U, sigma, V = svd_basis(torch.zeros(shape, dtype=dtype))
    eligible = eligible_directions(sigma, shape)
    assert not eligible.any()
    dW = gaussian(torch.Generator().manual_seed(seed), *shape)
    rates = change_rates(coordinates(dW, U, V), sigma, eligible)
    assert torch.equal(rates, torch.zeros_like(rates))
    with pytest.raises(ValueError):
        select_directions(rates, eligible, s)


@st.composite
def integer_low_rank(draw):
    """An exactly rank <= r weight: integer thin factors, scaled by a power of two (no rounding)."""
    n, m = draw(shapes())
    r = draw(st.integers(1, max(1, min(n, m) - 1)))
    gen = torch.Generator().manual_seed(draw(seeds))
    X = torch.randint(-3, 4, (n, r), generator=gen).to(F64)
    Y = torch.randint(-3, 4, (r, m), generator=gen).to(F64)
    return X @ Y * 2.0 ** draw(st.integers(-40, 40)), r


@THOROUGH
@given(integer_low_rank(), st.sampled_from((torch.float32, F64)))
def test_rank_r_weight_has_at_most_r_eligible_directions(case, svd_dtype):
    """Singular values that are zero in exact arithmetic fall under the tolerance."""
    W, r = case
    _, sigma, _ = svd_basis(W, dtype=svd_dtype)
    assert int(eligible_directions(sigma, tuple(W.shape)).sum()) <= r


@THOROUGH
@given(st.data(), st.sampled_from((torch.float32, F64)))
def test_rank_deficient_weight_has_no_nan_rates(data, svd_dtype):
    """Rates are finite, >= 0, and exactly 0 off the eligible set; selection stays eligible."""
    W, _ = data.draw(integer_low_rank())
    dW = data.draw(updates(*W.shape))
    U, sigma, V = svd_basis(W, dtype=svd_dtype)
    eligible = eligible_directions(sigma, tuple(W.shape))
    rates = change_rates(coordinates(dW, U, V), sigma, eligible)
    assert torch.isfinite(rates).all() and (rates >= 0).all()
    assert (rates[~eligible] == 0).all()
    s = int(eligible.sum())
    if s >= 1:
        assert eligible[select_directions(rates, eligible, s)].all()


# --- change_rates ---------------------------------------------------------------------------------


@FAST
@given(
    st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(1e-6, 1e6), st.booleans()), min_size=1, max_size=24),
    st.sampled_from((0.0, 1e-8, 0.5, 3.0)),
)
def test_change_rate_is_abs_coordinate_over_sigma_plus_eps(entries, eps):
    """ρ_i = |c_i| / (σ_i + eps) on eligible directions (METHOD §2)."""
    coords, sigma, eligible = zip(*entries)
    rates = change_rates(torch.tensor(coords, dtype=F64), torch.tensor(sigma, dtype=F64), torch.tensor(eligible), eps)
    for rate, c, sig, ok in zip(rates.tolist(), coords, sigma, eligible):
        if ok:
            assert math.isclose(rate, abs(c) / (sig + eps), rel_tol=1e-15)


@FAST
@given(
    st.lists(
        st.tuples(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from((0.0, 1e-300, 1.0))),
        min_size=1,
        max_size=24,
    ),
    st.sampled_from((0.0, 1e-3)),
)
def test_ineligible_rates_are_zero(entries, eps):
    """Off the eligible set the rate is exactly 0, even for σ = 0 or a non-finite coordinate."""
    coords, sigma = (torch.tensor(column, dtype=F64) for column in zip(*entries))
    rates = change_rates(coords, sigma, torch.zeros_like(sigma, dtype=torch.bool), eps)
    assert torch.equal(rates, torch.zeros_like(rates))


@pytest.mark.parametrize("eps", [-1e-12, -1.0, -math.inf])
def test_negative_eps_raises(eps):
    with pytest.raises(ValueError, match=re.escape(str(eps))):
        change_rates(torch.ones(3), torch.ones(3), torch.ones(3, dtype=torch.bool), eps)


# --- select_directions ----------------------------------------------------------------------------


@THOROUGH
@given(rate_vectors(values=st.sampled_from((0.0, 1.0, 2.5, 2.5 + 1e-9, 1e6))), st.data())
def test_selection_is_top_s_by_rate_then_lower_index(vectors, data):
    """The s largest eligible rates, larger first, equal rates by lower index (int64, shape (s,))."""
    rates, eligible = vectors
    n_eligible = int(eligible.sum())
    if n_eligible == 0:
        return
    s = data.draw(st.integers(1, n_eligible))
    index = select_directions(rates, eligible, s)
    assert index.dtype == torch.int64 and index.shape == (s,)
    assert index.tolist() == expected_selection(rates, eligible, s)


@FAST
@given(st.integers(1, 24), st.floats(0.0, 1e6), st.data())
def test_ties_break_by_lower_index(k, rate, data):
    """All rates equal: the selection is the first s eligible indices, in increasing order."""
    eligible = torch.tensor(data.draw(st.lists(st.booleans(), min_size=k, max_size=k)))
    candidates = torch.nonzero(eligible).flatten().tolist()
    if not candidates:
        return
    s = data.draw(st.integers(1, len(candidates)))
    index = select_directions(torch.full((k,), rate, dtype=F64), eligible, s)
    assert index.tolist() == candidates[:s]


@FAST
@given(rate_vectors(), st.data())
def test_ineligible_directions_are_never_selected(vectors, data):
    """Even with the largest rates, ineligible directions are skipped."""
    rates, eligible = vectors
    n_eligible = int(eligible.sum())
    if n_eligible == 0:
        return
    rates = torch.where(eligible, rates, rates.max() + 1e9)
    index = select_directions(rates, eligible, data.draw(st.integers(1, n_eligible)))
    assert eligible[index].all()


@FAST
@given(rate_vectors(), st.integers(1, 30))
def test_fewer_than_s_eligible_raises(vectors, extra):
    rates, eligible = vectors
    with pytest.raises(ValueError):
        select_directions(rates, eligible, int(eligible.sum()) + extra)


@pytest.mark.parametrize("s", [0, -1, -8])
def test_s_below_one_raises(s):
    with pytest.raises(ValueError, match=re.escape(f"got {s}")):
        select_directions(torch.ones(4), torch.ones(4, dtype=torch.bool), s)


@FAST
@given(rate_vectors(), st.sampled_from((math.nan, math.inf, -math.inf)), st.data())
def test_non_finite_eligible_rate_raises(vectors, bad, data):
    rates, eligible = vectors
    candidates = torch.nonzero(eligible).flatten().tolist()
    if not candidates:
        return
    rates[data.draw(st.sampled_from(candidates))] = bad
    with pytest.raises(ValueError):
        select_directions(rates, eligible, data.draw(st.integers(1, len(candidates))))


# --- pick_directions: the TSDs and the baseline strategies ----------------------------------------


@st.composite
def pickable(draw):
    """(rates, eligible, s, coords) with 1 <= s <= the number of eligible directions; |coords| may tie."""
    rates, eligible = draw(rate_vectors())
    eligible[draw(st.integers(0, eligible.numel() - 1))] = True
    k = rates.numel()
    magnitudes = draw(st.lists(st.sampled_from((0.0, 1.0, 2.5, 1e6)), min_size=k, max_size=k))
    signs = draw(st.lists(st.sampled_from((-1.0, 1.0)), min_size=k, max_size=k))
    coords = torch.tensor(magnitudes, dtype=F64) * torch.tensor(signs, dtype=F64)
    return rates, eligible, draw(st.integers(1, int(eligible.sum()))), coords


@THOROUGH
@given(pickable(), st.sampled_from(STRATEGIES), seeds)
def test_every_strategy_returns_s_distinct_eligible_indices(case, strategy, seed):
    rates, eligible, s, coords = case
    index = pick_directions(rates, eligible, s, strategy, generator(seed), coords)
    assert index.dtype == torch.long and index.shape == (s,)
    assert index.unique().numel() == s
    assert eligible[index].all()


@THOROUGH
@given(pickable())
def test_tsd_strategy_is_the_default_and_is_select_directions(case):
    rates, eligible, s, _ = case
    expected = select_directions(rates, eligible, s)
    assert torch.equal(pick_directions(rates, eligible, s), expected)
    assert torch.equal(pick_directions(rates, eligible, s, "tsd", generator(0)), expected)


@THOROUGH
@given(pickable())
def test_largest_and_smallest_sigma_pick_the_ends_of_the_eligible_set(case):
    """σ descends with the index, so the largest σ are the first eligible indices, the smallest the last;
    ineligible directions are skipped, and rates play no part."""
    rates, eligible, s, _ = case
    candidates = [i for i in range(eligible.numel()) if eligible[i]]
    assert pick_directions(rates, eligible, s, "largest_sigma").tolist() == candidates[:s]
    assert pick_directions(rates, eligible, s, "smallest_sigma").tolist() == candidates[::-1][:s]


@FAST
@given(pickable(), seeds)
def test_random_strategy_is_reproducible_with_the_same_seed(case, seed):
    rates, eligible, s, _ = case
    first = pick_directions(rates, eligible, s, "random", generator(seed))
    assert torch.equal(pick_directions(rates, eligible, s, "random", generator(seed)), first)


def test_random_strategy_differs_across_seeds():
    # 20 seeds drawing 8 of 256: two equal draws would be a coincidence of odds below 1 in 10¹².
    rates, eligible = torch.rand(256), torch.ones(256, dtype=torch.bool)
    draws = {tuple(pick_directions(rates, eligible, 8, "random", generator(seed)).tolist()) for seed in range(20)}
    assert len(draws) == 20


def test_random_strategy_is_uniform_over_the_eligible_directions():
    eligible = torch.tensor([True, False, True, True, False, True, True, True])
    rates = torch.arange(8.0)  # rates must not matter
    gen, draws = generator(0), 6000
    counts = torch.zeros(8)
    for _ in range(draws):
        counts[pick_directions(rates, eligible, 2, "random", gen)] += 1
    assert not counts[~eligible].any()
    expected = draws * 2 / 6  # each of the 6 eligible directions is in a draw of 2 with probability 1/3
    assert ((counts[eligible] - expected).abs() < 5 * math.sqrt(expected)).all()


def test_random_strategy_without_a_generator_is_rejected():
    with pytest.raises(ValueError, match="Generator"):
        pick_directions(torch.ones(4), torch.ones(4, dtype=torch.bool), 2, "random")


@pytest.mark.parametrize("strategy", ["TSD", "largest", "", "top"])
def test_unknown_strategy_is_rejected_naming_the_valid_ones(strategy):
    with pytest.raises(ValueError, match=re.escape(repr(strategy))) as error:
        pick_directions(torch.ones(4), torch.ones(4, dtype=torch.bool), 2, strategy, generator(0))
    assert all(valid in str(error.value) for valid in STRATEGIES)


@FAST
@given(rate_vectors(), st.sampled_from(STRATEGIES), st.integers(1, 30))
def test_every_strategy_refuses_fewer_than_s_eligible(vectors, strategy, extra):
    rates, eligible = vectors
    with pytest.raises(ValueError, match="eligible"):
        pick_directions(rates, eligible, int(eligible.sum()) + extra, strategy, generator(0), rates)


@THOROUGH
@given(pickable())
def test_coordinate_strategy_is_top_s_by_absolute_coordinate_then_lower_index(case):
    """The s largest |c_i| among eligible directions, larger first, ties to the lower index; rates unused."""
    rates, eligible, s, coords = case
    expected = expected_selection(coords.abs(), eligible, s)
    assert pick_directions(rates, eligible, s, "coordinate", coords=coords).tolist() == expected
    assert pick_directions(rates.flip(0), eligible, s, "coordinate", coords=coords).tolist() == expected


@FAST
@given(pickable(), st.integers(-30, 30), st.data())
def test_coordinate_strategy_ignores_signs_and_scale(case, exponent, data):
    """Flipping signs of c or rescaling it by ±2^e keeps the selection (invariants 2 and 4)."""
    rates, eligible, s, coords = case
    k = coords.numel()
    flips = torch.tensor(data.draw(st.lists(st.sampled_from((-1.0, 1.0)), min_size=k, max_size=k)), dtype=F64)
    expected = pick_directions(rates, eligible, s, "coordinate", coords=coords)
    for changed in (flips * coords, -(2.0**exponent) * coords):
        assert torch.equal(pick_directions(rates, eligible, s, "coordinate", coords=changed), expected)


def test_coordinate_strategy_finds_a_planted_update_at_large_sigma_where_tsd_does_not():
    """ΔW = noise + large coordinates on the 3 largest-σ directions: "coordinate" finds them; "tsd" picks
    the smallest σ instead, where dividing by σ inflates the noise."""
    k = 32
    sigma = torch.logspace(1, -2, k, dtype=F64)
    U, V = orthonormal(generator(0), 40, k), orthonormal(generator(1), k, k)
    W = U @ torch.diag(sigma) @ V.mT
    a = torch.zeros(k, dtype=F64)
    a[:3] = torch.tensor([5.0, -4.0, 3.0])
    noise = 0.1 * torch.randn(*W.shape, generator=generator(2), dtype=F64)
    c = coordinates(noise + U @ torch.diag(a) @ V.mT, U, V)
    eligible = eligible_directions(sigma, tuple(W.shape))
    rates = change_rates(c, sigma, eligible)
    assert pick_directions(rates, eligible, 3, "coordinate", coords=c).tolist() == [0, 1, 2]
    assert set(pick_directions(rates, eligible, 3, "tsd").tolist()) <= set(range(k - 8, k))


@pytest.mark.parametrize("coords", [None, torch.ones(3), torch.ones(4, 1)])
def test_coordinate_strategy_needs_coordinates_of_the_right_shape(coords):
    with pytest.raises(ValueError, match="coords of shape \\(4,\\)"):
        pick_directions(torch.ones(4), torch.ones(4, dtype=torch.bool), 2, "coordinate", coords=coords)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_coordinate_strategy_refuses_a_non_finite_eligible_coordinate(bad):
    eligible = torch.tensor([True, True, False, True])
    with pytest.raises(ValueError, match="coordinates are not finite"):
        pick_directions(torch.ones(4), eligible, 2, "coordinate", coords=torch.tensor([1.0, bad, 2.0, 3.0]))
    ignored = torch.tensor([1.0, 4.0, bad, 3.0])  # non-finite but ineligible: skipped
    assert pick_directions(torch.ones(4), eligible, 2, "coordinate", coords=ignored).tolist() == [1, 3]


# --- select_task_directions: the whole selection on plain tensors ---------------------------------


@st.composite
def selection_cases(draw):
    """(W, U, σ, V, B, A, scaling, s) with a basis unique up to signs and a LoRA update on it."""
    W, U, sigma, V = draw(separated_weights())
    n, m = W.shape
    B, A, scaling = draw(lora_factors(n, m))
    s = draw(st.integers(1, min(n, m)))
    return W, U, sigma, V, B, A, scaling, s


@THOROUGH
@given(selection_cases())
def test_the_selection_takes_the_largest_change_rates_of_the_dense_update(case):
    W, U, sigma, V, B, A, scaling, s = case
    chosen = select_task_directions(W, A, B, scaling, s, svd_dtype=F64)
    dense_rates = torch.diag(U.mT @ (scaling * B @ A) @ V).abs() / sigma  # every σ is eligible here
    picked = dense_rates[chosen.index].sort(descending=True).values
    best = dense_rates.sort(descending=True).values[:s]
    assert_close(picked, best, best.max().item(), rel=1e-9)


@FAST
@given(selection_cases())
def test_the_selected_directions_are_singular_pairs_of_w(case):
    W, _, sigma, _, B, A, scaling, s = case
    U_s, V_s, index = select_task_directions(W, A, B, scaling, s, svd_dtype=F64)
    n, m = W.shape
    assert (U_s.shape, V_s.shape, index.shape, index.dtype) == ((n, s), (m, s), (s,), torch.int64)
    assert index.unique().numel() == s
    scale = sigma.max().item()
    assert_close(W @ V_s, U_s * sigma[index], scale, rel=1e-10)
    assert_close(W.mT @ U_s, V_s * sigma[index], scale, rel=1e-10)


@FAST
@given(selection_cases(), st.sampled_from((0.25, 4.0)))
def test_the_selection_sees_the_update_not_how_it_is_factored(case, c):
    W, _, _, _, B, A, scaling, s = case
    chosen = select_task_directions(W, A, B, scaling, s, svd_dtype=F64).index
    assert torch.equal(select_task_directions(W, A / c, c * B, scaling, s, svd_dtype=F64).index, chosen)


@FAST
@given(selection_cases())
def test_the_selection_picks_by_the_scores_it_reports(case):
    W, _, _, _, B, A, scaling, s = case
    scores = score_directions(W, A, B, scaling, svd_dtype=F64)
    chosen = select_task_directions(W, A, B, scaling, s, svd_dtype=F64)
    assert chosen.index.tolist() == expected_selection(scores.rates, scores.eligible, s)
    assert torch.equal(chosen.U_s, scores.U[:, chosen.index])
    assert torch.equal(chosen.V_s, scores.V[:, chosen.index])
