"""The targets the benchmarks judge, and the rows that judge them, shared by the CPU benchmark
(``python -m lora_dash.bench``) and the GPU check (``python -m lora_dash.bench.gpu_check``).

LoRA-Dash is LoRA plus ``s`` scalars, so its LoRA phase should cost no more than LoRA: before the launch no
operator more than PEFT's LoRA and after it only the dash's few; no longer a step in either phase; no byte
saved for backward more than PEFT's before the launch and only the dash's ``tokens·s`` numbers more after it;
over a half-precision base, where PEFT keeps a float32 copy of the input, well under PEFT's.
"""

import statistics

from lora_dash.bench import contenders as c
from lora_dash.bench.harness import TrainingStep, aa_band, count_tensor_bytes
from lora_dash.bench.report import Measurement, Ratio, Target, difference, ratio

PRE_OPS_VS_LORA = Target(0, unit="ops")  # before the launch, no operator more than PEFT's LoRA
DASH_OPS_VS_LORA = Target(6, unit="ops")  # after it, the dash's own few
STEP_VS_LORA = Target(1.00)  # a step of ours, either phase, takes no longer than PEFT's LoRA
PRE_SAVED_VS_LORA = Target(0, unit="B")  # float32: no byte saved for backward more than PEFT's LoRA
HALF_SAVED_VS_LORA = Target(0.6)  # half-precision base, float32 adapters: PEFT keeps a float32 copy of x
COMPILED_SAVED_VS_LORA = Target(1.00)
FLOAT32 = 4  # bytes


def time_against_peft(section: str, case: str, samples: dict[str, list[float]]) -> tuple[list[Measurement], Ratio]:
    """The median milliseconds of every contender's interleaved ``samples``, with their range, and the A/A
    ratio of PEFT's LoRA timed twice (``PEFT``, ``PEFT_AGAIN``) with its band, for the other ratios to carry."""
    measurements = [
        Measurement(section, case, name, statistics.median(ms), "ms", spread=(min(ms), max(ms)))
        for name, ms in samples.items()
    ]
    band = aa_band(samples[c.PEFT], samples[c.PEFT_AGAIN])
    return measurements, ratio(measurements, section, case, c.PEFT_AGAIN, c.PEFT, band=band)


def saved_measurement(section: str, case: str, name: str, step: TrainingStep) -> Measurement:
    """:func:`lora_dash.bench.harness.count_tensor_bytes` of one more step of ``step`` (run it once first, so
    AdamW's state exists): the bytes saved for backward, the module's, gradients and optimizer state as parts."""
    tensors = count_tensor_bytes(step)
    parts = (
        ("module", tensors["module"]),
        ("gradients", tensors["gradients"]),
        ("optimizer state", tensors["optimizer_state"]),
    )
    return Measurement(section, case, name, tensors["saved"], "B", parts=parts)


def saved_ratios(measurements: list[Measurement], section: str, case: str, dash_allowance: int | None) -> list[Ratio]:
    """Ours against PEFT's LoRA in both phases. With ``dash_allowance`` (bytes: a float32 base's case) no byte
    more before the launch and at most that many after it, the ratios shown beside; without (a half-precision
    base) at most :data:`HALF_SAVED_VS_LORA` of PEFT's."""
    if dash_allowance is None:
        return [ratio(measurements, section, case, name, c.PEFT, HALF_SAVED_VS_LORA) for name in (c.PRE, c.DASH)]
    return [
        difference(measurements, section, case, c.PRE, c.PEFT, PRE_SAVED_VS_LORA),
        difference(measurements, section, case, c.DASH, c.PEFT, Target(dash_allowance, unit="B")),
        ratio(measurements, section, case, c.PRE, c.PEFT),
        ratio(measurements, section, case, c.DASH, c.PEFT),
    ]
