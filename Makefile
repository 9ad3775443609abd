# Two commands do everything on a fresh clone:
#   make demo   build a gradient datastore on a generated corpus with a locally built model, print a selection
#   make test   run the test suite
# Both create the virtual environment (.venv) on first use. CI also runs
#   make install-test   build the sdist and the wheel, install the wheel (not editable) into fresh
#                       virtual environments and use it from there, as a user would

VENV ?= .venv
PYTHON ?= python3
# A CPU wheel of this torch is on the project's build machines; on other hosts pip fetches it.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradstore-installed

.PHONY: demo test install-test venv clean

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

# The tests marked `install` (tests/installs.py), skipped by `make test`: each fresh environment
# installs TORCH_SPEC first, then the wheel; pip's cache keeps this to a few minutes.
install-test: $(STAMP)
	GRADSTORE_INSTALL_TEST=1 TORCH_SPEC="$(TORCH_SPEC)" $(PY) -m pytest -q -m install tests/test_packaging.py tests/test_docker.py

clean:
	rm -rf demo-output .pytest_cache
