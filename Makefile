# Two commands on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) a virtualenv, bootstrap torch, then install marginscope into it.
#   PYTHON      interpreter used to create the virtualenv (default: python3)
#   VENV        virtualenv folder (default: .venv)
#   TORCH_SPEC  what `pip install` gets when torch is absent (default: torch==2.13.0, a CPU wheel);
#               e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" for CUDA.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.marginscope-installed
DEMO_DIR ?= marginscope-demo
PYTEST_ARGS ?=

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The embedded demo: a tiny GPT-2-style model trained from scratch (SFT, cached in $(DEMO_DIR)/sft-model),
# then DPO with the tracker on the sentiment probes of each style; traces, figures and report.
demo: install
	$(VENV)/bin/marginscope demo --out $(DEMO_DIR)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
