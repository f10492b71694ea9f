"""The memory child: ``python -m lora_dash.bench.memory SPEC`` measures one contender and prints JSON.

``SPEC`` is a JSON object (see :func:`operation`); the last line of output is
``{"growth_kib": ..., "peak_reset": ...}``: the RSS growth of the operation (see
:func:`lora_dash.bench.harness.peak_rss_growth_kib`). The exact tensor bytes are counted in the parent,
which needs no fresh process for them. A fresh process per contender keeps one contender's freed or
cached memory from hiding another's growth.
"""

import json
import sys
from collections.abc import Callable

import torch
from torch import nn

import lora_dash
from lora_dash.bench import contenders
from lora_dash.bench.harness import peak_rss_growth_kib


def _start_runtime() -> None:
    """One tiny training step first, so one-time setup (thread pools, the autograd engine, AdamW's code
    paths) is charged to no contender."""
    layer = nn.Linear(4, 4)
    layer(torch.randn(2, 4, requires_grad=True)).sum().backward()
    torch.optim.AdamW(layer.parameters()).step()


def operation(spec: dict) -> Callable[[], None]:
    """Build the contender of ``spec`` (untimed, unmeasured): the operation to measure.

    Specs:
        ``{"kind": "layer", "contender", "path", "out", "in", "tokens", "steps"}``: ``steps`` training steps
        of the layer the parent saved at ``path`` (the first step creates AdamW's state).
        ``{"kind": "model", "contender", "batch", "tokens", "steps"}``: the same for the MiniLM classifier.
        ``{"kind": "launch", "contender", "path"}``: launch the pre-launch layers saved at ``path``, or
        the bare SVDs of their weights.
    """
    kind, name = spec["kind"], spec["contender"]
    if kind == "layer":
        module = torch.load(spec["path"], weights_only=False)  # built (and launched) once, by the parent
        step = contenders.layer_training_step(module, spec["out"], spec["in"], spec["tokens"])
    elif kind == "model":
        tokenizer, encoder = contenders.load_encoder()
        model = contenders.build_classifier(name, encoder)
        del encoder
        step = contenders.model_training_step(model, contenders.minilm_batch(tokenizer, spec["batch"], spec["tokens"]))
    elif kind == "launch":
        layers = torch.load(spec["path"], weights_only=False)
        if name == contenders.LAUNCH:
            return lambda: lora_dash.launch(layers)
        weights = [layer.base_weight() for layer in layers]
        return lambda: contenders.bare_svds(weights)
    else:
        raise ValueError(f"unknown memory spec kind {kind!r}")

    def steps() -> None:
        for _ in range(spec["steps"]):
            step()

    return steps


def main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"])
    _start_runtime()
    print(json.dumps(peak_rss_growth_kib(operation(spec))))


if __name__ == "__main__":
    main(sys.argv[1:])
