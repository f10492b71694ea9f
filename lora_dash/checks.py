"""Argument checks the modules share, each with its error message written once.

Imports nothing of the package.
"""

import math
import numbers

#: Seeds are ints in ``[0, SEED_MAX]``: what ``torch.Generator.manual_seed`` takes without wrapping.
SEED_MAX = 2**63 - 1


def check_int(
    name: str, value: object, low: int, high: int | None = None, high_text: str | None = None
) -> None:
    """Raise ``ValueError`` unless ``value`` is an int with ``low <= value <= high``; a bool is not.

    ``high=None`` leaves it unbounded above; ``high_text`` is how the message writes ``high``
    (e.g. ``"k=12"``), ``high`` itself by default.
    """
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and low <= value and (high is None or value <= high):
        return
    if high is None:
        bound = f">= {low}"
    else:
        bound = f"in [{low}, {high if high_text is None else high_text}]"
    raise ValueError(f"{name} must be an int {bound}, got {value!r}")


def check_seed(seed: object) -> None:
    """Raise ``ValueError`` unless ``seed`` is an int in ``[0, 2⁶³ - 1]``."""
    check_int("seed", seed, 0, SEED_MAX, "2**63 - 1")


def check_number(name: str, value: object, positive: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number, ``>= 0`` (``> 0`` with
    ``positive``). A NumPy scalar passes; a bool does not."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        if value > 0 or (value == 0 and not positive):
            return
    bound = "> 0" if positive else ">= 0"
    raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
