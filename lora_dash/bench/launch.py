"""``python -m lora_dash.bench.launch``: what the launch costs, and how ranks share it.

Two parts, each printed as markdown:

- **Scaling** (default): the wall time of ``lora_dash.launch`` on one fixed set of matrices (two quarter-scale
  LLaMA blocks) on 1, 2 and 3 gloo ranks on this machine, one torch thread per rank, shared
  (``distributed=True``) and redundant (``distributed=False``). Each time is the slowest rank's, between
  barriers, median over rounds.
- **SVD costs** (``--svd-costs``): the float32 thin SVD (:func:`lora_dash.directions.svd_basis`, what the
  launch runs) timed on square and rectangular shapes up to 4096², a least-squares fit of
  ``t = a·n·m·min(n, m)`` (the launch's cost model) and of ``t = a·n·m·min(n, m) + b·min(n, m)³`` with their
  relative residuals, and the launch time each projects for LLaMA-7B and a 70B model on 1, 8 and 64 CPU
  ranks under :func:`lora_dash.distributed.assign_owners`.

Needs only the core. ``--quick`` shrinks both to a smoke run whose numbers mean nothing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import lora_dash
from lora_dash import directions
from lora_dash.bench.report import environment
from lora_dash.distributed import assign_owners, rank_loads, svd_cost

R, ALPHA, S = 8, 16.0, 8
WORKER_TIMEOUT_S = 900


def llama_block(hidden: int, ffn: int, kv: int | None = None) -> list[tuple[int, int]]:
    """The adapted ``(out, in)`` shapes of one block: q, k, v, up, down (``kv``: the k, v width, GQA)."""
    kv = hidden if kv is None else kv
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (ffn, hidden), (hidden, ffn)]


#: The projected models: q, k, v, up and down adapted in every block.
MODELS = {
    "LLaMA-7B (32 × q, k, v 4096², up, down 11008×4096)": 32 * llama_block(4096, 11008),
    "70B (80 × q 8192², k, v 1024×8192, up, down 28672×8192)": 80 * llama_block(8192, 28672, kv=1024),
}
PROJECTED_RANKS = (1, 8, 64)


@dataclass(frozen=True)
class Settings:
    scaling_shapes: tuple[tuple[int, int], ...]  # (out, in) of the launched matrices
    worlds: tuple[int, ...]
    rounds: int
    svd_shapes: tuple[tuple[int, int], ...]
    svd_repeats: int
    fit_min_side: int  # shapes with min(n, m) below this are timed but left out of the fit (overhead-bound)


FULL = Settings(
    scaling_shapes=tuple(2 * llama_block(1024, 2752)),
    worlds=(1, 2, 3),
    rounds=3,
    svd_shapes=(
        (256, 256),
        (512, 512),
        (1024, 1024),
        (2048, 2048),
        (4096, 4096),
        (1024, 4096),
        (4096, 1024),
        (2752, 1024),
        (5504, 2048),
        (1024, 8192),
    ),
    svd_repeats=3,
    fit_min_side=1024,
)
QUICK = Settings(
    scaling_shapes=((96, 64), (64, 64), (64, 160)),
    worlds=(2,),
    rounds=1,
    svd_shapes=((64, 64), (128, 128), (128, 256)),
    svd_repeats=1,
    fit_min_side=64,
)


# --------------------------------------------------------------------------------------------- scaling
def build_model(shapes: tuple[tuple[int, int], ...]) -> nn.Module:
    """One ``nn.Linear`` per ``(out, in)`` shape with LoRA-Dash on each and a non-zero ``B``; the same on every rank."""
    torch.manual_seed(0)
    model = nn.ModuleDict({f"m{i}": nn.Linear(fan_in, fan_out) for i, (fan_out, fan_in) in enumerate(shapes)})
    lora_dash.inject(model, r"m\d+", r=R, alpha=ALPHA, s=S)
    with torch.no_grad():
        for layer in lora_dash.dash_layers(model).values():
            layer.lora_B.normal_(std=0.01)
    return model


def timed_launches(shapes: tuple[tuple[int, int], ...], rounds: int) -> dict[str, list[float]]:
    """``rounds`` × (shared, redundant) launches of :func:`build_model` (``shapes``), timed; a collective.

    Returns ``{"shared": [wall, cpu], "redundant": [wall, cpu]}`` in seconds: medians over rounds of the
    slowest rank's wall time between barriers and of the largest CPU time (``time.process_time``) one rank
    spent in the launch. A tiny launch first pays LAPACK's and gloo's first-call costs, untimed.
    """
    lora_dash.launch(build_model(((16, 16),)))
    times: dict[str, list[list[float]]] = {"shared": [], "redundant": []}
    for _ in range(rounds):
        for name, distributed in (("shared", True), ("redundant", False)):
            model = build_model(shapes)
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            lora_dash.launch(model, distributed=distributed)
            cpu = time.process_time() - start_cpu
            dist.barrier()
            elapsed = torch.tensor([time.perf_counter() - start, cpu], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[name].append(elapsed.tolist())
    return {name: [statistics.median(column) for column in zip(*values)] for name, values in times.items()}


def scaling_worker(rank: int, world: int, port: int, spec: dict) -> None:
    """One rank of :func:`time_launch`, one torch thread; rank 0 prints :func:`timed_launches`'s result."""
    torch.set_num_threads(1)  # one core per rank: what sharing the launch can gain is then visible
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=600))
    seconds = timed_launches(tuple(map(tuple, spec["shapes"])), spec["rounds"])
    if rank == 0:
        print(json.dumps(seconds))
    dist.destroy_process_group()


