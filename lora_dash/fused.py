"""The adapter product with a lean backward: what a training step keeps is the adapter's input alone.

:func:`lora_dash.layer.adapter_product` computes ``(α/r)·x Aᵀ Bᵀ + (x V_s ⊙ δ) U_sᵀ`` with autograd's
own operations, which keep for the backward the input ``x̃`` and both inner products, ``x̃ Aᵀ``
(``tokens·r`` numbers, as PEFT's LoRA keeps) and ``x̃ V_s`` (``tokens·s`` more, before the launch too,
where the dash is zero). :class:`AdapterProduct` computes the same in one rank-``(r + s)`` product
and keeps only ``x̃`` (shared with nothing else) and the factors, which the layer holds anyway; the
backward recomputes ``[x̃ Aᵀ | x̃ V_s]`` in one product, a pass over ``x̃``, instead of storing it.
So a training step keeps ``tokens·r`` numbers fewer than PEFT's LoRA, in both phases.

Importing this module plugs :func:`adapter_product` into :func:`lora_dash.layer.adapter_product`.
"""

import torch
from torch import Tensor

from lora_dash import layer


class AdapterProduct(torch.autograd.Function):
    """``y = x [(α/r)A ; V_sᵀ]ᵀ [B | U_s diag(δ)]ᵀ`` with a hand-written backward.

    Shapes: ``x: (..., in)``, ``A: (r, in)``, ``B: (out, r)``, ``V_s: (in, s)``, ``δ: (s,)``,
    ``U_s: (out, s)`` → ``(..., out)``. With ``g = ∂L/∂y`` flattened to ``(tokens, out)``, ``h = x Aᵀ``,
    ``z = x V_s``, ``g_B = g B`` and ``g_U = g U_s``::

        ∂L/∂x = (α/r)·g_B A + (g_U ⊙ δ) V_sᵀ      ∂L/∂A = (α/r)·g_Bᵀ x      ∂L/∂B = (α/r)·gᵀ h
        ∂L/∂δ = Σ_tokens z ⊙ g_U = Σ_out U_s ⊙ gᵀ z      (the second sum: over a small matrix, not the tokens)

    ``V_s`` and ``U_s`` are buffers and get no gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, scaling: float, V_s: Tensor, delta: Tensor, U_s: Tensor):
        ctx.save_for_backward(x, A, B, V_s, delta, U_s)
        ctx.scaling = scaling
        down = torch.cat([A * scaling, V_s.T])  # (r+s, in)
        up = torch.cat([B, U_s * delta], dim=1)  # (out, r+s)
        return (x @ down.T) @ up.T

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, A, B, V_s, delta, U_s = ctx.saved_tensors
        scaling, r = ctx.scaling, A.shape[0]
        grad = grad.to(x.dtype)
        hz = x @ torch.cat([A, V_s.T]).T  # (..., r+s): [h | z], recomputed
        g_BU = grad @ torch.cat([B, U_s], dim=1)  # (..., r+s): [g_B | g_U]
        g_B, g_U = g_BU[..., :r], g_BU[..., r:]
        grad_x = grad_A = grad_B = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.cat([g_B * scaling, g_U * delta], dim=-1) @ torch.cat([A, V_s.T])
        if ctx.needs_input_grad[1]:
            grad_A = scaling * g_B.flatten(0, -2).T @ x.flatten(0, -2)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[5]:
            grad_BU = grad.flatten(0, -2).T @ hz.flatten(0, -2)  # (out, r+s): [gᵀ h | gᵀ z]
            grad_B = scaling * grad_BU[:, :r] if ctx.needs_input_grad[2] else None
            grad_delta = (U_s * grad_BU[:, r:]).sum(0) if ctx.needs_input_grad[5] else None  # Σ_tokens z ⊙ g U_s
        return grad_x, grad_A, grad_B, None, None, grad_delta, None


#: The reference this module replaces (autograd's own operations), kept to compare against.
reference_product = layer.adapter_product


def adapter_product(x: Tensor, A: Tensor, B: Tensor, scaling: float, V_s: Tensor, delta: Tensor, U_s: Tensor) -> Tensor:
    """:func:`lora_dash.layer.adapter_product` through :class:`AdapterProduct`."""
    return AdapterProduct.apply(x, A, B, scaling, V_s, delta, U_s)


layer.adapter_product = adapter_product
