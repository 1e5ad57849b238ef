# canaryd — `make demo` for a first look, `make test` for everything CI checks.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCK   := requirements.lock
PIP    := $(BIN)/python -m pip --disable-pip-version-check --quiet

.PHONY: demo test lint typecheck unit services bench lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Runtime dependencies only, at the versions pinned in $(LOCK).
$(VENV)/.installed: $(BIN)/python pyproject.toml $(LOCK)
	$(PIP) install -c $(LOCK) -e .
	touch $@

# Plus the test and lint tools, and the benchmarks' plotting (bench/ is type-checked too):
# one pip run for all of it, and no byte-compiling of every installed file up front
# (Python compiles what the tests import): half a minute off `make test` on a clean clone.
$(VENV)/.installed-dev: $(BIN)/python pyproject.toml $(LOCK)
	$(PIP) install --no-compile -c $(LOCK) -e '.[dev,bench]'
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	@echo "== a healthy canary: 10% -> 50% -> 100%, judged against stable every minute"
	$(BIN)/canaryd simulate --scenario healthy --seed 1 --speed 900 --report demo-report.html
	@echo
	@echo "== a canary with 10x the errors: rolled back (exit code 1 is the expected outcome)"
	$(BIN)/canaryd simulate --scenario error-spike --seed 1 || [ $$? -eq 1 ]
	@echo
	@echo "More: $(BIN)/canaryd scenarios; $(BIN)/canaryd simulate --help; open demo-report.html"
	@echo "The whole product in a browser, no cluster needed: $(BIN)/canaryd playground"

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy --strict canaryd analysis simulator kubedouble tests bench

unit: $(VENV)/.installed-dev services
	$(BIN)/pytest -n 2

# What the tests run themselves (tests/services.py, tests/test_dashboard.py), installed if
# missing from Debian's packages: Prometheus, Mosquitto (the MQTT tests' broker, at
# /usr/sbin/mosquitto), and Chromium for the dashboard's browser test
# (driven by Playwright at /usr/bin/chromium; no tool downloads a browser).  Their system
# services are not started (policy-rc.d says no, unless a policy is already in place) and
# not needed: each test starts its own instance on a free port.
POLICY_RC_D ?= /usr/sbin/policy-rc.d
services:
	@missing=; command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	  [ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	  [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	  [ -z "$$missing" ] || { \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=; \
	  elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	  else echo "make: the tests need$$missing: as root, run: apt-get install -y$$missing" >&2; exit 1; fi; \
	  command -v apt-get >/dev/null 2>&1 || { \
	    echo "make: the tests need$$missing (Prometheus >= 2.42 on PATH, /usr/bin/chromium, /usr/sbin/mosquitto); no apt-get here to install them" >&2; exit 1; }; \
	  echo "== installing for the tests:$$missing (apt-get install)"; \
	  policy=; if [ ! -e $(POLICY_RC_D) ]; then policy=$(POLICY_RC_D); \
	    printf '#!/bin/sh\nexit 101\n' | $$sudo tee $$policy >/dev/null && $$sudo chmod 755 $$policy; fi; \
	  $$sudo apt-get update -qq \
	    && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  status=$$?; [ -z "$$policy" ] || $$sudo rm -f $$policy; \
	  [ $$status -eq 0 ] || exit $$status; \
	  command -v prometheus >/dev/null 2>&1 || { echo "make: prometheus is installed but not on PATH" >&2; exit 1; }; }

test: lint typecheck unit

# Benchmarks: numbers for bench/README.md; never part of `make test`.
bench: $(VENV)/.installed-dev
	$(BIN)/python bench/simulator_speed.py
	$(BIN)/python bench/engine_speed.py
	$(BIN)/python bench/detection.py --out bench/out

# Re-pin every dependency (after changing pyproject.toml) from a throwaway venv.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip --disable-pip-version-check --quiet install -e '.[dev,bench]'
	.venv-lock/bin/python -m pip freeze --exclude-editable --exclude canaryd | sort > $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info demo-report.html tests/artifacts
