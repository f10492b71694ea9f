"""The contenders: every layer and model the benchmark compares, built ready to run one operation.

r = s = 8 and α = 2r (the paper's defaults) everywhere. Built from the same seed, the contenders at one
shape share their frozen weight's values. A frozen weight in half precision gets float32 adapters, ours by
design and PEFT's as ``get_peft_model`` leaves them (``autocast_adapter_dtype``). Our layers get a random
non-zero ``B`` before use, as if pre-launch training had moved it, so that a launch selects real directions.

peft and transformers are imported lazily, inside the builders that need them.
"""

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import lora_dash
from lora_dash import LoRADashLinear
from lora_dash.bench.harness import TrainingStep

R = S = 8
ALPHA = 2.0 * R

FLOOR = "nn.Linear alone (floor)"
MODEL_FLOOR = "frozen forward + head (floor)"
PEFT = "PEFT LoRA"
PEFT_AGAIN = "PEFT LoRA, again (A/A)"  # a second PEFT layer timed in the same rounds: the noise of a time ratio
PRE = "ours pre-launch"
DASH = "ours dash"
DENSE = "dense dash (authors')"
PLAIN = "nn.Linear"
PLAIN_AGAIN = "nn.Linear, again (A/A)"  # a second plain layer timed in the same rounds: the noise of a ratio
MERGED = "ours merged"
MERGED_BASE = "ours merged, its nn.Linear called directly"  # the same weight, without our forward around it
LAUNCH = "lora_dash.launch(model)"
BARE_SVD = "bare torch.linalg.svd of each weight"

LAYER_CONTENDERS = (FLOOR, PEFT, PEFT_AGAIN, PRE, DASH, DENSE)
MODEL_CONTENDERS = (MODEL_FLOOR, PEFT, PEFT_AGAIN, PRE, DASH)


class DenseDashLinear(nn.Module):
    """The authors' dense formulation of the dash phase, restated (METHOD.md §4, "dash term").

        y = W x + b + (α/r)·(x Aᵀ) Bᵀ + x (U_s diag(δ) V_sᵀ)ᵀ

    The ``(out, in)`` dash matrix is built on every forward, as their code does. Made from a launched
    :class:`LoRADashLinear`, whose frozen layer it shares and whose ``A``, ``B``, ``δ``, ``U_s`` and ``V_s``
    it copies: the same function, computed the dense way. ``(..., in)`` → ``(..., out)``.
    """

    def __init__(self, layer: LoRADashLinear) -> None:
        super().__init__()
        self.base = layer.base
        self.scaling = layer.scaling
        self.lora_A = nn.Parameter(layer.lora_A.detach().clone())  # (r, in)
        self.lora_B = nn.Parameter(layer.lora_B.detach().clone())  # (out, r)
        self.dash_delta = nn.Parameter(layer.dash_delta.detach().clone())  # (s,)
        self.register_buffer("dash_U", layer.dash_U.clone())  # (out, s)
        self.register_buffer("dash_V", layer.dash_V.clone())  # (in, s)

    def forward(self, x: Tensor) -> Tensor:
        dash = self.dash_U @ torch.diag(self.dash_delta) @ self.dash_V.T  # (out, in), every call
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling + x @ dash.T


def peft_lora(model: nn.Module, target_modules: str | list[str]) -> None:
    """PEFT's LoRA (same r and α, no dropout) injected in place by PEFT itself; only its adapters train,
    in float32 (``get_peft_model``'s ``autocast_adapter_dtype``) over a half-precision base."""
    import peft  # the oracle extra

    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=target_modules)
    peft.inject_adapter_in_model(config, model)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()


def _as_if_trained(layer: LoRADashLinear) -> None:
    """Give ``B`` (zero at initialization) a random non-zero value, as a few LoRA steps would."""
    with torch.no_grad():
        layer.lora_B.normal_(std=0.01)


def _dash_linear(base: nn.Linear, launched: bool) -> LoRADashLinear:
    layer = LoRADashLinear(base, r=R, alpha=ALPHA, s=S)
    _as_if_trained(layer)
    if launched:
        layer.launch()
    return layer


def _training_step(module: nn.Module, forward_backward: Callable[[], None]) -> TrainingStep:
    """One training step: ``forward_backward()``, then AdamW on ``module``'s trainable parameters (if any)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    return TrainingStep(module, forward_backward, torch.optim.AdamW(trainable, lr=1e-4) if trainable else None)


# ------------------------------------------------------------------------------------------ layers
def build_layer(
    name: str, out_features: int, in_features: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """One ``(out, in)`` layer, its frozen weight in ``dtype``: the bare frozen one (the floor), PEFT's LoRA
    (twice: ``PEFT_AGAIN`` is the same), or ours before or after launch."""
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features).requires_grad_(False).to(dtype)
    if name == FLOOR:
        return base
    if name in (PEFT, PEFT_AGAIN):
        holder = nn.Module()
        holder.linear = base
        peft_lora(holder, ["linear"])
        return holder.linear
    if name in (PRE, DASH):
        return _dash_linear(base, launched=name == DASH)
    raise ValueError(f"unknown layer contender {name!r}; expected one of {LAYER_CONTENDERS[:-1]}")


def build_layers(out_features: int, in_features: int, seed: int = 0) -> dict[str, nn.Module]:
    """Every layer contender at one shape, by name, in ``LAYER_CONTENDERS`` order, with equal frozen weights.

    The dense dash is made from our launched layer, so one SVD serves both (at 4096 × 4096 it takes seconds).
    """
    layers = {name: build_layer(name, out_features, in_features, seed) for name in LAYER_CONTENDERS[:-1]}
    layers[DENSE] = DenseDashLinear(layers[DASH])
    return layers


def in_dtype(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of a built layer contender with its frozen weight in ``dtype`` and its adapters in float32
    (ours keeps them so by itself; PEFT's are cast back, as ``get_peft_model`` does). No new SVD."""
    copied = copy.deepcopy(layer).to(dtype)
    for parameter in copied.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return copied


