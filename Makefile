# Everything installs from nothing: `make test` and `make run` create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch on this kind of machine; override (e.g. TORCH=torch) for a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install test test-all run clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,test-hf,lightning,hf,notebook]"  # every optional part the tests exercise
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

run: install
	$(VENV)/bin/stardomain run --out runs/default

clean:
	rm -rf $(VENV) runs
