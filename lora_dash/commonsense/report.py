"""Gather the commonsense study's unit files into ``tables.md`` (the REPRODUCTION.md section's numbers).

Accuracies are means ± sample standard deviations over seeds; LoRA-Dash is compared with LoRA of
the same rank and seed (paired: the fork shares the whole pre-launch), with the count of seeds in
which LoRA-Dash is ahead. Missing units are counted and named, never silently skipped.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from lora_dash.commonsense.data import TASKS, Question
from lora_dash.commonsense.study import Settings, train_and_test, unit_keys
from lora_dash.reproduce.stats import mean_std, paired

COLUMNS = [*TASKS, "average"]
TASK_TITLES = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "siqa": "SIQA",
    "hellaswag": "HellaS.",
    "winogrande": "WinoG.",
    "arc_e": "ARC-e",
    "arc_c": "ARC-c",
    "obqa": "OBQA",
    "average": "Avg.",
}


def load_units(out: Path) -> dict[str, dict[str, Any]]:
    """Every unit file under ``out/units``, by key."""
    return {path.stem: json.loads(path.read_text()) for path in sorted((out / "units").glob("*.json"))}


def _runs(units: dict[str, dict], r: int, method: str) -> dict[int, dict]:
    """The runs of ``method`` at rank ``r``, by seed."""
    return {
        unit["seed"]: run
        for unit in units.values()
        if unit.get("r") == r
        for run in unit["runs"]
        if run["method"] == method
    }


def _row(label: str, cells: list[str]) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def most_frequent_position(test: list[Question]) -> dict[str, dict[str, float]]:
    """The accuracy of always answering the choice at each task's most frequent gold position (BoolQ:
    always "yes"; the other tasks are stratified by position, so about chance), in :func:`evaluate`'s shape."""
    by_task: dict[str, Counter] = {}
    for question in test:
        by_task.setdefault(question.task, Counter())[question.gold] += 1
    result = {task: dict.fromkeys(("acc", "acc_raw"), max(c.values()) / c.total()) for task, c in by_task.items()}
    result["average"] = dict.fromkeys(("acc", "acc_raw"), statistics.mean(r["acc"] for r in result.values()))
    return result


def accuracy_table(
    units: dict[str, dict], ranks: list[int], metric: str = "acc", baseline: dict[str, dict] | None = None
) -> list[str]:
    """Per task and average: the ``baseline`` (:func:`most_frequent_position`) if given, zero-shot, then
    LoRA and LoRA-Dash per rank (mean ± std), the paired difference per rank, and LoRA-Dash at the
    smallest rank against LoRA at the largest, beside plain LoRA at the smallest against the largest
    (the rank trend without any dash, which that comparison must beat to say anything about the dash)."""
    lines = [_row("method", [TASK_TITLES[c] for c in COLUMNS]), "|---" * (len(COLUMNS) + 1) + "|"]
    if baseline is not None:
        lines.append(_row("most frequent answer position", [mean_std([baseline[c][metric]]) for c in COLUMNS]))
    if "zeroshot" in units:
        lines.append(_row("zero-shot", [mean_std([units["zeroshot"]["accuracy"][c][metric]]) for c in COLUMNS]))
    for r in ranks:
        for method in ("LoRA", "LoRA-Dash"):
            runs = _runs(units, r, method)
            if runs:
                lines.append(
                    _row(
                        f"{method} r={r} ({len(runs)} seed{'' if len(runs) == 1 else 's'})",
                        [mean_std([run["accuracy"][c][metric] for run in runs.values()]) for c in COLUMNS],
                    )
                )
    for r in ranks:
        lines.append(
            _row(
                f"Dash − LoRA, r={r} (seeds ahead)",
                [paired(_differences(units, (r, "LoRA-Dash"), (r, "LoRA"), c, metric)) for c in COLUMNS],
            )
        )
    if len(ranks) > 1:
        small, large = min(ranks), max(ranks)
        for method, label in (("LoRA-Dash", "Dash"), ("LoRA", "LoRA")):
            lines.append(
                _row(
                    f"{label} r={small} − LoRA r={large}",
                    [paired(_differences(units, (small, method), (large, "LoRA"), c, metric)) for c in COLUMNS],
                )
            )
    return lines


def _differences(
    units: dict[str, dict], first: tuple[int, str], second: tuple[int, str], column: str, metric: str
) -> list[float]:
    """Accuracy of run ``first`` minus run ``second`` (each a rank and method), seed by seed where both ran."""
    a, b = _runs(units, *first), _runs(units, *second)
    return [
        a[seed]["accuracy"][column][metric] - b[seed]["accuracy"][column][metric] for seed in sorted(a) if seed in b
    ]


