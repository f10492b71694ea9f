"""Put LoRA-Dash layers into any `nn.Module` by name, and choose modules that train in full beside
them."""

import re
import warnings
from collections.abc import Collection
from itertools import chain

from torch import nn

from lora_dash.layer import LoRADashLinear, check_arguments
from lora_dash.refusals import check_no_peft_adapters

#: The attribute ``inject(..., modules_to_save=...)`` sets on a module that trains in full. An
#: attribute, not a wrapper: module names and state-dict keys stay those of the plain model.
TRAINED_MARKER = "_lora_dash_trains_in_full"


def dash_layers(model: nn.Module) -> dict[str, LoRADashLinear]:
    """Every ``LoRADashLinear`` in ``model``, by dotted module name, in registration order."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, LoRADashLinear)
    }


def require_dash_layers(model: nn.Module) -> dict[str, LoRADashLinear]:
    """:func:`dash_layers`, or a ``ValueError`` if ``model`` has none."""
    layers = dash_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA-Dash layers; call inject() first")
    return layers


def trained_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that trains in full (``inject(..., modules_to_save=...)``), by dotted name, in
    order."""
    return {
        name: module
        for name, module in model.named_modules()
        if getattr(module, TRAINED_MARKER, False)
    }


def names_entry(name: str, entry: str) -> bool:
    """Whether a dotted module name is selected by one entry of a target list: equal, or ending
    ``"." + entry``."""
    return name == entry or name.endswith("." + entry)


def match_modules(model: nn.Module, spec: str | Collection[str], what: str) -> dict[str, nn.Module]:
    """The modules of ``model`` that ``spec`` (a regex or a list of names, as for :func:`inject`)
    selects, under every name they are registered as. Entries of a list that select nothing are
    warned about.

    Raises:
        ValueError: ``spec`` is neither, is an invalid regex, or selects nothing (``what`` names
            it).
    """
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as error:
            raise ValueError(f"invalid {what} regex {spec!r}: {error}") from error

        def selects(name: str) -> bool:
            return pattern.fullmatch(name) is not None

    elif (
        isinstance(spec, (list, tuple, set, frozenset))
        and spec
        and all(isinstance(e, str) and e for e in spec)
    ):

        def selects(name: str) -> bool:
            return any(names_entry(name, entry) for entry in spec)

    else:
        raise ValueError(
            f"{what} must be a regex string or a non-empty list of module names, got {spec!r}"
        )
    found = {
        name: module
        for name, module in model.named_modules(remove_duplicate=False)
        if name and selects(name)
    }
    if not found:
        some = ", ".join(name for name, _ in list(model.named_modules())[1:9])
        raise ValueError(f"{what} {spec!r} matches no module; names look like: {some}")
    if not isinstance(spec, str):  # a typo beside entries that match would otherwise pass silently
        missed = [
            entry
            for entry in dict.fromkeys(spec)
            if not any(names_entry(name, entry) for name in found)
        ]
        if missed:
            warnings.warn(
                f"{what}: {missed} match no module; the other entries do", UserWarning, stacklevel=3
            )
    return found


