"""Measurement: interleaved wall-clock medians, and the peak RSS growth of one operation in a child.

Timing. Every contender runs in the same process, round-robin: sample ``i`` of every contender is taken
before sample ``i + 1`` of any, so a slow drift of the machine (another job, heat, frequency) is spread
over all contenders instead of landing on one; each round starts one contender further on, so no
contender always runs first (or always right after the same one). Warm-up rounds come first and are
thrown away; each sample calls the operation ``number`` times; the result is the median over samples,
per call.

Noise. How far apart two timings must be to differ is measured, not assumed: the same contender timed
twice, as two contenders in the same rounds (an A/A pair), gives per-round ratios whose true median is
1; :func:`aa_band` is how far from 1 the distribution-free 95 % interval of their median reaches.

Memory. A CPU process has no allocator counters worth trusting, so each memory contender runs in a fresh
child process (:mod:`lora_dash.bench.memory`), one at a time, and reports

    growth = peak RSS after the operation − RSS just before it        (KiB)

with freed heap returned to the system first (``malloc_trim``) and the kernel's peak-RSS mark reset to
the current RSS (``/proc/self/clear_refs``), so the peak of building the contender is not counted. The
peak is the kernel's high-water mark of this address space, ``VmHWM`` in ``/proc/self/status``: the
counter ``getrusage(RUSAGE_SELF).ru_maxrss`` reports too, except that ``ru_maxrss`` also keeps the peak of
the parent's address space across fork and exec, so in a child of the benchmark it would never be
below the benchmark's own size.

Operators. :func:`count_ops` counts the ATen operators a call dispatches (each is a kernel launch on a
GPU), through a ``TorchDispatchMode``, which sees every operator below autograd, the backward's included.
Views are counted apart and left out of the total: operators whose schema says the output aliases an input
(``OpOverload.is_view``: ``t``, ``view``, ``transpose``, ``permute``, ``slice``, ``expand``, ``detach``,
``reshape``, …) and ``_unsafe_view`` (a reshape that shares its input's storage although its schema does
not say so); they change a tensor's metadata and launch nothing.

Tensors. The RSS peak moves in steps of the allocator's arenas and mappings, megabytes at a time, and
moves differently from one child to the next, so it cannot resolve the tensors that tell two contenders
apart. :func:`count_tensor_bytes` counts them instead, exactly: the module's parameters and buffers, the
gradients, the optimizer's state, and what autograd saves for backward (seen through
``torch.autograd.graph.saved_tensors_hooks``), each storage once.
"""

import collections
import ctypes
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class Contender:
    """One thing to time: ``run()`` is timed; ``prepare()`` runs, untimed, before every sample."""

    name: str
    run: Callable[[], object]
    prepare: Callable[[], object] = field(default=lambda: None)


@dataclass
class TrainingStep:
    """One training step of ``module``, callable: ``forward_backward()``, then :meth:`update`.

    Split in two so that what the forward saves and the gradients it leaves can be counted before the
    optimizer steps. ``optimizer`` is None where nothing trains (a floor).
    """

    module: nn.Module
    forward_backward: Callable[[], None]
    optimizer: torch.optim.Optimizer | None

    def update(self) -> None:
        """The optimizer step, then the gradients dropped (``set_to_none``), as a training loop does."""
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        self.forward_backward()
        self.update()


def _timed_sample(contender: Contender, number: int) -> float:
    """Seconds per call of ``contender.run``, over ``number`` back-to-back calls (gc off, as ``timeit``)."""
    contender.prepare()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            contender.run()
        return (time.perf_counter() - start) / number
    finally:
        gc.enable()


def calls_per_sample(contender: Contender, min_sample_seconds: float) -> int:
    """How many calls make one sample last at least ``min_sample_seconds``, judged from one call."""
    seconds = _timed_sample(contender, 1)
    return max(1, math.ceil(min_sample_seconds / max(seconds, 1e-9)))


