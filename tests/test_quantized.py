"""LoRA-Dash on weight-only quantized bases, with the real libraries on CPU: torchao int8 and int4
(``IntxWeightOnlyConfig``; torchao's ``Int4WeightOnlyConfig`` has no CPU kernel in 0.18) and
bitsandbytes ``Linear8bitLt``, ``Linear4bit`` nf4 and fp4.

Each kind is injected, trained, launched, trained on, saved and loaded. The expected launch is
computed here, independently of ``LoRADashLinear.base_weight``: from the weight each library
dequantizes to right after quantization, through its own API, and the functions of
``lora_dash.directions``.
"""

import copy
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # import-time notices about kernels this CPU build lacks
    import bitsandbytes as bnb
    import torchao.quantization as torchao_quantization
    from torchao.quantization.granularity import PerGroup

from lora_dash import (
    adapter_parameters,
    adapter_state_dict,
    dash_layers,
    directions,
    inject,
    load_adapter,
    merge_and_unload,
    save_adapter,
)

from helpers import assert_refused_and_unchanged, train

IN, HIDDEN, OUT = 128, 64, 32
R, ALPHA, S = 4, 8.0, 3
T, EXTRA = 3, 2
KINDS = ("torchao-int8", "torchao-int4", "bnb-int8", "bnb-nf4", "bnb-fp4")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def pretrained(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def bitsandbytes_linear(kind: str, linear: nn.Linear) -> nn.Module:
    """The bitsandbytes layer for ``linear``, quantized (bitsandbytes quantizes on ``.to(device)``)."""
    if kind == "bnb-int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, quant_type=kind.removeprefix("bnb-"))
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def library_dequantized(kind: str, layer: nn.Module) -> Tensor:
    """``W`` as the library itself dequantizes it, read right after quantization."""
    weight = layer.weight
    if kind.startswith("torchao"):
        return weight.dequantize()
    if kind == "bnb-int8":
        return bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB)
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def quantize(kind: str, model: Net) -> tuple[Net, dict[str, Tensor]]:
    """``model`` with both linears quantized as ``kind``, and the library's dequantized weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "torchao-int8":
            torchao_quantization.quantize_(model, torchao_quantization.Int8WeightOnlyConfig())
        elif kind == "torchao-int4":
            config = torchao_quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
            torchao_quantization.quantize_(model, config)
        else:
            for name in ("fc1", "fc2"):
                setattr(model, name, bitsandbytes_linear(kind, getattr(model, name)))
    return model, {name: library_dequantized(kind, getattr(model, name)).float() for name in ("fc1", "fc2")}


def stored(layer: nn.Module) -> list[Tensor]:
    """The plain tensors a quantized weight is stored in: torchao's codes and scales, bitsandbytes' codes."""
    weight = layer.weight
    if hasattr(weight, "tensor_data_names"):  # torchao
        return [getattr(weight, name).clone() for name in weight.tensor_data_names]
    return [weight.data.clone()]


def state(model: nn.Module) -> dict:
    """What a refused call must leave alone (``helpers.snapshot`` compares torchao tensors, which cannot)."""
    return {
        "types": {name: type(module) for name, module in model.named_modules()},
        "adapter": adapter_state_dict(model),
        "stored": {name: stored(layer.base) for name, layer in dash_layers(model).items()},
        "merged": [layer.merged for layer in dash_layers(model).values()],
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["types"] == after["types"] and before["merged"] == after["merged"]
    assert before["adapter"].keys() == after["adapter"].keys()
    assert all(torch.equal(before["adapter"][key], after["adapter"][key]) for key in before["adapter"])
    for name, tensors in before["stored"].items():
        assert all(map(torch.equal, tensors, after["stored"][name])), name


def batch(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, IN, generator=generator), torch.randn(8, OUT, generator=generator)


def mse_on_batch(model: nn.Module, step: int, micro: int) -> Tensor:
    x, y = batch(step)
    return F.mse_loss(model(x), y)


def expected_selection(weight: Tensor, layer) -> tuple[Tensor, Tensor, Tensor]:
    """``(index, U_s, V_s)`` from a dequantized ``W`` and the layer's current ``A``, ``B``."""
    U, sigma, V = directions.svd_basis(weight)
    coords = directions.coordinates_from_factors(layer.lora_B.detach(), layer.lora_A.detach(), layer.scaling, U, V)
    eligible = directions.eligible_directions(sigma, tuple(weight.shape))
    index = directions.select_directions(directions.change_rates(coords, sigma, eligible), eligible, S)
    return index, U[:, index], V[:, index]


