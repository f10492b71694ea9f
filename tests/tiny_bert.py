"""The tiny 🤗 model that the Trainer tests train (``test_hf.py`` in one process, ``test_hf_distributed.py`` in
several): a two-layer BERT classifier built from a config (nothing is downloaded), random tokens, and Trainer's
arguments for a short run on CPU with gradient accumulation."""

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from lora_dash import inject

T = 3  # launch step
STEPS = 6  # optimizer steps per run; checkpoints every 2, so at 2 (before the launch) and 4 (after)
ACCUMULATION = 4  # micro-batches per optimizer step, over all ranks
MICRO_BATCH = 2  # samples per micro-batch
TARGETS = r".*\.(query|value)"


def build_base(dropout: float = 0.1) -> BertForSequenceClassification:
    """A two-layer BERT classifier from a config: the same "pretrained" weights (and head) for every call.
    ``dropout`` is BERT's hidden and attention dropout (0.1, its default)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config)


def build_model(init_seed: int = 1, targets: str = TARGETS, dropout: float = 0.1) -> BertForSequenceClassification:
    """:func:`build_base` with LoRA-Dash (r 4, α 8, s 2) on ``targets``; ``init_seed`` drives the A init only."""
    model = build_base(dropout)
    torch.manual_seed(init_seed)
    inject(model, targets, r=4, alpha=8, s=2)
    return model


class Tokens(Dataset):
    """Random token ids and labels, fixed by a seed; by default the samples of ``STEPS`` optimizer steps."""

    def __init__(self, size: int = STEPS * ACCUMULATION * MICRO_BATCH) -> None:
        generator = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, 64, (size, 8), generator=generator)
        self.labels = torch.randint(0, 3, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def training_arguments(output_dir, world: int = 1, **overrides) -> TrainingArguments:
    """``STEPS`` optimizer steps of ``ACCUMULATION`` micro-batches, checkpoints every 2, on CPU. With ``world``
    ranks each takes ``ACCUMULATION / world`` micro-batches a step: the same global batch in one process or
    several."""
    settings = dict(
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=ACCUMULATION // world,
        max_steps=STEPS,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
        ddp_timeout=60,  # with several ranks, a lost peer fails the run instead of hanging it
    )
    return TrainingArguments(str(output_dir), **{**settings, **overrides})
