"""The TSD claims at a converged budget: 3 epochs with a learning-rate schedule instead of 200 steps.

The main study's "true" TSDs come from 200 constant-rate steps of full fine-tuning, a small fraction of
an epoch; the paper's come from a converged fine-tune. Here the same encoder is fine-tuned in full and
with LoRA (r = 8) for three epochs over a fixed subset of the Rotten Tomatoes training reviews, with a
linear warm-up and a linear decay, and the coordinates ``c_i = u_iᵀ ΔW v_i`` of every targeted layer
are saved along training. LoRA-Dash (the paper's "tsd" selection, and the "coordinate" selection,
beyond the paper) is forked from each LoRA run at step t as in the main study. The report
(:mod:`lora_dash.reproduce.converged_report`) judges the saved coordinates against the isotropic null
of :func:`lora_dash.analysis.null_evidence`.

Units, under ``<out>/units/``: ``converged-ft-seed{s}`` and ``converged-r{r}-seed{s}``, each a JSON
summary plus a ``.pt`` trajectory ``{"steps": [...], "coords": {step: {layer: (k,) tensor}}}``.
"""

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import lora_dash
from lora_dash import directions
from lora_dash.demo.data import Split, batches, load_rotten_tomatoes
from lora_dash.demo.model import MINILM_TARGETS, SentenceClassifier, load_minilm
from lora_dash.demo.train import TrainConfig, build, evaluate, train
from lora_dash.reproduce.plan import Family, Variant
from lora_dash.reproduce.runner import _result, fork, snapshot

SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class ConvergedSettings:
    """The converged budget: ``epochs`` passes over ``n_train`` reviews, linear warm-up then decay."""

    n_train: int  # the first n_train reviews of the main study's (shuffled) training split
    epochs: int
    batch_size: int
    n_test: int
    record_steps: tuple[int, ...]  # coordinates are saved after these optimizer steps (and the last)
    draws: int  # Monte Carlo draws of the null in the report
    t: int = 100
    s: int = 8
    ranks: tuple[int, ...] = (8,)
    lr: float = 1e-3  # LoRA, δ and the head, at the peak of the schedule
    ft_lr: float = 2e-5  # full fine-tuning of the encoder (its head keeps ``lr``)
    warmup_share: float = 0.1


#: Three epochs over 4,096 reviews is 384 steps of batch 32: about 12,000 examples seen per run, four
#: times the main study's fine-tuning budget; the subset (not the full 11,752) is what fits 2 cores.
FULL = ConvergedSettings(
    n_train=4096, epochs=3, batch_size=32, n_test=1000, record_steps=(1, 25, 50, 100, 200, 300), draws=999
)
QUICK = ConvergedSettings(n_train=48, epochs=3, batch_size=8, n_test=40, record_steps=(1, 3, 6), draws=99, t=6)

#: The LoRA-Dash runs forked from each LoRA run: the paper's selection, and the "coordinate" one.
STRATEGIES = ("tsd", "coordinate")


def load_split(settings: ConvergedSettings) -> Split:
    """The main study's Rotten Tomatoes split with its training set cut to ``n_train`` reviews."""
    split = load_rotten_tomatoes(n_test=settings.n_test, seed=0)
    return split._replace(
        train_texts=split.train_texts[: settings.n_train], train_labels=split.train_labels[: settings.n_train]
    )


def total_steps(split: Split, settings: ConvergedSettings) -> int:
    """Optimizer steps in ``epochs`` passes (a pass's last batch of each length pool may be short)."""
    per_epoch = sum(1 for _ in batches(split.train_texts, split.train_labels, settings.batch_size, seed=0))
    return settings.epochs * per_epoch


