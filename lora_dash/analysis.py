"""Measurements of task-specific directions, shared by the demo and the notebooks.

Pure functions on tensors, built on :mod:`lora_dash.directions` (which holds the method's math): the
change-rate spectrum of a weight under an update, the paper's two overlap measures between a predicted
and a true set of TSDs, and where selected directions sit in the singular-value order.

The overlap measures follow the paper's analysis (Si et al., ICLR 2025): with ``top_j(ρ)`` the indices of
the ``j`` eligible directions with the largest change rates,

- recall   = |top_4(ρ_true) ∩ top_8(ρ_pred)| / 4: how many of the true leading TSDs the prediction finds;
- accuracy = |top_8(ρ_pred) ∩ top_16(ρ_true)| / 8: how many predicted TSDs are among the true leading ones.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from lora_dash import directions


class ChangeRateSpectrum(NamedTuple):
    """A weight's singular values and an update's coordinates and change rates on its core directions.

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
    directions (``σ_i > σ_1 · max(out, in) · ε_machine``), 0 elsewhere: exactly what launch computes,
    but for any ``ΔW`` (a full fine-tuning difference, a LoRA product, a planted update).

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
    U, sigma, V = directions.svd_basis(weight, dtype=svd_dtype)
    coords = directions.coordinates(delta_weight.detach(), U, V)
    eligible = directions.eligible_directions(sigma, tuple(weight.shape))
    rates = directions.change_rates(coords, sigma, eligible, eps)
    return ChangeRateSpectrum(sigma=sigma, coords=coords, rates=rates, eligible=eligible)


def _check_index(name: str, index: Tensor, distinct: bool = True) -> None:
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor, got shape {tuple(index.shape)}, {index.dtype}")
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
    return torch.isin(subset_candidates, container.to(subset_candidates.device)).double().mean().item()


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
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= k:
        raise ValueError(f"{name}_top must be an int in [1, k={k}], got {top!r}")
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
    """``(top_{predicted_top}(ρ_pred), top_{true_top}(ρ_true))`` after checking both rate vectors."""
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
    selection of :func:`lora_dash.directions.select_directions` over the eligible directions (all, when
    a mask is None).

    Shapes: ``predicted_rates, true_rates`` and the masks: ``(k,)``, on the same weight's directions → float.

    Raises:
        ValueError: shapes differ, a ``top`` outside ``[1, k]``, or fewer eligible directions than it.
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

    Shapes: ``predicted_rates, true_rates`` and the masks: ``(k,)``, on the same weight's directions → float.

    Raises:
        ValueError: shapes differ, a ``top`` outside ``[1, k]``, or fewer eligible directions than it.
    """
    predicted, true = _top_sets(
        predicted_rates, true_rates, predicted_eligible, true_eligible, predicted_top, true_top
    )
    return overlap_fraction(predicted, true)


def relative_singular_value_ranks(index: Tensor, k: int) -> Tensor:
    """Where selected directions sit in the singular-value order, from 0 (largest σ) to 1 (smallest).

    A direction's index is already its 0-based rank in descending ``σ`` (``σ_0 ≥ σ_1 ≥ …``), so the
    relative rank is ``index / (k - 1)``; for ``k = 1`` the only direction has relative rank 0.

    Shapes: ``index: (s,)`` integer in ``[0, k)`` → ``(s,)`` float32.

    Raises:
        ValueError: ``k < 1``, ``index`` not a 1-D integer tensor, or an entry outside ``[0, k)``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    _check_index("index", index, distinct=False)
    if index.numel() and not (0 <= int(index.min()) and int(index.max()) < k):
        raise ValueError(f"index entries must lie in [0, k={k}), got {index.tolist()}")
    return index.to(torch.float32) / max(k - 1, 1)
