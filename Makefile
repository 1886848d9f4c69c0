# The two commands: `make up` runs the platform locally, `make test` runs the tests.
# Both install what they need first (scripts/setup.sh).
.PHONY: setup up test test-fast check bench lock

setup:
	@scripts/setup.sh

# `make up PREFECT_DB=postgres`: the Prefect server on the sandbox's PostgreSQL instead.
up: setup
	.venv/bin/python -m deployments.local --prefect-db $(or $(PREFECT_DB),sqlite)

test: setup
	.venv/bin/python -m pytest

test-fast: setup
	.venv/bin/python -m pytest -m "not slow"

check: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports

bench: setup
	.venv/bin/python -m bench

lock:
	.venv/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock
