"""Measurements, ratios against the targets, and their presentation: a printed table and a markdown file."""

import datetime
import importlib.metadata
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

OPS = "Operators per forward + backward (one layer)"
LAYER_STEP = "Layer training step"
MODEL_STEP = "Model training step (all-MiniLM-L6-v2, 36 adapted linears)"
MERGED_INFERENCE = "Merged inference"
LAUNCH_TIME = "Launch (all-MiniLM-L6-v2)"
SAVED = "Saved for backward (exact bytes)"
MEMORY = "Peak memory (RSS growth)"
SECTIONS = (OPS, LAYER_STEP, MODEL_STEP, MERGED_INFERENCE, LAUNCH_TIME, SAVED, MEMORY)

_AA = (
    "PEFT's LoRA is timed twice, as two contenders in the same rounds (an A/A pair): the per-round "
    "ratios of the two have a true median of 1, and the A/A band is how far from 1 the distribution-free 95 % "
    "interval of their median reaches. A ratio with a band is judged PASS only if it meets its target by more "
    "than the band, MISS only if it misses by more than the band, and UNRESOLVED otherwise (the difference is "
    "within what the same layer shows against itself)."
)

#: What each section measures, for the reader of the report.
SECTION_NOTES = {
    OPS: "The ATen operators one forward and backward of one layer dispatch (on a GPU, each is a kernel launch), "
    "counted by a `TorchDispatchMode` after a first training step (AdamW's state made, gradients set to None, as "
    "in training); the optimizer step is not counted. Views are left out of the count and listed below the "
    "table: operators whose schema says the output aliases an input (`OpOverload.is_view`: `t`, `view`, "
    "`transpose`, `permute`, `slice`, `expand`, `detach`, `reshape`, …) and `_unsafe_view` (a reshape that "
    "shares its input's storage without its schema saying so). One column per operator: the histogram. The count "
    "is taken where the dispatcher enters each operator: work an operator's kernel does by itself is not seen (an "
    "out-of-place `addmm` copying its `input` into its output before the product, say). r = s = 8; the count "
    "does not depend on the layer's size. *Ours dash* is our layer after `launch()`. Targets: before "
    "the launch no more operators than PEFT's LoRA, after it at most 6 more (the dash's own).",
    LAYER_STEP: "One training step of one adapted layer: forward on `x: (tokens, in)` (requires grad, as if "
    "earlier layers made it), `y.backward(g)`, AdamW step. r = s = 8, α = 2r. The floor is the frozen "
    "`nn.Linear` alone, forward and backward to `x`. *Ours dash* is our layer after `launch()`; the dense dash "
    "restates the authors' formulation (the `(out, in)` matrix `U_s diag(δ) V_sᵀ` built every forward). "
    "64×64 on 8 tokens is where the per-operator overhead dominates, as it does on a GPU when a step is short. " + _AA,
    MODEL_STEP: "One training step of a MiniLM sentence classifier (cross-entropy, AdamW on adapters and head). "
    "The floor is the frozen encoder's forward plus a step of the head alone: no backward through the "
    "encoder, so it is a lower bound rather than a like-for-like floor. " + _AA,
    MERGED_INFERENCE: "Forward under `torch.no_grad()` of our launched layer after `merge()`, against a plain "
    "`nn.Linear` of the same shape, and against the merged layer's own `nn.Linear` (`layer.base`: the same "
    "weight tensor) called directly, which leaves our `forward` around it as the only difference. A second, "
    "identical `nn.Linear` is timed in the same rounds: the per-round ratios of the two plain layers have a "
    "true median of 1, and the A/A band is how far from 1 the distribution-free 95 % interval of their median "
    "reaches; a ratio is PASS or MISS only by more than the band, else UNRESOLVED.",
    LAUNCH_TIME: "`lora_dash.launch(model)` on a fresh copy of a pre-launch model (copied outside the timed "
    "region), against the bare `torch.linalg.svd(W, full_matrices=False)` of the same weights (all 36 linears; "
    "the first attention block's three with `--quick`).",
    SAVED: "What autograd keeps from the forward for the backward (`torch.autograd.graph.saved_tensors_hooks`), "
    "counted in bytes, each storage once (views as their whole storage), the module's parameters and buffers "
    "left out (a frozen weight kept for `∂L/∂x` costs nothing new), in the second training step of the "
    "contender. The other columns are for context: *module* every parameter and buffer, *gradients* the "
    "trained parameters' `.grad`, *optimizer state* AdamW's moments and step counts. Cases: a float32 layer; "
    "the same layer with a bfloat16 frozen weight and input and float32 adapters (how people train; PEFT's "
    "LoRA then keeps a float32 copy of the input); the float32 layer under `torch.compile` (the saved tensors "
    "of the compiled graph's backward, seen by the same hooks, after the compile); the float32 MiniLM model. "
    "Targets: with a float32 base, no byte more than PEFT's LoRA before the launch and at most the dash's "
    "`tokens·s` float32 numbers more after it (summed over the 36 layers for the model); with a bfloat16 base, "
    "at most 0.6 of PEFT's in both phases; under `torch.compile`, at most PEFT's.",
    MEMORY: "Each contender in fresh child processes, one at a time: the peak RSS after the operation "
    "(`VmHWM`, the kernel counter behind `ru_maxrss`, which itself would carry the parent's peak across fork "
    "and exec) minus the RSS (`/proc/self/statm`) just before it, after `malloc_trim(0)` and a reset of the "
    "kernel's peak mark (`/proc/self/clear_refs`), so building the contender is not counted. A tiny training "
    "step runs first so one-time runtime setup is charged to nobody. Training: the first steps of the "
    "contender the timing used (saved by the parent), the first creating AdamW's state. Launch: the "
    "pre-launch layers of the launch section, saved by the parent and launched in the child. Every contender "
    "is measured in several children, in rotation; the table shows the median and the range over them. "
    "That range is the RSS measurement's own noise (megabytes of allocator arenas), so no target is judged "
    "on it; the exact count above is judged instead.",
}

