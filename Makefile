# Every command a user needs. `make` alone lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

RUN_TOOLS := nginx redis-server
TEST_TOOLS := $(RUN_TOOLS) chromium docker-compose

.PHONY: help up-same-domain up-cross-domain test clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

up-same-domain: $(VENV)/.installed ## Run the stack natively: pages and sockets on one domain (/ws/)
	@deploy/require.sh $(RUN_TOOLS)
	exec env SPLIT_MODE=same-domain $(PY) deploy/native.py

up-cross-domain: $(VENV)/.installed ## Run the stack natively: sockets on REALTIME_HOST, another domain
	@deploy/require.sh $(RUN_TOOLS)
	exec env SPLIT_MODE=cross-domain $(PY) deploy/native.py

test: $(VENV)/.installed ## Run every test: unit, real stack, browser, compose (installs what is missing)
	@deploy/require.sh $(TEST_TOOLS)
	$(PY) -m pytest

clean: ## Remove the virtualenv and local state (var/)
	rm -rf $(VENV) var

# The virtualenv, from the lock files; redone when they change.
$(VENV)/.installed: requirements.lock requirements-dev.lock
	@python3 -c 'import ensurepip' 2>/dev/null || deploy/require.sh ensurepip-missing:python3-venv
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.lock
	touch $@
