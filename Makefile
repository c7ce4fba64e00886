# Two entry points for a fresh clone:
#   make demo   install the package with its text extra and run the main job
#   make test   install the dev extras and run the test suite
# Both install the versions pinned in requirements/constraints.txt (see CONTRIBUTING.md).
#   make test-latest   the newest releases instead of the pins, then the suite (catch the next breakage)
#   make lock          refresh the pins: test-latest, then write what it installed to the lock
VENV ?= .venv
LATEST_VENV ?= .venv-latest
PY := $(VENV)/bin/python
LOCK := requirements/constraints.txt
# -P (Python >= 3.11) keeps the current folder off sys.path; kernels/__init__.py covers older Pythons
# and every other way of starting Python from the repository root (CONTRIBUTING.md).
PYFLAGS := $(shell python3 -c 'import sys; print("-P" if sys.version_info >= (3, 11) else "")')

.PHONY: demo test test-latest lock bench lint clean

$(VENV)/.installed-%: pyproject.toml $(LOCK) scripts/setup-venv.sh
	bash scripts/setup-venv.sh $(VENV) $* locked
	touch $@

demo: $(VENV)/.installed-text
	$(PY) $(PYFLAGS) -m rbank_torch demo

test: $(VENV)/.installed-dev
	$(PY) $(PYFLAGS) -m pytest -q --durations=15 tests

test-latest:
	rm -rf $(LATEST_VENV)
	bash scripts/setup-venv.sh $(LATEST_VENV) dev latest
	$(LATEST_VENV)/bin/python $(PYFLAGS) -m pytest -q tests

lock: test-latest
	bash scripts/write-lock.sh $(LATEST_VENV) $(LOCK)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check rbank_torch kernels tests benchmarks

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache
