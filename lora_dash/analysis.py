"""Measurements of task-specific directions, shared by the demo and the notebooks.

Pure functions on tensors, built on :mod:`lora_dash.directions` (which holds the method's math): the
change-rate spectrum of a weight under an update, the paper's two overlap measures between a
predicted and a true set of TSDs, where selected directions sit in the singular-value order, and
(beyond the paper) whether a layer's selection says more than an isotropic update would
(:func:`null_evidence`, and :func:`model_null_evidence` for every layer of a model;
:func:`launch_evidence`, the launch's log line, plugs into :data:`lora_dash.schedule.launch_report`
when this module is imported).

The overlap measures follow the paper's analysis (Si et al., ICLR 2025): with ``top_j(ρ)`` the
indices of the ``j`` eligible directions with the largest change rates,

- recall   = |top_4(ρ_true) ∩ top_8(ρ_pred)| / 4: how many of the true leading TSDs the
  prediction finds;
- accuracy = |top_8(ρ_pred) ∩ top_16(ρ_true)| / 8: how many predicted TSDs are among the true
  leading ones.
"""

from typing import NamedTuple

import torch
from torch import Tensor, nn

from lora_dash import directions, hooks
from lora_dash.bases import full_tensor
from lora_dash.checks import check_int, check_seed
from lora_dash.inject import require_dash_layers
from lora_dash.schedule import layer_generators


class ChangeRateSpectrum(NamedTuple):
    """A weight's singular values; an update's coordinates and change rates on its core directions.

    Shapes: all ``(k,)``, ``k = min(out, in)``, in descending ``σ`` order, so position ``i`` is the
    direction of the ``i``-th largest singular value. ``eligible`` is a boolean mask; ``rates`` is 0
    where it is False.
    """

    sigma: Tensor
    coords: Tensor
    rates: Tensor
    eligible: Tensor


def change_rate_spectrum(
    weight: Tensor, delta_weight: Tensor, eps: float = 0.0, svd_dtype: torch.dtype = torch.float32
) -> ChangeRateSpectrum:
    """The change-rate spectrum of a layer under a dense update ``ΔW``.

    ``W = U diag(σ) Vᵀ``, ``c_i = u_iᵀ ΔW v_i``, ``ρ_i = |c_i| / (σ_i + eps)`` on the eligible
    directions (``σ_i > σ_1 · max(out, in) · ε_machine``), 0 elsewhere: exactly what launch
    computes, but for any ``ΔW`` (a full fine-tuning difference, a LoRA product, a planted update).

    Shapes: ``weight, delta_weight: (out, in)`` → four ``(k,)`` tensors, ``k = min(out, in)``.

    Args:
        weight: the pretrained weight in (out, in) layout (transpose a ``Conv1D`` weight first).
        delta_weight: the update, same shape.
        eps: the paper's ``ε`` in the denominator, ``>= 0``.
        svd_dtype: ``torch.float32`` (default, as at launch) or ``torch.float64``.

    Raises:
        ValueError: not 2-D, shapes differ, or a non-finite entry.
    """
    if weight.dim() != 2 or delta_weight.shape != weight.shape:
        raise ValueError(
            f"weight and delta_weight must be 2-D of the same (out, in) shape, got "
            f"{tuple(weight.shape)} and {tuple(delta_weight.shape)}"
        )
    for name, tensor in (("weight", weight), ("delta_weight", delta_weight)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} has non-finite entries")
    basis = directions.svd_basis(weight, dtype=svd_dtype)
    coords = directions.coordinates(delta_weight.detach(), basis.U, basis.V)
    scores = directions.score_coordinates(basis, coords, eps)
    return ChangeRateSpectrum(scores.sigma, scores.coords, scores.rates, scores.eligible)


def _check_index(name: str, index: Tensor, distinct: bool = True) -> None:
    if (
        index.dim() != 1
        or index.dtype.is_floating_point
        or index.dtype.is_complex
        or index.dtype == torch.bool
    ):
        raise ValueError(
            f"{name} must be a 1-D integer tensor, got shape {tuple(index.shape)}, {index.dtype}"
        )
    if distinct and index.unique().numel() != index.numel():
        raise ValueError(f"{name} has repeated entries: {index.tolist()}")


