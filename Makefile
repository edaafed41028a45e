# On a fresh clone:  `make demo`, `make test`  and  `make serve`.
# Both create the virtual environment (.venv) first if it is missing or out of date.
# No GPU needed: torch's default PyPI wheel is the CUDA build, which runs on the CPU too
# (about 4.5 GB of .venv with its NVIDIA libraries).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test serve demo lint format install clean bench

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11 or newer is required (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[worker,dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the whole test suite (needs PostgreSQL on 127.0.0.1:5432 or HPS_TEST_DATABASE_URL).
test: $(STAMP)
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; \
	exit $$rc

## Run the platform (bot + scheduler + a local worker) on this machine.
serve: $(STAMP)
	$(BIN)/hps serve

## Try the whole loop in a browser: tiny models, a local stand-in for Discord (hps demo).
demo: $(STAMP)
	$(BIN)/hps demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
