# Two entry points; each creates .venv and installs the pinned dependencies when needed.
PYTHON ?= python3
VENV := .venv
# Reinstall only when the dependency list changes.
STAMP := $(VENV)/.installed

.PHONY: run test

run: $(STAMP)
	$(VENV)/bin/python run.py task=segmentation xconv=plan25

# Two pytest-xdist workers, one per core of a CI machine (tests/conftest.py gives each one torch
# thread), each taking whole test files: module fixtures are set up once, and the tests of one file
# never run at once (the two DDP runs, a test writing under results/ and one reading it).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -e '.[dev]'
	touch $@