def overlap_fraction(subset_candidates: Tensor, container: Tensor) -> float:
    """The fraction of ``subset_candidates`` that lie in ``container``: ``|a ∩ b| / |a|``.

    Both are sets of direction indices; 1.0 means ``a ⊆ b``. ``container`` may be empty (result 0).

    Shapes: ``subset_candidates: (a,)``, ``container: (b,)``, integer, no repeated entries → float.

    Raises:
        ValueError: not 1-D integer tensors, repeated entries, or an empty ``subset_candidates``.
    """
    _check_index("subset_candidates", subset_candidates)
    _check_index("container", container)
    if subset_candidates.numel() == 0:
        raise ValueError("subset_candidates is empty; the fraction is undefined")
    return (
        torch.isin(subset_candidates, container.to(subset_candidates.device)).double().mean().item()
    )


def _top(name: str, rates: Tensor, eligible: Tensor | None, top: int) -> Tensor:
    """``top_j(ρ)`` by ``directions.select_directions``, after checking its arguments."""
    if rates.dim() != 1:
        raise ValueError(f"{name} rates must be 1-D (k,), got shape {tuple(rates.shape)}")
    if eligible is None:
        eligible = torch.ones_like(rates, dtype=torch.bool)
    elif eligible.shape != rates.shape or eligible.dtype != torch.bool:
        raise ValueError(
            f"{name} eligible must be a bool mask of shape {tuple(rates.shape)}, "
            f"got {tuple(eligible.shape)}, {eligible.dtype}"
        )
    k = rates.numel()
    check_int(f"{name}_top", top, 1, k, f"k={k}")
    try:
        return directions.select_directions(rates, eligible, top)
    except ValueError as error:
        raise ValueError(f"{name} rates: {error}") from error


def _top_sets(
    predicted_rates: Tensor,
    true_rates: Tensor,
    predicted_eligible: Tensor | None,
    true_eligible: Tensor | None,
    predicted_top: int,
    true_top: int,
) -> tuple[Tensor, Tensor]:
    """``(top_{predicted_top}(ρ_pred), top_{true_top}(ρ_true))``, after checking both ρ vectors."""
    if predicted_rates.shape != true_rates.shape:
        raise ValueError(
            f"predicted and true rates must be on the same k directions, got shapes "
            f"{tuple(predicted_rates.shape)} and {tuple(true_rates.shape)}"
        )
    predicted = _top("predicted", predicted_rates, predicted_eligible, predicted_top)
    return predicted, _top("true", true_rates, true_eligible, true_top)


def tsd_recall(
    predicted_rates: Tensor,
    true_rates: Tensor,
    predicted_eligible: Tensor | None = None,
    true_eligible: Tensor | None = None,
    predicted_top: int = 8,
    true_top: int = 4,
) -> float:
    """The paper's recall: the fraction of the true top-4 TSDs inside the predicted top-8.

    ``|top_{true_top}(ρ_true) ∩ top_{predicted_top}(ρ_pred)| / true_top``, with ``top_j`` the stable
    selection of :func:`lora_dash.directions.select_directions` over the eligible directions (all,
    when a mask is None).

    Shapes: ``predicted_rates, true_rates`` and the masks: ``(k,)``, on the same weight's
    directions → float.

    Raises:
        ValueError: shapes differ, or a ``top`` is outside ``[1, k]`` or exceeds the eligible count.
    """
    predicted, true = _top_sets(
        predicted_rates, true_rates, predicted_eligible, true_eligible, predicted_top, true_top
    )
    return overlap_fraction(true, predicted)


