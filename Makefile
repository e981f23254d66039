# Every command a user needs. `make` alone lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

# PostgreSQL's programs live off PATH, in /usr/lib/postgresql/<version>/bin (deploy/postgres.py).
POSTGRES_TOOL := '/usr/lib/postgresql/*/bin/initdb:postgresql'
TEST_TOOLS := nginx redis-server chromium docker-compose $(POSTGRES_TOOL)
# The stack suites, run once more on PostgreSQL (tests/stack.py reads STACK_DATABASE).
POSTGRES_SUITES := tests/test_stack.py tests/test_sessions_stack.py tests/test_faults.py tests/test_browser.py

COMPOSE := docker compose --env-file deploy/cross-domain.env -f deploy/compose.yaml

.PHONY: help up-same-domain up-cross-domain up-subdomain down reload test lint format bench soak env-files clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'
	@echo "  PUBLIC_SCHEME=https make up-...  the same over HTTPS, from a local CA (README: HTTPS)"

up-same-domain: $(VENV)/.installed ## Run the stack, pages and sockets on one domain (/ws/); RUNTIME=docker|native
	@exec deploy/up.sh same-domain

up-cross-domain: $(VENV)/.installed ## Run the stack, sockets on REALTIME_HOST, another domain; RUNTIME=docker|native
	@exec deploy/up.sh cross-domain

up-subdomain: $(VENV)/.installed ## Run the stack, sockets on a sibling subdomain (parent-domain cookie); RUNTIME=docker|native
	@exec deploy/up.sh subdomain

down: ## Stop the compose stack (the native one stops with Ctrl-C)
	SECRET_KEY=unused POSTGRES_PASSWORD=unused $(COMPOSE) down --remove-orphans

reload: $(VENV)/.installed ## Restart Gunicorn's workers and each Daphne in turn, refusing nothing (native; STATE_DIR)
	@$(PY) -m deploy.reload

env-files: $(VENV)/.installed ## Rewrite deploy/*.env from shared_settings/topology.py
	$(PY) -m deploy.envfiles

test: $(VENV)/.installed ## Run every test (installs what is missing), then the stack suites on PostgreSQL
	@deploy/require.sh $(TEST_TOOLS)
	$(PY) -m pytest
	STACK_DATABASE=postgres $(PY) -m pytest $(POSTGRES_SUITES)

lint: $(VENV)/.installed ## Check the code: ruff check, ruff format --check, mypy with django-stubs
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(VENV)/.installed ## Rewrite the code as `make lint` wants it (ruff format, ruff check --fix)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(VENV)/.installed ## Measure handshake cost, a Redis round trip, fan-out and capacity; write bench/results/ (about 13 min)
	@deploy/require.sh nginx redis-server $(POSTGRES_TOOL)
	$(PY) -m bench.handshake && $(PY) -m bench.redis_roundtrip && $(PY) -m bench.fanout && $(PY) -m bench.capacity

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
