"""`lora_dash.fused`: the adapter product with a lean backward equals the reference, and keeps less."""

import pytest
import torch

import lora_dash
from lora_dash import fused, layer
from lora_dash.bench.harness import TrainingStep, count_tensor_bytes


def factors(tokens: int, width: int, r: int, s: int, dtype=torch.float64, seed: int = 0) -> list[torch.Tensor]:
    """``x: (2, tokens, width)``, ``A: (r, width)``, ``B: (width + 1, r)``, ``V_s: (width, s)``, ``δ: (s,)``,
    ``U_s: (width + 1, s)``, random (so that no gradient is zero by accident), all requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(2, tokens, width), (r, width), (width + 1, r), (width, s), (s,), (width + 1, s)]
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes]


def product_and_gradients(product, tensors: list[torch.Tensor], scaling: float = 0.7):
    x, A, B, V, delta, U = tensors
    out = product(x, A, B, scaling, V, delta, U)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    gradients = torch.autograd.grad((out * probe).sum(), [x, A, B, V, delta, U], allow_unused=True)
    return out, gradients


def test_importing_the_package_plugs_the_lean_product_into_the_layer():
    assert layer.adapter_product is fused.adapter_product
    assert fused.reference_product is not fused.adapter_product


@pytest.mark.parametrize("tokens, width, r, s", [(5, 7, 3, 2), (1, 4, 1, 1), (6, 9, 4, 4)])
def test_the_product_and_the_gradients_of_x_A_B_and_delta_equal_the_reference_in_float64(tokens, width, r, s):
    tensors = factors(tokens, width, r, s)
    expected_out, expected = product_and_gradients(fused.reference_product, tensors)
    out, gradients = product_and_gradients(fused.adapter_product, tensors)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(["x", "A", "B"], gradients[:3], expected[:3]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(gradients[4], expected[4], rtol=1e-12, atol=1e-12, msg="delta")
    assert gradients[3] is None and gradients[5] is None  # U_s and V_s are buffers: no gradient is computed


def test_gradcheck_passes_with_buffers_frozen():
    x, A, B, V, delta, U = factors(3, 5, 2, 2)
    V, U = V.detach(), U.detach()
    assert torch.autograd.gradcheck(
        lambda *t: fused.adapter_product(t[0], t[1], t[2], 0.5, V, t[3], U), (x, A, B, delta)
    )


def test_an_input_that_needs_no_gradient_gets_none_and_the_others_match_the_reference():
    x, A, B, V, delta, U = factors(4, 6, 2, 3)
    x, V, U = x.detach(), V.detach(), U.detach()
    expected = torch.autograd.grad(fused.reference_product(x, A, B, 0.5, V, delta, U).sum(), [A, B, delta])
    out = fused.adapter_product(x, A, B, 0.5, V, delta, U)
    assert out.grad_fn is not None and x.grad is None
    for got, want in zip(torch.autograd.grad(out.sum(), [A, B, delta]), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def saved_bytes(product, tokens: int, width: int, r: int, s: int) -> int:
    """Bytes autograd keeps for the backward of one product in float32, apart from the factors themselves."""
    x, A, B, V, delta, U = factors(tokens, width, r, s, dtype=torch.float32)
    x = x.detach().requires_grad_()
    module = torch.nn.Module()
    for name, tensor in zip(["A", "B", "V", "delta", "U"], [A, B, V, delta, U]):
        module.register_parameter(name, torch.nn.Parameter(tensor.detach(), requires_grad=name in ("A", "B", "delta")))
    step = TrainingStep(
        module,
        lambda: product(x, module.A, module.B, 0.5, module.V, module.delta, module.U).sum().backward(),
        None,
    )
    return count_tensor_bytes(step)["saved"]


def test_the_lean_product_keeps_the_input_alone_and_the_reference_keeps_the_inner_products_too():
    tokens, width, r, s = 64, 32, 4, 8
    x_bytes = 2 * tokens * width * 4
    assert saved_bytes(fused.adapter_product, tokens, width, r, s) == x_bytes
    # The reference keeps x̃ Aᵀ scaled (tokens·r numbers) and x̃ V_s (tokens·s) beside x̃.
    assert saved_bytes(fused.reference_product, tokens, width, r, s) == x_bytes + 2 * tokens * (r + s) * 4


def test_a_layer_trains_through_the_launch_the_same_with_either_product(monkeypatch):
    runs = {}
    for name, product in (("reference", fused.reference_product), ("fused", fused.adapter_product)):
        monkeypatch.setattr(layer, "adapter_product", product)
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5))
        lora_dash.inject(model, ["0"], r=2, s=2)
        optimizer = torch.optim.AdamW(lora_dash.adapter_parameters(model), lr=1e-2)
        controller = lora_dash.LaunchController(model, launch_step=2).attach(optimizer)
        generator = torch.Generator().manual_seed(2)
        for _ in range(5):
            optimizer.zero_grad()
            model(torch.randn(8, 6, generator=generator)).square().mean().backward()
            optimizer.step()
        assert controller.launched
        runs[name] = {key: value.clone() for key, value in lora_dash.adapter_state_dict(model).items()}
    assert runs["fused"]["0.dash_delta"].abs().sum() > 0  # δ trained after the launch
    for key in runs["reference"]:
        torch.testing.assert_close(runs["fused"][key], runs["reference"][key], rtol=1e-5, atol=1e-6, msg=key)
