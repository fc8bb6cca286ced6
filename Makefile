# Set-up is part of every target: on a fresh machine `make demo` and `make test` are enough.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here, not in pyproject: the pair must match, and a bare `torch` may resolve
# to a multi-GB build on a machine without a local wheel cache.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-zoo bench venv clean

$(VENV)/.core: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.demo: $(VENV)/.core
	$(PY) -m pip install -q -e ".[demo]"
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PY) -m pip install -q -e ".[dev,demo,bench]"
	touch $@

venv: $(VENV)/.core

demo: $(VENV)/.demo
	$(PY) -m vcon_fx demo --out demo_out

test: $(VENV)/.dev
	$(PY) -m pytest -q -n 2 -m "not slow"

test-zoo: $(VENV)/.dev
	$(PY) -m pytest -q -n 2 -m slow

bench: $(VENV)/.dev
	$(PY) benchmarks/deploy.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
