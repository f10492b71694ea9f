"""The cloze study's numbers: paired intervals, the budget's choice, ``summary.json`` and ``tables.md``.

Every comparison is paired on the same questions: a run's per-question hits (stored in its unit)
against another run's on the same questions, or against a baseline's. The interval is a percentile
bootstrap that resamples questions (within each task, the same draw for every seed) and seeds, so it
carries both sources of noise; a comparison of one seed resamples questions only. Missing units are
named and their numbers are ``null``, never filled in.
"""

from __future__ import annotations

import functools
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lora_dash.commonsense.cloze import (
    METHODS,
    ClozeSettings,
    ClozeSplit,
    comparison_keys,
    curve_keys,
    fingerprint,
    parts,
)
from lora_dash.commonsense.data import TASKS, ClozeQuestion
from lora_dash.commonsense.report import TASK_TITLES
from lora_dash.commonsense.train import METRICS

Hits = dict[str, np.ndarray]  # task → 0/1 per question, in the split's order
METHOD_TITLES = {"lora": "LoRA", "dash": "LoRA-Dash", "dash_only": "dash-only"}


def load_units(out: Path) -> dict[str, dict[str, Any]]:
    """Every unit file under ``out/units``, by key."""
    return {path.stem: json.loads(path.read_text()) for path in sorted((out / "units").glob("*.json"))}


def hits_of(scores: dict[str, Any], metric: str = "acc") -> Hits:
    """A unit's stored hits (strings of 0/1) as arrays, per task."""
    return {
        task: np.array([c == "1" for c in by_metric[metric]], dtype=np.float64)
        for task, by_metric in scores["hits"].items()
    }


def most_frequent_hits(questions: list[ClozeQuestion]) -> Hits:
    """Per task, whether always answering the task's most frequent gold position (ties to the first) is right."""
    hits = {}
    for task in dict.fromkeys(q.task for q in questions):
        golds = [q.gold for q in questions if q.task == task]
        position = min(Counter(golds).items(), key=lambda item: (-item[1], item[0]))[0]
        hits[task] = np.array([gold == position for gold in golds], dtype=np.float64)
    return hits


def constant_answers(hits: Hits, questions: list[ClozeQuestion]) -> dict[str, int]:
    """Per task, the answer position ``p`` for which the run's hits are exactly those of always answering ``p``,
    for the tasks where there is one: the run may have learned the answer's position rather than the task
    (likely on a yes/no task, which has only two such patterns; a coincidence is unlikely elsewhere)."""
    found = {}
    for task, values in hits.items():
        golds = np.array([q.gold for q in questions if q.task == task])
        for position in range(max(len(q.continuations) for q in questions if q.task == task)):
            if np.array_equal(values, (golds == position).astype(np.float64)):
                found[task] = position
                break
    return found


def curve_diagnostics(units: dict[str, dict], settings: ClozeSettings, cut: dict[str, ClozeSplit]) -> list[dict]:
    """Per curve unit present: the tasks it answers like a constant (:func:`constant_answers`), and its paired
    differences from zero-shot and from the most frequent position without those tasks. Not part of the
    budget's rule (fixed before the curve ran): a check of what the rule's margin is made of."""
    _, validation, _ = parts(cut)
    if "zeroshot" not in units:
        return []
    zero, baseline = hits_of(units["zeroshot"]["validation"]), most_frequent_hits(validation)
    rows = []
    for steps, key in zip(settings.curve_steps, curve_keys(settings), strict=True):
        if key not in units:
            continue
        lora = hits_of(units[key]["validation"])
        constant = constant_answers(lora, validation)
        kept = [task for task in lora if task not in constant]

        def without(hits: Hits, kept: list[str] = kept) -> Hits:
            return {task: hits[task] for task in kept}

        rows.append(
            {
                "steps": steps,
                "constant_answers": constant,
                "minus_zero_shot_without_them": paired_bootstrap([without(lora)], [without(zero)], settings.resamples)
                if kept
                else None,
                "minus_most_frequent_without_them": paired_bootstrap(
                    [without(lora)], [without(baseline)], settings.resamples
                )
                if kept
                else None,
            }
        )
    return rows


def average(hits: Hits) -> float:
    """Unweighted mean over tasks of the accuracy, in percent."""
    return 100 * float(np.mean([values.mean() for values in hits.values()]))


