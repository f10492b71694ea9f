"""One graph per phase, no breaks: the phase is a Python bool, so the launch recompiles once and
nothing else does (no per-step Python state reaches the graph)."""

import torch
import torch._dynamo
from torch import nn

import lora_dash


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))
    lora_dash.inject(model, r"0|2", r=3, s=2)
    return model


def test_forward_is_one_graph_without_breaks_in_both_phases():
    model, x = _model(), torch.randn(5, 12)
    before = torch._dynamo.explain(model)(x)
    lora_dash.launch(model)
    after = torch._dynamo.explain(model)(x)
    for explanation in (before, after):
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)


def test_training_across_the_launch_compiles_once_per_phase():
    torch._dynamo.reset()
    model, x = _model(), torch.randn(5, 12)
    compiled = torch.compile(model, backend="eager")
    optimizer = torch.optim.SGD(lora_dash.adapter_parameters(model), lr=0.1)
    lora_dash.LaunchController(model, launch_step=2).attach(optimizer)
    torch._dynamo.utils.counters.clear()
    for _ in range(8):
        compiled(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert lora_dash.dash_layers(model)["0"].launched
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
