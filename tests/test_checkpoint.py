"""Adapter files (safetensors) and training checkpoints (torch, weights_only) (`lora_dash.checkpoint`): safe
to load, atomic to write, and every bad file is a clear error that leaves the model (and optimizer,
controller, RNG) as it was."""

import builtins
import copy
import functools
import json
import os
import pickle
import random
import re
import sys

import numpy as np
import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from lora_dash import (
    LaunchController,
    adapter_state_dict,
    checkpoint,
    dash_layers,
    inject,
    load_adapter_state_dict,
)
from lora_dash.checkpoint import load_adapter, load_training_checkpoint, save_adapter, save_training_checkpoint

from helpers import (
    ADAPTED,
    ALPHA,
    MLP,
    R,
    S,
    assert_refused_and_unchanged,
    assert_same,
    assert_unchanged,
    batch,
    build_adapted,
    build_base,
    build_with_trained_head,
    snapshot,
    train,
    train_step,
)

T = 3  # launch step


def trained(steps: int, init_seed: int = 1, build=build_adapted):
    """A model (``build(init_seed)``), optimizer and attached controller after ``steps`` optimizer steps."""
    model = build(init_seed=init_seed)
    optimizer, controller = train(model, steps, launch_step=T)
    return model, optimizer, controller


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    """A launched model's adapter file (bytes and path), and the state it holds."""
    model, _, _ = trained(T + 2)
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    save_adapter(model, path)
    return path, path.read_bytes(), adapter_state_dict(model)


def read_adapter_file(path) -> tuple[dict, dict]:
    """The header metadata and the tensors of an adapter file, read with safetensors alone."""
    with safetensors.safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    return metadata, load_file(str(path))


def resign(path, mutate) -> None:
    """Rewrite an adapter file with ``mutate({"metadata": ..., "tensors": ...})`` applied and a valid
    checksum: what a careful attacker can do."""
    metadata, tensors = read_adapter_file(path)
    del metadata["checksum"]
    content = {"metadata": metadata, "tensors": tensors}
    mutate(content)
    content["metadata"]["checksum"] = checkpoint._checksum(content)
    save_file(content["tensors"], str(path), metadata=content["metadata"])


def resign_training_checkpoint(path, mutate) -> None:
    """Rewrite a training checkpoint with ``mutate(content)`` applied and a valid checksum."""
    payload = torch.load(path, weights_only=True)
    mutate(payload["content"])
    payload["checksum"] = checkpoint._checksum(payload["content"])
    torch.save(payload, path)


# --------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("steps", [T - 1, T + 2], ids=["pre-launch", "launched"])
def test_adapter_file_loads_into_a_fresh_model_with_identical_state_and_outputs(steps, tmp_path):
    model, _, _ = trained(steps)
    save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = build_adapted(init_seed=2)  # another A: everything must come from the file
    load_adapter(fresh, tmp_path / "adapter.safetensors")
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(fresh)[key], value), key
    probe = batch(-1, size=16)[0]
    with torch.no_grad():
        assert torch.equal(fresh(probe), model(probe))


def test_adapter_file_is_an_ordinary_safetensors_file_with_the_state_and_a_readable_header(adapter_file):
    # Any stack reads it with safetensors alone: the body is the adapter state dict plus one sketch per layer.
    path, _, state = adapter_file
    metadata, tensors = read_adapter_file(path)
    assert set(tensors) == set(state) | {f"{name}.base_sketch" for name in ("fc1", "fc2", "fc3")}
    assert all(torch.equal(tensors[key], value) and tensors[key].dtype == value.dtype for key, value in state.items())
    assert (metadata["format"], metadata["version"]) == (checkpoint.ADAPTER_FORMAT, str(checkpoint.VERSION))
    assert metadata["phase"] == "dash" and json.loads(metadata["trained_modules"]) == []
    assert json.loads(metadata["layers"])["fc2"] == {
        "in_features": 16,
        "out_features": 16,
        "r": R,
        "alpha": ALPHA,
        "s": S,
        "use_rslora": False,
        "eps": 0.0,
    }
    assert metadata["checksum"].startswith("sha256:")
    model = build_adapted(init_seed=3)
    load_adapter_state_dict(model, {key: tensors[key] for key in state})  # the body minus sketches loads as it is


