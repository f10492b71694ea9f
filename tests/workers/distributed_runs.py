"""One rank of the DDP and FSDP2 runs of ``tests/test_distributed.py``, and the single-process run they
are compared with. Run as ``python distributed_runs.py RANK WORLD STORE_PORT OUT_DIR``: it joins the
gloo group through the test's TCPStore on 127.0.0.1, trains under DDP, then under FSDP2, and writes
``OUT_DIR/{ddp,fsdp}_rank{RANK}.pt`` (results, or ``{"error": traceback}``)."""

import contextlib
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora_dash  # noqa: E402
from lora_dash.checkpoint import load_adapter, save_adapter  # noqa: E402

from helpers import IN, batch, build_adapted, make_optimizer  # noqa: E402
from workers import gloo_group  # noqa: E402

T = 4  # launch step
STEPS = 10
MICRO = 2  # micro-batches per optimizer step (DDP skips the all-reduce on the first: no_sync)
GLOBAL_BATCH = 8  # per micro-batch, over all ranks
PROBE = torch.Generator().manual_seed(99)
PROBE_X = torch.randn(16, IN, generator=PROBE)


def train(forward, model, optimizer, rank=0, world=1, no_sync=None):
    """``STEPS`` optimizer steps; this rank takes its ``1/world`` share of every global micro-batch.

    Returns ``[(controller steps, launched)]`` after each step (the controller counts through its hook)
    and the messages of the warnings raised meanwhile.
    """
    controller = lora_dash.LaunchController(model, launch_step=T).attach(optimizer)
    phases = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, STEPS + 1):
            optimizer.zero_grad()
            for micro in range(MICRO):
                x, y = batch(step, micro, size=GLOBAL_BATCH)
                x, y = x.chunk(world)[rank], y.chunk(world)[rank]
                last = micro == MICRO - 1
                with contextlib.nullcontext() if last or no_sync is None else no_sync():
                    (F.mse_loss(forward(x), y) / MICRO).backward()
            optimizer.step()
            phases.append((controller.steps, controller.launched))
    return phases, [str(warning.message) for warning in caught]


def single_process_run():
    """The reference: one process, the whole global batch, the same seeds."""
    model = build_adapted(init_seed=1)
    phases, _ = train(model, model, make_optimizer(model))
    with torch.no_grad():
        output = model(PROBE_X)
    return {"phases": phases, "state": lora_dash.adapter_state_dict(model), "output": output}


def ddp_run(rank, world, out):
    model = build_adapted(init_seed=1 + rank)  # DDP must broadcast rank 0's A to the others
    ddp = DistributedDataParallel(model)  # find_unused_parameters=False: every adapter tensor gets a gradient
    phases, caught = train(ddp, model, make_optimizer(model), rank, world, no_sync=ddp.no_sync)
    with torch.no_grad():
        output = model(PROBE_X)
    return {"phases": phases, "warnings": caught, "state": lora_dash.adapter_state_dict(model), "output": output}


def shard(model):
    for layer in lora_dash.dash_layers(model).values():
        fully_shard(layer)
    fully_shard(model)
    return model


def fsdp_run(rank, world, out):
    model = shard(build_adapted(init_seed=1))  # FSDP2 shards each rank's own copy: same seed everywhere
    weight = model.fc1.base.weight
    sharded_rows = (weight.to_local().shape[0], weight.shape[0]) if hasattr(weight, "to_local") else None
    phases, caught = train(model, model, make_optimizer(model), rank, world)
    with torch.no_grad():
        output = model(PROBE_X)
    state = lora_dash.adapter_state_dict(model)
    save_adapter(model, out / f"fsdp_adapter_rank{rank}.pt")
    dist.barrier()
    fresh = shard(build_adapted(init_seed=7))
    load_adapter(fresh, out / "fsdp_adapter_rank0.pt")  # every rank loads rank 0's file
    with torch.no_grad():
        reloaded_output = fresh(PROBE_X)
    return {
        "phases": phases,
        "warnings": caught,
        "state": state,
        "output": output,
        "sharded_rows": sharded_rows,
        "reloaded_state": lora_dash.adapter_state_dict(fresh),
        "reloaded_output": reloaded_output,
    }


def main(rank, world, port, out):
    gloo_group.join(rank, world, port)
    for name, run in (("ddp", ddp_run), ("fsdp", fsdp_run)):
        try:
            result = run(rank, world, out)
        except Exception:  # reported by the test that reads the result
            result = {"error": traceback.format_exc()}
        torch.save(result, out / f"{name}_rank{rank}.pt")
    gloo_group.leave()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
