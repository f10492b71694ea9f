"""How the study's tables print a number over seeds: mean ± sample std, and paired differences."""

import statistics

# Differences of accuracies carry float noise (0.36 - 0.36 after different sums can be ±1e-17), which
# would print as "-0.00" or count as a gain; anything this close to zero is zero.
_ZERO = 1e-9


def _clean(value: float) -> float:
    return 0.0 if abs(value) < _ZERO else value


def _fixed(value: float, digits: int, signed: bool = False) -> str:
    value = round(_clean(value), digits) + 0.0  # + 0.0 turns a rounded -0.0 into 0.0
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """``"81.23 ± 0.45"`` (×100 for accuracies); just the mean for a single value."""
    values = [scale * value for value in values]
    if len(values) < 2:
        return _fixed(values[0], digits) if values else "–"
    return f"{_fixed(statistics.mean(values), digits)} ± {_fixed(statistics.stdev(values), digits)}"


def paired(differences: list[float]) -> str:
    """``"+0.35 ± 0.20 (2/3)"``: mean ± std of paired differences, in points, and seeds with a gain."""
    if not differences:
        return "–"
    points = [_clean(100 * difference) for difference in differences]
    spread = f" ± {_fixed(statistics.stdev(points), 2)}" if len(points) > 1 else ""
    return f"{_fixed(statistics.mean(points), 2, signed=True)}{spread} ({sum(d > 0 for d in points)}/{len(points)})"
