"""Put LoRA-Dash layers into any `nn.Module` by name."""

import re

from torch import nn

from lora_dash.layer import LoRADashLinear, check_arguments


def dash_layers(model: nn.Module) -> dict[str, LoRADashLinear]:
    """Every ``LoRADashLinear`` in ``model``, by dotted module name, in registration order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRADashLinear)}


def inject(
    model: nn.Module,
    target_regex: str,
    r: int = 8,
    alpha: float = 16.0,
    s: int = 8,
    dropout: float = 0.0,
    use_rslora: bool = False,
    eps: float = 0.0,
) -> dict[str, LoRADashLinear]:
    """Replace, in place, every linear layer whose dotted name fully matches ``target_regex``.

    Matching uses ``re.fullmatch`` on names as ``model.named_modules()`` gives them, e.g.
    ``r"encoder\\.layer\\.\\d+\\.attention\\.self\\.(query|value)"`` or ``r".*\\.(q|v)_proj"``.
    Afterwards every parameter of ``model`` is frozen except the adapter parameters (``A``, ``B``, ``δ``)
    of the injected layers. All inputs are validated before the model is touched: on any error the
    model is exactly as it was.

    The remaining arguments are those of :class:`LoRADashLinear`.

    Returns:
        The new layers by dotted name; each wraps the replaced module as ``.base``.

    Raises:
        ValueError: invalid regex; nothing matches; a match is not ``nn.Linear``/``Conv1D``;
            a match is already (inside) a LoRA-Dash layer; invalid ``r``, ``s``, ``dropout``, ``eps``.
    """
    try:
        pattern = re.compile(target_regex)
    except re.error as error:
        raise ValueError(f"invalid target_regex {target_regex!r}: {error}") from error

    all_names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        all_names.setdefault(id(module), []).append(name)
    matches = {name: module for name, module in model.named_modules(remove_duplicate=False)
               if name and pattern.fullmatch(name)}
    if not matches:
        some = ", ".join(name for name, _ in list(model.named_modules())[1:9])
        raise ValueError(f"target_regex {target_regex!r} matches no module; names look like: {some}")
    # By identity, not by name: a tied module is listed under only one of its names.
    adapted = {id(sub) for layer in dash_layers(model).values() for sub in layer.modules()}
    for name, module in matches.items():
        if id(module) in adapted:
            raise ValueError(f"module {name!r} is already adapted by LoRA-Dash; inject once per layer")
        unmatched_aliases = [alias for alias in all_names[id(module)] if alias not in matches]
        if unmatched_aliases:
            raise ValueError(f"module {name!r} is also registered as {unmatched_aliases}, which "
                             f"{target_regex!r} does not match; match every name of a tied module")
        try:
            check_arguments(module, r, s, dropout, eps)
        except ValueError as error:
            raise ValueError(f"module {name!r} (matched by {target_regex!r}): {error}") from error

    # A module registered under several names gets one wrapper, so tied layers stay tied.
    wrappers: dict[int, LoRADashLinear] = {}
    for module in matches.values():
        if id(module) not in wrappers:
            wrappers[id(module)] = LoRADashLinear(module, r, alpha, s, dropout, use_rslora, eps)
    for p in model.parameters():
        p.requires_grad_(False)
    injected: dict[str, LoRADashLinear] = {}
    for name, module in matches.items():
        wrapper = wrappers[id(module)]
        wrapper.name = wrapper.name or name
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, wrapper)
        injected[name] = wrapper
    for layer in dash_layers(model).values():
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
    return injected
