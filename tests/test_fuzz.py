"""Property-based fuzzing of the public API (hypothesis, stateful): random small models (``nn.Linear`` and
GPT-2 ``Conv1D`` layers), random targets (regexes and PEFT-style lists), random r / s / t / α / dropout, and
random sequences of step, launch, merge, unmerge, save, load, adapter round trip and train/eval switches.

After every operation the model must compute what METHOD.md says it computes, from the *pristine*
pretrained weights and the adapter's current tensors; an operation that raises must raise a clear
``ValueError``/``RuntimeError`` only when the state forbids it, and leave model, optimizer and controller
exactly as they were.
"""

import copy
import tempfile
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from torch import Tensor, nn

from lora_dash import LaunchController, adapter_parameters, adapter_state_dict, dash_layers, inject
from lora_dash.checkpoint import load_adapter, load_training_checkpoint, save_adapter, save_training_checkpoint

from helpers import assert_same, assert_unchanged, snapshot

pytestmark = pytest.mark.slow  # seconds of random operation sequences: make test-fast leaves this file out
EXAMPLES, STEPS_PER_EXAMPLE = 60, 14
#: Hypothesis draws early entries more often: training steps first, the costly file round trip last.
OPERATIONS = ["step", "launch", "merge", "unmerge", "toggle_training", "save", "load", "adapter_file_round_trip"]


