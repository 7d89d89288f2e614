# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements-cpu.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

$(STAMP): requirements-cpu.txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-cpu.txt
	$(VPY) -m pip install -q --no-deps torchrec==1.8.0
	$(VPY) -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: setup
	$(VPY) examples/demo.py

test: setup
	$(VPY) -m pytest -m "not slow" tests

test-slow: setup
	$(VPY) -m pytest -m slow tests

bench: setup
	$(VPY) benchmarks/pipeline_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache
