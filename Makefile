# segmerge: `make demo` trains the embedded default and predicts; `make test` runs the suite.
# Both create .venv when it is missing and install into it (torch first: the pinned CPU wheel).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[test,data,export,oracle]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check segmerge tests scripts

bench: $(STAMP)
	$(BIN)/python scripts/bench_aggregation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
