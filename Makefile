# The two commands of the README: `make run` and `make test`. Everything they need is installed from here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest stack-up stack-down lock clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade 'pip>=24'
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

## make run: set up and start the local stack (Kafka, PostgreSQL, Redis), apply migrations and topics.
run: $(STAMP)
	$(BIN)/notify run

## make test: set up, lint, type-check and run every test against the real local stack.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

stack-up: $(STAMP)
	$(BIN)/notify stack up

stack-down: $(STAMP)
	$(BIN)/notify stack down

## make lock: re-resolve and pin every Python dependency (commit requirements.lock afterwards).
lock:
	rm -rf /tmp/notify-lock-venv && $(PYTHON) -m venv /tmp/notify-lock-venv
	/tmp/notify-lock-venv/bin/pip install --quiet --upgrade 'pip>=24'
	/tmp/notify-lock-venv/bin/pip install --quiet -e '.[dev]'
	/tmp/notify-lock-venv/bin/pip freeze --exclude-editable | grep -v '^notify-pipeline' > requirements.lock

clean:
	-$(BIN)/notify stack down
	rm -rf $(VENV) .stack .cache .mypy_cache .ruff_cache .pytest_cache