def time_launch(world: int, settings: Settings) -> dict[str, list[float]]:
    """:func:`timed_launches` on ``world`` gloo ranks, child processes of this one."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=120))
    spec = json.dumps({"shapes": settings.scaling_shapes, "rounds": settings.rounds})
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo" if sys.platform.startswith("linux") else "lo0"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "lora_dash.bench.launch", "--worker", str(rank), str(world), str(store.port), spec],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(world)
    ]
    try:
        outputs = [worker.communicate(timeout=WORKER_TIMEOUT_S) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    failed = [(rank, err[-2000:]) for rank, (worker, (_, err)) in enumerate(zip(workers, outputs)) if worker.returncode]
    if failed:
        raise RuntimeError(f"launch workers failed on {world} ranks: {failed}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def bench_scaling(settings: Settings) -> str:
    """The scaling table as markdown."""
    shapes = settings.scaling_shapes
    costs = [svd_cost(*shape) for shape in shapes]
    cores = os.cpu_count()
    rows = []
    for world in settings.worlds:
        (shared_wall, shared_cpu), (redundant_wall, redundant_cpu) = time_launch(world, settings).values()
        largest = max(rank_loads(costs, assign_owners(costs, world), world)) / sum(costs)
        rows.append(
            f"| {world} | {shared_wall:.2f} | {redundant_wall:.2f} | {redundant_wall / shared_wall:.2f} | "
            f"{shared_cpu:.2f} | {redundant_cpu:.2f} | {redundant_cpu / shared_cpu:.2f} | {largest:.3f} |"
        )
    described = ", ".join(f"{o}×{i}" for o, i in shapes)
    return "\n".join(
        [
            f"Launch of {len(shapes)} matrices ({described}; r = s = 8), float32 SVDs, gloo on this machine "
            f"({cores} cores), one torch thread per rank; median of {settings.rounds} rounds. *Wall*: the slowest "
            "rank's time between barriers. *CPU*: the largest CPU time one rank spent in the launch, what the wall "
            "time would be with a free core per rank. *Share*: the largest rank's part of the summed "
            "`n·m·min(n, m)`, the speed-up's ceiling being its inverse.",
            "",
            "| ranks | shared wall (s) | redundant wall (s) | redundant / shared | shared CPU (s) | redundant CPU (s) "
            "| redundant / shared | share |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )


# ------------------------------------------------------------------------------------------- SVD costs
def time_svds(shapes: tuple[tuple[int, int], ...], repeats: int) -> dict[tuple[int, int], float]:
    """Median CPU seconds of :func:`lora_dash.directions.svd_basis` (float32) per shape.

    CPU time of this process (``time.process_time``), not wall time: with one thread it is the SVD's own
    cost, which neighbours on a shared machine stretch in wall time but not here. Shapes round-robin, after
    one discarded round.
    """
    generator = torch.Generator().manual_seed(0)
    weights = {shape: torch.randn(*shape, generator=generator) for shape in shapes}
    samples: dict[tuple[int, int], list[float]] = {shape: [] for shape in shapes}
    for round_index in range(1 + repeats):
        for shape, weight in weights.items():
            start = time.process_time()
            directions.svd_basis(weight)
            if round_index > 0:
                samples[shape].append(time.process_time() - start)
    return {shape: statistics.median(values) for shape, values in samples.items()}


@dataclass(frozen=True)
class CostModel:
    """``t = Σ_j c_j · term_j(n, m)``: a name and the terms, linear in the fitted constants ``c``."""

    name: str
    terms: Callable[[int, int], tuple[int, ...]]

    def seconds(self, constants: tuple[float, ...], shape: tuple[int, int]) -> float:
        return sum(c * term for c, term in zip(constants, self.terms(*shape)))


#: The launch's cost model (:func:`lora_dash.distributed.svd_cost`), and the one LAPACK's flop counts suggest
#: for a thin SVD with both singular bases, ``O(n·m·k) + O(k³)``: an extra ``k³`` term weighs square
#: matrices more than rectangular ones.
COST_MODELS = (
    CostModel("a·n·m·min(n, m)", lambda n, m: (svd_cost(n, m),)),
    CostModel("a·n·m·min(n, m) + b·min(n, m)³", lambda n, m: (svd_cost(n, m), min(n, m) ** 3)),
)


def fit_model(
    seconds: dict[tuple[int, int], float], model: CostModel, min_side: int
) -> tuple[tuple[float, ...], dict[tuple[int, int], float]]:
    """The constants of ``model`` by least squares on the relative error, ``Σ_i (t̂_i / t_i − 1)²``, over the
    shapes with ``min(n, m) >= min_side``; and the relative residual ``t̂ / t − 1`` of every shape.

    With one term ``c``: ``a = Σ(c/t) / Σ(c/t)²``. Solved in float64 (``torch.linalg.lstsq`` on the rows
    ``term_j / t_i`` against ones).
    """
    fitted = [(model.terms(*shape), t) for shape, t in seconds.items() if min(shape) >= min_side]
    if len(fitted) < len(model.terms(1, 1)):
        raise ValueError(f"too few timed shapes with min(n, m) >= {min_side} to fit {model.name}")
    rows = torch.tensor([[term / t for term in terms] for terms, t in fitted], dtype=torch.float64)
    ones = torch.ones(len(fitted), 1, dtype=torch.float64)
    constants = tuple(torch.linalg.lstsq(rows, ones).solution[:, 0].tolist())
    return constants, {shape: model.seconds(constants, shape) / t - 1 for shape, t in seconds.items()}


def projected_seconds(
    model: CostModel, constants: tuple[float, ...], shapes: list[tuple[int, int]], world: int
) -> float:
    """The largest rank's predicted SVD time when ``world`` ranks share ``shapes`` as the launch assigns them
    (:func:`assign_owners` on :func:`svd_cost`), each SVD's time from ``model``."""
    owners = assign_owners([svd_cost(*shape) for shape in shapes], world)
    return max(rank_loads([model.seconds(constants, shape) for shape in shapes], owners, world))


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def bench_svd_costs(settings: Settings) -> str:
    """The measured SVD table, the fits and the projection, as markdown."""
    seconds = time_svds(settings.svd_shapes, settings.svd_repeats)
    in_fit = [shape for shape in seconds if min(shape) >= settings.fit_min_side]
    fits = [(model, *fit_model(seconds, model, settings.fit_min_side)) for model in COST_MODELS]
    largest = max(seconds, key=lambda shape: svd_cost(*shape))
    measured = []
    for shape, t in seconds.items():
        cells = [f"{t * 1000:.1f}"] + [
            f"{model.seconds(constants, shape) * 1000:.1f} ({residuals[shape]:+.1%})"
            for model, constants, residuals in fits
        ]
        note = "" if shape in in_fit else " (not fitted)"
        measured.append(f"| {shape[0]}×{shape[1]}{note} | {' | '.join(cells)} |")
    described = []
    for model, constants, residuals in fits:
        errors = [residuals[shape] for shape in in_fit]
        values = ", ".join(f"{letter} = {value:.3e} s" for letter, value in zip("ab", constants))
        described.append(
            f"- `t = {model.name}`: {values}; relative residuals RMS "
            f"{(sum(e * e for e in errors) / len(errors)) ** 0.5:.1%}, worst {max(map(abs, errors)):.1%}."
        )
    projected = [
        f"| {name} | {len(shapes)} | {model.name} | "
        + " | ".join(duration(projected_seconds(model, constants, shapes, world)) for world in PROJECTED_RANKS)
        + " |"
        for name, shapes in MODELS.items()
        for model, constants, _ in fits
    ]
    return "\n".join(
        [
            f"**Measured** on this machine ({os.cpu_count()} cores), one torch thread: CPU time of the float32 thin "
            f"SVD as the launch runs it (a wide matrix through its transpose), median of {settings.svd_repeats} "
            "rounds after a warm-up round, shapes timed round-robin; beside it each fit's value (and its relative "
            "residual):",
            "",
            "| shape (out×in) | measured CPU (ms) | "
            + " | ".join(f"fit {model.name} (ms)" for model in COST_MODELS)
            + " |",
            "|---|---:|" + "---:|" * len(COST_MODELS),
            *measured,
            "",
            f"**Fits**, by least squares on the relative error over the {len(in_fit)} shapes with min(n, m) ≥ "
            f"{settings.fit_min_side} (smaller ones are dominated by fixed costs):",
            "",
            *described,
            "",
            "**Projected** (not measured): the largest rank's summed SVD time under the launch's size-balanced "
            "assignment, each SVD's time from a fit, CPU float32 at the measured speed of one core per rank; SVDs "
            "only (the selection, the gathers and the broadcast of `s·(n + m)` numbers a layer are small beside "
            f"them). Shapes costlier than the costliest measured one ({largest[0]}×{largest[1]}) are extrapolated: "
            "the residuals do not bound the error there.",
            "",
            "| model | adapted matrices | cost model | "
            + " | ".join(f"{world} rank{'s' * (world > 1)}" for world in PROJECTED_RANKS)
            + " |",
            "|---|---:|---|" + "---:|" * len(PROJECTED_RANKS),
            *projected,
        ]
    )


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lora_dash.bench.launch",
        description="What the LoRA-Dash launch costs on CPU. By default: launch wall time of the same matrices on "
        "1, 2 and 3 gloo ranks, shared among the ranks and redundant (every rank decomposes every matrix). "
        "With --svd-costs: float32 SVD time against shape, a fit of a·n·m·min(n, m), and the projected "
        "launch time of LLaMA-7B and a 70B model on 1, 8 and 64 ranks. Prints markdown.",
    )
    parser.add_argument(
        "--svd-costs",
        action="store_true",
        help="time SVDs by shape, fit, project (instead of the scaling runs; about ten minutes on 2 cores)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: a smoke run")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)  # RANK WORLD PORT SPEC: one scaling rank
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        rank, world, port, spec = args.worker
        scaling_worker(int(rank), int(world), int(port), json.loads(spec))
        return
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(1)  # per core: see time_svds; the scaling ranks set their own
    started = time.perf_counter()
    print(bench_svd_costs(settings) if args.svd_costs else bench_scaling(settings))
    print()
    print(" | ".join(f"{key}: {value}" for key, value in environment().items()))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
