"""The math of task-specific directions, as pure functions on tensors.

Notation (see METHOD.md): a frozen weight ``W`` of shape ``(n, m) = (out, in)`` has the thin SVD
``W = U diag(σ) Vᵀ`` with ``k = min(n, m)``. Its *core directions* are the rank-one matrices
``u_i v_iᵀ``. The coordinate of any matrix ``M`` on direction ``i`` is ``p_i(M) = u_iᵀ M v_i``, and
the change rate of an update ``ΔW`` is ``ρ_i = |p_i(ΔW)| / (σ_i + eps)``. The ``s`` eligible
directions with the largest change rates are the task-specific directions (TSDs);
``pick_directions`` also offers baselines for ablations.

The whole selection is :func:`select_task_directions`; it reads top to bottom as the chain
``svd_basis`` → ``coordinates_from_factors`` → ``score_coordinates`` (eligibility, change rates) →
``pick_directions``. Nothing here knows about modules, parameters or training: every function maps
tensors to tensors.
"""

from typing import NamedTuple

import torch
from einops import einsum
from torch import Tensor

from lora_dash.checks import check_int, check_number


class SVDBasis(NamedTuple):
    """Thin SVD ``W = U diag(sigma) Vᵀ``: ``U: (n, k)``, ``sigma: (k,)`` in descending order,
    ``V: (m, k)``."""

    U: Tensor
    sigma: Tensor
    V: Tensor


def svd_basis(weight: Tensor, dtype: torch.dtype = torch.float32) -> SVDBasis:
    """The thin SVD of a weight, computed in ``dtype`` whatever the weight's own dtype.

    ``W = U diag(σ) Vᵀ`` with ``W: (n, m)``, ``U: (n, k)``, ``σ: (k,)``, ``V: (m, k)``,
    ``k = min(n, m)``.

    A wide matrix (``n < m``) is decomposed through its transpose, ``Wᵀ = V diag(σ) Uᵀ``, because
    LAPACK is about twice as fast on tall inputs; the result is the same basis.

    Args:
        weight: ``(n, m)``, in (out, in) layout, any floating dtype (fp16 and bf16 included).
        dtype: ``torch.float32`` (default) or ``torch.float64``.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"svd_basis computes in float32 or float64, got {dtype}")
    if weight.dim() != 2:
        raise ValueError(f"svd_basis expects a 2-D weight, got shape {tuple(weight.shape)}")
    matrix = weight.detach().to(dtype)
    n, m = matrix.shape
    if n < m:
        V_t, sigma, U_t = torch.linalg.svd(matrix.mT, full_matrices=False)
        return SVDBasis(U=U_t.mT, sigma=sigma, V=V_t)
    U, sigma, V_t = torch.linalg.svd(matrix, full_matrices=False)
    return SVDBasis(U=U, sigma=sigma, V=V_t.mT)


def coordinates(delta_weight: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """Coordinates of a dense update on the core directions: ``c_i = u_iᵀ ΔW v_i``.

    Equivalently ``c = diag(Uᵀ ΔW V)``, computed without the ``(k, k)`` product.

    Shapes: ``delta_weight: (n, m)``, ``U: (n, k)``, ``V: (m, k)`` → ``c: (k,)``.
    """
    delta_weight = delta_weight.to(U.dtype)
    return einsum(U, delta_weight @ V, "n k, n k -> k")


def coordinates_from_factors(B: Tensor, A: Tensor, scaling: float, U: Tensor, V: Tensor) -> Tensor:
    """Coordinates of a LoRA update ``ΔW = scaling · B A`` without forming ``ΔW``.

    ``c_i = scaling · Σ_j (Uᵀ B)_{ij} (Vᵀ Aᵀ)_{ij}``, a row-wise dot product of two ``(k, r)``
    projections: cost ``O(k · r · (n + m))`` instead of ``O(n · m · k)``.

    Shapes: ``B: (n, r)``, ``A: (r, m)``, ``U: (n, k)``, ``V: (m, k)`` → ``c: (k,)``.
    """
    B_on_U = U.mT @ B.to(U.dtype)  # (k, r)
    A_on_V = V.mT @ A.to(V.dtype).mT  # (k, r)
    return scaling * einsum(B_on_U, A_on_V, "k r, k r -> k")


def eligible_directions(sigma: Tensor, weight_shape: tuple[int, int]) -> Tensor:
    """Which core directions are numerically meaningful: ``σ_i > σ_1 · max(n, m) · ε_machine``.

    Below that tolerance (the usual numerical-rank rule, with ``ε_machine`` of ``sigma``'s dtype) a
    singular value is indistinguishable from zero, its singular vectors are not unique, and its
    change rate would divide by (almost) zero. A zero matrix has no eligible direction.

    Shapes: ``sigma: (k,)`` in descending order → boolean mask ``(k,)``.
    """
    tolerance = sigma[0] * max(weight_shape) * torch.finfo(sigma.dtype).eps
    return sigma > tolerance


def change_rates(coords: Tensor, sigma: Tensor, eligible: Tensor, eps: float = 0.0) -> Tensor:
    """Change rates ``ρ_i = |c_i| / (σ_i + eps)`` on eligible directions, ``0`` elsewhere.

    The paper writes ``σ_i + ε``; the authors' code (and our default) uses ``eps = 0``. Ineligible
    directions get rate 0 so the result is never NaN or inf there; ``select_directions`` skips them.

    Shapes: ``coords, sigma, eligible: (k,)`` → ``ρ: (k,)``.
    """
    check_number("eps", eps)
    safe_sigma = torch.where(eligible, sigma, torch.ones_like(sigma))
    rates = coords.abs() / (safe_sigma + eps)
    return torch.where(eligible, rates, torch.zeros_like(rates))


def select_directions(rates: Tensor, eligible: Tensor, s: int) -> Tensor:
    """Indices of the ``s`` eligible directions with the largest change rates.

    Order: larger rate first; equal rates by lower index (a stable rule, so every run and every
    distributed rank selects the same directions).

    Shapes: ``rates, eligible: (k,)`` → ``index: (s,)`` (int64).

    Raises:
        ValueError: ``s < 1``, fewer than ``s`` eligible directions, or a non-finite eligible rate.
    """
    _check_enough_eligible(eligible, s)
    if not torch.isfinite(rates[eligible]).all():
        raise ValueError("change rates are not finite")
    ranked = torch.where(eligible, rates, torch.full_like(rates, -torch.inf))
    order = torch.sort(ranked, descending=True, stable=True).indices
    return order[:s]


def _check_enough_eligible(eligible: Tensor, s: int) -> None:
    check_int("s", s, 1)
    n_eligible = int(eligible.sum())
    if n_eligible < s:
        raise ValueError(
            f"only {n_eligible} of {eligible.numel()} directions are eligible, fewer than s={s}"
        )


#: How to choose the ``s`` dashed directions: the method's TSDs, three baselines for ablations, and
#: (beyond the paper) the largest coordinates.
STRATEGIES = ("tsd", "largest_sigma", "smallest_sigma", "random", "coordinate")


def check_strategy(strategy: str) -> None:
    """Raise ``ValueError`` unless ``strategy`` is one of :data:`STRATEGIES`."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown direction strategy {strategy!r}; valid strategies are {STRATEGIES}"
        )


