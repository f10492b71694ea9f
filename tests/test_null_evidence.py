"""Tests of the null-calibrated TSD diagnostic (``analysis.null_evidence``, ``analysis.model_null_evidence``)
and of the ``"coordinate"`` strategy through ``launch``.

Oracles: the null's claim itself, checked on real Gaussian updates pushed through the library's
coordinate formulas (Kolmogorov-Smirnov distances written out below); the closed form of the two-
direction case (a ratio of two Gaussians is Cauchy); symmetry (equal σ: every direction is selected with
probability s/k); and binomial counts over many seeds for the false-positive rate. Statistical checks use
fixed seeds, so they are deterministic, with tolerances of 4 to 5 standard errors.
"""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_dash
from lora_dash import directions
from lora_dash.analysis import (
    NULL_EVIDENCE_STRATEGIES,
    change_rate_spectrum,
    evidence_summary,
    model_null_evidence,
    null_coordinates,
    null_evidence,
)
from lora_dash.schedule import layer_generators

from conftest import F64, generator, orthonormal, seeds
from helpers import assert_unchanged, build_adapted, snapshot, train

FAST = settings(max_examples=30, deadline=None)  # each example draws thousands of null updates


def planted_weight(n: int, m: int, sigma: torch.Tensor, seed: int):
    """W = U diag(σ) Vᵀ with known orthonormal U (n, k) and V (m, k)."""
    gen = generator(seed)
    k = sigma.numel()
    U, V = orthonormal(gen, n, k), orthonormal(gen, m, k)
    return U @ torch.diag(sigma) @ V.mT, U, V


def ks_normal(samples: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the samples' empirical CDF and N(0, 1)'s."""
    x = samples.flatten().sort().values
    cdf = torch.special.ndtr(x)
    n = x.numel()
    above = torch.arange(1, n + 1, dtype=F64) / n - cdf
    below = cdf - torch.arange(n, dtype=F64) / n
    return max(above.max().item(), below.max().item())


def ks_two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between two samples' empirical CDFs."""
    a, b = a.flatten().sort().values, b.flatten().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True) / a.numel()
    cdf_b = torch.searchsorted(b, grid, right=True) / b.numel()
    return (cdf_a - cdf_b).abs().max().item()


# 1.95 / √n is the Kolmogorov distribution's 0.1 % critical value.
KS_CRITICAL = 1.95


# --- the null, checked on real updates ------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 8), (5, 9)])
def test_coordinates_of_a_dense_gaussian_update_are_iid_gaussian_whatever_W(shape):
    """ΔW with i.i.d. N(0, τ²) entries: c = diag(Uᵀ ΔW V) is N(0, τ² I), even for σ over 6 decades."""
    n, m = shape
    k, draws, tau = min(n, m), 3000, 0.37
    W, _, _ = planted_weight(n, m, torch.logspace(3, -3, k, dtype=F64), seed=1)
    U, _, V = directions.svd_basis(W, dtype=F64)
    updates = tau * torch.randn(draws, n, m, generator=generator(2), dtype=F64)
    coords = torch.stack([directions.coordinates(update, U, V) for update in updates]) / tau  # (draws, k)
    covariance = coords.mT @ coords / draws
    assert (covariance - torch.eye(k, dtype=F64)).abs().max() < 0.12  # entries' standard error <= 0.026
    assert ks_normal(coords) < KS_CRITICAL / math.sqrt(coords.numel())


@pytest.mark.parametrize("rank", [1, 2, 5, 8])
def test_coordinates_of_gaussian_lora_factors_follow_the_factor_null(rank):
    """B: (n, r), A: (r, m) i.i.d. Gaussian (any variances): c / (scaling·a·b) has null_coordinates' law."""
    n, m, draws = 10, 7, 3000
    k = min(n, m)
    W, _, _ = planted_weight(n, m, torch.logspace(2, -2, k, dtype=F64), seed=3)
    U, _, V = directions.svd_basis(W, dtype=F64)
    gen, a, b, scaling = generator(4), 0.3, 2.5, 16 / rank
    coords = torch.stack(
        [
            directions.coordinates_from_factors(
                b * torch.randn(n, rank, generator=gen, dtype=F64),
                a * torch.randn(rank, m, generator=gen, dtype=F64),
                scaling,
                U,
                V,
            )
            for _ in range(draws)
        ]
    ) / (scaling * a * b)
    null = null_coordinates(draws, k, factor_rank=rank, generator=generator(5))
    assert null.shape == (draws, k) and null.dtype == F64
    assert ks_two_sample(coords, null) < KS_CRITICAL * math.sqrt(2 / coords.numel())
    for sample in (coords, null):  # uncorrelated, variance r, kurtosis 3 + 6/r
        covariance = sample.mT @ sample / draws
        assert (covariance - rank * torch.eye(k, dtype=F64)).abs().max() < 0.15 * rank
        kurtosis = sample.pow(4).mean() / sample.square().mean().square()
        assert abs(kurtosis.item() - (3 + 6 / rank)) < 0.1 * (3 + 6 / rank)