#: The header of a section's measured column, where it is not "measured".
VALUE_HEADER = {OPS: "operators (views excluded)", SAVED: "saved for backward (judged)"}


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
    """A bound on a ratio: ``ratio <= bound`` (``at_most``) or ``ratio >= bound``; with a ``unit``, a bound on
    a difference in that unit."""

    bound: float
    at_most: bool = True
    unit: str = ""

    def met(self, value: float) -> bool:
        return value <= self.bound if self.at_most else value >= self.bound

    def __str__(self) -> str:
        sign = "≤" if self.at_most else "≥"
        if self.unit:
            return f"{sign} {self.bound:+,.0f} {self.unit}".replace("-", "−")
        return f"{sign} {self.bound:g}"


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of two contenders' measurements in one case (or, with ``difference``,
    ``numerator − denominator`` in ``unit``), with its target if any and the noise ``band`` of such a ratio if
    measured (see :func:`lora_dash.bench.harness.aa_band`)."""

    section: str
    case: str
    numerator: str
    denominator: str
    value: float
    target: Target | None = None
    band: float | None = None
    difference: bool = False
    unit: str = ""

    @property
    def label(self) -> str:
        return f"{self.numerator} {'−' if self.difference else '/'} {self.denominator}"

    def formatted(self) -> str:
        """The value as the tables show it: a ratio to three decimals, a difference signed, in its unit."""
        if not self.difference:
            return f"{self.value:.3f}"
        return f"{self.value:+,.0f} {self.unit}".rstrip().replace("-", "−")

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


def difference(
    measurements: list[Measurement],
    section: str,
    case: str,
    numerator: str,
    denominator: str,
    target: Target | None = None,
) -> Ratio:
    """``numerator − denominator`` of two measurements already taken, in their unit, judged against ``target``
    (a bound on the difference)."""
    found = {(m.section, m.case, m.contender): m for m in measurements}
    top, bottom = found[section, case, numerator], found[section, case, denominator]
    return Ratio(
        section, case, numerator, denominator, top.value - bottom.value, target, difference=True, unit=top.unit
    )


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
    if unit in ("B", "ops"):
        return f"{value:,.0f} {unit}"
    if unit == "ms" and value < 1:  # microseconds matter where a call is short
        return f"{value:.4f} {unit}"
    return f"{value:.3f} {unit}"


def _measured(m: Measurement) -> str:
    if m.spread is None:
        return _quantity(m.value, m.unit)
    low, high = (_quantity(bound, m.unit).removesuffix(f" {m.unit}") for bound in m.spread)
    return f"{_quantity(m.value, m.unit)} ({low}–{high})"


def _measurement_table(measurements: list[Measurement], section: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a section's measurements: one column per part (if any), then the measured value."""
    rows = [m for m in measurements if m.section == section]
    part_names = list(dict.fromkeys(name for m in rows for name, _ in m.parts))
    header = ["case", "contender", *part_names, VALUE_HEADER.get(section, "measured")]
    return header, [
        [m.case, m.contender, *(_quantity(dict(m.parts).get(name, 0), m.unit) for name in part_names), _measured(m)]
        for m in rows
    ]


def _ratio_rows(ratios: list[Ratio], section: str, judged_only: bool = False) -> list[list[str]]:
    return [
        [
            r.case,
            r.label,
            r.formatted(),
            "—" if r.band is None else f"± {r.band:.3f}",
            str(r.target or "—"),
            r.verdict,
        ]
        for r in ratios
        if r.section == section and (r.target is not None or not judged_only)
    ]


