# Quickstart: `make demo` (install, then HM3 on the built-in tiny3 benchmark at the demo budget) and `make test`.
# `make demo-full` is the README results config (15 preferences, full budgets) into runs/tiny3; both share the zoo.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/tiny3
DEMO_WORKDIR ?= runs/demo
PYTEST_ARGS ?= -q -n 2 --dist loadfile --durations=20
# processes for a demo run's stages (run_hm3 --stage_workers: the ablation and the baselines in a second process
# beside the main one, same report; 1 = one process; each process holds the zoo, ~3.5-4 GB for tiny3)
STAGE_WORKERS ?= 2

.PHONY: install test demo demo-full lint format clean

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_ARGS) tests

demo: install
	$(PY) -m experiments.run_hm3 --config=experiments/configs/tiny3.py:demo --workdir=$(DEMO_WORKDIR) \
		--zoo_dir=$(WORKDIR)/zoo --stage_workers=$(STAGE_WORKERS)

demo-full: install
	$(PY) -m experiments.run_hm3 --config=experiments/configs/tiny3.py --workdir=$(WORKDIR) \
		--stage_workers=$(STAGE_WORKERS)

lint: install
	$(VENV)/bin/ruff format --check hm3_jax experiments tests benchmarks
	$(VENV)/bin/ruff check hm3_jax experiments tests benchmarks

format: install
	$(VENV)/bin/ruff format hm3_jax experiments tests benchmarks
	$(VENV)/bin/ruff check --fix hm3_jax experiments tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
