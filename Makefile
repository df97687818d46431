# Two commands on a fresh machine: `make demo` and `make test`. Every step lives here.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_DIR ?= demo

.PHONY: demo test bench lint clean venv mutation

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing embedstore and its dependencies into $(VENV) (first time only, about 2-3 minutes)..."
	@$(BIN)/python -m pip install -qq --upgrade "pip>=24"
	@$(BIN)/python -m pip install -qq -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/embedstore demo $(DEMO_DIR)

# Fast suite (the slow end-to-end tests are included; GPU tests skip without CUDA).
test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

# Mutation testing (a developer tool, not part of `make test`; see docs/TESTING.md).
# MODULES: glob patterns of the files to mutate, e.g. MODULES="embedstore/manifest.py".
MODULES ?= embedstore/store/* embedstore/extract.py embedstore/train.py embedstore/catalog.py embedstore/manifest.py
mutation: $(STAMP)
	$(BIN)/python -m pip install -qq "mutmut>=3.3"
	$(BIN)/python tests/mutation.py $(MODULES)

lint: $(STAMP)
	$(BIN)/ruff check embedstore models cli tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache build *.egg-info
