# One entry point for everything a user runs. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  make %-14s %s\n", $$1, $$2}'

# The venv is (re)built whenever requirements.txt changes. Its pins need Python 3.11 (transformers 5.24.0): an
# older $(PYTHON) stops here, not at pip's "no matching distribution". With a GPU pip takes PyPI's CUDA torch
# (several GB, with its NVIDIA libraries); on the CPU CI machine the CPU build lying on disk.
$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "$(PYTHON) is older than Python 3.11, which requirements.txt needs: make venv PYTHON=python3.11" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@touch $(STAMP)

venv: $(STAMP) ## create or refresh .venv from requirements.txt (Linux; a GPU box gets PyPI's CUDA torch)

test: $(STAMP) ## the test suite on CPU: Triton kernels under TRITON_INTERPRET=1 (what CI runs)
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(ARGS)

test-gpu: ## run the test suite compiled on a CUDA GPU (uses the current python)
	$(PYTHON) -m pytest -q $(ARGS)

bench: ## attention kernel TFLOP/s and memory vs SDPA / standard attention (CUDA)
	$(PYTHON) scripts/bench_attention.py $(ARGS)

kernel-report: ## registers, spills, serialized wgmma of each kernel compiled for sm_90a (no GPU needed)
	env -u TRITON_INTERPRET $(PY) scripts/kernel_report.py $(ARGS)

bench-context: ## context sweep: peak memory and tokens/s per backend and memory plan (CUDA)
	$(PYTHON) scripts/bench_context.py $(ARGS)

bench-step: ## where a training step's time goes: device time per kernel category, ours vs SDPA cuDNN (CUDA)
	$(PYTHON) scripts/profile_step.py $(ARGS)

# `make train model=gpt2_small data.seq_len=32768`: make reads `key=value` words as variable
# definitions, so every variable set on the command line, except this Makefile's own, is passed
# to train.py as a Hydra override (with `$(value ...)`, so `${...}` interpolations reach Hydra as typed).
MAKE_VARS := PYTHON VENV ARGS CKPT NAME SMOKE OUT NPROC
OVERRIDES  = $(strip $(foreach v,$(filter-out $(MAKE_VARS),$(.VARIABLES)),\
               $(if $(filter command line,$(origin $(v))),'$(v)=$(value $(v))')))

# NPROC=N: one process per GPU on this machine through torchrun (training/distributed.py: FSDP, parallel.cp).
train: $(STAMP) ## train (default: tiny model on CPU, minutes); overrides as words, sweeps as ARGS="-m ..."; NPROC=N GPUs
	$(PY) $(if $(NPROC),-m torch.distributed.run --standalone --nproc_per_node=$(NPROC) )train.py $(ARGS) $(OVERRIDES)

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

# `make data NAME=e3_context` (or data overrides as words): the tokenizer and packed tokens of that run built into
# .cache now, so the runs that follow start training at once (the site corpus takes minutes to tokenize).
data: $(STAMP) ## build a run's data cache ahead of it: make data [NAME=experiment] [data overrides]
	$(PY) scripts/prepare_data.py $(if $(NAME),experiment=$(NAME)) $(ARGS) $(OVERRIDES)

# `make export [CKPT=path] OUT=dir [ARGS="--dtype bf16 --force"]`: a directory that transformers loads
# without custom code (AutoModelForCausalLM / AutoTokenizer.from_pretrained(OUT)); scripts/export_hf.py
# says which architecture each model becomes. Quoted, so that an unset CKPT or OUT gets its own error.
export: $(STAMP) ## write a Hugging Face model directory: make export CKPT=path OUT=dir
	$(PY) scripts/export_hf.py '$(CKPT)' '$(OUT)' $(ARGS)

.PHONY: help venv test test-gpu bench kernel-report bench-context bench-step train sample experiment data export
