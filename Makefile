# Two commands for a newcomer: `make run` (the service on embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench stand-ins clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Local stand-ins that come from package registries (installed only when missing).
stand-ins:
	@for script in scripts/ensure-*.sh; do [ ! -e "$$script" ] || bash "$$script" || exit 1; done

run: $(VENV)/.installed
	$(PY) localdev.py

test: $(VENV)/.installed stand-ins
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed
	$(PY) bench/fanout.py

clean:
	rm -rf $(VENV) .local .pytest_cache