def tsd_accuracy(
    predicted_rates: Tensor,
    true_rates: Tensor,
    predicted_eligible: Tensor | None = None,
    true_eligible: Tensor | None = None,
    predicted_top: int = 8,
    true_top: int = 16,
) -> float:
    """The paper's accuracy: the fraction of the predicted top-8 TSDs inside the true top-16.

    ``|top_{predicted_top}(ρ_pred) ∩ top_{true_top}(ρ_true)| / predicted_top``, with ``top_j`` as in
    :func:`tsd_recall`.

    Shapes: ``predicted_rates, true_rates`` and the masks: ``(k,)``, on the same weight's
    directions → float.

    Raises:
        ValueError: shapes differ, or a ``top`` is outside ``[1, k]`` or exceeds the eligible count.
    """
    predicted, true = _top_sets(
        predicted_rates, true_rates, predicted_eligible, true_eligible, predicted_top, true_top
    )
    return overlap_fraction(predicted, true)


def relative_singular_value_ranks(index: Tensor, k: int) -> Tensor:
    """Where selected directions sit in the singular-value order, 0 (largest σ) to 1 (smallest).

    A direction's index is already its 0-based rank in descending ``σ`` (``σ_0 ≥ σ_1 ≥ …``), so the
    relative rank is ``index / (k - 1)``; for ``k = 1`` the only direction has relative rank 0.

    Shapes: ``index: (s,)`` integer in ``[0, k)`` → ``(s,)`` float32.

    Raises:
        ValueError: ``k < 1``, ``index`` not a 1-D integer tensor, or an entry outside ``[0, k)``.
    """
    check_int("k", k, 1)
    _check_index("index", index, distinct=False)
    if index.numel() and not (0 <= int(index.min()) and int(index.max()) < k):
        raise ValueError(f"index entries must lie in [0, k={k}), got {index.tolist()}")
    return index.to(torch.float32) / max(k - 1, 1)


# --- is the selection more than the 1/σ artefact? ------------------------------------------------

#: Null draws are sampled this many numbers at a time, so memory stays flat at any ``k`` and
#: ``draws``.
_CHUNK_NUMBERS = 2**22


