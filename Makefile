# Two commands for a newcomer: `make demo` (set up + main job) and `make test` (set up + tests).
# Both create and reuse a virtual environment in $(VENV).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of this release lies on disk on the CI machines; on a CUDA machine pip takes the CUDA build of it.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= out/demo

.PHONY: venv demo test bench-cpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/d3s2 selfcheck

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
