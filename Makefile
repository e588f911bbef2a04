# One entry point for everything a user runs. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  make %-14s %s\n", $$1, $$2}'

# The venv is (re)built whenever requirements.txt changes.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@touch $(STAMP)

venv: $(STAMP) ## create or refresh the local virtual environment from the pins

test: $(STAMP) ## run the test suite (CPU: Triton kernels under TRITON_INTERPRET=1)
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(ARGS)

test-gpu: ## run the test suite compiled on a CUDA GPU (uses the current python)
	$(PYTHON) -m pytest -q $(ARGS)

bench: ## attention kernel TFLOP/s and memory vs SDPA / standard attention (CUDA)
	$(PYTHON) scripts/bench_attention.py $(ARGS)

kernel-report: ## registers, spills, serialized wgmma of each kernel compiled for sm_90a (no GPU needed)
	env -u TRITON_INTERPRET $(PY) scripts/kernel_report.py $(ARGS)

bench-context: ## context sweep: peak memory and tokens/s per backend and memory plan (CUDA)
	$(PYTHON) scripts/bench_context.py $(ARGS)

# `make train model=gpt2_small data.seq_len=32768`: make reads `key=value` words as variable
# definitions, so every variable set on the command line, except this Makefile's own, is passed
# to train.py as a Hydra override (with `$(value ...)`, so `${...}` interpolations reach Hydra as typed).
MAKE_VARS := PYTHON VENV ARGS CKPT NAME SMOKE
OVERRIDES  = $(strip $(foreach v,$(filter-out $(MAKE_VARS),$(.VARIABLES)),\
               $(if $(filter command line,$(origin $(v))),'$(v)=$(value $(v))')))

train: $(STAMP) ## train (default: tiny model on CPU, minutes); overrides as words, sweeps as ARGS="-m ..."
	$(PY) train.py $(ARGS) $(OVERRIDES)

# The newest run's checkpoint unless CKPT names one.
CKPT ?= $(lastword $(sort $(wildcard outputs/*/*/checkpoints/latest.pt)))

sample: $(STAMP) ## text from a checkpoint: make sample [CKPT=path] [ARGS='--prompt "def f"']
	$(PY) sample.py $(CKPT) $(ARGS)

# `make experiment NAME=e3_context [SMOKE=1]`: a long-context experiment end to end (scripts/experiment.py):
# its training runs (E1: the context sweep instead), their evaluation, and reports/<NAME>/report.md with
# plots. SMOKE=1 runs the CPU-sized variant (configs/experiment/<NAME>_smoke.yaml); `key=value` words
# override every run's config.
experiment: $(STAMP) ## long-context experiment + report: NAME=e1_scaling|e2_passkey|e3_context|e4_extend [SMOKE=1]
	$(PY) scripts/experiment.py $(NAME) $(if $(filter 1 true yes,$(SMOKE)),--smoke) $(ARGS) $(OVERRIDES)

.PHONY: help venv test test-gpu bench kernel-report bench-context train sample experiment
