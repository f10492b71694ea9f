"""Weight-only quantized bases (QLoRA-style): recognise them and read their weight back as floats.

LoRA-Dash needs the pretrained ``W: (out, in)`` as floats three times: for the SVD at launch, for
the finiteness check before it, and for the fingerprint that adapter files carry. A quantized layer
stores integer codes (often packed) plus scales, so each of those uses the weight the library
*dequantizes* to, while the forward keeps running through the quantized layer itself. Supported:

- torchao: an ``nn.Linear`` whose weight is a torchao tensor subclass with its own ``dequantize()``
  (``quantize_`` with ``Int8WeightOnlyConfig`` or ``IntxWeightOnlyConfig``, for example).
- bitsandbytes ``Linear8bitLt`` with ``has_fp16_weights=False``, once quantized (on ``.to(device)``
  or at its first forward): ``W = codes · SCB / 127`` per output row.
- bitsandbytes ``Linear4bit`` (nf4 or fp4), once quantized:
  ``W = dequantize_4bit(codes, quant_state)``.

Anything else that is not a plain floating-point weight (an unknown tensor subclass, an integer or
packed weight of unknown kind, a bitsandbytes layer not yet quantized) is refused with a
``ValueError`` naming it: a silently wrong SVD of raw codes is the failure this module exists to
prevent.

The libraries are never imported here. A weight of their types can only exist once they are
imported, so looking them up in ``sys.modules`` costs nothing and keeps the core free of them. The
core knows none of this: importing this module installs :func:`dequantized_weight` as the reader of
:func:`lora_dash.bases.dequantize`.
"""

import copy
import sys

import torch
from torch import Tensor, nn

from lora_dash import bases


def _library_class(module_name: str, class_name: str) -> type | None:
    module = sys.modules.get(module_name)
    return getattr(module, class_name, None) if module is not None else None


def _is_instance(value: object, module_name: str, class_name: str) -> bool:
    cls = _library_class(module_name, class_name)
    return cls is not None and isinstance(value, cls)


def describe(module: nn.Module) -> str:
    """``"Linear8bitLt (weight: Int8Params, torch.int8)"``: what error messages call a layer."""
    weight = getattr(module, "weight", None)
    dtype = getattr(weight, "dtype", None)
    return f"{type(module).__name__} (weight: {type(weight).__name__}, {dtype})"


def _refuse(module: nn.Module, why: str) -> ValueError:
    return ValueError(f"unsupported quantized layer {describe(module)}: {why}")


def _bitsandbytes_int8(module: nn.Module) -> Tensor:
    """``W = codes · SCB / 127``: per output row, int8 codes times their absmax scale."""
    weight = module.weight
    if weight.has_fp16_weights:
        raise _refuse(
            module, "has_fp16_weights=True trains the weight itself; use has_fp16_weights=False"
        )
    # Before the first forward the scales sit on the weight, afterwards on the layer's state.
    scales = (
        weight.SCB
        if weight.SCB is not None
        else getattr(getattr(module, "state", None), "SCB", None)
    )
    if weight.dtype != torch.int8 or scales is None:
        raise _refuse(
            module, "not quantized yet; move it to its device (.to(device)) before wrapping it"
        )
    bnb_functional = sys.modules["bitsandbytes.functional"]
    return bnb_functional.int8_vectorwise_dequant(weight.data, scales)


def _bitsandbytes_4bit(module: nn.Module) -> Tensor:
    """``W = dequantize_4bit(codes, quant_state)``.

    The codes are packed nf4/fp4 values; the quant state holds their block scales.
    """
    weight = module.weight
    if not weight.bnb_quantized or weight.quant_state is None:
        raise _refuse(
            module, "not quantized yet; move it to its device (.to(device)) before wrapping it"
        )
    bnb_functional = sys.modules["bitsandbytes.functional"]
    codes, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        codes, state = _undo_cpu_packing(module, codes, state)
    return bnb_functional.dequantize_4bit(codes, state)


def _undo_cpu_packing(module: nn.Module, codes: Tensor, state: object) -> tuple[Tensor, object]:
    """The codes and scales of a ``Linear4bit`` repacked for the AVX512-BF16 CPU kernel.

    bitsandbytes does this in place at an eval-mode forward whose input needs no gradient: the codes
    are reordered and the scales become ``absmax: (in / blocksize, out)`` in bfloat16, which
    ``dequantize_4bit`` does not understand (it would return a wrong ``W`` without a word). Its own
    inverse restores the codes but leaves un-nested scales transposed, so the scales the kernel uses
    are put back here, flattened per output row; everything is done on copies.
    """
    bnb_functional = sys.modules["bitsandbytes.functional"]
    inverse = getattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise _refuse(
            module, "repacked for the CPU kernel by a bitsandbytes version without a way back"
        )
    restored = copy.deepcopy(state)
    # Keep the scales the kernel uses rather than re-quantizing them.
    restored.original_nested = False
    codes, restored = inverse(codes.clone(), restored)
    restored.absmax = state.absmax.T.reshape(-1).float()
    return codes, restored


def _torchao(module: nn.Module) -> Tensor:
    weight = module.weight
    # torch.Tensor.dequantize serves PyTorch's own quantized tensors;
    # a torchao class must define its own.
    if type(weight).dequantize is Tensor.dequantize:
        raise _refuse(module, "this torchao tensor type has no dequantize()")
    try:
        return weight.dequantize()
    except (NotImplementedError, RuntimeError, TypeError) as error:
        raise _refuse(module, f"its dequantize() failed: {error}") from error


def dequantized_weight(module: nn.Module) -> Tensor:
    """The float weight ``(out, in)`` of a quantized linear layer, as its library dequantizes it.

    Shapes come from ``module.in_features`` / ``module.out_features``, never from the stored tensor
    (bitsandbytes 4-bit packs two codes a byte into ``(out·in/2, 1)``).

    Returns:
        ``(out, in)`` floating-point: torchao in the layer's dtype, bitsandbytes 8-bit in float32,
        bitsandbytes 4-bit in the dtype it was quantized from.

    Raises:
        ValueError: the layer is not quantized in one of the supported ways (see the module
            docstring), or its library returns something other than a floating ``(out, in)`` matrix.
    """
    if not isinstance(module, nn.Linear):
        raise _refuse(module, "only nn.Linear subclasses are supported quantized")
    weight = module.weight
    if _is_instance(weight, "bitsandbytes.nn", "Int8Params"):
        dense = _bitsandbytes_int8(module)
    elif _is_instance(weight, "bitsandbytes.nn", "Params4bit"):
        dense = _bitsandbytes_4bit(module)
    elif _is_instance(weight, "torchao.utils", "TorchAOBaseTensor"):
        dense = _torchao(module)
    elif type(weight) in (Tensor, nn.Parameter):
        raise _refuse(
            module, "an integer weight without scales of a known library; refusing to use raw codes"
        )
    else:
        raise _refuse(
            module,
            "unknown tensor type; supported: torchao tensors, bitsandbytes Int8Params/Params4bit",
        )
    expected = (module.out_features, module.in_features)
    if not dense.is_floating_point() or tuple(dense.shape) != expected:
        raise _refuse(
            module,
            f"it dequantizes to {tuple(dense.shape)} {dense.dtype}, expected {expected} floats",
        )
    return dense


bases.set_weight_reader(dequantized_weight)
