"""Gather the study's unit files into ``results.json``, ``tables.md`` and plots.

Every number is a mean ± sample standard deviation over the training seeds; comparisons are paired
(LoRA-Dash minus LoRA within a seed, which shares data order and the whole pre-launch), with the count
of seeds in which the difference is positive.
"""

import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from lora_dash.analysis import ChangeRateSpectrum
from lora_dash.demo.model import MINILM_TARGETS
from lora_dash.reproduce import plan
from lora_dash.reproduce.converged_report import converged_sections
from lora_dash.reproduce.runner import prediction_scores, random_update_spectra, spectrum_summary
from lora_dash.reproduce.stats import mean_std, paired

TASK_NAMES = {
    "rotten_tomatoes": "Rotten Tomatoes (fresh vs rotten)",
    "convention": "2012 conventions (Democratic vs Republican sentence)",
}


def load_units(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All runs and all fine-tuning summaries found under ``out/units``."""
    runs, references = [], []
    for path in sorted((out / "units").glob("*.json")):
        if path.name.startswith("converged-"):  # the converged-budget study has its own report
            continue
        payload = json.loads(path.read_text())
        if path.name.startswith("ft-"):
            references.append(payload)
        else:
            runs.extend(payload["runs"])
    return runs, references


def _select(runs, **match) -> dict[int, dict]:
    """Runs matching every ``key=value``, by seed."""
    return {run["seed"]: run for run in runs if all(run[key] == value for key, value in match.items())}


def _accuracy(run: dict, step: int) -> float:
    return run["accuracy"][str(step)]


def _differences(runs_a: dict[int, dict], runs_b: dict[int, dict], step: int) -> list[float]:
    return [_accuracy(runs_a[seed], step) - _accuracy(runs_b[seed], step) for seed in sorted(runs_a) if seed in runs_b]


def rank_table(runs: list[dict], task: str, short: int, long: int) -> list[str]:
    """Claim 3: LoRA vs LoRA-Dash per rank at both budgets, and LoRA at 4× the rank."""
    lines = [
        "| r | budget | LoRA | LoRA-Dash | Dash − LoRA (seeds with a gain) | LoRA at 4r | Dash − LoRA 4r |",
        "|---|---|---|---|---|---|---|",
    ]
    ranks = sorted({run["r"] for run in runs if run["task"] == task and run["method"] == "LoRA-Dash"})
    for r in ranks:
        lora, dash = _select(runs, task=task, r=r, method="LoRA"), _select(runs, task=task, r=r, method="LoRA-Dash")
        wide = _select(runs, task=task, r=4 * r, method="LoRA")
        for step in (short, long):
            wide_cell = mean_std([_accuracy(run, step) for run in wide.values()]) if wide else "–"
            lines.append(
                f"| {r} | {step} steps | {mean_std([_accuracy(x, step) for x in lora.values()])} | "
                f"{mean_std([_accuracy(x, step) for x in dash.values()])} | {paired(_differences(dash, lora, step))} | "
                f"{wide_cell} | {paired(_differences(dash, wide, step)) if wide else '–'} |"
            )
    return lines


def variant_table(runs: list[dict], task: str, r: int, step: int, title: str, pick) -> list[str]:
    """Claims 4 and 5 and the beyond-the-paper knob: variants at rank ``r`` chosen by ``pick(variant)``."""
    lora = _select(runs, task=task, r=r, method="LoRA")
    default = _select(runs, task=task, r=r, method="LoRA-Dash")  # t, s, strategy, δ lr of the plan
    lines = [
        f"| {title} | accuracy | − LoRA (seeds with a gain) | − LoRA-Dash default | median σ-position | mean abs δ/σ |",
        "|---|---|---|---|---|---|",
    ]
    methods = sorted(
        {
            run["method"]
            for run in runs
            if run["task"] == task and run["r"] == r and run["variant"] and pick(run["variant"])
        },
        key=lambda m: (m != "LoRA-Dash", m),
    )
    for method in methods:
        chosen = _select(runs, task=task, r=r, method=method)
        positions = [p for run in chosen.values() for p in run["positions"]]
        lines.append(
            f"| {method} | {mean_std([_accuracy(x, step) for x in chosen.values()])} | "
            f"{paired(_differences(chosen, lora, step))} | "
            f"{'–' if method == 'LoRA-Dash' else paired(_differences(chosen, default, step))} | "
            f"{statistics.median(positions):.2f} | "
            f"{mean_std([run['mean_abs_delta_over_sigma'] for run in chosen.values()], digits=3)} % |"
        )
    return lines


def prediction_table(runs: list[dict], task: str) -> list[str]:
    """Claim 2: LoRA's recall and accuracy against the full fine-tuning TSDs, by rank and step."""
    recorded = [run for run in runs if run["task"] == task and run["method"] == "LoRA" and "tsd_prediction" in run]
    ranks = sorted({run["r"] for run in recorded})
    steps = sorted({score["step"] for run in recorded for score in run["tsd_prediction"]})
    lines = [
        "| step | " + " | ".join(f"r={r} recall | r={r} accuracy" for r in ranks) + " |",
        "|---" * (1 + 2 * len(ranks)) + "|",
    ]
    for step in steps:
        cells = []
        for r in ranks:
            scores = [
                score for run in recorded if run["r"] == r for score in run["tsd_prediction"] if score["step"] == step
            ]
            cells += [
                mean_std([s["recall"] for s in scores], digits=1),
                mean_std([s["accuracy"] for s in scores], digits=1),
            ]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


NULL_UPDATES = {"a random dense ΔW": None, "a random rank-8 ΔW = B A": 8}


def null_controls(out: Path, references: list[dict]) -> dict[str, list[dict]]:
    """For claims 1 and 2: random updates (one draw per reference seed), their spectrum summaries and
    their "prediction" scores against that seed's full fine-tuning."""
    controls: dict[str, list[dict]] = {label: [] for label in NULL_UPDATES}
    for ref in references:
        saved = torch.load(out / "units" / f"ft-{ref['task']}-seed{ref['seed']}.pt", weights_only=True)
        reference = {
            name: ChangeRateSpectrum(None, None, layer["rates"], layer["eligible"]) for name, layer in saved.items()
        }
        for label, rank in NULL_UPDATES.items():
            spectra = random_update_spectra(MINILM_TARGETS, seed=ref["seed"], rank=rank)
            controls[label].append({"spectrum": spectrum_summary(spectra), **prediction_scores(spectra, reference)})
    return controls


def null_prediction_lines(controls: dict[str, list[dict]]) -> list[str]:
    return [
        f"- {label}: recall {mean_std([x['recall'] for x in values], digits=1)} %, accuracy "
        f"{mean_std([x['accuracy'] for x in values], digits=1)} % (one draw per seed)"
        for label, values in controls.items()
        if values
    ]


def spectrum_lines(references: list[dict], controls: dict[str, list[dict]]) -> list[str]:
    """Claim 1: how concentrated full fine-tuning's change rates are and where its top directions sit,
    beside the same figures for random updates."""
    if not references:
        return ["(no full fine-tuning reference in this run)"]
    lines = [
        f"- full fine-tuning test accuracy: {mean_std([ref['accuracy'] for ref in references])} %",
        "",
        "| update | top-8 share of all change rate | 2nd / 16th rate ÷ largest | top 8 per tenth of the "
        "spectrum (largest σ first) | median position | in the last 1 % |",
        "|---|---|---|---|---|---|",
    ]
    lines.append(_spectrum_row("full fine-tuning", references))
    lines += [_spectrum_row(label, values) for label, values in controls.items() if values]
    return lines + [
        "",
        "Position 0 is the largest σ, 1 the smallest. A uniform spread of change rate over k = 384 "
        "directions would give the top 8 a share of 2.1 %.",
    ]


def _spectrum_row(label: str, summaries: list[dict]) -> str:
    """One row of the claim 1 table from the ``spectrum`` summaries of several seeds."""
    spectra = [summary["spectrum"] for summary in summaries]
    shares = [statistics.mean(spectrum["top_share"]) for spectrum in spectra]
    positions = [p for spectrum in spectra for p in spectrum["top_positions"]]
    tenths = torch.histc(torch.tensor(positions), bins=10, min=0.0, max=1.0) / len(positions)
    second = [statistics.mean(layer[1] for layer in spectrum["sorted_rates"]) for spectrum in spectra]
    sixteenth = [statistics.mean(layer[15] for layer in spectrum["sorted_rates"]) for spectrum in spectra]
    return (
        f"| {label} | {mean_std(shares, digits=1)} % | {mean_std(second, digits=1)} % / "
        f"{mean_std(sixteenth, digits=1)} % | {' '.join(f'{share:.0%}' for share in tenths.tolist())} | "
        f"{statistics.median(positions):.2f} | {sum(p > 0.99 for p in positions) / len(positions):.0%} |"
    )


def save_plots(out: Path, runs: list[dict], references: list[dict], long: int) -> list[str]:
    """``accuracy_by_rank.png``, ``tsd_prediction.png`` and ``ft_spectrum.png``; returns the file names."""
    written = []
    fig = Figure(figsize=(10, 4))
    for ax, task in zip(fig.subplots(1, 2), plan.TASKS):
        for method, color in (("LoRA", "tab:blue"), ("LoRA-Dash", "tab:red")):
            ranks = sorted({run["r"] for run in runs if run["task"] == task and run["method"] == method})
            means = [
                statistics.mean(_accuracy(x, long) for x in _select(runs, task=task, r=r, method=method).values())
                for r in ranks
            ]
            ax.plot(ranks, [100 * m for m in means], "o-", color=color, label=method)
        ax.set(xscale="log", xlabel="rank r", ylabel=f"test accuracy after {long} steps (%)", title=TASK_NAMES[task])
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_rank.png", dpi=110)
    written.append("accuracy_by_rank.png")

    recorded = [run for run in runs if run["method"] == "LoRA" and "tsd_prediction" in run]
    if recorded:
        fig = Figure(figsize=(10, 4))
        for ax, metric in zip(fig.subplots(1, 2), ("recall", "accuracy")):
            for r in sorted({run["r"] for run in recorded}):
                steps = [score["step"] for score in next(run for run in recorded if run["r"] == r)["tsd_prediction"]]
                values = [
                    statistics.mean(
                        score[metric]
                        for run in recorded
                        if run["r"] == r
                        for score in run["tsd_prediction"]
                        if score["step"] == step
                    )
                    for step in steps
                ]
                ax.plot(steps, values, "o-", label=f"r = {r}")
            ax.set(
                xlabel="LoRA optimizer step",
                ylabel=metric,
                ylim=(0, 1),
                title=f"TSD {metric} of LoRA's ΔW vs full fine-tuning",
            )
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "tsd_prediction.png", dpi=110)
        written.append("tsd_prediction.png")

    if references:
        fig = Figure(figsize=(10, 4))
        left, right = fig.subplots(1, 2)
        layers = [layer for ref in references for layer in ref["spectrum"]["sorted_rates"]]
        for layer in layers:
            left.plot(layer[:64], color="tab:gray", alpha=0.15, linewidth=0.8)
        depth = min(64, min(map(len, layers)))
        left.plot([statistics.mean(layer[i] for layer in layers) for i in range(depth)], color="black", label="mean")
        left.set(xlabel="direction, by change rate", ylabel="ρ / max ρ", title="Full fine-tuning: sorted change rates")
        left.legend()
        right.hist([p for ref in references for p in ref["spectrum"]["top_positions"]], bins=20, range=(0, 1))
        right.set(
            xlabel="position in σ's order (0 = largest, 1 = smallest)",
            ylabel="top-8 directions",
            title="Where full fine-tuning's top directions sit",
        )
        fig.tight_layout()
        fig.savefig(out / "ft_spectrum.png", dpi=110)
        written.append("ft_spectrum.png")
    return written


