# `make test` builds its own pinned environment in .venv on first use, then runs the whole suite (what CI
# runs; 17 minutes on a busy 2-core machine). `make test-fast` runs all but the tests marked `slow` (the distributed,
# crash-resume, notebook, demo, bench and reproduction subprocesses; the studies' training runs; the real MiniLM;
# the HF Trainer and TRL; the fuzzer), in 40 s on a quiet 2-core machine: the edit-test loop. Both pass ARGS to pytest, e.g. `make test-fast ARGS="-k launch"`.
# `make lint` runs ruff (pinned in requirements-dev.txt, configured in pyproject.toml): the lint rules and the
# format check, over the library, the tests and the notebooks; CI runs it before the tests.
# `make demo` (same environment) fine-tunes all-MiniLM-L6-v2 with LoRA and LoRA-Dash and reports;
# `make demo ARGS=--quick` is the one-minute smoke run; `make demo ARGS=--help` lists the flags.
# `make notebooks` opens JupyterLab (pinned in requirements-dev.txt) on notebooks/, its kernel the same environment;
# Ctrl-C stops it. ARGS go to `jupyter lab`, e.g. ARGS="--no-browser --port 8890" on a remote machine.
# `make bench` times LoRA-Dash against PEFT's LoRA, the authors' dense dash and the bare layer, measures
# its memory, then times the launch on 1-3 gloo ranks and the SVD cost by shape (the first part about 6 minutes on
# 2 cores, `--quick` about one); `make bench ARGS="--markdown BENCHMARKS.md"` also writes the first part's report,
# between the markers in that file (the hand-written text around them stays).
# `make reproduce` runs the study behind REPRODUCTION.md (62 minutes on 2 cores for the short budget,
# 48 minutes more for the converged one with ARGS="--workers 2"; resumable) into results/reproduce;
# `make reproduce ARGS=--quick` is its few-minute miniature.
# `make commonsense` runs the SmolLM2-135M study on the eight commonsense tasks (about 6.5 hours on 2 cores,
# resumable) into results/commonsense; ARGS=--quick for its miniature, ARGS=--report-only for the tables; ARGS="--cloze ..." for the cloze study (REPRODUCTION.md).
# `make gpu-check` measures the CUDA path on one GPU in under 10 minutes (the CUDA tests, a bf16 step and its memory
# against PEFT's LoRA at LLaMA-7B shapes and on a whole LLaMA-architecture model, host syncs after the launch, the
# launch's SVDs and the 7B/70B projection) into results/gpu_check.md; without CUDA it says so and exits 0;
# ARGS=--dry-run runs the same code on the CPU at tiny shapes (CI) into results/gpu_check.dry-run.md (git-ignored).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint demo notebooks bench gpu-check reproduce commonsense clean

$(STAMP): requirements-dev.txt requirements-nodeps.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The ten slowest tests are listed at the end: where to look first when the suite grows slow.
test: $(STAMP)
	$(PY) -m pytest -q --durations=10 $(ARGS)

# One torch thread unless told otherwise: on these tiny tensors thread pools cost more than they give.
test-fast: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: $(STAMP)
	$(PY) -m lora_dash.demo $(ARGS)

notebooks: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks $(ARGS)

bench: $(STAMP)
	$(PY) -m lora_dash.bench $(ARGS)
	$(PY) -m lora_dash.bench.launch $(filter --quick,$(ARGS))
	$(PY) -m lora_dash.bench.launch --svd-costs $(filter --quick,$(ARGS))

gpu-check: $(STAMP)
	$(PY) -m lora_dash.bench.gpu_check $(ARGS)

reproduce: $(STAMP)
	$(PY) -m lora_dash.reproduce $(ARGS)

commonsense: $(STAMP)
	$(PY) -m lora_dash.commonsense $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
