"""What the demo prints and saves: the comparison table, the TSD report, PNG plots and a JSON."""

import json
import re
from pathlib import Path

import torch
from matplotlib.figure import Figure  # figures straight to files: no pyplot state, no display backend

import lora_dash
from lora_dash import analysis, directions
from lora_dash.demo.train import RunResult, TrainConfig

# Short names for the six linear layers of a BERT block, in the order they run.
LAYER_KINDS = {
    r"attention\.self\.query": "query",
    r"attention\.self\.key": "key",
    r"attention\.self\.value": "value",
    r"attention\.output\.dense": "attn out",
    r"intermediate\.dense": "ffn in",
    r"output\.dense": "ffn out",
}


def layer_kind(name: str) -> str:
    """``"encoder.encoder.layer.3.intermediate.dense"`` → ``"ffn in"`` (the name itself if unknown)."""
    for pattern, kind in LAYER_KINDS.items():
        if re.search(rf"(^|\.){pattern}$", name):
            return kind
    return name


def short_name(name: str) -> str:
    """``"encoder.encoder.layer.3.intermediate.dense"`` → ``"3 ffn in"``, for plot labels."""
    block = re.search(r"layer\.(\d+)\.", name)
    return f"{block.group(1)} {layer_kind(name)}" if block else name


@torch.no_grad()
def tsd_layers(model: torch.nn.Module) -> list[dict]:
    """Per launched layer: the selected directions' σ-ranks, their σ and the trained δ.

    ``rank`` is 1-based in σ's descending order (1 = largest σ, k = smallest), ``position`` the same
    from 0 (largest) to 1 (smallest); ``σ_i`` is recovered as the coordinate of ``W`` itself on the
    stored direction, ``u_iᵀ W v_i``.
    """
    layers = []
    for name, layer in lora_dash.dash_layers(model).items():
        if not layer.launched:
            continue
        sigma = directions.coordinates(layer.base_weight(), layer.dash_U, layer.dash_V)
        k = min(layer.in_features, layer.out_features)
        layers.append(
            {
                "name": name,
                "kind": layer_kind(name),
                "k": k,
                "rank": (layer.dash_index + 1).tolist(),
                "position": analysis.relative_singular_value_ranks(layer.dash_index, k).tolist(),
                "sigma": sigma.tolist(),
                "delta": layer.dash_delta.tolist(),
            }
        )
    return layers


def tsd_summary(layers: list[dict]) -> dict:
    """Totals over all layers: the rank histogram by tenth of the spectrum and how far δ moved."""
    relative = torch.tensor([position for layer in layers for position in layer["position"]])
    delta = torch.tensor([d for layer in layers for d in layer["delta"]]).abs()
    sigma = torch.tensor([s for layer in layers for s in layer["sigma"]])
    tenths = torch.histc(relative, bins=10, min=0.0, max=1.0)
    top = max((abs(d), layer["name"], rank) for layer in layers for d, rank in zip(layer["delta"], layer["rank"]))
    top_s = [sorted(layer["rank"]) == list(range(1, len(layer["rank"]) + 1)) for layer in layers]
    return {
        "directions": len(delta),
        "layers": len(layers),
        "share_per_tenth_of_spectrum": (tenths / len(relative)).tolist(),
        "median_relative_rank": relative.median().item(),
        "layers_choosing_their_s_largest_sigma": sum(top_s),
        "mean_abs_delta": delta.mean().item(),
        "max_abs_delta": top[0],
        "max_abs_delta_at": {"layer": top[1], "rank": top[2]},
        "mean_abs_delta_over_sigma": (delta / sigma).mean().item(),
    }


def format_table(results: list[RunResult]) -> str:
    """method | test accuracy | trainable parameters | wall time (train + eval) | training steps/s."""
    lines = [f"{'method':<10} {'test acc':>8} {'trainable params':>17} {'wall time':>10} {'steps/s':>8}"]
    for result in results:
        steps = len(result.losses)
        wall = result.train_seconds + result.eval_seconds
        lines.append(
            f"{result.method:<10} {result.accuracy:>8.4f} {result.trainable_parameters:>17,} "
            f"{wall:>9.1f}s {steps / result.train_seconds:>8.2f}"
        )
    return "\n".join(lines)