def paired_bootstrap(first: list[Hits], second: list[Hits], resamples: int, seed: int = 0) -> dict[str, float]:
    """Mean and 95 % percentile interval of ``average(first) − average(second)``, in points.

    ``first[i]`` and ``second[i]`` are the hits of pair ``i`` (a seed) on the same questions. Each resample
    draws, per task, the questions with replacement (one draw shared by all pairs) and the pairs with
    replacement, and averages the differences as :func:`average` does.
    """
    if not first or len(first) != len(second):
        raise ValueError(f"need as many pairs on each side, at least one; got {len(first)} and {len(second)}")
    if not first[0]:
        raise ValueError("need at least one task")
    pairs = len(first)
    sizes = tuple(len(values) for values in first[0].values())
    pair_counts, question_counts = resampling_plan(seed, resamples, pairs, sizes)
    totals = np.zeros(resamples)
    for task, counts in zip(first[0], question_counts, strict=True):
        differences = np.stack([a[task] - b[task] for a, b in zip(first, second, strict=True)])  # (pairs, n)
        per_pair = counts @ differences.T / differences.shape[1]  # (resamples, pairs)
        totals += (pair_counts * per_pair).sum(axis=1) / pairs
    totals *= 100 / len(first[0])
    mean = statistics.mean(average(a) - average(b) for a, b in zip(first, second, strict=True))
    low, high = np.percentile(totals, [2.5, 97.5])
    return {"mean": mean, "ci95_low": float(low), "ci95_high": float(high)}


