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

# Plus the test and lint tools, and the benchmarks' plotting (bench/ is type-checked too).
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -c $(LOCK) -e '.[dev,bench]'
	touch $@

demo: $(VENV)/.installed
	@echo "== a healthy canary: 10% -> 50% -> 100%, judged against stable every minute"
	$(BIN)/canaryd simulate --scenario healthy --seed 1 --speed 900 --report demo-report.html
	@echo
	@echo "== a canary with 10x the errors: rolled back (exit code 1 is the expected outcome)"
	$(BIN)/canaryd simulate --scenario error-spike --seed 1 || [ $$? -eq 1 ]
	@echo
	@echo "More: $(BIN)/canaryd scenarios; $(BIN)/canaryd simulate --help; open demo-report.html"

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy --strict canaryd analysis simulator tests bench

unit: $(VENV)/.installed-dev services
	$(BIN)/pytest -n 2

# Servers the tests run themselves (tests/services.py), installed if missing: Prometheus,
# from Debian's package.  Its system service is not started (policy-rc.d says no, unless a
# policy is already in place) and not needed: each test starts its own on a free port.
POLICY_RC_D ?= /usr/sbin/policy-rc.d
services:
	@command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=; \
	  elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	  else echo "make: the tests need Prometheus: as root, run: apt-get install -y prometheus" >&2; exit 1; fi; \
	  command -v apt-get >/dev/null 2>&1 || { \
	    echo "make: the tests need Prometheus (>= 2.42) on PATH; no apt-get here to install it" >&2; exit 1; }; \
	  echo "== installing Prometheus for the tests (apt-get install prometheus)"; \
	  policy=; if [ ! -e $(POLICY_RC_D) ]; then policy=$(POLICY_RC_D); \
	    printf '#!/bin/sh\nexit 101\n' | $$sudo tee $$policy >/dev/null && $$sudo chmod 755 $$policy; fi; \
	  $$sudo apt-get update -qq \
	    && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info demo-report.html
