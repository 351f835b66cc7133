# Two entry points: `make run` (devnet + facilitator) and `make test` (the whole suite).
# Both bootstrap everything they need: a virtualenv with the package, and the pinned npm tools.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY_STAMP  := $(VENV)/.installed
NPM_STAMP := node_modules/.installed
SYS_STAMP := $(VENV)/.system-tools
PYTEST_ARGS ?=

.PHONY: run test bootstrap bench contracts clean

bootstrap: $(PY_STAMP) $(NPM_STAMP)

$(PY_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	@$(PYTHON) -m venv $(VENV) || { echo "python venv failed: install python3-venv (Debian/Ubuntu)"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,devnet]"
	@touch $@

$(SYS_STAMP): deploy/ensure-prometheus.sh
	@sh deploy/ensure-prometheus.sh
	@touch $@

$(NPM_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

run: bootstrap
	$(BIN)/facilitator devnet

test: bootstrap $(SYS_STAMP)
	@bash tests/compat/setup_og_venv.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: bootstrap
	$(BIN)/python bench/verify.py
	$(BIN)/python bench/settle.py
	$(BIN)/python bench/attestations.py
	$(BIN)/python bench/export.py

contracts: $(NPM_STAMP)
	node contracts/compile.js

clean:
	rm -rf $(VENV) node_modules .devnet .pytest_cache
