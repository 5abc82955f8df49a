# make demo : the main job, a quick reproduction of the paper's comparison on real data
# make test : the test suite (what CI runs)
# Both create .venv with the pinned dev dependencies first; nothing needs installing by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo venv data clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

test: venv
	$(VENV)/bin/ruff check -q .
	$(PY) -m pytest -q

demo: venv data
	$(PY) -m experiments.demo

# Fashion-MNIST from Debian's package when we can install it; otherwise the experiments download
# the files (checksums checked) or say how to get them.
data:
	@test -d /usr/share/datasets/fashion-mnist || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; }; } || true

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