def pick_directions(
    rates: Tensor,
    eligible: Tensor,
    s: int,
    strategy: str = "tsd",
    generator: torch.Generator | None = None,
    coords: Tensor | None = None,
) -> Tensor:
    """Indices of ``s`` distinct eligible directions, chosen by ``strategy``.

    - ``"tsd"`` (the method): the ``s`` largest change rates, by :func:`select_directions`.
    - ``"largest_sigma"``: the first ``s`` eligible indices, the largest ``σ`` (``σ`` descends).
    - ``"smallest_sigma"``: the last ``s`` eligible indices, smallest ``σ`` first.
    - ``"random"``: ``s`` distinct eligible indices drawn uniformly with ``generator``. The
      generator is required, not defaulted, so that every draw is reproducible and its seed is the
      caller's choice (a silent default would give every layer the same draw). Other strategies
      ignore it.
    - ``"coordinate"`` (beyond the paper): the ``s`` largest ``|c_i|`` (needs ``coords``), ties to
      the lower index: the change rate with the ``1/σ`` weighting of an isotropic update divided out
      (METHOD.md §4.3).

    Only ``"tsd"`` reads ``rates`` and only ``"coordinate"`` reads ``coords``; all use the same
    eligibility rule.

    Shapes: ``rates, eligible, coords: (k,)`` → ``index: (s,)`` (int64, on ``eligible``'s device).

    Raises:
        ValueError: an unknown strategy, ``"random"`` without a generator, ``"coordinate"`` without
            ``coords`` (or with a non-finite eligible one), ``s < 1``, fewer than ``s`` eligible
            directions, or (for ``"tsd"``) a non-finite eligible rate.
    """
    check_strategy(strategy)
    if strategy == "random" and generator is None:
        raise ValueError('strategy "random" needs a torch.Generator (pass generator=...)')
    if strategy == "tsd":
        return select_directions(rates, eligible, s)
    if strategy == "coordinate":
        if coords is None or coords.shape != eligible.shape:
            shape = None if coords is None else tuple(coords.shape)
            raise ValueError(
                f'strategy "coordinate" needs coords of shape {tuple(eligible.shape)}, got {shape}'
            )
        if not torch.isfinite(coords[eligible]).all():
            raise ValueError("coordinates are not finite")
        return select_directions(coords.abs(), eligible, s)
    _check_enough_eligible(eligible, s)
    candidates = eligible.nonzero().flatten()  # ascending index = descending σ
    if strategy == "largest_sigma":
        return candidates[:s]
    if strategy == "smallest_sigma":
        return candidates.flip(0)[:s]
    draw = torch.randperm(candidates.numel(), generator=generator, device=generator.device)[:s]
    return candidates[draw.to(candidates.device)]


