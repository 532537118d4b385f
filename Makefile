# The two commands of the README's quickstart. Both set up .venv first (only once).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ARGS   ?= model=cnn optimizer=adam trainer.max_epochs=1

.PHONY: setup train lint test data clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

data: setup
	$(PY) scripts/provision_data.py

train: data
	$(PY) train.py $(ARGS)

lint: setup
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
