# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make run` installs the runtime dependencies only (no test tool chain): a stamp of its own.
RUN_STAMP := $(VENV)/.installed-run
CONFIG ?= config/example.yaml

.PHONY: run test lint typecheck unit mosquitto mosquitto-broker chromium promtool systemd-analyze haproxy redis-server node-deps bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

$(RUN_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[embedded,uvloop]'
	@touch $@

# No upstream in config/example.yaml: mqtt-front runs a managed Mosquitto (MQTT 5 and 3.1.1, loopback only)
# when it is installed, else the amqtt fallback (MQTT 3.1.1 only).
run: $(RUN_STAMP) mosquitto-broker
	$(BIN)/mqtt-front run -c $(CONFIG)

# The Mosquitto binary for `make run`'s embedded broker; the Debian package also starts a system service on
# port 1883 (where config/example.yaml listens): mqtt-front runs its own Mosquitto, so that one is stopped.
mosquitto-broker:
	@if ! command -v mosquitto >/dev/null 2>&1 && ! test -x /usr/sbin/mosquitto; then \
		echo "mosquitto not found: installing mosquitto with apt-get (the embedded broker that serves MQTT 5 clients)"; \
		if DEBIAN_FRONTEND=noninteractive apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto; then \
			if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then \
				echo "stopping and disabling the mosquitto system service the package started (port 1883)"; \
				systemctl disable --now mosquitto >/dev/null 2>&1 || true; \
			fi; \
		else \
			echo "could not install mosquitto: mqtt-front falls back to amqtt (MQTT 3.1.1 clients only)"; \
		fi; \
	fi

# Tests need a real Mosquitto (and its clients); install it when missing.
mosquitto:
	@if ! command -v mosquitto >/dev/null 2>&1 && ! test -x /usr/sbin/mosquitto || ! command -v mosquitto_pub >/dev/null 2>&1; then \
		echo "mosquitto not found: installing mosquitto and mosquitto-clients with apt-get"; \
		DEBIAN_FRONTEND=noninteractive apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto mosquitto-clients; \
	fi

# The alert rules (docker/prometheus/alerts.yml) and the dashboard's queries are checked with promtool
# (tests/process/test_alerts.py, test_docker.py): Debian's prometheus package has it; install it when missing.
promtool:
	@if ! command -v promtool >/dev/null 2>&1; then \
		echo "promtool not found: installing prometheus (for promtool) with apt-get"; \
		if DEBIAN_FRONTEND=noninteractive apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; then \
			if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then \
				echo "stopping the prometheus service the package started (only promtool is needed)"; systemctl disable --now prometheus; \
			fi; \
		else \
			echo "promtool could not be installed: the alert-rule and dashboard tests need it"; exit 1; \
		fi; \
	fi

# The systemd unit (packaging/mqtt-front.service) is checked with systemd-analyze verify; install it when missing.
systemd-analyze:
	@if ! command -v systemd-analyze >/dev/null 2>&1; then \
		echo "systemd-analyze not found: installing systemd with apt-get"; \
		DEBIAN_FRONTEND=noninteractive apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd; \
	fi

# The replica tests (tests/process/test_replicas.py) put Debian's HAProxy in front of two mqtt-front processes, and
# the cluster-wide connection cap (limits.store) is tested against a real redis-server; install them when missing.
# The packages start system services (ports 80 / 6379): the tests run their own, so those are stopped.
haproxy:
	@if ! command -v haproxy >/dev/null 2>&1 && ! test -x /usr/sbin/haproxy; then \
		echo "haproxy not found: installing haproxy with apt-get"; \
		DEBIAN_FRONTEND=noninteractive apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy || exit 1; \
		if command -v systemctl >/dev/null 2>&1; then systemctl disable --now haproxy >/dev/null 2>&1 || true; fi; \
	fi

redis-server:
	@if ! command -v redis-server >/dev/null 2>&1 && ! test -x /usr/bin/redis-server; then \
		echo "redis-server not found: installing redis-server with apt-get"; \
		DEBIAN_FRONTEND=noninteractive apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server || exit 1; \
		if command -v systemctl >/dev/null 2>&1; then systemctl disable --now redis-server >/dev/null 2>&1 || true; fi; \
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

unit: $(STAMP) mosquitto chromium promtool systemd-analyze haproxy redis-server node-deps
	PATH="$(CURDIR)/$(BIN):$$PATH:/usr/sbin" $(BIN)/pytest -q

test: lint typecheck unit

bench: $(STAMP) mosquitto haproxy
	PATH="$(CURDIR)/$(BIN):$$PATH:/usr/sbin" $(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis tests/js/node_modules
