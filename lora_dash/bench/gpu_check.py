"""``python -m lora_dash.bench.gpu_check``: the CUDA path measured on one GPU, written as one markdown report.

What the CPU benchmarks (``python -m lora_dash.bench``, ``python -m lora_dash.bench.launch``) argue for a GPU,
measured there, in five parts, each time-boxed so that the whole run stays under ten minutes on one large GPU:

1. **CUDA tests.** The tests of ``tests/`` marked ``skipif`` for want of CUDA (or a GPU), run by pytest in a
   child process: how many passed, failed and were skipped, and why.
2. **A bf16 training step of one layer against PEFT's LoRA** at LLaMA-7B's shapes (4096×4096, 11008×4096,
   4096×11008) on 4096 and 16,384 tokens: step time in interleaved rounds, with the A/A band of PEFT's LoRA timed
   twice; the bytes saved for backward, counted exactly as the CPU benchmark counts them
   (:func:`lora_dash.bench.harness.count_tensor_bytes`); the allocator's peak over a step
   (``torch.cuda.max_memory_allocated``).
3. **A whole model.** A randomly initialised LLaMA-architecture model built from a ``transformers.LlamaConfig``
   (hidden 2048, 16 layers, all seven projections adapted, bf16 base) trained at 4 × 1024 and 8 × 2048 tokens a
   step, ours in both phases against PEFT's LoRA: wall time, GPU-busy time (the profiler's kernels) and the
   allocator's peak, in three interleaved passes, so that the spread from pass to pass shows.
4. **Host–device synchronisations after the launch.** A three-layer model trained through its launch by a
   :class:`lora_dash.LaunchController`; the steps after the launch (after the one step whose check reads tensors,
   by design) run under ``torch.cuda.set_sync_debug_mode("error")``, which raises at the first synchronisation,
   and under :class:`HostReads`, which counts the operations whose result the host would wait for.
5. **The launch's SVDs.** :func:`lora_dash.directions.svd_basis` timed on one LLaMA-7B block's shapes (and a few
   more, for the fits), ``lora_dash.launch`` of that whole block, and the 7B / 70B launch time projected from
   these GPU times with :mod:`lora_dash.bench.launch`'s cost models and the launch's assignment of matrices to
   ranks.

Without CUDA it prints one line and exits 0. ``--dry-run`` runs the same code on the CPU at small shapes, a CI
smoke run whose numbers mean nothing; it differs from the real run only where CUDA alone has the tool (the
allocator's peak, the profiler's device kernels, the sync debug mode). It writes its report to an ignored path
(:data:`DRY_RUN_OUT`), never over the committed one, unless ``--out`` names another.
"""

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_dash
from lora_dash import directions
from lora_dash.bench import contenders, report
from lora_dash.bench.harness import Contender, TrainingStep, calls_per_sample, resident_bytes
from lora_dash.bench.harness import interleaved_samples as interleaved
from lora_dash.bench.launch import (
    COST_MODELS,
    MODELS,
    PROJECTED_RANKS,
    CostModel,
    duration,
    fit_model,
    llama_block,
    projected_seconds,
)
from lora_dash.bench.launch import build_model as build_dash_layers
from lora_dash.bench.report import Measurement, Ratio, Target, ratio
from lora_dash.bench.targets import saved_measurement, saved_ratios, time_against_peft
from lora_dash.distributed import svd_cost

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = Path("results/gpu_check.md")  # the committed report of the real run
DRY_RUN_OUT = Path("results/gpu_check.dry-run.md")  # ignored by git: a dry run never replaces the real report

STEP_CONTENDERS = (contenders.FLOOR, contenders.PEFT, contenders.PEFT_AGAIN, contenders.PRE, contenders.DASH)
MEMORY_CONTENDERS = (contenders.PEFT, contenders.PRE, contenders.DASH)
STEP_TIME = "step time"
STEP_SAVED = "saved for backward (exact bytes)"
STEP_PEAK = "allocator peak over one step"

# On the GPU a layer's step may take up to 2 % longer than PEFT's LoRA, in either phase, and the whole model's no
# longer at all, nor its peak memory higher; over the bf16 base the bytes saved for backward are judged as on the CPU.
STEP_VS_LORA = Target(1.02)
MODEL_VS_LORA = Target(1.00)

#: The seven linear projections of a LLaMA block, all adapted in the whole-model part.
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODEL_WALL = "whole-model step time (wall)"
MODEL_BUSY = "whole-model step time (GPU busy)"
MODEL_PEAK = "whole-model peak memory"

