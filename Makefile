# galgen: two commands do all the set-up on a fresh machine (see README.md):
#   make demo   install into .venv, then run the main job on the embedded default
#   make test   install into .venv, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch lies on this machine's disk; an unpinned torch would pull a
# CUDA build of several GB. On a GPU cluster install your CUDA torch first and run
# `pip install -e .` instead (setup.py asks only for torch>=2.2).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all docs bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/galgen -v run pipelines/sdss_demo.yaml --out demo_out
	@echo "demo: open demo_out/report/index.html (the lines above name every output)"

test: install
	$(PY) -m pytest -m "not slow" --durations=15

test-all: install
	$(PY) -m pytest

$(VENV)/.docs: $(STAMP)
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $@

docs: $(VENV)/.docs
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

bench: install
	$(PY) benchmarks/bench_simulate.py

clean:
	rm -rf demo_out docs/_build docs/api/generated .pytest_cache
