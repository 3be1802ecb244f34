# Entry points for developers and CI (.ci/run runs `make test`).
VENV := .venv/bin
# deploy/prometheus/prometheusrule.py is linted too
LINT_PATHS := $(wildcard src tests benchmarks deploy)
BENCHES := $(wildcard benchmarks/bench_*.py)
PYTEST_ARGS ?=

.PHONY: setup services test demo bench

setup:
	bash scripts/setup.sh

services: setup
	bash scripts/services.sh

test: setup services
	$(VENV)/ruff check $(LINT_PATHS)
	$(VENV)/mypy
	@rc=0; $(VENV)/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: FAILED: pytest collected no tests (exit 5)" >&2; exit 1; fi; \
	exit $$rc

demo: setup
	$(VENV)/taskmeter demo

bench: setup
	@[ -n "$(BENCHES)" ] || { echo "make bench: no benchmarks/bench_*.py found" >&2; exit 1; }
	@for b in $(BENCHES); do echo "== $$b"; $(VENV)/python $$b || exit $$?; done