def test_the_factor_null_is_heavier_tailed_than_the_dense_null():
    """The rank-1 law (kurtosis 9) is not the Gaussian (kurtosis 3): the two nulls differ."""
    dense, rank_1 = (null_coordinates(20000, 4, rank, generator(6)) for rank in (None, 1))
    assert ks_normal(dense) < KS_CRITICAL / math.sqrt(dense.numel())
    assert ks_two_sample(dense, rank_1) > 10 * KS_CRITICAL * math.sqrt(2 / dense.numel())


# --- the statistic against closed forms -----------------------------------------------------------


def two_direction_tail(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """P(share ≥ x) for k = 2, s = 1 under the dense null, x in [1/2, 1].

    T = ρ_1/ρ_2 = |z_1/z_2| · σ_2/σ_1 with z_1/z_2 standard Cauchy, P(|C| ≤ t) = (2/π)·atan(t), and
    share = max(T, 1)/(1 + T) ≥ x iff T ≥ x/(1-x) or T ≤ (1-x)/x; ``ratio`` = σ_1/σ_2.
    """
    return 1 - 2 / math.pi * torch.atan(ratio * x / (1 - x)) + 2 / math.pi * torch.atan(ratio * (1 - x) / x)


@FAST
@given(st.floats(1.0, 100.0), st.floats(1e-3, 1e3), st.floats(-3.0, 3.0), st.floats(-3.0, 3.0), seeds)
def test_two_directions_match_the_cauchy_closed_form(ratio, scale, c1, c2, seed):
    """k = 2, s = 1: p-value, null mean and spread, and selection probability against exact values."""
    sigma = torch.tensor([ratio * scale, scale], dtype=F64)
    coords = torch.tensor([c1, c2], dtype=F64)
    rates = coords.abs() / sigma
    if not rates.any():  # a zero (or underflowing) update has no share
        return
    draws = 4000
    eligible = torch.ones(2, dtype=torch.bool)
    evidence = null_evidence(sigma, coords, eligible, 1, draws=draws, generator=generator(seed))
    share = (rates.max() / rates.sum()).item()
    assert evidence.share == pytest.approx(share, rel=1e-12)
    assert evidence.index.tolist() == [0 if rates[0] >= rates[1] else 1]

    exact_p = two_direction_tail(torch.tensor(share, dtype=F64), ratio).clamp(0, 1).item()
    assert abs(evidence.p_value - exact_p) <= 5 * math.sqrt(exact_p * (1 - exact_p) / draws) + 2 / draws

    # P(direction 0 is selected) = P(|C| > σ_1/σ_2) = 1 - (2/π)·atan(ratio).
    first = 1 - 2 / math.pi * math.atan(ratio)
    exact_selected = first if evidence.index.item() == 0 else 1 - first
    tolerance = 5 * math.sqrt(exact_selected * (1 - exact_selected) / draws) + 1 / draws
    assert abs(evidence.selection_probability.item() - exact_selected) <= tolerance

    # E[share^j] = 2^-j + ∫ j x^(j-1) P(share ≥ x) dx over [1/2, 1]; then the mean, the variance and the
    # standard error of the sample variance, √((μ_4 - σ⁴) / draws).
    x = torch.linspace(0.5, 1.0, 200_001, dtype=F64)[:-1]
    tail = two_direction_tail(x, ratio)
    m1, m2, m3, m4 = (0.5**j + torch.trapezoid(j * x ** (j - 1) * tail, x).item() for j in (1, 2, 3, 4))
    variance = m2 - m1**2
    fourth = m4 - 4 * m3 * m1 + 6 * m2 * m1**2 - 3 * m1**4
    assert abs(evidence.null_mean - m1) <= 5 * math.sqrt(variance / draws) + 1e-6
    assert abs(evidence.null_std**2 - variance) <= 5 * math.sqrt(max(fourth - variance**2, 0.0) / draws) + 1e-6


@pytest.mark.parametrize("factor_rank", [None, 3])
@pytest.mark.parametrize("k, s", [(10, 1), (12, 4)])
def test_equal_singular_values_select_every_direction_with_probability_s_over_k(factor_rank, k, s):
    """By symmetry each direction is in the top s with probability s/k, whatever the coordinates."""
    coords = torch.randn(k, generator=generator(7), dtype=F64)
    draws = 4000
    evidence = null_evidence(
        torch.full((k,), 2.0, dtype=F64),
        coords,
        torch.ones(k, dtype=torch.bool),
        s,
        factor_rank=factor_rank,
        draws=draws,
        generator=generator(8),
    )
    expected = s / k
    tolerance = 5 * math.sqrt(expected * (1 - expected) / draws)
    assert ((evidence.selection_probability - expected).abs() <= tolerance).all()


def test_a_tiny_singular_value_is_selected_by_any_update():
    """σ_k = 10⁻⁶ σ_1: 1/σ makes that direction the top rate under the null almost surely."""
    sigma = torch.cat([torch.linspace(2.0, 1.0, 15, dtype=F64), torch.tensor([1e-6], dtype=F64)])
    coords = torch.randn(16, generator=generator(9), dtype=F64)
    evidence = null_evidence(sigma, coords, torch.ones(16, dtype=torch.bool), 1, draws=500)
    assert evidence.index.tolist() == [15] and evidence.selection_probability.item() > 0.99
    assert evidence.p_value > 0.01  # the observed share is what the null gives


# --- properties: planted, Gaussian, invariances ---------------------------------------------------


@FAST
@given(st.integers(16, 48), st.integers(1, 8), seeds, st.data())
def test_a_planted_update_is_flagged(k, s, seed, data):
    """ΔW = τ·G + Σ_{i∈P} ±100τ u_i v_iᵀ on s planted directions (σ within 4×): p at its floor."""
    sigma = torch.linspace(4.0, 1.0, k, dtype=F64)
    W, U, V = planted_weight(k + 3, k, sigma, seed)
    planted = data.draw(st.lists(st.integers(0, k - 1), min_size=s, max_size=s, unique=True))
    signs = torch.tensor(data.draw(st.lists(st.sampled_from((-1.0, 1.0)), min_size=s, max_size=s)), dtype=F64)
    tau = 0.01
    a = torch.zeros(k, dtype=F64)
    a[planted] = 100 * tau * signs
    update = tau * torch.randn(k + 3, k, generator=generator(seed + 1), dtype=F64) + U @ torch.diag(a) @ V.mT
    spectrum = change_rate_spectrum(W, update, svd_dtype=F64)
    for factor_rank, strategy in ((None, "tsd"), (8, "tsd"), (None, "coordinate"), (8, "coordinate")):
        evidence = null_evidence(
            spectrum.sigma,
            spectrum.coords,
            spectrum.eligible,
            s,
            factor_rank=factor_rank,
            draws=199,
            strategy=strategy,
        )
        assert evidence.p_value == 1 / 200
        assert sorted(evidence.index.tolist()) == sorted(planted)
        assert evidence.share > evidence.null_mean + 3 * evidence.null_std


def false_positive_rate(
    update_rank: int | None, null_rank: int | None, runs: int = 300, strategy: str = "tsd"
) -> dict[float, float]:
    """The fraction of Gaussian updates (dense, or rank-r Gaussian factors) with p <= α, at draws = 99."""
    n, m, s = 24, 16, 4
    W = torch.randn(n, m, generator=generator(123), dtype=F64)
    U, sigma, V = directions.svd_basis(W, dtype=F64)
    eligible = directions.eligible_directions(sigma, (n, m))
    p_values = []
    for run in range(runs):
        gen = generator(run)
        if update_rank is None:
            coords = directions.coordinates(torch.randn(n, m, generator=gen, dtype=F64), U, V)
        else:
            B = torch.randn(n, update_rank, generator=gen, dtype=F64)
            A = torch.randn(update_rank, m, generator=gen, dtype=F64)
            coords = directions.coordinates_from_factors(B, A, 2.0, U, V)
        evidence = null_evidence(
            sigma,
            coords,
            eligible,
            s,
            factor_rank=null_rank,
            draws=99,
            generator=generator(runs + run),
            strategy=strategy,
        )
        p_values.append(evidence.p_value)
    p_values = torch.tensor(p_values)
    return {alpha: (p_values <= alpha).double().mean().item() for alpha in (0.05, 0.1, 0.5)}


@pytest.mark.parametrize("strategy", NULL_EVIDENCE_STRATEGIES)
@pytest.mark.parametrize("rank", [None, 1, 4])
def test_a_gaussian_update_is_flagged_at_the_stated_rate(rank, strategy):
    """With 99 draws, P(p <= α) = ⌊100 α⌋ / 100 exactly under the null: 300 updates, within 4 binomial sd."""
    runs = 300
    for alpha, rate in false_positive_rate(rank, rank, runs, strategy).items():
        assert abs(rate - alpha) <= 4 * math.sqrt(alpha * (1 - alpha) / runs), (alpha, rate)


def test_the_dense_null_is_wrong_for_a_rank_one_product():
    """A rank-1 Gaussian B A judged against the dense null is flagged far more often than α (why
    model_null_evidence defaults to the factor null)."""
    assert false_positive_rate(1, None, runs=200)[0.05] > 0.2


@FAST
@given(
    st.integers(2, 40),
    seeds,
    st.integers(-40, 40),
    st.booleans(),
    st.sampled_from((None, 2)),
    st.sampled_from(NULL_EVIDENCE_STRATEGIES),
)
def test_scaling_the_update_changes_nothing(k, seed, exponent, negative, factor_rank, strategy):
    """c → λc with λ = ±2^e (exact in floating point): every field is identical."""
    gen = generator(seed)
    sigma = torch.rand(k, generator=gen, dtype=F64).sort(descending=True).values + 0.1
    coords = torch.randn(k, generator=gen, dtype=F64)
    s = max(1, k // 4)
    factor = (-1.0 if negative else 1.0) * 2.0**exponent
    eligible = torch.ones(k, dtype=torch.bool)
    options = {"factor_rank": factor_rank, "draws": 50, "strategy": strategy}
    before = null_evidence(sigma, coords, eligible, s, **options, generator=generator(seed + 1))
    after = null_evidence(sigma, factor * coords, eligible, s, **options, generator=generator(seed + 1))
    assert_same_evidence(after, before)


@FAST
@given(st.integers(2, 40), seeds, st.floats(1e-6, 1e6), st.sampled_from(NULL_EVIDENCE_STRATEGIES))
def test_any_positive_rescaling_keeps_share_and_score(k, seed, factor, strategy):
    """c → λc for any λ > 0: the same share (to rounding), the same p-value and selection."""
    gen = generator(seed)
    sigma = torch.rand(k, generator=gen, dtype=F64) + 0.1
    coords = torch.randn(k, generator=gen, dtype=F64)
    eligible, s = torch.ones(k, dtype=torch.bool), max(1, k // 3)
    options = {"draws": 50, "strategy": strategy}
    before = null_evidence(sigma, coords, eligible, s, **options, generator=generator(seed + 1))
    after = null_evidence(sigma, factor * coords, eligible, s, **options, generator=generator(seed + 1))
    assert after.share == pytest.approx(before.share, rel=1e-12)
    assert after.p_value == before.p_value and torch.equal(after.index, before.index)


@FAST
@given(st.integers(2, 40), seeds, st.sampled_from(NULL_EVIDENCE_STRATEGIES), st.data())
def test_sign_flips_of_the_coordinates_change_nothing(k, seed, strategy, data):
    """Negating any c_i (a sign flip of (u_i, v_i) or of the update along it): identical evidence."""
    gen = generator(seed)
    sigma = torch.rand(k, generator=gen, dtype=F64) + 0.1
    coords = torch.randn(k, generator=gen, dtype=F64)
    flips = torch.tensor(data.draw(st.lists(st.sampled_from((-1.0, 1.0)), min_size=k, max_size=k)), dtype=F64)
    eligible, s = torch.ones(k, dtype=torch.bool), data.draw(st.integers(1, k))
    options = {"draws": 50, "strategy": strategy}
    before = null_evidence(sigma, coords, eligible, s, **options, generator=generator(seed + 1))
    after = null_evidence(sigma, flips * coords, eligible, s, **options, generator=generator(seed + 1))
    assert_same_evidence(after, before)


def assert_same_evidence(actual, expected) -> None:
    assert torch.equal(actual.index, expected.index)
    assert torch.equal(actual.selection_probability, expected.selection_probability)
    assert (actual.share, actual.null_mean, actual.null_std, actual.p_value, actual.draws) == (
        expected.share,
        expected.null_mean,
        expected.null_std,
        expected.p_value,
        expected.draws,
    )


@FAST
@given(st.integers(2, 20), st.integers(1, 20), seeds, st.sampled_from(NULL_EVIDENCE_STRATEGIES), st.data())
def test_ineligible_directions_play_no_part(k, extra, seed, strategy, data):
    """Adding ineligible directions (σ = 0, any coordinate, even NaN) changes nothing but the indices."""
    gen = generator(seed)
    sigma = torch.rand(k, generator=gen, dtype=F64) + 0.1
    coords = torch.randn(k, generator=gen, dtype=F64)
    s = data.draw(st.integers(1, k))
    positions = sorted(data.draw(st.permutations(range(k + extra)))[:k])
    padded_sigma, padded_coords = torch.zeros(k + extra, dtype=F64), torch.full((k + extra,), math.nan, dtype=F64)
    padded_sigma[positions], padded_coords[positions] = sigma, coords
    eligible = torch.zeros(k + extra, dtype=torch.bool)
    eligible[positions] = True
    every, options = torch.ones(k, dtype=torch.bool), {"draws": 50, "strategy": strategy}
    expected = null_evidence(sigma, coords, every, s, **options, generator=generator(seed + 1))
    actual = null_evidence(padded_sigma, padded_coords, eligible, s, **options, generator=generator(seed + 1))
    assert actual.index.tolist() == [positions[i] for i in expected.index.tolist()]
    assert_same_evidence(actual._replace(index=expected.index), expected)


@pytest.mark.parametrize("strategy, index", [("tsd", [2, 0, 3]), ("coordinate", [2, 0, 3])])
@pytest.mark.parametrize("factor_rank", [None, 4])
def test_selecting_every_eligible_direction_is_exact(factor_rank, strategy, index):
    """s = k_e: every update has share 1, so the result is exact and draws nothing."""
    eligible = torch.tensor([True, False, True, True])
    sigma, coords = torch.tensor([3.0, 2.0, 1.0, 0.5]), torch.tensor([0.1, 5.0, -0.2, 0.0])
    evidence = null_evidence(sigma, coords, eligible, 3, factor_rank=factor_rank, strategy=strategy)
    assert evidence.index.tolist() == index
    summary = (evidence.share, evidence.null_mean, evidence.null_std, evidence.p_value, evidence.draws)
    assert summary == (1, 1, 0, 1, 0)
    assert evidence.selection_probability.tolist() == [1.0, 1.0, 1.0]


def test_the_draws_follow_the_generator():
    """The same seed reproduces the evidence; no generator means seed 0; another seed moves the estimates."""
    sigma = torch.linspace(3.0, 1.0, 30, dtype=F64)
    coords = torch.randn(30, generator=generator(10), dtype=F64)
    eligible = torch.ones(30, dtype=torch.bool)

    def evidence(gen):
        return null_evidence(sigma, coords, eligible, 5, draws=200, generator=gen)

    assert_same_evidence(evidence(generator(11)), evidence(generator(11)))
    assert_same_evidence(evidence(None), evidence(generator(0)))
    assert evidence(generator(12)).null_mean != evidence(generator(11)).null_mean


def test_results_live_on_the_inputs_device_and_dtype_does_not_matter():
    """float32 inputs give the float64 evidence of the same values; index and probabilities on σ's device."""
    sigma = torch.linspace(3.0, 1.0, 20)
    coords = torch.randn(20, generator=generator(13))
    eligible = torch.ones(20, dtype=torch.bool)
    single = null_evidence(sigma, coords, eligible, 4, draws=100, generator=generator(14))
    double = null_evidence(sigma.double(), coords.double(), eligible, 4, draws=100, generator=generator(14))
    assert_same_evidence(single, double)
    assert single.index.device == sigma.device and single.selection_probability.dtype == F64


@FAST
@given(st.integers(3, 40), seeds, st.sampled_from((None, 3)), st.data())
def test_coordinate_evidence_is_the_rate_evidence_of_equal_singular_values(k, seed, factor_rank, data):
    """score = |c| is ρ with σ ≡ 1: the same share, null and p-value; and the selection probability is
    exactly s/k_e, since the null's coordinates are exchangeable."""
    gen = generator(seed)
    sigma = torch.rand(k, generator=gen, dtype=F64).sort(descending=True).values + 0.1
    coords = torch.randn(k, generator=gen, dtype=F64)
    eligible = torch.rand(k, generator=gen) < 0.8
    eligible[:2] = True
    s = data.draw(st.integers(1, int(eligible.sum()) - 1))
    options = {"factor_rank": factor_rank, "draws": 60}
    by_coordinate = null_evidence(
        sigma, coords, eligible, s, **options, generator=generator(seed + 1), strategy="coordinate"
    )
    by_rate = null_evidence(torch.ones_like(sigma), coords, eligible, s, **options, generator=generator(seed + 1))
    picked = directions.pick_directions(torch.zeros(k), eligible, s, "coordinate", coords=coords)
    assert torch.equal(by_coordinate.index, picked) and torch.equal(by_rate.index, picked)
    assert (by_coordinate.share, by_coordinate.null_mean, by_coordinate.null_std, by_coordinate.p_value) == (
        by_rate.share,
        by_rate.null_mean,
        by_rate.null_std,
        by_rate.p_value,
    )
    assert by_coordinate.selection_probability.tolist() == [s / int(eligible.sum())] * s


def test_the_rate_share_is_blind_to_signal_at_large_sigma_where_the_coordinate_share_sees_it():
    """σ over 4 decades, ΔW = noise + 8 coordinates of 8τ on the largest σ: the change rates stay led by the
    smallest σ, so the "tsd" share looks like noise; the "coordinate" share flags the update."""
    k, s = 128, 8
    sigma = torch.logspace(1, -3, k, dtype=F64)
    W, U, V = planted_weight(k, k, sigma, seed=20)
    a = torch.zeros(k, dtype=F64)
    a[:s] = 8.0
    update = torch.randn(k, k, generator=generator(21), dtype=F64) + U @ torch.diag(a) @ V.mT
    spectrum = change_rate_spectrum(W, update, svd_dtype=F64)
    evidence = {
        strategy: null_evidence(spectrum.sigma, spectrum.coords, spectrum.eligible, s, strategy=strategy)
        for strategy in NULL_EVIDENCE_STRATEGIES
    }
    assert evidence["coordinate"].p_value == 1 / 1000
    assert sorted(evidence["coordinate"].index.tolist()) == list(range(s))
    assert evidence["tsd"].p_value > 0.05 and min(evidence["tsd"].index.tolist()) >= k // 2


GOOD = {"sigma": torch.ones(4), "coords": torch.ones(4), "eligible": torch.ones(4, dtype=torch.bool), "s": 2}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"coords": torch.ones(5)}, "(4,), (5,) and (4,)"),
        ({"sigma": torch.ones(2, 2), "coords": torch.ones(2, 2), "eligible": torch.ones(2, 2).bool()}, "1-D"),
        ({"eligible": torch.ones(4)}, "eligible must be a bool mask, got torch.float32"),
        ({"coords": torch.tensor([1.0, math.inf, 1.0, 1.0])}, "finite"),
        ({"sigma": torch.tensor([1.0, math.nan, 1.0, 1.0])}, "finite"),
        ({"coords": torch.zeros(4)}, "no component on the eligible directions"),
        ({"s": 0}, "s must be an int >= 1, got 0"),
        ({"s": 5}, "only 4 of 4 directions are eligible, fewer than s=5"),
        ({"draws": 1}, "draws must be an int >= 2, got 1"),
        ({"draws": 10.0}, "draws must be an int >= 2, got 10.0"),
        ({"draws": True}, "draws must be an int >= 2, got True"),
        ({"factor_rank": 0}, "factor_rank must be an int >= 1, got 0"),
        ({"factor_rank": 2.5}, "factor_rank must be an int >= 1, got 2.5"),
        ({"eps": -1.0}, "eps must be a finite number >= 0, got -1.0"),
        ({"strategy": "random"}, "null_evidence judges the strategies ('tsd', 'coordinate'), got 'random'"),
        ({"strategy": "coordinate", "coords": torch.zeros(4)}, "no component on the eligible directions"),
    ],
)
def test_bad_arguments_are_rejected(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        null_evidence(**{**GOOD, **changes})


# --- the model-level report -----------------------------------------------------------------------


def trained_model(steps: int = 3, launch: bool = True, strategy: str = "tsd"):
    """The tests' MLP with LoRA-Dash on fc1..fc3 (r = 4, s = 3), trained a few steps, then launched."""
    model = build_adapted()
    train(model, steps, start=0)
    if launch:
        lora_dash.launch(model, strategy=strategy)
    return model


@pytest.mark.parametrize("strategy, null", [("tsd", "factors"), ("tsd", "dense"), ("coordinate", "factors")])
def test_model_report_is_each_layers_evidence_from_its_dense_update(strategy, null):
    """Every layer, in dash_layers order: the evidence of the dense (α/r)·B A on the base weight's spectrum,
    with the layer's own generator; right after launch its index is the launched selection."""
    model = trained_model(strategy=strategy)
    report = model_null_evidence(model, strategy, null=null, draws=300, seed=5, svd_dtype=F64)
    layers = lora_dash.dash_layers(model)
    assert list(report) == list(layers) == ["fc1", "fc2", "fc3"]
    for (name, layer), gen in zip(layers.items(), layer_generators(5, len(layers))):
        dense = layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
        spectrum = change_rate_spectrum(layer.base_weight(), dense, svd_dtype=F64)
        factor_rank = layer.r if null == "factors" else None
        expected = null_evidence(
            spectrum.sigma,
            spectrum.coords,
            spectrum.eligible,
            layer.s,
            factor_rank=factor_rank,
            draws=300,
            generator=gen,
            strategy=strategy,
        )
        evidence = report[name]
        assert torch.equal(evidence.index, expected.index) and torch.equal(evidence.index, layer.dash_index)
        assert evidence.share == pytest.approx(expected.share, rel=1e-9)
        assert evidence.p_value == expected.p_value and evidence.null_mean == expected.null_mean
        assert torch.equal(evidence.selection_probability, expected.selection_probability)


def test_model_report_changes_nothing_and_works_before_launch():
    model = trained_model(launch=False)
    before = snapshot(model)
    report = model_null_evidence(model, draws=50)
    assert_unchanged(model, before)
    assert all(0 < evidence.p_value <= 1 for evidence in report.values())


def test_model_report_of_an_untrained_model_names_the_layer():
    """B = 0 at initialisation: the update is zero and the share undefined."""
    with pytest.raises(ValueError, match=re.escape("layer 'fc1': the update has no component")):
        model_null_evidence(build_adapted(), draws=50)


def test_model_report_refuses_a_merged_layer_before_any_work():
    model = trained_model()
    lora_dash.dash_layers(model)["fc2"].merge()
    with pytest.raises(RuntimeError, match=re.escape("['fc2'] are merged")):
        model_null_evidence(model, draws=50)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"null": "gaussian"}, 'null must be "factors" or "dense", got \'gaussian\''),
        ({"strategy": "smallest_sigma"}, "null_evidence judges the strategies ('tsd', 'coordinate')"),
        ({"draws": 1}, "draws must be an int >= 2, got 1"),
        ({"seed": -1}, "seed must be an int in [0, 2**63 - 1], got -1"),
        ({"seed": 1.0}, "seed must be an int in [0, 2**63 - 1], got 1.0"),
    ],
)
def test_model_report_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model_null_evidence(trained_model(steps=1, launch=False), **kwargs)


