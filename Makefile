# Two entry points; each creates .venv and installs the pinned dependencies when needed.
PYTHON ?= python3
VENV := .venv
# Reinstall only when the dependency list changes.
STAMP := $(VENV)/.installed

.PHONY: run test

run: $(STAMP)
	$(VENV)/bin/python run.py task=segmentation xconv=plan25

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -e '.[dev]'
	touch $@
