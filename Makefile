# The two commands of the README. Each creates .venv when missing and installs everything pinned
# (constraints.txt pins the CPU torch wheel for this machine and CI; pyproject.toml keeps ranges).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-out

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dhf-cache demo --workdir $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=12

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