@functools.lru_cache(maxsize=8)
def resampling_plan(
    seed: int, resamples: int, pairs: int, sizes: tuple[int, ...]
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """The draws of :func:`paired_bootstrap`: how often each pair, and each question of each task (of
    ``sizes[i]`` questions), is drawn by each resample; shapes ``(resamples, pairs)`` and
    ``(resamples, n_i)``. They depend only on the arguments, so comparisons on the same questions share
    them (drawing is most of the bootstrap's time). Each count is kept in the smallest integer type that
    holds it (one byte, in practice), since a test's plans hold tens of millions of counts.
    """
    rng = np.random.default_rng(seed)
    pair_counts = rng.multinomial(pairs, [1 / pairs] * pairs, size=resamples)
    question_counts = [rng.multinomial(n, [1 / n] * n, size=resamples) for n in sizes]
    question_counts = tuple(counts.astype(np.min_scalar_type(counts.max())) for counts in question_counts)
    for counts in (pair_counts, *question_counts):
        counts.flags.writeable = False  # shared between calls
    return pair_counts, question_counts


def _check(scores: dict[str, Any], questions: list[ClozeQuestion], key: str) -> None:
    if scores["fingerprint"] != fingerprint(questions):
        raise ValueError(f"unit {key} was scored on other questions than this split's; rerun it")


def choose_budget(
    units: dict[str, dict], settings: ClozeSettings, cut: dict[str, ClozeSplit], forced: int | None = None
) -> dict[str, Any]:
    """The curve on the validation slice, and the budget it chooses.

    The rule, fixed before the curve ran: the smallest step count of the curve (all smaller ones present)
    at which LoRA beats both the zero-shot row and the most-frequent-position baseline by at least
    ``settings.margin`` points on average (``acc``), paired, with each interval above 0. ``forced`` (the
    ``--budget`` flag) overrides the choice and says so.
    """
    _, validation, _ = parts(cut)
    baseline = most_frequent_hits(validation)
    rule = (
        f"smallest curve step count at which LoRA r={settings.curve_rank} beats zero-shot and the most frequent "
        f"answer position on validation by >= {settings.margin:g} points (acc, paired mean) with both 95 % "
        "intervals above 0"
    )
    rows, chosen, reason = [], None, "the curve has not reached the margin"
    if "zeroshot" in units:
        _check(units["zeroshot"]["validation"], validation, "zeroshot")
        zero = hits_of(units["zeroshot"]["validation"])
        for steps, key in zip(settings.curve_steps, curve_keys(settings), strict=True):
            if key not in units:
                reason = reason if chosen is not None else f"curve unit {key} missing"
                break
            _check(units[key]["validation"], validation, key)
            lora = hits_of(units[key]["validation"])
            row = {
                "steps": steps,
                "validation_avg": average(lora),
                "validation_avg_per_token": average(hits_of(units[key]["validation"], "acc_per_token")),
                "minus_zero_shot": paired_bootstrap([lora], [zero], settings.resamples),
                "minus_most_frequent": paired_bootstrap([lora], [baseline], settings.resamples),
            }
            row["clears"] = all(
                row[name]["mean"] >= settings.margin and row[name]["ci95_low"] > 0
                for name in ("minus_zero_shot", "minus_most_frequent")
            )
            rows.append(row)
            if row["clears"] and chosen is None:
                chosen, reason = steps, "chosen by the rule"
    else:
        reason = "zero-shot unit missing"
    if forced is not None:
        chosen, reason = forced, "forced by --budget (not the rule's choice)"
    return {
        "rule": rule,
        "zero_shot_validation_avg": average(hits_of(units["zeroshot"]["validation"])) if "zeroshot" in units else None,
        "most_frequent_validation_avg": average(baseline),
        "curve": rows,
        "steps": chosen,
        "reason": reason,
    }


def _comparison(
    units: dict, settings: ClozeSettings, test: list, metric: str, zero: Hits | None, baseline: Hits
) -> dict[str, Any]:
    """Per rank: mean test average per method over its seeds, and each seed's; the paired intervals of
    LoRA-Dash and dash-only against LoRA and of dash-only against LoRA-Dash; LoRA's against the zero-shot
    row (``zero``, its hits; the same for every seed) and against the most frequent position (``baseline``)."""
    fields: dict[str, Any] = {f"{method}_avg": {} for method in ("lora", "dash", "dash_only")}
    fields |= {"per_seed_avg": {}, "dash_minus_lora": {}, "dash_only_minus_lora": {}, "dash_only_minus_dash": {}}
    fields |= {"lora_minus_zero_shot": {}, "lora_minus_most_frequent": {}}
    for r in settings.ranks:
        runs: dict[str, dict[int, Hits]] = {}
        for method in METHODS:
            runs[method] = {}
            for seed in settings.seeds:
                key = f"r{r}-seed{seed}-{method}"
                if key in units:
                    _check(units[key]["test"], test, key)
                    runs[method][seed] = hits_of(units[key]["test"], metric)
            values = [average(hits) for hits in runs[method].values()]
            fields[f"{method}_avg"][str(r)] = statistics.mean(values) if values else None
        fields["per_seed_avg"][str(r)] = {
            str(seed): {method: average(runs[method][seed]) if seed in runs[method] else None for method in METHODS}
            for seed in settings.seeds
        }
        for name, first, second in (
            ("dash_minus_lora", "dash", "lora"),
            ("dash_only_minus_lora", "dash_only", "lora"),
            ("dash_only_minus_dash", "dash_only", "dash"),
        ):
            seeds = sorted(set(runs[first]) & set(runs[second]))
            fields[name][str(r)] = (
                paired_bootstrap([runs[first][s] for s in seeds], [runs[second][s] for s in seeds], settings.resamples)
                if seeds
                else None
            )
        lora = list(runs["lora"].values())
        fields["lora_minus_zero_shot"][str(r)] = (
            paired_bootstrap(lora, [zero] * len(lora), settings.resamples) if lora and zero else None
        )
        fields["lora_minus_most_frequent"][str(r)] = (
            paired_bootstrap(lora, [baseline] * len(lora), settings.resamples) if lora else None
        )
    return fields


def summary(out: Path, settings: ClozeSettings, cut: dict[str, ClozeSplit]) -> dict[str, Any]:
    """``summary.json``'s content from the units present (numbers in percent; ``null`` where missing)."""
    units = load_units(out)
    _, validation, test = parts(cut)
    budget_file = out / "budget.json"
    recorded = budget_file.exists()
    budget = json.loads(budget_file.read_text()) if recorded else choose_budget(units, settings, cut)
    planned = ["zeroshot", *curve_keys(settings), *comparison_keys(settings)]
    zero = units.get("zeroshot")
    if zero is not None:
        _check(zero["test"], test, "zeroshot")
    baseline = most_frequent_hits(test)
    launched = sorted({unit["t"] for unit in units.values() if "t" in unit})
    by_metric = {
        metric: {
            "zero_shot_avg": average(hits_of(zero["test"], metric)) if zero else None,
            "most_frequent_avg": average(baseline),
            **_comparison(units, settings, test, metric, hits_of(zero["test"], metric) if zero else None, baseline),
        }
        for metric in METRICS
    }
    zero_minus_baseline = paired_bootstrap([hits_of(zero["test"])], [baseline], settings.resamples) if zero else None
    return {
        "format": "cloze",
        "metric": "acc: log-likelihood per character of the continuation (by_metric holds per token and summed)",
        **by_metric["acc"],
        "by_metric": by_metric,
        "most_frequent_per_task": {task: 100 * float(values.mean()) for task, values in baseline.items()},
        "zero_shot_minus_most_frequent": zero_minus_baseline,
        "seeds": list(settings.seeds),
        "seeds_present": {
            str(r): {method: [s for s in settings.seeds if f"r{r}-seed{s}-{method}" in units] for method in METHODS}
            for r in settings.ranks
        },
        "test_questions_per_task": {task: len(split.test) for task, split in cut.items()},
        "validation_questions_per_task": {task: len(split.validation) for task, split in cut.items()},
        "train_questions_per_task": {task: len(split.train) for task, split in cut.items()},
        "steps": budget["steps"],
        "t": launched[0] if len(launched) == 1 else (launched or budget.get("t")),
        "budget": budget,  # the decision as recorded when the comparison started
        "budget_recorded": recorded,
        "curve": choose_budget(units, settings, cut),  # the curve as it stands now (later points included)
        "curve_diagnostics": curve_diagnostics(units, settings, cut),
        "units_present": [key for key in planned if key in units],
        "units_missing": [key for key in planned if key not in units],
    }


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _interval(value: dict[str, float] | None) -> str:
    if value is None:
        return "–"
    return f"{value['mean']:+.2f} [{value['ci95_low']:+.2f}, {value['ci95_high']:+.2f}]"


def _points(value: float | None, sign: str = "") -> str:
    return "–" if value is None else f"{value:{sign}.2f}"


def tables(result: dict[str, Any], units: dict[str, dict], settings: ClozeSettings) -> list[str]:
    """``tables.md``'s lines: coverage, the test table, the curve, the paired comparison and the times."""
    columns = [*TASKS, "average"]
    header = "| " + " | ".join(["method", *(TASK_TITLES[c] for c in columns)]) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    lines = [
        "# The commonsense miniature in the cloze format",
        "",
        f"{len(result['units_present'])} of {len(result['units_present']) + len(result['units_missing'])} units "
        "present" + (f"; missing: {', '.join(result['units_missing'])}." if result["units_missing"] else "."),
        "",
        "Questions per task (train / validation / test): "
        + "; ".join(
            f"{TASK_TITLES[task]} {result['train_questions_per_task'][task]} / "
            f"{result['validation_questions_per_task'][task]} / {result['test_questions_per_task'][task]}"
            for task in TASKS
        )
        + ".",
        "",
    ]
    for metric in METRICS:
        baseline = result["most_frequent_per_task"]
        lines += [f"## Test accuracy ({metric}), %", "", header, rule]
        lines.append(
            "| most frequent answer position | "
            + " | ".join(f"{baseline[c]:.2f}" for c in TASKS)
            + f" | {result['by_metric'][metric]['most_frequent_avg']:.2f} |"
        )
        zero = units.get("zeroshot")
        if zero:
            accuracy = zero["test"]["accuracy"]
            lines.append("| zero-shot | " + " | ".join(f"{100 * accuracy[c][metric]:.2f}" for c in columns) + " |")
        for r in settings.ranks:
            for method in METHODS:
                runs = [
                    units[k]["test"]["accuracy"] for s in settings.seeds if (k := f"r{r}-seed{s}-{method}") in units
                ]
                if runs:
                    cells = [f"{statistics.mean(100 * run[c][metric] for run in runs):.2f}" for c in columns]
                    lines.append(
                        f"| {METHOD_TITLES[method]} r={r} ({len(runs)} seed{'' if len(runs) == 1 else 's'}) | "
                        + " | ".join(cells)
                        + " |"
                    )
        values = result["by_metric"][metric]
        lines.append("")
        for r in settings.ranks:
            lines.append(
                f"- r={r}: LoRA − zero-shot {_interval(values['lora_minus_zero_shot'][str(r)])}; "
                f"LoRA − most frequent {_interval(values['lora_minus_most_frequent'][str(r)])}; "
                f"LoRA-Dash − LoRA {_interval(values['dash_minus_lora'][str(r)])}; "
                f"dash-only − LoRA {_interval(values['dash_only_minus_lora'][str(r)])}; "
                f"dash-only − LoRA-Dash {_interval(values['dash_only_minus_dash'][str(r)])} "
                "(points, mean [95 % paired bootstrap interval over questions and seeds])."
            )
        lines.append("")
    lines += [
        f"Zero-shot − most frequent answer position (acc, test): {_interval(result['zero_shot_minus_most_frequent'])}.",
        "",
        "## Each seed (test, acc average, %)",
        "",
        "| rank | seed | LoRA | LoRA-Dash | dash-only | LoRA-Dash − LoRA | dash-only − LoRA |",
        "|---|---|---|---|---|---|---|",
    ]
    for r, seeds in result["per_seed_avg"].items():
        for seed, avg in seeds.items():
            if avg["lora"] is None:
                continue
            differences = [
                avg[method] - avg["lora"] if avg[method] is not None else None for method in ("dash", "dash_only")
            ]
            lines.append(
                f"| {r} | {seed} | {_points(avg['lora'])} | {_points(avg['dash'])} | {_points(avg['dash_only'])} | "
                + " | ".join(_points(d, "+") for d in differences)
                + " |"
            )
    lines += [
        "",
    ]
    lines += ["## Mean training loss after the launch (steps t + 1 to the end; mean over seeds)", ""]
    for r in settings.ranks:
        for method in METHODS:
            runs = [u for s in settings.seeds if (u := units.get(f"r{r}-seed{s}-{method}"))]
            if runs:
                after = [statistics.mean(run["losses"][run["t"] :]) for run in runs]
                lines.append(
                    f"- {METHOD_TITLES[method]} r={r} ({len(runs)} seed{'' if len(runs) == 1 else 's'}): "
                    f"{statistics.mean(after):.4f}"
                )
    lines.append("")
    budget, curve = result["budget"], result["curve"]
    lines += [
        "## The learning curve on the validation slice (acc, %)",
        "",
        f"Zero-shot {_cell(curve['zero_shot_validation_avg'])}, most frequent answer position "
        f"{_cell(curve['most_frequent_validation_avg'])}. Rule: {budget['rule']}.",
        "",
        "| steps | LoRA acc | LoRA acc per token | LoRA − zero-shot [95 %] | LoRA − most frequent [95 %] | clears |",
        "|---|---|---|---|---|---|",
        *(
            f"| {row['steps']} | {row['validation_avg']:.2f} | {row['validation_avg_per_token']:.2f} | "
            f"{_interval(row['minus_zero_shot'])} | {_interval(row['minus_most_frequent'])} | "
            f"{'yes' if row['clears'] else 'no'} |"
            for row in curve["curve"]
        ),
        "",
        f"Budget: {budget['steps'] if budget['steps'] is not None else 'none yet'} ({budget['reason']}"
        + ("; budget.json, written before the first comparison unit" if (result["budget_recorded"]) else "")
        + ").",
        "",
        "A check of what that margin is made of (not part of the rule): the tasks on which LoRA's validation "
        "hits are exactly those of always answering one position (task: position), and LoRA's paired "
        "differences without those tasks.",
        "",
        "| steps | answered like a constant | − zero-shot without them [95 %] | − most frequent without them [95 %] |",
        "|---|---|---|---|",
        *(
            f"| {row['steps']} | "
            + (", ".join(f"{TASK_TITLES[task]}: {p}" for task, p in row["constant_answers"].items()) or "none")
            + f" | {_interval(row['minus_zero_shot_without_them'])} | "
            + f"{_interval(row['minus_most_frequent_without_them'])} |"
            for row in result["curve_diagnostics"]
        ),
        "",
        "## Times (seconds; the load average is the machine's 1-minute load when the unit finished)",
        "",
        "| unit | device | wall | steps trained | train | s / step | scoring | torch threads | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, unit in units.items():
        trained = len(unit.get("losses", [])) - unit.get("first_step", 1) + 1 if "losses" in unit else 0
        scoring = sum(unit[part]["seconds"] for part in ("test", "validation") if part in unit)
        per_step = f"{unit['train_seconds'] / trained:.2f}" if trained > 0 else "–"
        lines.append(
            f"| {key} | {unit['settings'].get('device', 'cpu')} | "  # units from before --device ran on the CPU
            f"{unit['wall_seconds']:.0f} | {trained} | {unit.get('train_seconds', 0):.0f} | {per_step} | "
            f"{scoring:.0f} | {unit['threads']} | {unit.get('load_average', float('nan')):.2f} |"
        )
    return lines


def write_cloze_report(out: Path, settings: ClozeSettings, cut: dict[str, ClozeSplit]) -> Path:
    """``out/summary.json`` and ``out/tables.md`` from the units present; returns the tables' path."""
    result = summary(out, settings, cut)
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    path = out / "tables.md"
    path.write_text("\n".join(tables(result, load_units(out), settings)) + "\n")
    return path
