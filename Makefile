# The two commands a new user needs: `make demo` (the main job) and `make test`.
# Both create .venv and install everything in the order this matters (SPEC 4):
# torch (pinned CPU wheel) first, then torchvision, then the package with timm.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install test demo study bench triton-report dataset clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q torchvision==0.28.0
	$(BIN)/pip install -q -e ".[dev,triton]"
	touch $(STAMP)

dataset:
	@[ -f $(FMNIST)/t10k-images-idx3-ubyte.gz ] || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP) dataset
	$(BIN)/shufflemamba train --config demo --output runs/demo

study: $(STAMP) dataset
	$(BIN)/python benchmarks/study.py --output runs/study --background

bench: $(STAMP)
	$(BIN)/shufflemamba bench

# the Triton kernels compiled for the H100 (sm_90) without a GPU: registers, spills, SASS mix
triton-report: $(STAMP)
	$(BIN)/python -m shufflemamba.ops.triton_compile --json benchmarks/results/triton-sm90.json

clean:
	rm -rf $(VENV) runs
