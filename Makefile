# The two set-up commands: `make demo` (main job on the built-in data) and `make test`.
# Uses the active virtual or conda environment if there is one, else creates .venv here.

PYTHON ?= python3
ifneq ($(VIRTUAL_ENV),)
  ENV_DIR := $(VIRTUAL_ENV)
else ifneq ($(CONDA_PREFIX),)
  ENV_DIR := $(CONDA_PREFIX)
else
  ENV_DIR := .venv
endif
PY := $(ENV_DIR)/bin/python
STAMP := $(ENV_DIR)/.cellnb-installed
TEST_STAMP := $(ENV_DIR)/.cellnb-test-installed

.PHONY: demo test install install-test clean-demo

demo: install
	$(PY) -m cellnb.cli run --run-dir outputs/demo --overwrite

test: install-test
	$(PY) -m pytest -q

install: $(STAMP)
install-test: $(TEST_STAMP)

$(PY):
	$(PYTHON) -m venv $(ENV_DIR)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e .
	touch $(STAMP)

$(TEST_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install -e '.[test]'
	touch $(TEST_STAMP)

clean-demo:
	rm -rf outputs/demo
