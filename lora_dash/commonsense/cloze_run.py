"""The cloze study's plan: which units run, in which order, and the gate before the comparison.

Zero-shot first, then the LoRA curve, then (only once ``budget.json`` records a budget, chosen from the
curve by :func:`~lora_dash.commonsense.cloze_report.choose_budget` or forced, and a launch step is given)
LoRA, LoRA-Dash and dash-only, seed by seed. Each unit is one JSON file under ``<out>/units/``, written
once complete; a rerun skips those present, so an interrupted study resumes. Several processes may share
one study (on one GPU, say), each running the units its ``only`` pattern names.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_dash.commonsense.cloze import (
    ClozeSettings,
    comparison_keys,
    comparison_unit,
    curve_keys,
    curve_unit,
    splits,
    zero_shot_unit,
)
from lora_dash.commonsense.cloze_report import choose_budget, load_units
from lora_dash.commonsense.study import stamp
from lora_dash.reproduce.study import log


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` so that the file exists only once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")  # processes sharing a study may write the same file
    temporary.write_text(json.dumps(payload) + "\n")
    os.replace(temporary, path)


class BudgetConflict(ValueError):
    """The arguments ask for another comparison than the one ``budget.json`` records."""


def recorded_budget(out: Path, budget: int | None, t: int | None) -> dict[str, Any] | None:
    """The comparison's budget and launch step as ``out/budget.json`` records them once both are set (the
    decision, fixed before the first comparison unit ran), or None while there is none.

    Raises:
        BudgetConflict: ``budget`` or ``t`` differs from the record.
    """
    path = out / "budget.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("steps") is None or record.get("t") is None:
        return None
    for flag, asked, kept in (("--budget", budget, record["steps"]), ("--t", t, record["t"])):
        if asked is not None and asked != kept:
            raise BudgetConflict(
                f"{path} records the comparison at {record['steps']} steps with t = {record['t']}; "
                f"{flag} {asked} would be another comparison: give it its own --out"
            )
    return record


def run_cloze(
    out: Path,
    settings: ClozeSettings,
    cache: Path,
    until: str = "compare",
    max_units: int | None = None,
    budget: int | None = None,
    t: int | None = None,
    only: str | None = None,
) -> None:
    """Run the units not yet in ``out/units``, at most ``max_units`` of them, in this order: zero-shot; the
    curve, step count by step count; with ``until="compare"``, as soon as the curve's units present choose a
    budget (or ``budget`` forces one) and ``t`` is given, the comparison at that budget; then the rest of
    the curve. ``until="curve"`` runs the whole curve and no comparison. ``only``, a regular expression,
    restricts the run to the unit keys it matches in full; the others are passed over as if present.

    The choice is written to ``out/budget.json`` (with ``t``) before any comparison unit runs; once it
    records both, it is the decision, and later runs keep it (:func:`recorded_budget`).
    """
    units = out / "units"
    cut = splits(settings)
    done = 0

    def run(key: str, make: Callable[[], dict[str, Any]]) -> bool:
        nonlocal done
        if (units / f"{key}.json").exists() or (only is not None and not re.fullmatch(only, key)):
            return True
        if max_units is not None and done >= max_units:
            return False
        log(f"cloze unit {key}: start")
        start = time.perf_counter()
        payload = stamp(make(), key, settings, start)
        payload["load_average"] = os.getloadavg()[0]
        write_json(units / f"{key}.json", payload)
        log(f"cloze unit {key}: done in {payload['wall_seconds']:.0f}s")
        done += 1
        return True

    if not run("zeroshot", lambda: zero_shot_unit(settings, cache, cut)) or until == "zeroshot":
        return
    curve = list(zip(settings.curve_steps, curve_keys(settings), strict=True))
    record = recorded_budget(out, budget, t) if until == "compare" else None
    choice, t = (record, record["t"]) if record is not None else (None, t)
    for steps, key in curve if record is None else ():
        if until == "compare" and t is not None:  # the curve so far may already choose a budget
            choice = choose_budget(load_units(out), settings, cut)
            if choice["steps"] is not None:
                break
        if not run(key, lambda steps=steps: curve_unit(settings, steps, cache, cut)):
            return
    if until == "curve":
        return
    if record is None:
        if choice is None or choice["steps"] is None or budget is not None:
            choice = choose_budget(load_units(out), settings, cut, forced=budget)
        write_json(out / "budget.json", choice | {"t": t})
    if choice["steps"] is None or t is None:
        log(f"no budget chosen: {choice['reason']}" if choice["steps"] is None else "pass --t to compare")
        return
    for key in comparison_keys(settings):
        r, seed, method = re.fullmatch(r"r(\d+)-seed(\d+)-(\w+)", key).groups()
        if not run(
            key,
            lambda r=int(r), seed=int(seed), method=method: comparison_unit(
                settings, method, r, seed, choice["steps"], t, cache, cut
            ),
        ):
            return
    for steps, key in curve:
        if not run(key, lambda steps=steps: curve_unit(settings, steps, cache, cut)):
            return