def format_tsd_report(layers: list[dict], summary: dict) -> str:
    """A few lines: directions per layer, where in the spectrum they sit, how far δ moved."""
    s = len(layers[0]["rank"])
    ks = sorted({layer["k"] for layer in layers})
    lines = [
        f"Task-specific directions: {s} per layer x {summary['layers']} layers = {summary['directions']} "
        f"(k = {'/'.join(map(str, ks))} singular values per layer; rank 1 = largest σ)",
        "share of the selected directions per tenth of the spectrum, largest σ first:",
        "  " + " ".join(f"{share:>4.0%}" for share in summary["share_per_tenth_of_spectrum"]),
        f"median position {summary['median_relative_rank']:.2f} of the way from the largest to the smallest σ; "
        f"{summary['layers_choosing_their_s_largest_sigma']} layers chose exactly their {s} largest σ",
        f"{'layer type':<10} {'ranks: median [min, max]':>25} {'mean |δ|':>9} {'max |δ|':>8} {'mean |δ|/σ':>11}",
    ]
    for kind in dict.fromkeys(layer["kind"] for layer in layers):
        group = [layer for layer in layers if layer["kind"] == kind]
        ranks = torch.tensor([rank for layer in group for rank in layer["rank"]], dtype=torch.float)
        delta = torch.tensor([d for layer in group for d in layer["delta"]]).abs()
        sigma = torch.tensor([v for layer in group for v in layer["sigma"]])
        spread = f"{ranks.median():.0f} [{ranks.min():.0f}, {ranks.max():.0f}]"
        lines.append(
            f"{kind:<10} {spread:>25} {delta.mean():>9.4f} {delta.max():>8.4f} {(delta / sigma).mean():>11.2%}"
        )
    at = summary["max_abs_delta_at"]
    lines.append(
        f"δ moved: mean |δ| = {summary['mean_abs_delta']:.4f}, max |δ| = {summary['max_abs_delta']:.4f} "
        f"({short_name(at['layer'])}, rank {at['rank']}), "
        f"mean |δ|/σ = {summary['mean_abs_delta_over_sigma']:.2%}"
    )
    return "\n".join(lines)


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at every step (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def save_plots(out: Path, results: list[RunResult], config: TrainConfig, layers: list[dict]) -> list[str]:
    """``loss.png``, ``ranks.png``, ``delta.png`` in ``out``; returns their file names."""
    window = max(1, config.steps // 25)
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    # LoRA wider and underneath: the two curves coincide until the launch.
    for result, color, width in zip(results, ("tab:blue", "tab:red"), (3.0, 1.2)):
        steps = range(1, len(result.losses) + 1)
        ax.plot(steps, result.losses, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(
            steps,
            moving_average(result.losses, window),
            color=color,
            linewidth=width,
            label=f"{result.method} ({window}-step mean)",
        )
    ax.axvline(config.t, color="black", linestyle="--", linewidth=1, label=f"launch (t = {config.t})")
    ax.set(
        xlabel="optimizer step", ylabel="training loss (cross-entropy)", title="Training loss: identical until launch"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    by_kind: dict[str, list[float]] = {}
    for layer in layers:
        by_kind.setdefault(layer["kind"], []).extend(layer["position"])
    ax.hist(list(by_kind.values()), bins=20, range=(0.0, 1.0), stacked=True, label=list(by_kind))
    ax.set(
        xlabel="position in W's spectrum (0 = largest σ, 1 = smallest)",
        ylabel="selected directions",
        title=f"Where the task-specific directions sit ({sum(map(len, by_kind.values()))} directions)",
    )
    ax.legend(title="layer type")
    fig.tight_layout()
    fig.savefig(out / "ranks.png", dpi=120)

    fig = Figure(figsize=(11, 4.5))
    ax = fig.subplots()
    for i, layer in enumerate(layers):
        ax.scatter([i] * len(layer["delta"]), [abs(d) for d in layer["delta"]], s=12, color="tab:red", alpha=0.6)
    ax.set_xticks(range(len(layers)), [short_name(layer["name"]) for layer in layers], rotation=90, fontsize=7)
    ax.set(ylabel="|δ| after training", title="How far each selected singular value moved (one dot per direction)")
    fig.tight_layout()
    fig.savefig(out / "delta.png", dpi=120)
    return ["loss.png", "ranks.png", "delta.png"]


def save_json(path: Path, numbers: dict) -> None:
    path.write_text(json.dumps(numbers, indent=1) + "\n")
