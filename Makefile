# Every target creates (or reuses) the project environment in .venv itself.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,tiffslide]'
	touch $(STAMP)

.PHONY: env demo test lint
env: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/loupe demo --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(VENV)/bin/pytest -q
