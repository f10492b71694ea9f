"""The commonsense miniature in the cloze format, at a budget where plain LoRA learns.

The listed-choices study (:mod:`lora_dash.commonsense.study`) never got LoRA past the trivial
baselines, so it could not ask whether the dash helps a model that has learned the tasks. This study
changes what stood in the way: the format (each choice scored as the continuation of a natural prompt,
:class:`~lora_dash.commonsense.data.ClozeQuestion`, and training on the same format), the test size
(up to 250 questions a task, fixed before any run) and the budget, found from a plain-LoRA learning
curve on a validation slice held out of the train parts, before any dash run.

Units (one JSON file each under ``<out>/units/``, written once complete; a rerun skips those present):

- ``zeroshot``: the untouched model on the test and validation questions, with their scoring times.
- ``curve-r<r>-seed<seed>-step<n>``: plain LoRA after ``n`` steps, scored on the validation slice.
- ``r<r>-seed<seed>-lora`` / ``-dash`` / ``-dash_only``: at the chosen budget, scored on the test
  questions. LoRA-Dash and dash-only are forked from the LoRA run right after step ``t`` (parameters,
  AdamW, schedule and RNG state), so each seed's differences are paired by construction; dash-only
  freezes A and B at the launch and trains δ alone.

The schedule warms up linearly and then holds the learning rate, so a run of ``n`` steps is the first
``n`` steps of any longer run: the curve is one run, scored at its checkpoints, and the LoRA run of
the comparison at that seed is its prefix. Training states are kept (not committed) under
``<cache>/cloze-state/`` so that each unit resumes from the last one instead of step 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import lora_dash
from lora_dash.commonsense.data import TASKS, ClozeQuestion, ClozeSplit, split_cloze_task
from lora_dash.commonsense.model import TARGETS, load_smollm2
from lora_dash.commonsense.train import METRICS, accuracy, question_hits, restore_run, train_steps
from lora_dash.reproduce.runner import snapshot
from lora_dash.reproduce.study import log

SPLIT_SEED = 0
METHODS = ("lora", "dash", "dash_only")


@dataclass(frozen=True)
class ClozeSettings:
    """What every run of the cloze study shares. α = 2r (the paper's setting) is derived, not stored."""

    max_test: int = 250  # test questions a task (at most half of a small task)
    max_validation: int = 100  # validation questions a task, from the train side
    curve_rank: int = 4
    curve_seed: int = 0
    curve_steps: tuple[int, ...] = (100, 200, 400, 800, 1600)
    ranks: tuple[int, ...] = (4, 32)  # of the comparison, in order
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 8  # questions a step
    lr: float = 1e-3  # the listed-choices pilot's choice, kept (not tuned on this format)
    warmup: int = 50  # linear warm-up steps, then a constant rate
    s: int = 8
    dropout: float = 0.05
    max_tokens: int = 320  # per sequence; longer prompts (BoolQ passages) lose their beginning
    eval_token_budget: int = 4096  # padded tokens a scoring batch
    margin: float = 2.0  # points, paired, by which LoRA must beat both baselines on validation
    resamples: int = 10_000  # of the paired bootstrap
    device: str = "cpu"  # where the model trains and scores; devices agree only up to float rounding


FULL = ClozeSettings()
QUICK = ClozeSettings(
    max_test=3,
    max_validation=2,
    curve_rank=2,
    curve_steps=(2, 4),
    ranks=(2,),
    seeds=(0,),
    batch_size=2,
    warmup=1,
    s=2,
    max_tokens=96,
    eval_token_budget=1024,
    resamples=200,
)


def warmup_then_constant(warmup: int) -> Callable[[int], float]:
    """The learning-rate multiplier after ``step`` scheduler steps: up over ``warmup`` steps, then 1."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


def splits(settings: ClozeSettings) -> dict[str, ClozeSplit]:
    """Every task's fixed cut (:func:`~lora_dash.commonsense.data.split_cloze_task`)."""
    return {task: split_cloze_task(task, settings.max_test, settings.max_validation, SPLIT_SEED) for task in TASKS}


def parts(cut: dict[str, ClozeSplit]) -> tuple[list[ClozeQuestion], list[ClozeQuestion], list[ClozeQuestion]]:
    """The union over tasks (in task order) of the train, validation and test parts."""
    return tuple([q for split in cut.values() for q in getattr(split, part)] for part in ClozeSplit._fields[:3])


def fingerprint(questions: list[ClozeQuestion]) -> str:
    """A short hash of the questions in order: a unit's hits are only compared on the same questions."""
    text = json.dumps([(q.task, q.requests, q.gold) for q in questions])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def scored(
    model: torch.nn.Module, tokenizer, questions: list[ClozeQuestion], settings: ClozeSettings
) -> dict[str, Any]:
    """Accuracy, per-question hits (per task and metric, a string of 0/1 in question order), the
    questions' fingerprint and the scoring time in seconds."""
    start = time.perf_counter()
    hits = question_hits(model, tokenizer, questions, settings.max_tokens, settings.eval_token_budget)
    seconds = time.perf_counter() - start
    by_task: dict[str, dict[str, str]] = {}
    for number, question in enumerate(questions):
        for metric in METRICS:
            task_hits = by_task.setdefault(question.task, dict.fromkeys(METRICS, ""))
            task_hits[metric] += "1" if hits[metric][number] else "0"
    return {
        "accuracy": accuracy(questions, hits),
        "hits": by_task,
        "fingerprint": fingerprint(questions),
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------ training state
def state_path(cache: Path, r: int, seed: int, steps: int) -> Path:
    return cache / "cloze-state" / f"lora-r{r}-seed{seed}-step{steps}.pt"


def _build(settings: ClozeSettings, r: int, seed: int, cache: Path):
    """A fresh model with LoRA-Dash layers (A from ``seed``), its AdamW and its schedule."""
    torch.manual_seed(seed)
    tokenizer, model = load_smollm2(cache)
    model.to(settings.device)  # before the injection, so that A is drawn where it lives
    lora_dash.inject(model, TARGETS, r=r, alpha=2.0 * r, s=settings.s, dropout=settings.dropout)
    optimizer = torch.optim.AdamW(lora_dash.adapter_param_groups(model, settings.lr), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(settings.warmup))
    return tokenizer, model, optimizer, scheduler


def rng_states(device: str) -> dict[str, torch.Tensor]:
    """The random state a continued run needs: the CPU's, and the GPU's when the model runs there
    (dropout draws from the generator of its tensors' device)."""
    states = {"rng": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(state: dict[str, Any], device: str) -> None:
    """Restore what :func:`rng_states` recorded."""
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")  # runs in parallel may save the same state
    torch.save(state, temporary)
    os.replace(temporary, path)


def trained_lora(
    settings: ClozeSettings,
    r: int,
    seed: int,
    steps: int,
    cache: Path,
    train: list[ClozeQuestion],
    keep: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Plain LoRA of rank ``r`` and ``seed`` after ``steps`` steps, from the latest saved state on the way.

    Saves the state at ``steps`` and at each step of ``keep`` it passes. Returns ``tokenizer``,
    ``model``, ``state`` (at ``steps``), ``losses`` (steps 1 … ``steps``), ``first_step`` (where this
    call started training; ``steps + 1`` when a saved state was enough) and ``train_seconds``.
    """
    tokenizer, model, optimizer, scheduler = _build(settings, r, seed, cache)
    saved = sorted(
        (int(match.group(1)), path)
        for path in state_path(cache, r, seed, 0).parent.glob(f"lora-r{r}-seed{seed}-step*.pt")
        if (match := re.fullmatch(rf"lora-r{r}-seed{seed}-step(\d+)\.pt", path.name)) and int(match.group(1)) <= steps
    )
    losses: list[float] = []
    state: dict[str, Any] = {}
    if saved:
        state = torch.load(saved[-1][1], weights_only=True, map_location="cpu")
        restore_run(model, optimizer, scheduler, state)
        set_rng_states(state, settings.device)
        losses = list(state["losses"])
    first_step = len(losses) + 1

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        if step in keep or step == steps:
            state.clear()
            state.update(snapshot(model, optimizer), scheduler=scheduler.state_dict(), losses=list(losses))
            state.update(rng_states(settings.device))
            _save_state(state_path(cache, r, seed, step), state)
        if step % 25 == 0:
            log(f"LoRA r={r} seed {seed} step {step}: loss {loss:.4f}")

    start = time.perf_counter()
    train_steps(
        model,
        tokenizer,
        optimizer,
        scheduler,
        train,
        steps,
        settings.batch_size,
        seed,
        settings.max_tokens,
        on_step,
        first_step=first_step,
    )
    return {
        "tokenizer": tokenizer,
        "model": model,
        "state": state,
        "losses": losses,
        "first_step": first_step,
        "train_seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------------------------- units
def zero_shot_unit(settings: ClozeSettings, cache: Path, cut: dict[str, ClozeSplit]) -> dict[str, Any]:
    """The untouched model on the test and the validation questions."""
    _, validation, test = parts(cut)
    tokenizer, model = load_smollm2(cache)
    model.to(settings.device)
    return {
        "test": scored(model, tokenizer, test, settings),
        "validation": scored(model, tokenizer, validation, settings),
    }


def curve_unit(settings: ClozeSettings, steps: int, cache: Path, cut: dict[str, ClozeSplit]) -> dict[str, Any]:
    """Plain LoRA (the curve's rank and seed) after ``steps`` steps, scored on the validation slice."""
    train, validation, _ = parts(cut)
    run = trained_lora(settings, settings.curve_rank, settings.curve_seed, steps, cache, train)
    return {
        "r": settings.curve_rank,
        "seed": settings.curve_seed,
        "steps": steps,
        "losses": run["losses"],
        "first_step": run["first_step"],
        "train_seconds": run["train_seconds"],
        "validation": scored(run["model"], run["tokenizer"], validation, settings),
    }


def _fork(settings: ClozeSettings, r: int, seed: int, cache: Path, state: dict[str, Any], dash_only: bool):
    """A fresh model loaded from the LoRA state after step ``t`` and launched now; for dash-only, A and B
    are frozen (their gradients stay None, so AdamW leaves them and their state untouched)."""
    tokenizer, model, optimizer, scheduler = _build(settings, r, seed, cache)
    t = len(state["losses"])
    restore_run(model, optimizer, scheduler, state)
    controller = lora_dash.LaunchController(model, launch_step=t).attach(optimizer)
    controller.launch()
    controller.load_state_dict({"launch_step": t, "steps": t})
    set_rng_states(state, settings.device)
    if dash_only:
        for layer in lora_dash.dash_layers(model).values():
            layer.lora_A.requires_grad_(False)
            layer.lora_B.requires_grad_(False)
    return tokenizer, model, optimizer, scheduler


def comparison_unit(
    settings: ClozeSettings, method: str, r: int, seed: int, budget: int, t: int, cache: Path, cut: dict
) -> dict[str, Any]:
    """One method of :data:`METHODS` at rank ``r`` and ``seed``, ``budget`` steps, scored on the test set."""
    if not 0 < t < budget:
        raise ValueError(f"the launch step t must be in [1, budget − 1 = {budget - 1}], got {t}")
    train, _, test = parts(cut)
    if method == "lora":
        run = trained_lora(settings, r, seed, budget, cache, train, keep=(t,))
        tokenizer, model, losses = run["tokenizer"], run["model"], run["losses"]
        first_step, train_seconds = run["first_step"], run["train_seconds"]
    elif method in METHODS:
        state = trained_lora(settings, r, seed, t, cache, train)["state"]
        tokenizer, model, optimizer, scheduler = _fork(settings, r, seed, cache, state, method == "dash_only")
        start = time.perf_counter()
        losses = state["losses"] + train_steps(
            model,
            tokenizer,
            optimizer,
            scheduler,
            train,
            budget,
            settings.batch_size,
            seed,
            settings.max_tokens,
            lambda step, loss: step % 25 == 0 and log(f"{method} r={r} seed {seed} step {step}: loss {loss:.4f}"),
            first_step=t + 1,
        )
        first_step, train_seconds = t + 1, time.perf_counter() - start
    else:
        raise ValueError(f"unknown method {method!r}; methods are {METHODS}")
    return {
        "method": method,
        "r": r,
        "seed": seed,
        "steps": budget,
        "t": t,
        "losses": losses,
        "first_step": first_step,
        "train_seconds": train_seconds,
        "trainable_parameters": lora_dash.count_trainable_parameters(model),
        "test": scored(model, tokenizer, test, settings),
    }


# ------------------------------------------------------------------------------------------------ plan
def curve_keys(settings: ClozeSettings) -> list[str]:
    return [f"curve-r{settings.curve_rank}-seed{settings.curve_seed}-step{n}" for n in settings.curve_steps]


def comparison_keys(settings: ClozeSettings) -> list[str]:
    """Seed by seed within each rank, the three methods of a seed together, so a partial study is paired."""
    return [f"r{r}-seed{seed}-{method}" for r in settings.ranks for seed in settings.seeds for method in METHODS]