def test_pre_launch_adapter_file_says_so_in_its_header(tmp_path):
    model, _, _ = trained(T - 1)
    save_adapter(model, tmp_path / "adapter.safetensors")
    assert read_adapter_file(tmp_path / "adapter.safetensors")[0]["phase"] == "pre-launch"


def test_saving_layers_in_different_phases_is_refused_and_writes_nothing(tmp_path):
    model, _, _ = trained(1)
    model.fc2.launch()  # fc1 and fc3 pre-launch: no file could load such a state back
    with pytest.raises(ValueError, match="different phases"):
        save_adapter(model, tmp_path / "adapter.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call", ["save", "load"])
def test_adapter_files_without_safetensors_name_what_to_install_and_change_nothing(
    call, adapter_file, tmp_path, monkeypatch
):
    model = build_adapted(init_seed=3)
    before = snapshot(model)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        if call == "save":
            save_adapter(model, tmp_path / "adapter.safetensors")
        else:
            load_adapter(model, adapter_file[0])
    assert_unchanged(model, before)
    assert list(tmp_path.iterdir()) == []


def test_training_checkpoint_restores_the_python_numpy_and_torch_random_streams(tmp_path):
    model, optimizer, controller = trained(2)
    save_training_checkpoint(model, optimizer, controller, tmp_path / "run.pt")
    draws = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    load_training_checkpoint(model, optimizer, controller, tmp_path / "run.pt")
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_training_checkpoint_restores_optimizer_state_and_step_count(tmp_path):
    model, optimizer, controller = trained(T + 1)
    save_training_checkpoint(model, optimizer, controller, tmp_path / "run.pt")
    fresh, fresh_optimizer, fresh_controller = trained(0, init_seed=2)
    load_training_checkpoint(fresh, fresh_optimizer, fresh_controller, tmp_path / "run.pt")
    assert (fresh_controller.steps, fresh_controller.launched) == (T + 1, True)
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, entries in saved["state"].items():
        for key, value in entries.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)


