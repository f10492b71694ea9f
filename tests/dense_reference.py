"""A deliberately naive restatement of LoRA-Dash, written from METHOD.md §3 alone: the dense oracle.

Nothing here imports ``lora_dash``. Every quantity is computed the slow, obvious way:

- the basis is the complete SVD of the pretrained ``W`` (every singular triplet; thin, as METHOD.md
  says), recomputed at every call, never cached or truncated;
- the coordinates are the diagonal of the dense ``(k, k)`` matrix ``Uᵀ ΔW V`` with the dense
  ``ΔW = (α/r)·B A``;
- the selection sorts Python tuples ``(-ρ_i, i)``: larger rate first, then lower index;
- the forward adds the dense matrices ``(α/r)·B A`` and ``U_s diag(δ) V_sᵀ``;
- the launch is a plain ``if step == t`` in the training loop (:func:`train_naive`): no hooks, no
  forward counting; ``δ`` is created at launch and joins the optimizer then, with fresh state.

Layout: ``W`` is always ``(out, in)``; a caller with a GPT-2 ``Conv1D`` passes ``weight.T``.
"""

import math

import torch
from torch import Tensor, nn


def naive_select(
    weight: Tensor,
    delta_weight: Tensor,
    s: int,
    eps: float = 0.0,
    svd_dtype: torch.dtype = torch.float32,
) -> tuple[list[int], Tensor, Tensor]:
    """METHOD.md §3 step 2, densely: ``(index, U_s, V_s)`` of the ``s`` directions with the largest
    ``ρ_i = |u_iᵀ ΔW v_i| / (σ_i + eps)`` among those with ``σ_i > σ_1 · max(n, m) · ε_machine``.

    Shapes: ``weight, delta_weight: (n, m)`` → ``U_s: (n, s)``, ``V_s: (m, s)`` in ``svd_dtype``.
    """
    W = weight.detach().to(svd_dtype)
    dW = delta_weight.detach().to(svd_dtype)
    n, m = W.shape
    k = min(n, m)
    U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)  # U: (n, k), σ: (k,), Vh: (k, m)
    V = Vh.T
    projected = U.T @ dW @ V  # (k, k): every p_ij(ΔW) = u_iᵀ ΔW v_j
    coords = [projected[i, i].item() for i in range(k)]
    tolerance = sigma[0].item() * max(n, m) * torch.finfo(svd_dtype).eps
    eligible = [i for i in range(k) if sigma[i].item() > tolerance]
    if len(eligible) < s:
        raise ValueError(f"only {len(eligible)} eligible directions, fewer than s={s}")
    rates = {i: abs(coords[i]) / (sigma[i].item() + eps) for i in eligible}
    index = sorted(eligible, key=lambda i: (-rates[i], i))[:s]
    return index, U[:, index], V[:, index]


class NaiveLoRADash(nn.Module):
    """``y = x Wᵀ + b + x̃ ((α/r)·B A)ᵀ + x̃ (U_s diag(δ) V_sᵀ)ᵀ``, dense matrices, ``x̃ = dropout(x)``.

    Before :meth:`launch` there is no dash term and no ``δ`` at all.

    Args:
        weight: ``(out, in)`` pretrained weight (frozen, a buffer).
        bias: ``(out,)`` or ``None`` (frozen).
        A: ``(r, in)`` initial LoRA ``A``; ``B`` starts at zero.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        A: Tensor,
        alpha: float,
        s: int,
        dropout: float = 0.0,
        use_rslora: bool = False,
        eps: float = 0.0,
    ) -> None:
        super().__init__()
        r = A.shape[0]
        self.register_buffer("W", weight.detach().clone())
        self.register_buffer("b", None if bias is None else bias.detach().clone())
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(torch.zeros(weight.shape[0], r, dtype=weight.dtype))
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.s, self.eps, self.p = s, eps, dropout
        self.delta: nn.Parameter | None = None
        self.U_s: Tensor | None = None
        self.V_s: Tensor | None = None
        self.index: list[int] | None = None

    def lora_update(self) -> Tensor:
        """Dense ``(α/r)·B A``, ``(out, in)``."""
        return self.scaling * self.B @ self.A

    def dash_update(self) -> Tensor:
        """Dense ``U_s diag(δ) V_sᵀ``, ``(out, in)``."""
        return self.U_s @ torch.diag(self.delta) @ self.V_s.T

    def forward(self, x: Tensor) -> Tensor:
        x_tilde = nn.functional.dropout(x, self.p, self.training)
        y = x @ self.W.T + x_tilde @ self.lora_update().T
        if self.delta is not None:
            y = y + x_tilde @ self.dash_update().T
        return y if self.b is None else y + self.b

    @torch.no_grad()
    def launch(self, svd_dtype: torch.dtype = torch.float32) -> nn.Parameter:
        """Select the directions from the pretrained ``W`` and the current LoRA update; return the new ``δ``."""
        self.index, U_s, V_s = naive_select(self.W, self.lora_update(), self.s, self.eps, svd_dtype)
        self.U_s, self.V_s = U_s.to(self.W.dtype), V_s.to(self.W.dtype)
        self.delta = nn.Parameter(torch.zeros(self.s, dtype=self.W.dtype))
        return self.delta


def train_naive(
    model: nn.Module, layers: list[NaiveLoRADash], batches, loss_fn, launch_step: int, lr: float, weight_decay: float
) -> None:
    """AdamW on every ``A``, ``B``; after optimizer step ``launch_step``, launch every layer and add
    the new ``δ`` to the optimizer (fresh state). ``batches`` yields ``(x, y)`` once per step."""
    parameters = [p for layer in layers for p in (layer.A, layer.B)]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    for step, (x, y) in enumerate(batches, start=1):
        model.train()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        if step == launch_step:
            optimizer.add_param_group({"params": [layer.launch() for layer in layers]})