#: Operations whose result the host must have before it can go on: on a GPU each waits for the device.
HOST_READ_OPS = frozenset(
    {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2", "unique_dim"}
)


@dataclass(frozen=True)
class Settings:
    """What the check runs: shapes are ``(out, in)``; budgets are wall seconds."""

    device: str
    dtype: torch.dtype
    layer_shapes: tuple[tuple[int, int], ...]  # the timed layers, also the sync check's chain of layers
    layer_tokens: tuple[int, ...]  # tokens per step of the timed layers; the first also the sync check's
    repeats: int  # timed rounds per step case
    warmup: int  # discarded rounds before them
    min_sample_seconds: float  # each step sample repeats the step until it lasts this long
    launch_step: int  # the sync check's controller launches after this optimizer step
    sync_steps: int  # steps checked after the launch
    block: tuple[int, int]  # (hidden, ffn) of the LLaMA block whose SVDs are timed
    fit_shapes: tuple[tuple[int, int], ...]  # more SVD shapes, for the fits
    late_shapes: tuple[tuple[int, int], ...]  # costly SVD shapes, timed last and only while time is left
    svd_repeats: int  # samples per SVD shape, time permitting
    fit_min_side: int  # SVD shapes with min(n, m) below this are timed but not fitted
    model: "LlamaShape"  # the whole model's architecture
    model_batches: tuple[tuple[int, int], ...]  # (batch, sequence) of its steps
    model_passes: int  # interleaved passes over the model contenders
    model_steps: int  # timed steps per contender and pass, after one untimed
    tests_timeout_s: float
    step_budget_s: float
    model_budget_s: float
    svd_budget_s: float
    total_budget_s: float

    @property
    def tokens(self) -> int:
        """Tokens per step of the sync check's chain of layers."""
        return self.layer_tokens[0]

    def describe(self) -> str:
        shapes = ", ".join(f"{o}×{i}" for o, i in self.layer_shapes)
        tokens = " and ".join(f"{t:,}" for t in self.layer_tokens)
        batches = " and ".join(f"{b} × {t}" for b, t in self.model_batches)
        return (
            f"{self.device}, frozen weights in {dtype_name(self.dtype)}, adapters in float32; "
            f"r = s = {contenders.R}, α = {contenders.ALPHA:g}; layers {shapes} on {tokens} tokens; "
            f"{self.warmup} warm-up + {self.repeats} timed rounds per layer, samples of at least "
            f"{self.min_sample_seconds * 1000:g} ms; whole model {self.model.describe()} at {batches} tokens, "
            f"{self.model_passes} passes of 1 + {self.model_steps} steps per contender; "
            f"sync check: launch after step {self.launch_step}, "
            f"{self.sync_steps} steps checked; SVDs: up to {self.svd_repeats} samples a shape within "
            f"{self.svd_budget_s:g} s; whole run within {self.total_budget_s:g} s"
        )


@dataclass(frozen=True)
class LlamaShape:
    """The whole model's ``transformers.LlamaConfig`` numbers."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int

    def describe(self) -> str:
        return (
            f"(LLaMA architecture, hidden {self.hidden}, {self.layers} layers, {self.heads} heads, "
            f"{self.kv_heads} key-value heads, MLP {self.ffn}, vocabulary {self.vocab:,})"
        )


GPU = Settings(
    device="cuda",
    dtype=torch.bfloat16,
    layer_shapes=((4096, 4096), (11008, 4096), (4096, 11008)),
    layer_tokens=(4096, 16384),
    repeats=21,
    warmup=2,
    min_sample_seconds=0.05,
    launch_step=2,
    sync_steps=5,
    block=(4096, 11008),
    fit_shapes=((1024, 1024), (2048, 2048), (2752, 1024), (1024, 8192)),
    late_shapes=((8192, 8192),),
    svd_repeats=3,
    fit_min_side=1024,
    model=LlamaShape(hidden=2048, layers=16, heads=16, kv_heads=16, ffn=5632, vocab=32000),
    model_batches=((4, 1024), (8, 2048)),
    model_passes=3,
    model_steps=3,
    tests_timeout_s=150,
    step_budget_s=150,
    model_budget_s=180,
    svd_budget_s=120,
    total_budget_s=570,
)
DRY_RUN = Settings(
    device="cpu",
    dtype=torch.bfloat16,
    layer_shapes=((64, 64), (176, 64), (64, 176)),
    layer_tokens=(128, 256),
    repeats=6,
    warmup=1,
    min_sample_seconds=0.002,
    launch_step=2,
    sync_steps=2,
    block=(64, 176),
    fit_shapes=((32, 32), (48, 48), (96, 32), (32, 128)),
    late_shapes=((128, 128),),
    svd_repeats=2,
    fit_min_side=32,
    model=LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, ffn=176, vocab=128),
    model_batches=((2, 16), (2, 32)),
    model_passes=3,
    model_steps=2,
    tests_timeout_s=120,
    step_budget_s=60,
    model_budget_s=60,
    svd_budget_s=30,
    total_budget_s=300,
)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def log(started: float, message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - started:6.1f} s] {message}", flush=True)


# ------------------------------------------------------------------------------------------ CUDA tests
def needs_cuda(item) -> bool:
    """A test that needs CUDA: marked ``skipif`` with a reason naming CUDA or a GPU (``"needs a CUDA device"``)."""
    reasons = [str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif")]
    return any("cuda" in reason.lower() or "gpu" in reason.lower() for reason in reasons)


class CudaTestsPlugin:
    """A pytest plugin: keeps only the tests that :func:`needs_cuda`, and records each one's outcome."""

    def __init__(self) -> None:
        self.outcomes: dict[str, dict[str, str]] = {}

    def pytest_collection_modifyitems(self, config, items) -> None:
        kept = [item for item in items if needs_cuda(item)]
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.outcomes[report.nodeid] = {"outcome": "error", "detail": report.longreprtext[-1500:]}

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:  # in setup, call or teardown: the test failed, whatever came before
            self.outcomes[report.nodeid] = {"outcome": "failed", "detail": report.longreprtext[-1500:]}
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.outcomes.setdefault(report.nodeid, {"outcome": "skipped", "detail": reason})
        elif report.when == "call":
            self.outcomes.setdefault(report.nodeid, {"outcome": "passed", "detail": ""})


def cuda_test_files(tests: Path) -> list[Path]:
    """The test files that mention CUDA at all: only these are imported and searched for CUDA tests."""
    return sorted(path for path in tests.glob("test_*.py") if "cuda" in path.read_text().lower())


def run_cuda_tests_here(result_path: str, files: list[str]) -> int:
    """pytest on ``files`` with :class:`CudaTestsPlugin`, in this process; writes the outcomes as JSON."""
    import pytest

    plugin = CudaTestsPlugin()
    exit_code = pytest.main(["-q", "-p", "no:cacheprovider", *files], plugins=[plugin])
    Path(result_path).write_text(json.dumps({"exit_code": int(exit_code), "outcomes": plugin.outcomes}))
    return 0


def cuda_tests_section(settings: Settings, deadline: float) -> tuple[str, bool]:
    """Run the CUDA tests in a child process (a fresh CUDA context, freed when it ends); markdown and success.

    Success: nothing failed, and on a CUDA device every test ran (none skipped, at least one passed); on the CPU
    they can only be skipped, and the report says so.
    """
    tests = REPO / "tests"
    if not tests.is_dir():
        return f"**Not run**: no `tests/` folder beside the package ({REPO}).", False
    files = cuda_test_files(tests)
    if not files:
        return "**Not run**: no test file in `tests/` mentions CUDA.", False
    folder = tempfile.TemporaryDirectory(prefix="gpu_check_")
    result = Path(folder.name) / "outcomes.json"
    command = [sys.executable, "-m", "lora_dash.bench.gpu_check", "--cuda-tests-worker", str(result)]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    timeout = max(1.0, min(settings.tests_timeout_s, deadline - time.monotonic()))
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [*command, *map(str, files)], cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout
        )
        ran = json.loads(result.read_text()) if result.exists() else None
    except subprocess.TimeoutExpired:
        return f"**Did not finish within {timeout:.0f} s** (pytest on {len(files)} files); no outcome.", False
    finally:
        folder.cleanup()
    if ran is None:
        return f"**pytest did not report** (exit code {done.returncode}):\n\n```\n{done.stderr[-3000:]}\n```", False
    outcomes = ran["outcomes"]
    counts = {kind: sum(o["outcome"] == kind for o in outcomes.values()) for kind in ("passed", "failed", "skipped")}
    errors = sum(o["outcome"] == "error" for o in outcomes.values())
    names = ", ".join(f"`{path.name}`" for path in files)
    lines = [
        "pytest on the tests marked `skipif` for want of CUDA or a GPU, found in "
        f"{plural(len(files), 'file')} that mention CUDA ({names}), in a child process: "
        f"**{plural(len(outcomes) - errors, 'test')}: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['skipped']} skipped**" + (f"; {errors} collection errors" if errors else "") + " "
        f"(pytest exit code {ran['exit_code']}, {time.perf_counter() - started:.1f} s).",
        "",
        "| test | outcome |",
        "| --- | --- |",
        *(f"| `{nodeid}` | {o['outcome']} |" for nodeid, o in sorted(outcomes.items())),
    ]
    for nodeid, o in sorted(outcomes.items()):
        if o["outcome"] != "passed" and o["detail"]:
            lines += ["", f"`{nodeid}` ({o['outcome']}):", "", "```", o["detail"].strip(), "```"]
    all_ran = settings.device == "cpu" or (counts["skipped"] == 0 and counts["passed"] > 0)
    return "\n".join(lines), counts["failed"] == errors == 0 and ran["exit_code"] in (0, 5) and all_ran


