"""The converged-budget study's tables: claims 1 and 2 against the isotropic null, and the dash by strategy.

Every test here asks one question of the saved coordinates ``c_i = u_iᵀ ΔW v_i``: does the update say
more than an isotropic update (a Gaussian ``ΔW``, or Gaussian ``B A`` of LoRA's rank) would? The null
and its p-value are :func:`lora_dash.analysis.null_evidence`'s; the null of claim 2 (how much a
random update's top 8 overlaps the reference's) is sampled the same way, from
:func:`lora_dash.analysis.null_coordinates`.
"""

import json
import re
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora_dash import analysis, directions
from lora_dash.reproduce import converged
from lora_dash.reproduce.stats import mean_std, paired

ALPHA = 0.05  # the threshold at which a layer counts as "flagged"
STRATEGY_NAMES = {"tsd": "change rate (tsd)", "coordinate": "coordinate size (coordinate)"}


def load_converged_units(units: Path) -> dict[str, dict[str, Any]]:
    """Every finished unit: ``{key: {"summary": JSON, "coords": {step: {layer: c}}}}``."""
    found = {}
    for path in sorted(units.glob("converged-*.json")):
        found[path.stem] = {
            "summary": json.loads(path.read_text()),
            "coords": converged.load_trajectory(path.with_suffix(".pt")),
        }
    return found


def _scores(coords: Tensor, sigma: Tensor, eligible: Tensor, strategy: str) -> Tensor:
    """What a strategy ranks by: the change rates, or ``|c|`` (0 off the eligible directions)."""
    if strategy == "tsd":
        return directions.change_rates(coords, sigma, eligible)
    return torch.where(eligible, coords.abs(), torch.zeros_like(coords))


def layer_evidence(
    coords: dict[str, Tensor],
    bases: dict[str, tuple[Tensor, Tensor]],
    strategy: str,
    factor_rank: int | None,
    draws: int,
    s: int = 8,
) -> dict[str, Any]:
    """:func:`analysis.null_evidence` for every layer; summarized over layers.

    Returns the per-layer p-values and shares, the null's mean share, the median σ-position of the
    selected directions and (``"tsd"``) the mean null probability of selecting them.
    """
    p_values, shares, null_means, positions, chance = [], [], [], [], []
    for number, (name, c) in enumerate(coords.items()):
        sigma, eligible = bases[name]
        generator = torch.Generator().manual_seed(number)
        evidence = analysis.null_evidence(sigma, c, eligible, s, 0.0, factor_rank, draws, generator, strategy)
        p_values.append(evidence.p_value)
        shares.append(evidence.share)
        null_means.append(evidence.null_mean)
        positions += analysis.relative_singular_value_ranks(evidence.index, c.numel()).tolist()
        chance.append(evidence.selection_probability.mean().item())
    return {
        "p_values": p_values,
        "share": statistics.mean(shares),
        "null_share": statistics.mean(null_means),
        "flagged": sum(p <= ALPHA for p in p_values),
        "layers": len(p_values),
        "median_position": statistics.median(positions),
        "selection_probability": statistics.mean(chance),
    }


def null_overlaps(
    reference: dict[str, Tensor],
    bases: dict[str, tuple[Tensor, Tensor]],
    strategy: str,
    factor_rank: int | None,
    draws: int,
    seed: int = 0,
) -> dict[str, Tensor]:
    """The paper's recall and accuracy against ``reference``'s top directions of ``draws`` isotropic
    updates (rank ``factor_rank``), ranked by ``strategy``'s score and averaged over layers.

    Returns ``{"recall": (draws,), "accuracy": (draws,)}``: the null law of a layer-averaged score.
    """
    generator = torch.Generator().manual_seed(seed)
    null = {"recall": torch.zeros(draws, dtype=torch.float64), "accuracy": torch.zeros(draws, dtype=torch.float64)}
    for name, c in reference.items():
        sigma, eligible = bases[name]
        noise = analysis.null_coordinates(draws, c.numel(), factor_rank, generator)
        true = _scores(c, sigma, eligible, strategy)
        recall, accuracy = top_overlaps(_scores(noise, sigma.double(), eligible, strategy), true, eligible)
        null["recall"] += recall / len(reference)
        null["accuracy"] += accuracy / len(reference)
    return null


