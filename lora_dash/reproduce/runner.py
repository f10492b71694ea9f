"""Running the study: one LoRA run per (task, rank, seed), with LoRA-Dash variants forked from it.

Until its launch step ``t`` a LoRA-Dash run *is* the LoRA run of the same rank and seed (same
initialization, batches, dropout masks and optimizer steps). So every LoRA-Dash variant starts from a
snapshot of the LoRA run taken right after step ``t`` (parameters, AdamW state, RNG state), launches
there with its own strategy, ``s`` and δ learning rate, and trains on with the same batches. That
saves the pre-launch steps of every variant, and makes every comparison paired by construction.
``tests/test_reproduce.py`` checks that a forked run equals a LoRA-Dash run trained from step 1.

The full fine-tuning reference of a (task, seed) is its own unit of work: its change rates define the
"true" task-specific directions against which LoRA's predictions are scored along training.
"""

import copy
import dataclasses
import re
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import lora_dash
from lora_dash import analysis, directions
from lora_dash.demo.data import Split
from lora_dash.demo.model import SentenceClassifier, load_minilm
from lora_dash.demo.report import tsd_layers
from lora_dash.demo.train import TrainConfig, build, evaluate, train
from lora_dash.reproduce.plan import Family, Settings, Variant


# ------------------------------------------------------------------------------- full fine-tuning
def full_fine_tuning(split: Split, settings: Settings, seed: int, targets: str) -> dict[str, Any]:
    """Fine-tune every encoder weight and the head; return each targeted layer's change-rate spectrum.

    ``ΔW = W_ft − W`` per layer; ``ρ_i = |u_iᵀ ΔW v_i| / σ_i`` on ``W``'s own directions (METHOD.md §2).
    Returns ``{"accuracy", "seconds", "layers": {name: ChangeRateSpectrum}}``; tensors stay in memory.
    """
    config = TrainConfig(
        steps=settings.ft_steps, batch_size=settings.ft_batch_size, seed=seed, lr=settings.lr, targets=targets
    )
    torch.manual_seed(seed)
    tokenizer, encoder = load_minilm()
    model = SentenceClassifier(encoder)
    pretrained = {name: module.weight.detach().clone() for name, module in _targets(model, targets).items()}
    optimizer = torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": settings.ft_lr},
            {"params": model.head.parameters(), "lr": settings.lr},
        ],
        weight_decay=0.0,
    )
    start = time.perf_counter()
    train(model, tokenizer, optimizer, split, config, progress=False)
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, tokenizer, split.test_texts, split.test_labels, progress=False)
    layers = {
        name: analysis.change_rate_spectrum(pretrained[name], module.weight.detach() - pretrained[name])
        for name, module in _targets(model, targets).items()
    }
    return {"accuracy": accuracy, "seconds": seconds, "layers": layers}


def _targets(model: torch.nn.Module, targets: str) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in model.named_modules() if re.fullmatch(targets, name)}


