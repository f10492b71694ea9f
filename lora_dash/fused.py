"""The layer's training kernel: the whole adapted linear layer as one ``autograd.Function``.

With ``x̃ = dropout(x)`` (or ``x`` itself) and ``h = x̃ Aᵀ``, ``z = x̃ V_s``::

    y = x Wᵀ + b + (α/r)·h Bᵀ                      before the launch (what PEFT's LoRA computes)
    y = x Wᵀ + b + (α/r)·h Bᵀ + z diag(δ) U_sᵀ     after it

Autograd's own operations (:func:`lora_dash.layer.adapter_product`, the reference) dispatch the
dash's products before the launch too, where they add zeros, and keep a float32 copy of ``x̃`` under
a half-precision base. Written out by hand, a training step does what PEFT's LoRA does before the
launch (three products forward, five backward) and only the dash's own few operations after it:

- α/r and δ are folded into the products (``addmm``'s ``alpha``, ``U_s ⊙ δ``), not separate passes;
- the backward issues the frozen product ``g W`` first, the layer's largest;
- it keeps ``x̃`` in the base's dtype (half of PEFT's float32 copy on a bf16 base), ``h`` and, after
  the launch, ``z``: ``tokens·(r + s)`` numbers beside ``x̃``.

Before the launch δ is an input that gets no gradient (``None``): DDP sees it used and fills zeros,
and an optimizer skips it, as it skips any parameter without a gradient. Autocast is
honoured as ``torch.amp.custom_fwd`` / ``custom_bwd`` would: the backward runs under the forward's
autocast state. :func:`serves` says which bases this kernel can compute; the layer runs the
reference product for the others.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_dash.bases import is_conv1d


def serves(base: nn.Module) -> bool:
    """Whether :func:`adapted_linear` computes ``base``'s forward exactly as ``base(x)`` would.

    Yes for a plain ``nn.Linear`` or ``Conv1D`` with a frozen floating-point weight held whole.
    No for quantized weights (their own kernels), FSDP2's shards, subclasses with their own forward,
    and bases with forward hooks or a replaced ``forward`` (accelerate's offloading): calling
    ``F.linear`` on their weight would skip what they do.
    """
    # Checked on every forward, so cheap checks only (no tensor is read).
    if not (type(base) is nn.Linear or is_conv1d(base)):
        return False
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        return False
    weight, bias = base.weight, base.bias
    # Held whole as a plain tensor: not a quantization library's subclass, nor FSDP2's DTensor.
    plain = type(weight) is nn.Parameter or type(weight) is Tensor
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    return plain and frozen and weight.is_floating_point()


def frozen_weight(base: nn.Module) -> Tensor:
    """``W: (out, in)`` of a base :func:`serves`: the weight, or a transposed view of a Conv1D's."""
    if is_conv1d(base):
        return base.weight.T
    return base.weight


def add_product(out: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``out + alpha · a b`` for ``out: (t, o)``, ``a: (t, k)``, ``b: (k, o)``, written into ``out``
    (a tensor this kernel made) by one ``addmm_``: no copy of ``out``.

    A base in lower precision than the adapter (a bf16 ``out``, float32 factors) gets the product
    added in the adapter's precision, rounded once: ``(out.float() + alpha · a b).to(bf16)``.
    Under autocast, ``addmm`` casts its arguments itself (not in place: the dtypes may differ).
    """
    if torch.is_autocast_enabled(out.device.type):
        return torch.addmm(out, a, b, alpha=alpha)
    if out.dtype == a.dtype == b.dtype:
        return out.addmm_(a, b, alpha=alpha)
    return out.add_(a @ b, alpha=alpha)


class AdaptedLinear(torch.autograd.Function):
    """The frozen product, the LoRA branch and (when ``dash``) the dash branch, with a hand-written
    backward.

    Shapes: ``x: (..., in)``; ``x_adapter``: ``dropout(x)`` of the same shape, or ``None`` when it
    is ``x`` itself; ``weight: (out, in)``, ``bias: (out,)`` or ``None``, both frozen;
    ``A: (r, in)``, ``B: (out, r)``, ``V_s: (in, s)``, ``delta: (s,)``, ``U_s: (out, s)`` →
    ``(..., out)`` in the base's dtype. With ``g = ∂L/∂y`` as ``(tokens, out)``,
    ``g_B = (α/r)·g B`` and ``g_U = g U_s``::

        ∂L/∂x = g W  [+ g_B A + (g_U ⊙ δ) V_sᵀ  when x̃ = x]
        ∂L/∂A = g_Bᵀ x̃        ∂L/∂B = (α/r)·gᵀ h        ∂L/∂δ = Σ_tokens g_U ⊙ z

    (δ gets no gradient, ``None``, before the launch).

    ``weight``, ``bias``, ``V_s`` and ``U_s`` get no gradient.
    """

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, A, B, scaling, V_s, delta, U_s, dash):
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.scaling, ctx.dash, ctx.separate_input = scaling, dash, x_adapter is not None
        ctx.input_shape = x.shape
        x = as_matrix(x)  # (tokens, in)
        x_tilde = x if x_adapter is None else as_matrix(x_adapter)
        x_float = cast(x_tilde, A.dtype)  # the adapter's precision; not kept for the backward

        y = F.linear(x, weight, bias)  # (tokens, out), the base's dtype
        h = F.linear(x_float, A)  # (tokens, r)
        y = add_product(y, h, B.T, alpha=scaling)
        saved = [x_tilde, h, weight, A, B]
        if dash:
            z = x_float @ V_s  # (tokens, s)
            y = add_product(y, z, (U_s * delta).T)
            saved += [z, V_s, delta, U_s]
        ctx.save_for_backward(*saved)
        return like_input(y, ctx.input_shape)

    @staticmethod
    def backward(ctx, grad):
        device, enabled, dtype = ctx.autocast
        if not enabled:
            return AdaptedLinear.gradients(ctx, grad)
        with torch.autocast(device, dtype=dtype):
            return AdaptedLinear.gradients(ctx, grad)

    @staticmethod
    def gradients(ctx, grad: Tensor) -> tuple:
        x_tilde, h, weight, A, B, *dash_saved = ctx.saved_tensors
        needs_x, needs_x_tilde, _, _, needs_A, needs_B, _, _, needs_delta, _, _ = (
            ctx.needs_input_grad
        )
        g = as_matrix(grad)  # (tokens, out)
        grad_x = g @ weight if needs_x else None  # the frozen product first: the layer's largest

        g_float = cast(g, A.dtype)
        g_B = (g_float @ B).mul_(ctx.scaling)  # (tokens, r), α/r folded in once
        grad_x_tilde = None
        if needs_x and not ctx.separate_input:
            grad_x = add_product(grad_x, g_B, A)
        elif needs_x_tilde:
            grad_x_tilde = g_B @ A
        grad_A = g_B.T @ cast(x_tilde, A.dtype) if needs_A else None
        grad_B = (g_float.T @ h).mul_(ctx.scaling) if needs_B else None

        grad_delta = None
        if ctx.dash:
            z, V_s, delta, U_s = dash_saved
            g_U = g_float @ U_s  # (tokens, s)
            if needs_x and not ctx.separate_input:
                grad_x = add_product(grad_x, g_U * delta, V_s.T)
            elif needs_x_tilde:
                grad_x_tilde = add_product(grad_x_tilde, g_U * delta, V_s.T)
            grad_delta = (g_U * z).sum(0) if needs_delta else None

        grad_x = like_input(grad_x, ctx.input_shape)
        grad_x_tilde = like_input(grad_x_tilde, ctx.input_shape)
        return grad_x, grad_x_tilde, None, None, grad_A, grad_B, None, None, grad_delta, None, None


# Each Python-side call costs about a microsecond, what a whole small matmul costs: on short steps
# the three helpers below skip the reshapes and casts that would change nothing.
def as_matrix(tensor: Tensor) -> Tensor:
    """``(..., features)`` as ``(tokens, features)``."""
    if tensor.dim() == 2:
        return tensor
    return tensor.reshape(-1, tensor.shape[-1])


def like_input(tensor: Tensor | None, shape: torch.Size) -> Tensor | None:
    """``(tokens, features)`` back to the input's leading dimensions (``None`` stays ``None``)."""
    if tensor is None or len(shape) == 2:
        return tensor
    return tensor.view(*shape[:-1], tensor.shape[-1])


def cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` in ``dtype``."""
    if tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def adapted_linear(
    x: Tensor,
    x_adapter: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    scaling: float,
    V_s: Tensor,
    delta: Tensor,
    U_s: Tensor,
    dash: bool,
) -> Tensor:
    """``x Wᵀ + b + scaling·x̃ Aᵀ Bᵀ`` (``+ x̃ V_s diag(δ) U_sᵀ`` when ``dash``) through
    :class:`AdaptedLinear`; ``x_adapter`` is ``x̃`` when it differs from ``x`` (dropout), else
    ``None``."""
    return AdaptedLinear.apply(x, x_adapter, weight, bias, A, B, scaling, V_s, delta, U_s, dash)