def interleaved_samples(
    contenders: Sequence[Contender], repeats: int, warmup: int = 1, number: int = 1
) -> dict[str, list[float]]:
    """Milliseconds per call of every contender in each of ``repeats`` rounds, sampled round-robin.

    ``warmup`` rounds (discarded) and then ``repeats`` rounds; in each round every contender takes one
    sample of ``number`` calls, round ``i`` starting at contender ``i mod n`` of the list. Sample ``i`` of
    every contender comes from round ``i``, so samples of two contenders can be paired by round.
    """
    samples: dict[str, list[float]] = {contender.name: [] for contender in contenders}
    # Every sample collects garbage first; with transformers loaded a full collection takes most of a
    # second, so what is alive now (collected once) is set aside and only newer objects are scanned.
    gc.collect()
    gc.freeze()
    try:
        for round_index in range(warmup + repeats):
            start = round_index % len(contenders)
            for contender in [*contenders[start:], *contenders[:start]]:
                seconds = _timed_sample(contender, number)
                if round_index >= warmup:
                    samples[contender.name].append(1000.0 * seconds)
    finally:
        gc.unfreeze()
    return samples


def interleaved_medians(
    contenders: Sequence[Contender], repeats: int, warmup: int = 1, number: int = 1
) -> dict[str, float]:
    """Median milliseconds per call of every contender over the rounds of :func:`interleaved_samples`."""
    samples = interleaved_samples(contenders, repeats, warmup, number)
    return {name: statistics.median(values) for name, values in samples.items()}


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of the population ``values`` were drawn from.

    With ``x₍₁₎ ≤ … ≤ x₍ₙ₎`` sorted, ``[x₍ₖ₎, x₍ₙ₋ₖ₊₁₎]`` for the largest ``k`` such that
    ``P(Binomial(n, ½) < k) ≤ (1 − confidence) / 2``: the median lies outside it only if fewer than ``k``
    samples fall on one side of it. Needs ``n ≥ 6`` at 95 % (below that no ``k ≥ 1`` qualifies).

    Raises:
        ValueError: too few values for ``confidence``, or ``confidence`` not in ``(0, 1)``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    n, tail = len(values), (1.0 - confidence) / 2
    k, below = 0, 0.0  # below = P(Binomial(n, 1/2) < k + 1) once k is accepted
    while k + 1 <= n // 2 and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        raise ValueError(f"{n} values are too few for a {confidence:.0%} interval of the median")
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def aa_band(first: Sequence[float], second: Sequence[float], confidence: float = 0.95) -> float:
    """The noise of a timing ratio, from one contender timed twice (an A/A pair) in the same rounds.

    With per-round ratios ``aᵢ = secondᵢ / firstᵢ`` (true median 1) and ``[lo, hi]`` the
    :func:`median_interval` of the ``aᵢ``, the band is ``max(hi − 1, 1 − lo)``: a ratio of two contenders
    timed this way that is within ``1 ± band`` of another is not told apart from it.
    """
    if len(first) != len(second):
        raise ValueError(f"an A/A pair needs samples from the same rounds, got {len(first)} and {len(second)}")
    low, high = median_interval([b / a for a, b in zip(first, second)], confidence)
    return max(high - 1.0, 1.0 - low)


# ------------------------------------------------------------------------------------------ operators
#: Views whose schema does not declare them: they share their input's storage and launch nothing.
UNDECLARED_VIEWS = frozenset({"_unsafe_view"})


def is_view(func) -> bool:
    """Whether the ATen operator overload ``func`` only makes a view (see the module docstring)."""
    return func.is_view or func.overloadpacket.__name__ in UNDECLARED_VIEWS


