"""The paper's own benchmark in miniature: SmolLM2-135M on the eight commonsense-reasoning tasks.

``python -m lora_dash.commonsense`` (``make commonsense``); see REPRODUCTION.md. Needs the demo extra,
``gguf`` and the data packages of ``requirements-nodeps.txt``; the core ``lora_dash`` never imports it.
"""

import os

# The model and the data ship inside Python packages: never ask the Hugging Face Hub for anything.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
