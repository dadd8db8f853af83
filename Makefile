# Every target creates (or reuses) the project environment in .venv itself.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'  # dev holds the other extras (see pyproject.toml)
	touch $(STAMP)

.PHONY: env demo lint typecheck check test

## env: create (or update) the project environment in .venv
env: $(STAMP)

## demo: generate synthetic slides, train, evaluate, predict (runs/demo/report.md)
demo: $(STAMP)
	$(VENV)/bin/loupe demo --out runs/demo
	@echo "view the predictions in the browser: $(VENV)/bin/loupe view runs/demo/predict --open"

## lint: ruff lint and format check of src, tests, benchmarks and scripts
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

## typecheck: mypy over src (settings in pyproject.toml [tool.mypy])
typecheck: $(STAMP)
	$(VENV)/bin/mypy

# PyTorch's OpenMP threads sleep instead of spinning while they wait: on a machine shared with other jobs, spinning
# threads made single tests 10-100x slower (the streaming-engine gradient tests: 2 s alone, 35 s to over 200 s).
PYTEST := OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VENV)/bin/pytest

## check: the daily fast tier: lint, type check, tests not marked slow
check: lint typecheck
	$(PYTEST) -q -m "not slow"

## test: lint, type check and the whole test suite (what CI runs)
test: lint typecheck
	$(PYTEST) -q