# ---------------------------------------------------------------------------------- safe files
class RunsCode:
    """Unpickling this opens (so creates) a file: a stand-in for any code an attacker would run."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def malicious_files(folder):
    """The same payload two ways: torch's zip format and a raw pickle. (A safetensors file holds only
    tensors and strings: there is no third way.)"""
    marker = folder / "code-ran"
    zipped, raw = folder / "zip.pt", folder / "raw.pt"
    torch.save({"state": RunsCode(marker)}, zipped)
    raw.write_bytes(pickle.dumps({"state": RunsCode(marker)}, protocol=2))  # torch.load's own protocol
    return marker, [zipped, raw]


@pytest.mark.parametrize("which", [0, 1], ids=["torch-zip", "raw-pickle"])
def test_malicious_pickle_given_as_adapter_file_is_refused_without_running_its_code(which, tmp_path):
    marker, files = malicious_files(tmp_path)
    model = build_adapted(init_seed=3)
    assert_refused_and_unchanged(
        lambda: load_adapter(model, files[which]), model, "refused: it looks like a torch.save"
    )
    assert not marker.exists()
    pickle.loads(files[1].read_bytes())  # the file really runs code under a plain unpickler
    assert marker.exists()


def test_malicious_training_checkpoint_is_refused_without_running_its_code(tmp_path):
    model, optimizer, controller = trained(1)
    save_training_checkpoint(model, optimizer, controller, tmp_path / "run.pt")
    marker = tmp_path / "code-ran"
    payload = torch.load(tmp_path / "run.pt", weights_only=True)
    payload["content"]["rng"]["python"] = RunsCode(marker)
    torch.save(payload, tmp_path / "run.pt")
    assert_refused_and_unchanged(
        lambda: load_training_checkpoint(model, optimizer, controller, tmp_path / "run.pt"), model, "refused"
    )
    assert not marker.exists()


CUTS = [0, 1, 10, 100, 0.5, -100, -22, -1]  # bytes kept (a fraction; negative: from the end)


@pytest.mark.parametrize("cut", CUTS)
def test_truncated_adapter_file_is_rejected_and_model_unchanged(cut, adapter_file, tmp_path):
    _, data, _ = adapter_file
    keep = int(len(data) * cut) if isinstance(cut, float) else cut % len(data) if cut < 0 else cut
    (tmp_path / "cut.safetensors").write_bytes(data[:keep])
    model = build_adapted(init_seed=3)
    assert_refused_and_unchanged(
        lambda: load_adapter(model, tmp_path / "cut.safetensors"), model, "truncated or corrupted"
    )


def test_flipped_byte_anywhere_never_loads_different_values(adapter_file, tmp_path):
    # safetensors checks no CRC (a flip inside a tensor loads silently); the checksum must catch it. A flip
    # in bytes the loader ignores may load: then the state must be the saved one.
    _, data, state = adapter_file
    model = build_adapted(init_seed=3)
    outcomes = {"rejected": 0, "harmless": 0}
    body = 8 + int.from_bytes(data[:8], "little")
    for offset in [*range(0, body, 23), *range(body, len(data), 37), len(data) - 1]:  # header and tensors
        damaged = bytearray(data)
        damaged[offset] ^= 0x5A
        (tmp_path / "flip.safetensors").write_bytes(damaged)
        before = snapshot(model)
        try:
            load_adapter(model, tmp_path / "flip.safetensors")
        except ValueError:
            assert_unchanged(model, before)
            outcomes["rejected"] += 1
            continue
        assert all(torch.equal(adapter_state_dict(model)[key], value) for key, value in state.items()), offset
        outcomes["harmless"] += 1
        model = build_adapted(init_seed=3)
    assert outcomes["rejected"] > 0, outcomes  # the sweep did reach the tensors


def test_safetensors_does_not_notice_a_flipped_byte_inside_a_tensor(adapter_file):
    # Why the checksum exists: the damaged file is a valid safetensors file with other values.
    _, data, state = adapter_file
    header_length = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + header_length])["fc2.lora_A"]["data_offsets"]
    damaged = bytearray(data)
    damaged[8 + header_length + start] ^= 0x5A  # the first byte of fc2's A
    loaded = safetensors.torch.load(bytes(damaged))
    assert not torch.equal(loaded["fc2.lora_A"], state["fc2.lora_A"])


EDITS = {
    "tensor": lambda content: content["tensors"]["fc2.dash_delta"].add_(1e-3),
    "header": lambda content: content["metadata"].update(phase="pre-launch"),
}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_content_changed_without_updating_the_checksum_is_rejected(edit, adapter_file, tmp_path):
    path = tmp_path / "edited.safetensors"
    metadata, tensors = read_adapter_file(adapter_file[0])
    edit({"metadata": metadata, "tensors": tensors})
    save_file(tensors, str(path), metadata=metadata)  # the old checksum
    model = build_adapted(init_seed=3)
    assert_refused_and_unchanged(lambda: load_adapter(model, path), model, "checksum")


# -------------------------------------------------------------------------------- wrong model
def other_layers():
    model = build_base()
    inject(model, r"fc1|fc2", r=R, alpha=ALPHA, s=S)
    return model


def other_pretrained_weights():
    torch.manual_seed(5)
    model = MLP()
    inject(model, ADAPTED, r=R, alpha=ALPHA, s=S)
    return model


WRONG_MODELS = {
    "fewer-layers": (other_layers, "layers"),
    "other-r": (lambda: build_adapted(r=R + 1), "r=4 \\(model: 5\\)"),
    "other-s": (lambda: build_adapted(s=S - 1), "s=3 \\(model: 2\\)"),
    "other-alpha": (lambda: build_adapted(alpha=2 * ALPHA), "alpha=8.0 \\(model: 16.0\\)"),  # same shapes
    "rslora": (lambda: build_adapted(use_rslora=True), "use_rslora=False"),
    "other-eps": (lambda: build_adapted(eps=1e-6), "eps=0.0"),
    "other-pretrained-weights": (other_pretrained_weights, "another pretrained weight"),
}


@pytest.mark.parametrize("build, match", WRONG_MODELS.values(), ids=WRONG_MODELS.keys())
def test_adapter_file_for_another_model_is_rejected_and_model_unchanged(build, match, adapter_file):
    model = build()
    assert_refused_and_unchanged(lambda: load_adapter(model, adapter_file[0]), model, match)


def test_check_base_false_loads_onto_other_pretrained_weights(adapter_file):
    model = other_pretrained_weights()
    load_adapter(model, adapter_file[0], check_base=False)
    assert all(torch.equal(adapter_state_dict(model)[k], v) for k, v in adapter_file[2].items())


def test_adapter_file_loads_onto_a_bfloat16_copy_of_the_same_weights(adapter_file):
    # The pretrained-weight check tolerates the rounding of a half-precision copy.
    model = build_adapted(init_seed=3).to(torch.bfloat16)
    load_adapter(model, adapter_file[0])
    assert torch.equal(model.fc3.dash_index, adapter_file[2]["fc3.dash_index"])


def test_loading_into_a_merged_layer_is_refused_and_model_unchanged(adapter_file):
    model, _, _ = trained(T)
    model.fc2.merge()
    assert_refused_and_unchanged(lambda: load_adapter(model, adapter_file[0]), model, "'fc2'", RuntimeError)


def test_saving_a_merged_model_is_refused_and_writes_nothing(tmp_path):
    model, _, _ = trained(T)
    model.fc1.merge()
    with pytest.raises(RuntimeError, match="fc1"):
        save_adapter(model, tmp_path / "adapter.safetensors")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------- wrong phase
def launched_flag_without_directions(content):
    content["tensors"]["fc1.dash_index"].fill_(-1)


def pre_launch_with_a_dash(content):
    for name in ("fc1", "fc2", "fc3"):
        content["tensors"][f"{name}.dash_launched"].fill_(False)
    content["metadata"]["phase"] = "pre-launch"


def mixed_phases(content):
    content["tensors"]["fc3.dash_launched"].fill_(False)


def header_phase_disagrees(content):
    content["metadata"]["phase"] = "pre-launch"


def unknown_header_phase(content):
    content["metadata"]["phase"] = "launched"


WRONG_PHASES = {
    "launched-without-directions": (launched_flag_without_directions, "'fc1.dash_index'"),
    "pre-launch-with-a-dash": (pre_launch_with_a_dash, "pre-launch but has non-zero dash state"),
    "mixed-phases": (mixed_phases, "phase 'dash', but layer 'fc3' is pre-launch"),
    "header-phase-disagrees": (header_phase_disagrees, "phase 'pre-launch', but layer 'fc1' is dash"),
    "unknown-header-phase": (unknown_header_phase, "phase 'launched'"),
}


@pytest.mark.parametrize("mutate, match", WRONG_PHASES.values(), ids=WRONG_PHASES.keys())
def test_adapter_file_with_an_inconsistent_phase_is_rejected_and_model_unchanged(mutate, match, adapter_file, tmp_path):
    path = tmp_path / "phase.safetensors"
    path.write_bytes(adapter_file[1])
    resign(path, mutate)
    model = build_adapted(init_seed=3)
    assert_refused_and_unchanged(lambda: load_adapter(model, path), model, match)


def snapshot_run(model, optimizer, controller) -> dict:
    return {
        "model": snapshot(model),
        "optimizer": repr(optimizer.state_dict()),
        "steps": controller.steps,
        "rng": (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()),
    }


def assert_run_unchanged(model, optimizer, controller, before) -> None:
    assert_unchanged(model, before["model"])
    after = snapshot_run(model, optimizer, controller)
    assert (after["optimizer"], after["steps"]) == (before["optimizer"], before["steps"])
    assert after["rng"][:2] == before["rng"][:2] and torch.equal(after["rng"][2], before["rng"][2])


def checkpoint_after_a_failed_launch(path) -> None:
    """The launch at step t fails (a layer is merged then): the controller counted t, no layer launched."""
    model, optimizer, controller = trained(T - 1)
    model.fc2.merge()
    with pytest.raises(RuntimeError, match="'fc2' is merged"):
        train_step(model, optimizer, T)
    model.fc2.unmerge()
    save_training_checkpoint(model, optimizer, controller, path)


def checkpoint_of_another_launch_step(path) -> None:
    model, optimizer, _ = trained(0)
    controller = LaunchController(model, launch_step=T + 1).attach(optimizer)
    save_training_checkpoint(model, optimizer, controller, path)


WRONG_RUNS = {
    "steps-past-t-but-pre-launch": (checkpoint_after_a_failed_launch, f"step {T}"),
    "another-launch-step": (checkpoint_of_another_launch_step, f"launch_step={T + 1}"),
}


@pytest.mark.parametrize("write, match", WRONG_RUNS.values(), ids=WRONG_RUNS.keys())
def test_training_checkpoint_of_the_wrong_phase_is_rejected_and_run_unchanged(write, match, tmp_path):
    write(tmp_path / "run.pt")
    model, optimizer, controller = trained(T + 2, init_seed=3)  # launched: loading would change the phase
    before = snapshot_run(model, optimizer, controller)
    with pytest.raises(ValueError, match=match):
        load_training_checkpoint(model, optimizer, controller, tmp_path / "run.pt")
    assert_run_unchanged(model, optimizer, controller, before)


def test_training_checkpoint_saved_after_an_early_manual_launch_loads_back(tmp_path):
    # controller.launch() before step t is public API ("launch now"); invariant 14 says a checkpoint
    # saved then must load. Today LaunchController.load_state_dict demands launched iff steps >= t.
    model, optimizer, controller = trained(T - 2)
    controller.launch_now()
    save_training_checkpoint(model, optimizer, controller, tmp_path / "run.pt")
    fresh, fresh_optimizer, fresh_controller = trained(0, init_seed=2)
    load_training_checkpoint(fresh, fresh_optimizer, fresh_controller, tmp_path / "run.pt")
    assert (fresh_controller.steps, fresh_controller.launched) == (T - 2, True)


def test_training_checkpoint_for_an_optimizer_without_delta_is_rejected_and_run_unchanged(tmp_path):
    model, optimizer, controller = trained(T + 1)
    save_training_checkpoint(model, optimizer, controller, tmp_path / "run.pt")
    lora_only = torch.optim.AdamW([p for layer in dash_layers(model).values() for p in (layer.lora_A, layer.lora_B)])
    before = snapshot_run(model, lora_only, controller)
    with pytest.raises(ValueError, match="optimizer state"):
        load_training_checkpoint(model, lora_only, controller, tmp_path / "run.pt")
    assert_run_unchanged(model, lora_only, controller, before)


def test_training_checkpoint_with_a_malformed_rng_state_is_rejected_and_run_unchanged(tmp_path):
    # The RNG is restored after the adapter and controller: a failure there must undo them.
    model, optimizer, controller = trained(T + 1)
    save_training_checkpoint(model, optimizer, controller, tmp_path / "run.pt")
    resign_training_checkpoint(
        tmp_path / "run.pt", lambda content: content["rng"].update(numpy={"bit_generator": "PCG64"})
    )
    target, target_optimizer, target_controller = trained(1, init_seed=3)
    before = snapshot_run(target, target_optimizer, target_controller)
    with pytest.raises(ValueError, match="run.pt: 'state'"):  # the KeyError NumPy raised, with the file named
        load_training_checkpoint(target, target_optimizer, target_controller, tmp_path / "run.pt")
    assert_run_unchanged(target, target_optimizer, target_controller, before)


# ------------------------------------------------------------------------ wrong or malformed file
def torch_state_dict_file(path, _):
    torch.save(build_adapted().state_dict(), path)


def safetensors_state_dict_file(path, _):
    save_file(build_adapted().state_dict(), str(path), metadata={"format": "pt"})  # e.g. a PEFT adapter file


def training_checkpoint_file(path, _):
    model, optimizer, controller = trained(1)
    save_training_checkpoint(model, optimizer, controller, path)


def signed(mutate):
    def write(path, data):
        path.write_bytes(data)
        resign(path, mutate)

    return write


def edit_layers(edit):
    """Rewrite the header's layer configurations with ``edit(layers)``."""

    def mutate(content):
        layers = json.loads(content["metadata"]["layers"])
        edit(layers)
        content["metadata"]["layers"] = json.dumps(layers)

    return mutate


