"""The benchmark: how LoRA-Dash's cost compares with plain LoRA, the authors' dense dash, the frozen
layer alone and a bare SVD. Run it with ``python -m lora_dash.bench`` (``--help`` lists the flags).

- :mod:`~lora_dash.bench.harness`: interleaved timing with medians and an A/A noise band, peak-RSS growth
  of one operation, and the exact bytes of a training step's tensors.
- :mod:`~lora_dash.bench.contenders`: the things compared, each built ready to run one operation.
- :mod:`~lora_dash.bench.memory`: the child process that measures one memory contender (RSS and tensors).
- :mod:`~lora_dash.bench.report`: measurements, ratios against targets, the printed table and markdown.

It needs the ``oracle`` extra (peft, transformers) and the MiniLM model package, checked once its flags
are parsed (``--help`` needs only the core); the core ``lora_dash`` never imports it.
"""
