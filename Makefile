# Every command a user needs. `make` alone lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

TEST_TOOLS := nginx redis-server chromium docker-compose

COMPOSE := docker compose --env-file deploy/cross-domain.env -f deploy/compose.yaml

.PHONY: help up-same-domain up-cross-domain down reload test lint format bench soak env-files clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

up-same-domain: $(VENV)/.installed ## Run the stack, pages and sockets on one domain (/ws/); RUNTIME=docker|native
	@exec deploy/up.sh same-domain

up-cross-domain: $(VENV)/.installed ## Run the stack, sockets on REALTIME_HOST, another domain; RUNTIME=docker|native
	@exec deploy/up.sh cross-domain

down: ## Stop the compose stack (the native one stops with Ctrl-C)
	SECRET_KEY=unused POSTGRES_PASSWORD=unused $(COMPOSE) down --remove-orphans

reload: $(VENV)/.installed ## Restart Gunicorn's workers and each Daphne in turn, refusing nothing (native; STATE_DIR)
	@$(PY) -m deploy.reload

env-files: $(VENV)/.installed ## Rewrite deploy/*.env from shared_settings/topology.py
	$(PY) -m deploy.envfiles

test: $(VENV)/.installed ## Run every test: unit, real stack, browser, compose (installs what is missing)
	@deploy/require.sh $(TEST_TOOLS)
	$(PY) -m pytest

lint: $(VENV)/.installed ## Check the code: ruff check, ruff format --check, mypy with django-stubs
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(VENV)/.installed ## Rewrite the code as `make lint` wants it (ruff format, ruff check --fix)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(VENV)/.installed ## Measure handshake cost, fan-out and capacity; write bench/results/ (about 10 min)
	@deploy/require.sh nginx redis-server
	$(PY) -m bench.handshake && $(PY) -m bench.fanout && $(PY) -m bench.capacity

soak: $(VENV)/.installed ## Hold 5,000 authenticated sockets for 60 s, announce once, print memory and delivery time
	@deploy/require.sh nginx redis-server
	$(PY) -m bench.soak $(SOAK_ARGS)

clean: ## Remove the virtualenv and local state (var/)
	rm -rf $(VENV) var

# The virtualenv, from the lock files; redone when they change.
$(VENV)/.installed: requirements.lock requirements-dev.lock
	@# Debian's python3 makes virtualenvs only with python3-venv installed.
	@python3 -c 'import ensurepip' 2>/dev/null || deploy/require.sh python3-venv-missing:python3-venv
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.lock
	touch $@
