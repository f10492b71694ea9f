"""The study's units of work and how they are scheduled over worker processes.

Each unit (a full fine-tuning reference, or a LoRA run with its forked LoRA-Dash variants) writes its
own JSON under ``<out>/units/``, atomically; a rerun skips the units already there, so an interrupted
study resumes where it stopped. Worker processes are spawned, so these functions live in a module.
"""

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from lora_dash.analysis import ChangeRateSpectrum
from lora_dash.demo.model import MINILM_TARGETS
from lora_dash.reproduce import converged, plan
from lora_dash.reproduce.plan import Family
from lora_dash.reproduce.runner import full_fine_tuning, run_family, spectrum_summary

REFERENCE_TASK = "rotten_tomatoes"  # the task whose full fine-tuning defines the "true" TSDs


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_reference(quick: bool, seed: int, units: Path) -> str:
    """Full fine-tuning of the reference task: its spectra to ``ft-…pt``, its summary to ``ft-…json``."""
    mode = plan.QUICK if quick else plan.FULL
    split = plan.load_task(REFERENCE_TASK, mode)
    reference = full_fine_tuning(split, mode.settings, seed, MINILM_TARGETS)
    spectra = {name: {"rates": layer.rates, "eligible": layer.eligible} for name, layer in reference["layers"].items()}
    torch.save(spectra, units / f"ft-{REFERENCE_TASK}-seed{seed}.pt")
    summary = {
        "task": REFERENCE_TASK,
        "seed": seed,
        "accuracy": reference["accuracy"],
        "seconds": reference["seconds"],
        "spectrum": spectrum_summary(reference["layers"]),
    }
    _write(units / f"ft-{REFERENCE_TASK}-seed{seed}.json", summary)
    log(f"full fine-tuning seed {seed}: acc {reference['accuracy']:.4f} ({reference['seconds']:.0f}s)")
    return f"ft seed {seed}"


def run_unit(quick: bool, family: Family, units: Path) -> str:
    """One family: its LoRA run and forks, written to ``<key>.json``."""
    mode = plan.QUICK if quick else plan.FULL
    split = plan.load_task(family.task, mode)
    reference = None
    if family.record_tsd:
        saved = torch.load(units / f"ft-{REFERENCE_TASK}-seed{family.seed}.pt", weights_only=True)
        reference = {
            name: ChangeRateSpectrum(None, None, layer["rates"], layer["eligible"]) for name, layer in saved.items()
        }
    runs = run_family(family, split, mode.settings, MINILM_TARGETS, reference, log=log)
    _write(units / f"{family.key}.json", {"family": family.key, "runs": runs})
    return family.key


def run_converged_unit(quick: bool, key: str, units: Path) -> str:
    """One unit of the converged-budget study (:mod:`lora_dash.reproduce.converged`)."""
    return converged.run_unit(quick, key, units, log)


def _write(path: Path, payload: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload) + "\n")
    os.replace(temporary, path)  # a unit file exists only once complete


def run_study(out: Path, quick: bool, seeds: tuple[int, ...], workers: int) -> None:
    """Run every unit of the plan not yet on disk, ``workers`` processes at a time."""
    mode = plan.QUICK if quick else plan.FULL
    units = out / "units"
    units.mkdir(parents=True, exist_ok=True)
    families = plan.families(mode, seeds)
    todo_references = [seed for seed in seeds if not (units / f"ft-{REFERENCE_TASK}-seed{seed}.pt").exists()]
    todo = [family for family in families if not (units / f"{family.key}.json").exists()]
    converged_keys = converged.unit_keys(converged.QUICK if quick else converged.FULL, seeds)
    todo_converged = [key for key in converged_keys if not (units / f"{key}.json").exists()]
    log(
        f"{len(todo_references)} fine-tuning references, {len(todo)} of {len(families)} families and "
        f"{len(todo_converged)} of {len(converged_keys)} converged-budget units to run, {workers} worker(s)"
    )
    # The miniature's tensors are tiny: one thread each avoids paying for (and, on a busy machine,
    # spinning in) parallel regions that have nothing to share.
    threads = 1 if quick else max(1, torch.get_num_threads() // workers)
    with ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(threads,)
    ) as pool:
        # The references first (the families that score TSD prediction read them), then the plan in order.
        for future in [pool.submit(run_reference, quick, seed, units) for seed in todo_references]:
            future.result()
        for future in [pool.submit(run_unit, quick, family, units) for family in todo]:
            future.result()
        for future in [pool.submit(run_converged_unit, quick, key, units) for key in todo_converged]:
            future.result()
