# shardline: make demo | make test | make bench | make lint | make gpu-check
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench bench-build bench-loaders gpu-check clean

install: $(STAMP)

# torch/torchvision pins match the builds this kind of machine keeps on disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	@# The DALI plugin (fused CPU resize) compiles on first use anyway; building it here says in
	@# one line which path the DALI CPU loader takes: the fused operator (a C++ compiler and CUDA's
	@# headers, from a toolkit or the dev extra's wheels; no GPU) or DALI's own resize.
	$(BIN)/python -m loaders.dali_plugin || true
	touch $(STAMP)

demo: install
	$(BIN)/python -m flows build-shards --dataset demo --output data/demo --shard-samples 500
	$(BIN)/python -m shards verify data/demo
	$(BIN)/python -m train --data data/demo --preset demo --output runs/demo
	@$(BIN)/python -c "import json; s = json.load(open('runs/demo/summary.json')); \
	v = f\"val top-1 {s['final_val_top1']:.1f}% (best {s['best_val_top1']:.1f}%)\" if s['final_val_top1'] is not None else f\"no validation ({s['val']})\"; \
	print(f\"demo: {v} in {s['seconds']:.0f} s; TensorBoard: tensorboard --logdir {s['tensorboard']}\")"

test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache
	@# Two workers, a test file each: most tests wait on subprocesses and servers, not the CPU.
	$(BIN)/python -m pytest -q -n auto --dist loadfile

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

bench-build: install
	$(BIN)/python scripts/bench_build.py

bench-loaders: install
	$(BIN)/python -m loaders.bench --shards data/bench-shards --json

bench: bench-build bench-loaders

# The GPU proof kit (scripts/gpu_check.py), from a plain checkout on the torch the GPU machine has:
# no `install` prerequisite (installing would pull the pinned CPU torch over it), no pip install
# at all. `make gpu-check QUICK=1` is the few-minute mode; DRY_RUN=1 runs the kit on CPU.
# GPU_PY: this checkout's .venv where there is one, else the machine's python3.
# Writes runs/gpu-check/result.json.
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PY) scripts/gpu_check.py $(if $(QUICK),--quick) $(if $(DRY_RUN),--dry-run) $(GPU_CHECK_ARGS)

clean:
	rm -rf data/demo runs .pytest_cache
