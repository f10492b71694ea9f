"""Behaviour no other test held to account: two controllers side by side, a list target that is only a
substring of a module name, ranks that name a layer differently, a training checkpoint edited under
its old checksum, and δ's gradient while A and B are frozen."""

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_dash import LaunchController, LoRADashLinear, dash_layers, inject
from lora_dash.checkpoint import _checksum, load_training_checkpoint, save_training_checkpoint

from helpers import (
    assert_refused_and_unchanged,
    assert_same,
    assert_same_adapter,
    assert_unchanged,
    build_adapted,
    make_optimizer,
    run_gloo_workers,
    snapshot,
    train,
    train_step,
)

F64 = torch.float64


# ------------------------------------------------------------------------- two controllers at once
def trained_alone(init_seed: int, launch_step: int, steps: int) -> nn.Module:
    """The MLP of ``init_seed`` after ``steps`` steps, the only model in the process that trains."""
    model = build_adapted(init_seed=init_seed)
    train(model, steps, launch_step=launch_step)
    return model


def test_two_controllers_each_launch_their_own_model_at_their_own_step_and_touch_nothing_else():
    first, second = build_adapted(init_seed=1), build_adapted(init_seed=2)
    first_optimizer, second_optimizer = make_optimizer(first), make_optimizer(second)
    first_controller = LaunchController(first, launch_step=2).attach(first_optimizer)
    second_controller = LaunchController(second, launch_step=3).attach(second_optimizer)
    idle = snapshot(second)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # The first model steps past both launch steps while the second stays idle.
        for step in range(1, 6):
            train_step(first, first_optimizer, step)
            assert (first_controller.steps, first_controller.launched) == (step, step >= 2)
            assert (second_controller.steps, second_controller.launched) == (0, False)
            assert_unchanged(second, idle)
        first_delta_state = {
            name: copy.deepcopy(first_optimizer.state[layer.dash_delta]) for name, layer in dash_layers(first).items()
        }
        # Then the second steps, and launches at its own third step; the first is left alone.
        for step in range(1, 4):
            train_step(second, second_optimizer, step)
            assert (second_controller.steps, second_controller.launched) == (step, step >= 3)
            assert (first_controller.steps, first_controller.launched) == (5, True)
    for name, layer in dash_layers(first).items():
        assert_same(first_optimizer.state[layer.dash_delta], first_delta_state[name], name)
    assert not [str(w.message) for w in caught if "LoRA-Dash" in str(w.message)]
    # Each ends bit for bit where it would have, trained alone.
    assert_same_adapter(trained_alone(1, launch_step=2, steps=5), first)
    assert_same_adapter(trained_alone(2, launch_step=3, steps=3), second)


# ------------------------------------------------------------------- a list target's substrings
class Encoder(nn.Module):
    """Two blocks of ``query``, ``key`` and ``value`` linears."""

    def __init__(self) -> None:
        super().__init__()
        names = ("query", "key", "value")
        self.blocks = nn.ModuleList(nn.ModuleDict({name: nn.Linear(8, 8) for name in names}) for _ in range(2))


# "quer" and "0.quer" start a real name, "uer" lies inside one, and "locks.0.query" ends
# "blocks.0.query" but not at a dot: a list entry must equal a name or end it after a dot.
SUBSTRINGS = ["quer", "uer", "0.quer", "locks.0.query"]


@pytest.mark.parametrize("typo", SUBSTRINGS)
def test_a_list_entry_that_is_only_a_substring_of_a_module_name_is_refused(typo):
    model = Encoder()
    assert_refused_and_unchanged(
        lambda: inject(model, [typo], r=2, s=2), model, re.escape(f"{[typo]!r} matches no module")
    )


@pytest.mark.parametrize("typo", SUBSTRINGS)
def test_a_substring_entry_beside_one_that_matches_selects_nothing_and_is_named(typo):
    model = Encoder()
    with pytest.warns(UserWarning, match=re.escape(f"targets: {[typo]!r} match no module")):
        injected = inject(model, [typo, "value"], r=2, s=2)
    assert set(injected) == set(dash_layers(model)) == {"blocks.0.value", "blocks.1.value"}


# ---------------------------------------------------------------- ranks that disagree on a name
NAMES_WORKER = Path(__file__).parent / "workers" / "name_disagreement.py"


@pytest.mark.slow  # two gloo processes
def test_ranks_whose_layers_differ_only_in_a_name_all_refuse_to_launch(tmp_path):
    world = 2
    run_gloo_workers(NAMES_WORKER, world, tmp_path, timeout_s=180)
    results = [torch.load(tmp_path / f"names_rank{rank}.pt", weights_only=True) for rank in range(world)]
    for rank, result in enumerate(results):
        # The same models, named alike, launch: what differs below is the name alone.
        assert result["agree"]["error"] is None, rank
        assert all(result["agree"]["launched"].values()), rank
        assert result["disagree"]["error"] == (
            "ValueError",
            "the ranks differ in their LoRA-Dash layers (names, shapes or s); where each rank holds "
            "its own layers (pipeline stages), launch with distributed=False",
        ), rank
        assert not any(result["disagree"]["launched"].values()), rank


