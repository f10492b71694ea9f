"""The reproduction study: ``python -m lora_dash.reproduce`` (``make reproduce``); see REPRODUCTION.md."""