def outputs(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model(batch(-1)[0])


@pytest.fixture(scope="module", params=KINDS)
def trained(request):
    """A quantized model: injected, ``T`` LoRA steps, the launch, ``EXTRA`` dash steps."""
    kind = request.param
    model, dequantized = quantize(kind, pretrained())
    codes = {name: stored(getattr(model, name)) for name in ("fc1", "fc2")}
    torch.manual_seed(1)
    inject(model, r"fc\d", r=R, alpha=ALPHA, s=S)
    expected = {}

    def record_the_selection(step: int) -> None:
        if step == T:  # the launch ran in this step's hook, on the A and B it leaves
            expected.update(
                {name: expected_selection(dequantized[name], layer) for name, layer in dash_layers(model).items()}
            )

    _, controller = train(model, T + EXTRA, launch_step=T, loss=mse_on_batch, on_step=record_the_selection)
    return SimpleNamespace(
        kind=kind, model=model, dequantized=dequantized, codes=codes, expected=expected, controller=controller
    )


def test_shapes_come_from_the_features_and_the_adapters_are_float32(trained):
    for name, (in_, out) in {"fc1": (IN, HIDDEN), "fc2": (HIDDEN, OUT)}.items():
        layer = trained.model.get_submodule(name)
        assert (layer.in_features, layer.out_features) == (in_, out)
        assert layer.lora_A.shape == (R, in_) and layer.lora_B.shape == (out, R) and layer.dash_U.shape == (out, S)
        assert all(t.dtype == torch.float32 for t in (layer.lora_A, layer.lora_B, layer.dash_delta, layer.dash_U))


def test_launch_selects_exactly_what_directions_computes_from_the_library_dequantized_weight(trained):
    assert trained.controller.launched
    for name, layer in dash_layers(trained.model).items():
        index, U_s, V_s = trained.expected[name]
        assert layer.dash_index.tolist() == index.tolist(), name
        torch.testing.assert_close(layer.dash_U, U_s, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.dash_V, V_s, rtol=0, atol=1e-6)


def test_forward_is_the_quantized_base_plus_the_float_adapter(trained):
    for layer in dash_layers(trained.model).values():
        x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            lora = layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
            dash = ((x @ layer.dash_V) * layer.dash_delta) @ layer.dash_U.T
            torch.testing.assert_close(layer(x), layer.base(x) + lora + dash, rtol=1e-5, atol=1e-5)


def test_training_moves_A_B_and_delta_and_leaves_the_quantized_codes_bit_identical(trained):
    for name, layer in dash_layers(trained.model).items():
        assert layer.lora_B.abs().min() > 0 and layer.dash_delta.abs().min() > 0
        assert all(map(torch.equal, stored(layer.base), trained.codes[name]))
        assert not any(p.requires_grad for p in layer.base.parameters())


def test_save_and_load_into_a_fresh_quantized_model_reproduces_the_outputs(trained, tmp_path):
    save_adapter(trained.model, tmp_path / "adapter")
    fresh, _ = quantize(trained.kind, pretrained())
    torch.manual_seed(2)  # another A init: everything must come from the file
    inject(fresh, r"fc\d", r=R, alpha=ALPHA, s=S)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(outputs(fresh), outputs(trained.model))


def test_loading_into_a_quantized_model_of_another_pretrained_weight_is_refused(trained, tmp_path):
    save_adapter(trained.model, tmp_path / "adapter")
    other, _ = quantize(trained.kind, pretrained(seed=5))
    inject(other, r"fc\d", r=R, alpha=ALPHA, s=S)
    with pytest.raises(ValueError, match="another pretrained weight"):
        load_adapter(other, tmp_path / "adapter")


def test_merge_is_refused_naming_merge_and_unload_and_changes_nothing(trained):
    before = state(trained.model)
    with pytest.raises(RuntimeError, match=r"merge_and_unload\(model, dequantize=True\)"):
        trained.model.fc1.merge()
    assert_same_state(before, state(trained.model))


def test_merge_and_unload_without_dequantize_is_refused_and_changes_nothing(trained):
    before = state(trained.model)
    with pytest.raises(RuntimeError, match="dequantize=True"):
        merge_and_unload(trained.model)
    assert_same_state(before, state(trained.model))


def test_merge_and_unload_with_dequantize_holds_the_dequantized_weight_plus_delta_W(trained):
    model = copy.deepcopy(trained.model)
    layers = dash_layers(model)
    expected = {name: trained.dequantized[name] + layer.delta_weight().detach() for name, layer in layers.items()}
    biases = {name: layer.base.bias.detach().clone() for name, layer in layers.items()}
    merge_and_unload(model, dequantize=True)
    for name, weight in expected.items():
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear and type(linear.weight) is nn.Parameter
        torch.testing.assert_close(linear.weight.float(), weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(linear.bias.float(), biases[name].float(), rtol=0, atol=0)


def test_merge_and_unload_dequantizes_into_the_requested_dtype_and_refuses_a_non_float_one(trained):
    model = copy.deepcopy(trained.model)
    before = state(model)
    with pytest.raises(ValueError, match="floating-point"):
        merge_and_unload(model, dequantize=True, dtype=torch.int8)
    assert_same_state(before, state(model))
    expected = {
        name: (trained.dequantized[name] + layer.delta_weight().detach()).bfloat16()
        for name, layer in dash_layers(model).items()
    }
    merge_and_unload(model, dequantize=True, dtype=torch.bfloat16)
    for name, weight in expected.items():
        linear = model.get_submodule(name)
        assert torch.equal(linear.weight, weight) and linear.bias.dtype == torch.bfloat16


def test_an_adapter_trained_on_the_quantized_base_merges_into_the_float_base(trained, tmp_path):
    """The full-precision serving recipe: the fingerprint is of the dequantized W, so the float base
    differs from it by the quantization error and needs check_base=False."""
    save_adapter(trained.model, tmp_path / "adapter")
    model = pretrained()
    expected = {
        name: getattr(model, name).weight.detach() + layer.delta_weight().detach()
        for name, layer in dash_layers(trained.model).items()
    }
    inject(model, r"fc\d", r=R, alpha=ALPHA, s=S)
    load_adapter(model, tmp_path / "adapter", check_base=False)
    merge_and_unload(model)
    for name, weight in expected.items():
        torch.testing.assert_close(getattr(model, name).weight, weight, rtol=0, atol=1e-6)


def test_moving_the_model_keeps_the_adapters_float32_and_the_outputs(trained):
    model = copy.deepcopy(trained.model)
    expected = outputs(model)
    model.to("cpu")
    assert {p.dtype for p in adapter_parameters(model)} == {torch.float32}
    assert torch.equal(outputs(model), expected)


@pytest.mark.parametrize("nested", [True, False], ids=["nested-scales", "plain-scales"])
def test_a_linear4bit_repacked_for_the_cpu_kernel_still_dequantizes_to_what_its_forward_uses(nested):
    """bitsandbytes repacks a Linear4bit in place at an eval forward without gradients on CPUs with
    AVX512-BF16 (codes reordered, scales transposed to bfloat16). Done here by its own function, so
    the test runs the same on every CPU; the expected W is the library's dequantization of the
    original codes with the scales rounded to bfloat16, as the repacked kernel uses them."""
    linear = bnb.nn.Linear4bit(IN, HIDDEN, quant_type="nf4", compress_statistics=nested)
    linear.load_state_dict(pretrained().fc1.state_dict())
    linear = linear.to("cpu")
    state = copy.deepcopy(linear.weight.quant_state)
    if nested:
        state.absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        state.nested = False
    state.absmax = state.absmax.bfloat16().float()
    expected = bnb.functional.dequantize_4bit(linear.weight.data, state)
    model = nn.Sequential(linear)
    inject(model, "0", r=R, alpha=ALPHA, s=S)
    weight = linear.weight
    weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    assert weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(model[0].base_weight(), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- refused kinds
class Opaque(Tensor):
    """A tensor subclass lora_dash knows nothing about."""


def int8_linear() -> nn.Linear:
    linear = nn.Linear(IN, HIDDEN)
    linear.weight = nn.Parameter(torch.randint(-127, 128, (HIDDEN, IN), dtype=torch.int8), requires_grad=False)
    return linear


def opaque_linear() -> nn.Linear:
    linear = nn.Linear(IN, HIDDEN)
    linear.weight = nn.Parameter(Opaque._make_subclass(Opaque, linear.weight.detach()), requires_grad=False)
    return linear


UNSUPPORTED = {
    "int8 codes without scales": (int8_linear, "integer weight without scales"),
    "unknown tensor subclass": (opaque_linear, "Opaque"),
    "bnb 8-bit not yet quantized": (
        lambda: bnb.nn.Linear8bitLt(IN, HIDDEN, has_fp16_weights=False),
        "Linear8bitLt.*not quantized yet",
    ),
    "bnb 8-bit fp16 weights": (
        lambda: bnb.nn.Linear8bitLt(IN, HIDDEN, has_fp16_weights=True).to("cpu"),
        "Linear8bitLt.*has_fp16_weights=True",
    ),
    "bnb 4-bit not yet quantized": (lambda: bnb.nn.Linear4bit(IN, HIDDEN), "Linear4bit.*not quantized yet"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_an_unsupported_quantized_layer_is_refused_at_inject_naming_it_and_nothing_changes(case):
    make, message = UNSUPPORTED[case]
    model = nn.Sequential(make())
    assert_refused_and_unchanged(lambda: inject(model, "0", r=R, s=S), model, message)


@pytest.mark.slow
def test_importing_lora_dash_imports_neither_quantization_library():
    code = "import sys, lora_dash; print(sorted({'torchao', 'bitsandbytes'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
