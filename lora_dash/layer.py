"""`LoRADashLinear`: a frozen linear layer with a LoRA branch and a dash branch beside it."""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_dash import directions, fused
from lora_dash.bases import dequantize, full_tensor, is_conv1d, is_quantized
from lora_dash.checks import check_int, check_number
from lora_dash.directions import DashDirections

__all__ = ["DashDirections", "LoRADashLinear", "adapter_product", "check_arguments"]


class LoRADashLinear(nn.Module):
    """A frozen linear layer plus LoRA, plus a dash along ``s`` task-specific directions after the
    launch.

    With ``W: (out, in)`` the frozen pretrained weight (``Conv1D`` stores ``Wᵀ``; it is handled) and
    ``x̃ = dropout(x)``::

        y = W x + b + (α/r)·B A x̃ + U_s diag(δ) V_sᵀ x̃

    ``A: (r, in)`` (Kaiming-uniform), ``B: (out, r)`` (zeros), ``δ: (s,)`` (zeros), and the buffers
    ``U_s: (out, s)``, ``V_s: (in, s)`` hold zeros until :meth:`launch` fills them with the singular
    vectors of ``W`` whose change rate under ``(α/r)·B A`` is largest
    (:func:`lora_dash.directions.select_task_directions`). Before the launch the dash term is not
    computed at all; :attr:`launched` (a plain bool, no tensor read) says which phase runs.

    Input ``(..., in)`` → output ``(..., out)`` in the base layer's dtype. Adapter parameters and
    buffers are float32 for a half-precision or quantized base (float64 for a float64 one). A
    quantized base computes ``W x`` in its own kernels; ``W`` for the SVD is what it dequantizes to
    (:func:`lora_dash.bases.dequantize`).

    Training runs the whole layer as one ``autograd.Function`` (:mod:`lora_dash.fused`: PEFT's
    operation count before the launch). Bases it cannot serve (quantized, FSDP2-sharded, hooked;
    :func:`lora_dash.fused.serves`) and ``fused = False`` run the reference, ``base(x)`` plus
    :func:`adapter_product` in autograd's own operations.

    Args:
        base: the ``nn.Linear`` or ``Conv1D`` to wrap; it is kept as ``self.base`` and frozen.
        r: LoRA rank, ``>= 1``.
        alpha: LoRA ``α``; the LoRA scaling is ``α / r`` (``α / √r`` with ``use_rslora``).
        s: number of task-specific directions, ``1 <= s <= min(in, out)``.
        dropout: dropout probability on the adapter input, in ``[0, 1)``.
        use_rslora: scale by ``α / √r`` (rank-stabilized LoRA).
        eps: the paper's ``ε`` in ``ρ_i = |c_i| / (σ_i + ε)``; the authors' code uses 0.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float = 16.0,
        s: int = 8,
        dropout: float = 0.0,
        use_rslora: bool = False,
        eps: float = 0.0,
    ) -> None:
        super().__init__()
        in_features, out_features = check_arguments(base, r, s, dropout, eps)
        weight = base.weight

        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.s, self.eps, self.use_rslora = r, alpha, s, eps, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.name = ""  # dotted name in the model, set by `inject`, used in error messages
        self.merged = False
        self.launched = False  # the phase; the dash_launched buffer carries it in state dicts
        self.fused = True  # train with lora_dash.fused's kernel where it serves the base

        # Adapters train in at least float32: in fp16 Adam's eps underflows and a zero gradient
        # (A's at step 1, δ's before launch) would become 0/0 = NaN. Outputs keep the base dtype.
        device = weight.device
        factory = {"device": device, "dtype": torch.promote_types(weight.dtype, torch.float32)}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as loralib and PEFT
        self.dash_delta = nn.Parameter(torch.zeros(s, **factory))
        self.register_buffer("dash_U", torch.zeros(out_features, s, **factory))
        self.register_buffer("dash_V", torch.zeros(in_features, s, **factory))
        self.register_buffer("dash_index", torch.full((s,), -1, dtype=torch.long, device=device))
        self.register_buffer("dash_launched", torch.zeros((), dtype=torch.bool, device=device))
        for p in base.parameters():
            p.requires_grad_(False)

    def _apply(self, fn, recurse=True):
        """``.to``, ``.half()``… apply to every tensor; the adapter's then go back to at least
        float32 (see ``__init__``), in place, so optimizers keep their references."""
        super()._apply(fn, recurse)
        dtype = torch.promote_types(self.base.weight.dtype, torch.float32)
        for tensor in (self.lora_A, self.lora_B, self.dash_delta, self.dash_U, self.dash_V):
            if tensor.dtype != dtype:
                tensor.data = tensor.data.to(dtype)
                if tensor.grad is not None:
                    tensor.grad = tensor.grad.to(dtype)
        return self

    # ----------------------------------------------------------------------------------- state
    def _load_from_state_dict(self, *args, **kwargs):
        """``load_state_dict`` restores the phase too (:meth:`restore_phase`)."""
        super()._load_from_state_dict(*args, **kwargs)
        self.restore_phase()

    def restore_phase(self) -> None:
        """:attr:`launched` from the ``dash_launched`` buffer (after the buffers were written)."""
        if not self.dash_launched.is_meta:
            self.launched = bool(self.dash_launched)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """This adapter's trainable parameters: ``A``, ``B`` and ``δ`` (never the base layer's)."""
        return [self.lora_A, self.lora_B, self.dash_delta]

    def base_weight(self, gather: Callable[[Tensor], Tensor | None] = full_tensor) -> Tensor | None:
        """The whole frozen weight in ``(out, in)`` layout (a Conv1D's transposed, a quantized one
        dequantized). ``gather`` makes a sharded weight whole: by default FSDP2's shards are
        all-gathered (every rank must call this); ``None`` from ``gather`` is passed on."""
        if is_quantized(self.base):
            return dequantize(self.base)
        weight = gather(self.base.weight)
        return weight.T if weight is not None and is_conv1d(self.base) else weight

    def _where(self) -> str:
        return f"layer {self.name!r}" if self.name else "LoRADashLinear"

    # --------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """``(..., in)`` → ``(..., out)``; see the class docstring for the equation."""
        if self.merged:
            return self.base(x)
        x_tilde = self.dropout(x)
        A, B, V_s, delta, U_s = self.lora_A, self.lora_B, self.dash_V, self.dash_delta, self.dash_U
        if self.fused and fused.serves(self.base):  # one autograd.Function for the whole layer
            x_adapter = None if x_tilde is x else x_tilde
            weight, bias = fused.frozen_weight(self.base), self.base.bias
            return fused.adapted_linear(
                x, x_adapter, weight, bias, A, B, self.scaling, V_s, delta, U_s, self.launched
            )
        # The reference: the base's own forward (quantized, sharded, hooked), autograd's own ops.
        y = self.base(x)
        branches = adapter_product(x_tilde.to(A.dtype), A, B, self.scaling, V_s, delta, U_s)
        return y + branches.to(y.dtype)

    # ---------------------------------------------------------------------------------- launch
    @torch.no_grad()
    def find_directions(
        self,
        svd_dtype: torch.dtype = torch.float32,
        strategy: str = "tsd",
        generator: torch.Generator | None = None,
        whole: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> DashDirections:
        """Select the task-specific directions from the current LoRA update; changes nothing.

        :func:`lora_dash.directions.select_task_directions` (METHOD.md §3.2) on the pretrained ``W``
        (not ``W + ΔW``), this layer's ``A``, ``B``, ``α/r``, ``s`` and ``eps``, the SVD in
        ``svd_dtype``. Another ``strategy`` picks baseline directions instead
        (:func:`lora_dash.directions.pick_directions`; ``"random"`` needs ``generator``).

        ``whole``: ``(W: (out, in), A: (r, in), B: (out, r))`` already made whole (by the one rank
        that selects for this layer, say); by default this layer's own, FSDP2's shards all-gathered
        on every rank.

        Raises:
            RuntimeError: the layer is already launched or is merged (``W`` would include ``ΔW``).
            ValueError: an unknown strategy, ``"random"`` without a generator, ``A``, ``B`` or ``W``
                not finite, or fewer than ``s`` eligible directions (the message names the layer).
        """
        directions.check_strategy(strategy)
        self.check_launchable()
        if whole is None:
            # Every rank gathers the same, so every rank selects what one process would.
            A, B = full_tensor(self.lora_A), full_tensor(self.lora_B)
            whole = self.base_weight(), A, B
        weight, A, B = whole
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"{self._where()}: the LoRA update is not finite; not selecting")
        if not torch.isfinite(weight).all():
            raise ValueError(f"{self._where()}: the pretrained weight is not finite")
        try:
            return directions.select_task_directions(
                weight, A, B, self.scaling, self.s, self.eps, strategy, generator, svd_dtype
            )
        except ValueError as error:
            raise ValueError(f"{self._where()}: {error}") from error

    def check_launchable(self) -> None:
        """Raise ``RuntimeError`` if launched already or merged (``W`` would include ``ΔW``)."""
        if self.launched:
            raise RuntimeError(f"{self._where()} is already launched; launch happens once")
        if self.merged:
            raise RuntimeError(f"{self._where()} is merged; unmerge() before launching")

    @torch.no_grad()
    def launch(self, chosen: DashDirections | None = None) -> None:
        """Enter the dash phase: store ``U_s``, ``V_s`` and the indices, zero ``δ``.

        ``chosen`` defaults to :meth:`find_directions`; passing it lets a caller select for every
        layer first and commit only when all selections succeeded.
        """
        self.check_launchable()
        if chosen is None:
            chosen = self.find_directions()
        expected = [self.dash_U.shape, self.dash_V.shape, self.dash_index.shape]
        if [tensor.shape for tensor in chosen] != expected:
            raise ValueError(f"{self._where()}: directions of the wrong shape for s={self.s}")
        self.dash_U.copy_(chosen.U_s)
        self.dash_V.copy_(chosen.V_s)
        self.dash_index.copy_(chosen.index)
        self.dash_delta.zero_()
        self.dash_launched.fill_(True)
        self.launched = True

    # ----------------------------------------------------------------------------------- merge
    def delta_weight(self) -> Tensor:
        """The effective update ``ΔW = (α/r)·B A + U_s diag(δ) V_sᵀ``, ``(out, in)``, in float32."""
        A, B = self.lora_A.float(), self.lora_B.float()
        dash = directions.dash_update(
            self.dash_U.float(), self.dash_delta.float(), self.dash_V.float()
        )
        return self.scaling * (B @ A) + dash

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``ΔW`` into the base weight (arithmetic in float32); forward then uses ``W + ΔW``
        alone.

        Raises ``RuntimeError`` if already merged, or for a quantized base (its codes cannot hold
        ``W + ΔW``: :func:`lora_dash.merge_and_unload` with ``dequantize=True`` builds a float
        layer).
        """
        if self.merged:
            raise RuntimeError(f"{self._where()} is already merged")
        if is_quantized(self.base):
            raise RuntimeError(
                f"{self._where()}: cannot merge into the quantized {type(self.base).__name__}; "
                "use lora_dash.merge_and_unload(model, dequantize=True) for a floating-point model"
            )
        self._add_to_base(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``ΔW`` from the base weight again (exact up to float32 rounding)."""
        if not self.merged:
            raise RuntimeError(f"{self._where()} is not merged")
        self._add_to_base(-self.delta_weight())
        self.merged = False

    def _add_to_base(self, update: Tensor) -> None:
        weight = self.base.weight
        if is_conv1d(self.base):
            update = update.T
        weight.copy_(weight.float() + update.to(weight.device))

    def extra_repr(self) -> str:
        phase = "dash" if self.launched else "pre-launch"
        shape = f"in={self.in_features}, out={self.out_features}"
        adapter = f"r={self.r}, alpha={self.alpha}, s={self.s}, scaling={self.scaling:.4g}"
        return f"{shape}, {adapter}, phase={phase}, merged={self.merged}"


def adapter_product(
    x: Tensor, A: Tensor, B: Tensor, scaling: float, V_s: Tensor, delta: Tensor, U_s: Tensor
) -> Tensor:
    """The two branches beside the frozen layer with autograd's own operations, the reference:
    ``(α/r)·x Aᵀ Bᵀ + (x V_s ⊙ δ) U_sᵀ``, ``(..., in)`` → ``(..., out)``, never forming an
    ``(out, in)`` matrix. :mod:`lora_dash.fused` computes the same with fewer operations."""
    return F.linear(F.linear(x, A) * scaling, B) + F.linear(F.linear(x, V_s.T) * delta, U_s)


def check_arguments(base: nn.Module, r: int, s: int, dropout: float, eps: float) -> tuple[int, int]:
    """Validate the arguments of :class:`LoRADashLinear`; return ``(in_features, out_features)``.

    A quantized base is dequantized once here, so one that cannot be read is refused now, not at
    launch.
    """
    if not (isinstance(base, nn.Linear) or is_conv1d(base)):
        raise ValueError(f"LoRADashLinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
    if is_quantized(base):
        dequantize(base)
    # From the layer's declared features: a quantized weight may be packed into another shape.
    if is_conv1d(base):
        in_features, out_features = base.weight.shape
    else:
        in_features, out_features = base.in_features, base.out_features
    check_int("r", r, 1)
    k = min(in_features, out_features)
    check_int("s", s, 1, k, f"min(in, out)={k}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    check_number("eps", eps)
    return in_features, out_features
