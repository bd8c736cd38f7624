# The two commands a fresh clone needs: `make demo` and `make test`.
# Both create .venv and install the pinned dependencies when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.spiralkit-installed
# Tests and benchmarks find the offline data sets here unless told otherwise.
export SPIRALKIT_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,openvino]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spiral demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
