"""How the study's tables print a number over seeds: mean ± sample std, and paired differences."""

import statistics


def mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """``"81.23 ± 0.45"`` (×100 for accuracies); just the mean for a single value."""
    values = [scale * value for value in values]
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "–"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def paired(differences: list[float]) -> str:
    """``"+0.35 ± 0.20 (2/3)"``: mean ± std of paired differences, in points, and seeds with a gain."""
    if not differences:
        return "–"
    points = [100 * difference for difference in differences]
    spread = f" ± {statistics.stdev(points):.2f}" if len(points) > 1 else ""
    return f"{statistics.mean(points):+.2f}{spread} ({sum(d > 0 for d in points)}/{len(points)})"
