"""Training on the answers and scoring the choices by log-likelihood.

Training: causal language modelling on ``prompt + target`` with the loss on the target tokens only
(the prompt is context), mean over the batch's target tokens.

Evaluation, the standard multiple-choice protocol: each choice is scored by the model's
log-likelihood of its continuation (``" " + choice``, or the cloze format's continuation) after its
prompt, ``log p(choice | prompt) = Σ_j log p(c_j | prompt, c_<j)``, and the question counts as right
when the gold choice scores highest. Three scores are kept: ``acc`` divides the log-likelihood by the
continuation's length in characters (``acc_per_char`` of OLMo's evaluations, which removes the bias
towards short choices), ``acc_per_token`` by its length in tokens, and ``acc_raw`` does not divide. The paper
instead *generates* an answer and parses the label out of it; with the choices scored directly, a
model that never saw the format still gets a meaningful zero-shot number.

Scoring shares each question's prompt among its choices: one sequence holds the prompt once and then
every choice, and an attention mask lets each choice see the prompt and its own earlier tokens only,
with the positions each would have alone (:class:`Packed`). That is the same computation as one
sequence per choice (a test checks it against :func:`target_log_likelihoods`), with the prompt,
usually most of the tokens, read once instead of once per choice.

Sequences are length-bucketed: sorted by length and cut into batches of at most ``token_budget``
padded tokens, so padding costs little.

Batches are built on the CPU and moved to the model's device (:func:`on_model_device`); scores come back
to the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import functional as F

from lora_dash.commonsense.data import ClozeQuestion, Question, gold_request, requests
from lora_dash.demo.train import endless_batches

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

IGNORE = -100  # label of the tokens that carry no loss (prompt and padding)


@dataclass(frozen=True)
class Encoded:
    """``prompt`` then ``target`` token ids; ``len(target)`` tokens are scored."""

    prompt: tuple[int, ...]
    target: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.target)


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, max_tokens: int) -> Encoded:
    """Token ids of ``prompt`` and ``target``, the prompt cut from the left to fit ``max_tokens`` in all.

    The two are tokenized apart, so the target's tokens are the same whatever precedes it (the
    target starts with a space, a pre-tokenization boundary, so nothing merges across). Only long
    BoolQ passages lose their beginning (and with it the instruction's header).
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    target_ids = tokenizer(target, add_special_tokens=False).input_ids[: max_tokens // 2]
    keep = max_tokens - len(target_ids)
    return Encoded(tuple(prompt_ids[-keep:]), tuple(target_ids))


def collate(sequences: list[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``IGNORE`` but on targets), ``(b, tokens)``."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE)
    for row, sequence in enumerate(sequences):
        ids = [*sequence.prompt, *sequence.target]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(sequence.prompt) : len(ids)] = torch.tensor(sequence.target)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def on_model_device(model: torch.nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``batch`` with every tensor on the device of the model's first parameter."""
    device = next(model.parameters()).device
    return {name: tensor.to(device) for name, tensor in batch.items()}


def _target_logits(model: PreTrainedModel, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Logits at the positions that predict a target token only, ``(n, vocab)``, their labels ``(n,)`` and
    row numbers ``(n,)``. The LM head (49k outputs) runs on those positions alone: most tokens are prompt.
    """
    batch = on_model_device(model, batch)
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]  # token j is predicted from position j − 1
    scored = labels != IGNORE
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[scored]
    return model.lm_head(hidden[:, :-1][scored]).float(), labels[scored], rows


def target_log_likelihoods(model: PreTrainedModel, batch: dict[str, Tensor]) -> Tensor:
    """``(b,)`` sum over each row's target tokens of ``log p(token | everything before it)``.

    One sequence per target: the plain statement of what :func:`packed_log_likelihoods` computes faster.
    """
    logits, labels, rows = _target_logits(model, batch)
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return torch.zeros(batch["labels"].shape[0], dtype=log_probs.dtype, device=rows.device).index_add_(
        0, rows, log_probs
    )


def target_loss(model: PreTrainedModel, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy over the batch's target tokens (a scalar)."""
    logits, labels, _ = _target_logits(model, batch)
    return F.cross_entropy(logits, labels)


@dataclass(frozen=True)
class Packed:
    """A prompt once, then the targets that follow it; each target sees the prompt and itself, not the others."""

    prompt: tuple[int, ...]
    targets: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(target) for target in self.targets)


def pack(sequences: list[Encoded]) -> list[tuple[Packed, list[int]]]:
    """The sequences grouped by identical prompt: ``[(packed, indices of its targets in sequences)]``.

    Choices of one question share their prompt, unless cutting a long prompt to fit a longer choice
    left them different beginnings; then they go in different packs and nothing changes for them.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, sequence in enumerate(sequences):
        groups.setdefault(sequence.prompt, []).append(index)
    return [(Packed(prompt, tuple(sequences[i].target for i in group)), group) for prompt, group in groups.items()]


def collate_packed(packs: list[Packed], pad_id: int) -> dict[str, Tensor]:
    """The batch of packed sequences, right-padded to ``width`` tokens.

    Returns ``input_ids`` and ``position_ids`` ``(b, width)`` (a target's positions continue from the
    prompt's end, as if it were alone), an additive ``attention_mask`` ``(b, 1, width, width)`` (0 where
    a token may attend, the dtype's minimum elsewhere; padding attends to itself only), and for each of
    the ``n`` scored tokens in order (pack by pack, target by target): its ``row``, the ``source``
    position whose logits predict it, its ``label`` and its ``target`` number, all ``(n,)``.
    """
    if not packs:
        raise ValueError("collate_packed needs at least one pack")
    if any(len(target) == 0 for packed in packs for target in packed.targets):
        raise ValueError("every target needs at least one token")
    width = max(len(packed) for packed in packs)
    input_ids = torch.full((len(packs), width), pad_id)
    position_ids = torch.zeros(len(packs), width, dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(packs), 1, 1)
    rows, sources, labels, owners = [], [], [], []
    number = 0
    for row, packed in enumerate(packs):
        length = len(packed.prompt)
        input_ids[row, :length] = torch.tensor(packed.prompt)
        position_ids[row, :length] = torch.arange(length)
        allowed[row, :length, :length] = torch.ones(length, length, dtype=torch.bool).tril()
        start = length
        for target in packed.targets:
            end = start + len(target)
            input_ids[row, start:end] = torch.tensor(target)
            position_ids[row, start:end] = torch.arange(length, length + len(target))
            allowed[row, start:end, :length] = True
            allowed[row, start:end, start:end] = torch.ones(len(target), len(target), dtype=torch.bool).tril()
            # The first target token is predicted from the prompt's last position, the rest from their own.
            sources += [length - 1, *range(start, end - 1)]
            rows += [row] * len(target)
            labels += target
            owners += [number] * len(target)
            number += 1
            start = end
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": mask.unsqueeze(1),
        "row": torch.tensor(rows),
        "source": torch.tensor(sources),
        "label": torch.tensor(labels),
        "target": torch.tensor(owners),
    }


def packed_log_likelihoods(model: PreTrainedModel, batch: dict[str, Tensor]) -> Tensor:
    """``(targets,)``: for each target of a :func:`collate_packed` batch, ``Σ_j log p(t_j | prompt, t_<j)``."""
    batch = on_model_device(model, batch)
    mask = batch["attention_mask"].to(model.dtype)
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]
    ).last_hidden_state
    logits = model.lm_head(hidden[batch["row"], batch["source"]]).float()
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, batch["label"].unsqueeze(-1)).squeeze(-1)
    count = int(batch["target"].max()) + 1
    return torch.zeros(count, dtype=log_probs.dtype, device=log_probs.device).index_add_(0, batch["target"], log_probs)


def length_buckets(lengths: list[int], token_budget: int) -> Iterator[list[int]]:
    """Indices sorted by length, cut into batches whose padded size ``rows × longest`` stays within budget."""
    batch: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batch and (len(batch) + 1) * lengths[index] > token_budget:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


#: How a question's choices are compared: by log-likelihood per character of the continuation (OLMo's
#: ``acc_per_char``), per token, or summed (``acc_raw``).
METRICS = ("acc", "acc_per_token", "acc_raw")


@torch.no_grad()
def question_hits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[Question | ClozeQuestion],
    max_tokens: int,
    token_budget: int = 4096,
) -> dict[str, list[bool]]:
    """Per metric of :data:`METRICS`, whether each question (in order) ranks its gold choice first.

    Each choice's continuation is scored after its own prompt (:func:`data.requests`); the choices of a
    question that share a prompt are packed into one sequence. The model is left in eval mode.
    """
    model.eval()
    packs: list[Packed] = []
    choice_numbers: list[list[int]] = []  # of each pack's targets, in the flat list of all choices
    token_counts: list[int] = []
    first = 0
    for question in questions:
        sequences = [encode(tokenizer, prompt, continuation, max_tokens) for prompt, continuation in requests(question)]
        token_counts += [len(sequence.target) for sequence in sequences]
        for packed, indices in pack(sequences):
            packs.append(packed)
            choice_numbers.append([first + index for index in indices])
        first += len(sequences)
    scores = torch.empty(first, dtype=torch.float64)
    for batch_packs in length_buckets([len(packed) for packed in packs], token_budget):
        batch = collate_packed([packs[i] for i in batch_packs], tokenizer.pad_token_id)
        scores[[number for i in batch_packs for number in choice_numbers[i]]] = (
            packed_log_likelihoods(model, batch).cpu().double()
        )
    tokens = torch.tensor(token_counts, dtype=torch.float64)
    hits: dict[str, list[bool]] = {metric: [] for metric in METRICS}
    start = 0
    for question in questions:
        pairs = requests(question)
        end = start + len(pairs)
        raw = scores[start:end]
        chars = torch.tensor([len(continuation) for _, continuation in pairs], dtype=torch.float64)
        for metric, score in zip(METRICS, (raw / chars, raw / tokens[start:end], raw), strict=True):
            hits[metric].append(int(score.argmax()) == question.gold)
        start = end
    return hits


def accuracy(questions: list[Question | ClozeQuestion], hits: dict[str, list[bool]]) -> dict[str, dict[str, float]]:
    """Accuracy per task and metric, and their unweighted mean over tasks (the paper's "Avg." column).

    Returns ``{task: {"acc", "acc_per_token", "acc_raw", "n"}, ..., "average": {metric: ...}}``.
    """
    by_task: dict[str, list[int]] = {}
    for number, question in enumerate(questions):
        by_task.setdefault(question.task, []).append(number)
    result: dict[str, dict[str, float]] = {
        task: {metric: sum(hits[metric][i] for i in numbers) / len(numbers) for metric in METRICS} | {"n": len(numbers)}
        for task, numbers in by_task.items()
    }
    result["average"] = {metric: sum(task[metric] for task in result.values()) / len(by_task) for metric in METRICS}
    return result


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[Question | ClozeQuestion],
    max_tokens: int,
    token_budget: int = 4096,
) -> dict[str, dict[str, float]]:
    """Multiple-choice accuracy per task and metric, and their task average (:func:`accuracy` of
    :func:`question_hits`). The model is left in eval mode."""
    return accuracy(questions, question_hits(model, tokenizer, questions, max_tokens, token_budget))


def linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate multiplier after ``step`` scheduler steps: up over ``warmup`` steps, down to 0 at ``total``."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # the first optimizer step already gets a non-zero rate
        return max(0.0, (total - step) / max(1, total - warmup))

    return multiplier


def train_steps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    questions: list[Question | ClozeQuestion],
    steps: int,
    batch_size: int,
    seed: int,
    max_tokens: int,
    on_step: Callable[[int, float], None] | None = None,
    first_step: int = 1,
) -> list[float]:
    """Optimizer steps ``first_step … steps`` on ``questions`` (batches of similar length, ``seed``'s order).

    Batches come from :func:`lora_dash.demo.train.endless_batches` (shuffled, length-bucketed pools,
    epoch after epoch), skipping the batches of steps before ``first_step``, so a continued run sees the
    data order of a run from step 1. ``on_step(step, loss)`` runs after each step. Returns the losses.
    """
    if not 1 <= first_step <= steps + 1:
        raise ValueError(f"first_step must be in [1, steps + 1 = {steps + 1}], got {first_step}")
    golds = [gold_request(question) for question in questions]
    texts = [prompt + continuation for prompt, continuation in golds]
    stream = endless_batches(texts, torch.arange(len(questions)), batch_size, seed)
    for _ in range(first_step - 1):
        next(stream)
    model.train()
    losses = []
    for step in range(first_step, steps + 1):
        _, indices = next(stream)
        chosen = [golds[i] for i in indices.tolist()]
        batch = collate([encode(tokenizer, *gold, max_tokens) for gold in chosen], tokenizer.pad_token_id)
        loss = target_loss(model, batch)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"non-finite training loss {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def restore_run(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict,
) -> None:
    """Put a run's snapshot into a fresh ``model``, ``optimizer`` and ``scheduler``: trainable parameters and
    AdamW state by name, and the schedule's position (``state["scheduler"]``). The RNG is left to the
    caller, since a fork restores it only after the launch."""
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["parameters"].items():
            parameters[name].copy_(value)
    for name, value in state["optimizer"].items():
        # The moments live with their parameter; AdamW keeps its step count on the CPU.
        device = parameters[name].device
        optimizer.state[parameters[name]] = {key: v if key == "step" else v.to(device) for key, v in value.items()}
    scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr  # load_state_dict restores the schedule's position, not the rates it set
