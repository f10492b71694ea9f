"""Tests of ``lora_dash.analysis``: change-rate spectra, the paper's TSD overlap measures, σ-ranks.

Oracles are independent of the code under test: planted weights whose basis and update coordinates
are known by construction, a direct ``torch.linalg.svd`` with explicit products, and set arithmetic on
Python lists (``sorted`` by ``(-rate, index)`` is the stable top-k rule written out).
"""

import math
import re

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from lora_dash import LoRADashLinear
from lora_dash.analysis import (
    change_rate_spectrum,
    overlap_fraction,
    relative_singular_value_ranks,
    tsd_accuracy,
    tsd_recall,
)
from lora_dash.directions import select_directions

from conftest import F64, FAST, THOROUGH, orthonormal, seeds


@st.composite
def planted_weights(draw, max_side: int = 20):
    """W = U diag(σ) Vᵀ with known U, V and distinct σ (gaps >= σ_1 / 80), any of tall/wide/square."""
    n, m = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    k = min(n, m)
    gen = torch.Generator().manual_seed(draw(seeds))
    levels = draw(st.lists(st.integers(1, 4 * k), min_size=k, max_size=k, unique=True))
    sigma = torch.tensor(sorted(levels, reverse=True), dtype=F64) * 10.0 ** draw(st.integers(-3, 3))
    U, V = orthonormal(gen, n, k), orthonormal(gen, m, k)
    return U @ torch.diag(sigma) @ V.mT, U, sigma, V


def python_top(rates: list[float], eligible: list[bool], j: int) -> set[int]:
    """The stable top-j rule written out: eligible only, larger rate first, then lower index."""
    return set(sorted((i for i in range(len(rates)) if eligible[i]), key=lambda i: (-rates[i], i))[:j])


@st.composite
def rate_pairs(draw, min_eligible: int = 16):
    """(predicted, true, predicted_eligible, true_eligible) on k >= 16 directions; rates may tie."""
    k = draw(st.integers(16, 40))
    values = st.one_of(st.integers(0, 5).map(float), st.floats(0.0, 1e3, allow_nan=False))

    def draw_rates() -> torch.Tensor:
        return torch.tensor(draw(st.lists(values, min_size=k, max_size=k)), dtype=F64)

    def draw_mask() -> torch.Tensor:
        mask = torch.ones(k, dtype=torch.bool)
        mask[sorted(draw(st.sets(st.integers(0, k - 1), max_size=k - min_eligible)))] = False
        return mask

    return draw_rates(), draw_rates(), draw_mask(), draw_mask()


# --- change_rate_spectrum --------------------------------------------------------------------------