@dataclass(frozen=True)
class OpCount:
    """Operators dispatched by one call, by name: ``ops`` are counted, ``views`` (see :func:`is_view`) not."""

    ops: collections.Counter
    views: collections.Counter

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.views: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tally = self.views if is_view(func) else self.ops
        tally[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(call: Callable[[], object]) -> OpCount:
    """The ATen operators ``call()`` dispatches in this thread, forward and backward alike, views apart."""
    counter = _OpCounter()
    with counter:
        call()
    return OpCount(counter.ops, counter.views)


# ------------------------------------------------------------------------------------------ memory
def current_rss_kib() -> int:
    """Resident set size now, KiB (``/proc/self/statm``: the second field, in pages)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() // 1024


def peak_rss_kib() -> int:
    """Peak resident set size of this address space since start or the last reset, KiB (``VmHWM``)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def _release_free_heap() -> None:
    """Give freed heap back to the kernel, so memory freed while building is not reused unseen."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _reset_peak_rss() -> bool:
    """Set the kernel's peak-RSS mark (``VmHWM``) to the current RSS; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_growth_kib(operation: Callable[[], object]) -> dict[str, int | bool]:
    """``{"growth_kib": peak RSS after operation() − RSS before it, "peak_reset": bool}``.

    ``peak_reset`` is False where the peak mark could not be reset: the growth may then include the
    peak of whatever ran before (it is an upper bound).
    """
    gc.collect()
    _release_free_heap()
    peak_reset = _reset_peak_rss()
    before = current_rss_kib()
    operation()
    return {"growth_kib": peak_rss_kib() - before, "peak_reset": peak_reset}


def measure_in_child(spec: dict) -> dict:
    """Run ``python -m lora_dash.bench.memory SPEC`` in a fresh process and return its measurement."""
    completed = subprocess.run(
        [sys.executable, "-m", "lora_dash.bench.memory", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"memory child {spec} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _storage_bytes(tensors: list[Tensor], skip: frozenset[int] = frozenset()) -> dict[int, int]:
    """``{data_ptr: nbytes}`` of the storages under ``tensors``, each once, leaving out those in ``skip``."""
    storages = (tensor.untyped_storage() for tensor in tensors)
    return {storage.data_ptr(): storage.nbytes() for storage in storages if storage.data_ptr() not in skip}


def resident_bytes(step: TrainingStep) -> int:
    """Bytes that ``step`` holds between steps: its module's parameters and buffers and its optimizer's state,
    each storage once (gradients are dropped after every step)."""
    state = (
        []
        if step.optimizer is None
        else [
            value
            for per_parameter in step.optimizer.state.values()
            for value in per_parameter.values()
            if isinstance(value, Tensor)
        ]
    )
    return sum(_storage_bytes([*step.module.parameters(), *step.module.buffers(), *state]).values())


def count_tensor_bytes(step: TrainingStep) -> dict[str, int]:
    """Bytes of the tensors one training step of ``step.module`` keeps, each storage counted once.

    Runs one step (forward and backward under a saved-tensor hook, then the update) and returns
    ``{"module", "gradients", "optimizer_state", "saved"}``:

    - ``module``: every parameter and buffer of the module, frozen ones included;
    - ``gradients``: the ``.grad`` of the trained parameters after backward;
    - ``optimizer_state``: every tensor in the optimizer's state after the update (for AdamW, two moments
      and a step count per parameter);
    - ``saved``: every tensor autograd keeps from the forward for the backward, except the module's own
      (a frozen weight kept for ``∂L/∂x`` costs nothing new). Views count as their whole storage, once.

    Saved tensors live until backward frees them, so no two of them share an address and ``data_ptr``
    identifies each storage. Call it after a first step, so the optimizer's state exists either way.
    """
    owned = _storage_bytes([*step.module.parameters(), *step.module.buffers()])
    saved: dict[int, int] = {}
    skip = frozenset(owned)

    def pack(tensor: Tensor) -> Tensor:
        saved.update(_storage_bytes([tensor], skip))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step.forward_backward()
    trained = [p for p in step.module.parameters() if p.requires_grad and p.grad is not None]
    gradients = _storage_bytes([p.grad for p in trained])
    step.update()
    state = (
        []
        if step.optimizer is None
        else [
            value
            for per_parameter in step.optimizer.state.values()
            for value in per_parameter.values()
            if isinstance(value, Tensor)
        ]
    )
    return {
        "module": sum(owned.values()),
        "gradients": sum(gradients.values()),
        "optimizer_state": sum(_storage_bytes(state).values()),
        "saved": sum(saved.values()),
    }
