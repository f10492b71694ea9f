"""The study's plan and units of work: LoRA vs LoRA-Dash on the eight tasks, resumable.

Units (each a JSON file under ``<out>/units/``, written atomically; a rerun skips the ones present):

- ``zeroshot.json``: the untouched model on the test questions, and each adapted matrix's
  quantization noise level next to its singular values (how many σ lie below it).
- ``r<r>-seed<seed>.json``: a LoRA run of rank ``r`` and the LoRA-Dash run forked from it right after
  step ``t`` (parameters, AdamW and schedule state, RNG state), as ``lora_dash.reproduce`` does: until
  ``t`` the two are one computation, so each seed's difference is paired by construction.

Training set: the union of the eight tasks' train parts; test: ``n_test`` held-out questions per task.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

import lora_dash
from lora_dash import directions
from lora_dash.commonsense.data import Question, load_splits
from lora_dash.commonsense.model import TARGETS, load_smollm2, quantization_noise_levels
from lora_dash.commonsense.train import evaluate, linear_warmup_decay, restore_run, train_steps
from lora_dash.demo.report import tsd_layers
from lora_dash.reproduce.runner import snapshot
from lora_dash.reproduce.study import _write, log

SEEDS = (0, 1, 2)
SPLIT_SEED = 0  # one train/test cut for every training seed: runs are paired on the same questions


@dataclass(frozen=True)
class Settings:
    """What every run of a study shares. α = 2r (the paper's setting) is derived, not stored."""

    ranks: tuple[int, ...]
    steps: int  # optimizer steps of each run, pre-launch and dash together
    batch_size: int  # questions per step
    lr: float
    n_test: int  # held-out questions per task
    warmup: int = 100  # linear warm-up steps, then linear decay to 0 at ``steps``
    t: int = 100  # LoRA-Dash launches right after this step
    s: int = 8
    dropout: float = 0.05
    max_tokens: int = 320  # per sequence; longer prompts lose their beginning
    eval_token_budget: int = 4096  # padded tokens per evaluation batch


#: The step budget and test size were set for a 4-hour budget on 2 cores from a first estimate of
#: ~5.5 s a step; measured undisturbed it is ~10 s (about an hour a unit: tables.md's wall times).
#: The learning rate (0 here) is the pilot's: see :func:`pilot_choice`.
FULL = Settings(ranks=(4, 32), steps=200, batch_size=8, lr=0.0, n_test=75)

#: The pilot: plain LoRA r = 4, seed 0, a short schedule at each learning rate; scored on questions
#: held out of the *train* parts (never the test parts), which the pilot does not train on.
PILOT_LRS = (2e-4, 1e-3)
PILOT = Settings(ranks=(4,), steps=25, batch_size=8, lr=0.0, n_test=75, warmup=10)
PILOT_VALIDATION = 5  # questions per task
QUICK = Settings(
    ranks=(4,), steps=4, batch_size=2, lr=5e-4, n_test=2, warmup=2, t=2, max_tokens=96, eval_token_budget=1024
)


def unit_keys(settings: Settings, seeds: tuple[int, ...]) -> list[str]:
    """Every unit of the plan in the order it runs: seed by seed, each rank, so a partial study is paired."""
    return ["zeroshot", *(f"r{r}-seed{seed}" for seed in seeds for r in settings.ranks)]


def train_and_test(settings: Settings) -> tuple[list[Question], list[Question]]:
    """The union of the tasks' train parts (in task order; training shuffles) and their test parts."""
    splits = load_splits(settings.n_test, SPLIT_SEED)
    return ([q for split in splits.values() for q in split.train], [q for split in splits.values() for q in split.test])


def split_summary(settings: Settings) -> dict[str, dict[str, int]]:
    """Per task: train and test sizes, duplicates and conflicting questions dropped."""
    splits = load_splits(settings.n_test, SPLIT_SEED)
    return {
        task: {
            "train": len(split.train),
            "test": len(split.test),
            "duplicates": split.duplicates,
            "conflicting": split.conflicting,
        }
        for task, split in splits.items()
    }


def zero_shot_unit(settings: Settings, cache: Path) -> dict[str, Any]:
    """The base model's accuracy, and per adapted matrix its noise level and how many σ fall below it."""
    _, test = train_and_test(settings)
    tokenizer, model = load_smollm2(cache)
    start = time.perf_counter()
    accuracy = evaluate(model, tokenizer, test, settings.max_tokens, settings.eval_token_budget)
    levels = quantization_noise_levels()
    modules = dict(model.named_modules())
    layers = {}
    for name, level in levels.items():
        sigma = directions.svd_basis(modules[name].weight.detach()).sigma
        layers[name] = {
            "noise_level": level,
            "k": sigma.numel(),
            "below_noise": int((sigma < level).sum()),
            "sigma_max": sigma[0].item(),
            "sigma_min": sigma[-1].item(),
        }
    return {
        "accuracy": accuracy,
        "layers": layers,
        "splits": split_summary(settings),
        "seconds": time.perf_counter() - start,
    }


def _optimizer(model: torch.nn.Module, settings: Settings, total: int):
    optimizer = torch.optim.AdamW(lora_dash.adapter_param_groups(model, settings.lr), weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(settings.warmup, total))


def _adapted(settings: Settings, r: int, seed: int, cache: Path):
    torch.manual_seed(seed)  # every A starts from the seed
    tokenizer, model = load_smollm2(cache)
    lora_dash.inject(model, TARGETS, r=r, alpha=2.0 * r, s=settings.s, dropout=settings.dropout)
    return tokenizer, model


def _scored(model: torch.nn.Module, tokenizer, test: list[Question], settings: Settings) -> dict[str, Any]:
    """``{"accuracy": evaluate(...), "eval_seconds": its wall time}``."""
    start = time.perf_counter()
    accuracy = evaluate(model, tokenizer, test, settings.max_tokens, settings.eval_token_budget)
    return {"accuracy": accuracy, "eval_seconds": time.perf_counter() - start}


def selected_directions(model: torch.nn.Module, levels: dict[str, float]) -> dict[str, Any]:
    """Where the launched directions sit: σ-positions (0 largest … 1 smallest), and how many lie below noise."""
    layers = tsd_layers(model)
    below = [sum(sigma < levels[layer["name"]] for sigma in layer["sigma"]) for layer in layers]
    return {
        "positions": [p for layer in layers for p in layer["position"]],
        "below_noise": sum(below),
        "selected": sum(len(layer["sigma"]) for layer in layers),
        "layers_with_any_below_noise": sum(count > 0 for count in below),
        "mean_abs_delta_over_sigma": sum(abs(d) / s for layer in layers for d, s in zip(layer["delta"], layer["sigma"]))
        / sum(len(layer["sigma"]) for layer in layers),
    }


def lora_run(
    settings: Settings, r: int, seed: int, cache: Path, train: list[Question], test: list[Question]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Plain LoRA of rank ``r``: its result, and its snapshot right after step ``t`` (to fork LoRA-Dash from)."""
    tokenizer, model = _adapted(settings, r, seed, cache)
    optimizer, scheduler = _optimizer(model, settings, settings.steps)
    saved: dict[str, Any] = {}

    def on_step(step: int, loss: float) -> None:
        if step == settings.t:
            saved.update(snapshot(model, optimizer), scheduler=scheduler.state_dict())
        if step % 25 == 0:
            log(f"r{r}-seed{seed} LoRA step {step}: loss {loss:.4f}")

    start = time.perf_counter()
    losses = train_steps(
        model,
        tokenizer,
        optimizer,
        scheduler,
        train,
        settings.steps,
        settings.batch_size,
        seed,
        settings.max_tokens,
        on_step,
    )
    lora = {
        "method": "LoRA",
        "losses": losses,
        "train_seconds": time.perf_counter() - start,
        **_scored(model, tokenizer, test, settings),
        "trainable_parameters": lora_dash.count_trainable_parameters(model),
    }
    log(f"r{r}-seed{seed} LoRA: average acc {lora['accuracy']['average']['acc']:.4f}")
    return lora, saved


def family_unit(settings: Settings, r: int, seed: int, cache: Path) -> dict[str, Any]:
    """LoRA of rank ``r`` for ``settings.steps`` steps, and LoRA-Dash forked from it after step ``t``."""
    train, test = train_and_test(settings)
    lora, saved = lora_run(settings, r, seed, cache, train, test)
    losses = lora["losses"]

    tokenizer, dash = _adapted(settings, r, seed, cache)
    optimizer, scheduler = _optimizer(dash, settings, settings.steps)
    restore_run(dash, optimizer, scheduler, saved)
    controller = lora_dash.LaunchController(dash, launch_step=settings.t).attach(optimizer)
    launch_start = time.perf_counter()
    controller.launch()
    launch_seconds = time.perf_counter() - launch_start
    controller.load_state_dict({"launch_step": settings.t, "steps": settings.t})
    torch.set_rng_state(saved["rng"])

    def on_dash_step(step: int, loss: float) -> None:
        if step % 25 == 0:
            log(f"r{r}-seed{seed} LoRA-Dash step {step}: loss {loss:.4f}")

    start = time.perf_counter()
    dash_losses = train_steps(
        dash,
        tokenizer,
        optimizer,
        scheduler,
        train,
        settings.steps,
        settings.batch_size,
        seed,
        settings.max_tokens,
        on_dash_step,
        first_step=settings.t + 1,
    )
    result = {
        "method": "LoRA-Dash",
        "losses": losses[: settings.t] + dash_losses,
        "train_seconds": time.perf_counter() - start,
        "launch_seconds": launch_seconds,
        **_scored(dash, tokenizer, test, settings),
        "trainable_parameters": lora_dash.count_trainable_parameters(dash),
        **selected_directions(dash, quantization_noise_levels()),
    }
    log(f"r{r}-seed{seed} LoRA-Dash: average acc {result['accuracy']['average']['acc']:.4f}")
    return {"r": r, "seed": seed, "runs": [lora, result]}


def pilot_unit(settings: Settings, lr: float, cache: Path) -> dict[str, Any]:
    """Plain LoRA (rank ``settings.ranks[0]``, seed 0) at ``lr``: its losses and validation accuracy."""
    splits = load_splits(settings.n_test, SPLIT_SEED)
    validation = [q for split in splits.values() for q in split.train[-PILOT_VALIDATION:]]
    train = [q for split in splits.values() for q in split.train[:-PILOT_VALIDATION]]
    settings = replace(settings, lr=lr)
    tokenizer, model = _adapted(settings, settings.ranks[0], 0, cache)
    optimizer, scheduler = _optimizer(model, settings, settings.steps)
    start = time.perf_counter()
    losses = train_steps(
        model,
        tokenizer,
        optimizer,
        scheduler,
        train,
        settings.steps,
        settings.batch_size,
        0,
        settings.max_tokens,
        lambda step, loss: log(f"pilot lr {lr:g} step {step}: loss {loss:.4f}"),
    )
    return {
        "lr": lr,
        "losses": losses,
        "train_seconds": time.perf_counter() - start,
        "settings": asdict(settings),
        "validation": evaluate(model, tokenizer, validation, settings.max_tokens, settings.eval_token_budget),
    }


def run_pilot(out: Path, cache: Path) -> float:
    """Run the pilot runs not yet in ``out/pilot`` and return the learning rate they choose."""
    folder = out / "pilot"
    folder.mkdir(parents=True, exist_ok=True)
    for lr in PILOT_LRS:
        if not (folder / f"lr{lr:g}.json").exists():
            _write(folder / f"lr{lr:g}.json", pilot_unit(PILOT, lr, cache))
    return pilot_choice(out)


def pilot_choice(out: Path) -> float:
    """The pilot's learning rate: the best average validation accuracy, ties to the lower mean loss of the
    last 5 steps. Every rate of :data:`PILOT_LRS` must have run (``out/pilot/lr<lr>.json``)."""
    runs = [json.loads((out / "pilot" / f"lr{lr:g}.json").read_text()) for lr in PILOT_LRS]
    best = max(runs, key=lambda run: (run["validation"]["average"]["acc"], -sum(run["losses"][-5:])))
    return best["lr"]


def stamp(payload: dict[str, Any], key: str, settings: Any, start: float) -> dict[str, Any]:
    """``payload`` with what every unit file records: its key, the settings (a dataclass), its wall time
    since ``start`` (``time.perf_counter()``), the torch threads and the torch version."""
    payload.update(
        key=key,
        settings=asdict(settings),
        wall_seconds=time.perf_counter() - start,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    return payload


def run_study(out: Path, settings: Settings, seeds: tuple[int, ...], cache: Path) -> None:
    """Run every unit of the plan not yet in ``out/units`` (in :func:`unit_keys` order)."""
    units = out / "units"
    units.mkdir(parents=True, exist_ok=True)
    todo = [key for key in unit_keys(settings, seeds) if not (units / f"{key}.json").exists()]
    log(f"{len(todo)} of {len(unit_keys(settings, seeds))} units to run: {', '.join(todo)}")
    for key in todo:
        start = time.perf_counter()
        if key == "zeroshot":
            payload = zero_shot_unit(settings, cache)
        else:
            r, seed = (int(part[len(prefix) :]) for part, prefix in zip(key.split("-"), ("r", "seed")))
            payload = family_unit(settings, r, seed, cache)
        _write(units / f"{key}.json", stamp(payload, key, settings, start))
        log(f"unit {key} done ({payload['wall_seconds']:.0f}s)")
