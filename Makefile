# One-command entry points. Each target creates (or reuses) .venv in the checkout and installs the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]" "$(TORCH_PIN)"
	touch $(STAMP)

setup: $(STAMP)

# One test process per core (pytest-xdist; a file's tests stay in one process so they share its fixtures).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=10 tests

# The core and unit tests: everything but the tests marked slow (programs run as subprocesses, training runs,
# multi-process launches; tests/conftest.py marks whole end-to-end files).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10 -m "not slow" tests

demo: $(STAMP)
	$(PY) -m experiments.coco_retinanet --config configs/demo.py --workdir runs/demo

clean-venv:
	rm -rf $(VENV)