MALFORMED = {
    "torch-state-dict": (torch_state_dict_file, "refused: it looks like a torch.save"),
    "safetensors-state-dict": (safetensors_state_dict_file, "not a LoRA-Dash adapter file .*format 'pt'"),
    "training-checkpoint": (training_checkpoint_file, "load_training_checkpoint"),
    "future-version": (signed(lambda c: c["metadata"].update(version="3")), "format version '3'"),
    "layers-not-json": (signed(lambda c: c["metadata"].update(layers="{fc1")), "no valid 'layers' entry"),
    "layers-missing": (signed(lambda c: c["metadata"].pop("layers")), "no valid 'layers' entry"),
    "layers-not-a-dict": (signed(lambda c: c["metadata"].update(layers="[]")), "'layers' is not a JSON dict"),
    "trained-modules-missing": (signed(lambda c: c["metadata"].pop("trained_modules")), "'trained_modules'"),
    "config-missing": (signed(edit_layers(lambda layers: layers["fc2"].pop("alpha"))), "alpha=None"),
    "config-not-a-dict": (
        signed(edit_layers(lambda layers: layers.update(fc2=[1, 2]))),
        "no configuration for layer 'fc2'",
    ),
    "sketch-missing": (signed(lambda c: c["tensors"].pop("fc1.base_sketch")), "sketch for layer 'fc1'"),
    "sketch-wrong-shape": (signed(lambda c: c["tensors"].update({"fc1.base_sketch": torch.zeros(3)})), "sketch"),
    "state-key-missing": (signed(lambda c: c["tensors"].pop("fc3.lora_A")), "fc3.lora_A"),
    "state-key-unexpected": (
        signed(lambda c: c["tensors"].update({"fc3": torch.zeros(2)})),
        re.escape("unexpected keys ['fc3']"),
    ),
    "state-wrong-shape": (signed(lambda c: c["tensors"].update({"fc2.dash_U": torch.zeros(2, 2)})), "fc2.dash_U"),
}


