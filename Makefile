# Two commands do all set-up: `make demo` and `make test`. Both create .venv and install what they need
# once (the stamp file is newer than pyproject.toml afterwards, so a second run installs nothing).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test test-fast bench repro clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/grounding demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/shard_io.py

repro: $(STAMP)
	$(VENV)/bin/dvc repro

clean:
	rm -rf data/prepared data/teachers data/students data/metrics models/* .pytest_cache