@THOROUGH
@given(planted_weights(), seeds, st.sampled_from((0.0, 1e-3, 1.0)))
def test_spectrum_of_a_planted_update_is_known(planted, seed, eps):
    """ΔW = U (diag(a) + N) Vᵀ with N zero on the diagonal: σ as planted, c = a, ρ = |a| / (σ + eps)."""
    W, U, sigma, V = planted
    k = sigma.numel()
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k, generator=gen, dtype=F64)
    off_diagonal = torch.randn(k, k, generator=gen, dtype=F64) * (1 - torch.eye(k, dtype=F64))
    spectrum = change_rate_spectrum(W, U @ (torch.diag(a) + off_diagonal) @ V.mT, eps=eps, svd_dtype=F64)
    scale = sigma[0].item()
    torch.testing.assert_close(spectrum.sigma, sigma, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(spectrum.coords, a, rtol=0, atol=1e-11 * (1 + off_diagonal.abs().max().item()))
    torch.testing.assert_close(spectrum.rates, a.abs() / (sigma + eps), rtol=1e-9, atol=0)
    assert spectrum.eligible.all()


@FAST
@given(st.integers(1, 20), st.integers(1, 20), seeds)
def test_spectrum_equals_an_explicit_svd_and_projection(n, m, seed):
    """σ = svdvals(W), c = diag(Uᵀ ΔW V) and ρ = |c| / σ, from torch.linalg.svd in float64 directly."""
    gen = torch.Generator().manual_seed(seed)
    W, dW = torch.randn(n, m, generator=gen, dtype=F64), torch.randn(n, m, generator=gen, dtype=F64)
    U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)
    coords = torch.diagonal(U.mT @ dW @ Vh.mT)
    assume(sigma.min() > 1e-6 * sigma[0])  # a Gaussian W is well conditioned but for rare draws
    gaps = (sigma[:-1] - sigma[1:]).min().item() if sigma.numel() > 1 else 1.0
    assume(gaps > 1e-4 * sigma[0])  # distinct σ: a unique basis, so coordinates are comparable
    spectrum = change_rate_spectrum(W, dW, svd_dtype=F64)
    torch.testing.assert_close(spectrum.sigma, sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(spectrum.coords, coords, rtol=0, atol=1e-8)
    torch.testing.assert_close(spectrum.rates, coords.abs() / sigma, rtol=1e-7, atol=1e-8)


@FAST
@given(planted_weights(), seeds, st.sampled_from((torch.float16, torch.bfloat16, torch.float32, F64)))
def test_spectrum_is_float32_by_default_and_float64_on_request(planted, seed, input_dtype):
    """The SVD runs in float32 unless float64 is asked for, whatever the weight's dtype; both agree."""
    W = planted[0]
    W = (W / W.abs().max()).to(input_dtype)
    dW = torch.randn(W.shape, generator=torch.Generator().manual_seed(seed)).to(input_dtype)
    default, exact = change_rate_spectrum(W, dW), change_rate_spectrum(W, dW, svd_dtype=F64)
    assert all(t.dtype == torch.float32 for t in default[:3]) and default.eligible.dtype == torch.bool
    assert all(t.dtype == F64 for t in exact[:3])
    torch.testing.assert_close(default.sigma.double(), exact.sigma, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(default.coords.double(), exact.coords, rtol=1e-4, atol=1e-4)


@FAST
@given(st.integers(2, 16), st.integers(2, 16), seeds, st.data())
def test_spectrum_of_a_rank_deficient_weight_is_finite_with_rank_many_eligible(n, m, seed, data):
    """W of rank ρ < k: exactly ρ eligible directions; rates 0 (never NaN or inf) on the others."""
    k = min(n, m)
    rank = data.draw(st.integers(0, k - 1))
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n, rank, generator=gen, dtype=F64) @ torch.randn(rank, m, generator=gen, dtype=F64)
    spectrum = change_rate_spectrum(W, torch.randn(n, m, generator=gen, dtype=F64), svd_dtype=F64)
    assert int(spectrum.eligible.sum()) == rank
    assert torch.isfinite(spectrum.rates).all()
    assert (spectrum.rates[~spectrum.eligible] == 0).all()


def test_spectrum_selects_what_launch_selects():
    """A layer's launch selection equals the top s of the spectrum of its dense update (α/r)·B A."""
    torch.manual_seed(0)
    layer = LoRADashLinear(torch.nn.Linear(24, 16).double(), r=4, alpha=8.0, s=5)
    with torch.no_grad():
        layer.lora_B.normal_()
    spectrum = change_rate_spectrum(layer.base_weight(), layer.delta_weight(), svd_dtype=F64)
    expected = select_directions(spectrum.rates, spectrum.eligible, 5)
    assert torch.equal(layer.find_directions(svd_dtype=F64).index, expected)


@pytest.mark.parametrize(
    ("weight", "delta_weight", "message"),
    [
        (torch.ones(3, 4), torch.ones(4, 3), "(3, 4) and (4, 3)"),
        (torch.ones(3), torch.ones(3), "(3,) and (3,)"),
        (torch.ones(2, 3, 4), torch.ones(2, 3, 4), "(2, 3, 4)"),
        (torch.ones(3, 4), torch.full((3, 4), math.nan), "delta_weight has non-finite"),
        (torch.full((3, 4), math.inf), torch.ones(3, 4), "weight has non-finite"),
    ],
)
def test_spectrum_rejects_bad_inputs(weight, delta_weight, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        change_rate_spectrum(weight, delta_weight)


# --- overlap_fraction ------------------------------------------------------------------------------

index_sets = st.lists(st.integers(0, 30), unique=True)


@THOROUGH
@given(index_sets.filter(bool), index_sets, st.sampled_from((torch.int64, torch.int32)))
def test_overlap_fraction_is_the_set_intersection_fraction(candidates, container, dtype):
    """|a ∩ b| / |a| as Python sets compute it."""
    expected = len(set(candidates) & set(container)) / len(candidates)
    actual = overlap_fraction(torch.tensor(candidates, dtype=dtype), torch.tensor(container, dtype=torch.int64))
    assert actual == pytest.approx(expected, abs=1e-15)


@FAST
@given(index_sets.filter(bool), index_sets)
def test_overlap_fraction_is_one_exactly_for_a_subset(candidates, extra):
    """a ⊆ a ∪ b gives 1.0; a and b \\ a disjoint gives 0.0."""
    a = torch.tensor(candidates)
    assert overlap_fraction(a, torch.tensor(sorted(set(candidates) | set(extra)))) == 1.0
    assert overlap_fraction(a, torch.tensor(sorted(set(extra) - set(candidates)), dtype=torch.int64)) == 0.0


@pytest.mark.parametrize(
    ("candidates", "container", "message"),
    [
        (torch.tensor([1, 2, 2]), torch.tensor([1]), "subset_candidates has repeated entries"),
        (torch.tensor([1, 2]), torch.tensor([3, 3]), "container has repeated entries"),
        (torch.tensor([], dtype=torch.int64), torch.tensor([1]), "empty"),
        (torch.tensor([1.0, 2.0]), torch.tensor([1]), "1-D integer tensor"),
        (torch.tensor([True]), torch.tensor([1]), "1-D integer tensor"),
        (torch.tensor([[1, 2]]), torch.tensor([1]), "1-D integer tensor"),
    ],
)
def test_overlap_fraction_rejects_bad_index_sets(candidates, container, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        overlap_fraction(candidates, container)


# --- tsd_recall, tsd_accuracy ----------------------------------------------------------------------


@pytest.mark.parametrize("measure", [tsd_recall, tsd_accuracy], ids=["recall", "accuracy"])
@THOROUGH
@given(rate_pairs(), st.integers(1, 16), st.integers(1, 16))
def test_recall_and_accuracy_are_the_overlap_of_the_two_tops_over_t_and_p(measure, pair, predicted_top, true_top):
    """recall = |top_t(ρ_true) ∩ top_p(ρ_pred)| / t, accuracy = the same overlap / p, by the Python set
    oracle, masks included."""
    predicted, true, predicted_mask, true_mask = pair
    P = python_top(predicted.tolist(), predicted_mask.tolist(), predicted_top)
    T = python_top(true.tolist(), true_mask.tolist(), true_top)
    actual = measure(predicted, true, predicted_mask, true_mask, predicted_top=predicted_top, true_top=true_top)
    denominator = true_top if measure is tsd_recall else predicted_top
    assert actual == pytest.approx(len(P & T) / denominator, abs=1e-15)


@THOROUGH
@given(st.integers(16, 64), seeds, st.data())
def test_planted_prediction_gives_the_planted_recall_and_accuracy(k, seed, data):
    """Defaults 8/4/16: plant the true top-4, top-16 and a predicted top-8; the measures count overlaps.

    True rates: the 4 planted leaders in [3, 4), the next 12 in [2, 3), the rest in [0, 1). Predicted
    rates: the planted 8 in [2, 3), the rest in [0, 1). So recall = |T4 ∩ P8| / 4 and
    accuracy = |P8 ∩ T16| / 8 by construction.
    """
    gen = torch.Generator().manual_seed(seed)
    order = data.draw(st.permutations(range(k)))
    T4, T16 = set(order[:4]), set(order[:16])
    P8 = set(data.draw(st.permutations(range(k)))[:8])
    true = torch.rand(k, generator=gen, dtype=F64)
    true[list(T16)] = 2 + torch.rand(16, generator=gen, dtype=F64)
    true[list(T4)] = 3 + torch.rand(4, generator=gen, dtype=F64)
    predicted = torch.rand(k, generator=gen, dtype=F64)
    predicted[list(P8)] = 2 + torch.rand(8, generator=gen, dtype=F64)
    assert tsd_recall(predicted, true) == len(T4 & P8) / 4
    assert tsd_accuracy(predicted, true) == len(P8 & T16) / 8


@FAST
@given(rate_pairs(), st.floats(1e-6, 1e6))
def test_predicting_the_truth_scores_one_and_rescaling_changes_nothing(pair, factor):
    """ρ_pred = c·ρ_true (c > 0) ranks like the truth: recall and accuracy are both 1."""
    true, mask = pair[1], pair[3]
    assert tsd_recall(factor * true, true, mask, mask) == 1.0
    assert tsd_accuracy(factor * true, true, mask, mask) == 1.0


def test_ineligible_directions_are_never_counted():
    """A huge rate on an ineligible direction neither enters a top set nor scores."""
    true = torch.arange(20, 0, -1, dtype=F64)  # true top-4 = {0, 1, 2, 3}
    predicted = true.clone()
    predicted[[0, 1]] = 1e9  # still the predicted leaders, but ineligible below
    mask = torch.ones(20, dtype=torch.bool)
    mask[[0, 1]] = False
    # Predicted top-8 over eligible = {2..9}; the true top-4 over all = {0..3}: recall 2/4.
    assert tsd_recall(predicted, true, predicted_eligible=mask) == 0.5
    # With the mask on both: true top-4 = {2..5} ⊆ predicted top-8.
    assert tsd_recall(predicted, true, mask, mask) == 1.0


@pytest.mark.parametrize("measure", [tsd_recall, tsd_accuracy])
@pytest.mark.parametrize(
    ("predicted", "true", "kwargs", "message"),
    [
        (torch.rand(20), torch.rand(19), {}, "(20,) and (19,)"),
        (torch.rand(2, 10), torch.rand(2, 10), {}, "predicted rates must be 1-D"),
        (torch.rand(12), torch.rand(12), {"true_top": 13}, "true_top must be an int in [1, k=12], got 13"),
        (torch.rand(7), torch.rand(7), {}, "predicted_top must be an int in [1, k=7], got 8"),
        (torch.rand(20), torch.rand(20), {"predicted_top": 0}, "predicted_top must be an int in [1, k=20], got 0"),
        (torch.rand(20), torch.rand(20), {"true_top": True}, "true_top must be an int"),
        (
            torch.rand(20),
            torch.rand(20),
            {"predicted_eligible": torch.arange(20) < 5},
            "predicted rates: only 5 of 20 directions are eligible, fewer than s=8",
        ),
        (
            torch.rand(20),
            torch.rand(20),
            {"true_eligible": torch.ones(19, dtype=torch.bool)},
            "true eligible must be a bool mask of shape (20,)",
        ),
        (
            torch.rand(20),
            torch.rand(20),
            {"true_eligible": torch.ones(20)},
            "true eligible must be a bool mask of shape (20,)",
        ),
    ],
)
def test_measures_reject_bad_arguments(measure, predicted, true, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        measure(predicted, true, **kwargs)


# --- relative_singular_value_ranks -----------------------------------------------------------------


@THOROUGH
@given(st.integers(1, 500), st.data())
def test_relative_rank_is_index_over_k_minus_one(k, data):
    """index i of k directions has relative rank i / (k - 1) (0 when k = 1): 0 = largest σ, 1 = smallest."""
    index = data.draw(st.lists(st.integers(0, k - 1), max_size=20))
    ranks = relative_singular_value_ranks(torch.tensor(index, dtype=torch.int64), k)
    assert ranks.dtype == torch.float32 and ranks.shape == (len(index),)
    expected = [i / (k - 1) if k > 1 else 0.0 for i in index]
    assert ranks.tolist() == pytest.approx(expected, rel=1e-6, abs=0)


def test_relative_ranks_of_the_ends_are_zero_and_one():
    assert relative_singular_value_ranks(torch.tensor([0, 9]), 10).tolist() == [0.0, 1.0]
    assert relative_singular_value_ranks(torch.tensor([0]), 1).tolist() == [0.0]


@FAST
@given(planted_weights(), st.data())
def test_selected_tsds_sit_at_their_planted_singular_value_ranks(planted, data):
    """Plant TSDs on chosen directions; spectrum → selection → relative ranks returns those positions."""
    W, U, sigma, V = planted
    k = sigma.numel()
    chosen = data.draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=k, unique=True))
    a = 0.01 * sigma.clone()  # uniform background rate 0.01
    a[chosen] = sigma[chosen] * (1 + torch.arange(len(chosen), dtype=F64))  # planted rates 1, 2, …
    spectrum = change_rate_spectrum(W, U @ torch.diag(a) @ V.mT, svd_dtype=F64)
    index = select_directions(spectrum.rates, spectrum.eligible, len(chosen))
    ranks = relative_singular_value_ranks(index, k)
    assert sorted(ranks.tolist()) == pytest.approx(sorted(i / max(k - 1, 1) for i in chosen), abs=1e-7)


@pytest.mark.parametrize(
    ("index", "k", "message"),
    [
        (torch.tensor([0, 10]), 10, "[0, k=10)"),
        (torch.tensor([-1]), 10, "[0, k=10)"),
        (torch.tensor([0]), 0, "k must be an int >= 1, got 0"),
        (torch.tensor([0]), True, "k must be an int >= 1, got True"),
        (torch.tensor([0.5]), 10, "1-D integer tensor"),
        (torch.tensor([[0]]), 10, "1-D integer tensor"),
    ],
)
def test_relative_ranks_reject_bad_arguments(index, k, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        relative_singular_value_ranks(index, k)
