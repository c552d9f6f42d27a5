# Two commands for a newcomer: `make run` (the service on embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench stand-ins lock clean

# Every package is pinned with its hashes (requirements*.txt, made by `make lock` from requirements*.in).
$(VENV)/.installed: requirements-pip.txt requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r requirements-pip.txt
	$(PY) -m pip install --quiet --require-hashes -r requirements-dev.txt
	touch $@

# After editing requirements.in or requirements-dev.in: resolve and pin everything again, with hashes.
lock: $(VENV)/.installed
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --no-emit-index-url --no-emit-find-links \
		--strip-extras -o requirements.txt requirements.in
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --no-emit-index-url --no-emit-find-links \
		--strip-extras -o requirements-dev.txt requirements-dev.in

# Local stand-ins that come from package registries (installed only when missing).
stand-ins: $(VENV)/.installed
	@for script in scripts/ensure-*.sh; do [ ! -e "$$script" ] || PYTHON=$(abspath $(PY)) bash "$$script" || exit 1; done

run: $(VENV)/.installed
	$(PY) localdev.py

test: $(VENV)/.installed stand-ins
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(PY) bench/fanout.py

clean:
	rm -rf $(VENV) .local .pytest_cache