RATIO_HEADER = ["case", "ratio or difference", "value", "A/A band", "target", "verdict"]


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
            f"{r.case}: {r.label} = {r.formatted()}{'' if r.band is None else f' ± {r.band:.3f}'} (target {r.target})"
            for r in judged
            if r.verdict == verdict
        ]

    missed, unresolved = named("MISS"), named("UNRESOLVED")
    line = f"{len(judged) - len(missed) - len(unresolved)} of {len(judged)} targets met"
    line += ("; missed: " + "; ".join(missed)) if missed else ""
    return line + ("; unresolved (within the A/A band): " + "; ".join(unresolved) if unresolved else "")


def _notes(notes: dict[str, list[str]] | None, section: str) -> list[str]:
    return list((notes or {}).get(section, ()))


def format_table(
    measurements: list[Measurement], ratios: list[Ratio], notes: dict[str, list[str]] | None = None
) -> str:
    """The printed report: per section, the medians, the section's ``notes`` (lines), then the ratios; last,
    every judged row together and the summary."""
    blocks = []
    for section in SECTIONS:
        lines = [f"== {section}", _aligned(*_measurement_table(measurements, section)), *_notes(notes, section)]
        blocks.append("\n".join(lines) + f"\n\n{_aligned(RATIO_HEADER, _ratio_rows(ratios, section))}")
    judged = _aligned(JUDGED_HEADER, _judged_rows(ratios))
    return "\n\n".join(blocks) + f"\n\n== Every judged row\n{judged}\n\n" + summary(ratios)


JUDGED_HEADER = ["section", *RATIO_HEADER]


def _judged_rows(ratios: list[Ratio]) -> list[list[str]]:
    """Every ratio with a target, section by section: the verdicts at a glance."""
    return [[section, *row] for section in SECTIONS for row in _ratio_rows(ratios, section, judged_only=True)]


#: The lines around the part of a markdown file that ``--markdown`` writes; what lies outside is kept.
BEGIN = "<!-- bench:begin: written by `python -m lora_dash.bench --markdown`; edit outside these markers -->"
END = "<!-- bench:end -->"


def format_markdown(
    measurements: list[Measurement],
    ratios: list[Ratio],
    command: str,
    settings: str,
    machine: dict[str, str],
    notes: dict[str, list[str]] | None = None,
) -> str:
    """The generated markdown: command, machine and versions, settings, the judged rows, then every section's
    note, tables and ``notes`` (lines). Its headings are level 2 and 3, for a file whose title is written by
    hand (see :func:`write_generated`)."""
    lines = [
        f"Command: `{command}`",
        "",
        _pipe_table(["machine and versions", ""], [[key, value] for key, value in machine.items()]),
        "",
        f"Settings: {settings}. Times are medians of interleaved repeats (round-robin across contenders, each "
        "round starting one contender further on, after warm-up rounds), in one process; memory is measured in "
        "fresh child processes, one at a time.",
        "",
        f"**{summary(ratios)}.**",
        "",
        "### Every judged row",
        "",
        _pipe_table(JUDGED_HEADER, _judged_rows(ratios)),
    ]
    for section in SECTIONS:
        lines += [
            "",
            f"## {section}",
            "",
            SECTION_NOTES[section],
            "",
            _pipe_table(*_measurement_table(measurements, section)),
            *([""] if _notes(notes, section) else []),
            *(f"- {note}" for note in _notes(notes, section)),
            "",
            _pipe_table(RATIO_HEADER, _ratio_rows(ratios, section)),
        ]
    return "\n".join(lines) + "\n"


def check_markers(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` is missing or holds one :data:`BEGIN` line followed by one
    :data:`END` line: the only files :func:`write_generated` will write."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ValueError(
            f"{path} exists but has not exactly one generated part between the lines\n  {BEGIN}\n  {END}\n"
            "(in that order); put them where the report goes, or name a new file. Nothing was written."
        )


def write_generated(path: Path, generated: str) -> None:
    """Write ``generated`` between the markers of ``path``, keeping every line outside them; a missing file is
    created with a title and the markers (see :func:`check_markers` for the files refused)."""
    check_markers(path)
    if not path.exists():
        path.write_text(f"# LoRA-Dash benchmarks\n\n{BEGIN}\n{generated.rstrip()}\n{END}\n")
        return
    lines = path.read_text().splitlines(keepends=True)
    begin = next(i for i, line in enumerate(lines) if line.strip() == BEGIN)
    end = next(i for i, line in enumerate(lines) if line.strip() == END)
    path.write_text("".join([*lines[: begin + 1], generated.rstrip() + "\n", *lines[end:]]))