# ----------------------------------------------------------------------------------- LoRA family
class PredictionRecorder:
    """Scores LoRA's current ``ΔW = (α/r)·B A`` as a TSD prediction against the reference rates.

    The SVD of each pretrained ``W`` is taken once; each score then costs only the coordinates from
    the factors, O(k·r·(n+m)) per layer.
    """

    def __init__(self, model: torch.nn.Module, reference: dict[str, analysis.ChangeRateSpectrum]) -> None:
        self.layers = lora_dash.dash_layers(model)
        self.bases = {name: directions.svd_basis(layer.base_weight()) for name, layer in self.layers.items()}
        self.reference = reference
        self.scores: list[dict[str, Any]] = []

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        recall, accuracy = [], []
        for name, layer in self.layers.items():
            basis = self.bases[name]
            coords = directions.coordinates_from_factors(layer.lora_B, layer.lora_A, layer.scaling, basis.U, basis.V)
            scores = directions.score_coordinates(basis, coords)
            true = self.reference[name]
            recall.append(analysis.tsd_recall(scores.rates, true.rates, scores.eligible, true.eligible))
            accuracy.append(analysis.tsd_accuracy(scores.rates, true.rates, scores.eligible, true.eligible))
        self.scores.append(
            {
                "step": step,
                "recall": _mean(recall),
                "accuracy": _mean(accuracy),
                "recall_per_layer": recall,
                "accuracy_per_layer": accuracy,
            }
        )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Everything a fork needs to continue the run: trainable parameters and AdamW state by name, and
    the RNG state (BERT's dropout draws from it). δ is left out: it is zero and is reset at launch."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad and "dash_delta" not in name}
    return {
        "parameters": {name: p.detach().clone() for name, p in trainable.items()},
        "optimizer": {name: copy.deepcopy(optimizer.state[p]) for name, p in trainable.items() if p in optimizer.state},
        "rng": torch.get_rng_state(),
    }


def fork(state: dict[str, Any], variant: Variant, config: TrainConfig, seed: int):
    """A fresh model with ``variant.s`` directions, loaded from a LoRA snapshot and launched now.

    Returns ``(tokenizer, model, optimizer, controller)``, ready to train from step ``t + 1``.
    """
    tokenizer, model, _, _ = build("LoRA", dataclasses.replace(config, s=variant.s, t=variant.t))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["parameters"].items():
            parameters[name].copy_(value)
    groups = lora_dash.adapter_param_groups(model, config.lr, delta_lr_scale=variant.delta_lr_scale)
    optimizer = torch.optim.AdamW([*groups, {"params": list(model.head.parameters()), "lr": config.lr}])
    for name, value in state["optimizer"].items():
        optimizer.state[parameters[name]] = copy.deepcopy(value)
    controller = lora_dash.LaunchController(model, launch_step=variant.t, strategy=variant.strategy, seed=seed)
    controller.attach(optimizer)
    controller.launch()
    controller.load_state_dict({"launch_step": variant.t, "steps": variant.t})
    torch.set_rng_state(state["rng"])
    return tokenizer, model, optimizer, controller


def run_family(
    family: Family,
    split: Split,
    settings: Settings,
    targets: str,
    reference: dict[str, analysis.ChangeRateSpectrum] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train the family's LoRA run and every variant; one result dict per run (JSON-ready)."""
    config = TrainConfig(
        r=family.r,
        steps=settings.steps,
        lr=settings.lr,
        batch_size=settings.batch_size,
        seed=family.seed,
        targets=targets,
    )
    eval_steps = sorted({settings.short_steps, settings.steps})
    fork_steps = {variant.t for variant in family.variants}

    tokenizer, model, optimizer, _ = build("LoRA", config)
    recorder = PredictionRecorder(model, reference) if family.record_tsd and reference else None
    snapshots: dict[int, dict[str, Any]] = {}
    accuracy: dict[int, float] = {}

    def on_step(step: int, loss: float) -> None:
        if step in fork_steps:
            snapshots[step] = snapshot(model, optimizer)
        if recorder is not None and (step % settings.record_every == 0 or step == 1):
            recorder(step)
        if step in eval_steps:
            accuracy[step] = evaluate(model, tokenizer, split.test_texts, split.test_labels, progress=False)
            model.train()

    start = time.perf_counter()
    losses, _ = train(model, tokenizer, optimizer, split, config, progress=False, on_step=on_step)
    lora = _result(family, "LoRA", None, accuracy, losses, model, time.perf_counter() - start)
    if recorder is not None:
        lora["tsd_prediction"] = recorder.scores
    results = [lora]
    log(f"{family.key} LoRA: acc {_accuracies(accuracy)} ({lora['seconds']:.0f}s)")

    for variant in family.variants:
        tokenizer, dash, optimizer, controller = fork(snapshots[variant.t], variant, config, family.seed)
        # Evaluations at or before t are the LoRA run's: up to there the two are one computation.
        dash_accuracy = {step: value for step, value in accuracy.items() if step <= variant.t}

        # The ablations are compared at the long budget only; the method itself at both.
        scored = eval_steps if variant == family.default else [settings.steps]

        def on_dash_step(
            step: int, loss: float, model=dash, tokenizer=tokenizer, scores=dash_accuracy, scored=scored
        ) -> None:
            if step in scored:
                scores[step] = evaluate(model, tokenizer, split.test_texts, split.test_labels, progress=False)
                model.train()

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
            first_step=variant.t + 1,
        )
        label = variant.label(family.default)
        result = _result(
            family, label, variant, dash_accuracy, losses[: variant.t] + dash_losses, dash, time.perf_counter() - start
        )
        results.append(result)
        log(f"{family.key} {label}: acc {_accuracies(dash_accuracy)} ({result['seconds']:.0f}s)")
    return results


def _accuracies(accuracy: dict[int, float]) -> str:
    return ", ".join(f"{value:.4f}@{step}" for step, value in sorted(accuracy.items()))


def _result(
    family: Family,
    method: str,
    variant: Variant | None,
    accuracy: dict[int, float],
    losses: list[float],
    model: torch.nn.Module,
    seconds: float,
) -> dict[str, Any]:
    result = {
        "task": family.task,
        "r": family.r,
        "seed": family.seed,
        "method": method,
        "variant": dataclasses.asdict(variant) if variant else None,
        "accuracy": {str(step): value for step, value in sorted(accuracy.items())},
        "losses": losses,
        "trainable_parameters": lora_dash.count_trainable_parameters(model),
        "seconds": seconds,
    }
    if variant is not None:
        layers = tsd_layers(model)
        result["positions"] = [position for layer in layers for position in layer["position"]]
        result["mean_abs_delta"] = _mean([abs(d) for layer in layers for d in layer["delta"]])
        result["mean_abs_delta_over_sigma"] = _mean(
            [abs(d) / s for layer in layers for d, s in zip(layer["delta"], layer["sigma"])]
        )
    return result


def spectrum_summary(layers: dict[str, analysis.ChangeRateSpectrum], top: int = 8) -> dict[str, Any]:
    """What the Figure 1 analogue plots: per layer, rates sorted and divided by the largest; where the
    top directions sit in σ's order; the share of the total change rate held by the top ``top``."""
    sorted_rates, positions, shares = [], [], []
    for spectrum in layers.values():
        rates: Tensor = spectrum.rates
        ordered = rates.sort(descending=True).values
        sorted_rates.append((ordered / ordered[0]).tolist())
        index = directions.select_directions(rates, spectrum.eligible, top)
        positions.extend(analysis.relative_singular_value_ranks(index, rates.numel()).tolist())
        shares.append((ordered[:top].sum() / ordered.sum()).item())
    return {"sorted_rates": sorted_rates, "top_positions": positions, "top_share": shares, "top": top}


@torch.no_grad()
def random_update_spectra(targets: str, seed: int, rank: int | None = None) -> dict[str, analysis.ChangeRateSpectrum]:
    """Each targeted layer's change-rate spectrum under a *random* update: the null model for claims 1–2.

    ``ΔW`` is Gaussian, dense (``rank=None``) or a product ``B A`` of Gaussian ``(out, rank)`` and
    ``(rank, in)`` factors like a LoRA update. Its change rates ``|u_iᵀ ΔW v_i| / σ_i`` still divide by
    ``σ_i``, so whatever a trained ΔW shows through that division alone, this one shows too.
    """
    _, encoder = load_minilm()
    generator = torch.Generator().manual_seed(seed)
    spectra = {}
    for name, module in _targets(SentenceClassifier(encoder), targets).items():
        weight = module.weight.detach()
        out_features, in_features = weight.shape
        if rank is None:
            update = torch.randn(out_features, in_features, generator=generator)
        else:
            update = torch.randn(out_features, rank, generator=generator) @ torch.randn(
                rank, in_features, generator=generator
            )
        spectra[name] = analysis.change_rate_spectrum(weight, update)
    return spectra


def prediction_scores(
    predicted: dict[str, analysis.ChangeRateSpectrum], reference: dict[str, analysis.ChangeRateSpectrum]
) -> dict[str, float]:
    """Recall and accuracy of ``predicted``'s rates against ``reference``'s, averaged over layers."""
    recall = [
        analysis.tsd_recall(predicted[name].rates, true.rates, predicted[name].eligible, true.eligible)
        for name, true in reference.items()
    ]
    accuracy = [
        analysis.tsd_accuracy(predicted[name].rates, true.rates, predicted[name].eligible, true.eligible)
        for name, true in reference.items()
    ]
    return {"recall": _mean(recall), "accuracy": _mean(accuracy)}
