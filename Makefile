# Two-command quick start: `make demo` (tiny CLIPO run on CPU) and `make test`.
# Each target creates .venv idempotently on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: setup demo test bench
setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/train_grpo_clipo.py --config-name=tiny

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/contrastive_loss.py
	$(PY) benchmarks/clipo_overhead.py --threads 1
	$(PY) benchmarks/verifier.py
