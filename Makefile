# flowgmm-fast: the two commands of the README.
#   make demo   set up a local virtual environment and run the main job (semi-supervised FlowGMM demo, CPU, < 3 min)
#   make test   set up the same environment, run the test suite (make pytest), then the packaging check
#               (make package-test: sdist -> CPU-only wheel built from it -> fresh venv -> smoke test outside the repo)
# TORCH_PINS pins torch for these build machines (installed offline from the local cache); elsewhere override it,
# e.g. `make test TORCH_PINS=torch` to take your platform's own build.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
DEMO_ARGS ?=

# Build the CUDA kernels whenever a toolkit is present (they compile without a GPU).
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: setup build test pytest package-test demo bench-cpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

$(VENV)/.deps: $(BIN)/python requirements-dev.txt
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.deps

# The extension (flowgmm_fast._C) builds against the torch installed above, hence --no-build-isolation.
build: setup
	$(BIN)/python -m pip install --no-build-isolation --no-deps -e .
	$(BIN)/python -c "import flowgmm_fast as f; print('flowgmm_fast', f.__version__, 'backends:', f.available_backends())"

# pytest exits 5 when it collected no test: a run that tests nothing is reported as a failure, not as green.
pytest: build
	@$(BIN)/python -m pytest tests -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

# Install as a user of the released files would (.ci/package_test.sh): about 4 minutes on 2 cores, most of it
# compiling the CPU kernels and installing torch into the fresh environment.
package-test: setup
	PYTHON=$(BIN)/python bash .ci/package_test.sh

test: pytest package-test

demo: build
	$(BIN)/python experiments/demo.py $(DEMO_ARGS)

bench-cpu: build
	bash benchmarks/run_cpu.sh

clean:
	rm -rf build dist *.egg-info flowgmm_fast/_C*.so
