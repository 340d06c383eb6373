# One entry point for set-up, tests and the demo. Every target installs what it needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := libsystemd-dev pkg-config prometheus systemd
STAMP_SYS := $(VENV)/.system-deps
STAMP_PY := $(VENV)/.python-deps

.PHONY: all deps test lint typecheck demo bench clean

all: test

# Debian packages: pystemd builds against libsystemd-dev; prometheus brings promtool.
$(STAMP_SYS):
	@mkdir -p $(VENV)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install:$$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@touch $@

$(STAMP_PY): pyproject.toml $(STAMP_SYS)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[systemd,test]'
	@touch $@

deps: $(STAMP_PY)

lint: deps
	$(VENV)/bin/ruff check watchdog_updater tests bench
	$(VENV)/bin/ruff format --check watchdog_updater tests bench

typecheck: deps
	$(VENV)/bin/mypy

test: deps lint typecheck
	$(PY) -m pytest -q tests

demo: deps
	$(PY) -m tests.kit.demo

bench: deps
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