def overlap_with_null(
    predicted: dict[str, Tensor],
    reference: dict[str, Tensor],
    bases: dict[str, tuple[Tensor, Tensor]],
    strategy: str,
    null: dict[str, Tensor],
) -> dict[str, float]:
    """The paper's recall and accuracy of ``predicted``'s top 8 against ``reference``'s, layer-averaged,
    beside ``null`` (:func:`null_overlaps` of the same reference and strategy).

    ``p`` is the share of null draws whose score reaches the observed one, as ``(1 + #) / (1 + draws)``.
    """
    observed = {"recall": [], "accuracy": []}
    for name, c in predicted.items():
        sigma, eligible = bases[name]
        mine, true = _scores(c, sigma, eligible, strategy), _scores(reference[name], sigma, eligible, strategy)
        observed["recall"].append(analysis.tsd_recall(mine, true, eligible, eligible))
        observed["accuracy"].append(analysis.tsd_accuracy(mine, true, eligible, eligible))
    summary = {}
    for measure, values in observed.items():
        value, draws = statistics.mean(values), null[measure]
        summary[measure] = value
        summary[f"null_{measure}"] = draws.mean().item()
        summary[f"null_{measure}_95"] = draws.quantile(0.95).item()
        summary[f"p_{measure}"] = (1 + int((draws >= value - 1e-12).sum())) / (1 + draws.numel())
    return summary


def top_overlaps(scores: Tensor, true: Tensor, eligible: Tensor) -> tuple[Tensor, Tensor]:
    """Row by row, :func:`analysis.tsd_recall` and :func:`analysis.tsd_accuracy` of ``scores: (draws, k)``
    against ``true: (k,)``, both restricted to ``eligible``: two ``(draws,)`` tensors."""
    masked = scores.masked_fill(~eligible, -torch.inf)
    predicted = masked.topk(8, dim=1).indices
    true_order = true.masked_fill(~eligible, -torch.inf).topk(16).indices
    recall = torch.isin(predicted, true_order[:4]).sum(1) / 4
    accuracy = torch.isin(predicted, true_order).sum(1) / 8
    return recall.double(), accuracy.double()


def _rank(key: str) -> int | None:
    match = re.fullmatch(r"converged-r(\d+)-seed\d+", key)
    return int(match.group(1)) if match else None


def _by_seed(units: dict[str, dict], prefix: str) -> dict[int, dict]:
    """The units whose key starts with ``prefix``, by their seed (the key's ``seed{n}`` ending)."""
    return {int(key.rsplit("seed", 1)[1]): unit for key, unit in units.items() if key.startswith(prefix)}