def noise_lines(units: dict[str, dict], ranks: list[int]) -> list[str]:
    """The quantization-noise measurement and where the selected directions sit."""
    lines = []
    if "zeroshot" in units:
        layers = units["zeroshot"]["layers"].values()
        below = sum(layer["below_noise"] for layer in layers)
        total = sum(layer["k"] for layer in layers)
        levels = [layer["noise_level"] for layer in layers]
        lines += [
            f"- Noise level ‖E‖₂ ≈ √v(√out + √in) per matrix: {min(levels):.3f} to {max(levels):.3f} "
            f"(median {statistics.median(levels):.3f}); singular values below it: {below} of {total} "
            f"({100 * below / total:.1f} %), in {sum(layer['below_noise'] > 0 for layer in layers)} of "
            f"{len(levels)} matrices."
        ]
    for r in ranks:
        runs = _runs(units, r, "LoRA-Dash")
        if runs:
            selected = sum(run["selected"] for run in runs.values())
            below = sum(run["below_noise"] for run in runs.values())
            positions = [p for run in runs.values() for p in run["positions"]]
            matrices = sorted(run["layers_with_any_below_noise"] for run in runs.values())
            spread = f"{matrices[0]}" if matrices[0] == matrices[-1] else f"{matrices[0]} to {matrices[-1]}"
            lines.append(
                f"- LoRA-Dash r={r}: {below} of {selected} selected directions ({100 * below / selected:.1f} %) lie "
                f"below their matrix's noise level (matrices with any: {spread} a run); median σ-position "
                f"{statistics.median(positions):.3f} (0 = largest, 1 = smallest), "
                f"{100 * sum(p >= 0.9 for p in positions) / len(positions):.0f} % in the last tenth; "
                f"mean |δ|/σ {mean_std([run['mean_abs_delta_over_sigma'] for run in runs.values()], 1.0, 3)}."
            )
    return lines


def loss_lines(units: dict[str, dict], ranks: list[int], t: int) -> list[str]:
    """Per rank, the mean training loss after the launch (steps t+1 … end), LoRA against LoRA-Dash, paired."""
    lines = []
    for r in ranks:
        lora, dash = _runs(units, r, "LoRA"), _runs(units, r, "LoRA-Dash")
        seeds = sorted(set(lora) & set(dash))
        if not seeds:
            continue
        after = {
            method: [statistics.mean(runs[seed]["losses"][t:]) for seed in seeds]
            for method, runs in (("LoRA", lora), ("LoRA-Dash", dash))
        }
        differences = [dash - lora for dash, lora in zip(after["LoRA-Dash"], after["LoRA"], strict=True)]
        lower = sum(difference < 0 for difference in differences)
        lines.append(
            f"- r={r}: mean training loss over steps {t + 1}–end, LoRA {mean_std(after['LoRA'], 1.0, 4)}, "
            f"LoRA-Dash {mean_std(after['LoRA-Dash'], 1.0, 4)}; LoRA-Dash − LoRA "
            f"{mean_std(differences, 1.0, 5)} (LoRA-Dash lower in {lower} of {len(seeds)} seeds)."
        )
    return lines


def timing_lines(units: dict[str, dict]) -> list[str]:
    """Each unit's wall time, and its runs' training and scoring times (minutes), then the total."""
    if not units:
        return []
    lines = [
        "## Wall time, minutes",
        "",
        "| unit | wall | LoRA train | LoRA-Dash train | scoring (each run) | torch threads |",
        "|---|---|---|---|---|---|",
    ]
    for key, unit in units.items():
        runs = {run["method"]: run for run in unit.get("runs", [])}
        cells = [f"{runs[m]['train_seconds'] / 60:.1f}" if m in runs else "–" for m in ("LoRA", "LoRA-Dash")]
        scoring = [f"{run['eval_seconds'] / 60:.1f}" for run in runs.values() if "eval_seconds" in run]
        lines.append(
            _row(key, [f"{unit['wall_seconds'] / 60:.1f}", *cells, ", ".join(scoring) or "–", str(unit["threads"])])
        )
    hours = sum(unit["wall_seconds"] for unit in units.values()) / 3600
    return [*lines, "", f"Wall time of the units present: {hours:.2f} h."]


def write_report(out: Path, settings: Settings, seeds: tuple[int, ...]) -> Path:
    """``out/tables.md`` from whatever units exist; says which units of the plan are missing."""
    units = load_units(out)
    planned = unit_keys(settings, seeds)
    missing = [key for key in planned if key not in units]
    ranks = sorted({unit["r"] for unit in units.values() if "r" in unit} | set(settings.ranks))
    baseline = most_frequent_position(train_and_test(settings)[1])
    lines = [
        "# LoRA vs LoRA-Dash: SmolLM2-135M-Instruct on eight commonsense tasks",
        "",
        f"{len(planned) - len(missing)} of {len(planned)} units present"
        + (f"; missing: {', '.join(missing)}." if missing else "."),
        "",
    ]
    if "zeroshot" in units:
        splits = units["zeroshot"]["splits"]
        lines += [
            "Questions per task (train / test; duplicates and conflicting questions dropped): "
            + "; ".join(
                f"{TASK_TITLES[task]} {s['train']} / {s['test']} ({s['duplicates']}, {s['conflicting']})"
                for task, s in splits.items()
            )
            + ".",
            "",
        ]
    lines += [
        "## Accuracy per character (acc), %",
        "",
        *accuracy_table(units, ranks, "acc", baseline),
        "",
        "## Accuracy by summed log-likelihood (acc_raw), %",
        "",
        *accuracy_table(units, ranks, "acc_raw", baseline),
        "",
        "## Quantization noise and the selected directions",
        "",
        *noise_lines(units, ranks),
        "",
        "## Training loss after the launch",
        "",
        *loss_lines(units, ranks, settings.t),
        "",
    ]
    lines += timing_lines(units)
    path = out / "tables.md"
    path.write_text("\n".join(lines) + "\n")
    return path