def layer_training_step(
    module: nn.Module,
    out_features: int,
    in_features: int,
    tokens: int | tuple[int, ...],
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    input_grad: bool = True,
) -> TrainingStep:
    """A training step of one layer on ``x: (*tokens, in)`` in ``dtype`` (``tokens`` an int or the leading
    shape, ``(batch, sequence)`` say), which requires grad as if earlier layers made it (``input_grad``).

    Forward, ``y.backward(g)`` with a fixed random ``g: (*tokens, out)``, AdamW step. The floor has no
    parameters to train, so its step is forward and backward to ``x`` alone.
    """
    leading = (tokens,) if isinstance(tokens, int) else tuple(tokens)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, in_features, generator=generator).to(dtype).requires_grad_(input_grad)
    grad_output = torch.randn(*leading, out_features, generator=generator).to(dtype)

    def forward_backward() -> None:
        module(x).backward(grad_output)
        x.grad = None

    return _training_step(module, forward_backward)


def build_inference_layer(name: str, out_features: int, in_features: int, seed: int = 0) -> nn.Module:
    """``PLAIN`` (or ``PLAIN_AGAIN``, its twin): a frozen ``nn.Linear``; ``MERGED``: our launched layer with
    random ``δ``, merged into it (its ``base`` is ``MERGED_BASE``)."""
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features).requires_grad_(False)
    if name in (PLAIN, PLAIN_AGAIN):
        return base
    if name == MERGED:
        layer = _dash_linear(base, launched=True)
        with torch.no_grad():
            layer.dash_delta.normal_(std=0.01)
        layer.merge()
        return layer
    raise ValueError(f"unknown inference contender {name!r}; expected one of {(PLAIN, PLAIN_AGAIN, MERGED)}")


def inference_call(module: nn.Module, in_features: int, tokens: int, seed: int = 0) -> Callable[[], None]:
    """A forward of ``module`` on ``x: (tokens, in)`` under ``torch.no_grad``."""
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(seed))

    def forward() -> None:
        with torch.no_grad():
            module(x)

    return forward


# ------------------------------------------------------------------------------------------ MiniLM
def load_encoder():
    """``(tokenizer, encoder)`` of all-MiniLM-L6-v2, offline, without transformers' progress bar."""
    from transformers.utils import logging as transformers_logging

    from lora_dash.demo.model import load_minilm  # the demo extra; sets the Hub to offline

    transformers_logging.disable_progress_bar()
    return load_minilm()


def build_classifier(name: str, encoder: nn.Module, targets: str | None = None, seed: int = 0) -> nn.Module:
    """A ``SentenceClassifier`` on a copy of ``encoder``, its ``targets`` adapted (default ``MINILM_TARGETS``:
    all 36 linears). The floor adapts nothing: its encoder is frozen and only the head trains.
    """
    from lora_dash.demo.model import MINILM_TARGETS, SentenceClassifier

    targets = targets or MINILM_TARGETS
    torch.manual_seed(seed)
    model = SentenceClassifier(copy.deepcopy(encoder))
    if name == MODEL_FLOOR:
        model.encoder.requires_grad_(False)
    elif name in (PEFT, PEFT_AGAIN):
        peft_lora(model, targets)
    elif name in (PRE, DASH):
        for layer in lora_dash.inject(model, targets, r=R, alpha=ALPHA, s=S).values():
            _as_if_trained(layer)
        if name == DASH:
            lora_dash.launch(model)
    else:
        raise ValueError(f"unknown model contender {name!r}; expected one of {MODEL_CONTENDERS}")
    model.head.requires_grad_(True)
    return model


def minilm_batch(tokenizer, batch_size: int, tokens: int, seed: int = 0) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask`` ``(batch, tokens)`` and ``labels`` ``(batch,)``: real-ish sentences,
    ``[CLS]`` + random word-piece ids + ``[SEP]``, no padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, tokenizer.vocab_size, (batch_size, tokens), generator=generator)
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def model_training_step(model: nn.Module, batch: dict[str, Tensor]) -> TrainingStep:
    """Forward, cross-entropy, backward, AdamW on the trainable parameters (adapters and head)."""

    def forward_backward() -> None:
        logits = model(batch["input_ids"], batch["attention_mask"])
        F.cross_entropy(logits, batch["labels"]).backward()

    return _training_step(model, forward_backward)


def bare_svds(weights: list[Tensor]) -> None:
    """The floor of a launch: ``torch.linalg.svd(W, full_matrices=False)`` of every weight, results dropped."""
    for weight in weights:
        torch.linalg.svd(weight, full_matrices=False)