def test_model_report_needs_dash_layers():
    with pytest.raises(ValueError, match="no LoRA-Dash layers"):
        model_null_evidence(torch.nn.Sequential(torch.nn.Linear(3, 3)))


# --- the "coordinate" strategy through launch ------------------------------------------------------


def launched_indices(model) -> dict[str, list[int]]:
    return {name: layer.dash_index.tolist() for name, layer in lora_dash.dash_layers(model).items()}


def test_launch_with_the_coordinate_strategy_selects_the_largest_absolute_coordinates():
    """launch(model, strategy="coordinate") dashes, per layer, the top s of |c| (ties to the lower index),
    c computed densely from (α/r)·B A; the same as the controller's launch."""
    model = trained_model(launch=False)
    expected = {}
    for name, layer in lora_dash.dash_layers(model).items():
        dense = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
        spectrum = change_rate_spectrum(layer.base_weight(), dense)
        magnitudes = spectrum.coords.abs().tolist()
        candidates = [i for i in range(len(magnitudes)) if spectrum.eligible[i]]
        order = sorted(candidates, key=lambda i: (-magnitudes[i], i))
        expected[name] = order[: layer.s]
    selected = lora_dash.launch(model, strategy="coordinate")
    assert {name: index.tolist() for name, index in selected.items()} == expected
    assert launched_indices(model) == expected
    tsd = lora_dash.launch(trained_model(launch=False), strategy="tsd")
    assert any(tsd[name].tolist() != expected[name] for name in expected)  # a different rule, not a relabel

    controlled = trained_model(launch=False)
    lora_dash.LaunchController(controlled, launch_step=0, strategy="coordinate")  # t = 0 launches at once
    assert launched_indices(controlled) == expected


