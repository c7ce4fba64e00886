# Two entry points for a fresh clone:
#   make demo   install the package with its text extra and run the main job
#   make test   install the dev extras and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test bench lint clean

$(VENV)/.installed-%: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	PYTHON=$(PY) bash scripts/install-torch.sh
	$(PIP) install -q -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-text
	$(PY) -m rbank_torch demo

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check rbank_torch kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