def inject(
    model: nn.Module,
    targets: str | Collection[str],
    r: int = 8,
    alpha: float = 16.0,
    s: int = 8,
    dropout: float = 0.0,
    use_rslora: bool = False,
    eps: float = 0.0,
    modules_to_save: str | Collection[str] | None = None,
) -> dict[str, LoRADashLinear]:
    """Replace, in place, every linear layer that ``targets`` selects by its dotted name.

    ``targets`` is a regex that must ``re.fullmatch`` the name, as ``model.named_modules()`` gives
    it (``r".*\\.(q|v)_proj"``), or a list of names, PEFT-style: a module is selected when its name
    equals an entry or ends with ``"." + entry`` (``["query", "value"]``); an entry that selects
    nothing is warned about (a regex's alternatives are not checked one by one).

    ``modules_to_save`` (a regex or a list, matched the same way) selects modules that train in
    full, e.g. a new classification head. They are marked (:func:`trained_modules`), not wrapped, so
    names and state-dict keys stay those of the plain model, and whatever carries the adapter
    carries them too.

    Afterwards every parameter of ``model`` is frozen but the adapters' (``A``, ``B``, ``δ``) and
    those of the modules that train in full, from this call or an earlier one. All inputs are
    validated before the model is touched: on any error it is exactly as it was. The other arguments
    are :class:`LoRADashLinear`'s.

    Returns:
        The new layers by dotted name; each wraps the replaced module as ``.base``.

    Raises:
        ValueError: ``targets`` or ``modules_to_save`` invalid or matching nothing; a target that is
            not ``nn.Linear``/``Conv1D``, is already (inside) a LoRA-Dash layer, or is registered
            under a name ``targets`` does not select; a module to save that is, contains, lies
            inside or shares a parameter with a LoRA-Dash layer or target, or lies inside another
            module to save; invalid ``r``, ``s``, ``dropout``, ``eps``.
    """
    check_no_peft_adapters(model)  # PEFT's tuner layers around ours would train instead
    matches = match_modules(model, targets, "targets")
    saved = (
        {} if modules_to_save is None else match_modules(model, modules_to_save, "modules_to_save")
    )

    all_names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        all_names.setdefault(id(module), []).append(name)
    # By identity, not by name: a tied module is listed under only one of its names.
    adapted = {id(sub) for layer in dash_layers(model).values() for sub in layer.modules()}
    for name, module in matches.items():
        if id(module) in adapted:
            raise ValueError(
                f"module {name!r} is already adapted by LoRA-Dash; inject once per layer"
            )
        _check_every_alias_matches(name, module, matches, all_names, targets)
        try:
            check_arguments(module, r, s, dropout, eps)
        except ValueError as error:
            raise ValueError(f"module {name!r} (matched by {targets!r}): {error}") from error
    for name, module in saved.items():
        _check_every_alias_matches(name, module, saved, all_names, modules_to_save)
    _check_trained_modules(
        {**trained_modules(model), **saved}, [*dash_layers(model).values(), *matches.values()]
    )

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
    for module in saved.values():
        setattr(module, TRAINED_MARKER, True)
    for layer in dash_layers(model).values():
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
    for module in trained_modules(model).values():
        for p in module.parameters():
            p.requires_grad_(True)
    return injected


def _check_every_alias_matches(
    name: str,
    module: nn.Module,
    matches: dict[str, nn.Module],
    all_names: dict[int, list[str]],
    spec: object,
) -> None:
    """A module registered under several names must be selected under all of them: changing it under
    one name only would leave the others calling it unchanged."""
    unmatched_aliases = [alias for alias in all_names[id(module)] if alias not in matches]
    if unmatched_aliases:
        raise ValueError(
            f"module {name!r} is also registered as {unmatched_aliases}, which "
            f"{spec!r} does not match; match every name of a tied module"
        )


def _check_trained_modules(trained: dict[str, nn.Module], adapters: list[nn.Module]) -> None:
    """A module trains either in full or through an adapter, never both, and is saved once."""
    adapter_parts = {
        id(part) for adapter in adapters for part in chain(adapter.modules(), adapter.parameters())
    }
    names = {id(module): name for name, module in trained.items()}
    for name, module in trained.items():
        if any(id(part) in adapter_parts for part in chain(module.modules(), module.parameters())):
            raise ValueError(
                f"module {name!r} trains in full (modules_to_save) but is, contains, lies inside "
                "or shares a parameter with a LoRA-Dash layer or target; a module trains either "
                "in full or through an adapter"
            )
        inner = [
            names[id(sub)] for sub in module.modules() if sub is not module and id(sub) in names
        ]
        if inner:
            raise ValueError(
                f"modules_to_save: {inner} lie inside {name!r}, which trains in full too; "
                "list only the outer module"
            )
