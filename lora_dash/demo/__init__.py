"""The demo: LoRA vs LoRA-Dash on a real pretrained model (all-MiniLM-L6-v2) and real data
(Rotten Tomatoes review snippets), offline, on CPU. Run it with ``python -m lora_dash.demo``.

This package needs the optional extras (transformers, tokenizers, tqdm, matplotlib and the two data
packages); the core ``lora_dash`` never imports it.
"""

import os

# The weights ship inside a Python package: never ask the Hugging Face Hub for anything. Set here,
# before any module of the demo imports transformers (and huggingface_hub under it), because both
# read these once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