# ------------------------------------------------------------------------------------ the training step
def build_contender(name: str, out_features: int, in_features: int, settings: Settings) -> nn.Module:
    """:func:`lora_dash.bench.contenders.build_layer`'s contender (same seed and weights), moved to the device
    with its frozen weight in ``settings.dtype`` and its adapters in float32: PEFT's as ``get_peft_model``
    leaves them (``autocast_adapter_dtype``), ours by design. Ours dash launches there, its SVD on the device."""
    built = contenders.PRE if name == contenders.DASH else name
    layer = contenders.build_layer(built, out_features, in_features).to(settings.device, settings.dtype)
    for parameter in layer.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    if name == contenders.DASH:
        layer.launch()
    return layer


def device_training_step(
    module: nn.Module, out_features: int, in_features: int, tokens: int, settings: Settings, seed: int = 0
) -> TrainingStep:
    """:func:`lora_dash.bench.contenders.layer_training_step` on the device: ``x: (tokens, in)`` in the weights'
    dtype, requiring grad as if earlier layers made it, ``y.backward(g)`` with ``g: (tokens, out)``, AdamW."""
    generator = torch.Generator(settings.device).manual_seed(seed)
    draw = {"generator": generator, "device": settings.device, "dtype": settings.dtype}
    x = torch.randn(tokens, in_features, **draw).requires_grad_(True)
    grad_output = torch.randn(tokens, out_features, **draw)

    def forward_backward() -> None:
        module(x).backward(grad_output)
        x.grad = None

    return contenders._training_step(module, forward_backward)


def synchronized(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``step`` and then a wait for the device, so that a wall-clock sample holds the whole step."""

    def run() -> None:
        step()
        synchronize(device)

    return run


def peak_step_bytes(step: TrainingStep, device: torch.device) -> int | None:
    """Peak bytes the allocator held during one step above what it held before it; None off CUDA."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def step_case(
    settings: Settings, out_features: int, in_features: int, tokens: int
) -> tuple[list[Measurement], list[Ratio]]:
    """Time, bytes saved for backward and allocator peak of every contender's training step at one shape."""
    device = torch.device(settings.device)
    case = f"{out_features}×{in_features}, {tokens:,} tokens"
    steps = {
        name: device_training_step(
            build_contender(name, out_features, in_features, settings), out_features, in_features, tokens, settings
        )
        for name in STEP_CONTENDERS
    }
    for step in steps.values():  # kernels chosen, AdamW's state created: untimed
        step()
    synchronize(device)
    timed = [Contender(name, synchronized(step, device)) for name, step in steps.items()]
    # Samples sized on PEFT's step, so that the step contenders' samples last about min_sample_seconds each.
    number = calls_per_sample(timed[STEP_CONTENDERS.index(contenders.PEFT)], settings.min_sample_seconds)
    measurements, aa = time_against_peft(STEP_TIME, case, interleaved(timed, settings.repeats, settings.warmup, number))
    for name in MEMORY_CONTENDERS:
        measurements.append(saved_measurement(STEP_SAVED, case, name, steps[name]))
        peak = peak_step_bytes(steps[name], device)
        if peak is not None:
            measurements.append(Measurement(STEP_PEAK, case, name, peak, "B"))
    peft, pre, dash = contenders.PEFT, contenders.PRE, contenders.DASH
    ratios = [
        aa,
        ratio(measurements, STEP_TIME, case, pre, peft, STEP_VS_LORA, aa.band),
        ratio(measurements, STEP_TIME, case, dash, peft, STEP_VS_LORA, aa.band),
        ratio(measurements, STEP_TIME, case, dash, contenders.FLOOR),
        *saved_ratios(measurements, STEP_SAVED, case, dash_allowance=None),
    ]
    if device.type == "cuda":
        ratios += [ratio(measurements, STEP_PEAK, case, name, peft) for name in (pre, dash)]
    return measurements, ratios


def tables(measurements: list[Measurement], ratios: list[Ratio], section: str) -> list[str]:
    """A section's measurements and ratios as two markdown tables."""
    return [
        report._pipe_table(*report._measurement_table(measurements, section)),
        "",
        report._pipe_table(report.RATIO_HEADER, report._ratio_rows(ratios, section)),
    ]


