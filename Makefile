# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/example.yaml

.PHONY: run test lint typecheck unit mosquitto chromium node-deps bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

run: $(STAMP)
	$(BIN)/mqtt-front run -c $(CONFIG)

# Tests need a real Mosquitto (and its clients); install it when missing.
mosquitto:
	@if ! command -v mosquitto >/dev/null 2>&1 && ! test -x /usr/sbin/mosquitto || ! command -v mosquitto_pub >/dev/null 2>&1; then \
		echo "mosquitto not found: installing mosquitto and mosquitto-clients with apt-get"; \
		DEBIAN_FRONTEND=noninteractive apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto mosquitto-clients; \
	fi

# The browser tests (tests/e2e/test_browser.py) drive Debian's Chromium with playwright-core; install it when missing
# (`npx playwright install` downloads a browser of its own, which this network does not allow).
chromium:
	@if ! test -x /usr/bin/chromium; then \
		echo "chromium not found: installing chromium with apt-get"; \
		DEBIAN_FRONTEND=noninteractive apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	fi

# ruff, then the architecture (../shared/architecture.md): import-linter's contracts in pyproject.toml, then the
# AST checker (no cycles, layers, no I/O in mqtt/session/acl, 500-line modules, events through log_event).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python tools/check_architecture.py

typecheck: $(STAMP)
	$(BIN)/mypy

# MQTT.js interop tests: the npm `mqtt` package pinned by tests/js/package-lock.json, run by the machine's Node.js.
NODE_STAMP := tests/js/node_modules/.installed

node-deps: $(NODE_STAMP)

$(NODE_STAMP): tests/js/package.json tests/js/package-lock.json
	@if ! command -v npm >/dev/null 2>&1; then \
		echo "npm not found: installing nodejs and npm with apt-get"; \
		DEBIAN_FRONTEND=noninteractive apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm; \
	fi
	cd tests/js && npm ci --no-audit --no-fund
	@touch $@

unit: $(STAMP) mosquitto chromium node-deps
	PATH="$(CURDIR)/$(BIN):$$PATH:/usr/sbin" $(BIN)/pytest -q

test: lint typecheck unit

bench: $(STAMP) mosquitto
	PATH="$(CURDIR)/$(BIN):$$PATH:/usr/sbin" $(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis tests/js/node_modules
