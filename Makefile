# make demo : the main job, a quick reproduction of the paper's comparison on real data
# make test : the test suite (what CI runs)
# Both create .venv with the pinned dev dependencies first; nothing needs installing by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

test: venv
	$(PY) -m pytest -q

demo: venv
	$(PY) -m wnorm.repro demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
