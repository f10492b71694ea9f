"""`lora_dash.fused`: the layer's kernel equals the reference product, keeps less, dispatches fewer ops,
and the layer falls back to the reference wherever the kernel cannot serve its base."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_dash
from lora_dash import LoRADashLinear, fused
from lora_dash.bench.harness import count_ops
from lora_dash.layer import adapter_product

F64 = torch.float64


def tensors(tokens: int = 5, width: int = 6, out: int = 7, r: int = 3, s: int = 2, seed: int = 0):
    """``x: (2, tokens, width)``, ``x̃`` like it, ``W: (out, width)``, ``b: (out,)``, ``A: (r, width)``,
    ``B: (out, r)``, ``V_s: (width, s)``, ``δ: (s,)``, ``U_s: (out, s)``: random float64, so that no
    gradient is zero by accident."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(2, tokens, width), (2, tokens, width), (out, width), (out,), (r, width), (out, r)]
    shapes += [(width, s), (s,), (out, s)]
    return [torch.randn(shape, generator=generator, dtype=F64) for shape in shapes]


def reference(x, x_adapter, weight, bias, A, B, scaling, V_s, delta, U_s, dash):
    """The same layer in autograd's own operations; before the launch the dash term is absent."""
    x_tilde = x if x_adapter is None else x_adapter
    y = F.linear(x, weight, bias) + F.linear(F.linear(x_tilde, A), B) * scaling
    if dash:
        y = y + F.linear(F.linear(x_tilde, V_s.T) * delta, U_s)
    return y