class DirectionScores(NamedTuple):
    """Everything the selection reads, per core direction of ``W: (n, m)``, ``k = min(n, m)``:
    the basis ``U: (n, k)``, ``sigma: (k,)``, ``V: (m, k)``, the update's ``coords: (k,)``, the mask
    ``eligible: (k,)`` and the change rates ``rates: (k,)`` (0 on ineligible directions)."""

    U: Tensor
    sigma: Tensor
    V: Tensor
    coords: Tensor
    eligible: Tensor
    rates: Tensor


class DashDirections(NamedTuple):
    """One layer's chosen directions: ``U_s: (n, s)``, ``V_s: (m, s)``, ``index: (s,)`` into σ."""

    U_s: Tensor
    V_s: Tensor
    index: Tensor


def score_coordinates(basis: SVDBasis, coords: Tensor, eps: float = 0.0) -> DirectionScores:
    """Eligibility (:func:`eligible_directions`) and change rates (:func:`change_rates`) of an
    update whose coordinates on ``basis`` are ``coords``.

    Shapes: ``basis`` of a ``(n, m)`` weight, ``coords: (k,)`` → :class:`DirectionScores`.
    """
    U, sigma, V = basis
    eligible = eligible_directions(sigma, (U.shape[0], V.shape[0]))
    rates = change_rates(coords, sigma, eligible, eps)
    return DirectionScores(U, sigma, V, coords, eligible, rates)


def score_directions(
    weight: Tensor,
    A: Tensor,
    B: Tensor,
    scaling: float,
    eps: float = 0.0,
    svd_dtype: torch.dtype = torch.float32,
) -> DirectionScores:
    """How strongly the LoRA update ``ΔW = scaling · B A`` moves each core direction of ``W``.

    The SVD of the pretrained ``W`` (:func:`svd_basis`, in ``svd_dtype``), the coordinates
    ``c = diag(Uᵀ ΔW V)`` from the factors (:func:`coordinates_from_factors`), then
    :func:`score_coordinates`.

    Shapes: ``weight: (n, m)``, ``A: (r, m)``, ``B: (n, r)`` → :class:`DirectionScores`.
    """
    basis = svd_basis(weight, dtype=svd_dtype)
    coords = coordinates_from_factors(B, A, scaling, basis.U, basis.V)
    return score_coordinates(basis, coords, eps)


def select_task_directions(
    weight: Tensor,
    A: Tensor,
    B: Tensor,
    scaling: float,
    s: int,
    eps: float = 0.0,
    strategy: str = "tsd",
    generator: torch.Generator | None = None,
    svd_dtype: torch.dtype = torch.float32,
) -> DashDirections:
    """The ``s`` task-specific directions of ``W`` under ``ΔW = scaling · B A`` (METHOD.md §3.2).

    ``W = U diag(σ) Vᵀ``; ``c_i = u_iᵀ ΔW v_i``; ``ρ_i = |c_i| / (σ_i + eps)``; the ``s`` eligible
    directions with the largest ``ρ`` (ties to the lower index). Another ``strategy`` picks baseline
    directions instead (:func:`pick_directions`; ``"random"`` needs ``generator``).

    Shapes: ``weight: (n, m)``, ``A: (r, m)``, ``B: (n, r)`` → ``U_s: (n, s)``, ``V_s: (m, s)``,
    ``index: (s,)``; ``U_s`` and ``V_s`` in ``svd_dtype``.

    Raises:
        ValueError: an unknown strategy, ``"random"`` without a generator, a weight that is not
            2-D, or fewer than ``s`` eligible directions.
    """
    check_strategy(strategy)
    scores = score_directions(weight, A, B, scaling, eps, svd_dtype)
    index = pick_directions(scores.rates, scores.eligible, s, strategy, generator, scores.coords)
    return DashDirections(U_s=scores.U[:, index], V_s=scores.V[:, index], index=index)


def dash_update(U_s: Tensor, delta: Tensor, V_s: Tensor) -> Tensor:
    """The dense dash update ``ΔW_dash = U_s diag(δ) V_sᵀ`` (for merging and export only).

    Shapes: ``U_s: (n, s)``, ``delta: (s,)``, ``V_s: (m, s)`` → ``(n, m)``.
    """
    return einsum(U_s * delta, V_s, "n s, m s -> n m")
