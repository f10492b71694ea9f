"""One rank of ``tests/test_behaviour_gaps.py``'s cross-rank check: ranks whose layers have the same
shapes and ``s`` but not the same names. Run as ``python name_disagreement.py RANK WORLD STORE_PORT
OUT_DIR``; it joins the test's TCPStore on 127.0.0.1 and writes ``OUT_DIR/names_rank{RANK}.pt``:
``{scenario: {"error": (type, message) or None, "launched": {name: bool}}}``.

Scenarios, in this order (every rank runs both, so the collectives stay paired):

- ``agree``: every rank names its layers ``first`` and ``second``: the shared launch must succeed.
- ``disagree``: the last rank names its second layer ``renamed`` instead.
"""

import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora_dash  # noqa: E402

from workers import gloo_group  # noqa: E402


def build(second: str) -> nn.Sequential:
    """Two linears (16 × 12 and 10 × 16) named ``first`` and ``second``, the same weights on every rank."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("first", nn.Linear(12, 16)), ("act", nn.ReLU()), (second, nn.Linear(16, 10))]))
    torch.manual_seed(1)
    lora_dash.inject(model, ["first", second], r=4, alpha=8.0, s=3)
    with torch.no_grad():  # a non-zero update, as after some training
        for layer in lora_dash.dash_layers(model).values():
            layer.lora_B.normal_()
    return model


def scenario(second: str) -> dict:
    model = build(second)
    result = {"error": None}
    try:
        lora_dash.launch(model)
    except (ValueError, RuntimeError) as error:
        result["error"] = (type(error).__name__, str(error))
    result["launched"] = {name: layer.launched for name, layer in lora_dash.dash_layers(model).items()}
    return result


def main(rank: int, world: int, port: int, out: Path) -> None:
    gloo_group.join(rank, world, port)
    results = {
        "agree": scenario("second"),
        "disagree": scenario("renamed" if rank == world - 1 else "second"),
    }
    torch.save(results, out / f"names_rank{rank}.pt")
    gloo_group.leave()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
