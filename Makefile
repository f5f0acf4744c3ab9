# The two commands a new user needs: `make demo` (the main job) and `make test`.
# Both create .venv and install everything in the order this matters:
# torch (pinned CPU wheel, constraints-cpu.txt) first, then torchvision, then the package with timm.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist
PINS   := constraints-cpu.txt

.PHONY: install test demo seg-demo study study-depth bench cpu-figures cpu-figures-avx2 triton-report gpu-check check-install dataset clean

install: $(STAMP)

# The exact versions live in $(PINS); pyproject.toml states only the range the library supports.
$(STAMP): pyproject.toml $(PINS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(PINS) torch
	$(BIN)/pip install -q -c $(PINS) torchvision
	$(BIN)/pip install -q -c $(PINS) -e ".[dev,triton]"
	@# guarded: only where torchvision's compiled ops do not load (a CUDA torchvision beside the CPU torch),
	@# a start-up hook defines their schemas, so `import timm` works before `import shufflemamba` too
	$(BIN)/python -c "import torchvision" 2>/dev/null || $(BIN)/python src/shufflemamba/_compat.py install-hook
	touch $(STAMP)

dataset:
	@[ -f $(FMNIST)/t10k-images-idx3-ubyte.gz ] || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP) dataset
	$(BIN)/shufflemamba train --config demo

# semantic segmentation on Fashion-MNIST scenes (src/shufflemamba/segmentation/demo.py): the scenes,
# then a small Vim + UperNet in a new run folder under runs/ (metrics.jsonl, curves.png, predictions.png)
seg-demo: $(STAMP) dataset
	$(BIN)/python -m shufflemamba.segmentation.demo --output runs/seg_demo_data
	$(BIN)/shufflemamba train --config seg_demo --data-dir runs/seg_demo_data

study: $(STAMP) dataset
	$(BIN)/python benchmarks/study.py --output runs/study --background

# the second round (docs/study.md): depths 6 and 24 under a heavy recipe, ~40 min on 2 cores; its
# pilots: python benchmarks/study_depth.py --pilot --train-subset 5000 --output runs/study_depth_pilot5k
# (and --train-subset 1000 --epochs 80 --output runs/study_depth_pilot1k)
study-depth: $(STAMP) dataset
	$(BIN)/python benchmarks/study_depth.py --output runs/study_depth --background --pilots runs/study_depth_pilot5k runs/study_depth_pilot1k

bench: $(STAMP)
	$(BIN)/shufflemamba bench

# issue 12's CPU figures of this machine, each in files and docs sections named after its CPU
# (intel-xeon, amd-epyc-zen4, ...): the benchmark suite (with Vim vs ViT) and the scan vs its
# arithmetic limit. ~3 minutes on 2 cores; run it on an idle machine.
cpu-figures: $(STAMP)
	@tag=$$($(BIN)/python -c "from shufflemamba.bench.report import cpu_model, machine_tag; \
	  from shufflemamba.ops.cpu_scan import describe_vector_width; print(machine_tag(cpu_model(), describe_vector_width()))") && \
	  $(BIN)/shufflemamba bench --device cpu --json benchmarks/results/bench-cpu-$$tag.json && \
	  $(BIN)/python benchmarks/docs_section.py bench benchmarks/results/bench-cpu-$$tag.json && \
	  $(BIN)/python benchmarks/scan_limit.py --threads 2 --repeat 5 --docs docs/benchmarks.md \
	    --json benchmarks/results/scan-limit-$$tag.json

# the same figures as an AVX2-only CPU (AMD Zen 3) runs them, on an AVX-512 machine: our kernels built without
# AVX-512 and torch's, oneDNN's and MKL's capped at AVX2 too; sections tagged -avx2
AVX2_ENV := SHUFFLEMAMBA_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
cpu-figures-avx2: $(STAMP)
	@tag=$$($(AVX2_ENV) $(BIN)/python -c "from shufflemamba.bench.report import cpu_model, machine_tag; \
	  from shufflemamba.ops.cpu_scan import describe_vector_width; print(machine_tag(cpu_model(), describe_vector_width()))") && \
	  $(AVX2_ENV) $(BIN)/shufflemamba bench --device cpu --skip scan train --json benchmarks/results/bench-cpu-$$tag.json && \
	  $(BIN)/python benchmarks/docs_section.py bench benchmarks/results/bench-cpu-$$tag.json && \
	  $(AVX2_ENV) $(BIN)/python benchmarks/scan_limit.py --threads 2 --repeat 5 --isa avx2 --docs docs/benchmarks.md \
	    --json benchmarks/results/scan-limit-$$tag.json

# the Triton kernels compiled for the H100 (sm_90) without a GPU: registers, spills, SASS mix
triton-report: $(STAMP)
	$(BIN)/python -m shufflemamba.bench.triton_compile --check --json benchmarks/results/triton-sm90.json

# Install this checkout into another environment that has its own torch, torchvision and timm
# (nothing else is installed or fetched), then import it and train one epoch of a tiny model there.
check-install:
	@[ -n "$(PY)" ] || { echo "error: usage: make check-install PY=/path/to/venv/bin/python" >&2; exit 2; }
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) tests/smoke_train_step.py

# On a CUDA machine, with the torch (and timm, triton, mamba_ssm, ...) already installed there:
# nothing is installed or fetched, the package runs from src/. GPU_PYTHON picks the interpreter
# (default: python3 if it imports torch, else this project's .venv). Without a GPU: one line, exit 0.
# With one: benchmarks/results/gpu-check.json and its section in docs/benchmarks.md.
gpu-check:
	@if [ -n "$(GPU_PYTHON)" ]; then py="$(GPU_PYTHON)"; \
	  "$$py" -c "import torch" 2>/dev/null || { echo "error: GPU_PYTHON=$$py cannot import torch" >&2; exit 2; }; \
	elif python3 -c "import torch" 2>/dev/null; then py=python3; \
	elif [ -x $(BIN)/python ]; then py=$(BIN)/python; \
	else echo "gpu-check: no Python with torch here, so no GPU to check (set GPU_PYTHON)"; exit 0; fi; \
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	PYTHONPATH=src "$$py" -m shufflemamba doctor --gpu --json "$$tmp/gpu-check.json" $(GPU_CHECK_ARGS) && \
	if [ -f "$$tmp/gpu-check.json" ]; then mkdir -p benchmarks/results && \
	  cp "$$tmp/gpu-check.json" benchmarks/results/gpu-check.json && \
	  PYTHONPATH=src "$$py" benchmarks/docs_section.py gpu-check benchmarks/results/gpu-check.json; fi

clean:
	rm -rf $(VENV) runs
