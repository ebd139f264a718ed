# lorkd-pl developer commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# the real-anatomy check reads the MNI ICBM152 template that this wheel ships (no other nilearn code)
NILEARN_SPEC ?= nilearn==0.14.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorkd-pl-installed
RUNTIME_STAMP := $(VENV)/.lorkd-pl-runtime
export WANDB_MODE ?= offline

.PHONY: install install-runtime test demo anatomy bench lint format clean

install: $(STAMP)
install-runtime: $(RUNTIME_STAMP)

# Re-runs only when the project's requirements change; torch goes first so that pip
# never pulls a CUDA build to satisfy `torch` in pyproject.toml.
# What lorkd-pl itself needs (the demo and the anatomy check):
$(RUNTIME_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $(RUNTIME_STAMP)

# ... and what the tests, the linter and the benchmarks need on top (the dev extra):
$(STAMP): $(RUNTIME_STAMP) tests/nnunet-oracle.txt
	$(PY) -m pip install -q -e ".[dev]"
	# nnU-Net's own tools, the oracle of the nnU-Net teacher's tests (why without dependencies: the file)
	$(PY) -m pip install -q --no-deps -r tests/nnunet-oracle.txt
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n 2

# The main job: demo data, generalist teacher, LoRKD distillation, per-region test, report table.
demo: install-runtime
	$(VENV)/bin/lorkd-pl demo

# Real brain anatomy (MNI ICBM152 2009a from the nilearn wheel, installed without its dependencies):
# teacher / plain KD / LoRKD on simulated acquisitions of it, test subjects held out (docs/usage.md).
anatomy: install-runtime
	$(PY) -m pip install -q --no-deps "$(NILEARN_SPEC)"
	$(VENV)/bin/lorkd-pl anatomy-check

bench: install
	$(PY) benchmarks/expert_conv.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/layer_strategies.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/startup.py
	$(PY) benchmarks/teacher_targets.py

lint: install
	$(PY) -m ruff check src tests benchmarks tasks
	$(PY) -m ruff format --check src tests benchmarks tasks

format: install
	$(PY) -m ruff format src tests benchmarks tasks
	$(PY) -m ruff check --fix src tests benchmarks tasks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache runs lightning_logs wandb
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
