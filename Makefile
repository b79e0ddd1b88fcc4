# Everything a fresh machine needs: `make test` builds .venv, installs the project and runs the CPU suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; override (e.g. TORCH_SPEC="torch==2.11.*") on a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
RECIPE ?= recipes/cpu-demo.yaml
CONFIG ?= data/configs/sample.yaml
PYTEST_ARGS ?=

.PHONY: install test test-gpu gpu-check train data bench-kernels bench-data bench-train bench-wkv7-precision demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[test]"
	touch $@

test: install
	$(PY) -m pytest -q -x $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -q -m gpu -rs $(PYTEST_ARGS)

# On a GPU machine with torch already installed (wheels for the rest in .whl/): the GPU stages in one command.
gpu-check:
	bash bench/device_run.sh $(STAGES)

train: install
	$(VENV)/bin/infctx fit --config $(RECIPE)

data: install
	$(VENV)/bin/infctx data build --config $(CONFIG)

demo: install
	$(VENV)/bin/infctx demo

bench-kernels: install
	$(PY) -m infctx.bench.kernels

bench-data: install
	$(PY) -m infctx.bench.data

bench-train: install
	$(PY) -m infctx.bench.train

# CPU: errors of the chunked wkv7 with every matmul's operands rounded to tf32 / bf16 (a tensor-core kernel's design)
bench-wkv7-precision: install
	$(PY) -m infctx.bench.wkv7_precision

clean:
	rm -rf $(VENV) *.egg-info