class Conv1D(nn.Module):
    """GPT-2 style: ``weight`` stored ``(in, out)``, ``y = x @ weight + bias``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class Chain(nn.Module):
    """``blocks.0 → tanh → blocks.1 → …``; each block an ``nn.Linear`` or a ``Conv1D``."""

    def __init__(self, widths: list[int], conv1d: list[bool]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Conv1D(n_out, n_in) if is_conv else nn.Linear(n_in, n_out)
            for n_in, n_out, is_conv in zip(widths, widths[1:], conv1d)
        )

    def forward(self, x: Tensor) -> Tensor:
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index < len(self.blocks) - 1:
                x = torch.tanh(x)
        return x


@st.composite
def specs(draw) -> dict:
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(2, 7), min_size=depth + 1, max_size=depth + 1))
    chosen = sorted(draw(st.sets(st.integers(0, depth - 1), min_size=1)))
    digits = [str(i) for i in chosen]
    alternatives = "|".join(digits)
    styles = [
        rf"blocks\.({alternatives})",
        rf"blocks\.[{''.join(digits)}]",
        rf".*\.({alternatives})",
        digits,
        [f"blocks.{i}" for i in chosen],
    ]  # lists: a dotted suffix, whole names
    if len(chosen) == depth:
        styles.append(r"blocks\.\d+")
    r = draw(st.integers(1, 4))
    k = min(min(widths[i], widths[i + 1]) for i in chosen)
    return {
        "widths": widths,
        "conv1d": draw(st.lists(st.booleans(), min_size=depth, max_size=depth)),
        "adapted": [f"blocks.{i}" for i in chosen],
        "targets": draw(st.sampled_from(styles)),
        "layer": {
            "r": r,
            "s": draw(st.integers(1, k)),
            "alpha": draw(st.sampled_from([1.0, 2.0 * r, 8.0])),
            "use_rslora": draw(st.booleans()),
            "dropout": draw(st.sampled_from([0.0, 0.2])),
        },
        "launch_step": draw(st.integers(0, 4)),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(spec: dict) -> Chain:
    torch.manual_seed(spec["seed"])
    model = Chain(spec["widths"], spec["conv1d"])
    inject(model, spec["targets"], **spec["layer"])
    return model


class AdapterMachine(RuleBasedStateMachine):
    """What the model is expected to be is tracked here (phase, merge, step count); the tensors it
    trains are read from the model and checked against the equations."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.TemporaryDirectory()

    def teardown(self) -> None:
        self.folder.cleanup()

    @initialize(spec=specs())
    def build_model(self, spec: dict) -> None:
        self.spec = spec
        self.model = build(spec)
        assert list(dash_layers(self.model)) == spec["adapted"]  # the targets adapted exactly these
        self.pristine = {}  # index → (W in (out, in) layout, b), float64, before any merge drift
        for index, block in enumerate(self.model.blocks):
            base = getattr(block, "base", block)
            weight = base.weight.T if isinstance(base, Conv1D) else base.weight
            self.pristine[index] = (weight.detach().double().clone(), base.bias.detach().double().clone())
        self.optimizer = torch.optim.AdamW(adapter_parameters(self.model), lr=0.05)
        self.controller = LaunchController(self.model, launch_step=spec["launch_step"]).attach(self.optimizer)
        self.expected = {"launched": spec["launch_step"] == 0, "merged": False, "steps": 0}
        self.probe = torch.randn(5, spec["widths"][0], generator=torch.Generator().manual_seed(spec["seed"]))
        self.batches = 0
        self.save()  # a checkpoint to go back to from the start

    # ------------------------------------------------------------------------------- helpers
    def capture(self) -> dict:
        return {
            "model": snapshot(self.model),
            "steps": self.controller.steps,
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "training": self.model.training,
        }

    def assert_as_captured(self, before: dict) -> None:
        assert_unchanged(self.model, before["model"])
        assert self.controller.steps == before["steps"]
        assert self.model.training == before["training"]
        assert_same(self.optimizer.state_dict(), before["optimizer"])

    def attempt(self, operation, allowed_to_fail: bool, must_fail: bool | None = None) -> bool:
        """Run ``operation``; a failure must be allowed, clear, and change nothing. Returns success."""
        must_fail = allowed_to_fail if must_fail is None else must_fail
        before = self.capture()
        try:
            with warnings.catch_warnings():  # a LoRA-Dash RuntimeWarning here would mean an inconsistent state
                warnings.simplefilter("error", RuntimeWarning)
                operation()
        except (ValueError, RuntimeError) as error:
            assert allowed_to_fail, f"unexpected {error!r}"
            self.assert_as_captured(before)
            return False
        assert not must_fail, "should have raised"
        return True

    def path(self, name: str) -> Path:
        return Path(self.folder.name) / name

    # ---------------------------------------------------------------------------- operations
    @rule(operation=st.sampled_from(OPERATIONS))
    def operate(self, operation: str) -> None:
        getattr(self, operation)()

    def step(self) -> None:
        self.batches += 1

        def train() -> None:
            generator = torch.Generator().manual_seed(self.spec["seed"] + self.batches)
            x = torch.randn(6, self.spec["widths"][0], generator=generator)
            y = torch.randn(6, self.spec["widths"][-1], generator=generator)
            self.optimizer.zero_grad()
            F.mse_loss(self.model(x), y).backward()  # merged: nothing requires grad, so this raises
            self.optimizer.step()

        if self.attempt(train, allowed_to_fail=self.expected["merged"]):
            self.expected["steps"] += 1
            self.expected["launched"] |= self.expected["steps"] == self.spec["launch_step"]

    def launch(self) -> None:
        if self.attempt(self.controller.launch, allowed_to_fail=self.expected["launched"] or self.expected["merged"]):
            self.expected["launched"] = True
            assert all(not layer.dash_delta.any() for layer in dash_layers(self.model).values())

    def merge(self) -> None:
        def merge_all() -> None:
            for layer in dash_layers(self.model).values():
                layer.merge()

        if self.attempt(merge_all, allowed_to_fail=self.expected["merged"]):
            self.expected["merged"] = True

    def unmerge(self) -> None:
        def unmerge_all() -> None:
            for layer in dash_layers(self.model).values():
                layer.unmerge()

        if self.attempt(unmerge_all, allowed_to_fail=not self.expected["merged"]):
            self.expected["merged"] = False

    def toggle_training(self) -> None:
        self.model.train(not self.model.training)

    def save(self) -> None:
        save = partial(save_training_checkpoint, self.model, self.optimizer, self.controller, self.path("run.pt"))
        if self.attempt(save, allowed_to_fail=self.expected["merged"]):
            self.saved = {
                "adapter": adapter_state_dict(self.model),
                "expected": dict(self.expected),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            }

    def load(self) -> None:
        load = partial(load_training_checkpoint, self.model, self.optimizer, self.controller, self.path("run.pt"))
        saved = self.saved["expected"]
        # Known core issue (test_checkpoint: ..._after_an_early_manual_launch_loads_back): a checkpoint saved
        # after launch() before step t is refused today. Tolerated here so the fuzzer finds other things.
        early_launch = saved["launched"] and saved["steps"] < self.spec["launch_step"]
        merged = self.expected["merged"]
        if self.attempt(load, allowed_to_fail=merged or early_launch, must_fail=merged):
            self.expected.update(self.saved["expected"])
            assert_same(adapter_state_dict(self.model), self.saved["adapter"])
            assert_same(self.optimizer.state_dict(), self.saved["optimizer"])

    def adapter_file_round_trip(self) -> None:
        def round_trip() -> None:
            save_adapter(self.model, self.path("adapter.safetensors"))
            fresh = build(self.spec)
            load_adapter(fresh, self.path("adapter.safetensors"))
            assert_same(adapter_state_dict(fresh), adapter_state_dict(self.model))
            fresh.eval()
            with torch.no_grad():  # the fresh copy has the pristine W, the model maybe merge-unmerge rounding
                expected = self.formula(self.probe)
                torch.testing.assert_close(
                    fresh(self.probe).double(), expected, rtol=1e-4, atol=1e-4 * (1 + expected.abs().max().item())
                )

        self.attempt(round_trip, allowed_to_fail=self.expected["merged"])

    # ---------------------------------------------------------------------------- invariants
    @invariant()
    def phase_merge_and_step_count_are_as_expected(self) -> None:
        layers = dash_layers(self.model).values()
        assert {layer.launched for layer in layers} == {self.expected["launched"]}
        assert {layer.merged for layer in layers} == {self.expected["merged"]}
        assert self.controller.steps == self.expected["steps"]

    @invariant()
    def output_is_the_method_md_formula_on_the_pristine_weights(self) -> None:
        training = self.model.training
        self.model.eval()  # dropout off: the formula has no noise
        with torch.no_grad():
            output = self.model(self.probe)
        self.model.train(training)
        expected = self.formula(self.probe)
        torch.testing.assert_close(output.double(), expected, rtol=1e-4, atol=1e-4 * (1 + expected.abs().max().item()))

    @invariant()
    def frozen_weights_are_pristine_and_only_adapters_train(self) -> None:
        layers = dash_layers(self.model)
        for index, block in enumerate(self.model.blocks):
            base = getattr(block, "base", block)
            weight = base.weight.T if isinstance(base, Conv1D) else base.weight
            W, b = self.pristine[index]
            assert torch.equal(base.bias.double(), b)
            if not self.expected["merged"]:  # merge + unmerge may leave float32 rounding behind
                torch.testing.assert_close(weight.double(), W, rtol=0, atol=1e-5 * (1 + W.abs().max().item()))
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        assert trainable == {f"{name}.{key}" for name in layers for key in ("lora_A", "lora_B", "dash_delta")}

    @invariant()
    def dash_directions_are_singular_vector_pairs_of_the_pristine_weight(self) -> None:
        for name, layer in dash_layers(self.model).items():
            W = self.pristine[int(name.rsplit(".", 1)[1])][0]
            if not layer.launched:
                assert not layer.dash_U.any() and not layer.dash_V.any() and (layer.dash_index == -1).all()
                continue
            sigma = torch.linalg.svdvals(W)
            index = layer.dash_index
            assert index.unique().numel() == layer.s and (index >= 0).all() and (index < sigma.numel()).all()
            projected = layer.dash_U.double().T @ W @ layer.dash_V.double()  # diag(σ[index]), up to sign
            torch.testing.assert_close(projected, torch.diag(sigma[index]), rtol=0, atol=1e-4 * sigma[0].item())

    def formula(self, x: Tensor) -> Tensor:
        """METHOD.md §3: ``y = W x + b + (α/r)·B A x + U_s diag(δ) V_sᵀ x`` per block, in float64."""
        layers = dash_layers(self.model)
        h = x.double()
        for index in range(len(self.model.blocks)):
            W, b = self.pristine[index]
            y = h @ W.T + b
            layer = layers.get(f"blocks.{index}")
            if layer is not None:
                A, B, delta = (t.detach().double() for t in (layer.lora_A, layer.lora_B, layer.dash_delta))
                U_s, V_s = layer.dash_U.double(), layer.dash_V.double()
                y = y + layer.scaling * (h @ A.T) @ B.T + ((h @ V_s) * delta) @ U_s.T
            h = torch.tanh(y) if index < len(self.model.blocks) - 1 else y
        return h


AdapterMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS_PER_EXAMPLE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],  # no explain: minutes
)
test_random_models_and_operation_sequences_match_the_method_and_fail_cleanly = AdapterMachine.TestCase