def null_coordinates(
    draws: int, k: int, factor_rank: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Coordinates of isotropic random updates on ``k`` core directions, up to their common scale.

    - ``factor_rank=None`` (a dense update with i.i.d. ``N(0, τ²)`` entries): ``c ~ N(0, I_k)``.
    - ``factor_rank=r`` (``ΔW = scaling · B A`` with i.i.d. centred Gaussian ``B: (n, r)``,
      ``A: (r, m)``): ``c_i = Σ_{j≤r} X_ij Y_ij`` with ``X, Y`` i.i.d. ``N(0, 1)``; i.i.d. over
      ``i``, variance ``r``, kurtosis ``3 + 6/r``.

    See :func:`null_evidence` for why these laws hold whatever ``W`` is. The rank-``r`` law is
    sampled as ``Z_i · ‖X_i‖`` (given ``X_i``, the component of ``Y_i`` along ``X_i`` is
    ``N(0, 1)``) with ``‖X_i‖² ~ χ²_r = -2 Σ_{j ≤ r/2} log U_j`` (plus ``N²`` for odd ``r``), ``U``
    uniform on ``(0, 1]``: ``⌊r/2⌋ + 1`` numbers per coordinate (``+ 1`` for odd ``r``) instead of
    ``2 r``.

    Shapes: → ``(draws, k)`` float64, on ``generator``'s device (CPU when it is None).
    """
    device = None if generator is None else generator.device
    options = {"generator": generator, "dtype": torch.float64, "device": device}
    z = torch.randn(draws, k, **options)
    if factor_rank is None:
        return z
    # neg().log1p() is log(1 - U)
    chi_square = -2 * torch.rand(draws, k, factor_rank // 2, **options).neg().log1p().sum(-1)
    if factor_rank % 2:
        chi_square += torch.randn(draws, k, **options).square()
    return z * chi_square.sqrt()


def _top_share(rates: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """Per row of ``rates: (rows, k)``, the share of its ``s`` largest entries and their columns.

    Returns the share ``Σ top_s / Σ all``, ``(rows,)``, and the top-``s`` columns, ``(rows, s)``.
    """
    top = rates.topk(s, dim=1)
    return top.values.sum(1) / rates.sum(1), top.indices


def _check_draws(draws: int) -> None:
    check_int("draws", draws, 2)


class NullEvidence(NamedTuple):
    """A layer's selection against an isotropic update's; see :func:`null_evidence`.

    Attributes:
        index: ``(s,)`` int64, the selected directions, as
            :func:`lora_dash.directions.pick_directions` selects them: the ``s`` largest scores
            (``ρ`` for ``"tsd"``, ``|c|`` for ``"coordinate"``).
        share: the observed top-``s`` share of the score,
            ``Σ_{i ∈ index} score_i / Σ_{i eligible} score_i``.
        null_mean: the mean of that share under the null.
        null_std: its standard deviation under the null.
        selection_probability: ``(s,)`` float64, for each selected direction the probability under
            the null that it is among the top ``s`` (near 1: any update would have selected it).
        p_value: ``P_null(share ≥ observed share)``, the one-sided score; small means more
            concentrated than noise.
        draws: the Monte Carlo draws behind the estimates (0 when they are exact); the p-value's
            resolution is ``1 / (draws + 1)`` and a probability's standard error
            ``√(p (1 - p) / draws)``.
    """

    index: Tensor
    share: float
    null_mean: float
    null_std: float
    selection_probability: Tensor
    p_value: float
    draws: int


#: The selections :func:`null_evidence` can judge: those that read the update.
NULL_EVIDENCE_STRATEGIES = ("tsd", "coordinate")


def _check_judged_strategy(strategy: str) -> None:
    if strategy not in NULL_EVIDENCE_STRATEGIES:
        raise ValueError(
            f"null_evidence judges the strategies {NULL_EVIDENCE_STRATEGIES}, got {strategy!r}"
        )


def null_evidence(
    sigma: Tensor,
    coords: Tensor,
    eligible: Tensor,
    s: int,
    eps: float = 0.0,
    factor_rank: int | None = None,
    draws: int = 999,
    generator: torch.Generator | None = None,
    strategy: str = "tsd",
) -> NullEvidence:
    """Evidence against the null "the update is isotropic noise" for a layer's top-``s`` selection.

    **The null.** The core directions ``u_i v_iᵀ`` are orthonormal in the Frobenius inner product,
    so a dense ``ΔW`` with i.i.d. ``N(0, τ²)`` entries has coordinates ``c_i = u_iᵀ ΔW v_i`` that
    are i.i.d. ``N(0, τ²)``, whatever ``W`` is. For a LoRA update ``ΔW = scaling · B A``
    (``factor_rank = r``) the null is ``B: (n, r)`` and ``A: (r, m)`` with i.i.d. centred Gaussian
    entries of any variances ``b²``, ``a²``: ``Uᵀ B`` and ``Vᵀ Aᵀ`` then have i.i.d. Gaussian
    entries too (``U``, ``V`` have orthonormal columns), so
    ``c_i = scaling · a b · Σ_{j≤r} X_ij Y_ij`` with ``X, Y`` i.i.d. ``N(0, 1)``, i.i.d. over ``i``:
    heavier-tailed than the dense null (kurtosis ``3 + 6/r``), which is its ``r → ∞`` limit (divided
    by ``√r``). Either way the coordinates have a law fixed up to one common scale (``τ``, or
    ``scaling · a b``: the observed norms need not be matched), and every statistic here cancels
    that scale. So the null is sampled by :func:`null_coordinates` in ``O(k)`` (``O(k r)``) per
    draw, without forming a matrix.

    **The statistic.** With ``score_i = ρ_i = |c_i| / (σ_i + eps)`` (``strategy="tsd"``) or
    ``score_i = |c_i|`` (``"coordinate"``),
    ``share = Σ_{i ∈ top_s(score)} score_i / Σ_{i eligible} score_i``, in ``[s / k_e, 1]`` with
    ``k_e`` eligible directions. Its null law (a ratio involving order statistics) has no closed
    form, so ``null_mean``, ``null_std`` and ``p_value`` are Monte Carlo estimates over ``draws``
    null updates drawn with ``generator``; so is ``selection_probability`` for ``"tsd"``, while for
    ``"coordinate"`` it is exactly ``s / k_e`` (the null's coordinates are exchangeable). When
    ``s = k_e`` the share is 1 for every update and everything is exact.

    **The score.** ``p = (1 + #{b : share_b ≥ share}) / (1 + draws)``. Under the null the observed
    share and the draws are exchangeable, so the test is exact at any ``draws``:
    ``P(p ≤ α) = ⌊α (draws + 1)⌋ / (draws + 1) ≤ α``. With the default 999 draws and a threshold
    ``α = 0.05``, an update that is isotropic noise is flagged 5 % of the time, and ``p`` cannot go
    below 0.001; over ``L`` layers expect ``α L`` flags from noise alone. A small ``p`` says the
    update puts more of its score on its top ``s`` than noise would; it does not say that the
    directions help the task. The test is one-sided: an update that is structured but spread out
    (``ΔW = λ W`` gives equal rates) scores a large ``p``.

    **Which to ask.** ``"tsd"`` asks whether the change rates are more concentrated than the ``1/σ``
    weighting makes them for any update. On a spectrum spanning decades the smallest ``σ`` dominate
    both the observed and the null rates, so signal on directions of larger ``σ`` barely moves this
    share: the ``"tsd"`` test can only see signal strong enough to change which rates lead.
    ``"coordinate"`` asks whether the update itself is concentrated on a few core directions,
    wherever they sit.

    Shapes: ``sigma, coords, eligible: (k,)`` (``eligible`` boolean) →
    ``index, selection_probability: (s,)`` on ``sigma``'s device; the draws are made on
    ``generator``'s device.

    Args:
        sigma: singular values of ``W`` (see :func:`lora_dash.directions.svd_basis`).
        coords: coordinates of the update (:func:`lora_dash.directions.coordinates` or
            :func:`lora_dash.directions.coordinates_from_factors`).
        eligible: :func:`lora_dash.directions.eligible_directions`; other directions play no part.
        s: the number of selected directions, ``1 <= s <= k_e``.
        eps: the ``ε`` of ``ρ_i = |c_i| / (σ_i + ε)``, as in
            :func:`lora_dash.directions.change_rates`.
        factor_rank: ``None`` for the dense null, ``r`` for that of a rank-``r`` Gaussian product.
        draws: Monte Carlo draws, ``>= 2``.
        generator: the source of the draws; None means a CPU generator seeded with 0, so calls
            without one share their draws: when judging several layers, give each its own generator
            (as :func:`model_null_evidence` does with :func:`lora_dash.schedule.layer_generators`)
            for results that are independent across layers.
        strategy: the selection judged, one of :data:`NULL_EVIDENCE_STRATEGIES`.

    Raises:
        ValueError: shapes differ or are not 1-D, ``eligible`` not boolean, a non-finite eligible
            ``σ`` or coordinate, an update with no component on the eligible directions (share
            undefined), a bad ``s``, ``eps``, ``factor_rank``, ``draws`` or ``strategy``.
    """
    _check_draws(draws)
    _check_judged_strategy(strategy)
    if factor_rank is not None:
        check_int("factor_rank", factor_rank, 1)
    if sigma.dim() != 1 or coords.shape != sigma.shape or eligible.shape != sigma.shape:
        raise ValueError(
            f"sigma, coords and eligible must be 1-D of one shape (k,), got {tuple(sigma.shape)}, "
            f"{tuple(coords.shape)} and {tuple(eligible.shape)}"
        )
    if eligible.dtype != torch.bool:
        raise ValueError(f"eligible must be a bool mask, got {eligible.dtype}")
    if not (torch.isfinite(sigma[eligible]).all() and torch.isfinite(coords[eligible]).all()):
        raise ValueError("sigma and coords must be finite on the eligible directions")
    coords = coords.double()
    rates = directions.change_rates(coords, sigma.double(), eligible, eps)
    index = directions.pick_directions(rates, eligible, s, strategy, coords=coords)
    by_rate = strategy == "tsd"
    scores = rates[eligible] if by_rate else coords[eligible].abs()
    if not scores.any():
        raise ValueError(
            "the update has no component on the eligible directions; its top-s share is undefined"
        )
    k_eligible = scores.numel()
    if s == k_eligible:  # every update selects everything: share 1, exactly
        ones = torch.ones(s, dtype=torch.float64, device=sigma.device)
        return NullEvidence(index, 1.0, 1.0, 0.0, ones, 1.0, 0)

    if generator is None:
        generator = torch.Generator().manual_seed(0)
    # score = |c| · weight: 1/(σ + eps) for the change rate, 1 for the coordinate itself.
    weights = 1.0 / (sigma[eligible].double() + eps) if by_rate else torch.ones_like(scores)
    weights = weights.to(generator.device)
    share = _top_share(scores[None].to(generator.device), s)[0]
    rows = max(1, _CHUNK_NUMBERS // (k_eligible * (factor_rank or 1)))
    null_shares, counts = [], torch.zeros(k_eligible, dtype=torch.int64, device=generator.device)
    for start in range(0, draws, rows):
        null_scores = (
            null_coordinates(min(rows, draws - start), k_eligible, factor_rank, generator).abs()
            * weights
        )
        chunk_shares, top = _top_share(null_scores, s)
        null_shares.append(chunk_shares)
        counts += torch.bincount(top.flatten(), minlength=k_eligible)
    null_shares = torch.cat(null_shares)
    if by_rate:
        position = eligible.cumsum(0) - 1  # a direction's column among the eligible ones
        selected = counts[position[index].to(counts.device)].double() / draws
    else:
        selected = torch.full((s,), s / k_eligible, dtype=torch.float64)
    p_value = (1 + int((null_shares >= share).sum())) / (1 + draws)
    return NullEvidence(
        index=index,
        share=share.item(),
        null_mean=null_shares.mean().item(),
        null_std=null_shares.std().item(),
        selection_probability=selected.to(sigma.device),
        p_value=p_value,
        draws=draws,
    )


@torch.no_grad()
def model_null_evidence(
    model: nn.Module,
    strategy: str = "tsd",
    null: str = "factors",
    draws: int = 999,
    seed: int = 0,
    svd_dtype: torch.dtype = torch.float32,
) -> dict[str, NullEvidence]:
    """:func:`null_evidence` for every LoRA-Dash layer of ``model``, from its current LoRA update.

    For each layer of :func:`lora_dash.dash_layers`: the SVD of the pretrained ``W``
    (``base_weight()``), the coordinates of ``scaling · B A`` from the factors, and the top ``s`` by
    ``strategy`` (change rates with the layer's ``eps``, or ``|c|``): what launch with that strategy
    would select now. Right at launch, ``index`` is the launched selection; later it follows ``B A``
    as it trains. The dash term is not part of the update judged. Changes nothing.

    Cost per layer: one SVD plus ``O(draws · k · r)`` for the null. Call it when you want the
    report; nothing else in the library computes it.

    Args:
        model: a model with LoRA-Dash layers (not merged: ``W`` would include ``ΔW``).
        strategy: ``"tsd"`` (the method) or ``"coordinate"``; see :func:`null_evidence` for what
            each asks.
        null: ``"factors"`` (default): the layer's update is judged against Gaussian ``B``, ``A`` of
            its own rank ``r``, the null that matches a LoRA update; ``"dense"``: a dense Gaussian
            ``ΔW``.
        draws: Monte Carlo draws per layer, ``>= 2`` (p-value resolution ``1 / (draws + 1)``).
        seed: an int in ``[0, 2⁶³)``; layer ``i`` draws with generator ``i`` of
            :func:`lora_dash.schedule.layer_generators`, so its result does not depend on the
            others.
        svd_dtype: ``torch.float32`` (as at launch) or ``torch.float64``.

    Returns:
        A :class:`NullEvidence` per layer, by dotted name, in :func:`lora_dash.dash_layers` order.

    Raises:
        ValueError: a bad ``strategy``, ``null``, ``draws`` or ``seed``, no LoRA-Dash layer, or a
            layer whose update or weight is not finite or is zero on the eligible directions (the
            message names it).
        RuntimeError: a merged layer (before any work).
    """
    _check_judged_strategy(strategy)
    if null not in ("factors", "dense"):
        raise ValueError(f'null must be "factors" or "dense", got {null!r}')
    _check_draws(draws)
    check_seed(seed)
    layers = require_dash_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"layers {merged} are merged; unmerge() them first (W would include ΔW)")
    report = {}
    for (name, layer), generator in zip(layers.items(), layer_generators(seed, len(layers))):
        A, B, weight = full_tensor(layer.lora_A), full_tensor(layer.lora_B), layer.base_weight()
        if not all(torch.isfinite(tensor).all() for tensor in (A, B, weight)):
            raise ValueError(
                f"layer {name!r}: the pretrained weight or the LoRA factors are not finite"
            )
        scores = directions.score_directions(weight, A, B, layer.scaling, layer.eps, svd_dtype)
        factor_rank = layer.r if null == "factors" else None
        try:
            report[name] = null_evidence(
                scores.sigma,
                scores.coords,
                scores.eligible,
                layer.s,
                layer.eps,
                factor_rank,
                draws,
                generator,
                strategy,
            )
        except ValueError as error:
            raise ValueError(f"layer {name!r}: {error}") from error
    return report


def evidence_summary(report: dict[str, NullEvidence], alpha: float = 0.05) -> str:
    """A log line: how many layers of a :func:`model_null_evidence` report are flagged at ``alpha``.

    E.g. ``"3/36 layers with p ≤ 0.05 (1.8 expected from noise alone); median p 0.41; top-s share
    44.1 % vs 43.8 % under the null (means over layers)"``.

    Raises:
        ValueError: an empty report, or ``alpha`` not in ``(0, 1)``.
    """
    if not report:
        raise ValueError("the report is empty")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    evidence = list(report.values())
    p_values = sorted(e.p_value for e in evidence)
    middle = len(p_values) // 2
    median = (
        p_values[middle] if len(p_values) % 2 else (p_values[middle - 1] + p_values[middle]) / 2
    )
    flagged = sum(p <= alpha for p in p_values)
    share = sum(e.share for e in evidence) / len(evidence)
    null_share = sum(e.null_mean for e in evidence) / len(evidence)
    return (
        f"{flagged}/{len(evidence)} layers with p ≤ {alpha:g} "
        f"({alpha * len(evidence):.1f} expected from noise alone); median p {median:.3g}; "
        f"top-s share {100 * share:.1f} % vs {100 * null_share:.1f} % under the null "
        "(means over layers)"
    )


def launch_evidence(model: nn.Module, seed: int = 0) -> list[str]:
    """What a :class:`lora_dash.LaunchController` with ``log_evidence`` logs right after the launch.

    One line each for ``"tsd"`` and ``"coordinate"``: :func:`evidence_summary` of
    :func:`model_null_evidence` (``seed`` as given), i.e. whether the LoRA update the directions
    were chosen from says more than isotropic noise. It costs two SVDs per layer and the null's
    draws. A report that cannot be computed (e.g. ``launch_step=0``: ``ΔW = 0`` has no top-``s``
    share) says why; the launch stands.
    """
    lines = []
    for strategy in ("tsd", "coordinate"):
        try:
            summary = evidence_summary(model_null_evidence(model, strategy, seed=seed))
        except ValueError as error:
            summary = f"not computed: {error}"
        lines.append(f"LoRA-Dash launch, null evidence ({strategy}): {summary}")
    return lines


hooks.set_launch_hook("evidence", launch_evidence)