def schedule_factor(step: int, steps: int, warmup: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based) as a fraction of the peak.

    Linear warm-up to 1 at ``warmup``, then linear decay, reaching ``1 / (steps - warmup + 1)`` at the
    last step (never 0: every step trains).
    """
    if step <= warmup:
        return step / warmup
    return (steps - step + 1) / (steps - warmup + 1)


def scheduled(optimizer: torch.optim.Optimizer, steps: int, warmup: int, first_step: int) -> Callable[[int], None]:
    """Set every group's rate for ``first_step`` now; the returned ``after_step(step)`` sets the next.

    Each group's peak is its rate when this is called (kept as ``initial_lr``), so a forked run's δ
    group follows the same schedule at its own peak.
    """

    def set_rates(step: int) -> None:
        factor = schedule_factor(min(step, steps), steps, warmup)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    set_rates(first_step)
    return lambda step: set_rates(step + 1)


def _targets(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if re.fullmatch(MINILM_TARGETS, name)}


@torch.no_grad()
def pretrained_bases() -> dict[str, tuple[Tensor, Tensor]]:
    """Every targeted layer of MiniLM: ``(σ, eligible)`` of its pretrained ``W``, both ``(k,)``.

    The same SVD (float32) and eligibility rule as launch; layer names as in the unit files.
    """
    _, encoder = load_minilm()
    bases = {}
    for name, module in _targets(SentenceClassifier(encoder)).items():
        _, sigma, _ = directions.svd_basis(module.weight)
        bases[name] = (sigma, directions.eligible_directions(sigma, tuple(module.weight.shape)))
    return bases


def load_trajectory(path: Path) -> dict[int, dict[str, Tensor]]:
    """A unit's saved coordinates: ``{step: {layer: c (k,)}}``, steps ascending."""
    saved = torch.load(path, weights_only=True)
    return {step: saved["coords"][step] for step in saved["steps"]}


class CoordinateRecorder:
    """Saves every targeted layer's ``c = Uᵀ ΔW V`` (diagonal) after the chosen steps.

    ``ΔW`` is ``W − W₀`` for full fine-tuning, or the LoRA update ``scaling · B A`` (from the factors,
    without forming it); the pretrained ``U, V`` are computed once.
    """

    def __init__(self, model: torch.nn.Module, steps: set[int], lora: bool) -> None:
        self.layers = lora_dash.dash_layers(model) if lora else _targets(model)
        self.pretrained = {} if lora else {name: m.weight.detach().clone() for name, m in self.layers.items()}
        weights = {name: layer.base_weight() if lora else layer.weight for name, layer in self.layers.items()}
        self.bases = {name: directions.svd_basis(weight.detach()) for name, weight in weights.items()}
        self.steps, self.lora = steps, lora
        self.coords: dict[int, dict[str, Tensor]] = {}

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        if step not in self.steps:
            return
        recorded = {}
        for name, layer in self.layers.items():
            U, _, V = self.bases[name]
            if self.lora:
                recorded[name] = directions.coordinates_from_factors(layer.lora_B, layer.lora_A, layer.scaling, U, V)
            else:
                recorded[name] = directions.coordinates(layer.weight - self.pretrained[name], U, V)
        self.coords[step] = recorded

    def save(self, path: Path) -> None:
        steps = sorted(self.coords)
        _atomic(path, lambda temporary: torch.save({"steps": steps, "coords": self.coords}, temporary))


def run_full_fine_tuning(
    split: Split, settings: ConvergedSettings, seed: int, units: Path, log: Callable[[str], None]
) -> None:
    """Unit ``converged-ft-seed{seed}``: every encoder weight and the head, the whole schedule."""
    steps = total_steps(split, settings)
    config = TrainConfig(steps=steps, batch_size=settings.batch_size, seed=seed, lr=settings.lr)
    torch.manual_seed(seed)
    tokenizer, encoder = load_minilm()
    model = SentenceClassifier(encoder)
    optimizer = torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": settings.ft_lr},
            {"params": model.head.parameters(), "lr": settings.lr},
        ],
        weight_decay=0.0,
    )
    recorder = CoordinateRecorder(model, {*settings.record_steps, steps}, lora=False)
    after_step = scheduled(optimizer, steps, _warmup(settings, steps), first_step=1)

    def on_step(step: int, loss: float) -> None:
        after_step(step)
        recorder(step)

    start = time.perf_counter()
    losses, _ = train(model, tokenizer, optimizer, split, config, progress=False, on_step=on_step)
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, tokenizer, split.test_texts, split.test_labels, progress=False)
    recorder.save(units / f"converged-ft-seed{seed}.pt")
    summary = {"seed": seed, "steps": steps, "accuracy": accuracy, "losses": losses, "seconds": seconds}
    _write_json(units / f"converged-ft-seed{seed}.json", {**summary, "settings": dataclasses.asdict(settings)})
    log(f"converged full fine-tuning seed {seed}: {steps} steps, acc {accuracy:.4f} ({seconds:.0f}s)")


