"""Measurements, ratios against the targets, and their presentation: a printed table and a markdown file."""

import datetime
import importlib.metadata
import math
import os
import platform
from dataclasses import dataclass

import torch

LAYER_STEP = "Layer training step"
MODEL_STEP = "Model training step (all-MiniLM-L6-v2, 36 adapted linears)"
MERGED_INFERENCE = "Merged inference"
LAUNCH_TIME = "Launch (all-MiniLM-L6-v2)"
TENSOR_MEMORY = "Training memory by tensor (exact bytes)"
MEMORY = "Peak memory (RSS growth)"
SECTIONS = (LAYER_STEP, MODEL_STEP, MERGED_INFERENCE, LAUNCH_TIME, TENSOR_MEMORY, MEMORY)

#: What each section measures, for the reader of the report.
SECTION_NOTES = {
    LAYER_STEP: "One training step of one adapted layer: forward on `x: (tokens, in)` (requires grad, as if "
    "earlier layers made it), `y.backward(g)`, AdamW step. r = s = 8, α = 2r. The floor is the frozen "
    "`nn.Linear` alone, forward and backward to `x`. *Ours dash* is our layer after `launch()`; the dense dash "
    "restates the authors' formulation (the `(out, in)` matrix `U_s diag(δ) V_sᵀ` built every forward).",
    MODEL_STEP: "One training step of a MiniLM sentence classifier (cross-entropy, AdamW on adapters and head). "
    "The floor is the frozen encoder's forward plus a step of the head alone: no backward through the "
    "encoder, so it is a lower bound rather than a like-for-like floor.",
    MERGED_INFERENCE: "Forward under `torch.no_grad()` of our launched layer after `merge()`, against a plain "
    "`nn.Linear` of the same shape. A second, identical `nn.Linear` is timed in the same rounds as a third "
    "contender (an A/A pair): the per-round ratios of the two plain layers have a true median of 1, and the "
    "A/A band is how far from 1 the distribution-free 95 % interval of their median reaches. A ratio with "
    "a band is judged PASS only if it meets its target by more than the band, MISS only if it misses by "
    "more than the band, and UNRESOLVED otherwise (the difference is within what the same layer shows "
    "against itself).",
    LAUNCH_TIME: "`lora_dash.launch(model)` on a fresh copy of a pre-launch model (copied outside the timed "
    "region), against the bare `torch.linalg.svd(W, full_matrices=False)` of the same weights (all 36 linears; "
    "the first attention block's three with `--quick`).",
    TENSOR_MEMORY: "Every tensor a training step keeps, counted in bytes, each storage once, in the memory "
    "children after their measured steps: *module* is every parameter and buffer (the frozen weight "
    "included), *gradients* the trained parameters' `.grad` after backward, *optimizer state* AdamW's "
    "moments and step counts, *saved for backward* every tensor autograd keeps from the forward "
    "(`torch.autograd.graph.saved_tensors_hooks`) other than the module's own, views as their whole "
    "storage. The targets are judged on *step* = gradients + optimizer state + saved for backward: what a step "
    "holds between its forward and its backward on top of the loaded module, to the byte. It leaves out "
    "transients (intermediate results the forward does not save, the backward's intermediate gradients, "
    "kernels' workspace), which the RSS peak below includes.",
    MEMORY: "Each contender in fresh child processes, one at a time: the peak RSS after the operation "
    "(`VmHWM`, the kernel counter behind `ru_maxrss`, which itself would carry the parent's peak across fork "
    "and exec) minus the RSS (`/proc/self/statm`) just before it, after `malloc_trim(0)` and a reset of the "
    "kernel's peak mark (`/proc/self/clear_refs`), so building the contender is not counted. A tiny training "
    "step runs first so one-time runtime setup is charged to nobody. Training: the first steps of the "
    "contender the timing used (saved by the parent), the first creating AdamW's state. Launch: the "
    "pre-launch layers of the launch section, saved by the parent and launched in the child. Every contender "
    "is measured in several children, in rotation; the table shows the median and the range over them. "
    "That range is the RSS measurement's own noise, so the memory targets are judged on the exact count above.",
}


