"""Measurement: interleaved wall-clock medians, and the peak RSS growth of one operation in a child.

Timing. Every contender runs in the same process, round-robin: sample ``i`` of every contender is taken
before sample ``i + 1`` of any, so a slow drift of the machine (another job, heat, frequency) is spread
over all contenders instead of landing on one. Warm-up rounds come first and are thrown away; each
sample calls the operation ``number`` times; the result is the median over samples, per call.

Memory. A CPU process has no allocator counters worth trusting, so each memory contender runs in a fresh
child process (:mod:`lora_dash.bench.memory`), one at a time, and reports

    growth = peak RSS after the operation − RSS just before it        (KiB)

with freed heap returned to the system first (``malloc_trim``) and the kernel's peak-RSS mark reset to
the current RSS (``/proc/self/clear_refs``), so the peak of building the contender is not counted. The
peak is the kernel's high-water mark of this address space, ``VmHWM`` in ``/proc/self/status``: the
counter ``getrusage(RUSAGE_SELF).ru_maxrss`` reports too, except that ``ru_maxrss`` also keeps the peak of
the parent's address space across fork and exec, so in a child of the benchmark it would never be
below the benchmark's own size.
"""

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


@dataclass
class Contender:
    """One thing to time: ``run()`` is timed; ``prepare()`` runs, untimed, before every sample."""

    name: str
    run: Callable[[], object]
    prepare: Callable[[], object] = field(default=lambda: None)


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


def interleaved_medians(
    contenders: Sequence[Contender], repeats: int, warmup: int = 1, number: int = 1
) -> dict[str, float]:
    """Median milliseconds per call of every contender, sampled round-robin.

    ``warmup`` rounds (discarded) and then ``repeats`` rounds; in each round every contender takes one
    sample of ``number`` calls, in the listed order.
    """
    samples: dict[str, list[float]] = {contender.name: [] for contender in contenders}
    for round_index in range(warmup + repeats):
        for contender in contenders:
            seconds = _timed_sample(contender, number)
            if round_index >= warmup:
                samples[contender.name].append(seconds)
    return {name: 1000.0 * statistics.median(values) for name, values in samples.items()}


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


def measure_in_child(spec: dict) -> dict[str, int | bool]:
    """Run ``python -m lora_dash.bench.memory SPEC`` in a fresh process and return its measurement."""
    completed = subprocess.run(
        [sys.executable, "-m", "lora_dash.bench.memory", json.dumps(spec)],
        capture_output=True, text=True, check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"memory child {spec} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])
