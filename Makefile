# Developer and CI entry points. Everything installs into .venv from pyproject.toml, so a fresh
# machine needs only python3 with the venv module.

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
# Touched after a successful install; pip only runs again when pyproject.toml is newer.
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test lint demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --upgrade pip
	$(VENV_PY) -m pip install -e '.[dev,etcd,integrations]'
	@touch $(STAMP)

test: venv
	$(VENV_PY) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy sharded_chroma

demo: venv
	$(VENV)/bin/sharded-chroma demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
