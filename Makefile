# Two entry points: `make run` (set up, then one chat turn with a small demo model) and
# `make test` (set up, then lint and run the whole test suite). Both create .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On Linux x86-64 pin the CPU wheel of torch (any other spec pulls gigabytes of CUDA there).
TORCH_PIN := $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),torch==2.13.0,)
LLAMA_CPP := llama-cpp-python==0.3.36

.PHONY: run test setup setup-test lint clean

# The compiled CPU kernels and fused operations: `pip install -e .` builds them once; rebuild
# when their source changes.
KERNEL_SOURCES := setup.py $(wildcard src/dwarfstar/quant/csrc/*.[ch] src/dwarfstar/model/csrc/*.c)

$(BIN)/ds4: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_PIN),$(BIN)/python -m pip install -q $(TORCH_PIN))
	$(BIN)/python -m pip install -q -e .
	touch $@

# The llama.cpp reference is built from source: the published wheels predate `deepseek4`.
$(VENV)/.test-deps: $(BIN)/ds4
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install -q \
		--no-binary llama-cpp-python "$(LLAMA_CPP)"
	touch $@

$(VENV)/.kernels: $(BIN)/ds4 $(KERNEL_SOURCES)
	$(BIN)/python setup.py -q build_ext --inplace
	touch $@

setup: $(BIN)/ds4 $(VENV)/.kernels
setup-test: $(VENV)/.test-deps $(VENV)/.kernels

run: setup
	$(BIN)/ds4 --demo -p "Hello" -n 16

lint: setup-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: setup-test lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info src/dwarfstar/quant/_cpu.*.so src/dwarfstar/model/_fused.*.so
