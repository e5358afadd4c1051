# Two commands for a newcomer: `make demo` (set up + main job) and `make test` (set up + tests).
# Both create and reuse a virtual environment in $(VENV).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of this release lies on disk on the CI machines; on a CUDA machine pip takes the CUDA build of it.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= out/demo
# `make demo`: the bundled demo model on the bundled example images (renders of held-out meshes; DEMO_INPUTS=a.png
# for others). Extra options for `d3s2 generate` go in DEMO_ARGS; DEMO_CPU_ARGS are added only when PyTorch sees no
# GPU (fewer sampler steps, so the CPU run stays shorter; on a GPU the model's own step counts are used).
DEMO_MODEL := src/d3s2/assets/demo/pipeline.yaml
DEMO_INPUTS ?= --examples
DEMO_ARGS ?= --faces 50000
DEMO_CPU_ARGS ?= --steps-dense 10 --steps-512 10

.PHONY: venv demo selfcheck test bench-cpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# Without the bundled model (a checkout without src/d3s2/assets/demo) `make demo` says so and runs the
# self-check (a real mesh through the data pipeline, sparse conv vs dense conv) instead.
demo: venv
	@if [ -f $(DEMO_MODEL) ]; then \
	  $(VENV)/bin/d3s2 generate $(DEMO_INPUTS) -o $(DEMO_OUT) --preview $(DEMO_ARGS) \
	    $$($(PY) -c "import torch; print('' if torch.cuda.is_available() else '$(DEMO_CPU_ARGS)')") && \
	  echo "make demo: meshes (.glb) and previews (input | mesh, .preview.png) are in $(DEMO_OUT)/"; \
	else \
	  echo "make demo: this version ships no trained demo model yet ($(DEMO_MODEL) is missing; see demo/README.md)." \
	    "Running the self-check instead; to generate meshes: d3s2 generate IMAGE -o OUT --weights PIPELINE_DIR" >&2; \
	  $(VENV)/bin/d3s2 selfcheck; \
	fi

selfcheck: venv
	$(VENV)/bin/d3s2 selfcheck

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
