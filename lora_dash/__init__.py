"""LoRA-Dash: LoRA plus a dash along the task-specific directions of each frozen weight.

Si et al., "Unleashing the Power of Task-Specific Directions in Parameter Efficient Fine-tuning",
ICLR 2025 (arXiv 2409.01035).

The method, in reading order: ``directions`` (the math), ``layer`` (the module; its training kernel
is ``fused``, its base-layer predicates ``bases``), ``inject`` and ``schedule`` (the launch). The
integrations around it fill the core's named hooks when imported (this package imports them all):
``quantized`` (reading a quantized base), ``distributed`` (a launch shared among ranks),
``analysis`` (the launch's evidence log) and ``guards`` (warnings for a launch wired wrong). See
docs/METHOD.md §13, "How the code is laid out".
"""

from lora_dash import (
    analysis,
    bases,
    directions,
    distributed,
    fused,
    guards,
    hooks,
    quantized,
    refusals,
)
from lora_dash.checkpoint import (
    load_adapter,
    load_training_checkpoint,
    save_adapter,
    save_training_checkpoint,
)
from lora_dash.export import export_lora, plain_lora_factors, save_peft_adapter
from lora_dash.inject import dash_layers, inject, trained_modules
from lora_dash.layer import DashDirections, LoRADashLinear
from lora_dash.merge import merge_and_unload
from lora_dash.schedule import LaunchController, launch
from lora_dash.state import (
    adapter_param_groups,
    adapter_parameters,
    adapter_state_dict,
    count_trainable_parameters,
    load_adapter_state_dict,
    trained_module_state_dict,
)

__all__ = [
    "DashDirections",
    "LaunchController",
    "LoRADashLinear",
    "adapter_param_groups",
    "adapter_parameters",
    "analysis",
    "bases",
    "adapter_state_dict",
    "count_trainable_parameters",
    "dash_layers",
    "directions",
    "distributed",
    "export_lora",
    "fused",
    "guards",
    "hooks",
    "inject",
    "launch",
    "load_adapter",
    "load_adapter_state_dict",
    "load_training_checkpoint",
    "merge_and_unload",
    "plain_lora_factors",
    "quantized",
    "refusals",
    "save_adapter",
    "save_peft_adapter",
    "save_training_checkpoint",
    "trained_module_state_dict",
    "trained_modules",
]
__version__ = "0.1.0"
