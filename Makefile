# The two commands of README: `make demo` (the embedded default distillation) and `make test`.
.PHONY: setup demo test test-all bench
PY := .venv/bin/python

setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) -m megatron_opd.cli demo $(ARGS)

test: setup
	$(PY) -m pytest -q -m "not slow and not gpu" tests

test-all: setup
	$(PY) -m pytest -q tests