# --- the one-line summary, and the controller that logs it when asked ------------------------------


def test_the_summary_counts_the_flagged_layers_and_averages_the_shares():
    model = trained_model()
    report = model_null_evidence(model, draws=50)
    line = evidence_summary(report, alpha=0.5)
    flagged = sum(evidence.p_value <= 0.5 for evidence in report.values())
    assert line.startswith(f"{flagged}/3 layers with p ≤ 0.5 (1.5 expected from noise alone)")
    share = sum(evidence.share for evidence in report.values()) / 3
    assert f"top-s share {100 * share:.1f} %" in line


@pytest.mark.parametrize("report, alpha, message", [({}, 0.05, "the report is empty"), (None, 1.0, "alpha must be")])
def test_the_summary_rejects_an_empty_report_or_a_bad_alpha(report, alpha, message):
    report = model_null_evidence(trained_model(), draws=10) if report is None else report
    with pytest.raises(ValueError, match=message):
        evidence_summary(report, alpha)


def test_a_controller_asked_to_logs_the_evidence_of_the_update_it_launched_from():
    model, lines = build_adapted(), []
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(lora_dash.adapter_parameters(model), lr=1e-2)
    controller = lora_dash.LaunchController(model, launch_step=3, log_evidence=lines.append).attach(optimizer)
    train(model, 2, optimizer=optimizer)
    assert lines == []  # nothing before the launch
    train(model, 1, optimizer=optimizer, start=3)
    assert controller.launched
    # The launch leaves B and A as they were: the report of the launched model is the launch's.
    expected = [
        f"LoRA-Dash launch, null evidence ({strategy}): {evidence_summary(model_null_evidence(model, strategy))}"
        for strategy in ("tsd", "coordinate")
    ]
    assert lines == expected


def test_a_controller_not_asked_computes_no_evidence(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("model_null_evidence was called")

    monkeypatch.setattr(lora_dash.analysis, "model_null_evidence", refuse)
    model = build_adapted()
    optimizer = torch.optim.AdamW(lora_dash.adapter_parameters(model), lr=1e-2)
    controller = lora_dash.LaunchController(model, launch_step=2).attach(optimizer)
    train(model, 3, optimizer=optimizer)
    assert controller.launched


def test_a_launch_with_no_update_logs_why_there_is_no_evidence_and_still_launches():
    model, lines = build_adapted(), []
    controller = lora_dash.LaunchController(model, launch_step=0, log_evidence=lines.append)
    assert controller.launched
    assert len(lines) == 2 and "not computed: layer 'fc1': the update has no component" in lines[0]


def test_a_controller_refuses_a_log_that_cannot_be_called_before_any_change():
    model = trained_model(launch=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="log_evidence must be callable or None, got str"):
        lora_dash.LaunchController(model, launch_step=0, log_evidence="stdout")
    assert_unchanged(model, before)