def step_section(settings: Settings, deadline: float) -> tuple[str, bool]:
    """:func:`step_case` at every shape and token count while time is left; the tables as markdown."""
    device = torch.device(settings.device)
    measurements: list[Measurement] = []
    ratios: list[Ratio] = []
    skipped = []
    for tokens in settings.layer_tokens:
        for out_features, in_features in settings.layer_shapes:
            if time.monotonic() > deadline:
                skipped.append(f"{out_features}×{in_features} on {tokens:,} tokens")
                continue
            case_measurements, case_ratios = step_case(settings, out_features, in_features, tokens)
            measurements += case_measurements
            ratios += case_ratios
            free_memory(device)
    peak = (
        "`torch.cuda.max_memory_allocated` over one step less `torch.cuda.memory_allocated` before it: what the step "
        "allocates on top of the module, the optimizer's state and the input, transients and workspace included."
        if device.type == "cuda"
        else "Not measured: the CPU has no allocator counters (the CPU benchmark measures RSS in child processes)."
    )
    lines = [
        "One adapted layer's training step on the device: forward on `x: (tokens, in)` "
        f"({dtype_name(settings.dtype)}, requiring grad as if earlier layers made it), `y.backward(g)`, AdamW on the "
        "adapters; PEFT's adapters in float32 as `get_peft_model` casts them, ours in float32 by design. On CUDA "
        "each step ends with `torch.cuda.synchronize`, so a sample holds whole steps. "
        f"Contenders in interleaved rounds; *{contenders.PEFT_AGAIN}* is a second PEFT layer timed in the same "
        "rounds, whose ratio to the first gives the A/A band of every time ratio (a verdict within the band is "
        "UNRESOLVED). *Ours dash* is launched on the device. Target: at most 1.02× PEFT's step, in both phases.",
        "",
        f"### {STEP_TIME.capitalize()} (median ms, range over rounds)",
        "",
        *tables(measurements, ratios, STEP_TIME),
        "",
        f"### {STEP_SAVED.capitalize()}",
        "",
        "As the CPU benchmark counts them (`count_tensor_bytes`): what autograd keeps from the forward for the "
        "backward, each storage once, the module's own parameters and buffers left out; beside it, for context, "
        "the module, the gradients and AdamW's state. Over this bf16 base PEFT's LoRA keeps a float32 copy of the "
        "input; target: at most 0.6 of PEFT's, in both phases.",
        "",
        *tables(measurements, ratios, STEP_SAVED),
        "",
        f"### {STEP_PEAK.capitalize()}",
        "",
        peak,
    ]
    if device.type == "cuda":
        lines += ["", *tables(measurements, ratios, STEP_PEAK)]
    if skipped:
        lines += ["", f"**Not measured, out of time: {', '.join(skipped)}.**"]
    lines += ["", f"**{report.summary(ratios)}.**"]
    return "\n".join(lines), not skipped


# ------------------------------------------------------------------------------------------ the whole model
def llama_model(settings: Settings) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of ``settings.model``, built on the device (seed 0), its
    weights in ``settings.dtype``, everything frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM  # the oracle extra

    shape = settings.model
    config = LlamaConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.ffn,
        vocab_size=shape.vocab,
        max_position_embeddings=max(tokens for _, tokens in settings.model_batches),
    )
    torch.manual_seed(0)
    with torch.device(settings.device):
        model = LlamaForCausalLM(config)
    return model.to(settings.dtype).requires_grad_(False)


def llama_contenders(settings: Settings) -> tuple[dict[str, nn.Module], float]:
    """PEFT's LoRA and ours before and after the launch on copies of one :func:`llama_model`, every projection
    of every block adapted (r = s = 8, α = 16; adapters in float32), ours with a random non-zero ``B`` as if LoRA
    had trained; and the wall seconds of ``lora_dash.launch`` of ours dash (SVDs on the device)."""
    device = torch.device(settings.device)
    base = llama_model(settings)
    peft_model = copy.deepcopy(base)
    contenders.peft_lora(peft_model, list(LLAMA_PROJECTIONS))
    ours = {}
    for name in (contenders.PRE, contenders.DASH):
        model = copy.deepcopy(base)
        for layer in lora_dash.inject(model, list(LLAMA_PROJECTIONS), r=contenders.R, alpha=contenders.ALPHA).values():
            contenders._as_if_trained(layer)
        ours[name] = model
    del base
    synchronize(device)
    start = time.perf_counter()
    lora_dash.launch(ours[contenders.DASH])
    synchronize(device)
    return {contenders.PEFT: peft_model, **ours}, time.perf_counter() - start


def llama_step(model: nn.Module, batch: int, tokens: int, settings: Settings) -> TrainingStep:
    """Causal-LM loss on random token ids ``(batch, tokens)`` (the labels are the ids), backward, AdamW on the
    adapters."""
    generator = torch.Generator(settings.device).manual_seed(0)
    ids = torch.randint(settings.model.vocab, (batch, tokens), generator=generator, device=settings.device)

    def forward_backward() -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    return contenders._training_step(model, forward_backward)