def write_report(out: Path, quick: bool, seeds: tuple[int, ...], run_seconds: float) -> list[str]:
    """Write ``results.json``, ``tables.md`` and the plots for every unit under ``out``."""
    mode = plan.QUICK if quick else plan.FULL
    short, long = mode.settings.short_steps, mode.settings.steps
    runs, references = load_units(out)
    sections = [
        f"# LoRA-Dash reproduction study: tables ({'quick' if quick else 'full'} run)",
        "",
        f"Seeds {list(seeds)}; {len(runs)} runs; accuracies in % as mean ± sample std over seeds; differences in "
        f"points, paired by seed. Budgets: {short} and {long} optimizer steps of batch {mode.settings.batch_size}, "
        f"AdamW lr {mode.settings.lr:g}, α = 2r, launch after step t = {mode.t}, s = 8 unless stated.",
        "",
    ]
    for task in plan.TASKS:
        if any(run["task"] == task for run in runs):
            split = plan.load_task(task, mode)
            majority = max(split.test_labels.float().mean().item(), 1 - split.test_labels.float().mean().item())
            sections += [
                f"## Claim 3 — LoRA vs LoRA-Dash by rank: {TASK_NAMES[task]}",
                "",
                f"{len(split.train_texts):,} training and {len(split.test_texts):,} test texts; always "
                f"predicting the majority class scores {100 * majority:.2f} %.",
                "",
                *rank_table(runs, task, short, long),
                "",
            ]
    task = "rotten_tomatoes"
    if any(run["variant"] and run["task"] == task and run["r"] == 8 for run in runs):
        sections += [
            f"## Claim 4 — which directions to dash (r = 8, {long} steps, {TASK_NAMES[task]})",
            "",
            *variant_table(
                runs,
                task,
                8,
                long,
                "directions",
                lambda v: v["t"] == mode.t and v["s"] == 8 and v["delta_lr_scale"] == 1.0,
            ),
            "",
            f"## Claim 5 — robustness to t and s (r = 8, {long} steps)",
            "",
            *variant_table(
                runs,
                task,
                8,
                long,
                "launch step / directions",
                lambda v: v["strategy"] == "tsd" and v["delta_lr_scale"] == 1.0,
            ),
            "",
            f"## Beyond the paper — δ's learning rate (r = 8, {long} steps)",
            "",
            *variant_table(
                runs,
                task,
                8,
                long,
                "δ learning rate",
                lambda v: v["strategy"] == "tsd" and v["t"] == mode.t and v["s"] == 8,
            ),
            "",
        ]
    controls = null_controls(out, references)
    sections += [
        "## Claim 1 — full fine-tuning's change-rate spectrum (Rotten Tomatoes)",
        "",
        *spectrum_lines(references, controls),
        "",
        "## Claim 2 — LoRA's ΔW as a predictor of full fine-tuning's TSDs (mean over the 36 layers, %)",
        "",
        "Recall: share of full fine-tuning's top 4 inside LoRA's top 8; accuracy: share of LoRA's top 8 "
        "inside full fine-tuning's top 16. A random top 8 of k = 384 directions scores 8/384 = 2.1 % "
        "recall and 16/384 = 4.2 % accuracy on average. The control: the same scores for an update that "
        "learned nothing:",
        "",
        *null_prediction_lines(controls),
        "",
        *prediction_table(runs, task),
        "",
    ]
    converged_lines, converged_result = converged_sections(out, quick)
    sections += converged_lines
    environment = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    training = sum(run["seconds"] for run in runs) + sum(ref["seconds"] for ref in references)
    sections += [
        f"Environment: {environment}. Time summed over every run (its training steps and the evaluations "
        f"during it; model loading excluded): {training / 60:.0f} min. Wall time of the invocation that "
        f"wrote this file: {run_seconds / 60:.0f} min (units already on disk are not rerun)."
    ]
    (out / "tables.md").write_text("\n".join(sections) + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "quick": quick,
                "seeds": list(seeds),
                "settings": mode.settings.__dict__,
                "runs": runs,
                "full_fine_tuning": references,
                "converged": converged_result,
                "environment": environment,
                "seconds": run_seconds,
            }
        )
        + "\n"
    )
    return ["results.json", "tables.md", *save_plots(out, runs, references, long)]