@pytest.mark.parametrize("write, match", MALFORMED.values(), ids=MALFORMED.keys())
def test_wrong_or_malformed_adapter_file_is_rejected_naming_the_problem_and_model_unchanged(
    write, match, adapter_file, tmp_path
):
    write(tmp_path / "bad.safetensors", adapter_file[1])
    model = build_adapted(init_seed=3)
    assert_refused_and_unchanged(lambda: load_adapter(model, tmp_path / "bad.safetensors"), model, match)


# ------------------------------------------------------------------------ modules trained in full
def test_adapter_file_carries_the_modules_trained_in_full(tmp_path):
    model, _, _ = trained(T + 2, build=build_with_trained_head)
    assert not torch.equal(model.fc3.weight, build_base().fc3.weight)  # the head did train
    save_adapter(model, tmp_path / "adapter.safetensors")
    metadata, tensors = read_adapter_file(tmp_path / "adapter.safetensors")
    assert json.loads(metadata["trained_modules"]) == ["fc3"]
    assert torch.equal(tensors["fc3.weight"], model.fc3.weight) and torch.equal(tensors["fc3.bias"], model.fc3.bias)
    fresh = build_with_trained_head(init_seed=2)
    load_adapter(fresh, tmp_path / "adapter.safetensors")
    probe = batch(-1, size=16)[0]
    with torch.no_grad():
        assert torch.equal(fresh(probe), model(probe))


