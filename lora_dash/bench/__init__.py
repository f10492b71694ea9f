"""The benchmark: how LoRA-Dash's cost compares with plain LoRA, the authors' dense dash, the frozen
layer alone and a bare SVD. Run it with ``python -m lora_dash.bench`` (``--help`` lists the flags).

- :mod:`~lora_dash.bench.harness`: interleaved timing with medians and an A/A noise band, the operators a
  call dispatches, peak-RSS growth of one operation, and the exact bytes of a training step's tensors.
- :mod:`~lora_dash.bench.contenders`: the things compared, each built ready to run one operation.
- :mod:`~lora_dash.bench.memory`: the child process that measures one memory contender (its RSS growth).
- :mod:`~lora_dash.bench.report`: measurements, ratios against targets, the printed table and markdown
  (written between markers, so that the hand-written text around it stays).
- :mod:`~lora_dash.bench.targets`: the targets against PEFT's LoRA, shared with the GPU check.
- :mod:`~lora_dash.bench.launch` and :mod:`~lora_dash.bench.gpu_check`: the launch at scale, and the CUDA path
  measured on one GPU (each a command of its own).

It needs the ``oracle`` extra (peft, transformers) and the MiniLM model package, checked once its flags
are parsed (``--help`` needs only the core); the core ``lora_dash`` never imports it.
"""
