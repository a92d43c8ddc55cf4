# Two commands a newcomer needs: `make demo` (the main job) and `make test`. Each creates or updates the
# local virtualenv .venv and installs the project into it with pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fgds-installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fgds demo --out demo_out

lint: $(STAMP)
	$(BIN)/ruff check fgds_engine tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_sampler.py

clean:
	rm -rf build demo_out .pytest_cache
