# Two commands do everything on a fresh clone:
#   make demo   build a gradient datastore on a generated corpus with a locally built model, print a selection
#   make test   run the test suite
# Both create the virtual environment (.venv) on first use.

VENV ?= .venv
PYTHON ?= python3
# A CPU wheel of this torch is on the project's build machines; on other hosts pip fetches it.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradstore-installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m gradstore.demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf demo-output .pytest_cache
