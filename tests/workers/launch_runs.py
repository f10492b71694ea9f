"""One rank of ``tests/test_distributed_launch.py``: the launch shared among gloo ranks against the redundant
one. Run as ``python launch_runs.py RANK WORLD STORE_PORT OUT_DIR``; it joins the test's TCPStore on
127.0.0.1 and writes ``OUT_DIR/launch_rank{RANK}.pt``: ``{scenario: result or {"error_trace": traceback}}``.

Scenarios (``…_ddp`` on plain tensors under DDP, ``…_fsdp`` on FSDP2 shards):

- ``train``: plain LoRA for ``T`` steps, a launch, ``STEPS - T`` more steps; once with the shared launch
  (counting this rank's SVDs and whole-weight all-gathers during it), once with ``distributed=False``.
- ``random``: the ``"random"`` strategy on a fresh model, shared and redundant.
- ``disagree_layers`` / ``disagree_phase`` (plain tensors): the last rank holds other layers, or has launched
  one layer by itself; every rank's error.
- ``bench``: :func:`lora_dash.bench.launch.timed_launches` of the benchmark's ``--quick`` matrices.
- ``error_one`` / ``error_every``: a NaN planted in ``B`` of one layer on one rank (of one layer on each
  rank, each owned by that rank); every rank's error and phase; then the NaNs are removed and the launch
  repeated (shared and redundant).
"""

import copy
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora_dash  # noqa: E402
from lora_dash import directions  # noqa: E402
from lora_dash import distributed as shared  # noqa: E402
from lora_dash.bench.launch import QUICK, timed_launches  # noqa: E402

from helpers import batch, make_optimizer  # noqa: E402
from workers import gloo_group  # noqa: E402

#: Five linears of five shapes (out × in: 40×12, 24×40, 32×24, 16×32, 10×16), so the assignment has work.
WIDTHS = (12, 40, 24, 32, 16, 10)
TARGETS = r"\d*[02468]"  # the linears of the Sequential, not the ReLUs
R, ALPHA, S = 4, 8.0, 3
T, STEPS = 3, 6
GLOBAL_BATCH = 12  # divisible by 2 and 3 ranks


def build(init_seed: int = 1) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        layers += [nn.Linear(fan_in, fan_out)] + ([nn.ReLU()] if index < len(WIDTHS) - 2 else [])
    model = nn.Sequential(*layers)
    torch.manual_seed(init_seed)
    lora_dash.inject(model, TARGETS, r=R, alpha=ALPHA, s=S)
    return model


def wrap(model: nn.Module, engine: str) -> nn.Module:
    """The module to call: DDP around ``model``, or ``model`` itself with every layer sharded by FSDP2."""
    if engine == "ddp":
        return DistributedDataParallel(model)
    for layer in lora_dash.dash_layers(model).values():
        fully_shard(layer)
    return fully_shard(model)


def owners(model: nn.Module, world: int) -> list[int]:
    layers = lora_dash.dash_layers(model).values()
    return shared.assign_owners([shared.svd_cost(layer.out_features, layer.in_features) for layer in layers], world)


class Counted:
    """Counts this rank's SVDs (their shapes) and whole-DTensor all-gathers while active."""

    def __enter__(self):
        self.svd_shapes, self.full_tensors = [], 0
        self._svd, self._full = directions.svd_basis, DTensor.full_tensor

        def svd(weight, *args, **kwargs):
            self.svd_shapes.append(tuple(weight.shape))
            return self._svd(weight, *args, **kwargs)

        def full_tensor(tensor, *args, **kwargs):
            self.full_tensors += 1
            return self._full(tensor, *args, **kwargs)

        directions.svd_basis, DTensor.full_tensor = svd, full_tensor
        return self

    def __exit__(self, *exc):
        directions.svd_basis, DTensor.full_tensor = self._svd, self._full