def test_adapter_file_with_other_modules_trained_in_full_is_rejected_and_model_unchanged(tmp_path):
    model, _, _ = trained(T + 2, build=build_with_trained_head)
    save_adapter(model, tmp_path / "adapter.safetensors")
    without_head = build_base()
    inject(without_head, r"fc1|fc2", r=R, alpha=ALPHA, s=S)  # the same layers, but fc3 stays frozen
    assert_refused_and_unchanged(
        lambda: load_adapter(without_head, tmp_path / "adapter.safetensors"),
        without_head,
        re.escape("trains modules ['fc3'] in full, the model []"),
    )


@pytest.mark.parametrize("save_at", [T - 1, T + 1], ids=["pre-launch", "dash"])
def test_training_checkpoint_with_a_head_resumes_bit_identical_to_an_uninterrupted_run(save_at, tmp_path):
    model, optimizer, _ = trained(T + 4, build=build_with_trained_head)
    uninterrupted = adapter_state_dict(model)
    model, optimizer, controller = trained(save_at, build=build_with_trained_head)
    save_training_checkpoint(model, optimizer, controller, tmp_path / "run.pt")
    model, optimizer, controller = trained(0, init_seed=2, build=build_with_trained_head)
    load_training_checkpoint(model, optimizer, controller, tmp_path / "run.pt")
    for step in range(save_at + 1, T + 5):
        train_step(model, optimizer, step)
    resumed = adapter_state_dict(model)
    assert resumed.keys() == uninterrupted.keys() and "fc3.weight" in resumed
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