@dataclass(frozen=True)
class Measurement:
    """One median time (``unit="ms"``), memory growth (``"MiB"``) or byte count (``"B"``) of one contender
    in one case; ``spread`` is the ``(lowest, highest)`` of the samples behind a median, ``parts`` the
    named components of a total."""

    section: str
    case: str
    contender: str
    value: float
    unit: str
    spread: tuple[float, float] | None = None
    parts: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Target:
    """A bound on a ratio: ``ratio <= bound`` (``at_most``) or ``ratio >= bound``."""

    bound: float
    at_most: bool = True

    def met(self, value: float) -> bool:
        return value <= self.bound if self.at_most else value >= self.bound

    def __str__(self) -> str:
        return f"{'≤' if self.at_most else '≥'} {self.bound:g}"


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of two contenders' measurements in one case, with its target if any and
    the noise ``band`` of such a ratio if measured (see :func:`lora_dash.bench.harness.aa_band`)."""

    section: str
    case: str
    numerator: str
    denominator: str
    value: float
    target: Target | None = None
    band: float | None = None

    @property
    def verdict(self) -> str:
        """``PASS``/``MISS`` against the target; with a band, only by more than the band, else ``UNRESOLVED``."""
        if self.target is None:
            return "—"
        band = self.band or 0.0
        # The two ends of value ± band, the one farther from meeting the target first.
        worst, best = (
            (self.value + band, self.value - band) if self.target.at_most else (self.value - band, self.value + band)
        )
        if self.target.met(worst):
            return "PASS"
        return "UNRESOLVED" if self.target.met(best) else "MISS"


def ratio(
    measurements: list[Measurement],
    section: str,
    case: str,
    numerator: str,
    denominator: str,
    target: Target | None = None,
    band: float | None = None,
) -> Ratio:
    """The ratio of two measurements already taken; NaN where the denominator is not positive."""
    values = {(m.section, m.case, m.contender): m.value for m in measurements}
    top, bottom = values[section, case, numerator], values[section, case, denominator]
    return Ratio(section, case, numerator, denominator, top / bottom if bottom > 0 else math.nan, target, band)


def environment() -> dict[str, str]:
    """The machine and the versions the numbers were taken with."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": version("peft"),
        "transformers": version("transformers"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def load_average() -> str:
    """The system's load averages over 1, 5 and 15 minutes (``os.getloadavg``), or ``"unknown"``."""
    try:
        return ", ".join(f"{load:.2f}" for load in os.getloadavg())
    except OSError:
        return "unknown"


def _quantity(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if unit == "B" else f"{value:.3f} {unit}"


def _measured(m: Measurement) -> str:
    if m.spread is None:
        return _quantity(m.value, m.unit)
    return f"{_quantity(m.value, m.unit)} ({m.spread[0]:.3f}–{m.spread[1]:.3f})"


def _measurement_table(measurements: list[Measurement], section: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a section's measurements: one column per part (if any), then the measured value."""
    rows = [m for m in measurements if m.section == section]
    part_names = list(dict.fromkeys(name for m in rows for name, _ in m.parts))
    header = ["case", "contender", *part_names, "measured" if not part_names else "step (judged)"]
    return header, [
        [m.case, m.contender, *(_quantity(dict(m.parts)[name], m.unit) for name in part_names), _measured(m)]
        for m in rows
    ]


def _ratio_rows(ratios: list[Ratio], section: str) -> list[list[str]]:
    return [
        [
            r.case,
            f"{r.numerator} / {r.denominator}",
            f"{r.value:.3f}",
            "—" if r.band is None else f"± {r.band:.3f}",
            str(r.target or "—"),
            r.verdict,
        ]
        for r in ratios
        if r.section == section
    ]


RATIO_HEADER = ["case", "ratio", "value", "A/A band", "target", "verdict"]


def _aligned(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def _pipe_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def summary(ratios: list[Ratio]) -> str:
    """``"k of n targets met"``, with the missed and the unresolved ones named."""
    judged = [r for r in ratios if r.target is not None]

    def named(verdict: str) -> list[str]:
        return [
            f"{r.case}: {r.numerator} / {r.denominator} = {r.value:.3f}"
            f"{'' if r.band is None else f' ± {r.band:.3f}'} (target {r.target})"
            for r in judged
            if r.verdict == verdict
        ]

    missed, unresolved = named("MISS"), named("UNRESOLVED")
    line = f"{len(judged) - len(missed) - len(unresolved)} of {len(judged)} targets met"
    line += ("; missed: " + "; ".join(missed)) if missed else ""
    return line + ("; unresolved (within the A/A band): " + "; ".join(unresolved) if unresolved else "")


def format_table(measurements: list[Measurement], ratios: list[Ratio]) -> str:
    """The printed report: per section, the medians and then the ratios."""
    blocks = []
    for section in SECTIONS:
        blocks.append(
            f"== {section}\n{_aligned(*_measurement_table(measurements, section))}\n\n"
            f"{_aligned(RATIO_HEADER, _ratio_rows(ratios, section))}"
        )
    return "\n\n".join(blocks) + "\n\n" + summary(ratios)


def format_markdown(
    measurements: list[Measurement], ratios: list[Ratio], command: str, settings: str, machine: dict[str, str]
) -> str:
    """The markdown report: machine, versions, command, date and method, then every section's tables."""
    lines = [
        "# LoRA-Dash benchmarks",
        "",
        f"Command: `{command}`",
        "",
        _pipe_table(["machine and versions", ""], [[key, value] for key, value in machine.items()]),
        "",
        f"Settings: {settings}. Times are medians of interleaved repeats (round-robin across contenders, each "
        "round starting one contender further on, after warm-up rounds), in one process; memory is measured in "
        "fresh child processes, one at a time.",
        "",
        f"**{summary(ratios)}.**",
    ]
    for section in SECTIONS:
        lines += [
            "",
            f"## {section}",
            "",
            SECTION_NOTES[section],
            "",
            _pipe_table(*_measurement_table(measurements, section)),
            "",
            _pipe_table(RATIO_HEADER, _ratio_rows(ratios, section)),
        ]
    return "\n".join(lines) + "\n"