def converged_sections(out: Path, quick: bool) -> tuple[list[str], dict]:
    """The tables.md lines and the results.json entry of the converged-budget study ([] if no unit ran).

    Claim 1's "before convergence" row is the main study's 200-step fine-tuning (``ft-…pt`` under
    ``out/units``: ``{layer: {"rates", "eligible"}}``).
    """
    settings = converged.QUICK if quick else converged.FULL
    units = load_converged_units(out / "units")
    if not units:
        return [], {}
    bases = converged.pretrained_bases()
    ft = _by_seed(units, "converged-ft-")
    ranks = sorted({rank for key in units if (rank := _rank(key)) is not None})
    lines = [
        "## Claims 1–2 at a converged budget, against the isotropic null",
        "",
        f"{settings.epochs} epochs over {settings.n_train:,} training reviews (batch {settings.batch_size}), "
        f"linear warm-up over the first {settings.warmup_share:.0%} of steps then linear decay; full fine-tuning "
        f"at {settings.ft_lr:g} (head {settings.lr:g}), LoRA and LoRA-Dash at {settings.lr:g}, α = 2r, "
        f"t = {settings.t}, s = {settings.s}; {settings.n_test:,} test reviews. A layer is flagged when its "
        f"null p-value is ≤ {ALPHA} ({settings.draws} null draws): an update that is isotropic noise is flagged "
        f"in {ALPHA:.0%} of layers.",
        "",
    ]
    result: dict[str, Any] = {"settings": settings.__dict__}

    # Accuracy: full fine-tuning, LoRA, and the two forks.
    lines += [
        "| method | test accuracy | − LoRA (seeds with a gain) | median σ-position of the dashed directions | "
        "mean abs δ | mean abs δ/σ |",
        "|---|---|---|---|---|---|",
    ]
    if ft:
        ft_accuracy = [unit["summary"]["accuracy"] for unit in ft.values()]
        lines.append(f"| full fine-tuning | {mean_std(ft_accuracy)} | – | – | – | – |")
        result["full_fine_tuning_accuracy"] = ft_accuracy
    for r in ranks:
        families = _by_seed(units, f"converged-r{r}-")
        runs = [run for unit in families.values() for run in unit["summary"]["runs"]]
        steps = str(next(iter(families.values()))["summary"]["steps"])
        lora = {run["seed"]: run for run in runs if run["method"] == "LoRA"}
        for method in sorted({run["method"] for run in runs}, key=lambda m: (m != "LoRA", m)):
            chosen = {run["seed"]: run for run in runs if run["method"] == method}
            accuracy = [run["accuracy"][steps] for run in chosen.values()]
            differences = [chosen[s]["accuracy"][steps] - lora[s]["accuracy"][steps] for s in chosen if s in lora]
            positions = [p for run in chosen.values() for p in run.get("positions") or []]
            where = f"{statistics.median(positions):.2f}" if positions else "–"
            gain = "–" if method == "LoRA" else paired(differences)
            delta = [run["mean_abs_delta"] for run in chosen.values() if "mean_abs_delta" in run]
            ratio = [run["mean_abs_delta_over_sigma"] for run in chosen.values() if "mean_abs_delta" in run]
            sizes = f"{mean_std(delta, scale=1, digits=4)} | {mean_std(ratio, digits=3)} %" if delta else "– | –"
            lines.append(f"| {method} r = {r} | {mean_std(accuracy)} | {gain} | {where} | {sizes} |")
            result.setdefault("accuracy", {})[f"{method} r={r}"] = accuracy
    lines.append("")

    # Claim 1: is the fine-tuning update more concentrated than noise, before and after convergence?
    lines += [
        "**Claim 1: the fine-tuning update's top 8 against the dense null** (per layer; mean over layers "
        "and seeds; flagged layers summed over seeds)",
        "",
        "| update | ranked by | top-8 share | null share | flagged layers | median σ-position of the top 8 |",
        "|---|---|---|---|---|---|",
    ]
    before = {}
    for path in sorted((out / "units").glob("ft-rotten_tomatoes-seed*.pt")):
        spectra = torch.load(path, weights_only=True)  # ρ = |c| / σ with ε = 0, so |c| = ρ σ
        before[int(path.stem.rsplit("seed", 1)[1])] = {
            name: layer["rates"] * bases[name][0] for name, layer in spectra.items()
        }
    rows = [("main study's reference: 200 steps × 16, constant rate", before)] if before else []
    if ft:
        rows.append(
            (f"converged fine-tuning at step {settings.t}", {seed: u["coords"][settings.t] for seed, u in ft.items()})
        )
        rows.append(
            (f"converged fine-tuning, end (step {_last(ft)})", {seed: u["coords"][_last(ft)] for seed, u in ft.items()})
        )
    claim1 = {}
    for label, by_seed in rows:
        for strategy in ("tsd", "coordinate"):
            evidence = [layer_evidence(c, bases, strategy, None, settings.draws) for c in by_seed.values()]
            claim1[f"{label} / {strategy}"] = evidence
            lines.append(_evidence_row(label, strategy, evidence))
    result["claim1"] = claim1
    lines.append("")

    # Claim 2: does LoRA's update predict the converged fine-tuning's directions better than noise?
    if ft:
        reference = {seed: unit["coords"][_last(ft)] for seed, unit in ft.items()}
        lines += [
            "**Claim 2: LoRA's top 8 against the converged fine-tuning's** (recall: its top 4 found in LoRA's "
            "top 8; accuracy: LoRA's top 8 inside its top 16; mean over layers and seeds, %). The null: "
            f"the same scores for Gaussian B A of LoRA's rank ({settings.draws} draws; mean, 95th percentile); "
            "p: the largest over seeds.",
            "",
            "| r | step | ranked by | recall | null recall (95 %) | p | accuracy | null accuracy (95 %) | p |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        claim2 = {}
        for r in ranks:
            families = {seed: unit for seed, unit in _by_seed(units, f"converged-r{r}-").items() if seed in reference}
            # The null depends on the reference, not on the step: drawn once per seed and strategy.
            nulls = {
                (seed, strategy): null_overlaps(reference[seed], bases, strategy, r, settings.draws, seed)
                for seed in families
                for strategy in ("tsd", "coordinate")
            }
            for step in sorted({step for unit in families.values() for step in unit["coords"]}):
                for strategy in ("tsd", "coordinate"):
                    scores = [
                        overlap_with_null(unit["coords"][step], reference[seed], bases, strategy, nulls[seed, strategy])
                        for seed, unit in families.items()
                    ]
                    if scores:
                        claim2[f"r={r} step={step} {strategy}"] = scores
                        lines.append(_overlap_row(r, step, strategy, scores))
        result["claim2"] = claim2
        lines.append("")

    # The diagnostic on LoRA's own update, at launch and at the end.
    lines += [
        "**The diagnostic on LoRA's update** (`model_null_evidence`'s test, null: Gaussian B A of rank r)",
        "",
        "| update | ranked by | top-8 share | null share | flagged layers | median σ-position of the top 8 |",
        "|---|---|---|---|---|---|",
    ]
    diagnostic = {}
    for r in ranks:
        families = _by_seed(units, f"converged-r{r}-")
        last = _last(families)
        for step, name in ((settings.t, "at launch"), (last, "end")):
            label = f"LoRA r = {r}, step {step} ({name})"
            for strategy in ("tsd", "coordinate"):
                evidence = [
                    layer_evidence(unit["coords"][step], bases, strategy, r, settings.draws)
                    for unit in families.values()
                ]
                diagnostic[f"{label} / {strategy}"] = evidence
                lines.append(_evidence_row(label, strategy, evidence))
    result["diagnostic"] = diagnostic
    lines.append("")
    seconds = sum(unit["summary"].get("seconds", 0) for unit in units.values()) + sum(
        run["seconds"] for unit in units.values() for run in unit["summary"].get("runs", [])
    )
    lines.append(f"Converged-budget units: {len(units)}; their runs' own clocks sum to {seconds / 60:.0f} min.")
    lines.append("")
    return lines, result


def _last(units: dict[int, dict]) -> int:
    return max(max(unit["coords"]) for unit in units.values())


def _evidence_row(label: str, strategy: str, evidence: list[dict]) -> str:
    flagged = sum(e["flagged"] for e in evidence)
    layers = sum(e["layers"] for e in evidence)
    return (
        f"| {label} | {STRATEGY_NAMES[strategy]} | {mean_std([e['share'] for e in evidence], digits=1)} % | "
        f"{mean_std([e['null_share'] for e in evidence], digits=1)} % | {flagged} / {layers} | "
        f"{statistics.median([e['median_position'] for e in evidence]):.2f} |"
    )


def _overlap_row(r: int, step: int, strategy: str, scores: list[dict]) -> str:
    cells = []
    for measure in ("recall", "accuracy"):
        cells += [
            mean_std([s[measure] for s in scores], digits=1),
            f"{mean_std([s[f'null_{measure}'] for s in scores], digits=1)} "
            f"({mean_std([s[f'null_{measure}_95'] for s in scores], digits=1)})",
            f"{max(s[f'p_{measure}'] for s in scores):.3f}",
        ]
    return f"| {r} | {step} | {STRATEGY_NAMES[strategy]} | " + " | ".join(cells) + " |"
