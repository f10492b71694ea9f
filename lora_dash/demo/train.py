"""Fine-tune a SentenceClassifier with LoRA or LoRA-Dash, and evaluate it.

Both methods get the same seed, the same initial head and ``A`` matrices, the same batches in the same
order and the same number of optimizer steps. Until step ``t`` they are the same computation (a
LoRA-Dash layer before launch *is* a LoRA layer), so any difference in the end comes from the dash.
"""

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

import lora_dash
from lora_dash.demo.data import Split, batches
from lora_dash.demo.model import MINILM_TARGETS, SentenceClassifier, load_minilm, tokenize

METHODS = ("LoRA", "LoRA-Dash")


@dataclass
class TrainConfig:
    """Everything that defines a run; the demo's command-line flags fill it."""

    r: int = 8  # LoRA rank
    s: int = 8  # task-specific directions per layer
    t: int = 100  # launch right after this optimizer step
    steps: int = 250  # optimizer steps in all, pre-launch and dash together
    lr: float = 1e-3
    batch_size: int = 32
    eval_batch_size: int = 128
    seed: int = 0
    targets: str = MINILM_TARGETS
    alpha: float | None = None  # LoRA α; None: 2r (see effective_alpha)

    @property
    def effective_alpha(self) -> float:
        """The α the adapters get: ``alpha`` if given, else ``2r``, the paper's setting (LoRA scaling α/r = 2).

        Resolved here rather than stored, so ``dataclasses.replace(config, r=...)`` keeps α = 2r.
        """
        return 2.0 * self.r if self.alpha is None else self.alpha


@dataclass
class RunResult:
    """One method's trained model and its numbers."""

    method: str
    model: SentenceClassifier
    losses: list[float]  # training loss at every step
    accuracy: float  # on the test set
    trainable_parameters: int  # adapters (A, B, and δ once launched) plus the head
    train_seconds: float
    eval_seconds: float
    launched_at: int | None  # optimizer step after which LoRA-Dash launched; None for LoRA


def build(
    method: str, config: TrainConfig
) -> tuple[PreTrainedTokenizerBase, SentenceClassifier, torch.optim.Optimizer, lora_dash.LaunchController | None]:
    """A fresh pretrained classifier with adapters, its optimizer and (LoRA-Dash only) its controller.

    LoRA is LoRA-Dash that never launches, so both use ``lora_dash.inject``; only LoRA-Dash gets a
    ``LaunchController``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    torch.manual_seed(config.seed)  # the head and every A start identical for both methods
    tokenizer, encoder = load_minilm()
    model = SentenceClassifier(encoder)
    lora_dash.inject(model, config.targets, r=config.r, alpha=config.effective_alpha, s=config.s)
    # inject freezes everything but the adapters; the new head must learn in full.
    model.head.requires_grad_(True)
    optimizer = torch.optim.AdamW([*lora_dash.adapter_parameters(model), *model.head.parameters()], lr=config.lr)
    controller = None
    if method == "LoRA-Dash":
        controller = lora_dash.LaunchController(model, launch_step=config.t).attach(optimizer)
    return tokenizer, model, optimizer, controller


def progress_bar(iterable, progress: bool, **options) -> tqdm:
    """A tqdm bar, or a silent one when ``progress`` is False.

    ``disable`` is passed only to silence: left unset, tqdm still reads its own defaults (for example
    ``TQDM_DISABLE=1`` in the environment, which the notebooks set).
    """
    return tqdm(iterable, **options) if progress else tqdm(iterable, disable=True, **options)


def endless_batches(texts: list[str], labels: Tensor, batch_size: int, seed: int) -> Iterator[tuple[list[str], Tensor]]:
    """Epoch after epoch, each in a fresh order (seed, seed + 1, ...), so any step budget works."""
    for epoch in itertools.count():
        yield from batches(texts, labels, batch_size, seed=seed + epoch)


def train(
    model: SentenceClassifier,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    split: Split,
    config: TrainConfig,
    controller: lora_dash.LaunchController | None = None,
    desc: str = "train",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    first_step: int = 1,
) -> tuple[list[float], int | None]:
    """AdamW steps ``first_step … config.steps`` of cross-entropy; returns the loss at each and the launch step.

    ``progress=False`` hides the progress bars. ``on_step(step, loss)`` runs after every optimizer step
    (and after the launch, when that step launched), e.g. to record measurements along training.
    ``first_step > 1`` continues a run whose model and optimizer have taken the earlier steps: the
    batches of those steps are skipped, so the data order stays that of a run from step 1.
    """
    if not 1 <= first_step <= config.steps + 1:
        raise ValueError(f"first_step must be in [1, steps + 1 = {config.steps + 1}], got {first_step}")
    model.train()
    stream = endless_batches(split.train_texts, split.train_labels, config.batch_size, config.seed)
    stream = itertools.islice(stream, first_step - 1, None)
    losses: list[float] = []
    launched_at = 0 if controller is not None and controller.launched else None  # launched before this call
    bar = progress_bar(range(first_step, config.steps + 1), progress, desc=desc, unit="step")
    for step in bar:
        texts, labels = next(stream)
        loss = F.cross_entropy(model(**tokenize(tokenizer, texts)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if controller is not None and not controller.launched and step == controller.launch_step:
            # The controller's post-step hook launches every layer inside this step (one SVD per
            # layer); the bar makes that pause visible and times it.
            with progress_bar(None, progress, total=1, desc="launch: SVD of every W, pick TSDs") as launch_bar:
                optimizer.step()
                launch_bar.update()
        else:
            optimizer.step()
        if controller is not None and launched_at is None and controller.launched:
            launched_at = step  # observed, not assumed: the report checks it equals t
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            on_step(step, losses[-1])
    return losses, launched_at


@torch.no_grad()
def evaluate(
    model: SentenceClassifier,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    labels: Tensor,
    batch_size: int = 128,
    desc: str = "eval",
    progress: bool = True,
) -> float:
    """Accuracy on ``texts``, in eval mode (no dropout); ``progress=False`` hides the bar."""
    model.eval()
    correct = 0
    n_batches = -(-len(texts) // batch_size)
    stream = progress_bar(batches(texts, labels, batch_size), progress, total=n_batches, desc=desc, unit="batch")
    for batch_texts, batch_labels in stream:
        correct += int((model.predict(**tokenize(tokenizer, batch_texts)) == batch_labels).sum())
    return correct / len(texts)


def run(
    method: str,
    split: Split,
    config: TrainConfig,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Build, train and evaluate one method; ``progress`` and ``on_step`` as in :func:`train`."""
    tokenizer, model, optimizer, controller = build(method, config)
    start = time.perf_counter()
    losses, launched_at = train(
        model,
        tokenizer,
        optimizer,
        split,
        config,
        controller,
        desc=f"{method} train",
        progress=progress,
        on_step=on_step,
    )
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    accuracy = evaluate(
        model,
        tokenizer,
        split.test_texts,
        split.test_labels,
        config.eval_batch_size,
        desc=f"{method} eval",
        progress=progress,
    )
    eval_seconds = time.perf_counter() - start
    trainable = lora_dash.count_trainable_parameters(model) + sum(p.numel() for p in model.head.parameters())
    return RunResult(method, model, losses, accuracy, trainable, train_seconds, eval_seconds, launched_at)
