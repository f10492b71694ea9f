"""A training run that saves a training checkpoint after every optimizer step, for test_crash_resume.py.

``python crash_resume_run.py DIR [--gated] [--die-mid-save-at K]`` resumes from ``DIR/last.pt`` when it
exists, prints ``start S`` (optimizer steps already done), ``saved S`` after each checkpoint, and at the
end writes ``DIR/final.pt``. ``--gated``: before each step it waits for a line on stdin, so the test sets
the pace. ``--die-mid-save-at K``: the save after step ``K`` writes half the file, then SIGKILLs itself.

Every source of randomness counts: dropout and the inputs use torch's RNG, the target noise NumPy's,
the number of micro-batches Python's, so a resume is only bit-identical if all three are restored.
"""

import io
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_dash import LaunchController  # noqa: E402
from lora_dash.checkpoint import load_training_checkpoint, save_training_checkpoint  # noqa: E402

from helpers import IN, OUT, build_adapted, make_optimizer  # noqa: E402

T = 6  # launch step
TOTAL = 14  # optimizer steps


def train_step(model, optimizer) -> None:
    model.train()
    optimizer.zero_grad()
    micro_batches = random.choice([1, 2])
    for _ in range(micro_batches):
        x = torch.randn(8, IN)
        y = torch.tanh(x[:, :OUT]) + torch.from_numpy(np.random.normal(0.0, 0.1, (8, OUT))).float()
        (F.mse_loss(model(x), y) / micro_batches).backward()
    optimizer.step()


def die_halfway_through_the_next_save() -> None:
    real_save = torch.save

    def save_half_then_die(obj, file) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        file.flush()
        os.fsync(file.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_half_then_die


def main(folder: Path, gated: bool, die_at: int | None) -> None:
    torch.set_num_threads(1)
    model = build_adapted(init_seed=1, dropout=0.1)
    optimizer = make_optimizer(model)
    controller = LaunchController(model, launch_step=T).attach(optimizer)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)  # a resume overwrites all three
    last = folder / "last.pt"
    if last.exists():
        load_training_checkpoint(model, optimizer, controller, last)
    print(f"start {controller.steps}", flush=True)
    while controller.steps < TOTAL:
        if gated:
            sys.stdin.readline()
        train_step(model, optimizer)
        if controller.steps == die_at:
            die_halfway_through_the_next_save()
        save_training_checkpoint(model, optimizer, controller, last)
        print(f"saved {controller.steps}", flush=True)
    save_training_checkpoint(model, optimizer, controller, folder / "final.pt")


if __name__ == "__main__":
    args = sys.argv[2:]
    die_at = int(args[args.index("--die-mid-save-at") + 1]) if "--die-mid-save-at" in args else None
    main(Path(sys.argv[1]), "--gated" in args, die_at)