# ------------------------------------------------------- a training checkpoint and its checksum
T = 3  # launch step of the checkpointed runs


def trained_run(init_seed: int, steps: int = T + 2):
    model = build_adapted(init_seed=init_seed)
    optimizer, controller = train(model, steps, launch_step=T)
    return model, optimizer, controller


def add_one(tensor: torch.Tensor) -> None:
    tensor.view(-1)[0] += 1


#: Edits that leave a valid checkpoint of another run: only the checksum can tell.
EDITS = {
    "adapter-B": lambda content: add_one(content["adapter"]["tensors"]["fc2.lora_B"]),
    "adapter-delta": lambda content: add_one(content["adapter"]["tensors"]["fc1.dash_delta"]),
    "optimizer-moment": lambda content: add_one(content["optimizer"]["state"][0]["exp_avg"]),
    "controller-steps": lambda content: content["controller"].update(steps=T + 4),
    "numpy-rng": lambda content: add_one(content["rng"]["numpy"]["state"]["key"]),
}


def run_state(model, optimizer, controller) -> dict:
    return {
        "adapter": copy.deepcopy(snapshot(model)),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "steps": controller.steps,
    }


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_a_training_checkpoint_edited_under_its_old_checksum_is_refused_and_run_unchanged(edit, tmp_path):
    path = tmp_path / "run.pt"
    save_training_checkpoint(*trained_run(init_seed=1), path)
    payload = torch.load(path, weights_only=True)
    edit(payload["content"])
    torch.save(payload, path)  # the old checksum

    model, optimizer, controller = trained_run(init_seed=3)
    before = run_state(model, optimizer, controller)
    with pytest.raises(ValueError, match="does not match its SHA-256 checksum"):
        load_training_checkpoint(model, optimizer, controller, path)
    after = run_state(model, optimizer, controller)
    assert_unchanged(model, before["adapter"])
    assert_same(after["optimizer"], before["optimizer"], "optimizer")
    assert after["steps"] == before["steps"]

    # Signed anew, the same content loads: the checksum is all that refused it.
    payload["checksum"] = _checksum(payload["content"])
    torch.save(payload, path)
    load_training_checkpoint(*trained_run(init_seed=3), path)


# --------------------------------------------------------------- δ's gradient with A, B frozen
def dense_reference(layer: LoRADashLinear, x: torch.Tensor, trainable: tuple[str, ...]):
    """``y = x (W + (α/r)·B A + U_s diag(δ) V_sᵀ)ᵀ + b`` by autograd on fresh leaves: the output and
    the leaves ``{"x", "delta", *trainable}``, where ``trainable`` names the factors that train."""
    leaves = {
        "x": x.detach().clone().requires_grad_(True),
        "delta": layer.dash_delta.detach().clone().requires_grad_(True),
        "lora_A": layer.lora_A.detach().clone().requires_grad_("lora_A" in trainable),
        "lora_B": layer.lora_B.detach().clone().requires_grad_("lora_B" in trainable),
    }
    U_s, V_s = layer.dash_U, layer.dash_V  # (out, s), (in, s)
    update = layer.scaling * leaves["lora_B"] @ leaves["lora_A"]  # (out, in)
    weight = layer.base.weight + update + U_s @ torch.diag(leaves["delta"]) @ V_s.T
    return leaves["x"] @ weight.T + layer.base.bias, leaves


@pytest.mark.parametrize("frozen", [("lora_A", "lora_B"), ("lora_A",), ("lora_B",)], ids=["A-and-B", "A", "B"])
def test_delta_gradient_with_frozen_factors_equals_the_dense_reference_in_float64(frozen):
    generator = torch.Generator().manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=F64)

    base = nn.Linear(12, 10, dtype=F64)
    layer = LoRADashLinear(base, r=4, alpha=8.0, s=3)
    with torch.no_grad():
        for tensor in (base.weight, base.bias, layer.lora_A, layer.lora_B):
            tensor.copy_(draw(*tensor.shape))
    layer.launch()
    with torch.no_grad():
        layer.dash_delta.copy_(draw(3))  # δ away from zero, so that no term vanishes
    for name in frozen:
        getattr(layer, name).requires_grad_(False)
    trainable = tuple(name for name in ("lora_A", "lora_B") if name not in frozen)

    x = draw(2, 5, 12).requires_grad_(True)  # (batch, tokens, in)
    grad_out = draw(2, 5, 10)
    y = layer(x)
    (y * grad_out).sum().backward()
    expected, leaves = dense_reference(layer, x, trainable)
    (expected * grad_out).sum().backward()

    assert layer.dash_delta.grad is not None
    close = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(y, expected, **close)
    torch.testing.assert_close(layer.dash_delta.grad, leaves["delta"].grad, **close)
    torch.testing.assert_close(x.grad, leaves["x"].grad, **close)
    for name in frozen:
        assert getattr(layer, name).grad is None, name
    for name in trainable:
        torch.testing.assert_close(getattr(layer, name).grad, leaves[name].grad, **close)
