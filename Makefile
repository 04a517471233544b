# Set-up and everyday commands. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu where PyPI would serve a CUDA build
TORCH_INDEX ?=
VENV ?= .venv
BIN := $(VENV)/bin
READY := $(VENV)/.derive-ready

.PHONY: setup demo test gpu-test check regenerate train bench clean

$(READY): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(READY)

setup: $(READY)

demo: $(READY)
	$(BIN)/python -m derive batchnorm

test: $(READY)
	$(BIN)/python -m pytest
	$(BIN)/python -m derive --check
	$(BIN)/python -m ruff check derive tests benchmarks
	$(BIN)/python -m black --check --quiet derive tests benchmarks
	$(BIN)/python -m mypy derive

# On a machine with a GPU, using its own python3 (whose torch has CUDA; the venv's is a CPU build):
# the catalogue and the benchmarked compositions on CUDA, then the random property tests there.
gpu-test:
	$(PYTHON) -m pytest tests/test_cuda.py tests/test_integration.py -k cuda
	DERIVE_TEST_DEVICE=cuda $(PYTHON) -m pytest tests/test_properties.py -k "random or catalogue_op"

check: $(READY)
	$(BIN)/python -m derive --check

regenerate: $(READY)
	$(BIN)/python -m derive --all
	$(BIN)/python -m derive batchnorm --no-write --no-verify -q --graph examples/batchnorm.svg

train: $(READY)
	$(BIN)/python -m derive train $(if $(wildcard ../shared/data/names.txt),--data ../shared/data/names.txt,)

bench: $(READY)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