def train_scenario(engine: str, rank: int, world: int, distributed: bool) -> dict:
    model = build()
    forward = wrap(model, engine)
    optimizer = make_optimizer(model)
    result = {}
    for step in range(1, STEPS + 1):
        optimizer.zero_grad()
        x, y = batch(step, size=GLOBAL_BATCH)
        F.mse_loss(forward(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        optimizer.step()
        if step == T:
            result["before_launch"] = lora_dash.adapter_state_dict(model)
            with Counted() as counted:
                lora_dash.launch(model, distributed=distributed)
            result["svd_shapes"], result["full_tensors"] = counted.svd_shapes, counted.full_tensors
            result["launched"] = lora_dash.adapter_state_dict(model)
            for delta in (layer.dash_delta for layer in lora_dash.dash_layers(model).values()):
                optimizer.state.pop(delta, None)  # as LaunchController does
    result["final"] = lora_dash.adapter_state_dict(model)
    with torch.no_grad():
        result["output"] = forward(batch(0, size=GLOBAL_BATCH)[0])
    weight = lora_dash.dash_layers(model)["2"].base.weight
    result["local_rows"] = weight.to_local().shape[0] if isinstance(weight, DTensor) else weight.shape[0]
    return result


def random_scenario(engine: str, rank: int, world: int) -> dict:
    result = {}
    for distributed in (True, False):
        model = build()
        wrap(model, engine)
        lora_dash.launch(model, strategy="random", seed=5, distributed=distributed)
        result[distributed] = lora_dash.adapter_state_dict(model)
    return result


def plant_nan(model: nn.Module, name: str, rank: int, on_rank: int) -> None:
    """A NaN in ``B`` of layer ``name`` on ``on_rank`` only (under FSDP2: in that rank's shard)."""
    B = lora_dash.dash_layers(model)[name].lora_B
    local = B.to_local() if isinstance(B, DTensor) else B
    if rank == on_rank:
        with torch.no_grad():
            local[-1, -1] = float("nan")


def error_scenario(engine: str, rank: int, world: int, planted: list[tuple[str, int]]) -> dict:
    """Plant NaNs at ``[(layer name, rank)]``, launch, record; remove them and launch again."""
    result = {"planted": [name for name, _ in planted]}
    model = build()
    wrap(model, engine)
    clean = lora_dash.adapter_state_dict(model)
    for name, on_rank in planted:
        plant_nan(model, name, rank, on_rank)
    try:
        lora_dash.launch(model)
    except (ValueError, RuntimeError) as error:
        result["error"] = (type(error).__name__, str(error))
    state = lora_dash.adapter_state_dict(model)
    result["launched_after_error"] = [bool(value) for key, value in state.items() if key.endswith("dash_launched")]
    result["buffers_untouched"] = all(torch.equal(state[key], clean[key]) for key in state if "dash_" in key)
    for name, _ in planted:
        with torch.no_grad():
            lora_dash.dash_layers(model)[name].lora_B.zero_()
    repaired = copy.deepcopy(lora_dash.adapter_state_dict(model))
    lora_dash.launch(model)
    result["relaunched"] = lora_dash.adapter_state_dict(model)
    reference = build()
    wrap(reference, engine)
    lora_dash.load_adapter_state_dict(reference, repaired)
    lora_dash.launch(reference, distributed=False)
    result["relaunched_redundant"] = lora_dash.adapter_state_dict(reference)
    return result


def disagreement_scenario(rank: int, world: int, kind: str) -> dict:
    """The last rank alone has a layer with another ``s`` (``kind="layers"``), or has launched layer ``"0"``
    by itself (``kind="phase"``); every rank's error and phase after a launch."""
    model = build()
    if rank == world - 1 and kind == "layers":
        model = nn.Sequential(*model[:-1], lora_dash.LoRADashLinear(model[-1].base, r=R, alpha=ALPHA, s=S - 1))
    if rank == world - 1 and kind == "phase":
        lora_dash.dash_layers(model)["0"].launch()
    result = {}
    try:
        lora_dash.launch(model)
    except (ValueError, RuntimeError) as error:
        result["error"] = (type(error).__name__, str(error))
    result["launched"] = {name: layer.launched for name, layer in lora_dash.dash_layers(model).items()}
    return result


def scenarios(rank: int, world: int) -> dict:
    names = list(lora_dash.dash_layers(build()))
    layer_owners = owners(build(), world)
    # One rank fails: the last, on its lowest-numbered layer. Every rank fails: each on its lowest-numbered
    # layer, so each has its own message and all must raise the one of the lowest-numbered layer.
    one = [(names[layer_owners.index(world - 1)], world - 1)]
    every = [(names[layer_owners.index(rank)], rank) for rank in range(world)]
    runs = {f"disagree_{kind}": lambda k=kind: disagreement_scenario(rank, world, k) for kind in ("layers", "phase")}
    runs["bench"] = lambda: timed_launches(QUICK.scaling_shapes, rounds=1)
    for engine in ("ddp", "fsdp"):
        runs[f"train_shared_{engine}"] = lambda e=engine: train_scenario(e, rank, world, True)
        runs[f"train_redundant_{engine}"] = lambda e=engine: train_scenario(e, rank, world, False)
        runs[f"random_{engine}"] = lambda e=engine: random_scenario(e, rank, world)
        runs[f"error_one_{engine}"] = lambda e=engine: error_scenario(e, rank, world, one)
        runs[f"error_every_{engine}"] = lambda e=engine: error_scenario(e, rank, world, every)
    return runs


def main(rank: int, world: int, port: int, out: Path) -> None:
    gloo_group.join(rank, world, port)  # one thread per rank: the ranks share two cores, and SVDs compare
    results = {}
    for name, run in scenarios(rank, world).items():
        started = time.perf_counter()
        try:
            results[name] = run()
        except Exception:  # reported by the test that reads the result
            results[name] = {"error_trace": traceback.format_exc()}
        print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)  # in the log, for a slow run
    torch.save(results, out / f"launch_rank{rank}.pt")
    gloo_group.leave()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