def busy_microseconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` intervals: time in which at least one of them ran."""
    busy, reached = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reached:
            busy += end - max(start, reached)
            reached = end
    return busy


def device_busy_ms(step: TrainingStep, device: torch.device) -> float | None:
    """Milliseconds the device was busy in one profiled ``step`` (:func:`busy_microseconds` of the profiler's
    device events: kernels, copies, fills); None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiled:
        step()
        synchronize(device)
    intervals = [
        (event.time_range.start, event.time_range.end)
        for event in profiled.events()
        if event.device_type == DeviceType.CUDA
    ]
    return busy_microseconds(intervals) / 1000


@dataclass
class PassResult:
    """One contender's pass: median wall milliseconds of its timed steps, the device's busy milliseconds in one
    profiled step, and the allocator's peak over the steps above what was allocated before them."""

    wall_ms: float
    busy_ms: float | None
    peak_bytes: int | None


def llama_pass(step: TrainingStep, settings: Settings) -> PassResult:
    """One untimed step, ``settings.model_steps`` timed ones (the device waited for after each), one profiled."""
    device = torch.device(settings.device)
    step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    walls = []
    for _ in range(settings.model_steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        walls.append(1000 * (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    return PassResult(statistics.median(walls), device_busy_ms(step, device), peak)


def llama_case(
    settings: Settings, models: dict[str, nn.Module], batch: int, tokens: int
) -> tuple[list[Measurement], list[Ratio]]:
    """Every contender in ``settings.model_passes`` interleaved passes (each pass one contender further on) at
    one batch; medians over passes with their ranges, the ratios to PEFT's LoRA, and each pass's ratio."""
    device = torch.device(settings.device)
    case = f"{batch} × {tokens:,} tokens"
    steps = {name: llama_step(model, batch, tokens, settings) for name, model in models.items()}
    names = list(steps)
    passes: dict[str, list[PassResult]] = {name: [] for name in names}
    for index in range(settings.model_passes):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            passes[name].append(llama_pass(steps[name], settings))
            free_memory(device)
    measurements = []
    for name, results in passes.items():
        walls = [result.wall_ms for result in results]
        measurements.append(
            Measurement(MODEL_WALL, case, name, statistics.median(walls), "ms", spread=(min(walls), max(walls)))
        )
        busy = [result.busy_ms for result in results if result.busy_ms is not None]
        if busy:
            measurements.append(
                Measurement(MODEL_BUSY, case, name, statistics.median(busy), "ms", spread=(min(busy), max(busy)))
            )
        held = resident_bytes(steps[name])
        peaks = [result.peak_bytes for result in results if result.peak_bytes is not None]
        if peaks:
            parts = (("held between steps", held), ("step's own peak", max(peaks)))
            measurements.append(Measurement(MODEL_PEAK, case, name, held + max(peaks), "B", parts=parts))
    peft = contenders.PEFT
    ratios = []
    for name in (contenders.PRE, contenders.DASH):
        ratios.append(ratio(measurements, MODEL_WALL, case, name, peft, MODEL_VS_LORA))
        ratios += [
            Ratio(MODEL_WALL, f"{case}, pass {index + 1}", name, peft, ours.wall_ms / theirs.wall_ms)
            for index, (ours, theirs) in enumerate(zip(passes[name], passes[peft]))
        ]
        if any(m.section == MODEL_BUSY for m in measurements):
            ratios.append(ratio(measurements, MODEL_BUSY, case, name, peft))
        if any(m.section == MODEL_PEAK for m in measurements):
            ratios.append(ratio(measurements, MODEL_PEAK, case, name, peft, MODEL_VS_LORA))
    return measurements, ratios


def model_section(settings: Settings, deadline: float) -> tuple[str, bool]:
    """The whole model's training step at every batch while time is left; the tables as markdown."""
    device = torch.device(settings.device)
    models, launch_s = llama_contenders(settings)
    adapted = len(lora_dash.dash_layers(models[contenders.DASH]))
    measurements: list[Measurement] = []
    ratios: list[Ratio] = []
    skipped = []
    for batch, tokens in settings.model_batches:
        if time.monotonic() > deadline:
            skipped.append(f"{batch} × {tokens:,}")
            continue
        case_measurements, case_ratios = llama_case(settings, models, batch, tokens)
        measurements += case_measurements
        ratios += case_ratios
    del models
    free_memory(device)
    lines = [
        f"A randomly initialised `LlamaForCausalLM` {settings.model.describe()} built from a `LlamaConfig` on the "
        f"device, its weights in {dtype_name(settings.dtype)} and frozen; all seven projections of every block "
        f"adapted ({adapted} layers; r = s = {contenders.R}, α = {contenders.ALPHA:g}, adapters in float32): PEFT's "
        "LoRA, ours before the launch, and ours after `lora_dash.launch` "
        f"({launch_s:.1f} s for the {adapted} SVDs and the selection, on the device). A step: the causal-LM loss of "
        "random token ids (the labels are the ids), backward, AdamW on the adapters. In each of "
        f"{settings.model_passes} passes every contender runs 1 untimed and {settings.model_steps} timed steps "
        "(each waited for), then one step under `torch.profiler`; each pass starts one contender further on. "
        "*Wall*: the median of the passes' median step times, with the range over passes; every pass's ratio "
        "is listed, so the spread shows. *GPU busy*: the union of the profiler's device events (kernels, copies, "
        "fills) in the profiled step. *Peak memory*: what the contender holds between steps (weights, adapters, "
        "buffers, AdamW's state) plus `torch.cuda.max_memory_allocated` over its timed steps less "
        "`torch.cuda.memory_allocated` before them, the largest over passes: its peak were it alone on the device "
        "(the three models share the device here). Targets: wall time and peak memory at most PEFT's.",
    ]
    for title, section in (("Wall time", MODEL_WALL), ("GPU-busy time", MODEL_BUSY), ("Peak memory", MODEL_PEAK)):
        if any(m.section == section for m in measurements):
            lines += ["", f"### {title}", "", *tables(measurements, ratios, section)]
        else:
            lines += [
                "",
                f"### {title}",
                "",
                "Not measured: it needs CUDA (the allocator's counters, the profiler's device events).",
            ]
    if skipped:
        lines += ["", f"**Not measured, out of time: {', '.join(skipped)}.**"]
    lines += ["", f"**{report.summary(ratios)}.**"]
    return "\n".join(lines), not skipped


# ------------------------------------------------------------------------------ host–device synchronisation
class HostReads(TorchDispatchMode):
    """Counts the operations of :data:`HOST_READ_OPS` on tensors of ``device``: those whose result the host must
    wait for on a GPU (a scalar read such as ``.item()`` or ``bool(t)``, ``nonzero``, …).

    Tensors whose storage is in ``ignored`` are left out (AdamW's step counters, which stay on the host in a CUDA
    run too). A stand-in where ``torch.cuda.set_sync_debug_mode`` does not exist (the CPU), and a count beside it.
    """

    def __init__(self, device: torch.device, ignored: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.device, self.ignored = device, ignored
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in HOST_READ_OPS:
            tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, Tensor)]
            # By type: a tensor on "cuda:0" is on the device "cuda".
            on_device = [t for t in tensors if t.device.type == self.device.type]
            if any(t.untyped_storage().data_ptr() not in self.ignored for t in on_device):
                self.seen.append(name)
        return func(*args, **kwargs)


@contextmanager
def host_syncs_refused(device: torch.device) -> Iterator[bool]:
    """``torch.cuda.set_sync_debug_mode("error")`` for the block on a CUDA device (yields True); elsewhere nothing
    (yields False)."""
    if device.type != "cuda":
        yield False
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield True
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def step_counters(optimizer: torch.optim.Optimizer) -> frozenset[int]:
    """Storages of the optimizer's ``step`` tensors (kept on the host unless ``capturable``)."""
    return frozenset(
        state["step"].untyped_storage().data_ptr()
        for state in optimizer.state.values()
        if isinstance(state.get("step"), Tensor)
    )


def where_raised(error: BaseException) -> str:
    """Where ``error`` was raised: the innermost frame of its traceback and, if another, the innermost one in
    ``lora_dash`` outside this file (what of ours led there)."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [frame for frame in frames if "lora_dash" in frame.filename and frame.filename != __file__]
    places = [frames[-1]] + ([ours[-1]] if ours and ours[-1] is not frames[-1] else [])
    return ", from ".join(f"{f.filename}:{f.lineno} ({f.name}): `{(f.line or '').strip()}`" for f in places)


def sync_section(settings: Settings, deadline: float) -> tuple[str, bool]:
    """Train a chain of the settings' layers through its launch; check the steps after it for host syncs."""
    device = torch.device(settings.device)
    model = build_dash_layers(settings.layer_shapes).to(settings.device, settings.dtype)
    optimizer = torch.optim.AdamW(lora_dash.adapter_parameters(model), lr=1e-4)
    controller = lora_dash.LaunchController(model, launch_step=settings.launch_step).attach(optimizer)
    first_in = settings.layer_shapes[0][1]
    generator = torch.Generator(settings.device).manual_seed(0)
    x = torch.randn(settings.tokens, first_in, generator=generator, device=device, dtype=settings.dtype)
    grad_output = torch.randn(
        settings.tokens, settings.layer_shapes[-1][0], generator=generator, device=device, dtype=settings.dtype
    )

    def forward_backward() -> None:
        hidden = x
        for layer in model.values():
            hidden = layer(hidden)
        hidden.backward(grad_output)

    step = TrainingStep(model, forward_backward, optimizer)
    for _ in range(settings.launch_step + 1):  # the launch, then the step whose one-off check reads tensors
        step()
    if not controller.launched:
        return f"**The controller did not launch after step {settings.launch_step}**: nothing checked.", False
    synchronize(device)
    reads = HostReads(device, step_counters(optimizer))
    failure, checked = None, 0
    with host_syncs_refused(device) as refused:
        try:
            with reads:
                for _ in range(settings.sync_steps):
                    step()
                    checked += 1
        except RuntimeError as error:
            failure = error
    synchronize(device)
    shapes = " → ".join(f"{o}×{i}" for o, i in settings.layer_shapes)
    lines = [
        f"A chain of {len(settings.layer_shapes)} LoRA-Dash layers ({shapes}, {dtype_name(settings.dtype)}) on "
        f"{settings.tokens} tokens, AdamW on `lora_dash.adapter_parameters`, a `LaunchController` attached with "
        f"`launch_step={settings.launch_step}`. Steps 1–{settings.launch_step} train LoRA and launch; step "
        f"{settings.launch_step + 1} runs the controller's one-off check (it reads tensors, by design); then "
        f"{settings.sync_steps} steps (forward, backward, AdamW, the controller's hook, `zero_grad`) run checked.",
        "",
    ]
    if refused:
        verdict = (
            f'**0 synchronisations in {checked} steps** under `torch.cuda.set_sync_debug_mode("error")`.'
            if failure is None
            else f"**A synchronisation in step {checked + 1} after the check began** under "
            f'`torch.cuda.set_sync_debug_mode("error")`: `{str(failure).splitlines()[0]}` at {where_raised(failure)}.'
        )
    else:
        verdict = (
            "`torch.cuda.set_sync_debug_mode` exists on CUDA only: not checked on this device."
            if failure is None
            else f"**The checked steps failed** in step {checked + 1}: `{failure}` at {where_raised(failure)}."
        )
    counted = ", ".join(f"{name} ×{reads.seen.count(name)}" for name in sorted(set(reads.seen))) or "none"
    lines += [
        f"- sync debug mode: {verdict}",
        f"- host reads counted by dispatch (`{'`, `'.join(sorted(HOST_READ_OPS))}` on {device.type} tensors, "
        f"AdamW's host-side step counters left out): **{len(reads.seen)} in {checked} steps** ({counted}).",
    ]
    return "\n".join(lines), failure is None and not reads.seen


# ------------------------------------------------------------------------------------------------ SVDs
def llama_block_linears(hidden: int, ffn: int, kv: int | None = None) -> list[tuple[int, int]]:
    """All seven ``(out, in)`` shapes of one block: :func:`lora_dash.bench.launch.llama_block`'s q, k, v, up, down,
    then o and gate."""
    return [*llama_block(hidden, ffn, kv), (hidden, hidden), (ffn, hidden)]


#: The launch projections: :data:`lora_dash.bench.launch.MODELS` (the paper's five adapted linears a block), and
#: every linear of every block.
PROJECTED = {
    **MODELS,
    "LLaMA-7B, all linears (32 × q, k, v, o 4096², gate, up 11008×4096, down 4096×11008)": 32
    * llama_block_linears(4096, 11008),
    "70B, all linears (80 × q, o 8192², k, v 1024×8192, gate, up 28672×8192, down 8192×28672)": 80
    * llama_block_linears(8192, 28672, kv=1024),
}


def svd_seconds(weight: Tensor, device: torch.device) -> float:
    """Wall seconds of :func:`lora_dash.directions.svd_basis` (float32, as the launch runs it), the device idle
    before and waited for after."""
    synchronize(device)
    start = time.perf_counter()
    directions.svd_basis(weight)
    synchronize(device)
    return time.perf_counter() - start


def predicted_seconds(shape: tuple[int, int], samples: dict[tuple[int, int], list[float]]) -> float:
    """A guess at one SVD of ``shape`` from those timed: its own median, else the costliest timed shape's
    scaled by ``n·m·min(n, m)``; 0 before any is timed."""
    if samples.get(shape):
        return statistics.median(samples[shape])
    timed = [s for s, values in samples.items() if values]
    if not timed:
        return 0.0
    largest = max(timed, key=lambda s: svd_cost(*s))
    return statistics.median(samples[largest]) * svd_cost(*shape) / svd_cost(*largest)


def time_svds_within(
    shapes: list[tuple[int, int]],
    rounds: int,
    device: torch.device,
    deadline: float,
    samples: dict[tuple[int, int], list[float]],
) -> None:
    """Add to ``samples`` up to ``rounds`` timings of every shape, round-robin, each only if it is predicted to
    end before ``deadline``. The weights are standard normal float32 on the device."""
    generator = torch.Generator(device).manual_seed(0)
    weights: dict[tuple[int, int], Tensor] = {}
    for _ in range(rounds):
        for shape in shapes:
            if time.monotonic() + predicted_seconds(shape, samples) > deadline:
                continue
            if shape not in weights:
                weights[shape] = torch.randn(*shape, generator=generator, device=device)
            samples.setdefault(shape, []).append(svd_seconds(weights[shape], device))


def measured_cost_model(medians: dict[tuple[int, int], float]) -> tuple[CostModel, tuple[float, ...]]:
    """The measured times as a :class:`lora_dash.bench.launch.CostModel`: one term per timed shape, 1 on that
    shape, 0 elsewhere, its constant the shape's median seconds."""
    shapes = list(medians)
    return CostModel("measured", lambda n, m: tuple(int((n, m) == shape) for shape in shapes)), tuple(medians.values())


def launch_seconds(settings: Settings, shapes: list[tuple[int, int]]) -> float:
    """Wall seconds of ``lora_dash.launch`` of a model of ``shapes`` (LoRA-Dash on each, a non-zero ``B``) built
    with :func:`lora_dash.bench.launch.build_model` and moved to the device in the settings' dtype."""
    device = torch.device(settings.device)
    model = build_dash_layers(tuple(shapes)).to(settings.device, settings.dtype)
    synchronize(device)
    start = time.perf_counter()
    lora_dash.launch(model)
    synchronize(device)
    return time.perf_counter() - start


def svd_section(settings: Settings, deadline: float) -> tuple[str, bool]:
    """SVD times on the device, the launch of one block, the fits and the projection; markdown."""
    device = torch.device(settings.device)
    hidden, ffn = settings.block
    block = llama_block_linears(hidden, ffn)
    main = list(dict.fromkeys([*block, *settings.fit_shapes]))
    directions.svd_basis(torch.randn(256, 256, device=device))  # the solver's one-time set-up, untimed
    samples: dict[tuple[int, int], list[float]] = {}
    time_svds_within(main, settings.svd_repeats, device, deadline, samples)
    medians = {shape: statistics.median(values) for shape, values in samples.items() if values}
    block_sum = sum(medians[shape] for shape in block) if all(shape in medians for shape in block) else None
    launched = None
    if block_sum is not None and time.monotonic() + 1.5 * block_sum < deadline:
        launched = launch_seconds(settings, block)
        free_memory(device)
    time_svds_within(list(settings.late_shapes), settings.svd_repeats, device, deadline, samples)
    medians = {shape: statistics.median(values) for shape, values in samples.items() if values}

    fits, fit_notes = [], []
    for model in COST_MODELS:
        try:
            constants, residuals = fit_model(medians, model, settings.fit_min_side)
        except ValueError as error:
            fit_notes.append(f"- `t = {model.name}`: not fitted ({error}).")
            continue
        fits.append((model, constants, residuals))
        errors = [residuals[shape] for shape in medians if min(shape) >= settings.fit_min_side]
        values = ", ".join(f"{letter} = {value:.3e} s" for letter, value in zip("ab", constants))
        fit_notes.append(
            f"- `t = {model.name}`: {values}; relative residuals RMS "
            f"{(sum(e * e for e in errors) / len(errors)) ** 0.5:.1%}, worst {max(map(abs, errors)):.1%}."
        )
    untimed = [f"{o}×{i}" for o, i in main + list(settings.late_shapes) if (o, i) not in medians]
    rows = []
    for (out_features, in_features), values in sorted(samples.items(), key=lambda item: svd_cost(*item[0])):
        if not values:
            continue
        shape = (out_features, in_features)
        cells = [f"{out_features}×{in_features}", "yes" if shape in block else "", str(len(values))]
        cells.append(f"{medians[shape] * 1000:.1f} ({min(values) * 1000:.1f}–{max(values) * 1000:.1f})")
        cells += [f"{model.seconds(constants, shape) * 1000:.1f} ({res[shape]:+.1%})" for model, constants, res in fits]
        rows.append("| " + " | ".join(cells) + " |")
    fit_columns = "".join(f" fit {model.name} (ms) |" for model, _, _ in fits)
    lines = [
        f"Wall time of `directions.svd_basis` (float32 thin SVD, as the launch runs it: a wide matrix through its "
        f"transpose) of standard normal matrices on {device.type}, the device waited for before and after each; "
        f"shapes round-robin, up to {settings.svd_repeats} samples each while the part's "
        f"{settings.svd_budget_s:g} s last, after one 256×256 SVD for the solver's set-up. *Block*: the seven "
        f"linears of one LLaMA block ({hidden}, {ffn}); the others are there for the fits.",
        "",
        f"| shape (out×in) | block | samples | median ms (range) |{fit_columns}",
        "|---|---|---:|---:|" + "---:|" * len(fits),
        *rows,
    ]
    if untimed:
        lines += ["", f"Not timed, out of time: {', '.join(untimed)}."]
    if block_sum is not None:
        lines += [
            "",
            f"**One block** ({len(block)} matrices: {', '.join(f'{o}×{i}' for o, i in block)}): summed SVD medians "
            f"{block_sum * 1000:.1f} ms; "
            + (
                f"`lora_dash.launch` of that block ({dtype_name(settings.dtype)} weights, one sample): "
                f"{launched * 1000:.1f} ms, "
                f"{launched / block_sum:.2f}× the summed SVDs."
                if launched is not None
                else "`lora_dash.launch` of that block: not run, out of time."
            ),
        ]
    lines += [
        "",
        f"**Fits** by least squares on the relative error over the timed shapes with min(n, m) ≥ "
        f"{settings.fit_min_side}:",
        "",
        *fit_notes,
    ]
    models = [(model, constants) for model, constants, _ in fits]
    projection = []
    for name, shapes in PROJECTED.items():
        options = ([measured_cost_model(medians)] if all(shape in medians for shape in shapes) else []) + models
        for model, constants in options:
            times = [duration(projected_seconds(model, constants, shapes, world)) for world in PROJECTED_RANKS]
            projection.append(f"| {name} | {len(shapes)} | {model.name} | {' | '.join(times)} |")
    costliest = max(medians, key=lambda shape: svd_cost(*shape)) if medians else None
    lines += [
        "",
        "**Projected** (not measured): the launch's SVD time on the busiest device when each GPU takes the matrices "
        "the launch assigns to its rank (`assign_owners`: largest `n·m·min(n, m)` first, to the least-loaded rank), "
        "each SVD's time measured (*measured*: only where every shape of the model was timed) or from a fit; SVDs "
        "only, one at a time per GPU. "
        + (
            f"Shapes costlier than the costliest timed one ({costliest[0]}×{costliest[1]}) are extrapolated."
            if costliest
            else ""
        ),
        "",
        "| model | adapted matrices | cost model | "
        + " | ".join(f"{world} GPU{'s' * (world > 1)}" for world in PROJECTED_RANKS)
        + " |",
        "|---|---:|---|" + "---:|" * len(PROJECTED_RANKS),
        *projection,
    ]
    return "\n".join(lines), block_sum is not None and bool(fits)


# -------------------------------------------------------------------------------------------- the report
PARTS = (
    ("CUDA tests", cuda_tests_section, "tests_timeout_s"),
    ("bf16 training step of one layer against PEFT's LoRA", step_section, "step_budget_s"),
    ("A whole LLaMA-architecture model against PEFT's LoRA", model_section, "model_budget_s"),
    ("Host–device synchronisations after the launch", sync_section, None),
    ("The launch's SVDs on the device, and the 7B / 70B projection", svd_section, "svd_budget_s"),
)


def header(settings: Settings, command: str, dry_run: bool) -> str:
    machine = report.environment()
    if torch.cuda.is_available() and settings.device == "cuda":
        machine = {
            "GPU": torch.cuda.get_device_name(),
            "CUDA (torch built with)": str(torch.version.cuda),
            **machine,
        }
    lines = ["# LoRA-Dash on a GPU: `python -m lora_dash.bench.gpu_check`", ""]
    if dry_run:
        lines += [
            "**Dry run on the CPU at small shapes: the code of the real run, checked; its numbers mean nothing.**",
            "",
        ]
    return "\n".join(
        [
            *lines,
            f"Command: `{command}`",
            "",
            report._pipe_table(["machine and versions", ""], [[key, value] for key, value in machine.items()]),
            "",
            f"Settings: {settings.describe()}.",
        ]
    )


def write(out: Path, blocks: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(blocks) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lora_dash.bench.gpu_check",
        description="LoRA-Dash on one CUDA GPU, in under ten minutes: the CUDA tests; a bf16 training step of one "
        "layer against PEFT's LoRA at LLaMA-7B shapes (time, exact bytes saved for backward, allocator peak); a "
        "whole LLaMA-architecture model against PEFT's LoRA (wall and GPU-busy time, peak memory, three passes); "
        "host-device synchronisations after the launch; the launch's SVD times and the 7B / 70B projection. Writes "
        "a markdown report. Without CUDA it says so and exits 0.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"the report (default {DEFAULT_OUT}; with --dry-run {DRY_RUN_OUT}, which git ignores, so that a dry "
        "run never replaces the committed report)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the same code on the CPU at small shapes (a CI smoke run, about a minute; its numbers mean nothing)",
    )
    parser.add_argument("--cuda-tests-worker", nargs="+", help=argparse.SUPPRESS)  # RESULT FILE...: pytest, here
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cuda_tests_worker is not None:
        result, *files = args.cuda_tests_worker
        return run_cuda_tests_here(result, files)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, nothing measured (--dry-run runs the same code on the CPU).")
        return 0
    settings = DRY_RUN if args.dry_run else GPU
    out = args.out or (DRY_RUN_OUT if args.dry_run else DEFAULT_OUT)
    command = " ".join(["python -m lora_dash.bench.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    started, start = time.perf_counter(), time.monotonic()
    blocks = [header(settings, command, args.dry_run)]
    write(out, blocks)
    failed = []
    for title, part, budget in PARTS:
        log(started, f"{title} ...")
        part_started = time.perf_counter()
        budget_s = getattr(settings, budget) if budget else settings.total_budget_s
        deadline = min(time.monotonic() + budget_s, start + settings.total_budget_s)
        try:
            if time.monotonic() >= start + settings.total_budget_s:
                body, ok = f"**Not run**: the run's {settings.total_budget_s:g} s were spent.", False
            else:
                body, ok = part(settings, deadline)
        except Exception as error:  # a part that breaks is reported, and the others still run
            body, ok = f"**Failed**: `{type(error).__name__}: {error}` at {where_raised(error)}", False
            traceback.print_exc()
        free_memory(torch.device(settings.device))
        seconds = time.perf_counter() - part_started
        blocks.append(f"## {title}\n\n{body}\n\n_{seconds:.1f} s._")
        write(out, blocks)
        print(blocks[-1], flush=True)
        log(started, f"{title}: {'ok' if ok else 'NOT OK'} in {seconds:.1f} s")
        if not ok:
            failed.append(title)
    total = time.perf_counter() - started
    verdict = f"not ok: {'; '.join(failed)}" if failed else "every part ok"
    if args.dry_run and not failed:
        verdict = (
            "every part ran (a dry run: the CUDA tests, the sync debug mode, the allocator peak and the profiler's "
            "device events need CUDA)"
        )
    blocks.append(f"Total {total:.0f} s; {verdict}.")
    write(out, blocks)
    log(started, f"report written to {out}; {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
