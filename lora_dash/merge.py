"""`merge_and_unload`: fold every adapter into its base and put the plain base modules back."""

import torch
from torch import nn

from lora_dash.bases import is_quantized, is_sharded
from lora_dash.inject import require_dash_layers
from lora_dash.layer import LoRADashLinear


def _dequantized_merge(layer: LoRADashLinear, dtype: torch.dtype | None) -> nn.Linear:
    """A float ``nn.Linear`` holding ``W_dequantized + ΔW`` and the base's bias.

    The sum is taken in float32, then cast to ``dtype``.
    """
    dense = layer.base_weight()
    dtype = dtype or dense.dtype
    merged = dense.float() + layer.delta_weight().to(dense.device)
    bias = layer.base.bias
    linear = nn.Linear(
        layer.in_features,
        layer.out_features,
        bias=bias is not None,
        device=dense.device,
        dtype=dtype,
    )
    linear.weight = nn.Parameter(merged.to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(
            bias.detach().to(dtype).clone(), requires_grad=bias.requires_grad
        )
    return linear.train(layer.training)


@torch.no_grad()
def merge_and_unload(
    model: nn.Module, dequantize: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """Merge every LoRA-Dash layer into its base and put the plain base module back in its place.

    Each layer's base then computes with the effective weight alone::

        W' = W + (α/r)·B A + U_s diag(δ) V_sᵀ        (W' : (out, in); Conv1D stores W'ᵀ, handled)

    so ``model`` has no LoRA-Dash module left and ``save_pretrained`` writes an ordinary checkpoint
    that loads without lora_dash. A layer that is already merged (``layer.merged``) is unloaded as
    it is. A module tied under several names is replaced under every one of them by the same module.

    A quantized base cannot hold ``W'`` in its codes. With ``dequantize=True`` it is replaced by a
    new float ``nn.Linear`` holding ``W_dequantized + ΔW`` and the base's bias, in ``dtype``. By
    default that is the dtype its library dequantizes to (see
    :func:`lora_dash.quantized.dequantized_weight`); bitsandbytes 8-bit gives float32, so pass the
    dtype the rest of the model computes in. The rest of the model, any ``quantization_config`` in a
    Hugging Face config included, is left as it is.

    All checks come first: on any error ``model`` is unchanged.

    Args:
        model: a model with LoRA-Dash layers (from :func:`lora_dash.inject`).
        dequantize: replace quantized bases by float layers; required when there are any.
        dtype: floating dtype of those new layers; ``None`` keeps the dequantized weight's dtype.

    Returns:
        ``model``, changed in place; when ``model`` is itself a ``LoRADashLinear``, its merged base.

    Raises:
        ValueError: the model has no LoRA-Dash layer.
        ValueError: ``dtype`` is not a floating-point dtype.
        RuntimeError: a base is quantized and ``dequantize`` is False, or a base is sharded by FSDP2
            (gather the full model first).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    layers = require_dash_layers(model)
    sharded = [name for name, layer in layers.items() if is_sharded(layer.base.weight)]
    if sharded:
        raise RuntimeError(
            f"layers {sharded} are sharded by FSDP2; merge a gathered, unsharded copy of the model"
        )
    quantized_layers = [name for name, layer in layers.items() if is_quantized(layer.base)]
    if quantized_layers and not dequantize:
        raise RuntimeError(
            f"layers {quantized_layers} have quantized bases, which cannot hold W + ΔW; "
            "pass dequantize=True to replace them by floating-point nn.Linear layers holding "
            "W_dequantized + ΔW"
        )
    # Everything that can fail (dequantizing) happens before the first change.
    replacements = {
        id(layer): _dequantized_merge(layer, dtype) if name in quantized_layers else layer.base
        for name, layer in layers.items()
    }
    for layer in layers.values():
        if not layer.merged and not is_quantized(layer.base):
            layer.merge()
    if isinstance(model, LoRADashLinear):
        return replacements[id(model)]
    # Every name a wrapper is registered under, tied aliases included; collected before replacing.
    places = [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, LoRADashLinear)
    ]
    for name, module in places:
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacements[id(module)])
    return model
