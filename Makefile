# espline: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { echo "python3-venv is missing: apt-get install python3-venv"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

## Set up and run the main job on its embedded default: two sites, an IKEv2 tunnel, traffic
## and a summary (as root: it builds network namespaces). `make bench` times the ESP codec.
demo: $(STAMP)
	$(VENV)/bin/espline demo

## Set up and run the whole test suite, lint and type checks.
test: $(STAMP) lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline workers controller bench tests
	$(VENV)/bin/mypy

## The full codec benchmark table (several minutes), also written as JSON.
bench: $(STAMP)
	$(PY) -m bench.esp_codec --out bench/esp_codec.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