@pytest.mark.parametrize("dash", [False, True], ids=["pre-launch", "dash"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("separate_input", [False, True], ids=["x", "dropout(x)"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "x-frozen"])
def test_the_kernel_passes_gradcheck_and_equals_the_reference(dash, dims, separate_input, x_grad):
    x, x_tilde, W, b, A, B, V, delta, U = tensors()
    if dims == 2:
        x, x_tilde = x[0], x_tilde[0]
    x.requires_grad_(x_grad)
    x_adapter = x_tilde.requires_grad_(x_grad) if separate_input else None
    trained = [A, B, delta]
    for tensor in trained:
        tensor.requires_grad_()

    def kernel(*_):
        return fused.adapted_linear(x, x_adapter, W, b, A, B, 0.7, V, delta, U, dash)

    inputs = [t for t in (x, x_adapter) if t is not None and t.requires_grad] + trained
    assert torch.autograd.gradcheck(kernel, inputs)

    probe = torch.randn(kernel().shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    args = (x, x_adapter, W, b, A, B, 0.7, V, delta, U, dash)
    got = torch.autograd.grad((kernel() * probe).sum(), inputs, allow_unused=True)
    want = torch.autograd.grad((reference(*args) * probe).sum(), inputs, allow_unused=True)
    torch.testing.assert_close(kernel(), reference(*args))
    for name, g, w in zip(["inputs"] * len(inputs), got, want):
        if w is None:  # δ before the launch: no gradient either way
            assert g is None, name
        else:
            torch.testing.assert_close(g, w)


def test_before_the_launch_delta_gets_no_gradient_and_an_optimizer_leaves_it_alone():
    layer = LoRADashLinear(nn.Linear(6, 5), r=2, s=2)
    optimizer = torch.optim.AdamW(layer.adapter_parameters(), lr=0.1, weight_decay=0.5)
    layer(torch.randn(4, 6)).square().sum().backward()
    optimizer.step()
    assert layer.dash_delta.grad is None and layer.dash_delta not in optimizer.state
    assert layer.lora_A.grad is not None and layer.lora_A in optimizer.state


def layer_pair(base: nn.Module, dropout: float = 0.0, launched: bool = False) -> LoRADashLinear:
    torch.manual_seed(0)
    layer = LoRADashLinear(base, r=3, s=2, dropout=dropout)
    nn.init.normal_(layer.lora_B)
    if launched:
        layer.launch()
        nn.init.normal_(layer.dash_delta)
    return layer


def run(layer: LoRADashLinear, x: torch.Tensor, use_kernel: bool):
    layer.fused = use_kernel
    torch.manual_seed(3)  # the same dropout mask for both products
    out = layer(x)
    probe = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    wrt = [x, layer.lora_A, layer.lora_B, layer.dash_delta]
    grads = torch.autograd.grad((out * probe).sum(), wrt, allow_unused=True)
    zeros = [torch.zeros_like(t) for t in wrt]
    return out, [z if g is None else g for g, z in zip(grads, zeros)]


def assert_kernel_equals_reference(layer: LoRADashLinear, x: torch.Tensor) -> None:
    """Output and gradients (``x``, ``A``, ``B``, ``δ``) the same through the kernel and the reference."""
    out, grads = run(layer, x, use_kernel=True)
    want_out, want_grads = run(layer, x, use_kernel=False)
    torch.testing.assert_close(out, want_out)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("launched", [False, True], ids=["pre-launch", "dash"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_layer_with_dropout_computes_the_same_with_the_kernel_and_the_reference(launched, mode):
    layer = layer_pair(nn.Linear(6, 5, dtype=F64), dropout=0.3, launched=launched)
    layer.train(mode == "train")
    assert_kernel_equals_reference(layer, torch.randn(2, 4, 6, dtype=F64, requires_grad=True))


# ------------------------------------------------------------------ which bases the kernel serves
class HookedLinear(nn.Linear):
    """An ``nn.Linear`` subclass with a forward of its own: the kernel would skip it."""

    def forward(self, x):
        return super().forward(x) + 1.0


def conv1d(in_features: int, out_features: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(out_features, in_features).double()


def test_the_kernel_serves_frozen_plain_linear_and_conv1d_bases():
    for base in (nn.Linear(4, 3), nn.Linear(4, 3, bias=False), conv1d(4, 3)):
        assert not fused.serves(base)  # a trainable weight would get no gradient
        assert fused.serves(base.requires_grad_(False))


def linear_with_a_hook() -> nn.Module:
    base = nn.Linear(6, 5, dtype=F64)
    base.register_forward_hook(lambda module, inputs, output: output * 2)
    return base


@pytest.mark.parametrize(
    "make_base", [lambda: HookedLinear(6, 5, dtype=F64), linear_with_a_hook], ids=["own-forward", "hook"]
)
def test_a_base_with_its_own_forward_or_a_hook_runs_through_the_reference(make_base):
    layer = layer_pair(make_base(), launched=True)
    base = layer.base
    assert not fused.serves(base)
    x = torch.randn(4, 6, dtype=F64, requires_grad=True)
    out, _ = run(layer, x, use_kernel=True)
    expected = base(x) + adapter_product(
        x, layer.lora_A, layer.lora_B, layer.scaling, layer.dash_V, layer.dash_delta, layer.dash_U
    )
    torch.testing.assert_close(out, expected)  # the base's own forward (and hook) ran


def test_a_replaced_forward_and_trainable_or_integer_weights_are_not_served():
    replaced = nn.Linear(4, 3)
    replaced.forward = lambda x: x  # what accelerate's offloading hooks do
    trainable = nn.Linear(4, 3)
    trainable_bias = nn.Linear(4, 3).requires_grad_(False)
    trainable_bias.bias.requires_grad_(True)
    integer = nn.Linear(4, 3).requires_grad_(False)
    integer.weight = nn.Parameter(torch.zeros(3, 4, dtype=torch.int8), requires_grad=False)
    for base in (replaced, trainable, trainable_bias, integer):
        base.weight.requires_grad_(base is trainable)
        assert not fused.serves(base)


def test_a_weight_of_a_tensor_subclass_is_not_served():
    class Codes(torch.Tensor):  # stands for a quantization library's or FSDP2's tensor type
        pass

    base = nn.Linear(4, 3).requires_grad_(False)
    base.weight = nn.Parameter(torch.randn(3, 4).as_subclass(Codes), requires_grad=False)
    assert not fused.serves(base)


@pytest.mark.parametrize("launched", [False, True], ids=["pre-launch", "dash"])
def test_a_conv1d_base_computes_the_same_with_the_kernel_and_the_reference(launched):
    layer = layer_pair(conv1d(6, 5), launched=launched)
    assert_kernel_equals_reference(layer, torch.randn(2, 4, 6, dtype=F64, requires_grad=True))


# ------------------------------------------------------------------------- precision and autocast
@pytest.mark.parametrize("launched", [False, True], ids=["pre-launch", "dash"])
def test_a_bfloat16_base_with_float32_adapters_rounds_as_the_reference(launched):
    layer = layer_pair(nn.Linear(16, 8).to(torch.bfloat16), launched=launched)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    out, grads = run(layer, x, use_kernel=True)
    want_out, want_grads = run(layer, x, use_kernel=False)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want_out, atol=1e-2, rtol=1e-2)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("launched", [False, True], ids=["pre-launch", "dash"])
def test_under_autocast_the_kernel_computes_in_the_autocast_dtype_forward_and_backward(launched):
    layer = layer_pair(nn.Linear(16, 8), launched=launched)
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run(layer, x, use_kernel=True)
        want_out, want_grads = run(layer, x, use_kernel=False)
    assert out.dtype == want_out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want_out, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, want_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


# ------------------------------------------------------------------------- what a step keeps and does
def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of ``layer(x)``, its own parameters and buffers apart,
    each storage once."""
    own = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x).sum().backward()
    return sum(kept.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_keeps_the_input_in_the_base_dtype_and_the_small_projections(dtype):
    tokens, width, r, s = 64, 32, 4, 3
    layer = LoRADashLinear(nn.Linear(width, width).to(dtype), r=r, s=s)
    x = torch.randn(tokens, width, dtype=dtype, requires_grad=True)
    x_bytes = tokens * width * x.element_size()
    assert saved_bytes(layer, x) == x_bytes + tokens * r * 4  # x (base dtype), h = x Aᵀ (float32)
    layer.launch()
    assert saved_bytes(layer, x) == x_bytes + tokens * (r + s) * 4  # and z = x V_s


def peft_layer(width: int, r: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = nn.Sequential(nn.Linear(width, width))
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))


def ops_of_a_step(model: nn.Module, x: torch.Tensor) -> int:
    for parameter in model.parameters():
        parameter.grad = None
    x = x.detach().requires_grad_()  # no gradient to accumulate into
    return count_ops(lambda: model(x).sum().backward()).total


def test_the_kernel_dispatches_no_more_ops_than_peft_before_the_launch_and_six_more_after():
    x = torch.randn(8, 16, requires_grad=True)
    peft_ops = ops_of_a_step(peft_layer(16, 4), x)
    model = nn.Sequential(nn.Linear(16, 16))
    lora_dash.inject(model, ["0"], r=4, s=2)
    assert ops_of_a_step(model, x) <= peft_ops
    lora_dash.launch(model)
    assert ops_of_a_step(model, x) <= peft_ops + 6
    model[0].fused = False  # the reference: what the kernel saves
    assert ops_of_a_step(model, x) > peft_ops + 6


def test_a_model_trains_through_the_launch_the_same_with_the_kernel_and_the_reference():
    runs = {}
    for use_kernel in (True, False):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 5, dtype=F64), nn.Tanh(), nn.Linear(5, 4, dtype=F64))
        lora_dash.inject(model, ["0", "2"], r=2, s=2, dropout=0.1)
        for layer in lora_dash.dash_layers(model).values():
            layer.fused = use_kernel
        optimizer = torch.optim.AdamW(lora_dash.adapter_parameters(model), lr=1e-2)
        controller = lora_dash.LaunchController(model, launch_step=2).attach(optimizer)
        generator = torch.Generator().manual_seed(2)
        for step in range(6):
            optimizer.zero_grad()
            torch.manual_seed(100 + step)
            model(torch.randn(8, 6, generator=generator, dtype=F64)).square().mean().backward()
            optimizer.step()
        assert controller.launched
        runs[use_kernel] = lora_dash.adapter_state_dict(model)
    for key, value in runs[True].items():
        torch.testing.assert_close(value, runs[False][key], msg=key)