def run_lora_family(
    split: Split, settings: ConvergedSettings, r: int, seed: int, units: Path, log: Callable[[str], None]
) -> None:
    """Unit ``converged-r{r}-seed{seed}``: LoRA for the whole schedule, and LoRA-Dash forked at ``t``
    once per strategy of :data:`STRATEGIES`; LoRA's coordinates saved along the way."""
    steps = total_steps(split, settings)
    warmup = _warmup(settings, steps)
    config = TrainConfig(
        r=r, s=settings.s, t=settings.t, steps=steps, lr=settings.lr, batch_size=settings.batch_size, seed=seed
    )
    family = Family("rotten_tomatoes", r, seed)
    eval_steps = {settings.t, steps}

    tokenizer, model, optimizer, _ = build("LoRA", config)
    recorder = CoordinateRecorder(model, {*settings.record_steps, settings.t, steps}, lora=True)
    after_step = scheduled(optimizer, steps, warmup, first_step=1)
    accuracy: dict[int, float] = {}
    state: dict[str, Any] = {}

    def on_step(step: int, loss: float) -> None:
        after_step(step)
        recorder(step)
        if step == settings.t:
            state.update(snapshot(model, optimizer))  # after the schedule set step t + 1's rate
        if step in eval_steps:
            accuracy[step] = evaluate(model, tokenizer, split.test_texts, split.test_labels, progress=False)
            model.train()

    start = time.perf_counter()
    losses, _ = train(model, tokenizer, optimizer, split, config, progress=False, on_step=on_step)
    results = [_result(family, "LoRA", None, accuracy, losses, model, time.perf_counter() - start)]
    log(f"converged r{r} seed {seed} LoRA: acc {accuracy[steps]:.4f} ({results[0]['seconds']:.0f}s)")

    default = Variant(t=settings.t, s=settings.s)
    for strategy in STRATEGIES:
        variant = dataclasses.replace(default, strategy=strategy)
        tokenizer, dash, optimizer, controller = fork(state, variant, config, seed)
        # The fork's groups start at their peak rates: put them on the schedule where the LoRA run is.
        after_dash_step = scheduled(optimizer, steps, warmup, first_step=settings.t + 1)
        dash_accuracy = {settings.t: accuracy[settings.t]}  # up to t the runs are one computation

        def on_dash_step(
            step: int, loss: float, model=dash, tokenizer=tokenizer, scores=dash_accuracy, after=after_dash_step
        ) -> None:
            after(step)
            if step == steps:
                scores[step] = evaluate(model, tokenizer, split.test_texts, split.test_labels, progress=False)

        start = time.perf_counter()
        dash_losses, _ = train(
            dash,
            tokenizer,
            optimizer,
            split,
            config,
            controller,
            progress=False,
            on_step=on_dash_step,
            first_step=settings.t + 1,
        )
        label = variant.label(default)
        result = _result(
            family, label, variant, dash_accuracy, losses[: settings.t] + dash_losses, dash, time.perf_counter() - start
        )
        results.append(result)
        log(f"converged r{r} seed {seed} {label}: acc {dash_accuracy[steps]:.4f} ({result['seconds']:.0f}s)")

    recorder.save(units / f"converged-r{r}-seed{seed}.pt")
    payload = {
        "family": f"converged-r{r}-seed{seed}",
        "steps": steps,
        "runs": results,
        "settings": dataclasses.asdict(settings),
    }
    _write_json(units / f"converged-r{r}-seed{seed}.json", payload)


def unit_keys(settings: ConvergedSettings, seeds: tuple[int, ...]) -> list[str]:
    """The study's units in running order: the fine-tuning references, then LoRA rank by rank."""
    return [f"converged-ft-seed{seed}" for seed in seeds] + [
        f"converged-r{r}-seed{seed}" for r in settings.ranks for seed in seeds
    ]


def run_unit(quick: bool, key: str, units: Path, log: Callable[[str], None]) -> str:
    """Run the unit named ``key`` (one of :func:`unit_keys`)."""
    settings = QUICK if quick else FULL
    kind, seed = re.fullmatch(r"converged-(ft|r\d+)-seed(\d+)", key).groups()
    split = load_split(settings)
    if kind == "ft":
        run_full_fine_tuning(split, settings, int(seed), units, log)
    else:
        run_lora_family(split, settings, int(kind[1:]), int(seed), units, log)
    return key


def _warmup(settings: ConvergedSettings, steps: int) -> int:
    return max(1, round(settings.warmup_share * steps))


def _write_json(path: Path, payload: dict) -> None:
    _atomic(path, lambda temporary: temporary.write_text(json.dumps(payload) + "\n"))


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)  # a unit file exists only once complete