@pytest.mark.parametrize("path_kind, error", [("missing", FileNotFoundError), ("folder", IsADirectoryError)])
def test_unreadable_path_raises_the_os_error_and_model_unchanged(path_kind, error, tmp_path):
    model = build_adapted(init_seed=3)
    path = tmp_path / "nothing.safetensors" if path_kind == "missing" else tmp_path
    assert_refused_and_unchanged(lambda: load_adapter(model, path), model, None, error)


# ----------------------------------------------------------------------------------- atomicity
def test_adapter_save_that_fails_before_the_rename_leaves_the_previous_file_and_no_temporary(
    adapter_file, tmp_path, monkeypatch
):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(adapter_file[1])

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)  # the new content is written, not yet durable
    with pytest.raises(OSError, match="disk full"):
        save_adapter(build_adapted(init_seed=4), path)
    assert path.read_bytes() == adapter_file[1]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]


def test_training_checkpoint_save_that_fails_midway_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    model, optimizer, controller = trained(1)
    path = tmp_path / "run.pt"
    save_training_checkpoint(model, optimizer, controller, path)
    previous = path.read_bytes()

    def write_half_then_fail(obj, file):
        file.write(previous[: len(previous) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_training_checkpoint(model, optimizer, controller, path)
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]


def test_save_syncs_the_new_file_before_replacing_the_old_and_syncs_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))), real_fsync(fd))
    )
    monkeypatch.setattr(os, "replace", lambda *args: (events.append(("replace",)), real_replace(*args)))
    save_adapter(build_adapted(), tmp_path / "adapter.safetensors")
    assert events == [("fsync", False), ("replace",), ("fsync", True)]


def test_saved_file_gets_the_permissions_open_would_give(tmp_path):
    save_adapter(build_adapted(), tmp_path / "adapter.safetensors")
    (tmp_path / "reference").touch()
    assert (tmp_path / "adapter.safetensors").stat().st_mode == (tmp_path / "reference").stat().st_mode


# ---------------------------------------------------------------------- resuming onto another base
def on_other_pretrained_weights(init_seed: int = 1, layer: str | None = None):
    """``build_adapted``'s layers and adapters on other "pretrained" weights, as when a node restarts with another
    checkpoint of the base: every weight (``layer=None``: the base of seed 5), or only ``layer``'s, moved by
    Gaussian noise of 10 % of its entries' RMS (the pretrained-weight check tolerates 1 %)."""
    model = build_base(seed=5 if layer is None else 0)
    if layer is not None:
        weight = getattr(model, layer).weight
        noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            weight.add_(0.1 * weight.pow(2).mean().sqrt() * noise)
    torch.manual_seed(init_seed)
    inject(model, ADAPTED, r=R, alpha=ALPHA, s=S)
    return model


def run_state(optimizer, controller) -> dict:
    """What a refused resume must leave as it was besides the model: the optimizer's state dict, the controller's
    state and phase, and the Python, NumPy and torch random streams, all by value."""
    return {
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "controller": {**controller.state_dict(), "launched": controller.launched},
        "rng": {
            "python": random.getstate(),
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "torch": torch.get_rng_state(),
        },
    }


@pytest.mark.parametrize("layer", [None, "fc2"], ids=["every-weight", "one-weight"])
@pytest.mark.parametrize("saved_at", [T - 1, T + 2], ids=["pre-launch", "launched"])
def test_resuming_onto_other_pretrained_weights_is_refused_naming_the_layer_and_run_unchanged(
    saved_at, layer, tmp_path
):
    model, optimizer, controller = trained(saved_at)
    save_training_checkpoint(model, optimizer, controller, tmp_path / "run.pt")
    build = functools.partial(on_other_pretrained_weights, layer=layer)
    target, target_optimizer, target_controller = trained(T + 1, init_seed=3, build=build)  # launched, with δ's state
    before_model, before_run = snapshot(target), run_state(target_optimizer, target_controller)
    with pytest.raises(ValueError, match=f"run.pt: layer '{layer or 'fc1'}' was saved for another pretrained weight"):
        load_training_checkpoint(target, target_optimizer, target_controller, tmp_path / "run.pt")
    assert_unchanged(target, before_model)
    assert_same(run_state(target_optimizer, target_controller), before_run, "run")
