"""What kind of frozen layer a ``LoRADashLinear`` wraps, and how to read its weight
``W: (out, in)``.

A base is an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (which stores ``Wᵀ``). Its weight may be a
plain tensor, FSDP2's shards of one (a ``DTensor``), or a quantized library's codes. The layer asks
these predicates which forward can serve it and how to get ``W`` for the launch's SVD.
"""

import sys
from collections.abc import Callable

from torch import Tensor, nn


def is_conv1d(module: nn.Module) -> bool:
    """True for a GPT-2 style ``Conv1D``: ``y = x @ weight + bias``, with ``weight`` stored
    ``(in, out)``."""
    if type(module).__name__ != "Conv1D":  # first: the layer's forward asks this every step
        return False
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, Tensor)
        and weight.dim() == 2
        and weight.shape[1] == getattr(module, "nf", None)
    )


def is_sharded(tensor: Tensor) -> bool:
    """True for a ``DTensor``, the form FSDP2 gives parameters outside forward (a shard each)."""
    # A DTensor exists only once torch.distributed.tensor is imported; the lookup imports nothing.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def is_quantized(module: nn.Module) -> bool:
    """True when ``module.weight`` holds codes, not ``W``: it is not a plain floating-point tensor
    (or FSDP2's shards of one) but integers or a quantization library's tensor subclass."""
    weight = module.weight
    plain = type(weight) in (Tensor, nn.Parameter) or is_sharded(weight)
    return not (plain and weight.is_floating_point())


def full_tensor(tensor: Tensor) -> Tensor:
    """``tensor`` whole: a ``DTensor`` is all-gathered (a collective: every rank must make the same
    calls in the same order); a plain tensor is returned as it is."""
    if is_sharded(tensor):
        return tensor.full_tensor()
    return tensor


#: Reads a quantized base's weight back as floats, ``(module) -> W: (out, in)``, or raises
#: ``ValueError``. Installed by :mod:`lora_dash.quantized` (``import lora_dash`` imports it).
_weight_reader: Callable[[nn.Module], Tensor] | None = None


def set_weight_reader(reader: Callable[[nn.Module], Tensor]) -> None:
    """Install the reader :func:`dequantize` uses for quantized bases (one at a time)."""
    global _weight_reader
    _weight_reader = reader


def dequantize(module: nn.Module) -> Tensor:
    """``W: (out, in)`` as the floats that a quantized ``module``'s codes stand for.

    Raises:
        ValueError: no reader is installed, or the installed one cannot read ``module``.
    """
    if _weight_reader is None:
        raise ValueError(
            f"{type(module).__name__} holds a quantized weight, and no reader for it is installed "
            "(import lora_dash.quantized)"
        )
    return _weight_reader(module)
